"""Several pods behind one URL: the LiteLLM gateway with the affinity plug-in, for real, on loopback.

Three orchestrators (127.0.0.2, .3 and .4, one port; fake services with set load times) behind the
gateway on 127.0.0.1 (scripts/start-gateway.sh, its own environment from the hashed lock), through
the official ``openai`` client. Where each request went: LiteLLM's ``x-litellm-model-id`` header
(``<pod>/<model>``) and the pods' own ``/fleet/state``. The tests share one fleet and run in order:
the first checks that idling loaded nothing; the last ones kill pods (pod2 mid-stream, then whichever
pod loads "slow"), and the last restarts pod2.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml
from openai.types.chat import ChatCompletionChunk

from tests.integration.conftest import (
    REPO,
    Orchestrator,
    fake_model,
    free_port,
    processes_with,
    start_orchestrator,
    stop_orchestrator,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

GATEWAY_VENV = Path(os.environ.get("AIO_GATEWAY_VENV", REPO / ".venv-gateway"))
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CLIENT, ADMIN, STATE = "pod-client-key", "pod-admin-key", "pod-fleet-key"  # the pods' keys
MASTER, USER = "sk-gateway-master", "gateway-client-key"  # the gateway's
POD_ENV = {"AIO_API_KEYS": CLIENT, "AIO_ADMIN_KEYS": ADMIN, "AIO_FLEET_KEYS": STATE}
CHAT = [{"role": "user", "content": "hello"}]


def pod_models() -> dict[str, Any]:
    """Each pod serves the same catalogue (each service on a port of its own)."""
    return {
        "warm": fake_model("warm", vram_gb=1),
        "burst": fake_model("burst", "--start-delay", "1.5", vram_gb=1),
        "parks": fake_model("parks", vram_gb=6),
        "evicts": fake_model("evicts", vram_gb=6),
        "slow": fake_model("slow", "--start-delay", "4", vram_gb=1),
        "stream": fake_model("stream", "--stream-chunks", "60", "--token-delay", "0.1", vram_gb=1),
        "back": fake_model("back", vram_gb=1),
    }


@dataclass
class Fleet:
    pods: dict[str, Orchestrator] = field(repr=False)  # pod id -> its orchestrator
    client: openai.OpenAI
    url: str
    directory: Path

    def state(self, pod: str) -> dict[str, Any]:
        answer = httpx.get(self.pods[pod].url + "/fleet/state", headers={"Authorization": f"Bearer {ADMIN}"},
                           timeout=5)
        return dict(answer.json())

    def where(self, model: str) -> str:
        """The pod that answered a chat request sent through the gateway."""
        raw = self.client.chat.completions.with_raw_response.create(model=model, messages=CHAT)  # type: ignore[arg-type]
        assert raw.parse().choices[0].message.content
        return str(raw.headers["x-litellm-model-id"]).split("/")[0]

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics/", headers={"Authorization": f"Bearer {MASTER}"}, timeout=30).text

    def polls(self) -> float:
        line = next(line for line in self.metrics().splitlines() if line.startswith("aio_gateway_state_polls_total"))
        return float(line.split()[-1])

    def settle(self) -> None:
        """Until the plug-in has read every pod's state twice more: what the pods say now is what it ranks by."""
        start = self.polls()
        assert wait_until(lambda: self.polls() >= start + 2, 15, interval=0.2), "the plug-in stopped polling"

    def warm_directly(self, pod: str, model: str) -> None:
        answer = httpx.post(self.pods[pod].url + "/v1/chat/completions", json={"model": model, "messages": CHAT},
                            headers={"Authorization": f"Bearer {CLIENT}"}, timeout=60)
        assert answer.status_code == 200, answer.text

    def kill(self, pod: str) -> None:
        """SIGKILL the pod's orchestrator, then its orphaned services (as a dead machine would take them)."""
        orch = self.pods[pod]
        orch.process.send_signal(signal.SIGKILL)
        orch.process.wait()
        for model in orch.models.values():
            for proc in processes_with(f"--port {model['port']}"):
                proc.kill()

    def stop(self, pod: str) -> None:
        stop_orchestrator(self.pods[pod])

    def restart(self, pod: str) -> None:
        old = self.pods[pod]
        self.pods[pod] = start_orchestrator(old.config, self.directory / f"{pod}-again.log", POD_ENV)


def start_pods(directory: Path) -> dict[str, Orchestrator]:
    port, pods = free_port(), {}
    for host in HOSTS:
        pod = "pod" + host.rsplit(".", 1)[1]
        folder = directory / pod
        folder.mkdir()
        config = write_config(folder, pod_models(), host=host, port=port, gpu_memory_gb=10, host_memory_gb=100)
        pods[pod] = start_orchestrator(config, folder / "orchestrator.log", POD_ENV)
    return pods


def start_gateway(directory: Path, pods: dict[str, Orchestrator]) -> tuple[int, str]:
    fleet = {"pods": [{"id": pod, "url": orch.url, "models_config": str(orch.config), "key_env": "POD_CLIENT_KEY",
                       "state_key_env": "POD_STATE_KEY"} for pod, orch in pods.items()],
             "settings": {"cooldown_s": 2, "timeout_s": 60}}
    (directory / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    port = free_port()
    env = {**os.environ, "AIO_RUN_DIR": str(directory / "run"), "AIO_GATEWAY_VENV": str(GATEWAY_VENV),
           "LITELLM_MASTER_KEY": MASTER, "AIO_GATEWAY_KEYS": USER, "POD_CLIENT_KEY": CLIENT, "POD_STATE_KEY": STATE}
    started = subprocess.run(["bash", str(REPO / "scripts" / "start-gateway.sh"), "--fleet",
                              str(directory / "fleet.yaml"), "--host", "127.0.0.1", "--port", str(port),
                              "--background"], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    return int((directory / "run" / "gateway.pid").read_text()), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not (GATEWAY_VENV / "bin" / "litellm").exists():
        pytest.skip(f"no gateway environment in {GATEWAY_VENV} (scripts/test.sh creates it)")
    directory = tmp_path_factory.mktemp("fleet")
    pods = start_pods(directory)
    gateway = None
    try:
        pid, url = start_gateway(directory, pods)
        gateway = psutil.Process(pid)
        client = openai.OpenAI(base_url=url + "/v1", api_key=USER, max_retries=0, timeout=60)
        fleet = Fleet(pods, client, url, directory)
        assert wait_until(lambda: all(fleet.state(pod)["models"] for pod in pods), 10)
        yield fleet
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        for orch in pods.values():
            stop_orchestrator(orch)
            for model in orch.models.values():
                leaked = processes_with(f"--port {model['port']}")
                for proc in leaked:
                    proc.kill()
                assert not leaked, f"service processes left behind: {leaked}"


def raw_status(url: str, method: bytes, path: bytes, key: str) -> int:
    """Send the path's bytes as they are: HTTP clients normalise ``..`` and percent-encodings."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(method + b" " + path + b" HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + key.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        return int(sock.recv(64).split(b" ")[1])


def stop_gateway(gateway: psutil.Process) -> None:
    gateway.terminate()
    try:
        gateway.wait(20)
    except psutil.TimeoutExpired:
        gateway.kill()
        gateway.wait(10)
        raise AssertionError("the gateway did not stop within 20 s of SIGTERM") from None


def loaded(fleet: Fleet, model: str) -> list[str]:
    """The live pods where ``model`` is not stopped."""
    live = [pod for pod, orch in fleet.pods.items() if orch.process.poll() is None]
    return [pod for pod in live if fleet.state(pod)["models"][model]["state"] != "stopped"]


def test_idling_behind_the_gateway_loads_nothing(fleet: Fleet) -> None:
    fleet.settle()
    fleet.settle()  # four polls of every pod; LiteLLM's background health checks are off
    for pod in fleet.pods:
        assert {m["state"] for m in fleet.state(pod)["models"].values()} == {"stopped"}, pod


def test_no_key_or_a_wrong_key_is_refused(fleet: Fleet) -> None:
    body = {"model": "warm", "messages": CHAT}
    assert httpx.post(fleet.url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
    for key in ("sk-wrong", ADMIN, CLIENT, STATE, MASTER + "x"):  # a pod's keys are not the gateway's
        wrong = openai.OpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="warm", messages=CHAT)  # type: ignore[arg-type]
    assert httpx.get(fleet.url + "/metrics", timeout=30).status_code == 401


def test_a_client_key_reaches_the_openai_routes_only(fleet: Fleet) -> None:
    as_client = {"Authorization": f"Bearer {USER}"}
    assert httpx.get(fleet.url + "/v1/models", headers=as_client, timeout=30).status_code == 200
    for method, path in (("GET", "/metrics/"), ("POST", "/key/generate"), ("POST", "/model/new"),
                         ("GET", "/model/info"), ("POST", "/config/update"), ("GET", "/v1/model/info")):
        answer = httpx.request(method, fleet.url + path, headers=as_client, json={}, timeout=30)
        assert answer.status_code in (401, 403), path
    for raw in (b"/v1/../key/generate", b"/v1/%2e%2e/model/new", b"/%6bey/generate",
                b"/v1/chat/completions/../../metrics/"):
        assert raw_status(fleet.url, b"POST", raw, USER) in (401, 403, 404), raw
    metrics = httpx.get(fleet.url + "/metrics/", headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)
    assert metrics.status_code == 200 and "litellm" in metrics.text


def test_requests_for_a_model_warm_on_one_pod_all_go_there(fleet: Fleet) -> None:
    fleet.warm_directly("pod3", "warm")
    fleet.settle()
    assert [fleet.where("warm") for _ in range(6)] == ["pod3"] * 6
    assert loaded(fleet, "warm") == ["pod3"]


def test_a_burst_for_a_cold_model_starts_it_on_one_pod(fleet: Fleet) -> None:
    with ThreadPoolExecutor(5) as pool:
        pods = list(pool.map(lambda _: fleet.where("burst"), range(5)))
    assert len(set(pods)) == 1, pods
    assert loaded(fleet, "burst") == pods[:1]


def test_a_parked_model_is_preferred_over_a_stopped_one(fleet: Fleet) -> None:
    fleet.warm_directly("pod4", "parks")
    fleet.warm_directly("pod4", "evicts")  # 6 + 6 GB > 10: parks is parked to make room
    assert fleet.state("pod4")["models"]["parks"]["state"] == "parked"
    fleet.settle()
    assert fleet.where("parks") == "pod4"
    assert loaded(fleet, "parks") == ["pod4"]


def test_a_pod_killed_mid_stream_gives_the_client_an_error(fleet: Fleet) -> None:
    fleet.warm_directly("pod2", "stream")
    fleet.settle()
    raw = fleet.client.chat.completions.with_raw_response.create(model="stream", messages=CHAT,  # type: ignore[arg-type]
                                                                 stream=True)
    assert raw.headers["x-litellm-model-id"] == "pod2/stream"
    tokens: list[str] = []
    with pytest.raises(openai.APIError, match="Connection error"):  # the gateway's SSE error event
        stream: openai.Stream[ChatCompletionChunk] = raw.parse()  # type: ignore[assignment]
        for chunk in stream:
            tokens.extend(c.delta.content or "" for c in chunk.choices)
            if len(tokens) == 3:
                fleet.kill("pod2")
    assert 3 <= len(tokens) < 60, tokens  # cut: never taken for a whole answer


def test_a_pod_killed_while_loading_is_left_and_its_requests_succeed_elsewhere(fleet: Fleet) -> None:
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(fleet.where, "slow")
        assert wait_until(lambda: bool(loaded(fleet, "slow")), 10)
        victim = loaded(fleet, "slow")[0]
        fleet.kill(victim)
        served = answer.result(timeout=60)  # retried on another pod
    assert served != victim
    fleet.settle()  # two missed polls: the plug-in drops it
    metrics = fleet.metrics()
    assert f'aio_gateway_pod_up{{pod="{victim}"}} 0.0' in metrics  # the plug-in's own series
    assert f'aio_gateway_pod_up{{pod="{served}"}} 1.0' in metrics
    assert all(fleet.where("slow") == served for _ in range(3))


def test_a_restarted_pod_is_routed_to_again(fleet: Fleet) -> None:
    fleet.restart("pod2")  # killed mid-stream above
    try:
        fleet.warm_directly("pod2", "back")
        fleet.settle()  # the polls that see it back, with a new boot id
        assert [fleet.where("back") for _ in range(3)] == ["pod2"] * 3
    finally:
        fleet.stop("pod2")  # the leak check wants what a test started stopped by the test
