"""Which pod a gateway sends a request to: the policy of the gateway's affinity plug-in. Pure; no I/O.

A gateway in front of several pods (issue #24, ../shared/notes/fleet.md) has, per model, one
deployment per pod. Before each request it narrows that list to the pods where the model is best
served, from the state each pod publishes (``GET /fleet/state``, pod_state.py), in this order:

1. the model is ready there: the one with the fewest requests in flight and waiting;
2. it is starting or restoring there, or this gateway just sent it a cold request (``Starts``):
   so a burst of requests for a cold model starts it on one pod, not on every pod;
3. it is parked there (a restore takes seconds, a start minutes);
4. it fits there without evicting anything: the pod with the most free GPU budget;
5. any pod that accepts requests.

It never answers with nothing (the chosen pod queues the request), skips the deployments that
already failed this request (unless every one has), and ignores pods it has no fresh state for
(``Pods``: dropped after ``MISSES`` failed polls, forgotten on a new boot id) unless it has none.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MISSES = 2  # failed polls in a row before a pod's state is no longer trusted
START_MEMORY_S = 30.0  # how long a cold request sent to a pod counts as "starting there" without its confirmation


@dataclass
class Pods:
    """The latest published state of each pod, as the poller saw it."""

    states: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    boots: dict[str, Any] = field(default_factory=dict)  # the last boot id seen per pod, kept when it is dropped

    def observed(self, pod: str, state: Mapping[str, Any] | None, starts: Starts | None = None) -> None:
        """A poll's result: the pod's state, or None when it did not answer (in time). A pod dropped for its
        misses, or back with a new boot id, has nothing under way that this gateway sent it."""
        if state is None:
            self.misses[pod] = self.misses.get(pod, 0) + 1
            if self.misses[pod] >= MISSES and self.states.pop(pod, None) is not None and starts is not None:
                starts.forget_pod(pod)
            return
        if self.boots.get(pod) not in (None, state.get("boot_id")) and starts is not None:
            starts.forget_pod(pod)  # it restarted: nothing it was starting is under way any more
        self.boots[pod] = state.get("boot_id")
        self.misses[pod] = 0
        self.states[pod] = state

    def fresh(self, pod: str) -> Mapping[str, Any] | None:
        return self.states.get(pod)


@dataclass
class Starts:
    """Cold requests this gateway sent, per (pod, model), until the pod's own state shows the start."""

    sent: dict[tuple[str, str], float] = field(default_factory=dict)

    def sent_to(self, pod: str, model: str, now: float) -> None:
        self.sent[(pod, model)] = now

    def under_way(self, pod: str, model: str, now: float) -> bool:
        at = self.sent.get((pod, model))
        return at is not None and now - at < START_MEMORY_S

    def forget_pod(self, pod: str) -> None:
        self.sent = {key: at for key, at in self.sent.items() if key[0] != pod}


def choose(model: str, deployments: Sequence[Any], pod_of: Callable[[Any], str], pods: Pods, starts: Starts,
           failed_pods: Collection[str] = (), now: float = 0.0) -> list[Any]:
    """The deployments of ``model`` to send this request to (never empty when ``deployments`` is not);
    ``failed_pods``: the pods this request already failed on (the engine's retry)."""
    candidates = [d for d in deployments if pod_of(d) not in failed_pods] or list(deployments)
    known = [d for d in candidates if _accepting(pods.fresh(pod_of(d)))]
    if not known:
        return candidates  # no fresh state for any: the engine's own choice
    ranks = [_rank(model, pod_of(d), pods, starts, now) for d in known]
    best = min(ranks)
    chosen = [d for d, rank in zip(known, ranks, strict=True) if rank == best]
    if best[0] >= 3:  # a cold start: remember it, so the rest of a burst follows it there
        starts.sent_to(pod_of(chosen[0]), model, now)
        chosen = chosen[:1]
    return chosen


def _accepting(state: Mapping[str, Any] | None) -> bool:
    return state is not None and bool(state.get("accepting", True))


def _rank(model: str, pod: str, pods: Pods, starts: Starts, now: float) -> tuple[float, ...]:
    """Smaller is better: (tier, then the tier's own order)."""
    state = pods.fresh(pod) or {}
    entry = (state.get("models") or {}).get(model) or {}
    status = entry.get("state")
    load = float(entry.get("in_flight", 0)) + float(entry.get("waiting", 0))
    if status == "ready":
        return (0.0, load)
    if status in ("starting", "restoring") or starts.under_way(pod, model, now):
        return (1.0, load)
    if status == "parked":
        return (2.0, load)
    free = float((state.get("budget") or {}).get("free_gb") or 0.0)
    if entry.get("fits_without_eviction"):
        return (3.0, -free)
    return (4.0, -free)


# What the engine hands the plug-in: LiteLLM deployments (dicts), as render.py writes them.

def pod_of(deployment: Mapping[str, Any]) -> str:
    info = deployment.get("model_info") or {}
    return str(info.get("pod") or info.get("id") or "")


def served_name(model: str, deployments: Sequence[Mapping[str, Any]]) -> str:
    """The name the pods publish the model under: a client may have asked for one of its aliases."""
    for deployment in deployments:
        name = (deployment.get("model_info") or {}).get("aio_model")
        if name:
            return str(name)
    return model


def failed_pods(request_kwargs: Mapping[str, Any] | None, deployments: Sequence[Mapping[str, Any]],
                pod: Callable[[Mapping[str, Any]], str] = pod_of) -> set[str]:
    """The pods this request already failed on: LiteLLM records each failed attempt under the request's
    metadata (``previous_models``, one record per attempt with its deployment id) before it retries."""
    failed_ids: set[str] = set()
    for key in ("metadata", "litellm_metadata"):
        metadata = (request_kwargs or {}).get(key)
        for record in (metadata.get("previous_models") or ()) if isinstance(metadata, Mapping) else ():
            if isinstance(record, Mapping) and record.get("deployment_id"):
                failed_ids.add(str(record["deployment_id"]))
    return {pod(d) for d in deployments if str((d.get("model_info") or {}).get("id")) in failed_ids}
