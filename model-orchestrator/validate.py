"""Check a deployment model by model: can each service start, and (optionally) does it answer?

    python -m model_orchestrator.validate --config .data/models.yaml
    python -m model_orchestrator.validate --config .data/models.yaml --requests http://127.0.0.1:9099

Without ``--requests`` nothing is loaded: for every model, its interpreter (or command) exists
and its engine's packages import (``server.py --check-imports``, with the model's own
arguments and environment, so ``--device cuda`` on a host where torch sees no GPU fails here).
With ``--requests URL``, one real request per model goes through a running orchestrator,
which loads each model in turn. The playbook's `validate` tag runs both (requests opt-in).
Prints one line per model and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import sys
import wave
from dataclasses import dataclass
from typing import Any

import httpx

from core.config.launch import resolve_python, service_argv
from core.config.load import load_config
from core.config.schema import ModelSpec, OrchestratorConfig
from core.supervision.child_env import service_env
from model_orchestrator.auth import read_keys


@dataclass(frozen=True)
class Check:
    model: str
    ok: bool
    detail: str


async def check_service(spec: ModelSpec, config: OrchestratorConfig) -> Check:
    """The model's interpreter or command exists, and its engine imports (no model loaded)."""
    python = resolve_python(spec.python, config.base_dir, sys.executable) or ""
    argv = service_argv(spec, python, config.base_dir)
    if spec.service_script is None:
        found = shutil.which(argv[0])
        return Check(spec.name, found is not None, f"command {argv[0]}: {found or 'not found on PATH'}")
    process = await asyncio.create_subprocess_exec(
        *argv, "--check-imports", env=service_env(spec, passthrough=config.settings.env_passthrough),
        cwd=config.base_dir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return Check(spec.name, False, f"{python}: exit {process.returncode}: {' | '.join(tail)}")
    if not report.get("ok"):
        return Check(spec.name, False, str(report.get("error")))
    modules = ", ".join(f"{name} {version}" for name, version in report["modules"].items())
    device = f" on {report['device']}" if "device" in report else ""
    return Check(spec.name, True, f"{modules or 'no engine packages'}{device} ({python})")


# One small request per model type: (route, body); `model` is added per model.
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}),
    "image": ("/v1/images/generations", {"prompt": "a red fox", "size": "64x64", "n": 1}),
    "audio": ("/v1/audio/speech", {"input": "calm piano", "voice": "alloy", "response_format": "wav", "duration": 1}),
    "embedding": ("/v1/embeddings", {"input": ["a cat sits"]}),
    "transcription": ("/v1/audio/transcriptions", {}),
    "rerank": ("/v1/rerank", {"query": "where do cats sit", "documents": ["a cat sits on the mat", "gpus"]}),
}


def _silence(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    """A WAV of silence, to ask a speech-to-text model for a transcript."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"\0\0" * int(seconds * rate))
    return out.getvalue()


def _answered(kind: str, response: httpx.Response) -> str:
    """What the answer proves, or raise ValueError naming what is wrong with it."""
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {response.text[:300]}")
    if kind == "audio":
        if not response.content.startswith(b"RIFF"):
            raise ValueError("not a WAV file")
        return f"{len(response.content)} bytes of WAV"
    body = response.json()
    if kind == "text":
        return f"replied {body['choices'][0]['message']['content']!r}"
    if kind == "image":
        return f"{len(body['data'][0]['b64_json'])} base64 chars of PNG"
    if kind == "transcription":
        return f"transcribed a second of silence: {body.get('text', '')!r}"
    if kind == "rerank":
        return f"ranked {len(body['results'])} documents, best score {body['results'][0]['relevance_score']:.3f}"
    return f"{len(body['data'][0]['embedding'])} dimensions"


async def request_model(client: httpx.AsyncClient, spec: ModelSpec) -> Check:
    if spec.type not in REQUESTS:
        return Check(spec.name, True, f"type {spec.type}: no standard request, skipped")
    route, body = REQUESTS[spec.type]
    timeout = spec.startup_time + spec.request_timeout
    try:
        if spec.type == "transcription":  # a form: the audio file and the model
            response = await client.post(route, data={"model": spec.name}, files={"file": ("silence.wav", _silence())},
                                         timeout=timeout)
        else:
            response = await client.post(route, json={"model": spec.name, **body}, timeout=timeout)
        return Check(spec.name, True, _answered(spec.type, response))
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        return Check(spec.name, False, f"{route}: {type(exc).__name__}: {exc}")


async def run(config: OrchestratorConfig, url: str | None, api_key: str | None) -> list[Check]:
    checks = list(await asyncio.gather(*(check_service(spec, config) for spec in config.models.values())))
    if url is not None and all(check.ok for check in checks):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as client:
            for spec in config.models.values():  # one at a time: each may need the whole GPU
                checks.append(await request_model(client, spec))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the models.yaml to check (e.g. the rendered one)")
    parser.add_argument("--requests", metavar="URL", help="also send one request per model to this orchestrator")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    # A client key is enough for requests; an admin key works too.
    keys = read_keys(config.settings.api_key_env, os.environ) or read_keys(config.settings.admin_key_env, os.environ)
    checks = asyncio.run(run(config, args.requests, keys[0] if keys else None))
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.model}: {check.detail}", flush=True)
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
