"""A stand-in for nvidia-ml-py's ``pynvml``, for tests on machines without a GPU (a mock of what
cannot run here: the driver). Put this folder first on PYTHONPATH and point ``AIO_FAKE_NVML`` at
a JSON spec::

    {"devices": [{"uuid": "GPU-0a…", "pci_bus_id": "00000000:01:00.0", "name": "NVIDIA RTX 4090",
                  "total_gb": 24, "mig": false}, ...],
     "used": "/tmp/…/used.json"}

``used`` is the shared ledger of GPU memory: ``{"<pid>": {"<device index>": bytes}}``, written by
fake services (``claim``) when they load and read here as NVML's per-process and per-device use.
As with the real driver, a process that is gone holds nothing, however it ended.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NVML_DEVICE_MIG_ENABLE = 1
_GIB = 1024**3


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


@dataclass
class _Handle:
    index: int
    spec: dict[str, Any]


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Pci:
    busId: str


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None


def _spec() -> dict[str, Any]:
    path = os.environ.get("AIO_FAKE_NVML")
    if not path:
        raise NVMLError("AIO_FAKE_NVML is not set: no fake driver")
    spec: dict[str, Any] = json.loads(Path(path).read_text())
    return spec


def nvmlInit() -> None:
    _spec()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_spec()["devices"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    devices = _spec()["devices"]
    if not 0 <= index < len(devices):
        raise NVMLError(f"no device {index}")
    return _Handle(index, devices[index])


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return str(handle.spec["uuid"])


def nvmlDeviceGetName(handle: _Handle) -> str:
    return str(handle.spec.get("name", "NVIDIA Fake GPU"))


def nvmlDeviceGetPciInfo(handle: _Handle) -> _Pci:
    return _Pci(str(handle.spec.get("pci_bus_id", f"00000000:{handle.index + 1:02x}:00.0")))


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    if "mig" not in handle.spec:
        raise NVMLError_NotSupported("MIG not supported")
    return [int(bool(handle.spec["mig"])), int(bool(handle.spec["mig"]))]


def _total(handle: _Handle) -> int:
    return int(float(handle.spec["total_gb"]) * _GIB)


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> _Memory:
    used = min(_total(handle), sum(b for _pid, b in _by_pid(handle.index)))
    return _Memory(total=_total(handle), free=_total(handle) - used, used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[_Process]:
    return [_Process(pid, used) for pid, used in _by_pid(handle.index)]


def _by_pid(index: int) -> list[tuple[int, int]]:
    with _ledger() as ledger:
        return [(int(pid), int(devices[str(index)])) for pid, devices in ledger.items()
                if str(index) in devices and _alive(int(pid))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie holds no GPU memory either
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def _ledger(write: bool = False) -> Iterator[dict[str, dict[str, int]]]:
    path = Path(_spec()["used"])
    path.touch()
    with path.open("r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        text = file.read()
        ledger: dict[str, dict[str, int]] = json.loads(text) if text.strip() else {}
        yield ledger
        if write:
            file.seek(0)
            file.truncate()
            file.write(json.dumps(ledger))


def claim(pid: int, by_device: dict[int, int]) -> None:
    """Record that ``pid`` holds ``by_device`` bytes (NVML index → bytes); an empty dict frees it."""
    with _ledger(write=True) as ledger:
        if by_device:
            ledger[str(pid)] = {str(index): int(size) for index, size in by_device.items()}
        else:
            ledger.pop(str(pid), None)
