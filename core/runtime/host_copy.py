"""Parking a torch model's weights (core/runtime/parking.py): one helper for every torch service.

``HostCopy(modules, device, loader)`` covers the parameters and buffers of one or more
``torch.nn.Module`` objects (a diffusers pipeline's components, a transformers model, a
sentence-transformers model), each distinct tensor once, so tied weights stay tied.

* Level 1: the first park copies every tensor into ONE flat host buffer, page-locked with CUDA.
  Weights never change during inference, so that copy is permanent: later parks copy nothing,
  they only drop the device tensors again. Restoring allocates on the device and copies back.
* Level 2: the device tensors and the host copy are both dropped; restoring calls ``loader``
  (the service's own ``from_pretrained`` path) and moves the fresh weights in.

Parking swaps each tensor's ``.data`` for an empty tensor instead of replacing modules or
attributes: every reference to a weight (a pipeline's, a tied weight's, a plain attribute's)
stays valid, and the memory goes back once ``release_cached_memory`` runs. On the CPU the same
calls run, with the "device" tensors in host memory too, so CPU tests exercise the real path.

``park``, ``restore`` and ``close`` block: run them on the service's worker thread, with no job
in progress (``park_on`` and ``restore_on`` do). torch is imported only inside functions.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from core.runtime.parking import MemoryUse
from core.runtime.worker import JobContext, Worker

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: where carved views start; above every dtype's alignment, and kind to DMA
GIB = 1024**3
Loader = Callable[[], Sequence[Any]]  # freshly loaded modules, the same structure (on the device or the CPU)


@dataclass(frozen=True, eq=False)  # never compared: equality of tensors is elementwise
class _Slot:
    """One distinct tensor of the modules: the model's own object, and how to rebuild it."""

    name: str  # its first name, "<module index>.<dotted name>": what a level-2 reload is matched by
    tensor: Any  # a Parameter or a buffer; parking and restoring change only its .data
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # what a rebuilt tensor gets (the original's, when dense)
    dtype: Any

    @property
    def nbytes(self) -> int:
        count = 1
        for side in self.shape:
            count *= side
        return count * int(self.dtype.itemsize)


class HostCopy:
    """See the module docstring. ``loader`` is needed for level 2 only."""

    def __init__(self, modules: Sequence[Any], device: str, loader: Loader | None = None) -> None:
        import torch

        self.modules = list(modules)
        self.device = _resolve(torch, torch.device(device))
        self.loader = loader
        self.parked_level: int | None = None
        self._slots: list[_Slot] = []  # as of the last park
        self._host: _HostBuffer | None = None

    # -- what memory_use() reports -----------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        """Host memory held for a restore (the permanent copy, alignment included)."""
        return 0 if self._host is None else self._host.nbytes

    @property
    def device_bytes(self) -> int:
        """Bytes of the modules' tensors on the device now (0 while parked)."""
        return sum(int(tensor.nbytes) for _, tensor in _unique_tensors(self.modules, self.device))

    def memory_use(self) -> MemoryUse:
        return MemoryUse(vram_bytes=self.device_bytes if self.device.type == "cuda" else 0,
                         host_bytes=self.host_bytes)

    @property
    def host_tensors(self) -> tuple[Any, ...]:
        """The host copy's tensors, in the order of the modules' distinct tensors (empty without one)."""
        return () if self._host is None else tuple(self._host.views)

    def unsupported(self, level: int) -> str | None:
        """Why this copy cannot park at ``level``, or None."""
        if level == 2 and self.loader is None:
            return "level 2 needs a loader to read the weights from disk again"
        return None

    # -- parking -------------------------------------------------------------------------------

    def park(self, level: int) -> None:
        """Drop the device tensors, keeping a host copy at level 1 (made on the first park only)."""
        import torch

        if self.parked_level is not None:
            raise RuntimeError(f"already parked at level {self.parked_level}")
        reason = self.unsupported(level)
        if reason is not None:
            raise ValueError(reason)
        began = time.monotonic()
        slots = _collect(torch, self.modules, self.device)
        with torch.no_grad():
            if level == 1:
                self._keep_host_copy(slots)
            else:
                self.close()
            for slot in slots:
                slot.tensor.data = torch.empty(0, dtype=slot.dtype, device=self.device)
        self._slots, self.parked_level = slots, level
        log.info("parked %d tensors (%.2f GiB) at level %d in %.2fs; %.2f GiB kept in host memory",
                 len(slots), sum(s.nbytes for s in slots) / GIB, level, time.monotonic() - began,
                 self.host_bytes / GIB)

    def restore(self) -> None:
        """Rebuild every device tensor, from the host copy (level 1) or the loader (level 2)."""
        import torch

        if self.parked_level is None:
            raise RuntimeError("not parked")
        began = time.monotonic()
        with torch.no_grad():
            if self.parked_level == 1:
                assert self._host is not None
                for slot, host in zip(self._slots, self._host.views, strict=True):
                    slot.tensor.data = _copy_to_device(torch, slot, host, self.device)
            else:
                for slot, fresh in zip(self._slots, self._reloaded(), strict=True):
                    # Loaded on the device already (as the service's load does): taken as it is.
                    same = fresh.device == self.device
                    slot.tensor.data = fresh if same else _copy_to_device(torch, slot, fresh, self.device)
        _synchronize(torch, self.device)
        _reflatten_rnns(torch, self.modules)
        log.info("restored %d tensors from level %d in %.2fs", len(self._slots), self.parked_level,
                 time.monotonic() - began)
        self.parked_level = None

    def close(self) -> None:
        """Give the host copy back (unregistered from CUDA first); the device tensors stay as they are."""
        host, self._host = self._host, None
        if host is not None:
            host.close()

    # -- from the event loop: the same, as a job on the service's worker (never beside another job) --

    async def park_on(self, worker: Worker, level: int) -> None:
        def job(ctx: JobContext) -> None:
            self.park(level)

        await worker.run(job, label=f"park at level {level}")

    async def restore_on(self, worker: Worker) -> None:
        def job(ctx: JobContext) -> None:
            self.restore()

        await worker.run(job, label="restore")

    # -- internals -----------------------------------------------------------------------------

    def _keep_host_copy(self, slots: list[_Slot]) -> None:
        import torch

        if self._host is not None and self._host.holds(slots):
            return  # the weights have not changed since the copy was made: nothing to copy
        if self._host is not None:
            log.warning("the modules' tensors changed since the host copy was made; copying them again")
            self.close()
        began = time.monotonic()
        host = _HostBuffer(torch, slots, pin=self.device.type == "cuda")
        for slot, view in zip(slots, host.views, strict=True):
            view.copy_(slot.tensor, non_blocking=True)
        _synchronize(torch, self.device)
        self._host = host
        log.info("host copy of %.2f GiB made in %.2fs (%s)", host.nbytes / GIB, time.monotonic() - began,
                 "page-locked" if host.pinned else "pageable")

    def _reloaded(self) -> list[Any]:
        """The loader's tensors, one per slot, matched by name; refuses anything that differs."""
        assert self.loader is not None
        fresh = {name: tensor for name, tensor in _named_tensors(self.loader())}
        tensors = []
        for slot in self._slots:
            tensor = fresh.get(slot.name)
            if tensor is None or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
                found = "nothing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
                raise RuntimeError(f"the reloaded weights do not match the model: {slot.name} was "
                                   f"{slot.shape} {slot.dtype}, the loader gave {found}")
            tensors.append(tensor.detach())
        return tensors


class _HostBuffer:
    """Every slot's host copy in one flat allocation of the bytes needed, views carved at ALIGN.

    With CUDA it is page-locked where it lies (cudaHostRegister): torch's pinned allocator would
    round each allocation up to a power of two, up to 1.78x the RAM for a whole model.
    """

    def __init__(self, torch: Any, slots: list[_Slot], pin: bool) -> None:
        offsets, self.nbytes = _layout([slot.nbytes for slot in slots])
        self.flat = torch.empty(self.nbytes, dtype=torch.uint8)
        self.pinned = pin and self.nbytes > 0 and _page_lock(torch, self.flat)
        self.views = [self.flat[offset:offset + slot.nbytes].view(slot.dtype).view(slot.shape)
                      for offset, slot in zip(offsets, slots, strict=True)]
        self._signature = _signature(slots)
        # Unregister before the memory can be freed, also if close() is never called.
        self._unlock = weakref.finalize(self, _page_unlock, self.flat.data_ptr()) if self.pinned else None
        if self._unlock is not None:
            self._unlock.atexit = False  # at exit the memory goes with the process; CUDA may be gone already

    def holds(self, slots: list[_Slot]) -> bool:
        return self._signature == _signature(slots)

    def close(self) -> None:
        if self._unlock is not None:
            self._unlock()
        self.views, self.flat = [], None


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of ``sizes`` bytes laid out one after another at ALIGN, and the bytes in all."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGN) * ALIGN
    return offsets, end


def _signature(slots: list[_Slot]) -> list[tuple[int, tuple[int, ...], Any]]:
    # The slots hold their tensors, so no id here can be reused by another object meanwhile.
    return [(id(slot.tensor), slot.shape, slot.dtype) for slot in slots]


def _named_tensors(modules: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """Every parameter and buffer under every name (tied ones repeat), prefixed by the module's index."""
    for index, module in enumerate(modules):
        yield from ((f"{index}.{name}", t) for name, t in module.named_parameters(remove_duplicate=False))
        yield from ((f"{index}.{name}", t) for name, t in module.named_buffers(remove_duplicate=False))


def _unique_tensors(modules: Sequence[Any], device: Any) -> Iterator[tuple[str, Any]]:
    """Each distinct tensor on ``device`` once (by identity: a tied weight is one object), first name first."""
    seen: set[int] = set()
    for name, tensor in _named_tensors(modules):
        if id(tensor) not in seen and tensor.device == device:
            seen.add(id(tensor))
            yield name, tensor


def _collect(torch: Any, modules: Sequence[Any], device: Any) -> list[_Slot]:
    slots = []
    for name, tensor in _unique_tensors(modules, device):
        stride = torch.empty_like(tensor, device="meta").stride()  # the original's when dense, else contiguous
        slots.append(_Slot(name, tensor, tuple(tensor.shape), tuple(stride), tensor.dtype))
    return slots


def _copy_to_device(torch: Any, slot: _Slot, source: Any, device: Any) -> Any:
    target = torch.empty_strided(slot.shape, slot.stride, dtype=slot.dtype, device=device)
    return target.copy_(source, non_blocking=True)


def _resolve(torch: Any, device: Any) -> Any:
    """``cuda`` as the indexed device its tensors report (``cuda:0``), so devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _synchronize(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- GPU only: page-locking the host buffer -------------------------------------------------------


def _page_lock(torch: Any, flat: Any) -> bool:
    """Register ``flat`` with CUDA where it lies; False (pageable, with a warning) if CUDA refuses."""
    code = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0))
    if code == 0:
        return True
    _drain_cuda_error()
    log.warning("could not page-lock the %.2f GiB host copy (CUDA error %d): keeping it in pageable memory, "
                "so restores will be slower", flat.numel() / GIB, code)
    return False


def _page_unlock(pointer: int) -> None:
    import torch

    code = int(torch.cuda.cudart().cudaHostUnregister(pointer))
    if code != 0:
        _drain_cuda_error()
        log.warning("cudaHostUnregister failed with CUDA error %d", code)


def _drain_cuda_error() -> None:
    """Consume the error a failed runtime call left pending in this thread.

    Left there, torch's next kernel launch would raise it as its own (pytorch/pytorch#167414), and
    torch's cudart module cannot read it: call cudaGetLastError in each libcudart this process loaded.
    """
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(maxsplit=5) for line in maps]
        paths = {f[5].strip().removesuffix(" (deleted)") for f in fields
                 if len(f) == 6 and "libcudart" in os.path.basename(f[5])}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError) as exc:
        log.warning("could not clear the pending CUDA error: %s", exc)


__all__ = ["HostCopy", "Loader"]


class ParksWithHostCopy:
    """Mixin for a ``BaseService`` (listed before it) whose weights a ``HostCopy`` parks: the
    parking hooks, run on the service's ``self.worker`` so a park never overlaps a job.
    ``parked_weights()`` says where the HostCopy is (default: ``self.weights``)."""

    worker: Worker

    def parked_weights(self) -> HostCopy | None:
        weights: HostCopy | None = getattr(self, "weights", None)
        return weights

    async def offload(self, level: int) -> None:
        weights = self.parked_weights()
        assert weights is not None, "offload before load"
        await weights.park_on(self.worker, level)

    async def restore(self) -> None:
        weights = self.parked_weights()
        assert weights is not None, "restore before load"
        await weights.restore_on(self.worker)

    def memory_use(self) -> MemoryUse:
        weights = self.parked_weights()
        return MemoryUse() if weights is None else weights.memory_use()


def _reflatten_rnns(torch: Any, modules: Sequence[Any]) -> None:
    """Give every RNN (EnCodec's LSTMs in MusicGen) its one contiguous cuDNN weight buffer back.

    On CUDA an RNN's weights are views of one flat buffer that cuDNN reads at once; restoring
    gives each weight its own allocation, and every later call then warns ("RNN module weights
    are not part of single contiguous chunk of memory") and copies them all (an error under
    warnings-as-errors). ``flatten_parameters`` rebuilds the buffer; on the CPU it does nothing.
    """
    for module in modules:
        for sub in module.modules() if isinstance(module, torch.nn.Module) else ():
            if isinstance(sub, torch.nn.RNNBase):
                sub.flatten_parameters()
