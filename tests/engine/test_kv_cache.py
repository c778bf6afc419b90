"""KVCacheManager: allocation, freeing, reference counts, LRU eviction and the chained prefix-cache keys."""

from __future__ import annotations

import pytest

from jserve.engine.kv_cache import KVCacheManager, PrefixHit, default_num_pages, hash_page
from jserve.engine.request import Request
from jserve.sampling_params import SamplingParams

PAGE = 4


def make_request(request_id: str, tokens: list[int], **params) -> Request:
    return Request(request_id, tokens, SamplingParams(**params), arrival_time=0.0)


def compute(kv: KVCacheManager, request: Request, num_tokens: int | None = None) -> None:
    """Pretends the runner computed the request's tokens (all of them unless num_tokens is given)."""
    request.num_computed_tokens = request.num_tokens if num_tokens is None else num_tokens
    kv.cache_computed_pages(request)


def admit(kv: KVCacheManager, request: Request) -> tuple[list[int], int]:
    """What the scheduler does on admission: take the cached prefix, allocate the rest, compute it all."""
    hit, num_cached = kv.find_cached_prefix(request)
    pages = hit.device_pages
    assert kv.allocate(request, request.num_tokens - num_cached, hit)
    request.num_computed_tokens = num_cached
    compute(kv, request)
    return pages, num_cached


def check_consistent(kv: KVCacheManager) -> None:
    kv.check_invariants()
    assert kv.num_free_pages == len(kv._free) + len(kv._evictable)


def test_allocate_grows_block_table_and_free_returns_pages():
    kv = KVCacheManager(num_pages=8, page_size=PAGE, enable_prefix_caching=False)
    assert kv.pages_total == 7 and kv.num_free_pages == 7
    r = make_request("a", list(range(10)))
    assert kv.allocate(r, 10)
    assert len(kv.block_table("a")) == 3 and 0 not in kv.block_table("a")
    r.num_computed_tokens = 10
    assert kv.allocate(r, 2)  # 12 tokens still fit in 3 pages
    assert len(kv.block_table("a")) == 3
    assert kv.allocate(r, 3)  # 13 tokens -> a 4th page
    assert len(kv.block_table("a")) == 4
    assert kv.num_free_pages == 3
    check_consistent(kv)
    kv.free(r)
    assert kv.block_table("a") == [] and kv.num_free_pages == 7 and kv.num_cached_pages == 0
    check_consistent(kv)


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(num_pages=4, page_size=PAGE)
    a, b = make_request("a", [1] * 8), make_request("b", [2] * 8)
    assert kv.allocate(a, 8)
    before = (list(kv._free), dict(kv._tables))
    assert not kv.allocate(b, 8)  # needs 2, 1 left
    assert (list(kv._free), dict(kv._tables)) == before and kv.block_table("b") == []
    assert kv.allocate(b, 4)
    check_consistent(kv)


def test_null_page_is_never_handed_out():
    kv = KVCacheManager(num_pages=5, page_size=1)
    r = make_request("a", list(range(4)))
    assert kv.allocate(r, 4)
    assert sorted(kv.block_table("a")) == [1, 2, 3, 4]
    assert not kv.allocate(make_request("b", [0]), 1)


def test_prefix_hit_shares_pages_and_refcounts():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = make_request("a", list(range(10)))  # 2 full pages + 2 tokens
    admit(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hit, num_cached = kv.find_cached_prefix(b)
    pages = hit.device_pages
    assert pages == kv.block_table("a")[:2] and num_cached == 8
    assert kv.allocate(b, b.num_tokens - num_cached, hit)
    assert kv.block_table("b")[:2] == pages and len(kv.block_table("b")) == 3
    assert all(kv._refcount[p] == 2 for p in pages)
    assert kv.num_queried_tokens == 10 + 11 and kv.num_hit_tokens == 8
    assert kv.prefix_cache_hit_rate == pytest.approx(8 / 21)
    check_consistent(kv)
    kv.free(a)
    assert all(kv._refcount[p] == 1 for p in pages)
    kv.free(b)
    check_consistent(kv)
    assert kv.num_free_pages == kv.pages_total
    assert kv.num_cached_pages == 2  # the two full pages stay findable; partial pages are just free


def test_prefix_hit_never_covers_whole_sequence():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = make_request("a", list(range(8)))
    admit(kv, a)
    kv.free(a)
    same = make_request("b", list(range(8)))  # all 8 tokens cached, but the last must be recomputed
    hit, num_cached = kv.find_cached_prefix(same)
    pages = hit.device_pages
    assert len(pages) == 1 and num_cached == 4
    longer = make_request("c", list(range(9)))
    assert kv.find_cached_prefix(longer)[1] == 8


def test_hash_is_chained_over_the_prefix():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0])
    admit(kv, a)
    b = make_request("b", [2, 2, 2, 2, 5, 6, 7, 8, 0])  # same second page after a different first page
    assert kv.find_cached_prefix(b)[1] == 0
    assert hash_page(b"", [5, 6, 7, 8]) != kv.page_hashes(a, 2)[1]
    assert kv.page_hashes(a, 2)[1] == hash_page(hash_page(b"", [1, 1, 1, 1]), [5, 6, 7, 8])


def test_prefix_cache_off_and_prompt_logprobs_get_no_hits():
    kv = KVCacheManager(num_pages=16, page_size=PAGE, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(9))))
    assert kv.find_cached_prefix(make_request("b", list(range(9))))[1] == 0
    assert kv._hash_to_page == {} and kv.prefix_cache_hit_rate == 0.0

    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    admit(kv, make_request("a", list(range(9))))
    assert kv.find_cached_prefix(make_request("b", list(range(9)), prompt_logprobs=1))[1] == 0


def test_only_computed_full_pages_are_cached():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = make_request("a", list(range(12)))
    assert kv.allocate(a, 12)
    compute(kv, a, 7)  # one full page computed, the second half done
    assert len(kv._hash_to_page) == 1
    probe = make_request("p", list(range(12)))
    assert kv.find_cached_prefix(probe)[1] == 4
    compute(kv, a, 12)
    assert len(kv._hash_to_page) == 3
    assert kv.find_cached_prefix(probe)[1] == 8  # capped below the full 12


def test_output_tokens_are_cached_too():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = make_request("a", [1, 2, 3])
    assert kv.allocate(a, 3)
    compute(kv, a)
    a.append_output_token(4)
    assert kv.allocate(a, 1)
    compute(kv, a)
    assert len(kv._hash_to_page) == 1
    assert kv.find_cached_prefix(make_request("b", [1, 2, 3, 4, 5]))[1] == 4


def test_lru_eviction_order():
    kv = KVCacheManager(num_pages=7, page_size=PAGE)  # 6 usable pages
    a = make_request("a", [1] * 8 + [0])  # pages a0 a1 + partial
    b = make_request("b", [2] * 8 + [0])
    admit(kv, a)
    admit(kv, b)
    a_pages, b_pages = kv.block_table("a")[:2], kv.block_table("b")[:2]
    kv.free(a)  # a's full pages become evictable first (tail first), then b's
    kv.free(b)
    assert list(kv._evictable) == [a_pages[1], a_pages[0], b_pages[1], b_pages[0]]
    assert kv.num_cached_pages == 4 and kv.num_free_pages == 6
    c = make_request("c", [3] * 12)
    assert kv.allocate(c, 12)  # 2 free pages, then evicts a's tail page
    assert a_pages[1] in kv.block_table("c") and a_pages[0] not in kv.block_table("c")
    probe_a = make_request("pa", [1] * 8 + [0])
    assert kv.find_cached_prefix(probe_a)[1] == 4  # a's head still cached
    assert kv.find_cached_prefix(make_request("pb", [2] * 8 + [0]))[1] == 8
    check_consistent(kv)


def test_a_hit_on_pages_computed_without_the_draft_model_stops_drafting():
    """Draft-model speculation: pages a request computed while the draft model did not run (draft_synced
    False) hold stale draft K/V; a request whose prefix hit takes one of them must not draft, while hits on
    pages computed with the draft model keep drafting. A page reused after eviction starts clean."""
    kv = KVCacheManager(num_pages=7, page_size=PAGE)  # 6 usable pages
    synced = make_request("synced", [1] * 8 + [0])
    stale = make_request("stale", [2] * 8 + [0])
    stale.draft_synced = False
    admit(kv, synced)
    admit(kv, stale)
    stale_pages = set(kv.block_table("stale")[:2])
    kv.free(synced)
    kv.free(stale)
    from_synced = make_request("from-synced", [1] * 8 + [5, 6])
    from_stale = make_request("from-stale", [2] * 4 + [7, 7, 7, 7, 7])  # hits stale's first page only
    assert admit(kv, from_synced)[1] == 8 and admit(kv, from_stale)[1] == 4
    assert from_synced.draft_synced and not from_stale.draft_synced
    check_consistent(kv)
    kv.free(from_synced)
    kv.free(from_stale)
    fresh = make_request("fresh", [3] * 20)
    assert kv.allocate(fresh, 20)  # every usable page but one: evicts the cached pages, stale's among them
    assert stale_pages & set(kv.block_table("fresh")[:3])
    compute(kv, fresh)
    later = make_request("later", [3] * 12 + [4])
    assert admit(kv, later)[1] == 12 and later.draft_synced
    check_consistent(kv)


def test_hit_takes_page_out_of_the_evictable_lru():
    kv = KVCacheManager(num_pages=4, page_size=PAGE)  # 3 usable pages
    a = make_request("a", [1] * 4 + [0])
    admit(kv, a)
    kv.free(a)
    b = make_request("b", [1] * 4 + [7, 7, 7, 7, 7])
    hit, num_cached = kv.find_cached_prefix(b)
    pages = hit.device_pages
    assert num_cached == 4
    # 3 pages in all: the cached one plus 2 fresh; the cached page must not also be evicted as "fresh"
    assert kv.allocate(b, b.num_tokens - num_cached, hit)
    assert kv.block_table("b")[0] == pages[0] and len(set(kv.block_table("b"))) == 3
    check_consistent(kv)
    c = make_request("c", [1] * 4 + [0] * 9)
    hit, num_cached = kv.find_cached_prefix(c)
    pages = hit.device_pages
    kv.free(b)
    assert not kv.allocate(c, c.num_tokens - num_cached, hit)  # 4 pages > 3 usable
    check_consistent(kv)


def test_same_prefix_computed_twice_in_one_step_keeps_first_copy():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a, b = make_request("a", [5] * 9), make_request("b", [5] * 9)
    assert kv.allocate(a, 9) and kv.allocate(b, 9)
    compute(kv, a)
    compute(kv, b)
    assert len(kv._hash_to_page) == 2
    assert set(kv._page_to_hash) == set(kv.block_table("a")[:2])
    check_consistent(kv)
    kv.free(a)
    kv.free(b)
    check_consistent(kv)
    assert kv.num_free_pages == kv.pages_total and kv.num_cached_pages == 2


def test_reset_prefix_cache():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a, b = make_request("a", [5] * 9), make_request("b", [6] * 9)
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    assert not kv.reset_prefix_cache()  # b still holds pages
    assert kv.num_cached_pages == 2
    kv.free(b)
    assert kv.reset_prefix_cache()
    check_consistent(kv)
    assert kv.num_cached_pages == 0 and kv.num_free_pages == kv.pages_total
    assert kv.find_cached_prefix(make_request("p", [5] * 9))[1] == 0


def test_cached_pages_only_on_first_allocation():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = make_request("a", [5] * 9)
    admit(kv, a)
    b = make_request("b", [5] * 9)
    assert kv.allocate(b, 1)
    with pytest.raises(ValueError, match="cached pages"):
        kv.allocate(b, 1, PrefixHit(device_pages=kv.block_table("a")[:1]))


def test_check_invariants_catches_corruption():
    kv = KVCacheManager(num_pages=8, page_size=PAGE)
    a = make_request("a", [5] * 9)
    admit(kv, a)
    kv.check_invariants()
    kv._refcount[kv.block_table("a")[0]] += 1
    with pytest.raises(AssertionError, match="refcount"):
        kv.check_invariants()
    kv._refcount[kv.block_table("a")[0]] -= 1
    kv._free.append(kv.block_table("a")[2])
    with pytest.raises(AssertionError, match="states"):
        kv.check_invariants()


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_pages"):
        KVCacheManager(num_pages=1, page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        KVCacheManager(num_pages=4, page_size=0)


def test_default_num_pages():
    assert default_num_pages(1000, 10) == 90
    assert default_num_pages(1000, 10, fraction=0.5) == 50
    assert default_num_pages(1 << 30, 1 << 20, fraction=1.0) == 1024
    with pytest.raises(ValueError, match="not enough memory"):
        default_num_pages(15, 10)
    with pytest.raises(ValueError, match="bytes_per_page"):
        default_num_pages(100, 0)
    with pytest.raises(ValueError, match="fraction"):
        default_num_pages(100, 10, fraction=0.0)
