"""The host tier of the prefix cache: evicted device pages' K/V kept in host memory under their chained hash.

Bookkeeping and storage, no jax (the copies are ``transfer.py``'s). A host page is one row of a numpy pool per
KV buffer (per pipeline stage: K, V and, for int8 / fp8 pages, their scales), holding that page of every layer
of the stage. Each host page is in one of these states:

    free         not keyed
    incoming     keyed; its data is still on the way from the device, trusted
    stored       keyed; its data in the pool, with a checksum taken when it arrived (checked again at the first
                 lookup after it arrived or was last restored, not at every lookup: a waiting request is looked
                 up every step)
    restoring    keyed; being copied back to a device page this step: out of the LRU, so never evicted

Keyed pages that are not restoring sit in the LRU (``_lru``, oldest first); a full tier evicts the oldest.
A page whose checksum (xxh3, ~13 GB/s on one core) no longer matches its data (corrupted, or a test's
``corrupt``) is dropped when looked up, with an error logged: the request computes those tokens instead.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BufferLayout:
    """One KV buffer's host rows: a page of it is ``shape`` of ``dtype`` (all of a stage's layers)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def page_bytes(layouts: Sequence[BufferLayout]) -> int:
    """Host bytes of one page: its rows in every buffer."""
    return sum(layout.nbytes for layout in layouts)


@dataclass
class HostCounters:
    """What the host tier did (``Engine.stats`` and /metrics)."""

    pages_offloaded: int = 0  # device pages copied to the host
    pages_restored: int = 0  # host pages copied back to a device page
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    copy_seconds: float = 0.0  # host time spent issuing and finishing copies (the engine thread's)
    pages_evicted: int = 0  # host pages dropped for newer ones (LRU)
    pages_corrupted: int = 0  # host pages whose checksum failed (dropped, recomputed)
    hit_tokens: int = 0  # prompt tokens served from the host tier


class HostKVTier:
    """A bounded LRU of host pages keyed by page hash (see the module docstring). Owned by the engine thread."""

    def __init__(self, num_pages: int, layouts: Sequence[BufferLayout]) -> None:
        if num_pages < 1:
            raise ValueError(f"the host tier must hold at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.layouts = list(layouts)
        # NOTE: np.empty reserves address space only; a row becomes resident when first written.
        self.pools = [np.empty((num_pages, *layout.shape), layout.dtype) for layout in self.layouts]
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: rows used in order
        self._hash_to_page: dict[bytes, int] = {}
        self._page_to_hash: dict[int, bytes] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._restoring: set[int] = set()
        self._incoming: set[int] = set()
        self._checksums: dict[int, int] = {}
        self._verified: set[int] = set()  # stored pages checked since they arrived or were last restored
        self._generation = [0] * num_pages  # bumped at each reserve: tells a late copy from a reused page's
        self.counters = HostCounters()

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        return page_bytes(self.layouts)

    @property
    def nbytes(self) -> int:
        """Host memory the tier may use: every row of every pool."""
        return sum(pool.nbytes for pool in self.pools)

    @property
    def num_used_pages(self) -> int:
        return len(self._page_to_hash)

    def __contains__(self, page_hash: bytes) -> bool:
        return page_hash in self._hash_to_page

    # ---- offload ---------------------------------------------------------------------------------
    def reserve(self, page_hash: bytes) -> int | None:
        """A host page for an evicted device page's data under ``page_hash`` (now incoming), or None when its
        data is already here (then it only becomes the most recent) or every page is restoring."""
        page = self._hash_to_page.get(page_hash)
        if page is not None:
            if page in self._lru:
                self._lru.move_to_end(page)
            return None
        if not self._free:
            if not self._lru:
                return None
            victim, _ = self._lru.popitem(last=False)
            self._forget(victim)
            self.counters.pages_evicted += 1
        page = self._free.pop()
        self._generation[page] += 1
        self._hash_to_page[page_hash] = page
        self._page_to_hash[page] = page_hash
        self._lru[page] = None
        self._incoming.add(page)
        return page

    def generation(self, page: int) -> int:
        """Which reservation of ``page`` is current (``store`` takes it back)."""
        return self._generation[page]

    def store(self, pages: Sequence[int], generations: Sequence[int], buffers: Sequence[np.ndarray]) -> None:
        """The data of incoming ``pages`` arrived (``buffers[b][i]`` is page i of buffer b): into the pools, with
        their checksums. Pages dropped (evicted, reset) or reserved again since (``generations``) are skipped."""
        for i, (page, generation) in enumerate(zip(pages, generations, strict=True)):
            if page not in self._incoming or self._generation[page] != generation:
                continue
            for pool, data in zip(self.pools, buffers, strict=True):
                pool[page] = data[i]
            self._incoming.discard(page)
            self._checksums[page] = self._checksum(page)

    def drop_incoming(self, pages: Sequence[int], generations: Sequence[int]) -> None:
        """The copies of ``pages`` will never arrive (a failed step): forget the pages still waiting for them."""
        for page, generation in zip(pages, generations, strict=True):
            if page in self._incoming and self._generation[page] == generation:
                self._lru.pop(page, None)
                self._restoring.discard(page)
                self._forget(page)

    def is_incoming(self, page: int) -> bool:
        return page in self._incoming

    # ---- lookup and restore ----------------------------------------------------------------------
    def lookup(self, page_hash: bytes) -> int | None:
        """The host page holding ``page_hash``'s data, or None (absent, or its checksum failed: dropped)."""
        page = self._hash_to_page.get(page_hash)
        if page is None or page in self._incoming or page in self._restoring or page in self._verified:
            return page
        if self._checksum(page) == self._checksums.get(page):
            self._verified.add(page)
        else:
            logger.error("host KV page %d failed its checksum: dropped, its tokens will be recomputed", page)
            self.counters.pages_corrupted += 1
            self._lru.pop(page, None)
            self._forget(page)
            return None
        return page

    def begin_restore(self, pages: Sequence[int]) -> None:
        """``pages`` are being copied to the device: out of the LRU (not evictable) until ``end_restore``."""
        for page in pages:
            self._lru.pop(page, None)
            self._restoring.add(page)

    def end_restore(self, pages: Sequence[int]) -> None:
        """Restored: the pages stay cached here too, as the most recent, the chain's head last (a chain is
        found from its head: its tail should be dropped first)."""
        for page in reversed(pages):
            if page in self._restoring:
                self._restoring.discard(page)
                self._verified.discard(page)
                self._lru[page] = None

    # ---- whole tier ------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forgets every page (after new weights or a failed step)."""
        for page in list(self._page_to_hash):
            self._forget(page)
        self._lru.clear()
        self._restoring.clear()

    def corrupt(self, page_hash: bytes) -> bool:
        """Test hook: flips a byte of the page stored under ``page_hash``; False if there is none."""
        page = self._hash_to_page.get(page_hash)
        if page is None or page in self._incoming:
            return False
        row = self.pools[0][page].view(np.uint8).reshape(-1)
        row[0] ^= 0xFF
        return True

    def _forget(self, page: int) -> None:
        del self._hash_to_page[self._page_to_hash.pop(page)]
        self._incoming.discard(page)
        self._verified.discard(page)
        self._checksums.pop(page, None)
        self._free.append(page)

    def _checksum(self, page: int) -> int:
        digest = xxhash.xxh3_64()
        for pool in self.pools:
            digest.update(pool[page].view(np.uint8).reshape(-1))
        return digest.intdigest()

    def check_invariants(self) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent (tests)."""
        keyed = set(self._page_to_hash)
        assert {page: h for h, page in self._hash_to_page.items()} == self._page_to_hash, "hash maps disagree"
        assert keyed.isdisjoint(self._free), "a keyed page is free"
        assert len(self._free) == len(set(self._free)), "free list holds a page twice"
        assert len(keyed) + len(self._free) == self.num_pages, "a host page is lost"
        assert set(self._lru) | self._restoring == keyed, "a keyed page is neither in the LRU nor restoring"
        assert not set(self._lru) & self._restoring, "a restoring page is evictable"
        assert self._incoming <= keyed, "an incoming page is not keyed"
        assert self._verified <= keyed - self._incoming, "a page not stored is marked verified"
