#!/usr/bin/env bash
# Set up the test environment and run every check: ruff, mypy, generated docs, pytest.
#
#   scripts/test.sh                 # the whole suite (unit + integration; gpu tests skip without a GPU)
#   scripts/test.sh -m "not integration"   # extra arguments go to pytest
#   AIO_TEST_WORKERS=0 scripts/test.sh     # one pytest process (default: 2, one test file each)
set -euo pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO_ROOT"
VENV="${AIO_VENV:-$REPO_ROOT/.venv}"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

# The dashboard test drives a headless Chromium from Debian's packages (a browser a tool would
# download cannot be reached from CI); it fails rather than skips without one. The guide's test
# (tests/integration/test_adding_models_doc.py) runs its curl commands, and the nginx data plane's
# (tests/integration/test_data_plane.py) Debian's nginx with njs. They install while the environments
# below are built (both wait on downloads), and are waited for before the checks.
missing=()
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then missing+=(chromium chromium-driver); fi
if ! command -v curl >/dev/null; then missing+=(curl); fi
if ! command -v nginx >/dev/null || [[ ! -f /usr/lib/nginx/modules/ngx_http_js_module.so ]]; then
    missing+=(nginx libnginx-mod-http-js)  # what the playbook installs for the data plane
fi
apt_pid="" apt_log="$(mktemp)"
if ((${#missing[@]})); then
    echo "==> installing ${missing[*]} (in the background)"
    as_root=()
    if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null; then as_root=(sudo); fi
    ( "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends "${missing[@]}" ) >"$apt_log" 2>&1 &
    apt_pid=$!
fi

bash scripts/lib/dev-venv.sh --venv "$VENV" --extras test --models cpu

# The provisioning tests run the real playbook; its tooling lives apart from the model stack.
ANSIBLE_VENV="${AIO_ANSIBLE_VENV:-$REPO_ROOT/.venv-ansible}"
# scripts/install.sh makes the same folder with ansible-core alone: the linters are checked for too.
if [[ ! -x "$ANSIBLE_VENV/bin/ansible-playbook" || ! -x "$ANSIBLE_VENV/bin/ansible-lint" \
      || ! -x "$ANSIBLE_VENV/bin/yamllint" ]]; then
    echo "==> installing Ansible tooling into $ANSIBLE_VENV"
    [[ -x "$ANSIBLE_VENV/bin/python" ]] || "$VENV/bin/python" -m venv "$ANSIBLE_VENV"
    "$ANSIBLE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "ansible-core>=2.17,<2.20" "ansible-lint>=25" "yamllint>=1.35"
fi
export AIO_ANSIBLE_BIN="$ANSIBLE_VENV/bin"

# The fleet test (tests/integration/test_fleet.py) runs the gateway: LiteLLM in its own environment.
AIO_GATEWAY_VENV="${AIO_GATEWAY_VENV:-$REPO_ROOT/.venv-gateway}" bash scripts/lib/gateway-venv.sh
export AIO_GATEWAY_VENV="${AIO_GATEWAY_VENV:-$REPO_ROOT/.venv-gateway}"

if [[ -n "$apt_pid" ]] && ! wait "$apt_pid"; then
    cat "$apt_log" >&2
    echo "test.sh: installing ${missing[*]} failed" >&2
    exit 1
fi
rm -f "$apt_log"

echo "==> ruff"
"$VENV/bin/ruff" check .
echo "==> mypy"
"$VENV/bin/mypy" -p core -p model_orchestrator
"$VENV/bin/mypy" models tests
echo "==> generated docs are current"
"$VENV/bin/python" -m core.config.docs --check
# Two processes, each running whole test files (module fixtures, such as one vLLM engine for the
# text tests, stay in one process): most of the suite waits on child processes, so two fit a
# two-core machine. More would run several model engines and playbooks at once. Files are
# handed out in collection order, the slowest first (tests/conftest.py SLOW_FILES).
WORKERS="${AIO_TEST_WORKERS:-2}"
echo "==> pytest ($WORKERS worker processes; AIO_TEST_WORKERS=0 for one)"
exec "$VENV/bin/pytest" -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
