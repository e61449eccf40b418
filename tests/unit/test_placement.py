"""model-orchestrator/placement.py: which GPUs a model goes on and what makes room there (no processes).

Tables of the rules, then the invariants over random pods (hypothesis): no GPU over its budget, a
TP-k model on k distinct GPUs of one kind, pinned models on their GPUs only, evictions only of
unpinned residents of the chosen GPUs, and a refusal only where no set of GPUs could ever hold it.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from core.supervision.service_state import ServiceState
from model_orchestrator.placement import Device, Placement, candidate_sets, held_on, place, used_gb
from model_orchestrator.scheduler import ModelView, Reject, Start, Want, plan

READY, PARKED, STOPPED = ServiceState.READY, ServiceState.PARKED, ServiceState.STOPPED
TWO_4090 = [Device(0, 24.0, "4090"), Device(1, 24.0, "4090")]


def v(name: str, state: ServiceState = STOPPED, vram_gb: float | None = 10.0, devices: tuple[int, ...] = (),
      **kw: object) -> ModelView:
    return ModelView(name=name, state=state, vram_gb=vram_gb, devices=devices, **kw)  # type: ignore[arg-type]


def views(*items: ModelView) -> dict[str, ModelView]:
    return {item.name: item for item in items}


def test_pack_takes_the_tightest_fit_and_spread_the_most_room() -> None:
    pod = views(v("a", READY, devices=(0,)), v("new"))
    assert place("new", pod, TWO_4090) == Placement((0,), ())  # 4 GB left on 0: 1 keeps its 24 for a big one
    spread = views(v("a", READY, devices=(0,)), v("new", want=Want(policy="spread")))
    assert place("new", spread, TWO_4090) == Placement((1,), ())


def test_an_eviction_touches_only_the_gpu_that_needs_room() -> None:
    pod = views(v("old", READY, 20, (0,), last_used=1.0), v("recent", READY, 20, (1,), last_used=5.0),
                v("new", vram_gb=20))
    assert place("new", pod, TWO_4090) == Placement((0,), ("old",))


def test_a_busy_model_is_kept_where_an_idle_one_can_go() -> None:
    pod = views(v("busy", READY, 20, (0,), last_used=1.0, in_flight=1),
                v("idle", READY, 20, (1,), last_used=9.0), v("new", vram_gb=20))
    assert place("new", pod, TWO_4090) == Placement((1,), ("idle",))


def test_tensor_parallel_takes_gpus_of_one_kind() -> None:
    mixed = [Device(0, 80.0, "H100"), Device(1, 24.0, "4090"), Device(2, 80.0, "H100"), Device(3, 24.0, "4090")]
    pod = views(v("tp", vram_gb=20, want=Want(count=2)))
    assert place("tp", pod, mixed) == Placement((1, 3), ())  # pack: the two 4090s leave the least over
    assert sorted(candidate_sets(pod["tp"], mixed)) == [(0, 2), (1, 3)]  # never an H100 with a 4090
    assert place("tp", views(v("tp", vram_gb=30, want=Want(count=2))), mixed) == Placement((0, 2), ())


def test_a_pinned_model_goes_only_on_its_gpus() -> None:
    pod = views(v("a", READY, devices=(1,)), v("new", want=Want(allowed=frozenset({1}))))
    assert place("new", pod, TWO_4090) == Placement((1,), ())
    full = views(v("a", READY, 20, (1,), pinned=True), v("new", want=Want(allowed=frozenset({1}))))
    assert place("new", full, TWO_4090) is None  # GPU 0 has room, but the model may not go there


def test_evicting_a_tensor_parallel_resident_frees_each_of_its_gpus() -> None:
    pod = views(v("tp", READY, 20, (0, 1), last_used=1.0), v("new", vram_gb=20))
    assert place("new", pod, TWO_4090) == Placement((0,), ("tp",))
    assert used_gb(pod, TWO_4090, {"tp"}) == {0: 0.0, 1: 0.0}


def test_a_parked_model_restores_where_it_parked() -> None:
    pod = views(v("p", PARKED, 10, (1,), kept_gb=1.0), v("a", READY, 20, (0,)))
    assert candidate_sets(pod["p"], TWO_4090) == [(1,)]
    assert place("p", pod, TWO_4090) == Placement((1,), ())


def test_a_whole_gpu_model_takes_an_empty_gpu_or_empties_one() -> None:
    pod = views(v("a", READY, devices=(0,)), v("whole", vram_gb=None))
    assert place("whole", pod, TWO_4090) == Placement((1,), ())
    both = views(v("a", READY, devices=(0,), last_used=1.0), v("b", READY, devices=(1,), last_used=2.0),
                 v("whole", vram_gb=None))
    assert place("whole", both, TWO_4090) == Placement((0,), ("a",))


def test_plan_names_the_gpus_and_says_why_nothing_fits() -> None:
    pod = views(v("a", READY, 20, (0,)), v("new", vram_gb=20))
    assert plan("new", pod, TWO_4090, now=0.0, batch_window=1.0) == Start((), (), (1,))
    too_big = plan("big", views(v("big", vram_gb=30)), TWO_4090, now=0.0, batch_window=1.0)
    assert isinstance(too_big, Reject)
    assert too_big.message == ("model 'big' needs 30 GB of GPU memory, more than the whole budget "
                               "(GPUs it may use: 0: 24 GB, 1: 24 GB)")
    tp3 = plan("tp", views(v("tp", want=Want(count=3))), TWO_4090, now=0.0, batch_window=1.0)
    assert isinstance(tp3, Reject) and "no set of GPUs it may use has that many" in tp3.message


def test_one_gpu_is_the_single_gpu_rule() -> None:
    pod = views(v("old", READY, 20, last_used=1.0), v("mid", READY, 10, last_used=2.0), v("new", vram_gb=30))
    assert plan("new", pod, 40.0, now=0.0, batch_window=1.0) == Start(("old",), (), ())  # a plain budget names none
    assert plan("new", pod, [Device(0, 40.0)], now=0.0, batch_window=1.0) == Start(("old",), (), (0,))


# --- invariants over random pods ---------------------------------------------------------------

KINDS = {"A": 24.0, "B": 48.0}


@st.composite
def pods(draw: st.DrawFn) -> tuple[list[Device], dict[str, ModelView]]:
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=4))
    devices = [Device(i, KINDS[kind], kind) for i, kind in enumerate(kinds)]
    models: dict[str, ModelView] = {}
    for i in range(draw(st.integers(0, 5))):
        state = draw(st.sampled_from([READY, PARKED, STOPPED]))
        count = draw(st.integers(1, 2))
        sets = [s for s in itertools.combinations(range(len(devices)), count)
                if len({devices[j].kind for j in s}) == 1]
        held = draw(st.sampled_from(sets)) if sets and state is not STOPPED else ()
        models[f"m{i}"] = v(f"m{i}", state, draw(st.sampled_from([None, 2.0, 8.0, 20.0])), held,
                            pinned=draw(st.booleans()), in_flight=draw(st.integers(0, 1)) if state is READY else 0,
                            last_used=float(draw(st.integers(0, 9))), kept_gb=1.0, want=Want(count=len(held) or 1))
    used = used_gb(models, devices, set())
    if any(used[d.index] > d.budget_gb for d in devices):  # only pods that are themselves within budget
        models = {name: m for name, m in models.items() if m.state is STOPPED}
    allowed = draw(st.none() | st.frozensets(st.integers(0, len(devices) - 1), min_size=1))
    models["t"] = v("t", STOPPED, draw(st.sampled_from([None, 4.0, 20.0, 40.0])),
                    want=Want(draw(st.integers(1, 2)), allowed, draw(st.sampled_from(["pack", "spread"]))))
    return devices, models


@settings(max_examples=300, deadline=None)
@given(pods())
def test_placement_invariants(pod: tuple[list[Device], dict[str, ModelView]]) -> None:
    devices, models = pod
    target, by_index = models["t"], {d.index: d for d in devices}
    result = place("t", models, devices)
    if result is None:  # refused only where even evicting every unpinned resident leaves no room
        for chosen in candidate_sets(target, devices):
            pinned = {name for name, m in models.items() if m.pinned or name == "t"}
            used = used_gb(models, devices, set(models) - pinned)
            assert any(used[i] + (d.budget_gb if target.vram_gb is None else target.vram_gb) > d.budget_gb + 1e-9
                       for i in chosen for d in [by_index[i]])
        return
    assert len(set(result.devices)) == len(result.devices) == target.want.count
    assert len({by_index[i].kind for i in result.devices}) == 1
    assert target.want.allowed is None or set(result.devices) <= target.want.allowed
    for name in result.victims:
        assert not models[name].pinned and models[name].claim_gb > 0
        assert set(held_on(models[name], devices)) & set(result.devices)
    used = used_gb(models, devices, {"t", *result.victims})
    for i in result.devices:
        need = by_index[i].budget_gb if target.vram_gb is None else target.vram_gb
        assert used[i] + need <= by_index[i].budget_gb + 1e-9


@settings(max_examples=200, deadline=None)
@given(pods())
def test_a_childs_fraction_is_its_claim_over_its_own_gpus_total(pod: tuple[list[Device], dict[str, ModelView]]
                                                                ) -> None:
    """What a placed child computes from what it is given (CUDA_VISIBLE_DEVICES, PCI order, AIO_VRAM_GB):
    on each of its cuda:i, the GPU's NVML index is the placed one, and vLLM's fraction is the claim over
    that GPU's own total, never another's."""
    from core.host.memory_share import GIB, nvml_index, vllm_utilization
    from core.supervision.child_env import placed_env

    devices, models = pod
    result = place("t", models, devices)
    share = models["t"].vram_gb
    if result is None or share is None:
        return
    environ = {**placed_env(result.devices), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    totals = {d.index: int(d.budget_gb * GIB) for d in devices}  # here each budget is its GPU's total
    for cuda_index, placed_index in enumerate(result.devices):
        nvml = nvml_index(cuda_index, environ)
        assert nvml == placed_index
        fraction = vllm_utilization(share, totals[nvml])
        assert share / totals[nvml] * GIB - 1e-4 <= fraction <= share / totals[nvml] * GIB


# --- memory other processes hold (Device.others_gb, read by foreign_memory.py) ------------------

def crowded(index: int, others_gb: float, kind: str = "4090") -> Device:
    return Device(index, 24.0, kind, total_gb=24.0, reserve_gb=0.0, others_gb=others_gb)


def test_a_gpu_other_processes_crowd_is_avoided() -> None:
    pod = views(v("a", READY, 4, (0,)), v("new"))
    assert place("new", pod, TWO_4090) == Placement((0,), ())  # pack: beside a
    assert place("new", pod, [crowded(0, 12.0), crowded(1, 0.0)]) == Placement((1,), ())  # 8 GB left there


def test_room_is_made_beside_what_others_hold_and_without_room_the_claims_decide() -> None:
    pod = views(v("idle", READY, 8, (0,)), v("new", vram_gb=10))
    one = [Device(0, 24.0, "4090", total_gb=24.0, reserve_gb=1.0, others_gb=8.0)]  # 24 - 8 - 1 = 15 GB room
    assert place("new", pod, one) == Placement((0,), ("idle",))  # declared alone, 10 fits beside 8
    assert place("new", pod, [crowded(0, 20.0)]) == Placement((0,), ())  # no room even alone: as declared
    assert crowded(0, 20.0).within_room().budget_gb == 4.0 and crowded(0, 0.0).within_room() == crowded(0, 0.0)


@settings(max_examples=300, deadline=None)
@given(pods(), st.lists(st.sampled_from([0.0, 4.0, 16.0, 30.0]), min_size=4, max_size=4))
def test_others_memory_steers_but_never_refuses(pod: tuple[list[Device], dict[str, ModelView]],
                                                others: list[float]) -> None:
    """With others' memory: refused exactly where the declared claims refuse, and where any placement fits
    within what others leave, the one chosen does."""
    devices, models = pod
    seen = [Device(d.index, d.budget_gb, d.kind, total_gb=d.budget_gb, others_gb=others[d.index]) for d in devices]
    result = place("t", models, seen)
    assert (result is None) == (place("t", models, devices) is None)
    if result is None or place("t", models, [d.within_room() for d in seen]) is None:
        return
    used = used_gb(models, seen, {"t", *result.victims})
    for i in result.devices:
        room = seen[i].within_room().budget_gb
        assert used[i] + (room if models["t"].vram_gb is None else models["t"].vram_gb) <= room + 1e-9
