"""jax's persistent compilation cache, on by default, so a restart loads the step programs it compiled before.

``"auto"`` (the default) uses ``$JSERVE_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/jserve/xla``, else
``~/.cache/jserve/xla``, unless jax's cache is already configured (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config``), which is then left as it is: the tests and a user's own setup keep theirs. A path sets the
directory explicitly; ``None`` (``--compilation-cache-dir none``) leaves the cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

AUTO = "auto"
MIN_COMPILE_SECONDS = 0.2  # cache every step program worth caching (jax's default, 1 s, skips most on CPU)


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
    if str(cache_dir) == AUTO:
        if jax.config.jax_compilation_cache_dir:
            return Path(jax.config.jax_compilation_cache_dir)
        cache_dir = default_cache_dir()
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
