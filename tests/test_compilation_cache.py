"""The persistent compilation cache: on by default in a per-user directory, movable, and off on request.

jax's config is process-wide (and the test session has its own cache), so each case runs in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
import jax
from jserve import compilation_cache
used = compilation_cache.enable(sys.argv[1] if sys.argv[1] != "None" else None)
print(json.dumps({"used": None if used is None else str(used), "jax": jax.config.jax_compilation_cache_dir}))
"""


def _probe(arg: str, env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JSERVE_COMPILATION"))}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, arg], env={**clean, "JAX_PLATFORMS": "cpu", **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_auto_uses_a_per_user_directory(tmp_path):
    got = _probe("auto", {"XDG_CACHE_HOME": str(tmp_path)})
    assert got["used"] == got["jax"] == str(tmp_path / "jserve" / "xla")
    assert (tmp_path / "jserve" / "xla").is_dir()
    moved = _probe("auto", {"JSERVE_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})
    assert moved["jax"] == str(tmp_path / "mine")


def test_an_existing_jax_cache_setting_is_kept_and_none_turns_it_off(tmp_path):
    got = _probe("auto", {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "theirs"), "XDG_CACHE_HOME": str(tmp_path)})
    assert got["jax"] == str(tmp_path / "theirs")
    off = _probe("None", {"XDG_CACHE_HOME": str(tmp_path)})
    assert off == {"used": None, "jax": None}
    explicit = _probe(str(tmp_path / "x"), {})
    assert explicit["jax"] == str(tmp_path / "x")
