#!/usr/bin/env bash
# Clean a pod before its volume or image is reused as a template for other pods.
#
# Stops the orchestrator, then removes what must not be copied into new pods: runtime
# state (pidfiles), logs, package caches, __pycache__ folders, shell history, and every
# secret this project knows of (the systemd environment file, Hugging Face token files).
# Never removes model weights (the Hugging Face cache's hub/ folders), virtual
# environments or the repository's own files.
#
# Without --yes it only lists what it would remove (and asks, on a terminal).
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
ENV_FILE="${AIO_ENV_FILE:-/etc/ai-orchestrator/orchestrator.env}"
YES=0

usage() {
    cat <<EOF
Usage: $(basename "$0") [--yes] [--root DIR] [--env-file FILE]

Prepare this pod before saving it for reuse as a RunPod template (its /workspace volume,
or an image built from it): stop the orchestrator and remove runtime state, logs,
caches and secrets. Model weights and virtual environments are kept.

Removed (those that exist):
  <root>/run                       pidfiles, the orchestrator's own logs (with \$AIO_RUN_DIR
                                   set: only those files in it)
  <root>/logs                      model service logs
  <data>/logs, /run, /state/validate  the same in the playbook's data dir (\$AIO_DATA_DIR,
                                   default <root>/.data),
  <data>/tailscale                 and Tailscale's node state: its private key (a clone must
                                   join as a new node) and any auth key file left behind
  __pycache__ folders in <root>    (not inside virtual environments)
  ~/.cache/pip, ~/.cache/uv        package caches (\$PIP_CACHE_DIR, \$UV_CACHE_DIR too)
  ~/.bash_history, ~/.python_history
  the environment file             secrets (API keys, HF token); a template must not
                                   carry them: give them to new pods as RunPod secrets
  Hugging Face token files         token and stored_tokens in \$HF_HOME, ~/.cache/huggingface
                                   and <data>/hf, and \$HF_TOKEN_PATH
Kept: the Hugging Face cache (hub/, model weights), virtual environments, the repository.

Options:
  --yes            remove without asking (without it: list only; on a terminal, ask)
  --root DIR       the checkout to clean (default: the one this script is in)
  --env-file FILE  the environment file with secrets
                   (default: \$AIO_ENV_FILE, else /etc/ai-orchestrator/orchestrator.env)
  -h, --help       show this help and exit

Exit status: 0 when done (also after a dry run or an answer of no), 1 on an error,
2 on bad usage.
EOF
}

die() { echo "prepare-template: $*" >&2; exit 1; }
usage_error() { echo "prepare-template: $*" >&2; echo "Try '$(basename "$0") --help'." >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || usage_error "option $1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -y|--yes) YES=1; shift ;;
        --root) need_value "$@"; ROOT="$2"; shift 2 ;;
        --root=*) ROOT="${1#*=}"; shift ;;
        --env-file) need_value "$@"; ENV_FILE="$2"; shift 2 ;;
        --env-file=*) ENV_FILE="${1#*=}"; shift ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

[[ -d "$ROOT" ]] || die "not a folder: $ROOT"
ROOT="$(cd -- "$ROOT" && pwd -P)"
[[ -f "$ROOT/model-orchestrator/orchestrator.py" ]] \
    || die "not an ai-orchestrator checkout: $ROOT (no model-orchestrator/orchestrator.py)"
[[ -n "${HOME:-}" && -d "$HOME" ]] || die "HOME is not set to a folder"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}"
# The playbook's data dir: its default (aio_data_dir in roles/aio/defaults/main.yml, and
# start-all.sh's) is .data in the checkout, so it is cleaned even when AIO_DATA_DIR is unset.
DATA_DIR="${AIO_DATA_DIR:-$ROOT/.data}"
HF_DEFAULT="$CACHE/huggingface"
RUN_DIR="${AIO_RUN_DIR:-$ROOT/run}"

# Canonical absolute form of a path that may not exist (its existing parent resolved).
canon() {
    local path="$1" dir base
    [[ "$path" == /* ]] || path="$PWD/$path"
    if [[ -d "$path" ]]; then (cd -- "$path" && pwd -P); return; fi
    dir="$(dirname -- "$path")" base="$(basename -- "$path")"
    if [[ -d "$dir" ]]; then echo "$(cd -- "$dir" && pwd -P)/$base"; else echo "$path"; fi
}

# --- what is protected ------------------------------------------------------------------------
# Nothing removed may be one of these or contain one of them, whatever the environment
# variables say (e.g. AIO_RUN_DIR=/workspace would otherwise take the weights with it).

PROTECTED=(/ /bin /boot /dev /etc /home /lib /opt /proc /root /run /srv /sys /tmp /usr /var /workspace
           "$HOME" "$ROOT" "$HF_DEFAULT" "$HF_DEFAULT/hub" "$ROOT/.venv")
if [[ -n "${HF_HOME:-}" ]]; then PROTECTED+=("$HF_HOME" "$HF_HOME/hub"); fi
if [[ -n "${HF_HUB_CACHE:-}" ]]; then PROTECTED+=("$HF_HUB_CACHE"); fi
PROTECTED+=("$DATA_DIR" "$DATA_DIR/hf" "$DATA_DIR/hf/hub" "$DATA_DIR/venvs" "$DATA_DIR/bin")
if [[ -n "${VIRTUAL_ENV:-}" ]]; then PROTECTED+=("$VIRTUAL_ENV"); fi
for i in "${!PROTECTED[@]}"; do PROTECTED[i]="$(canon "${PROTECTED[i]}")"; done

is_protected() {
    local target p
    target="$(canon "$1")"
    for p in "${PROTECTED[@]}"; do
        if [[ "$p" == "$target" || "$p" == "${target%/}/"* ]]; then return 0; fi
    done
    # A virtual environment is never removed, nor anything that contains one.
    if [[ -e "$target/pyvenv.cfg" ]]; then return 0; fi
    return 1
}

# --- collect the candidates -------------------------------------------------------------------

TARGETS=()
REASONS=()
SKIPPED=()
declare -A SEEN=()

add() {  # add PATH REASON: queue PATH if it exists (a symlink is removed, not followed)
    local path="$1" reason="$2" key
    [[ -e "$path" || -L "$path" ]] || return 0
    key="$(canon "$path")"
    [[ -z "${SEEN[$key]:-}" ]] || return 0
    SEEN[$key]=1
    if [[ ! -L "$path" ]] && is_protected "$path"; then
        SKIPPED+=("$path ($reason): refused, it is or contains model weights, a venv or a home")
        return 0
    fi
    TARGETS+=("$path")
    REASONS+=("$reason")
}

collect() {
    TARGETS=() REASONS=() SKIPPED=() SEEN=()
    if [[ -n "${AIO_RUN_DIR:-}" ]]; then  # a folder of the operator's choosing: only our files
        local path
        for path in "$RUN_DIR"/{orchestrator.pid,orchestrator.url,start.lock} \
                    "$RUN_DIR"/orchestrator.log* "$RUN_DIR"/orchestrator.out*; do
            add "$path" "runtime state (AIO_RUN_DIR)"  # an unmatched pattern names no file: skipped
        done
    else
        add "$RUN_DIR" "runtime state: pidfiles, orchestrator logs"
    fi
    add "$ROOT/logs" "model service logs"
    add "$DATA_DIR/logs" "logs in the data dir"
    add "$DATA_DIR/run" "runtime state in the data dir"
    add "$DATA_DIR/state/validate" "the validation run's pidfiles and log"
    add "$DATA_DIR/tailscale" "Tailscale node state: its private key; each pod joins as its own node"
    add "$CACHE/pip" "pip cache"
    add "$CACHE/uv" "uv cache"
    if [[ -n "${PIP_CACHE_DIR:-}" ]]; then add "$PIP_CACHE_DIR" "pip cache (PIP_CACHE_DIR)"; fi
    if [[ -n "${UV_CACHE_DIR:-}" ]]; then add "$UV_CACHE_DIR" "uv cache (UV_CACHE_DIR)"; fi
    add "$HOME/.bash_history" "shell history"
    add "$HOME/.python_history" "Python shell history"
    add "$ENV_FILE" "secrets: API keys, tokens; new pods get them from RunPod secrets"
    local hf
    for hf in "$HF_DEFAULT" ${HF_HOME:+"$HF_HOME"} "$DATA_DIR/hf"; do
        add "$hf/token" "Hugging Face token"
        add "$hf/stored_tokens" "Hugging Face stored tokens"
    done
    if [[ -n "${HF_TOKEN_PATH:-}" ]]; then add "$HF_TOKEN_PATH" "Hugging Face token (HF_TOKEN_PATH)"; fi
    # __pycache__ in the checkout, not inside .git or any virtual environment.
    local dir
    while IFS= read -r -d '' dir; do
        add "$dir" "bytecode cache"
    done < <(find "$ROOT" \( -name .git -o -exec test -e '{}/pyvenv.cfg' \; \) -prune \
                -o -type d -name __pycache__ -prune -print0 2>/dev/null)
}

size_of() { du -sh -- "$1" 2>/dev/null | cut -f1 || true; }

show() {
    local i
    for i in "${!TARGETS[@]}"; do
        printf '  %-8s %s  (%s)\n' "$(size_of "${TARGETS[i]}")" "${TARGETS[i]}" "${REASONS[i]}"
    done
    for i in "${SKIPPED[@]}"; do echo "  skipped  $i"; done
}

# --- dry run / confirmation --------------------------------------------------------------------

collect
pid=""
if [[ -f "$RUN_DIR/orchestrator.pid" ]]; then read -r pid <"$RUN_DIR/orchestrator.pid" 2>/dev/null || true; fi

if ((!YES)); then
    echo "prepare-template: would stop the orchestrator${pid:+ (pidfile names pid $pid)} and remove:"
    if ((${#TARGETS[@]})); then show; else echo "  (nothing: already clean)"; fi
    echo "Kept: model weights (Hugging Face cache hub/), virtual environments, the repository."
    if [[ -t 0 && -t 1 ]]; then
        answer=""
        read -r -p "Remove these now? [y/N] " answer || true
        [[ "$answer" == [yY]* ]] || { echo "nothing removed"; exit 0; }
    else
        echo "dry run: nothing removed (run with --yes to remove)"
        exit 0
    fi
fi

# --- stop, then remove ------------------------------------------------------------------------------

echo "==> stopping the orchestrator"
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet ai-orchestrator.service 2>/dev/null; then
    systemctl stop ai-orchestrator.service || die "could not stop ai-orchestrator.service; nothing removed"
    echo "stopped ai-orchestrator.service (systemd)"
fi
AIO_RUN_DIR="$RUN_DIR" "$SCRIPT_DIR/stop-all.sh" || die "could not stop the orchestrator; nothing removed"

collect  # again: stopping may have changed what exists
if command -v pgrep >/dev/null 2>&1 && pgrep -x tailscaled >/dev/null 2>&1; then
    echo "prepare-template: warning: tailscaled is running; it may write its node state again:" >&2
    echo "  stop it before saving the volume (each new pod joins with TS_AUTHKEY)" >&2
fi
echo "==> removing"
if ((${#TARGETS[@]} == 0)); then echo "  nothing to remove: already clean"; fi
for i in "${!TARGETS[@]}"; do
    size="$(size_of "${TARGETS[i]}")"
    rm -rf -- "${TARGETS[i]}"
    printf '  removed  %-8s %s  (%s)\n' "$size" "${TARGETS[i]}" "${REASONS[i]}"
done
for i in "${SKIPPED[@]}"; do echo "  skipped  $i"; done
if [[ -n "${HF_TOKEN:-}" || -n "${AIO_API_KEYS:-}" ]]; then
    echo "note: HF_TOKEN or AIO_API_KEYS is set in this shell's environment; that is the pod's"
    echo "      configuration (template environment variables), not a file this script can remove."
fi

echo "==> kept"
for kept in "$ROOT/.venv" "$DATA_DIR/venvs" "${HF_HOME:-$HF_DEFAULT}"; do
    if [[ -n "$kept" && -e "$kept" ]]; then printf '  %-8s %s\n' "$(size_of "$kept")" "$kept"; fi
done
echo "==> disk usage left"
df -h -- "$ROOT" ${HF_HOME:+"$HF_HOME"} 2>/dev/null | awk '!seen[$0]++' || true
