# Shared by start-all.sh and stop-all.sh (sourced, not run): run-dir paths and process checks.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the paths below are read by the scripts that source this file

RUN_DIR="${AIO_RUN_DIR:-$REPO_ROOT/run}"
PIDFILE="$RUN_DIR/orchestrator.pid"
URLFILE="$RUN_DIR/orchestrator.url"
LOGFILE="$RUN_DIR/orchestrator.log"
OUTFILE="$RUN_DIR/orchestrator.out"

# Alive and not a zombie (a zombie has exited; PID 1 in containers may never reap it).
alive() {
    local stat
    stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

is_orchestrator() {
    local args
    alive "$1" || return 1
    # -ww: never cut to the terminal width (COLUMNS=80 would cut a long install path before "orchestrator")
    args="$(ps -ww -o args= -p "$1" 2>/dev/null)" || return 1
    [[ "$args" == *orchestrator* ]]
}
