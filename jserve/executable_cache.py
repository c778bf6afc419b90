"""jserve's own cache of compiled step programs: a warm start loads each executable instead of building it.

jax's persistent cache saves XLA's compile but not the rest: every start still traces and lowers each step
program (~1 s a program on 2 CPU cores, GIL-bound Python) only to find its key. Here the key is computed
without tracing, from what shapes a program: the function and its static arguments (the model's graph, the
attention backend, the shardings), the arguments' shapes, dtypes and placements, the devices, the jax and
jaxlib versions, XLA's flags, and jserve's version and source. The value is the serialized executable
(``jax.experimental.serialize_executable``), which loads in ~0.1-0.2 s.

Entries live in ``executables/`` under jax's cache directory (on whenever that cache is; one process only:
multi-host programs keep jax's cache). An entry is written to a temporary file and renamed into place, and
carries a SHA-256 of its contents: a damaged or unloadable entry is logged, deleted and rebuilt, never fatal.

Programs built for this cache bypass jax's persistent cache: an executable XLA:CPU loaded from that cache, or
one that has run, cannot be serialized (``UNIMPLEMENTED: 'LessThan' is not serializable``: its sort
comparators have become native code), while a freshly compiled one can; so entries are written right after
compiling. A backend that refuses serialization anyway is logged once and left to jax's cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import re
import signal
import threading
from pathlib import Path

import jax
import numpy as np
from jax.experimental import serialize_executable

import jserve
from jserve import memory_maps
from jserve.compilation_cache import ENTRY_SUFFIX, TMP_SUFFIX, remove_stale_temporaries, write_atomically

try:  # the jax internal that reads its persistent cache; a jax that moved it keeps its cache on for us too
    from jax._src import compilation_cache as _jax_cache
except ImportError:  # pragma: no cover - depends on the jax version
    _jax_cache = None

logger = logging.getLogger(__name__)

MAGIC = b"JSRVEXE2"
KILL_MID_WRITE_ENV = "JSERVE_DEBUG_KILL_MID_CACHE_WRITE"  # tests: SIGKILL this process halfway through a write
_ADDRESS = re.compile(r" at 0x[0-9a-f]+|0x[0-9a-f]{6,}")
_bypass = threading.local()
_serialized_any = False  # whether this process serialized an executable yet (the backend can)


_CPU_COMPILE = threading.Lock()


def compile_lowered(lowered):
    """``lowered.compile()``, one at a time per process on CPU. XLA:CPU (jax 0.10.2) segfaulted inside
    ``backend_compile_and_load`` with two step programs compiling in two threads of one process, and compiling
    in parallel had gained nothing on a 2-core machine (43.4 s vs 45.5 s for the bundled model's set); the
    threads still trace and lower the next program while one compiles. Accelerator compiles stay parallel."""
    if jax.default_backend() != "cpu":
        return lowered.compile()
    with _CPU_COMPILE, memory_maps.tracking("a compiled program"):
        return lowered.compile()


def _tracking_maps_on_cpu(what: str) -> contextlib.AbstractContextManager:
    """``memory_maps.tracking`` where programs are XLA:CPU's (loaded kernels each map memory), else nothing."""
    return memory_maps.tracking(what) if jax.default_backend() == "cpu" else contextlib.nullcontext()


class ExecutableCache:
    """Compiled programs on disk; ``build(fn, args)`` loads a program or compiles (and stores) it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
        self.loaded = 0  # programs loaded from the cache (the rest were compiled)
        self._serializable = True  # False once the backend refused to serialize an executable

    @classmethod
    def in_use(cls) -> ExecutableCache | None:
        """The cache beside jax's persistent cache, or None when that is off or the mesh spans processes."""
        root = jax.config.jax_compilation_cache_dir
        if not root or "://" in str(root) or jax.process_count() > 1:
            return None
        return cls(Path(root) / "executables")

    def build(self, fn, args: tuple):
        """The compiled program of jitted ``fn`` on ``args`` (arrays or ShapeDtypeStructs)."""
        entry = self.directory / f"{program_key(fn, args)}{ENTRY_SUFFIX}"
        compiled = self._load(entry)
        if compiled is not None:
            self.loaded += 1
            return compiled
        if not self._serializable:
            return compile_lowered(fn.lower(*args))
        with _bypassing_jax_cache():
            compiled = compile_lowered(fn.lower(*args))
        self._store(entry, compiled)
        return compiled

    def _load(self, entry: Path):
        try:
            data = entry.read_bytes()
        except FileNotFoundError:
            return None
        # (the memory-map check raises before the try: no room is not a damaged entry)
        with _tracking_maps_on_cpu("a program from the executable cache"):
            try:
                device_ids, blob, in_tree, out_tree = pickle.loads(_verified(data))
                by_id = {d.id: d for d in jax.devices()}
                devices = [by_id[i] for i in device_ids]  # the program's own devices, not the whole backend's
                return serialize_executable.deserialize_and_load(blob, in_tree, out_tree, execution_devices=devices)
            except Exception as err:  # noqa: BLE001 - a damaged or stale entry is rebuilt, never fatal
                logger.warning("executable cache: %s is damaged (%s); deleted, compiling it again", entry.name, err)
                entry.unlink(missing_ok=True)
                return None

    def _store(self, entry: Path, compiled) -> None:
        if _calls_the_host(compiled):
            return  # jax does not cache these either; XLA:CPU crashes serializing some (Pallas interpreters)
        try:
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            payload = pickle.dumps((device_ids, *serialize_executable.serialize(compiled)))
        except Exception as err:  # noqa: BLE001 - see below
            global _serialized_any
            if not _serialized_any:  # the backend cannot serialize: jax's cache serves instead
                self._serializable = False
                logger.warning("executable cache: off (%s); jax's compilation cache serves restarts instead", err)
            else:  # jax handed back an executable this process already ran (XLA:CPU then refuses): not stored
                logger.info("executable cache: %s not stored (%s)", entry.name, err)
            return
        _serialized_any = True
        data = MAGIC + hashlib.sha256(payload).digest() + payload
        if os.environ.get(KILL_MID_WRITE_ENV):
            _die_mid_write(entry, data)
        write_atomically(entry, data)


def _calls_the_host(compiled) -> bool:
    """Whether a program holds host callbacks or effects, which an executable cannot carry across processes."""
    unloaded = getattr(compiled._executable, "_unloaded_executable", None)  # noqa: SLF001 - what serialize reads
    if unloaded is None:
        return True
    return bool(unloaded.host_callbacks or unloaded.keepalive or unloaded.ordered_effects or unloaded.unordered_effects)


def _verified(data: bytes) -> bytes:
    """An entry's payload, after checking its magic and checksum (a truncated or altered entry raises)."""
    header = len(MAGIC) + 32
    if len(data) < header or not data.startswith(MAGIC):
        raise ValueError(f"not an executable entry ({len(data)} bytes)")
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : header]:
        raise ValueError(f"checksum mismatch ({len(data)} bytes)")
    return payload


def entry_is_valid(path: Path) -> bool:
    """Whether a file is a whole entry (for tests and tools)."""
    try:
        _verified(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def _die_mid_write(entry: Path, data: bytes) -> None:
    """The kill -9 test's hook: half an entry in the writer's temporary file, then SIGKILL."""
    tmp = entry.parent / f".{entry.name}.{os.getpid()}{TMP_SUFFIX}"
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- keys


def program_key(fn, args: tuple) -> str:
    """A hex digest of everything that shapes ``fn``'s program on ``args``, computed without tracing."""
    h = hashlib.sha256()
    h.update(_environment().encode())
    wrapped = getattr(fn, "__wrapped__", fn)
    h.update(_describe(wrapped).encode())
    leaves, treedef = jax.tree_util.tree_flatten(args)
    h.update(_without_addresses(repr(treedef)).encode())
    for leaf in leaves:
        h.update(_describe_leaf(leaf).encode())
    return h.hexdigest()


def _describe(obj) -> str:
    """A stable text of a (partial of a) function and its static arguments: reprs without memory addresses,
    and the device ids behind every sharding (a mesh's repr names its axes, not its devices)."""
    if isinstance(obj, functools.partial):
        parts = [_describe(obj.func), *(_describe(a) for a in obj.args)]
        parts += [f"{k}={_describe(v)}" for k, v in sorted(obj.keywords.items())]
        return f"partial({', '.join(parts)})"
    if isinstance(obj, (tuple, list)):
        return f"[{', '.join(_describe(x) for x in obj)}]"
    if isinstance(obj, jax.sharding.Sharding):
        return _describe_sharding(obj)
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    return _without_addresses(repr(obj))


def _describe_leaf(leaf) -> str:
    if leaf is None:
        return "None;"
    sharding = getattr(leaf, "sharding", None)
    placed = _describe_sharding(sharding) if isinstance(sharding, jax.sharding.Sharding) else "host"
    dtype = np.result_type(leaf.dtype) if hasattr(leaf, "dtype") else type(leaf).__name__
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
    return f"{shape}:{dtype}:{placed};"  # an array and its ShapeDtypeStruct describe alike


def _describe_sharding(sharding) -> str:
    ids = [d.id for d in sharding._device_assignment]  # noqa: SLF001 - the devices in mesh order
    return f"{_without_addresses(repr(sharding))}@{ids}"


def _without_addresses(text: str) -> str:
    return _ADDRESS.sub("", text)


@functools.cache
def _environment() -> str:
    """What every key shares: versions, backend, devices, XLA's flags, numerics switches and jserve's source."""
    import jaxlib

    backend = jax.devices()[0].client
    devices = [(d.id, d.device_kind) for d in jax.devices()]
    switches = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    return (
        f"jax={jax.__version__} jaxlib={jaxlib.__version__} platform={backend.platform} "
        f"platform_version={backend.platform_version} devices={devices} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')} switches={switches} jserve={_source_digest()}"
    )


def _source_digest() -> str:
    """jserve's version and a digest of its Python source: an edited checkout never loads a stale program."""
    root = Path(jserve.__file__).parent
    h = hashlib.sha256(getattr(jserve, "__version__", "").encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- bypass


@contextlib.contextmanager
def _bypassing_jax_cache():
    """Compiles in this thread skip jax's persistent cache (neither read nor written): see the module docstring."""
    _install_bypass()
    _bypass.on = True
    try:
        yield
    finally:
        _bypass.on = False


def _install_bypass() -> None:
    """Wraps jax's cache reads and writes to honour ``_bypass`` (once per process)."""
    if _jax_cache is None or getattr(_jax_cache.get_executable_and_time, "jserve_bypass", False):
        return
    get, put = _jax_cache.get_executable_and_time, _jax_cache.put_executable_and_time

    def get_executable_and_time(*args, **kwargs):
        return (None, None) if getattr(_bypass, "on", False) else get(*args, **kwargs)

    def put_executable_and_time(*args, **kwargs):
        if not getattr(_bypass, "on", False):
            put(*args, **kwargs)

    get_executable_and_time.jserve_bypass = True  # type: ignore[attr-defined]
    _jax_cache.get_executable_and_time = get_executable_and_time
    _jax_cache.put_executable_and_time = put_executable_and_time
