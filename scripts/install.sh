#!/usr/bin/env bash
# Set up ai-orchestrator's own Python environment (.venv) on this machine.
#
# Creates .venv with a supported Python (3.10-3.12) and installs the orchestrator and
# `core` into it (editable, so a `git pull` takes effect without reinstalling). Uses uv
# when it is installed, pip otherwise. Safe to run again: it only adds what is missing.
# Model services with heavy dependencies (vLLM, diffusers) get their own environments
# from the Ansible playbook (see docs/); the echo service runs from this one.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${AIO_VENV:-$REPO_ROOT/.venv}"
PYTHON="${AIO_PYTHON:-}"
EXTRAS=""

usage() {
    cat <<USAGE
Usage: scripts/install.sh [--python PY] [--venv DIR] [--extras LIST]

Set up the orchestrator's Python environment.

  --python PY     interpreter to build the environment from
                  (default: \$AIO_PYTHON, else the first of python3.12, python3.11,
                  python3.10, python3 that is 3.10-3.12)
  --venv DIR      where to create it (default: \$AIO_VENV or .venv in the repository)
  --extras LIST   optional extras, comma-separated: test (pytest, ruff, mypy, openai), gpu (NVML)
  -h, --help      show this help
USAGE
}

die() { echo "install.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
        --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; VENV="$2"; shift 2 ;;
        --extras) [[ $# -ge 2 ]] || die "--extras needs a value"; EXTRAS="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

supported() { "$1" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; }

if [[ -z "$PYTHON" ]]; then
    for candidate in python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null && supported "$candidate"; then PYTHON="$candidate"; break; fi
    done
    [[ -n "$PYTHON" ]] || die "no Python 3.10-3.12 found; install one or pass --python"
fi
supported "$PYTHON" || die "$PYTHON is not Python 3.10-3.12"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating $VENV with $("$PYTHON" --version)"
    if command -v uv >/dev/null; then uv venv --quiet --python "$PYTHON" "$VENV"
    else "$PYTHON" -m venv "$VENV"; fi
fi

spec="$REPO_ROOT"
if [[ -n "$EXTRAS" ]]; then spec="${REPO_ROOT}[${EXTRAS}]"; fi
echo "==> installing ai-orchestrator${EXTRAS:+ [$EXTRAS]} into $VENV"
if command -v uv >/dev/null; then
    uv pip install --quiet --python "$VENV/bin/python" -e "$spec"
else
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
fi
"$VENV/bin/python" -c 'import core, model_orchestrator' || die "installed, but the packages do not import"
echo "==> ready: $VENV/bin/ai-orchestrator (start everything with scripts/start-all.sh)"
