"""Prompt lookup on the device: ``propose_ngram``'s rule over token histories held in device arrays.

Async scheduling with n-gram speculation dispatches a request's next verification before its current one has
reported which drafts it accepted. Those tokens exist only on the device then, so the next drafts are looked up
there, inside the verification program, over the history the host knew plus what the previous step emitted.
The rule is exactly ``jserve.speculative.ngram.propose_ngram`` (the tests compare them): the longest suffix of
``min_n..max_n`` tokens that occurs earlier, its rightmost occurrence, and the up to k tokens that followed it.

Whole-array jnp: for every end position e, ``run[e]`` counts how many tokens, going back from e, equal the
suffix going back from the last token, so an n-gram occurs ending at e exactly when ``run[e] >= n``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _suffix_runs(history: jax.Array, length: jax.Array, max_n: int) -> jax.Array:
    """[W] per end position e <= length - 2: how many of the last ``max_n`` tokens match going back from e."""
    width = history.shape[0]
    ends = jnp.arange(width)
    run = jnp.zeros(width, jnp.int32)
    alive = ends <= length - 2  # a token must follow the occurrence
    for j in range(max_n):  # j tokens back from the end and from e
        ref = history[jnp.maximum(length - 1 - j, 0)]
        back = ends - j
        same = (back >= 0) & (history[jnp.maximum(back, 0)] == ref) & (length - 1 - j >= 0)
        alive = alive & same
        run = run + alive.astype(jnp.int32)
    return run


def _propose_one(history, length, limit, *, k: int, min_n: int, max_n: int):
    width = history.shape[0]
    run = _suffix_runs(history, length, max_n)
    best_n = jnp.max(run)
    found = best_n >= min_n
    # the rightmost end among those reaching the longest n-gram
    end = jnp.max(jnp.where(run == best_n, jnp.arange(width), -1))
    index = end + 1 + jnp.arange(k)
    drafts = history[jnp.clip(index, 0, width - 1)]
    count = jnp.where(found, jnp.clip(jnp.minimum(length - end - 1, limit), 0, k), 0)
    return jnp.where(jnp.arange(k) < count, drafts, 0).astype(jnp.int32), count.astype(jnp.int32)


def propose_on_device(
    history: jax.Array, lengths: jax.Array, limits: jax.Array, *, k: int, min_n: int, max_n: int
) -> tuple[jax.Array, jax.Array]:
    """Drafts [S, k] (zero past each row's count) and counts [S] for histories [S, W] of ``lengths`` [S] tokens,
    each row capped at ``limits`` [S] drafts (0: none)."""
    return jax.vmap(lambda h, n, c: _propose_one(h, n, c, k=k, min_n=min_n, max_n=max_n))(history, lengths, limits)


def append_emitted(
    history: jax.Array, lengths: jax.Array, tokens: jax.Array, counts: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Each row's history [S, W] with ``tokens[s, :counts[s]]`` ([S, J]) written after its ``lengths[s]`` tokens
    (writes past W are dropped); returns the histories and their new lengths."""
    s, j = tokens.shape
    cols = lengths[:, None] + jnp.arange(j)[None, :]
    cols = jnp.where(jnp.arange(j)[None, :] < counts[:, None], cols, history.shape[1])
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], (s, j))
    return history.at[rows, cols].set(tokens, mode="drop"), jnp.minimum(lengths + counts, history.shape[1])
