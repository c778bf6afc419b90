"""The adapter tiers and slot admission, on the host alone (a fake loader; the scheduler with a real page pool)."""

from __future__ import annotations

import pytest

from jserve import LoRARequest, SamplingParams
from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import Request
from jserve.engine.scheduler import Scheduler, SchedulerConfig
from jserve.lora.peft_adapter import HostAdapter
from jserve.lora.slots import AdapterSlots


def _lora(i: int) -> LoRARequest:
    return LoRARequest(f"a{i}", i, f"/adapters/{i}")


class _Loader:
    def __init__(self):
        self.reads: list[int] = []

    def __call__(self, lora: LoRARequest) -> HostAdapter:
        if lora.lora_path == "/bad":
            raise ValueError("lora adapter 'bad': no adapter_config.json")
        self.reads.append(lora.lora_int_id)
        return HostAdapter(lora, {}, 8)


def _request(rid: str, lora_id: int | None, tokens: int = 4) -> Request:
    lora = None if lora_id is None else _lora(lora_id)
    return Request(rid, list(range(1, tokens + 1)), SamplingParams(max_tokens=4), lora_request=lora)


def test_lru_idle_slot_is_reused_and_a_busy_one_never():
    loader = _Loader()
    slots = AdapterSlots(2, 2, loader)
    r1, r2, r3 = _request("1", 1), _request("2", 2), _request("3", 3)
    for r in (r1, r2, r3):
        slots.register(r.lora_request)
    slots.acquire(r1)
    slots.acquire(r2)
    assert {r1.lora_slot, r2.lora_slot} == {1, 2}
    assert not slots.can_run(r3)  # both slots busy: waits
    slots.release(r1)
    assert slots.can_run(r3)
    slots.acquire(r3)
    assert r3.lora_slot == 1 and slots.counters.evictions == 1  # r1's idle slot, never r2's busy one
    assert [s for s, _ in slots.take_loads()] == [0, 1, 0]
    assert slots.counters.waits == 1 and slots.counters.wait_seconds >= 0


def test_a_resident_adapter_is_shared_and_not_reloaded():
    slots = AdapterSlots(1, 1, _Loader())
    a, b = _request("a", 7), _request("b", 7)
    slots.register(a.lora_request)
    slots.acquire(a)
    slots.acquire(b)
    assert a.lora_slot == b.lora_slot == 1
    assert len(slots.take_loads()) == 1
    slots.release(a)
    slots.release(b)
    slots.acquire(_request("c", 7))
    assert slots.take_loads() == [] and slots.counters.loads == 1


def test_host_tier_is_lru_and_an_evicted_adapter_is_read_again():
    loader = _Loader()
    slots = AdapterSlots(1, 2, loader)
    for i in (1, 2, 3):
        slots.register(_lora(i))
    assert slots.num_on_host == 2 and loader.reads == [1, 2, 3]
    slots.acquire(_request("r", 1))  # 1 left the host tier: read again when placed
    assert loader.reads == [1, 2, 3, 1]


def test_register_refuses_a_bad_adapter_and_a_reused_id():
    slots = AdapterSlots(1, 1, _Loader())
    with pytest.raises(ValueError, match="no adapter_config.json"):
        slots.register(LoRARequest("bad", 1, "/bad"))
    slots.register(_lora(1))
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter 'a1'"):
        slots.register(LoRARequest("other", 1, "/elsewhere"))


def test_scheduler_lets_others_pass_a_request_waiting_for_a_slot():
    """One slot held by a running request of adapter 1: a waiting request of adapter 2 waits, while the base
    request and another of adapter 1 behind it are admitted; once adapter 1's requests finish, 2 runs."""
    kv = KVCacheManager(num_pages=64, page_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32), kv)
    scheduler.adapters = AdapterSlots(1, 4, _Loader())
    first, blocked, base, same = (
        _request("first", 1),
        _request("blocked", 2),
        _request("base", None),
        _request("same", 1),
    )
    for r in (first, blocked, base, same):
        if r.lora_request is not None:
            scheduler.adapters.register(r.lora_request)
        scheduler.add_request(r)
    out = scheduler.schedule()
    assert [c.request_id for c in out.chunks] == ["first", "base", "same"]
    assert blocked.lora_wait_since is not None
    for rid in ("first", "same"):
        scheduler.finish_request(rid, "abort")
    out = scheduler.schedule()
    assert [c.request_id for c in out.chunks if c.request_id == "blocked"] == ["blocked"]
    assert blocked.lora_slot == 1 and scheduler.adapters.counters.evictions == 1
    scheduler.finish_request("blocked", "abort")
    scheduler.finish_request("base", "abort")
    assert scheduler.adapters._users == [0]
    kv.check_invariants()
