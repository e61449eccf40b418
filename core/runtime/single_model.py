"""A service around one torch model on one worker thread, parked with a ``HostCopy`` (embeddings, rerank).

What such services share: the worker (one forward pass at a time; a request whose client left
stops before its next batch), the ``--device`` option, loading on the worker under the GPU share
with the service's own ``build(device)`` (its ``from_pretrained`` path, which a level-2 restore
calls again), and unloading. torch and the model's library are imported in ``build`` only.
"""

from __future__ import annotations

import argparse
from typing import Any

from core.base_service import BaseService
from core.host.memory_share import cap_torch_memory, release_cached_memory
from core.runtime.devices import resolve_device
from core.runtime.host_copy import HostCopy, ParksWithHostCopy
from core.runtime.worker import JobContext, Worker


class SingleModelService(ParksWithHostCopy, BaseService):
    model: Any

    def __init__(self) -> None:
        super().__init__()
        # After each job only a young-generation collection: a full one costs ~0.3 s in such a process,
        # 15 short requests' worth. Without CUDA in use that returns at once.
        self.worker = Worker(self.name, after_job=lambda: release_cached_memory(full_collection=False))
        self.weights: HostCopy | None = None  # what parking moves (core/runtime/parking.py)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                            help="where to run the model (auto: cuda when available)")

    def build(self, device: str) -> Any:
        """The model on ``device``, loaded from ``self.model_path`` (in the worker thread)."""
        raise NotImplementedError

    def load_model(self, ctx: JobContext) -> Any:
        """The model on its device, and ``self.weights`` to park it with (run on the worker)."""
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no "Loading weights" bars in the service log
        device = resolve_device(self.options.device)
        cap_torch_memory(self.vram_gb, device)  # before any weights reach the GPU
        model = self.build(device)
        # Level 2 reloads the weights the way they were loaded here, straight onto the device.
        self.weights = HostCopy([model], device, loader=lambda: [self.build(device)])
        return model

    async def unload(self) -> None:
        await self.worker.close()  # the model stays until the job using it has ended
        if self.weights is not None:
            self.weights.close()  # the host copy, if parked once
            self.weights = None
        if getattr(self, "model", None) is not None:
            del self.model
            release_cached_memory()
