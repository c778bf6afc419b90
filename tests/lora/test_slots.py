"""The adapter tiers and slot admission, on the host alone (a fake loader; the scheduler with a real page pool)."""

from __future__ import annotations

import pytest

from jserve import LoRARequest, SamplingParams
from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import Request
from jserve.engine.scheduler import Scheduler, SchedulerConfig
from jserve.lora import slots as slots_module
from jserve.lora.peft_adapter import HostAdapter
from jserve.lora.slots import AdapterSlots


def _lora(i: int, path: str | None = None) -> LoRARequest:
    return LoRARequest(f"a{i}", i, path or f"/adapters/{i}")


class _Loader:
    def __init__(self):
        self.reads: list[int] = []

    def __call__(self, lora: LoRARequest) -> HostAdapter:
        if lora.lora_path == "/bad":
            raise ValueError("lora adapter 'bad': no adapter_config.json")
        self.reads.append(lora.lora_int_id)
        return HostAdapter(lora, {}, 8)


def _request(slots: AdapterSlots, rid: str, lora: LoRARequest | int | None, tokens: int = 4) -> Request:
    """A request as the engine admits it: its adapter registered and its host copy attached."""
    if isinstance(lora, int):
        lora = _lora(lora)
    request = Request(rid, list(range(1, tokens + 1)), SamplingParams(max_tokens=4), lora_request=lora)
    if lora is not None:
        request.lora_adapter = slots.register(lora)
    return request


def test_lru_idle_slot_is_reused_and_a_busy_one_never():
    slots = AdapterSlots(2, 3, _Loader())
    r1, r2, r3 = (_request(slots, str(i), i) for i in (1, 2, 3))
    assert slots.try_acquire(r1) and slots.try_acquire(r2)
    assert {r1.lora_slot, r2.lora_slot} == {1, 2}
    assert not slots.try_acquire(r3)  # both slots busy: waits
    slots.release(r1)
    assert slots.try_acquire(r3)
    assert r3.lora_slot == 1 and slots.counters.evictions == 1  # r1's idle slot, never r2's busy one
    assert [s for s, _ in slots.take_loads()] == [0, 1, 0]
    assert slots.counters.waits == 1 and slots.counters.wait_seconds >= 0


def test_a_resident_adapter_is_shared_and_not_reloaded():
    slots = AdapterSlots(1, 1, _Loader())
    a, b = _request(slots, "a", 7), _request(slots, "b", 7)
    assert slots.try_acquire(a) and slots.try_acquire(b)
    assert a.lora_slot == b.lora_slot == 1
    assert len(slots.take_loads()) == 1
    slots.release(a)
    slots.release(b)
    assert slots.try_acquire(_request(slots, "c", 7))
    assert slots.take_loads() == [] and slots.counters.loads == 1


def test_host_tier_is_lru_and_requests_keep_their_own_copy():
    loader = _Loader()
    slots = AdapterSlots(1, 2, loader)
    waiting = _request(slots, "w", 1)
    for i in (2, 3):
        slots.register(_lora(i))
    assert slots.num_on_host == 2 and loader.reads == [1, 2, 3]  # 1 left the host tier...
    assert slots.try_acquire(waiting)  # ...and is placed from the request's own copy: no disk read here
    assert loader.reads == [1, 2, 3] and slots.take_loads()[0][1] is waiting.lora_adapter
    slots.register(_lora(1))  # a new request of it reads it again, on its own thread
    assert loader.reads == [1, 2, 3, 1]


def test_register_refuses_a_bad_adapter_and_a_reused_id():
    slots = AdapterSlots(1, 1, _Loader())
    with pytest.raises(ValueError, match="no adapter_config.json"):
        slots.register(LoRARequest("bad", 1, "/bad"))
    slots.register(_lora(1))
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter 'a1'"):
        slots.register(LoRARequest("other", 1, "/elsewhere"))


def test_unload_frees_the_id_and_never_mixes_weights():
    """After forget(1), requests made before it run with the old weights, a new adapter under id 1 gets its
    own slot, and a slot freed by the unload is reused first."""
    slots = AdapterSlots(2, 2, _Loader())
    old_running, old_waiting = _request(slots, "r", 1), _request(slots, "w", 1)
    assert slots.try_acquire(old_running)
    slots.forget(1)
    new = _request(slots, "n", _lora(1, "/adapters/new"))
    assert slots.try_acquire(new) and new.lora_slot != old_running.lora_slot
    assert slots.try_acquire(old_waiting) is False  # its (old) adapter is no longer resident; no slot idle
    freed = old_running.lora_slot
    slots.release(old_running)
    assert slots.try_acquire(old_waiting) and old_waiting.lora_slot == freed
    loads = slots.take_loads()
    assert [a.request.lora_path for _, a in loads] == ["/adapters/1", "/adapters/new", "/adapters/1"]


def test_a_failed_write_leaves_the_slot_unclaimed():
    slots = AdapterSlots(1, 1, _Loader())
    r = _request(slots, "r", 1)
    assert slots.try_acquire(r)
    ((slot, _),) = slots.take_loads()
    slots.unwritten(slot)
    slots.release(r)
    assert slots.try_acquire(_request(slots, "again", 1))
    assert len(slots.take_loads()) == 1  # loaded again, not taken for resident


def _scheduler(num_slots: int) -> Scheduler:
    kv = KVCacheManager(num_pages=64, page_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32), kv)
    scheduler.adapters = AdapterSlots(num_slots, 4, _Loader())
    return scheduler


def test_scheduler_lets_others_pass_a_request_waiting_for_a_slot():
    """One slot held by a running request of adapter 1: a waiting request of adapter 2 waits, while the base
    request and another of adapter 1 behind it are admitted; once adapter 1's requests finish, 2 runs."""
    scheduler = _scheduler(1)
    adapters = scheduler.adapters
    reqs = [_request(adapters, rid, lora) for rid, lora in (("first", 1), ("blocked", 2), ("base", None), ("same", 1))]
    for r in reqs:
        scheduler.add_request(r)
    out = scheduler.schedule()
    assert [c.request_id for c in out.chunks] == ["first", "base", "same"]
    assert reqs[1].lora_wait_since is not None
    for rid in ("first", "same"):
        scheduler.finish_request(rid, "abort")
    out = scheduler.schedule()
    assert "blocked" in [c.request_id for c in out.chunks]
    assert reqs[1].lora_slot == 1 and adapters.counters.evictions == 1
    for rid in ("blocked", "base"):
        scheduler.finish_request(rid, "abort")
    assert adapters._users == [0]
    scheduler.kv_cache.check_invariants()


def test_a_request_parked_too_long_stops_others_from_taking_slots(monkeypatch):
    """Steady traffic on a resident adapter would keep its slot busy forever; once a request has waited
    MAX_SLOT_WAIT, new requests of resident adapters wait behind it (base requests still run)."""
    scheduler = _scheduler(1)
    adapters = scheduler.adapters
    scheduler.add_request(_request(adapters, "busy", 1))
    scheduler.schedule()
    parked = _request(adapters, "parked", 2)
    scheduler.add_request(parked)
    scheduler.schedule()
    assert parked.lora_wait_since is not None
    monkeypatch.setattr(slots_module, "MAX_SLOT_WAIT", -1.0)  # as if it had waited long
    for rid, lora in (("more", 1), ("base", None)):
        scheduler.add_request(_request(adapters, rid, lora))
    out = scheduler.schedule()
    assert [c.request_id for c in out.chunks if c.request_id in ("more", "base")] == ["base"]
    scheduler.finish_request("busy", "abort")
    out = scheduler.schedule()
    assert "parked" in [c.request_id for c in out.chunks]
