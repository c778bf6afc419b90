"""Helpers the engine tests share: random token prompts and the no-leak check."""

from __future__ import annotations

import numpy as np

from jserve import LLM


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n prompts of lo..hi random token ids (ids 3..499: the tiny test vocabulary without specials)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def assert_no_leak(llm: LLM) -> None:
    """Nothing running or waiting, no request's state kept, and every page back in the pool."""
    stats = llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["pages_free"] == stats["pages_total"]
    for engine in getattr(llm.engine, "replicas", [llm.engine]):  # every finished request reported and forgotten
        assert not engine._groups and not engine._sequences
