#!/usr/bin/env bash
# Install the ai-orchestrator systemd unit (systemd/ai-orchestrator.service) on this host.
#
# Renders the unit's @AIO_...@ placeholders, writes it to the unit directory (only when
# its content changed), creates the environment file for secrets if it is missing (never
# overwrites it), and enables and starts the service, but only when systemd is the
# running init. In a container without systemd (a RunPod pod) it installs the files,
# prints the start command to use instead, and exits 0. Safe to run again.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
TEMPLATE="$SCRIPT_DIR/ai-orchestrator.service"
UNIT_NAME="ai-orchestrator.service"

PYTHON="$REPO_ROOT/.venv/bin/python"
[[ -x "$REPO_ROOT/.data/venvs/orchestrator/bin/python" ]] && PYTHON="$REPO_ROOT/.data/venvs/orchestrator/bin/python"
CONFIG="$REPO_ROOT/model-orchestrator/models.yaml"
[[ -f "$REPO_ROOT/.data/models.yaml" ]] && CONFIG="$REPO_ROOT/.data/models.yaml"  # rendered by the playbook
RUN_AS="root"
UNIT_DIR="/etc/systemd/system"
ENV_FILE="/etc/ai-orchestrator/orchestrator.env"
RENDER_ONLY=""
ENABLE=1

usage() {
    cat <<EOF
Usage: $(basename "$0") [--python PY] [--config FILE] [--user NAME] [--unit-dir DIR]
                          [--env-file FILE] [--render-only FILE] [--no-enable]

Install the ai-orchestrator systemd unit. On a host where systemd is running, it also
runs 'systemctl daemon-reload' and 'systemctl enable --now ai-orchestrator'. Without
systemd (a container such as a RunPod pod) it only writes the files and prints the
container start command to use instead (scripts/start-all.sh).

Options:
  --python PY         interpreter that runs the orchestrator
                      (default: the orchestrator environment scripts/install.sh built in
                      <repo>/.data, else <repo>/.venv/bin/python)
  --config FILE       models.yaml to serve (default: <repo>/.data/models.yaml rendered by
                      scripts/install.sh, else model-orchestrator/models.yaml)
  --user NAME         account the service runs as (default: root)
  --unit-dir DIR      where the unit goes (default: /etc/systemd/system)
  --env-file FILE     environment file for secrets, created with mode 0600 if missing,
                      never overwritten (default: /etc/ai-orchestrator/orchestrator.env)
  --render-only FILE  write the rendered unit to FILE and exit (nothing else is touched;
                      used by tests and by CI's 'systemd-analyze verify')
  --no-enable         install the files but do not enable or start the service
  -h, --help          show this help and exit

Exit status: 0 on success (also when systemd is not running), 1 on an error,
2 on bad usage or an invalid config.
EOF
}

die() { echo "install-services: $*" >&2; exit 1; }
usage_error() { echo "install-services: $*" >&2; echo "Try '$(basename "$0") --help'." >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "option $1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
        --python=*) PYTHON="${1#*=}"; shift ;;
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --config=*) CONFIG="${1#*=}"; shift ;;
        --user) need_value "$@"; RUN_AS="$2"; shift 2 ;;
        --user=*) RUN_AS="${1#*=}"; shift ;;
        --unit-dir) need_value "$@"; UNIT_DIR="$2"; shift 2 ;;
        --unit-dir=*) UNIT_DIR="${1#*=}"; shift ;;
        --env-file) need_value "$@"; ENV_FILE="$2"; shift 2 ;;
        --env-file=*) ENV_FILE="${1#*=}"; shift ;;
        --render-only) need_value "$@"; RENDER_ONLY="$2"; shift 2 ;;
        --render-only=*) RENDER_ONLY="${1#*=}"; shift ;;
        --no-enable) ENABLE=0; shift ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

# Absolute without resolving symlinks: a venv's bin/python is a symlink to the base
# interpreter, and resolving it would bypass the venv.
absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# systemd splits ExecStart= on whitespace and expands %-specifiers; refuse what would
# need quoting rather than guess.
plain_path() {
    local what="$1" value="$2"
    [[ "$value" =~ ^[A-Za-z0-9_./@+:,=-]+$ ]] \
        || die "$what '$value' has characters a unit file would need quoted (spaces, quotes, %, ...); use a plain path"
}

PYTHON="$(absolute "$PYTHON")"
CONFIG="$(absolute "$CONFIG")"
ENV_FILE="$(absolute "$ENV_FILE")"
[[ -x "$PYTHON" ]] || die "interpreter not found or not executable: $PYTHON (run scripts/install.sh, or pass --python)"
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG (pass --config)"
CONFIG="$(cd -- "$(dirname -- "$CONFIG")" && pwd -P)/$(basename -- "$CONFIG")"
[[ "$RUN_AS" =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || usage_error "--user must be a user name, got '$RUN_AS'"
plain_path "repository path" "$REPO_ROOT"
plain_path "--python" "$PYTHON"
plain_path "--config" "$CONFIG"
plain_path "--env-file" "$ENV_FILE"
[[ -f "$TEMPLATE" ]] || die "unit template missing: $TEMPLATE"

# The interpreter the unit will run must be able to load the config: catch a broken venv
# or a typo in models.yaml now, not at the first boot.
if ! check_out="$(cd "$REPO_ROOT" && "$PYTHON" "$REPO_ROOT/model-orchestrator/orchestrator.py" --config "$CONFIG" --check 2>&1)"; then
    echo "$check_out" >&2
    echo "install-services: config check failed with $PYTHON: $CONFIG" >&2
    exit 2
fi

# --- render -------------------------------------------------------------------------------

render() {
    local unit
    unit="$(<"$TEMPLATE")"
    # Quoted replacements: bash 5.2 would otherwise expand '&' in them to the match.
    unit="${unit//@AIO_ROOT@/"$REPO_ROOT"}"
    unit="${unit//@AIO_PYTHON@/"$PYTHON"}"
    unit="${unit//@AIO_CONFIG@/"$CONFIG"}"
    unit="${unit//@AIO_USER@/"$RUN_AS"}"
    unit="${unit//@AIO_ENV_FILE@/"$ENV_FILE"}"
    if [[ "$unit" =~ @AIO_[A-Z_]+@ ]]; then
        die "unit template has a placeholder this script does not know: ${BASH_REMATCH[0]}"
    fi
    printf '%s\n' "$unit"
}

# Writes stdin to $1 through a temporary file in the same folder, only if the content
# differs; prints "installed" or "unchanged".
write_if_changed() {
    local target="$1" mode="$2" tmp
    tmp="$(mktemp "$(dirname -- "$target")/.$(basename -- "$target").XXXXXX")"
    cat >"$tmp"
    if [[ -f "$target" ]] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
        echo unchanged
    else
        chmod "$mode" "$tmp"
        mv -f "$tmp" "$target"
        echo installed
    fi
}

if [[ -n "$RENDER_ONLY" ]]; then
    mkdir -p "$(dirname -- "$RENDER_ONLY")"
    render >"$RENDER_ONLY"
    echo "rendered $UNIT_NAME to $RENDER_ONLY"
    exit 0
fi

id -u "$RUN_AS" >/dev/null 2>&1 || die "user '$RUN_AS' does not exist (create it, or pass --user)"

# --- install the unit -------------------------------------------------------------------------

if ! { mkdir -p "$UNIT_DIR" 2>/dev/null && [[ -w "$UNIT_DIR" ]]; }; then
    die "cannot write to $UNIT_DIR (run as root, e.g. with sudo, or pass --unit-dir)"
fi
UNIT_PATH="$UNIT_DIR/$UNIT_NAME"
unit_result="$(render | write_if_changed "$UNIT_PATH" 0644)"
echo "unit $UNIT_PATH: $unit_result"

# --- the environment file (secrets): create once, never overwrite -------------------------------

if [[ -e "$ENV_FILE" ]]; then
    echo "environment file $ENV_FILE: kept (exists; not overwritten)"
    perms="$(stat -c '%a' "$ENV_FILE" 2>/dev/null || echo '?')"
    if [[ "$perms" != "600" && "$perms" != "400" ]]; then
        echo "install-services: warning: $ENV_FILE has mode $perms; it holds secrets, consider: chmod 600 $ENV_FILE" >&2
    fi
else
    env_dir="$(dirname -- "$ENV_FILE")"
    if ! { mkdir -p "$env_dir" 2>/dev/null && [[ -w "$env_dir" ]]; }; then
        die "cannot create $ENV_FILE (run as root, e.g. with sudo, or pass --env-file)"
    fi
    (
        umask 077
        cat >"$ENV_FILE" <<'EOF'
# Environment of ai-orchestrator.service and of the model services it starts.
# Read by systemd (as root) before the service starts; keep this file mode 0600.
# One VAR=value per line: no "export", no shell expansion. After editing:
#   systemctl restart ai-orchestrator
#
# API keys clients must send as "Authorization: Bearer KEY", comma-separated. The
# config's settings.api_key_env names this variable (model-orchestrator/models.yaml:
# AIO_API_KEYS). Unset or empty: no key is required.
#AIO_API_KEYS=change-me-1,change-me-2
#
# Hugging Face token, for gated models (downloads only; not needed once cached).
#HF_TOKEN=hf_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx
#
# Where the Hugging Face cache (model weights) lives. Default: ~/.cache/huggingface.
#HF_HOME=/workspace/hf
EOF
    )
    chmod 600 "$ENV_FILE"
    echo "environment file $ENV_FILE: created (mode 0600; commented examples: AIO_API_KEYS, HF_TOKEN, HF_HOME)"
fi

# --- enable and start, only under a running systemd -------------------------------------------

state=""
if command -v systemctl >/dev/null 2>&1; then
    state="$(systemctl is-system-running 2>/dev/null || true)"
fi

case "$state" in
    running|degraded)
        systemctl daemon-reload
        if ((ENABLE)); then
            was_active=0
            if systemctl is-active --quiet "$UNIT_NAME"; then was_active=1; fi
            systemctl enable --now "$UNIT_NAME"
            if ((was_active)) && [[ "$unit_result" == installed ]]; then
                echo "the unit changed while the service was running; apply it with: systemctl restart ai-orchestrator"
            fi
            echo "ai-orchestrator enabled and started (systemd: $state)"
            echo "  status: systemctl status ai-orchestrator    logs: journalctl -u ai-orchestrator -f"
        else
            echo "installed, not enabled (--no-enable); start it with: systemctl enable --now ai-orchestrator"
        fi
        ;;
    initializing|starting|maintenance|stopping)
        # systemd is PID 1 but not in a state to start services now (e.g. run from a boot script).
        echo "systemd is $state: the unit is installed but not enabled or started; once the system is up, run:"
        echo "  systemctl daemon-reload && systemctl enable --now ai-orchestrator"
        ;;
    *)
        start_args=""
        if [[ "$CONFIG" != "$REPO_ROOT/model-orchestrator/models.yaml" ]]; then start_args=" --config $CONFIG"; fi
        echo "systemd is not running here (systemctl is-system-running: ${state:-no systemctl}),"
        echo "as in a container such as a RunPod pod: the unit is installed but not enabled or started."
        echo "Start the orchestrator with scripts/start-all.sh instead. On RunPod, set the template's"
        echo "Container Start Command to:"
        echo
        echo "  bash -c '$REPO_ROOT/scripts/start-all.sh$start_args && exec /start.sh'"
        echo
        case "$REPO_ROOT" in
            /workspace/*) ;;
            *) echo "note: $REPO_ROOT is not under /workspace; on RunPod only /workspace survives a pod restart." ;;
        esac
        ;;
esac
