"""Which GPUs this orchestrator may place models on: NVML's devices, as its own mask allows.

NVML lists every GPU of the machine in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA
honours it, reading numeric entries in ``CUDA_DEVICE_ORDER`` (fastest first unless told
PCI_BUS_ID). So the inventory is NVML's list intersected with the orchestrator's own mask, each
device keyed by its UUID. Children are always started with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
(core/supervision/child_env.py) and numeric NVML indices, which then name the same cards in CUDA
as here; never renumbered ordinals, so under a mask ``2,3`` no child ever gets 0 or 1.

MIG is refused, with what to do instead: a handle taken by index is the parent GPU, so its total
would be wrong, and slices cannot be joined for tensor parallelism anyway.

``visible()`` is pure (a mask over a device list); ``read_inventory()`` reads NVML.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024**3
_NO_DEVICES = frozenset({"", "-1", "none", "nodevfiles", "void"})  # masks that hide every GPU


class InventoryError(RuntimeError):
    """The GPUs cannot be placed on as they are; the message says what to change."""


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as NVML names it."""

    index: int  # NVML's, in PCI bus order: the CUDA index under CUDA_DEVICE_ORDER=PCI_BUS_ID
    uuid: str
    pci_bus_id: str
    name: str
    total_bytes: int

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    @property
    def kind(self) -> tuple[str, int]:
        """Cards that may share one tensor-parallel model: the same name and size."""
        return self.name, self.total_bytes


def visible(devices: list[Gpu], mask: str | None, order: str | None = None) -> list[Gpu]:
    """The devices a process with ``CUDA_VISIBLE_DEVICES=mask`` sees, in the mask's order.

    Entries are indices or (prefixes of) UUIDs, as CUDA reads them; as in CUDA, an entry that
    names no device ends the list (with a warning here). Numeric entries are read in PCI order:
    with ``order`` other than PCI_BUS_ID over cards of different kinds that may differ from what
    CUDA reads, so the log says to set CUDA_DEVICE_ORDER=PCI_BUS_ID or use UUIDs.
    """
    if mask is None:
        return list(devices)
    if mask.strip().lower() in _NO_DEVICES:
        return []
    chosen: list[Gpu] = []
    for token in (part.strip() for part in mask.split(",")):
        device = _named(devices, token)
        if device is None:
            log.warning("CUDA_VISIBLE_DEVICES=%s: %r names no GPU of this machine; as CUDA does, "
                        "the devices after it are not used", mask, token)
            break
        if device not in chosen:
            chosen.append(device)
    numeric = any(token.strip().isdigit() for token in mask.split(","))
    if numeric and (order or "").upper() != "PCI_BUS_ID" and len({d.kind for d in devices}) > 1:
        log.warning("CUDA_VISIBLE_DEVICES=%s is read in PCI bus order here, but CUDA reads it fastest "
                    "first on this machine's mixed GPUs: set CUDA_DEVICE_ORDER=PCI_BUS_ID or name the "
                    "GPUs by UUID", mask)
    return chosen


def _named(devices: list[Gpu], token: str) -> Gpu | None:
    if token.upper().startswith("MIG-"):
        raise InventoryError(f"CUDA_VISIBLE_DEVICES names a MIG slice ({token}): the orchestrator places "
                             "models on whole GPUs only; name whole GPUs, or run a service on the slice "
                             "yourself with the model's env")
    if token.isdigit():
        return next((d for d in devices if d.index == int(token)), None)
    matches = [d for d in devices if token and d.uuid.lower().startswith(token.lower())]
    return matches[0] if len(matches) == 1 else None  # CUDA refuses an ambiguous prefix too


def read_inventory(nvml: Any, environ: Mapping[str, str]) -> list[Gpu]:
    """Every GPU NVML lists that ``environ``'s CUDA_VISIBLE_DEVICES lets this process use."""
    devices = [_device(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
    return visible(devices, environ.get("CUDA_VISIBLE_DEVICES"), environ.get("CUDA_DEVICE_ORDER"))


def _device(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    if _mig_enabled(nvml, handle):
        raise InventoryError(f"GPU {index} is in MIG mode: the orchestrator places models on whole GPUs "
                             f"only. Turn MIG off (nvidia-smi -i {index} -mig 0, then reset the GPU), or "
                             "hide this GPU from the orchestrator with CUDA_VISIBLE_DEVICES")
    return Gpu(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
               pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId), name=_text(nvml.nvmlDeviceGetName(handle)),
               total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total))


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # NVMLError_NotSupported: a GPU without MIG
        return False
    return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
