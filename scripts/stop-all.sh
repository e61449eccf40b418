#!/usr/bin/env bash
# Stop the ai-orchestrator started by scripts/start-all.sh, and make sure its model
# services went with it.
#
# SIGTERM lets the orchestrator drain in-flight requests (settings.drain_timeout) and
# stop every model service; after --timeout seconds it is SIGKILLed (its reaper then
# kills the service process groups). Descendants recorded before signalling that
# are still alive afterwards are SIGKILLed and reported.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--timeout S]

Stop the ai-orchestrator whose pid is in \$AIO_RUN_DIR/orchestrator.pid
(default runtime dir: <repo>/run), then its model services.

Options:
  --timeout S   seconds to wait after SIGTERM before SIGKILL (default: 60; must
                exceed settings.drain_timeout plus the services' stop time)
  -h, --help    show this help and exit

Exit status: 0 when nothing is left running (also when it was not running),
1 when something could not be stopped, 2 on bad usage.
EOF
}

usage_error() { echo "stop-all: $*" >&2; echo "Try '$(basename "$0") --help'." >&2; exit 2; }

TIMEOUT=60
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --timeout) [[ $# -ge 2 && -n "$2" ]] || usage_error "option $1 needs a value"; TIMEOUT="$2"; shift 2 ;;
        --timeout=*) TIMEOUT="${1#*=}"; shift ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--timeout must be a non-negative integer, got '$TIMEOUT'"

# shellcheck source=scripts/lib/common.sh
source "$REPO_ROOT/scripts/lib/common.sh"


start_time() { ps -o lstart= -p "$1" 2>/dev/null || true; }

# All descendants of $1 (children, grandchildren, ...), from one snapshot of the table.
descendants() {
    ps -e -o pid= -o ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            found[root] = 1
            do {
                added = 0
                for (p in parent) if (!(p in found) && (parent[p] in found)) { found[p] = 1; added = 1 }
            } while (added)
            for (p in found) if (p != root) print p
        }'
}

wait_gone() {  # wait_gone SECONDS PID...: true once none is alive
    local ticks=$(($1 * 5)) pid any
    shift
    while :; do
        any=0
        for pid in "$@"; do
            if alive "$pid"; then any=1; break; fi
        done
        ((any)) || return 0
        ((ticks-- > 0)) || return 1
        sleep 0.2
    done
}

PID=""
if [[ -f "$PIDFILE" ]]; then read -r PID 2>/dev/null <"$PIDFILE" || true; fi
if [[ ! "$PID" =~ ^[1-9][0-9]*$ ]] || ! is_orchestrator "$PID"; then
    if [[ -f "$PIDFILE" ]]; then
        rm -f "$PIDFILE" "$URLFILE"
        echo "not running (removed stale pidfile $PIDFILE)"
    else
        echo "not running"
    fi
    exit 0
fi

# Remember the descendants (reaper, services, their workers) with their start times, so
# a pid reused by an unrelated process after they exit is not mistaken for a survivor.
declare -A KIDS=()
while read -r kid; do
    [[ -n "$kid" ]] && KIDS[$kid]="$(start_time "$kid")"
done < <(descendants "$PID")

echo "stopping ai-orchestrator (pid $PID; waiting up to ${TIMEOUT}s for it to drain)..."
kill -TERM "$PID" 2>/dev/null || true
status=0
if ! wait_gone "$TIMEOUT" "$PID"; then
    echo "stop-all: warning: pid $PID still running after ${TIMEOUT}s; sending SIGKILL (its reaper kills the services)" >&2
    kill -KILL "$PID" 2>/dev/null || true
    if ! wait_gone 5 "$PID"; then
        echo "stop-all: error: pid $PID survived SIGKILL" >&2
        status=1
    fi
fi
rm -f "$PIDFILE" "$URLFILE"

# Anything the orchestrator started that is still alive now escaped its shutdown.
still_ours() { alive "$1" && [[ "$(start_time "$1")" == "${KIDS[$1]}" ]]; }
ours=()
for kid in "${!KIDS[@]}"; do
    if still_ours "$kid"; then ours+=("$kid"); fi
done
if ((${#ours[@]})) && ! wait_gone 10 "${ours[@]}"; then
    for kid in "${ours[@]}"; do
        if still_ours "$kid"; then
            echo "stop-all: warning: killing leftover process $kid: $(ps -ww -o args= -p "$kid" 2>/dev/null || true)" >&2
            kill -KILL "$kid" 2>/dev/null || true
        fi
    done
    if ! wait_gone 5 "${ours[@]}"; then
        survivors=()
        for kid in "${ours[@]}"; do
            if still_ours "$kid"; then survivors+=("$kid"); fi
        done
        if ((${#survivors[@]})); then
            echo "stop-all: error: still running after SIGKILL: ${survivors[*]}" >&2
            status=1
        fi
    fi
fi

if ((status == 0)); then echo "stopped"; fi
exit "$status"
