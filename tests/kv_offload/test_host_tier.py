"""The host tier's bookkeeping with the page pool (no jax): what is copied where and when, and that a page's
content survives eviction to the host and restoration, checked against a simulated device."""

from __future__ import annotations

import logging
import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import Request
from jserve.kv_offload.host_tier import BufferLayout, HostKVTier
from jserve.kv_offload.policy import CopyCosts, decide
from jserve.sampling_params import SamplingParams

PAGE = 4
LAYOUT = [BufferLayout((2,), np.dtype(np.int64))]  # a host row: (hash digest as int, a second word)


class SimulatedDevice:
    """Device pages holding a fingerprint of the tokens computed into them, and the engine's flush: the
    offloads read pages before the restores (and the next step) overwrite them."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.pages = np.zeros((kv.num_pages, 2), np.int64)

    def flush(self) -> None:
        offloads, restores = self.kv.take_transfers()
        host = self.kv.host
        if offloads:
            rows = self.pages[[d for d, _, _ in offloads]]
            host.store([h for _, h, _ in offloads], [g for _, _, g in offloads], [rows])
        if restores:
            rows = host.pools[0][[h for h, _ in restores]]
            self.pages[[d for _, d in restores]] = rows
            host.end_restore([h for h, _ in restores])

    def compute(self, request: Request) -> None:
        """The step: every page of the request gets its tokens' fingerprint; then the pages are registered."""
        table = self.kv.block_table(request.request_id)
        for i, page in enumerate(table):
            self.pages[page] = fingerprint(request.all_token_ids[: (i + 1) * PAGE])
        request.num_computed_tokens = request.num_tokens
        self.kv.cache_computed_pages(request)

    def check(self, request: Request) -> None:
        for i, page in enumerate(self.kv.block_table(request.request_id)):
            expected = fingerprint(request.all_token_ids[: (i + 1) * PAGE])
            assert tuple(self.pages[page]) == expected, f"page {i} of {request.request_id} holds the wrong K/V"


def fingerprint(tokens: list[int]) -> tuple[int, int]:
    return hash(tuple(tokens)) & 0x7FFFFFFFFFFF, len(tokens)


def make_kv(num_pages: int, host_pages: int) -> KVCacheManager:
    kv = KVCacheManager(num_pages=num_pages, page_size=PAGE)
    kv.host = HostKVTier(host_pages, LAYOUT)
    return kv


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=1), arrival_time=0.0)


def admit(kv: KVCacheManager, device: SimulatedDevice, request: Request) -> int:
    """Lookup, allocate, flush, check the cached pages' content, compute the rest; returns tokens hit."""
    hit, num_cached = kv.find_cached_prefix(request)
    assert kv.allocate(request, request.num_tokens - num_cached, hit)
    request.num_computed_tokens = num_cached
    device.flush()
    for i, page in enumerate(kv.block_table(request.request_id)[: hit.num_pages]):
        assert tuple(device.pages[page]) == fingerprint(request.all_token_ids[: (i + 1) * PAGE])
    device.compute(request)
    kv.check_invariants()
    return num_cached


def run_and_free_two(kv: KVCacheManager, device: SimulatedDevice) -> None:
    """Requests "a" (tokens 0..12) then "b" (100..112), each freed: on a 4-page pool b evicts a's pages."""
    for rid, base in (("a", 0), ("b", 100)):
        request = make_request(rid, [base + t for t in range(13)])
        admit(kv, device, request)
        kv.free(request)


def test_evicted_pages_go_to_the_host_and_come_back():
    kv = make_kv(num_pages=5, host_pages=8)  # 4 usable device pages
    device = SimulatedDevice(kv)
    a = make_request("a", list(range(13)))  # 3 full pages + 1 token
    admit(kv, device, a)
    kv.free(a)
    b = make_request("b", [100 + t for t in range(13)])  # needs all 4 pages: a's 3 cached pages are evicted
    admit(kv, device, b)
    assert kv.host.num_used_pages == 3 and kv.host.counters.pages_evicted == 0
    kv.free(b)
    again = make_request("a2", list(range(13)))
    hit, num_cached = kv.find_cached_prefix(again)
    assert num_cached == 12 and not hit.device_pages and len(hit.host_pages) == 3
    assert admit(kv, device, again) == 12
    assert kv.host.counters.hit_tokens == 12
    assert kv.num_hit_tokens == 12 and kv.host.num_used_pages == 6  # b's pages went to the host in turn


def test_device_hits_come_first_and_the_host_continues_the_chain():
    kv = make_kv(num_pages=6, host_pages=8)
    device = SimulatedDevice(kv)
    a = make_request("a", list(range(17)))  # 4 full pages
    admit(kv, device, a)
    kv.free(a)  # tail first: its last pages are the oldest evictable
    filler = make_request("f", [500] * 12)  # 3 pages: a's partial page, then its cached pages 4 and 3
    admit(kv, device, filler)
    hit, num_cached = kv.find_cached_prefix(make_request("a2", list(range(17))))
    assert len(hit.device_pages) == 2 and len(hit.host_pages) == 2 and num_cached == 16


def test_host_lru_drops_the_oldest_and_never_a_page_being_restored():
    host = HostKVTier(2, LAYOUT)
    first, second = host.reserve(b"1"), host.reserve(b"2")
    host.begin_restore([first])
    third = host.reserve(b"3")  # the tier is full: the oldest evictable (b"2") goes, not b"1"
    assert third == second and b"1" in host and b"2" not in host
    host.begin_restore([third])
    assert host.reserve(b"4") is None  # nothing evictable: the copy is skipped, nothing lost
    host.end_restore([first, third])
    host.check_invariants()
    assert host.reserve(b"1") is None  # already here: only touched


def test_a_late_copy_does_not_land_in_a_page_reserved_again():
    host = HostKVTier(1, LAYOUT)
    page = host.reserve(b"old")
    generation = host.generation(page)
    assert host.reserve(b"new") == page  # b"old" evicted before its data arrived
    host.store([page], [generation], [np.array([[1, 1]])])
    assert host.is_incoming(page)  # still waiting for b"new"'s data
    host.store([page], [host.generation(page)], [np.array([[2, 2]])])
    assert host.lookup(b"new") == page and tuple(host.pools[0][page]) == (2, 2)


def test_a_corrupted_host_page_is_dropped_and_recomputed(caplog):
    kv = make_kv(num_pages=5, host_pages=8)
    device = SimulatedDevice(kv)
    a = make_request("a", list(range(13)))
    admit(kv, device, a)
    kv.free(a)
    admit(kv, device, make_request("b", [100 + t for t in range(13)]))
    second_page_hash = a.page_hashes[1]
    assert kv.host.corrupt(second_page_hash)
    with caplog.at_level(logging.ERROR):
        hit, num_cached = kv.find_cached_prefix(make_request("a2", list(range(13))))
    assert num_cached == 4 and len(hit.host_pages) == 1  # the chain stops at the corrupted page
    assert kv.host.counters.pages_corrupted == 1 and "checksum" in caplog.text
    assert second_page_hash not in kv.host
    kv.check_invariants()


def test_recompute_preemption_keeps_pages_off_the_host():
    kv = make_kv(num_pages=5, host_pages=8)
    device = SimulatedDevice(kv)
    a = make_request("a", list(range(13)))
    admit(kv, device, a)
    kv.free(a, offload=False)
    admit(kv, device, make_request("b", [100 + t for t in range(13)]))
    assert kv.host.num_used_pages == 0 and kv.find_cached_prefix(make_request("a2", list(range(13))))[1] == 0


def test_restored_pages_carry_no_draft_model_kv():
    kv = make_kv(num_pages=5, host_pages=8)
    kv.draft_kv = True
    device = SimulatedDevice(kv)
    run_and_free_two(kv, device)
    again = make_request("a2", list(range(13)))
    admit(kv, device, again)
    assert not again.draft_synced


def test_a_tier_that_would_lose_stays_off(caplog):
    """Where restoring a page costs more than recomputing it, the engine turns the tier off: evictions are not
    copied and lookups stop at the device."""
    with caplog.at_level(logging.WARNING):
        assert not decide(CopyCosts(restore_per_page=2e-3, recompute_per_page=1e-3, offload_per_page=1e-4))
    assert "host KV tier off" in caplog.text
    assert decide(CopyCosts(restore_per_page=1e-4, recompute_per_page=1e-3, offload_per_page=1e-4))
    kv = make_kv(num_pages=5, host_pages=8)
    kv.host_active = False
    device = SimulatedDevice(kv)
    run_and_free_two(kv, device)
    assert kv.host.num_used_pages == 0 and kv.take_transfers() == ([], [])


def test_reset_forgets_both_tiers():
    kv = make_kv(num_pages=5, host_pages=8)
    device = SimulatedDevice(kv)
    run_and_free_two(kv, device)
    assert kv.host.num_used_pages > 0 and kv.reset_prefix_cache()
    assert kv.host.num_used_pages == 0 and kv.take_transfers() == ([], [])
    kv.check_invariants()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 30), st.booleans(), st.booleans()), min_size=1, max_size=40),
    st.integers(1, 12),
)
def test_content_survives_any_sequence_of_evictions_and_restores(ops, host_pages):
    """Requests from 6 conversations (shared heads, varied lengths; some with prompt logprobs, which compute
    every token and leave private copies of cached pages) admitted and freed in random order, with at most 2
    running: every page a request is handed holds its tokens' content, whichever tier it came from, and the
    bookkeeping stays consistent."""
    kv = make_kv(num_pages=12, host_pages=host_pages)
    device = SimulatedDevice(kv)
    running: list[Request] = []
    for n, (conversation, length, finish_oldest, scores) in enumerate(ops):
        if finish_oldest and running or len(running) == 2:
            kv.free(running.pop(0))
            kv.check_invariants()
        tokens = [conversation % 3] * 8 + [conversation * 1000 + t for t in range(length)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=1 if scores else None)
        request = Request(f"r{n}", tokens, params, arrival_time=0.0)
        hit, num_cached = kv.find_cached_prefix(request)
        if not kv.allocate(request, request.num_tokens - num_cached, hit):
            continue
        request.num_computed_tokens = num_cached
        device.flush()
        for i, page in enumerate(kv.block_table(request.request_id)[: hit.num_pages]):
            assert tuple(device.pages[page]) == fingerprint(tokens[: (i + 1) * PAGE])
        device.compute(request)
        device.check(request)
        running.append(request)
        kv.check_invariants()


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_resident_memory_stays_within_the_tier():
    """256 MiB of pages pass through a 16 MiB tier: the process grows by the tier, not by what passed."""
    mib = 2**20
    host = HostKVTier(16, [BufferLayout((mib // 4,), np.dtype(np.float32))])
    row = np.ones((1, mib // 4), np.float32)
    before = _rss_bytes()
    for i in range(256):
        page = host.reserve(i.to_bytes(8, "little"))
        host.store([page], [host.generation(page)], [row * i])
        assert host.lookup(i.to_bytes(8, "little")) == page
    grown = _rss_bytes() - before
    assert host.counters.pages_evicted == 240 and host.num_used_pages == 16
    assert grown < 16 * mib + 24 * mib, grown


def test_a_hash_still_on_the_device_is_not_restored_a_second_time():
    """The device's chain can have a hole (its head evicted, later pages kept by a request that computed them
    privately): the host lookup stops there rather than key a second device page under a live hash."""
    kv = make_kv(num_pages=9, host_pages=16)  # 8 usable device pages
    device = SimulatedDevice(kv)
    tokens = list(range(13))  # pages h0 h1 h2 + 1 token
    x = make_request("x", tokens)
    admit(kv, device, x)
    kv.free(x)
    filler = make_request("f", [900 + t for t in range(29)])  # 8 pages: every cached page of x to the host
    admit(kv, device, filler)
    kv.free(filler)
    head = make_request("a", tokens[:5])  # restores h0 only
    admit(kv, device, head)
    scorer = Request("p", tokens, SamplingParams(max_tokens=1, prompt_logprobs=1), arrival_time=0.0)
    assert kv.allocate(scorer, len(tokens))  # computes everything: h0 stays the head's, h1 and h2 are its own
    device.compute(scorer)
    kv.free(head)
    kv.free(scorer)
    assert kv.host.counters.pages_restored == 0  # (the simulated flush does not count)
    h0, h1 = x.page_hashes[0], x.page_hashes[1]
    assert h1 in kv._hash_to_page
    evict = make_request("e", [700 + t for t in range(13)])  # takes free pages first, then the oldest: h0's
    while h0 in kv._hash_to_page:
        assert kv.allocate(evict, 4) if kv.block_table("e") else kv.allocate(evict, 12)
        evict.num_computed_tokens = len(kv.block_table("e")) * PAGE
        device.flush()
    kv.free(evict)
    again = make_request("r", tokens)
    hit, num_cached = kv.find_cached_prefix(again)
    assert hit.device_pages == [] and len(hit.host_pages) == 1  # h0 from the host; h1 is the device's
    admit(kv, device, again)
    kv.check_invariants()


def test_copies_that_never_arrive_leave_nothing_trusted():
    host = HostKVTier(4, LAYOUT)
    page = host.reserve(b"lost")
    host.drop_incoming([page], [host.generation(page)])
    assert b"lost" not in host and host.num_used_pages == 0
    host.check_invariants()


def test_restored_chains_drop_their_tail_first():
    host = HostKVTier(3, LAYOUT)
    pages = [host.reserve(h) for h in (b"head", b"mid", b"tail")]
    host.store(pages, [host.generation(p) for p in pages], [np.zeros((3, 2), np.int64)])
    host.begin_restore(pages)
    host.end_restore(pages)
    host.reserve(b"new")  # full: the least recent goes
    assert b"tail" not in host and b"head" in host and b"mid" in host
