"""A clear error instead of a crash when XLA:CPU's compiled programs would exhaust the process's memory maps.

XLA:CPU loads each kernel of a compiled program into memory areas of its own (code, data, read-only data): the
bundled model's 17 step programs hold ~8,300 maps, a 16-layer model's 10 programs ~12,800, and the count grows
with depth (unrolled layers) and with every engine a process keeps. Linux caps a process at
``vm.max_map_count`` maps (65,530 by default); past it an ``mmap`` inside XLA fails and the process dies with a
segmentation fault, in a compile or a (de)serialization, with nothing saying why (measured: the 18th live
engine of the batch-invariance tests' size, jax 0.10.2).

``ensure_room`` runs before each program is compiled or loaded on CPU: from the largest growth one program
caused so far (an estimate before the first), it refuses to start a program that could cross the limit, with
what to do about it. Elsewhere (GPU, TPU, no ``/proc``) it does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

SELF_MAPS = "/proc/self/maps"
MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"
FIRST_ESTIMATE = 2_000  # maps one program may take before any was measured (the bundled model's: ~500)
MARGIN = 1_000  # left for everything else that maps memory (threads, arenas, libraries)
MEASURED_PROGRAMS = 3  # programs whose own growth is measured (two reads each); later ones are estimated

_lock = threading.Lock()
_largest_growth = 0  # the most maps one program took (measured, or averaged between two reads)
_last_used: int | None = None  # the count at the last read of /proc/self/maps
_since_read = 0  # programs built since that read
_measured = 0


class MemoryMapsExhausted(RuntimeError):
    """Building one more program could exceed ``vm.max_map_count`` (XLA:CPU would crash the process)."""


def map_limit() -> int | None:
    """The kernel's per-process limit, or None where it cannot be read (not Linux)."""
    try:
        with open(MAX_MAP_COUNT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def maps_in_use() -> int | None:
    """How many memory maps this process holds, or None where it cannot be read."""
    try:
        with open(SELF_MAPS, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def ensure_room(what: str) -> None:
    """Raises ``MemoryMapsExhausted`` if building ``what`` could take this process past its map limit.

    Reading ``/proc/self/maps`` costs ~1 us a map (~30 ms at 30,000), so it is read only once the estimate
    (the last count plus what the programs since then may have taken) reaches half the limit."""
    global _last_used, _since_read, _largest_growth
    limit = map_limit()
    if limit is None:
        return
    with _lock:
        need = max(_largest_growth, FIRST_ESTIMATE)
        if _last_used is not None and _last_used + (_since_read + 1) * need + MARGIN <= limit // 2:
            return
    used = maps_in_use()
    if used is None:
        return
    with _lock:
        if _last_used is not None and _since_read:  # the programs since the last read, on average
            _largest_growth = max(_largest_growth, (used - _last_used) // _since_read)
        _last_used, _since_read = used, 0
        need = max(_largest_growth, FIRST_ESTIMATE)
    if used + need + MARGIN <= limit:
        return
    raise MemoryMapsExhausted(
        f"cannot build {what}: this process holds {used:,} memory maps of the {limit:,} that vm.max_map_count "
        f"allows, and one more compiled program may take ~{need:,} (XLA:CPU maps every kernel separately; past "
        "the limit it crashes the process). Raise the limit (sysctl -w vm.max_map_count=262144), keep fewer "
        "engines alive in this process, or compile fewer or smaller programs (scan_layers=True for deep "
        "models, fewer token buckets)."
    )


@contextlib.contextmanager
def tracking(what: str) -> Iterator[None]:
    """``ensure_room(what)``, then counts the program in the estimate; the first few programs' own growth is
    measured (the estimate's starting point)."""
    global _largest_growth, _last_used, _since_read, _measured
    ensure_room(what)
    before = maps_in_use() if _measured < MEASURED_PROGRAMS else None
    yield
    after = maps_in_use() if before is not None else None
    with _lock:
        if before is not None and after is not None:
            _largest_growth = max(_largest_growth, after - before)
            _measured += 1
            _last_used, _since_read = after, 0
        else:
            _since_read += 1
