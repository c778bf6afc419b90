"""The KV page pool: free list, block tables, reference counts and the automatic prefix cache.

The device holds ``num_pages`` physical pages of ``page_size`` tokens each (per layer, per kv head); this
module only decides which page ids a request may write to. It imports no jax.

    page 0            the null page: never handed out; padded rows of a step write there
    pages 1..N-1      each in exactly one of three states:
                        in use     refcount > 0, listed in that many block tables
                        cached     refcount 0, content still valid, in the hash map (evictable, LRU)
                        free       refcount 0, not in the hash map

Prefix caching: once a page is full of computed tokens it is keyed by a hash chained over its tokens and the
hash of the page before it, so two requests whose first k pages hold equal tokens map to the same k pages.
The chain starts from the request's ``hash_root``: empty for the base model, the adapter's own key for a
LoRA request (K/V computed under one adapter are never served to another).
When a request ends, its cached pages keep their content and stay findable until a fresh page is needed and
they are evicted, least recently freed first.

Host tier (``host``, a ``HostKVTier``; ``kv_offloading_size``): an evicted cached page's K/V are first copied to
a host page under the same hash (queued in ``take_transfers``: the engine issues the copy before the step that
overwrites the page). A lookup that runs out of device pages goes on in the host tier; each host hit takes a
fresh device page, keyed at once, whose content the engine copies back before the step that reads it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jserve.engine.request import Request

if TYPE_CHECKING:
    from jserve.kv_offload.host_tier import HostKVTier


def hash_page(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained page key: equal tokens after a different prefix give a different key.

    A 128-bit digest rather than Python's ``hash``: a collision would silently serve another prompt's K/V, and
    Python's tuple hash can be collided on purpose by a client.
    """
    return hashlib.blake2b(parent_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


def default_num_pages(bytes_available: int, bytes_per_page: int, fraction: float = 0.9) -> int:
    """How many pages fit in ``fraction`` of ``bytes_available`` (counting the null page).

    Raises ValueError when not even the null page plus one usable page fit.
    """
    if bytes_per_page <= 0:
        raise ValueError(f"bytes_per_page must be > 0, got {bytes_per_page}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    num_pages = int(max(bytes_available, 0) * fraction) // bytes_per_page
    if num_pages < 2:
        raise ValueError(
            f"not enough memory for the KV cache: {bytes_available} bytes * {fraction} hold {num_pages} "
            f"pages of {bytes_per_page} bytes, need at least 2"
        )
    return num_pages


@dataclass
class PrefixHit:
    """A request's cached leading pages: on the device, then (continuing the chain) in the host tier."""

    device_pages: list[int] = field(default_factory=list)
    host_pages: list[int] = field(default_factory=list)  # (their hashes: the request's page hashes that follow)

    @property
    def num_pages(self) -> int:
        return len(self.device_pages) + len(self.host_pages)


class KVCacheManager:
    """Hands out page ids to requests and keeps the prefix cache. Owned by the engine thread."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_pages
        self._free: deque[int] = deque(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; oldest first
        self._hash_to_page: dict[bytes, int] = {}
        self._page_to_hash: dict[int, bytes] = {}
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading pages of a table already looked at for caching
        # Draft-model speculation: cached pages computed without the draft model (its K/V in them are stale);
        # a request whose prefix hit takes one cannot draft (Request.draft_synced)
        self._without_draft: set[int] = set()
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.host: HostKVTier | None = None  # the host tier, when kv_offloading_size is set
        self.host_active = True  # False where restoring a page was measured to cost more than recomputing it
        self.draft_kv = False  # draft-model speculation: the host tier holds no draft K/V (restored pages lack them)
        # (device page, host page, its reservation's generation) to copy before the next step
        self._offloads: list[tuple[int, int, int]] = []
        self._restores: list[tuple[int, int]] = []  # (host page, device page) to copy before the next step
        self._no_offload: set[int] = set()  # recompute preemption: pages the host tier does not take

    # ---- counters --------------------------------------------------------------------------------
    @property
    def pages_total(self) -> int:
        """Usable pages (the null page excluded)."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages that can be handed out now: free plus unreferenced cached (evictable) pages."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Unreferenced prefix-cache pages (a subset of num_free_pages), as docs/api.md's ``pages_cached``."""
        return len(self._evictable)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def block_table(self, request_id: str) -> list[int]:
        """The request's pages in token order (empty if it holds none). The live list: do not mutate."""
        return self._tables.get(request_id, [])

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ---- prefix cache ----------------------------------------------------------------------------
    def page_hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """Chained hashes of the request's first ``num_pages`` pages (which must be full), memoized on it."""
        hashes = request.page_hashes
        if len(hashes) < num_pages:
            tokens = request.all_token_ids
            assert num_pages * self.page_size <= len(tokens), "only full pages have a hash"
            parent = hashes[-1] if hashes else request.hash_root
            for i in range(len(hashes), num_pages):
                parent = hash_page(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
                hashes.append(parent)
        return hashes[:num_pages]

    def _uses_cache(self, request: Request) -> bool:
        # Prompt logprobs need logits at every prompt position, so such a request must compute them all.
        return self.enable_prefix_caching and request.sampling_params.prompt_logprobs is None

    def max_cached_pages(self, request: Request) -> int:
        """How many leading pages a cache hit may cover for this request right now.

        NOTE: never the whole sequence: at least the last token is recomputed so the step has logits for it.
        """
        if not self._uses_cache(request):
            return 0
        return (request.num_tokens - 1) // self.page_size

    def find_cached_prefix(self, request: Request) -> tuple[PrefixHit, int]:
        """The longest run of cached pages matching the request's leading tokens (device pages, then host
        pages), and the tokens they cover.

        A lookup: counters are updated by ``allocate`` when the hit is taken, so a request that is looked
        up on several steps before it is admitted counts once. (A host page whose checksum fails is dropped.)
        """
        hit = PrefixHit()
        hashes = self.page_hashes(request, self.max_cached_pages(request))
        for h in hashes:
            page = self._hash_to_page.get(h)
            if page is None:
                break
            hit.device_pages.append(page)
        if self.host is not None and self.host_active:
            for h in hashes[len(hit.device_pages) :]:
                # NOTE: a later page of the chain may still be keyed on the device (the device's chain has a
                # hole): keying a restored copy under that hash too would give one hash two pages.
                page = None if h in self._hash_to_page else self.host.lookup(h)
                if page is None:
                    break
                hit.host_pages.append(page)
        return hit, hit.num_pages * self.page_size

    def cache_computed_pages(self, request: Request) -> None:
        """Registers the pages now full of computed, known tokens (a pending token's page waits until the
        token arrives: hashes cover known tokens only); call whenever either count grows."""
        start = self._num_registered.get(request.request_id, 0)
        if not self.enable_prefix_caching or request.num_computed_tokens // self.page_size <= start:
            return  # (most calls: no page filled since the last)
        table = self._tables.get(request.request_id)
        if table is None:
            return
        known = request.num_tokens - request.num_pending_tokens
        num_full = min(min(request.num_computed_tokens, known) // self.page_size, len(table))
        if num_full <= start:
            return
        hashes = self.page_hashes(request, num_full)
        for i in range(start, num_full):
            page, h = table[i], hashes[i]
            # A page already keyed came from a hit; a key already taken means another request computed the
            # same tokens in the same step: keep the first copy, ours stays private and is freed normally.
            if page not in self._page_to_hash and h not in self._hash_to_page:
                self._hash_to_page[h] = page
                self._page_to_hash[page] = h
                if not request.draft_synced:
                    self._without_draft.add(page)
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached page (e.g. after new weights). False, changing nothing, while pages are used.

        Refusing while requests run (as vLLM does) keeps "a page in two tables was shared via the cache" true.
        """
        if self._tables:
            return False
        self._hash_to_page.clear()
        self._page_to_hash.clear()
        self._without_draft.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._offloads.clear()
        self._restores.clear()
        self._no_offload.clear()
        if self.host is not None:
            self.host.clear()
        return True

    @property
    def holds_pages(self) -> bool:
        """Some request holds pages (``reset_prefix_cache`` refuses then)."""
        return bool(self._tables)

    def take_transfers(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """The host tier's copies the next step depends on: (device page, host page, generation) offloads, which
        must read the pages before the step overwrites them, then (host page, device page) restores."""
        transfers = (self._offloads, self._restores)
        self._offloads, self._restores = [], []
        return transfers

    # ---- allocation ------------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached: PrefixHit | None = None) -> bool:
        """Grows the request's block table to cover ``num_computed_tokens + cached + num_new_tokens`` tokens.

        ``cached`` (from ``find_cached_prefix``, only on the first allocation after admission): its device
        pages are taken first with their refcount raised, then a fresh page per host page, keyed and queued
        to be restored. Returns False, changing nothing, if the pool cannot supply the pages.
        """
        rid = request.request_id
        table = self._tables.get(rid)
        if cached is None and table and len(table) * self.page_size >= request.num_computed_tokens + num_new_tokens:
            return True  # the common decode step: its pages already hold the new tokens
        cached = cached if cached is not None else PrefixHit()
        if cached.num_pages and table:
            raise ValueError("cached pages may only be passed on a request's first allocation")
        num_tokens = request.num_computed_tokens + cached.num_pages * self.page_size + num_new_tokens
        num_have = (len(table) if table else 0) + len(cached.device_pages)
        num_fresh = self.pages_needed(num_tokens) - num_have
        # Evictable cached pages we are about to reuse are not available as fresh pages.
        num_reused_evictable = sum(1 for p in cached.device_pages if self._refcount[p] == 0)
        if num_fresh > self.num_free_pages - num_reused_evictable:
            return False
        if table is None:
            table = self._tables[rid] = []
            if self._uses_cache(request):
                self.num_queried_tokens += request.num_tokens
                self.num_hit_tokens += cached.num_pages * self.page_size
        for page in cached.device_pages:
            if self._refcount[page] == 0:
                del self._evictable[page]
            self._refcount[page] += 1
            self._no_offload.discard(page)
            table.append(page)
            if page in self._without_draft:
                request.draft_synced = False  # the draft model's K/V of this prefix were never computed
        if cached.host_pages:
            self._take_host_pages(request, table, cached)
        if cached.num_pages:
            self._num_registered[rid] = cached.num_pages
        for _ in range(max(num_fresh - len(cached.host_pages), 0)):
            table.append(self._take_fresh_page())
        return True

    def _take_host_pages(self, request: Request, table: list[int], cached: PrefixHit) -> None:
        """A fresh device page per host hit, keyed by its hash now (later requests of this step hit it on the
        device) and queued to be restored before the step."""
        self.host.begin_restore(cached.host_pages)  # NOTE: before taking fresh pages, whose evictions feed the host
        self.host.counters.hit_tokens += len(cached.host_pages) * self.page_size
        hashes = self.page_hashes(request, cached.num_pages)[len(cached.device_pages) :]
        for host_page, h in zip(cached.host_pages, hashes, strict=True):
            page = self._take_fresh_page()
            self._hash_to_page[h] = page
            self._page_to_hash[page] = h
            self._restores.append((host_page, page))
            table.append(page)
            if self.draft_kv:
                self._without_draft.add(page)
                request.draft_synced = False

    def trim(self, request: Request, num_tokens: int) -> None:
        """Speculative decoding: gives back the pages past the first ``num_tokens`` tokens (rejected drafts' slots);
        they were taken fresh for this step's drafts, never cached."""
        table = self._tables.get(request.request_id)
        if not table:
            return
        keep = self.pages_needed(num_tokens)
        while len(table) > keep:
            self._release(table.pop())
        if self._num_registered.get(request.request_id, 0) > keep:
            self._num_registered[request.request_id] = keep

    def _release(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            if page in self._page_to_hash:
                self._evictable[page] = None
            else:
                self._free.append(page)

    def _take_fresh_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)  # least recently freed
            h = self._page_to_hash.pop(page)
            del self._hash_to_page[h]
            self._without_draft.discard(page)
            if self.host is not None and self.host_active and page not in self._no_offload:
                host_page = self.host.reserve(h)
                if host_page is not None:
                    self._offloads.append((page, host_page, self.host.generation(host_page)))
            self._no_offload.discard(page)
        self._refcount[page] = 1
        return page

    def free(self, request: Request, offload: bool = True) -> None:
        """Drops the request's references: unreferenced cached pages become evictable, others go free.
        ``offload=False`` (recompute preemption): the host tier does not take the pages it alone held."""
        table = self._tables.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if not table:
            return
        # Tail first, so a prefix's later pages are evicted before its first ones (a chain is only found from
        # its head, so evicting the head first would strand the rest).
        for page in reversed(table):
            self._release(page)
            if not offload and page in self._evictable:
                self._no_offload.add(page)

    # ---- debugging ------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent (tests; or a leak check when idle).

        NOTE: every usable page is in exactly one state (in use / cached-evictable / free), its refcount is
        the number of block tables holding it, and a page sits in two tables only if shared via the cache.
        """
        held: dict[int, int] = {}
        for request_id, table in self._tables.items():
            _require(len(set(table)) == len(table), f"{request_id} holds a page twice: {table}")
            for page in table:
                held[page] = held.get(page, 0) + 1
        _require(0 not in held and 0 not in self._free and 0 not in self._evictable, "null page handed out")
        for page in range(1, self.num_pages):
            refs = held.get(page, 0)
            _require(self._refcount[page] == refs, f"page {page}: refcount {self._refcount[page]} != {refs}")
            states = (refs > 0) + (page in self._free) + (page in self._evictable)
            keyed = page in self._page_to_hash
            _require(states == 1, f"page {page} is in {states} states")
            _require(refs <= 1 or keyed, f"page {page} shared but not cached")
            _require(page not in self._evictable or keyed, f"page {page} evictable but not keyed")
            _require(page not in self._free or not keyed, f"page {page} free but keyed")
        _require(len(self._free) == len(set(self._free)), "free list holds a page twice")
        inverse = {page: h for h, page in self._hash_to_page.items()}
        _require(inverse == self._page_to_hash, "hash map and page keys disagree")
        _require(self._without_draft <= self._page_to_hash.keys(), "a page without draft K/V is not cached")
        _require(self._no_offload <= self._evictable.keys(), "a page kept off the host tier is not evictable")
        if self.host is not None:
            self.host.check_invariants()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
