#!/usr/bin/env bash
# The gateway's environment: the LiteLLM proxy from model-orchestrator/gateway/requirements.txt
# (exact versions, every file's hash checked), then this project's code without its dependencies,
# for the affinity plug-in (model_orchestrator.gateway.plugin). Apart from the orchestrator's
# environment: LiteLLM pins its own versions of packages the orchestrator uses too.
#
#   scripts/lib/gateway-venv.sh [--venv DIR]     # default: $AIO_GATEWAY_VENV or .venv-gateway
#
# Safe to run again: it reinstalls nothing when the lock file has not changed.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"
# shellcheck source=scripts/lib/python.sh
source "$REPO_ROOT/scripts/lib/python.sh"
VENV="${AIO_GATEWAY_VENV:-$REPO_ROOT/.venv-gateway}"
LOCK="$REPO_ROOT/model-orchestrator/gateway/requirements.txt"

die() { echo "gateway-venv.sh: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; VENV="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1" ;;
    esac
done

UV="$(command -v uv || true)"
[[ -n "$UV" || ! -x "$REPO_ROOT/.venv/bin/uv" ]] || UV="$REPO_ROOT/.venv/bin/uv"
STAMP="$VENV/.aio-gateway-lock"
lock_sum="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/litellm" && -f "$STAMP" && "$(cat "$STAMP")" == "$lock_sum" ]]; then
    echo "==> gateway environment $VENV is current"
else
    PYTHON="$(find_python "${AIO_PYTHON:-}")" || die "no usable Python"
    echo "==> creating the gateway environment $VENV (LiteLLM, pinned with hashes)"
    rm -rf "$VENV"
    if [[ -n "$UV" ]]; then
        "$UV" venv --quiet --python "$PYTHON" "$VENV"
        "$UV" pip install --quiet --python "$VENV/bin/python" --require-hashes -r "$LOCK"
    else
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$LOCK"
    fi
    echo "$lock_sum" > "$STAMP"
fi
# The plug-in's code: editable, so a `git pull` of this checkout reaches the gateway on its restart.
if [[ -n "$UV" ]]; then
    "$UV" pip install --quiet --python "$VENV/bin/python" --no-deps --config-settings editable_mode=strict \
        -e "$REPO_ROOT"
else
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --config-settings editable_mode=strict -e "$REPO_ROOT"
fi
