#!/usr/bin/env bash
# The light development environment for writing a model service (docs/ADDING_MODELS.md).
#
# Usage: scripts/dev-setup.sh [--with REQUIREMENTS_FILE]...
#
# Builds .venv (or $AIO_VENV) with the orchestrator, the test tools (pytest, ruff, mypy, the
# openai client), CPU torch and the services' shared packages (transformers, diffusers,
# sentence-transformers): about 2 GB. It leaves out vLLM's CPU build (~2 GB more), which only
# the text service needs; scripts/test.sh builds the full environment and runs every test.
# Safe to run again: it only adds what is missing.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${AIO_VENV:-$REPO_ROOT/.venv}"
EXTRA=()

die() { echo "dev-setup: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --with) [[ $# -ge 2 && -f "$2" ]] || die "--with needs an existing requirements file"; EXTRA+=(-r "$2"); shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

bash "$REPO_ROOT/scripts/lib/dev-venv.sh" --venv "$VENV" --extras test --models light
if ((${#EXTRA[@]})); then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${EXTRA[@]}"
fi
echo "==> ready: $VENV (next: docs/ADDING_MODELS.md, or scripts/new-model NAME)"
