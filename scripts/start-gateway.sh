#!/usr/bin/env bash
# Start the gateway: one URL in front of several pods (docs/DEPLOYMENT.md "Several pods behind one URL").
# For a machine without systemd; the playbook's `gateway` tag installs a unit instead.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
RUN_DIR="${AIO_RUN_DIR:-$REPO_ROOT/run}"
VENV="${AIO_GATEWAY_VENV:-$REPO_ROOT/.venv-gateway}"
FLEET=""
HOST="0.0.0.0"
PORT=4000
BACKGROUND=0

usage() {
    cat <<USAGE
Usage: $(basename "$0") --fleet FILE [--host H] [--port P] [--background]

Render the gateway's config from the fleet description FILE into \$AIO_RUN_DIR/gateway
(default runtime dir: <repo>/run), set up its environment when missing
(scripts/lib/gateway-venv.sh) and run the LiteLLM proxy with the affinity plug-in.

  --fleet FILE    the pods and their models (docs/DEPLOYMENT.md shows one)
  --host H        address to listen on (default: 0.0.0.0)
  --port P        port (default: 4000)
  --background    run detached: pid in run/gateway.pid, log in run/gateway.log;
                  returns once it answers (stop it with: kill \$(cat run/gateway.pid))
  -h, --help      show this help

The gateway's key comes from LITELLM_MASTER_KEY (or the variable the fleet file's
settings.master_key_env names); each pod's keys from the variables the file names.
USAGE
}

die() { echo "start-gateway.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --fleet) [[ $# -ge 2 ]] || die "--fleet needs a value"; FLEET="$2"; shift 2 ;;
        --host) [[ $# -ge 2 ]] || die "--host needs a value"; HOST="$2"; shift 2 ;;
        --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT="$2"; shift 2 ;;
        --background) BACKGROUND=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
[[ -n "$FLEET" ]] || { usage >&2; die "--fleet is required"; }
[[ -f "$FLEET" ]] || die "no fleet file at $FLEET"

bash "$REPO_ROOT/scripts/lib/gateway-venv.sh" --venv "$VENV"
CONFIG_DIR="$RUN_DIR/gateway"
mkdir -p "$CONFIG_DIR"
"$VENV/bin/python" -m model_orchestrator.gateway.render "$FLEET" --out "$CONFIG_DIR"
key_env="$("$VENV/bin/python" -c 'import sys, yaml; print(((yaml.safe_load(open(sys.argv[1])) or {}).get("settings") or {}).get("master_key_env") or "LITELLM_MASTER_KEY")' "$FLEET")"
[[ -n "${!key_env:-}" ]] || die "$key_env is not set: the gateway refuses to start without its key"

export AIO_GATEWAY_FLEET="$CONFIG_DIR/fleet.json"
export LITELLM_LOCAL_MODEL_COST_MAP=True   # the bundled cost map: no download at start
export LITELLM_TELEMETRY=False
command=("$VENV/bin/litellm" --config "$CONFIG_DIR/config.yaml" --host "$HOST" --port "$PORT" --num_workers 1)
if (( ! BACKGROUND )); then
    exec "${command[@]}"
fi
nohup "${command[@]}" > "$RUN_DIR/gateway.log" 2>&1 &
echo $! > "$RUN_DIR/gateway.pid"
probe_host="$HOST"; [[ "$HOST" != "0.0.0.0" ]] || probe_host=127.0.0.1
for _ in $(seq 120); do
    if curl -fsS -o /dev/null "http://$probe_host:$PORT/health/liveliness" 2>/dev/null; then
        echo "gateway up on http://$HOST:$PORT (pid $(cat "$RUN_DIR/gateway.pid"), log $RUN_DIR/gateway.log)"
        exit 0
    fi
    kill -0 "$(cat "$RUN_DIR/gateway.pid")" 2>/dev/null || { tail -20 "$RUN_DIR/gateway.log" >&2; die "the gateway exited"; }
    sleep 0.5
done
die "the gateway did not answer within 60 s (log: $RUN_DIR/gateway.log)"
