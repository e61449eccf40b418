"""Which GPUs a model goes on, and which residents must make room there: pure, over snapshots.

Each GPU has a budget (``Device.budget_gb``). A model claims its ``vram_gb`` (plus its process's
overhead) on each GPU it runs on: one, or ``count`` GPUs of one kind for tensor parallelism; a
model without ``vram_gb`` claims whole GPUs. The candidate sets are every ``count`` GPUs of one
kind it may use (all, or those it is pinned to); a parked model only the ones it parked on, where
its process still holds its CUDA context.

For each candidate set the evictions are chosen as on one GPU: in eviction order (stopping or
parking already, then idle, then parked, then busy; least recently used first), never a pinned
model, taking only residents that hold memory on a GPU of the set that is still short; a resident
on several GPUs frees each of them. The set whose evictions cost least wins: fewest busy models
(each is a wait), then fewest idle or parked ones, then the least recently used, then the
model's policy (pack: the least memory left over, keeping large holes for large models; spread:
the most), then the lowest indices. So a model that fits somewhere evicts nothing, and an
eviction touches only the GPUs the model will use.

With one GPU there is one candidate set and this is the single-GPU rule exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.host.memory_share import GIB, WHOLE_GPU_UTILIZATION, ShareError, vllm_utilization
from model_orchestrator.model_view import PARKED, PARKING, STOPPING, ModelView, Policy, Want

_EPSILON_GB = 1e-9


@dataclass(frozen=True)
class Device:
    """One GPU as the scheduler sees it."""

    index: int  # NVML's (PCI bus order), as children get it in CUDA_VISIBLE_DEVICES
    budget_gb: float
    kind: str = ""  # GPUs of one kind (name and size) may share a tensor-parallel model
    uuid: str = ""
    total_gb: float = 0.0  # the card's memory (0: unknown); engines take fractions of it
    reserve_gb: float = 0.0  # settings.gpus.reserve_gb, already off budget_gb
    others_gb: float = 0.0  # held by processes not the orchestrator's, per NVML (foreign_memory.py)

    def within_room(self) -> Device:
        """This GPU with its budget lowered to what other processes leave of it (its total less their memory
        and the reserve)."""
        if not self.others_gb or not self.total_gb:
            return self
        room = max(0.0, self.total_gb - self.others_gb - self.reserve_gb)
        return dataclasses.replace(self, budget_gb=min(self.budget_gb, room))


def utilization_fill(vram_gb: float | None, placed: tuple[int, ...], devices: Sequence[Device],
                     budget_gb: float | None) -> str:
    """``{gpu_memory_utilization}`` for a start on ``placed``: the share over the smallest total among them
    (vLLM takes one fraction of each GPU), rounded down as the vLLM service does; vLLM's whole-GPU share for
    a model without ``vram_gb``; over ``budget_gb`` (one GPU's) when the GPUs are not known."""
    totals = [d.total_gb for d in devices if d.index in placed and d.total_gb]
    total_gb = min(totals) if totals else budget_gb
    if vram_gb is None or not total_gb:
        return f"{WHOLE_GPU_UTILIZATION:g}"
    if vram_gb <= 0:  # no GPU share: a service that uses the GPU anyway refuses to start, and says why
        return "0"
    try:
        return f"{vllm_utilization(vram_gb, int(total_gb * GIB)):g}"
    except ShareError:  # more than the card: the service's own check says so at its start
        return "1"


def chosen_gpus(names: Sequence[int | str], devices: Sequence[Device]) -> frozenset[int]:
    """The indices of ``devices`` that ``names`` (models.yaml's NVML indices or UUID prefixes) pick."""
    return frozenset(d.index for d in devices for name in names if d.index == name or _uuid_of(d, name))


def _uuid_of(device: Device, name: int | str) -> bool:
    return isinstance(name, str) and bool(device.uuid) and device.uuid.lower().startswith(name.lower())


def want_for(gpus: Sequence[int | str] | None, count: int, policy: Policy, devices: Sequence[Device]) -> Want:
    """Where a model may go, from its models.yaml keys (gpus, tensor_parallel, placement)."""
    return Want(count, None if gpus is None else chosen_gpus(gpus, devices), policy)


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]
    victims: tuple[str, ...]  # in eviction order


def held_on(view: ModelView, devices: Sequence[Device]) -> tuple[int, ...]:
    """The GPUs ``view`` holds memory on; a resident with none recorded is on the first (one-GPU callers)."""
    return view.devices or ((devices[0].index,) if devices else ())


def evict_order(view: ModelView) -> tuple[int, float]:
    """Already stopping or parking first (free soon), then idle, then parked (stopping one frees only its
    residue), then busy; least recently used first."""
    rank = 0 if view.state in (STOPPING, PARKING) else 1 if view.idle else 2 if view.state is PARKED else 3
    return rank, view.last_used


def candidate_sets(view: ModelView, devices: Sequence[Device]) -> list[tuple[int, ...]]:
    """Every set of GPUs ``view`` may run on, each in index order."""
    known = {device.index for device in devices}
    if view.state is PARKED and view.devices:  # restores onto the GPUs it parked from
        return [tuple(sorted(view.devices))] if set(view.devices) <= known else []
    allowed = [d for d in devices if view.want.allowed is None or d.index in view.want.allowed]
    kinds = sorted({d.kind for d in allowed})
    return [tuple(d.index for d in group)
            for kind in kinds
            for group in itertools.combinations([d for d in allowed if d.kind == kind], view.want.count)]


def place(target: str, views: Mapping[str, ModelView], devices: Sequence[Device]) -> Placement | None:
    """Where ``target`` goes and what it evicts; None when no candidate set can ever hold it.

    Memory that processes not ours hold (``Device.others_gb``) counts where it can: a GPU another program
    crowds is avoided, or room made beside it. Where even that cannot make room, the declared claims
    alone decide (and the memory wait before the start says what is short): a program outside the
    orchestrator's control never makes a model unservable, as models.yaml is the operator's word."""
    if any(device.others_gb for device in devices):
        actual = _best(target, views, [device.within_room() for device in devices])
        if actual is not None:
            return actual
    return _best(target, views, devices)


def _best(target: str, views: Mapping[str, ModelView], devices: Sequence[Device]) -> Placement | None:
    best: tuple[tuple[object, ...], Placement] | None = None
    for chosen in candidate_sets(views[target], devices):
        victims = victims_for(target, chosen, views, devices)
        if victims is None:
            continue
        key = _cost(target, chosen, victims, views, devices)
        if best is None or key < best[0]:
            best = (key, Placement(chosen, tuple(victims)))
    return None if best is None else best[1]


def need_gb(view: ModelView, device: Device) -> float:
    """What ``view`` claims on one GPU it runs on: its share and its process's overhead, or the whole GPU."""
    return device.budget_gb if view.vram_gb is None else view.vram_gb + view.overhead_gb


def claim_on(view: ModelView, device: Device) -> float:
    """What ``view`` holds on one of its GPUs in its state; a whole-GPU model fills it."""
    return min(view.claim_gb, device.budget_gb)


def used_gb(views: Mapping[str, ModelView], devices: Sequence[Device], skip: set[str]) -> dict[int, float]:
    """What the models (but ``skip``) claim on each GPU now."""
    by_index = {device.index: device for device in devices}
    used = {device.index: 0.0 for device in devices}
    for view in views.values():
        if view.name in skip or view.claim_gb <= 0:
            continue
        for index in held_on(view, devices):
            if index in used:
                used[index] += claim_on(view, by_index[index])
    return used


def _short(view: ModelView, chosen: set[int], used: dict[int, float], by_index: dict[int, Device]) -> set[int]:
    """The GPUs of ``chosen`` where ``view`` does not fit yet (a rounding crumb is not a shortage); a GPU with
    no budget at all (others hold all of it) holds no whole-GPU model either."""
    return {i for i in chosen if (view.vram_gb is None and by_index[i].budget_gb <= 0)
            or by_index[i].budget_gb - used[i] < need_gb(view, by_index[i]) - _EPSILON_GB}


def victims_for(target: str, chosen: tuple[int, ...], views: Mapping[str, ModelView],
                devices: Sequence[Device]) -> list[str] | None:
    """The residents to evict, in eviction order, so ``target`` fits on every GPU of ``chosen``."""
    by_index = {device.index: device for device in devices}
    used = used_gb(views, devices, {target})
    short = _short(views[target], set(chosen), used, by_index)
    candidates = sorted((v for v in views.values() if v.name != target and not v.pinned and v.claim_gb > 0
                         and set(held_on(v, devices)) & set(chosen)), key=evict_order)
    victims: list[str] = []
    while short:
        victim = next((v for v in candidates if set(held_on(v, devices)) & short), None)
        if victim is None:
            return None
        candidates.remove(victim)
        victims.append(victim.name)
        for index in held_on(victim, devices):
            if index in used:
                used[index] -= claim_on(victim, by_index[index])
        short = _short(views[target], short, used, by_index)
    return victims


def _cost(target: str, chosen: tuple[int, ...], victims: list[str], views: Mapping[str, ModelView],
          devices: Sequence[Device]) -> tuple[object, ...]:
    ranks = [evict_order(views[name]) for name in victims]
    busy = sum(rank == 3 for rank, _ in ranks)
    evicted = sum(rank in (1, 2) for rank, _ in ranks)
    latest = max((used for rank, used in ranks if rank > 0), default=-math.inf)
    by_index = {device.index: device for device in devices}
    used = used_gb(views, devices, {target, *victims})
    left = sum(by_index[i].budget_gb - used[i] - need_gb(views[target], by_index[i]) for i in chosen)
    fit = left if views[target].want.policy == "pack" else -left
    return busy, evicted, latest, fit, chosen
