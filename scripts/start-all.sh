#!/usr/bin/env bash
# Start the ai-orchestrator in the background and wait until it answers /health.
#
# Idempotent: if the pidfile names a live orchestrator, says so and exits 0.
# The orchestrator runs in its own session (setsid), so Ctrl-C in this terminal or
# closing it does not reach it; stop it with scripts/stop-all.sh.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
ORCHESTRATOR="$REPO_ROOT/model-orchestrator/orchestrator.py"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--config FILE] [--host H] [--port P] [--python PY] [--timeout S] [--check]

Start the ai-orchestrator in the background and wait until GET /health answers 200.

Options:
  --config FILE   models.yaml to serve (default: \$AIO_CONFIG, else the one
                  scripts/install.sh rendered into the data folder (\$AIO_DATA_DIR or
                  <repo>/.data), else model-orchestrator/models.yaml when nvidia-smi sees
                  a GPU, else the CPU demo profile model-orchestrator/models.demo.yaml)
  --host H        listen address (default: settings.host from the config)
  --port P        listen port (default: settings.port from the config)
  --python PY     interpreter (default: \$AIO_PYTHON, else the orchestrator environment
                  install.sh built in the data folder, else <repo>/.venv/bin/python
                  if it exists, else python3)
  --timeout S     seconds to wait for /health (default: 60)
  --check         only validate the config that would be served, print it and its models, and exit
  -h, --help      show this help and exit

Files (runtime dir: \$AIO_RUN_DIR, else <repo>/run; created private, mode 0700/0600):
  orchestrator.pid   pid of the running orchestrator
  orchestrator.log   its log, rotated by size (orchestrator.log.1, ...: settings.log_max_mb,
                     settings.log_backups)
  orchestrator.out   what it prints outside its log: a crash's traceback, startup errors
                     (moved to orchestrator.out.1 at a start when over 10 MB)

The open-file limit is raised to the hard limit (65536 at least, where allowed): every
proxied request holds two sockets.

Exit status: 0 when running (started now or already), 1 when it could not start,
2 on bad usage or an invalid config.
EOF
}

die() { echo "start-all: $*" >&2; exit 1; }
usage_error() { echo "start-all: $*" >&2; echo "Try '$(basename "$0") --help'." >&2; exit 2; }

DATA_DIR="${AIO_DATA_DIR:-$REPO_ROOT/.data}"
default_config() {
    if [[ -f "$DATA_DIR/models.yaml" ]]; then
        echo "$DATA_DIR/models.yaml"  # rendered by the playbook: every service's interpreter set
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "$REPO_ROOT/model-orchestrator/models.yaml"
    else
        echo "$REPO_ROOT/model-orchestrator/models.demo.yaml"
    fi
}
CONFIG="${AIO_CONFIG:-$(default_config)}"
HOST=""
PORT=""
if [[ -n "${AIO_PYTHON:-}" ]]; then
    PY="$AIO_PYTHON"
elif [[ -x "$DATA_DIR/venvs/orchestrator/bin/python" ]]; then
    PY="$DATA_DIR/venvs/orchestrator/bin/python"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY="python3"
fi
TIMEOUT=60
CHECK_ONLY=false

need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --check) CHECK_ONLY=true; shift ;;
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --config=*) CONFIG="${1#*=}"; shift ;;
        --host) need_value "$@"; HOST="$2"; shift 2 ;;
        --host=*) HOST="${1#*=}"; shift ;;
        --port) need_value "$@"; PORT="$2"; shift 2 ;;
        --port=*) PORT="${1#*=}"; shift ;;
        --python) need_value "$@"; PY="$2"; shift 2 ;;
        --python=*) PY="${1#*=}"; shift ;;
        --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
        --timeout=*) TIMEOUT="${1#*=}"; shift ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

[[ "$TIMEOUT" =~ ^[0-9]+$ && "$TIMEOUT" -gt 0 ]] || usage_error "--timeout must be a positive integer, got '$TIMEOUT'"
[[ -z "$PORT" || ( "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ) ]] \
    || usage_error "--port must be 1-65535, got '$PORT'"
command -v "$PY" >/dev/null 2>&1 || die "python interpreter not found: $PY (use --python or \$AIO_PYTHON)"
PY="$(command -v "$PY")"
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG (use --config or \$AIO_CONFIG)"
CONFIG="$(cd -- "$(dirname -- "$CONFIG")" && pwd -P)/$(basename -- "$CONFIG")"
if [[ "$CHECK_ONLY" == true ]]; then  # the same file and interpreter a start would use
    cd "$REPO_ROOT"
    exec "$PY" "$ORCHESTRATOR" --config "$CONFIG" --check
fi

# shellcheck source=scripts/lib/common.sh
source "$REPO_ROOT/scripts/lib/common.sh"
(umask 077 && mkdir -p "$RUN_DIR")  # private if we create it: logs may hold prompts or tokens
RUN_DIR="$(cd -- "$RUN_DIR" && pwd -P)"
PIDFILE="$RUN_DIR/orchestrator.pid"
URLFILE="$RUN_DIR/orchestrator.url"
LOGFILE="$RUN_DIR/orchestrator.log"
OUTFILE="$RUN_DIR/orchestrator.out"

# --- helpers --------------------------------------------------------------------------


read_pidfile() {
    local pid=""
    if [[ -f "$PIDFILE" ]]; then read -r pid 2>/dev/null <"$PIDFILE" || true; fi
    [[ "$pid" =~ ^[1-9][0-9]*$ ]] && echo "$pid"
    return 0
}

url_host() {  # an IPv6 literal goes in brackets
    if [[ "$1" == *:* ]]; then echo "[$1]"; else echo "$1"; fi
}

# Prints the HTTP status of GET $1 ("000" when nothing answers).
http_status() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
    else
        "$PY" - "$1" <<'PYEOF' 2>/dev/null || echo 000
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as resp:
        print(resp.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception:
    print("000")
PYEOF
    fi
}

show_log_tail() {
    local file
    for file in "$LOGFILE" "$OUTFILE"; do
        if [[ -s "$file" ]]; then
            echo "---- last 30 lines of $file ----" >&2
            tail -n 30 "$file" >&2 2>/dev/null || true
        fi
    done
    echo "----" >&2
}

# Every proxied request holds two sockets (client and service), and a soft limit of 1024 is
# common: raise it to the hard limit, and the hard limit to 65536 first where we may (root).
raise_open_files() {
    local want=65536 hard soft
    hard="$(ulimit -Hn)"
    if [[ "$hard" != unlimited ]] && ((hard < want)) && ulimit -Hn "$want" 2>/dev/null; then
        hard="$want"
    fi
    if [[ "$hard" == unlimited ]]; then
        hard="$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)"
    fi
    ulimit -Sn "$hard" 2>/dev/null || true
    soft="$(ulimit -Sn)"
    if [[ "$soft" != unlimited ]] && ((soft < want)); then
        echo "start-all: note: open-file limit set to $soft, not $want (the hard limit is $(ulimit -Hn));" \
            "many concurrent requests may fail with 'Too many open files'." \
            "Raise the hard limit (docker run --ulimit nofile=$want, LimitNOFILE= under systemd)." >&2
    fi
}

# A file written only by crashes stays small; one that is not (a loop of warnings printed
# outside logging) is moved aside at the next start instead of growing forever.
rotate_outfile() {
    [[ -f "$OUTFILE" ]] || return 0
    if (($(wc -c <"$OUTFILE") > 10 * 1024 * 1024)); then mv -f -- "$OUTFILE" "$OUTFILE.1"; fi
}

# --- one start at a time --------------------------------------------------------------

if command -v flock >/dev/null 2>&1; then
    exec 9>"$RUN_DIR/start.lock"
    flock -w 120 9 || die "another start-all is still running (lock $RUN_DIR/start.lock)"
fi

# --- already running? -----------------------------------------------------------------

OLD_PID="$(read_pidfile)"
if [[ -n "$OLD_PID" ]] && is_orchestrator "$OLD_PID"; then
    url="$(cat "$URLFILE" 2>/dev/null || true)"
    echo "already running (pid $OLD_PID) at ${url:-unknown URL} — logs: $LOGFILE"
    exit 0
fi
if [[ -f "$PIDFILE" ]]; then
    echo "start-all: removing stale pidfile $PIDFILE${OLD_PID:+ (pid $OLD_PID is not a running orchestrator)}" >&2
    rm -f "$PIDFILE" "$URLFILE"
fi

# --- validate the config, find the address, check the port: the orchestrator answers ----
# One call: `--check` validates and prints a summary line, `--print-address` then prints
# "HOST PORT" (settings.host/port unless --host/--port override them), and `--port-free`
# exits 1 when another process already listens there. Checked before starting, so /health
# is not answered by someone else while our orchestrator is still loading and about to
# fail its bind. Its own errors go straight to stderr.
preflight=(--config "$CONFIG" --check --print-address --port-free)
[[ -n "$HOST" ]] && preflight+=(--host "$HOST")
[[ -n "$PORT" ]] && preflight+=(--port "$PORT")
preflight_status=0
preflight_out="$(cd "$REPO_ROOT" && "$PY" "$ORCHESTRATOR" "${preflight[@]}")" || preflight_status=$?
addr_line="$(tail -n 1 <<<"$preflight_out")"
check_out="$(sed '$d' <<<"$preflight_out")"  # which file, and the models in it
read -r HOST PORT _ <<<"$addr_line" || true
port_taken=false
if [[ "$preflight_status" -eq 1 && "$PORT" =~ ^[0-9]+$ ]]; then
    port_taken=true  # valid config, address printed, then --port-free failed
elif [[ "$preflight_status" -ne 0 ]]; then
    [[ -z "$preflight_out" ]] || echo "$preflight_out" >&2
    echo "start-all: config check failed: $CONFIG" >&2
    exit 2
fi

case "$HOST" in
    0.0.0.0) PROBE_HOST="127.0.0.1" ;;
    ::|"[::]") PROBE_HOST="::1" ;;
    *) PROBE_HOST="$HOST" ;;
esac
URL="http://$(url_host "$HOST"):$PORT"
HEALTH_URL="http://$(url_host "$PROBE_HOST"):$PORT/health"

if [[ "$port_taken" == true ]]; then
    die "port $PORT on $HOST is already in use by another process (not the one in $PIDFILE)"
fi

# --- launch -----------------------------------------------------------------------------

if command -v setsid >/dev/null 2>&1; then
    SESSION=(setsid)
else  # e.g. macOS: let python start the new session, then exec the orchestrator
    SESSION=("$PY" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])')
fi

raise_open_files
rotate_outfile
(
    umask 077  # only for the files created here; the orchestrator keeps the caller's umask
    echo "=== $(date '+%Y-%m-%d %H:%M:%S') start-all: $PY $ORCHESTRATOR --config $CONFIG --host $HOST --port $PORT" \
        | tee -a "$OUTFILE" >>"$LOGFILE"
)
chmod 600 "$OUTFILE"  # one from before this change may be world-readable; the log is the orchestrator's

# The background subshell execs nohup, which execs setsid, which execs python: $! is the
# orchestrator's own pid and no shell stays in between. fd 9 (the start lock) is closed.
# The orchestrator writes its log itself (--log-file: it rotates it); stdout and stderr
# keep only what bypasses logging, such as a crash's traceback.
(
    cd "$REPO_ROOT"
    exec nohup "${SESSION[@]}" "$PY" "$ORCHESTRATOR" --config "$CONFIG" --host "$HOST" --port "$PORT" \
        --log-file "$LOGFILE" </dev/null >>"$OUTFILE" 2>&1 9>&-
) &
PID=$!
echo "$PID" >"$PIDFILE"
echo "$URL" >"$URLFILE"

stop_started() {
    kill -TERM "$PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 150; i++)); do  # 30 s
        alive "$PID" || break
        sleep 0.2
    done
    if alive "$PID"; then
        kill -KILL "$PID" 2>/dev/null || true
    fi
    rm -f "$PIDFILE" "$URLFILE"
}

trap 'echo; echo "start-all: interrupted; the orchestrator (pid $PID) keeps starting in the background — scripts/stop-all.sh stops it" >&2; exit 130' INT

# --- wait for /health -------------------------------------------------------------------

deadline=$((SECONDS + TIMEOUT))
while :; do
    if ! alive "$PID"; then
        rm -f "$PIDFILE" "$URLFILE"
        echo "start-all: the orchestrator exited during startup" >&2
        show_log_tail
        exit 1
    fi
    if [[ "$(http_status "$HEALTH_URL")" == "200" ]] && alive "$PID"; then
        break
    fi
    if ((SECONDS >= deadline)); then
        echo "start-all: no healthy answer from $HEALTH_URL within ${TIMEOUT}s; stopping it" >&2
        show_log_tail
        stop_started
        exit 1
    fi
    sleep 0.2
done

echo "ai-orchestrator running (pid $PID) at $URL — logs: $LOGFILE"
echo "serving $check_out"  # which file, and the models in it
