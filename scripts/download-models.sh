#!/usr/bin/env bash
# Download model weights from the Hugging Face hub into the HF cache on the pod's volume.
# Resumable within a run, verified against the hub's hashes, and a no-op (no network) for
# models that are already complete. A thin wrapper around scripts/download_models.py.
#
#   scripts/download-models.sh                         # the weights of the GPU profile's models
#   scripts/download-models.sh Qwen/Qwen2.5-7B-Instruct@main --json
#   scripts/download-models.sh --check                 # exit 1 unless those are complete (offline)
#   scripts/download-models.sh --dry-run               # what would be downloaded, with sizes
#
# With no model named, it fetches the `weights` of every model in the GPU profile
# (model-orchestrator/models.yaml, or --config FILE): only the files each service loads,
# about 53 GiB (the table in that file; run --dry-run for exact numbers).
#
# Environment:
#   HF_TOKEN       token for gated or private models (never printed)
#   HF_HOME        cache root (models go to $HF_HOME/hub); default "$AIO_DATA_DIR/hf" when
#                  AIO_DATA_DIR is set, else ~/.cache/huggingface
#   HF_ENDPOINT    another hub or mirror (same as --endpoint)
#   AIO_PYTHON     interpreter with huggingface_hub (default: the repo's .venv, then python3)
# Exit status: 0 when every model is complete, 1 otherwise.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
CLI="$REPO_ROOT/scripts/download_models.py"
PROFILE="$REPO_ROOT/model-orchestrator/models.yaml"

die() { echo "download-models.sh: $*" >&2; exit 1; }

pick_python() {
    local candidate
    for candidate in "${AIO_PYTHON:-}" "${AIO_VENV:-$REPO_ROOT/.venv}/bin/python" python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import huggingface_hub' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        usage
        if python="$(pick_python)"; then
            echo
            "$python" "$CLI" --help
        fi
        exit 0
    fi
done

if [[ -z "${HF_HOME:-}" && -n "${AIO_DATA_DIR:-}" ]]; then
    export HF_HOME="$AIO_DATA_DIR/hf"
fi

# Any argument that is not an option (or an option's value) names a model: then no defaults.
has_models=false
takes_value=false
for arg in "$@"; do
    if "$takes_value"; then takes_value=false; continue; fi
    case "$arg" in
        --cache-dir|--endpoint|--allow-patterns|--ignore-patterns|--token-env) takes_value=true ;;
        --config) takes_value=true; has_models=true ;;
        -*) ;;
        *) has_models=true ;;
    esac
done

args=("$@")
if ! "$has_models"; then
    args+=(--config "$PROFILE")
fi

python="$(pick_python)" || die "no Python with huggingface_hub found: set AIO_PYTHON, or pip install huggingface_hub"
exec "$python" "$CLI" "${args[@]}"
