#!/usr/bin/env bash
# Provision this machine for ai-orchestrator: bootstrap Ansible, then run playbook.yml.
#
#   scripts/install.sh                     # everything (CPU demo profile without a GPU)
#   scripts/install.sh --profile gpu       # a GPU pod: one environment per model service
#   scripts/install.sh --tags dependencies,validate
#   scripts/install.sh --skip-tags base    # not root: skip the apt packages
#
# Ansible lands in .venv-ansible (ansible-core only); everything the playbook builds goes to
# the data folder (default: .data in the repository; on a RunPod pod keep it on /workspace).
# Safe to run again: the playbook only changes what is missing or out of date.
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
# shellcheck source=scripts/lib/python.sh
source "$REPO_ROOT/scripts/lib/python.sh"
ANSIBLE_VENV="${AIO_ANSIBLE_VENV:-$REPO_ROOT/.venv-ansible}"
DATA_DIR="${AIO_DATA_DIR:-$REPO_ROOT/.data}"
PROFILE="auto"
CONFIG=""
PYTHON="${AIO_PYTHON:-}"
PLAYBOOK_ARGS=()

usage() {
    cat <<USAGE
Usage: scripts/install.sh [--profile auto|cpu|gpu] [--config FILE] [--data-dir DIR] [--python PY]
                          [--tags LIST] [--skip-tags LIST] [-- EXTRA ANSIBLE ARGS]

Provision this machine with playbook.yml (tags: base, python, dependencies, models,
tailscale, validate; cleanup only when named).

  --profile P      auto (default): gpu when nvidia-smi sees a GPU, else cpu (the demo profile)
  --config FILE    the models.yaml to provision and serve, instead of the profile's shipped one
                   (model-orchestrator/models.yaml on a GPU, models.demo.yaml on CPU): its
                   weights are downloaded and it is rendered into DIR/models.yaml
  --data-dir DIR   environments, HF cache, logs, rendered models.yaml
                   (default: \$AIO_DATA_DIR, else .data in the repository)
  --python PY      interpreter the environments are built from (default: the first Python
                   3.10-3.12 found; on a GPU image, the one that has CUDA torch)
  --tags LIST      run only these tags;  --skip-tags LIST  run all but these
  -h, --help       show this help

Then: scripts/start-all.sh serves DIR/models.yaml.
USAGE
}

die() { echo "install.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) [[ $# -ge 2 ]] || die "--profile needs a value"; PROFILE="$2"; shift 2 ;;
        --data-dir) [[ $# -ge 2 ]] || die "--data-dir needs a value"; DATA_DIR="$2"; shift 2 ;;
        --config) [[ $# -ge 2 && -f "$2" ]] || die "--config needs an existing file"; CONFIG="$2"; shift 2 ;;
        --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
        --tags|--skip-tags) [[ $# -ge 2 ]] || die "$1 needs a value"; PLAYBOOK_ARGS+=("$1" "$2"); shift 2 ;;
        --) shift; PLAYBOOK_ARGS+=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
[[ "$PROFILE" =~ ^(auto|cpu|gpu)$ ]] || die "--profile must be auto, cpu or gpu, got '$PROFILE'"
PYTHON="$(find_python "$PYTHON")" || die "no usable Python"
mkdir -p "$DATA_DIR"
DATA_DIR="$(cd -- "$DATA_DIR" && pwd -P)"

if [[ ! -x "$ANSIBLE_VENV/bin/ansible-playbook" ]]; then
    echo "==> installing Ansible (ansible-core) into $ANSIBLE_VENV"
    "$PYTHON" -m venv "$ANSIBLE_VENV"
    "$ANSIBLE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "ansible-core>=2.17,<2.20"
fi

if [[ -n "$CONFIG" ]]; then  # both profiles' base config, as JSON: a path may hold any character
    CONFIG="$(cd -- "$(dirname -- "$CONFIG")" && pwd -P)/$(basename -- "$CONFIG")"
    PLAYBOOK_ARGS+=(-e "$("$PYTHON" -c 'import json, sys; print(json.dumps({"aio_base_config": dict.fromkeys(("cpu", "gpu"), sys.argv[1])}))' "$CONFIG")")
fi

echo "==> provisioning with playbook.yml (profile $PROFILE${CONFIG:+, config $CONFIG}, data in $DATA_DIR)"
cd "$REPO_ROOT"
"$ANSIBLE_VENV/bin/ansible-playbook" playbook.yml -e "aio_profile=$PROFILE" -e "aio_data_dir=$DATA_DIR" \
    -e "aio_system_python=$PYTHON" "${PLAYBOOK_ARGS[@]}"
echo "==> done: start serving with scripts/start-all.sh (it serves $DATA_DIR/models.yaml)"
