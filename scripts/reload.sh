#!/usr/bin/env bash
# Reload the models.yaml of the ai-orchestrator started by scripts/start-all.sh, without a restart:
# models that did not change keep running (docs/DEPLOYMENT.md, "Changing models on a running pod").
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"

usage() {
    cat <<EOF
Usage: $(basename "$0")

Ask the ai-orchestrator whose pid is in \$AIO_RUN_DIR/orchestrator.pid (default runtime
dir: <repo>/run) to reload its config file: POST /admin/reload, with the first key of
\$AIO_ADMIN_KEYS when set; it prints what was added, removed, restarted, changed live
and refused. Without curl it sends SIGHUP instead (the result is in the log).

Exit status: 0 when the file was applied (or was unchanged), 1 when it was refused
(nothing changed: the answer says why) or nothing runs, 2 on bad usage.
EOF
}

case "${1:-}" in
    "") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "reload: unknown argument: $1" >&2; echo "Try '$(basename "$0") --help'." >&2; exit 2 ;;
esac

# shellcheck source=scripts/lib/common.sh
source "$REPO_ROOT/scripts/lib/common.sh"

PID=""
if [[ -f "$PIDFILE" ]]; then read -r PID 2>/dev/null <"$PIDFILE" || true; fi
if [[ ! "$PID" =~ ^[1-9][0-9]*$ ]] || ! is_orchestrator "$PID"; then
    echo "reload: no running orchestrator (no live pid in $PIDFILE); start one with scripts/start-all.sh" >&2
    exit 1
fi
URL="$(cat "$URLFILE" 2>/dev/null || true)"
if [[ -z "$URL" ]] || ! command -v curl >/dev/null 2>&1; then
    kill -HUP "$PID"
    echo "sent SIGHUP to the orchestrator (pid $PID); its answer is in $LOGFILE (look for 'reload (SIGHUP)')"
    exit 0
fi
KEY="${AIO_ADMIN_KEYS:-}"
KEY="${KEY%%,*}"
HEADERS=()
if [[ -n "$KEY" ]]; then HEADERS=(-H "Authorization: Bearer $KEY"); fi
if ! ANSWER="$(curl -sS -X POST --max-time 120 -w '\n%{http_code}' "${HEADERS[@]}" "$URL/admin/reload")"; then
    echo "reload: $URL did not answer" >&2
    exit 1
fi
CODE="${ANSWER##*$'\n'}"
echo "${ANSWER%$'\n'*}"
if [[ "$CODE" != 200 ]]; then
    echo "reload: refused (HTTP $CODE): nothing changed" >&2
    exit 1
fi
