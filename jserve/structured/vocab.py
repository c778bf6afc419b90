"""The llguidance tokenizer of a jserve ``Tokenizer``: the token trie the grammar's masks are computed over."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    from jserve.tokenizer import Tokenizer


class _SentencePieceVocabulary:
    """The duck-typed object ``llguidance.TokenizerWrapper`` reads: token bytes, BOS/EOS, specials, encode."""

    def __init__(self, tokenizer: Tokenizer, pieces: list[bytes], eos_token_id: int):
        self._tokenizer = tokenizer
        self.tokens = pieces
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(i for i in tokenizer.all_special_ids if i < len(pieces))

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary, padded to the model's ``vocab_size`` (ids past the tokenizer's are
    never allowed) with every EOS id the engine stops on (the mask allows them where the grammar may end)."""
    eos = [int(t) for t in eos_token_ids] or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if not eos:
        raise ValueError("structured_outputs: this tokenizer has no EOS token, so no grammar can end")
    source = tokenizer.grammar_vocabulary()
    if isinstance(source, str):
        return llguidance.LLTokenizer(source, n_vocab=vocab_size, eos_token=eos)
    wrapper = llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer, source, eos[0]))
    return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)
