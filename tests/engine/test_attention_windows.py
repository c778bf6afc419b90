"""Sliding windows and logit soft-capping through every attention backend that runs on CPU, against the plain-jnp
reference (Gemma 2/3 alternate windowed and global layers and soft-cap their attention logits).

The work-items backend plans once per distinct window of the layers; a layer's ``attend`` takes the plan of its
own window, so a windowed layer skips the pages before its window while a global layer sees them all.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jserve.attention.base import AttentionBackend, AttentionLayout
from jserve.attention.pallas import PallasTpuInterpretBackend
from jserve.attention.xla_page_loop import XlaPageLoopBackend
from jserve.attention.xla_work_items import XlaWorkItemsBackend
from jserve.engine.shapes import StepShapes
from pallas_kernels import reference
from pallas_kernels.xla_items import WorkPlan
from tests.kernels.common import RaggedCase, assert_close, make_ragged_case, poison_leading_pages

WINDOWS = (None, 8, 24)
SM_SCALE = 0.5  # ~2.8x the default 1/sqrt(32): scores large enough that a cap of 5 changes the output
PAGE_SIZE = 8
# (q_len, kv_len incl. the new tokens): decode rows and prefill chunks, most contexts longer than the windows
MIXED = [(1, 70), (12, 40), (1, 9), (20, 61), (1, 33)]
RAGGED_DECODES = [(1, 70), (1, 5), (1, 40), (1, 61), (1, 33)]
UNIFORM_DECODES = [(1, 64), (1, 60), (1, 57), (1, 62), (1, 50)]  # the page loop's case (``prefer_items``)


def _case(seqs: list[tuple[int, int]], seed: int = 0, **kwargs) -> RaggedCase:
    kwargs = dict(num_kv_heads=2, group=2, head_dim=32, page_size=PAGE_SIZE, seed=seed) | kwargs
    return make_ragged_case(seqs, **kwargs)


def _layout(case: RaggedCase) -> AttentionLayout:
    """The host-side layout the batch builder would hand a backend (slot_mapping only sets the token count)."""
    return AttentionLayout(
        slot_mapping=np.zeros(case.q.shape[0], np.int32),
        kv_lens=np.asarray(case.kv_lens),
        block_tables=np.asarray(case.block_tables),
        cu_q_lens=np.asarray(case.cu_q_lens),
        num_seqs=np.asarray(case.num_seqs),
    )


def _shapes(case: RaggedCase) -> StepShapes:
    rows, pages = case.block_tables.shape
    return StepShapes(
        token_buckets=(case.q.shape[0],),
        max_num_seqs=rows,
        max_pages_per_seq=pages,
        page_size=PAGE_SIZE,
        history_len=pages * PAGE_SIZE,
        banned_len=1,
    )


@functools.partial(jax.jit, static_argnames=("backend", "sliding_window", "soft_cap"))
def _attend(q, kv, metadata, *, backend: AttentionBackend, sliding_window: int | None, soft_cap: float | None):
    return backend.attend(q, kv, metadata, sm_scale=SM_SCALE, sliding_window=sliding_window, soft_cap=soft_cap)


def _reference(case: RaggedCase, sliding_window: int | None, soft_cap: float | None) -> jax.Array:
    return reference.ragged_paged_attention(
        *case.args, sm_scale=SM_SCALE, sliding_window=sliding_window, logit_soft_cap=soft_cap
    )


@pytest.fixture(scope="module")
def mixed() -> RaggedCase:
    return _case(MIXED, seed=1)


@pytest.fixture(scope="module")
def work_items(mixed) -> XlaWorkItemsBackend:
    return XlaWorkItemsBackend(_shapes(mixed), sliding_windows=WINDOWS)


@pytest.mark.parametrize("soft_cap", [None, 5.0])
@pytest.mark.parametrize("sliding_window", WINDOWS)
def test_xla_backends_match_reference(mixed, work_items, sliding_window, soft_cap):
    """Page loop, work items and the work-items backend's page-loop branch all give the reference's output."""
    expected = _reference(mixed, sliding_window, soft_cap)
    layout = _layout(mixed)
    meta = work_items.plan(layout)
    assert bool(meta.use_items)  # the prefill chunks make the plan take work items
    runs = {
        "page loop": (XlaPageLoopBackend(_shapes(mixed)), layout),
        "work items": (work_items, meta),
        "work items, loop branch": (work_items, work_items.alternative(meta)),
    }
    kv = (mixed.k_pages, mixed.v_pages)
    for what, (backend, metadata) in runs.items():
        out = _attend(mixed.q, kv, metadata, backend=backend, sliding_window=sliding_window, soft_cap=soft_cap)
        assert_close(out, expected, 1e-5, what)
        if soft_cap is not None:  # the cap really reached the kernel
            uncapped = _reference(mixed, sliding_window, None)
            assert float(np.max(np.abs(np.asarray(out) - np.asarray(uncapped)))) > 1e-2, what


def test_uniform_decode_step_takes_the_loop_branch():
    """Near-uniform decode contexts: ``prefer_items`` picks the page loop; the output is the reference's."""
    case = _case(UNIFORM_DECODES, seed=2, extra_tokens=0)
    backend = XlaWorkItemsBackend(_shapes(case), sliding_windows=WINDOWS)
    meta = backend.plan(_layout(case))
    assert not bool(meta.use_items)
    kv = (case.k_pages, case.v_pages)
    for window in WINDOWS:
        out = _attend(case.q, kv, meta, backend=backend, sliding_window=window, soft_cap=5.0)
        assert_close(out, _reference(case, window, 5.0), 1e-5, f"window {window}")


def test_pallas_tpu_interpreter_window_and_soft_cap():
    """The TPU kernel under its interpreter (slow: one small case)."""
    case = _case([(5, 30), (1, 17), (1, 12)], seed=3, head_dim=128, extra_tokens=3)
    backend = PallasTpuInterpretBackend(_shapes(case))
    out = backend.attend(
        case.q, (case.k_pages, case.v_pages), _layout(case), sm_scale=SM_SCALE, sliding_window=8, soft_cap=5.0
    )
    assert_close(out, _reference(case, 8, 5.0), 1e-4, "tpu interpreter")
    assert float(np.max(np.abs(np.asarray(out) - np.asarray(_reference(case, 8, None))))) > 1e-2


def _visited_pages(plan: WorkPlan) -> int:
    """Real (non-null) pages the plan's items gather, both groups."""
    total = 0
    for group in (plan.decode, plan.chunks):
        total += int(np.count_nonzero(group.item_pages[: int(group.num_items[0])]))
    return total


def test_one_plan_per_window_skips_pages(work_items):
    """Each window's plan skips the pages before that window: for a long decode row, fewer pages the narrower."""
    case = _case([(1, 200), (4, 10)], seed=4)  # the chunk makes the step take work items
    backend = XlaWorkItemsBackend(_shapes(case), sliding_windows=(None, 24, None, 8, 24))
    assert backend.sliding_windows == WINDOWS[:1] + (24, 8)  # deduplicated, first occurrence first
    meta = backend.plan(_layout(case))
    assert [p.sliding_window for p in meta.plans] == [None, 24, 8]
    visited = {w: _visited_pages(p) for w, p in zip(backend.sliding_windows, meta.plans, strict=True)}
    # decode row: 25 pages in full, 3 for 24 keys back from position 199, 1 for 8; the chunk row: 2 pages
    assert visited == {None: 25 + 2, 24: 3 + 2, 8: 1 + 2}


@pytest.mark.parametrize("sliding_window", [8, 24])
def test_windowed_layer_uses_its_own_plan(sliding_window):
    """NaN in the pages before both windows of a long decode row: a layer that gathered them (the global plan)
    would return NaN; each windowed layer takes its own plan and never reads them."""
    case = _case([(1, 200), (4, 10)], seed=4)
    poisoned, zeroed = poison_leading_pages(case, seq=0, num_pages=20)  # positions < 160: before both windows
    backend = XlaWorkItemsBackend(_shapes(case), sliding_windows=WINDOWS)
    meta = backend.plan(_layout(case))
    assert bool(meta.use_items)
    kv = (poisoned.k_pages, poisoned.v_pages)
    out = _attend(case.q, kv, meta, backend=backend, sliding_window=sliding_window, soft_cap=5.0)
    assert_close(out, _reference(zeroed, sliding_window, 5.0), 1e-5, f"window {sliding_window}")


def test_plan_shapes_depend_only_on_the_token_bucket(work_items, mixed):
    """Every plan of a token bucket has one pytree structure and one set of shapes: no new compiled program."""
    num_tokens = mixed.q.shape[0]
    other = _case([(1, 50), (30, 45), (1, 12)], seed=5, extra_tokens=num_tokens - 32)
    decodes = _case(RAGGED_DECODES, seed=6, extra_tokens=num_tokens - len(RAGGED_DECODES))
    metas = [work_items.plan(_layout(c)) for c in (mixed, other, decodes)]
    assert all(bool(m.use_items) for m in metas)
    metas += [work_items.plan_short(_layout(mixed)), work_items.alternative(metas[0])]
    signatures = {_signature((m.use_items, m.plans)) for m in metas}
    assert len(signatures) == 1


def _signature(tree) -> tuple:
    return jax.tree.structure(tree), tuple(np.shape(x) for x in jax.tree.leaves(tree))


def test_unplanned_window_is_an_error(work_items, mixed):
    meta = work_items.plan(_layout(mixed))
    with pytest.raises(ValueError, match="sliding_window=16 was not planned"):
        work_items.attend(mixed.q, (mixed.k_pages, mixed.v_pages), meta, sm_scale=SM_SCALE, sliding_window=16)
