"""jax's persistent compilation cache, on by default, so a restart loads the step programs it compiled before.

``"auto"`` (the default) uses ``$JSERVE_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/jserve/xla``, else
``~/.cache/jserve/xla``, unless jax's cache is already configured (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config``), which is then left as it is: the tests and a user's own setup keep theirs. A path sets the
directory explicitly; ``None`` (``--compilation-cache-dir none``) leaves the cache off.

Kill safety: a server can be killed at any moment (SIGKILL, the OOM killer, a lost node), also while it writes
a cache entry. jax writes entries in place, so such a kill leaves a truncated file, which jax then fails to read
on every later start (a warning and a recompile each time) and never replaces (it does not overwrite an entry
that exists). ``KillSafeCache`` replaces jax's file cache (local directories without eviction, the default):
entries are written to a temporary file and renamed into place, so a reader sees a whole entry or none, and an
entry that does not decompress (damaged on disk, or written before this) is logged and deleted, so the program
is compiled once more and written back whole. A temporary file a killed writer left is removed on ``enable``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

try:  # the jax internals KillSafeCache builds on; a jax that moved them keeps its own cache as it is
    from jax._src import compilation_cache as _jax_cache
    from jax._src.lru_cache import LRUCache
except ImportError:  # pragma: no cover - depends on the jax version
    _jax_cache, LRUCache = None, object

logger = logging.getLogger(__name__)

AUTO = "auto"
MIN_COMPILE_SECONDS = 0.2  # cache every step program worth caching (jax's default, 1 s, skips most on CPU)
ENTRY_SUFFIX = "-cache"  # jax's name for an entry: <key>-cache
TMP_SUFFIX = ".tmp"


def default_cache_dir() -> Path:
    explicit = os.environ.get("JSERVE_COMPILATION_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jserve" / "xla"


def enable(cache_dir: str | os.PathLike | None = AUTO) -> Path | None:
    """Turns the cache on (see the module docstring); returns the directory in use, or None when off."""
    if cache_dir is None or str(cache_dir).lower() in ("", "none"):
        return None if jax.config.jax_compilation_cache_dir is None else Path(jax.config.jax_compilation_cache_dir)
    _install_kill_safe_cache()
    if str(cache_dir) == AUTO:
        if jax.config.jax_compilation_cache_dir:
            path = Path(jax.config.jax_compilation_cache_dir)
            remove_stale_temporaries(path)
            return path
        cache_dir = default_cache_dir()
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path


class KillSafeCache(LRUCache):  # type: ignore[misc, valid-type]
    """jax's file cache (without eviction), safe against a writer killed mid-entry (see the module docstring)."""

    def get(self, key: str) -> bytes | None:
        value = super().get(key)
        if value is None or _readable(value):
            return value
        entry = self.path / f"{key}{ENTRY_SUFFIX}"
        logger.warning("compilation cache: %s is damaged (%d bytes); deleted, compiling it again", entry, len(value))
        entry.unlink(missing_ok=True)
        return None

    def put(self, key: str, value: bytes) -> None:
        entry = self.path / f"{key}{ENTRY_SUFFIX}"
        if not entry.exists():
            write_atomically(entry, value)


def write_atomically(entry: Path, value: bytes) -> None:
    """Writes a temporary file beside ``entry`` and renames it into place: readers (this process or another)
    see the whole entry or none. The writer's pid is in the temporary's name, so that
    ``remove_stale_temporaries`` knows which writers are gone."""
    tmp = entry.parent / f".{entry.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        tmp.write_bytes(value)
        os.replace(tmp, entry)
    finally:
        tmp.unlink(missing_ok=True)


def _readable(value: bytes) -> bool:
    """Whether an entry decompresses (zlib and zstd both check the data's length and checksum)."""
    try:
        _jax_cache.decompress_executable(value)
    except Exception:  # noqa: BLE001 - any failure means the entry is unusable
        return False
    return True


def _install_kill_safe_cache() -> None:
    """Makes jax build KillSafeCache where it would build its plain file cache. Once per process; it applies
    to a cache jax has not yet opened (jax opens it at the first compile after the directory is set)."""
    if _jax_cache is None or getattr(_jax_cache.get_file_cache, "jserve_kill_safe", False):
        return
    original = _jax_cache.get_file_cache

    def get_file_cache(path: str):
        made = original(path)
        if made is None or type(made[0]) is not LRUCache or made[0].eviction_enabled or "://" in str(path):
            return made  # eviction (its own locking), a remote filesystem or a verifying cache: jax's as it is
        return KillSafeCache(made[1], max_size=-1), made[1]

    get_file_cache.jserve_kill_safe = True  # type: ignore[attr-defined]
    _jax_cache.get_file_cache = get_file_cache


def remove_stale_temporaries(path: Path) -> None:
    """Deletes the temporary files of KillSafeCache writers that no longer run (killed mid-write)."""
    for tmp in path.glob(f".*{ENTRY_SUFFIX}.*{TMP_SUFFIX}"):
        pid = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
