"""The device side of the host tier: gather pages out of the KV buffers, scatter pages back into them.

A stage's KV buffer is ``[kv_heads, layers * num_pages, page_size, ...]`` (layer l's page p at ``l * num_pages
+ p``). Moving a page means moving that page of every layer, so both programs take page ids (runtime data,
padded with the null page to a bucketed count: a fixed set of programs, compiled before ready) and move
``[n, kv_heads, layers, page_size, ...]`` blocks, page-major so each page is one contiguous host row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIN_TRANSFER_BUCKET = 8
MAX_TRANSFER_BUCKET = 64  # a copy's staging buffer is this many pages at most (~128 MiB for an 8B model)


def transfer_buckets(max_pages: int) -> tuple[int, ...]:
    """Page counts the copy programs are built for: powers of two from ``MIN_TRANSFER_BUCKET`` to the first
    that holds ``max_pages``, at most ``MAX_TRANSFER_BUCKET`` (larger copies run in several calls)."""
    buckets = [MIN_TRANSFER_BUCKET]
    while buckets[-1] < min(max_pages, MAX_TRANSFER_BUCKET):
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def split_into_buckets(count: int, buckets: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, bucket) calls covering ``count`` pages: full calls of the largest bucket, then the smallest
    bucket that holds the rest."""
    calls, start = [], 0
    while count - start > buckets[-1]:
        calls.append((start, buckets[-1]))
        start += buckets[-1]
    if count > start:
        calls.append((start, next(b for b in buckets if b >= count - start)))
    return calls


def padded_ids(pages: list[int], bucket: int) -> np.ndarray:
    """Page ids padded with the null page (0) to ``bucket``."""
    ids = np.zeros(bucket, np.int32)
    ids[: len(pages)] = pages
    return ids


def _slots(ids: jax.Array, num_layers: int, num_pages: int) -> jax.Array:
    """Buffer indices [layers, n] of pages ``ids`` in every layer."""
    return (jnp.arange(num_layers, dtype=jnp.int32)[:, None] * num_pages + ids[None, :]).reshape(-1)


def gather_pages(kv: tuple, ids: jax.Array, *, num_layers: int, num_pages: int) -> tuple:
    """Each buffer's pages ``ids`` as ``[n, kv_heads, layers, page_size, ...]``."""
    slots = _slots(ids, num_layers, num_pages)
    out = []
    for buffer in kv:
        taken = buffer[:, slots].reshape(buffer.shape[0], num_layers, ids.shape[0], *buffer.shape[2:])
        out.append(jnp.moveaxis(taken, 2, 0))
    return tuple(out)


def scatter_pages(kv: tuple, ids: jax.Array, data: tuple, *, num_layers: int, num_pages: int) -> tuple:
    """``kv`` with pages ``ids`` of each buffer replaced by ``data`` (as ``gather_pages`` returns it)."""
    slots = _slots(ids, num_layers, num_pages)
    out = []
    for buffer, pages in zip(kv, data, strict=True):
        values = jnp.moveaxis(pages.astype(buffer.dtype), 0, 2).reshape(buffer.shape[0], -1, *buffer.shape[2:])
        out.append(buffer.at[:, slots].set(values))
    return tuple(out)


def page_layout(buffer_shape: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The shape of one page of a buffer of ``buffer_shape`` (a host row): ``[kv_heads, layers, page_size, ...]``."""
    return (buffer_shape[0], num_layers, *buffer_shape[2:])
