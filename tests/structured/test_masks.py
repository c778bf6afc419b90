"""Grammar bitmasks on the host (llguidance matcher states) and on the device (the sampler applies them)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jserve import BUNDLED_MODEL, StructuredOutputsParams
from jserve.engine.sampler import sample
from jserve.structured import GrammarCompiler
from jserve.structured.matcher import bitmask_words, fill_bitmask_rows
from jserve.tokenizer import Tokenizer
from tests.engine.test_sampler import tensors

VOCAB = 4096


@pytest.fixture(scope="module")
def compiler():
    tok = Tokenizer.from_pretrained(BUNDLED_MODEL)
    c = GrammarCompiler(tok, VOCAB, tok.eos_token_ids)
    yield tok, c
    c.shutdown()


def _allowed(mask_row: np.ndarray) -> set[int]:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:VOCAB]
    return set(np.flatnonzero(bits).tolist())


def test_masks_follow_the_grammar_and_drafts_roll_back(compiler):
    tok, c = compiler
    state = c.compile(StructuredOutputsParams(regex=r"(foo|bar)=[0-9]{1,2};")).new_state()
    text_ids = tok.encode("foo=42;", add_special_tokens=False)
    mask = np.full((len(text_ids) + 1, bitmask_words(VOCAB)), -1, np.int32)
    state.fill_with_drafts(mask, 0, text_ids)
    sequential = c.compile(StructuredOutputsParams(regex=r"(foo|bar)=[0-9]{1,2};")).new_state()
    for j, token in enumerate(text_ids):
        row = np.full((1, bitmask_words(VOCAB)), -1, np.int32)
        sequential.fill(row, 0)
        assert _allowed(mask[j]) == _allowed(row[0]) and token in _allowed(mask[j])
        assert sequential.accept([token])
    assert _allowed(mask[-1]) <= set(tok.eos_token_ids)  # the regex is complete: only EOS may follow
    # the state is where it started: the drafts were consumed for the masks and rolled back
    assert state.valid_prefix(text_ids) == len(text_ids)
    assert state.valid_prefix(tok.encode("baz", add_special_tokens=False)) == 0
    assert sequential.is_terminated  # nothing can follow the ";"


def test_sampler_applies_the_bitmask_and_skips_open_rows():
    b, vocab = 4, 70
    logits = jax.random.normal(jax.random.key(0), (b, vocab)) * 3
    allowed = [{5, 64}, {0}, set(range(vocab)), {69}]
    mask = np.zeros((b, bitmask_words(vocab)), np.int32)
    for r, ids in enumerate(allowed):
        for t in ids:
            mask[r, t // 32] |= np.int32(np.uint32(1 << (t % 32)).astype(np.int32))
    mask[2] = -1  # unconstrained
    base = tensors(b)
    for temperature in (0.0, 1.0):
        t = dataclasses.replace(base, temperature=np.full(b, temperature, np.float32), token_bitmask=mask)
        for seed in range(8):
            t = dataclasses.replace(t, seeds=np.arange(b, dtype=np.uint32) + seed)
            out = np.asarray(sample(logits, t).token_ids)
            assert all(int(out[r]) in allowed[r] for r in range(b))
        if temperature == 0.0:
            masked = np.where([[i in allowed[0] for i in range(vocab)]], np.asarray(logits[:1]), -np.inf)
            assert int(out[0]) == int(np.argmax(masked)) and int(out[2]) == int(np.argmax(np.asarray(logits[2])))
    # an all-open mask changes nothing
    t = dataclasses.replace(base, temperature=np.zeros(b, np.float32), token_bitmask=np.full_like(mask, -1))
    assert np.array_equal(np.asarray(sample(logits, t).token_ids), np.argmax(np.asarray(logits), axis=-1))


def test_invalid_drafts_leave_the_matcher_usable(compiler):
    """Device drafters propose anything: masks stop at the first draft the grammar rejects, which is never
    consumed (llguidance's matcher would stay in its error state for good)."""
    tok, c = compiler
    state = c.compile(StructuredOutputsParams(regex=r"(foo|bar)=[0-9]{1,2};")).new_state()
    good, bad = tok.encode("foo=", add_special_tokens=False), tok.encode("zzz", add_special_tokens=False)
    mask = np.full((len(good) + len(bad) + 1, bitmask_words(VOCAB)), -1, np.int32)
    state.fill_with_drafts(mask, 0, good + bad)
    assert bad[0] not in _allowed(mask[len(good)])  # verification rejects the bad draft at its position
    assert not state.error and state.accept(good) and state.accept(tok.encode("7;", add_special_tokens=False))
    assert state.is_terminated


def test_parallel_fill_equals_row_by_row_fills(compiler):
    """Several rows without drafts go through llguidance's parallel executor: each row gets exactly the mask
    its own state gives, rows of other states and unconstrained rows are untouched."""
    tok, c = compiler
    grammars = [StructuredOutputsParams(regex=r"[0-9]{2,4}"), StructuredOutputsParams(json={"type": "boolean"})]
    states = [c.compile(grammars[i % 2]).new_state() for i in range(4)]
    states[2].accept(tok.encode("12", add_special_tokens=False))
    rows = [(state, row, []) for state, row in zip(states, (0, 2, 3, 5), strict=True)]
    together = np.full((6, bitmask_words(VOCAB)), -1, np.int32)
    fill_bitmask_rows(rows, together)
    for state, row, _ in rows:
        alone = np.full((1, bitmask_words(VOCAB)), -1, np.int32)
        state.fill(alone, 0)
        np.testing.assert_array_equal(together[row], alone[0])
    assert (together[[1, 4]] == -1).all()
    assert _allowed(together[0]) != _allowed(together[2])
