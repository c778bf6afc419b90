"""StepShapes: the static shapes of an engine's steps (one compiled program per token bucket). No jax import."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= 2
    return (*sizes, hi)


def round_up(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class StepShapes:
    """The static shapes of every step of one engine; only the token bucket varies."""

    token_buckets: tuple[int, ...]
    max_num_seqs: int  # B
    max_pages_per_seq: int  # Pmax
    page_size: int
    history_len: int  # penalty history width: max_model_len
    banned_len: int  # banned ids per row: max_stop_token_ids + the EOS ids
    # speculative decoding: verification steps lay out spec_rows rows of num_spec_tokens + 1 positions each
    # (the program of a bucket samples verify_rows of them) and have their own programs for the token buckets
    # up to spec_rows * (num_spec_tokens + 1)
    spec_rows: int = 0
    num_spec_tokens: int = 0
    # speculation under async scheduling: verification steps carry a ChainInput (rows chained to a previous
    # verification still running; jserve.speculative.chain); spec_lookup: n-gram, whose chained rows' drafts
    # are looked up on the device over the request's history
    spec_chain: bool = False
    spec_lookup: bool = False
    bitmask_words: int = 0  # structured outputs: ceil(vocab / 32) words per grammar bitmask row (0: no tokenizer)
    lora: bool = False  # multi-LoRA: every step carries each token's adapter slot (StepInput.lora_slots)

    def sample_rows(self, num_tokens_padded: int) -> int:
        """Sampled rows of a plain step of this token bucket: each sampled row ends on one of the step's tokens,
        so a bucket of T tokens samples at most T rows, and the LM head and sampler cost what the bucket holds,
        not ``max_num_seqs``."""
        return min(num_tokens_padded, self.max_num_seqs)

    @property
    def sample_row_counts(self) -> tuple[int, ...]:
        """The distinct ``sample_rows`` of the plain buckets (the runner keeps a resident padding per count)."""
        return tuple(sorted({self.sample_rows(b) for b in self.token_buckets}))

    def verify_rows(self, num_tokens_padded: int) -> int:
        """Sampled rows the verification program of this token bucket verifies (``verification_rows``)."""
        return verification_rows(num_tokens_padded, self.spec_rows, self.num_spec_tokens + 1)

    def verify_bucket(self, num_tokens: int, num_rows: int) -> int | None:
        """The smallest verification bucket holding ``num_tokens`` tokens and ``num_rows`` sampled rows, or None
        (the step decodes plainly)."""
        return next((b for b in self.spec_token_buckets if b >= num_tokens and self.verify_rows(b) >= num_rows), None)

    @property
    def chain_history_len(self) -> int:
        """Width of a chained row's history: the request's tokens for n-gram lookups, else a placeholder."""
        return self.history_len if self.spec_lookup else 1

    @property
    def spec_token_buckets(self) -> tuple[int, ...]:
        """The token buckets of verification steps (none without speculation)."""
        if not self.spec_rows:
            return ()
        top = round_up(min(self.spec_rows * (self.num_spec_tokens + 1), self.token_buckets[-1]), self.token_buckets)
        return tuple(b for b in self.token_buckets if 2 <= b <= top)  # a verified row holds >= 2 tokens

    @classmethod
    def from_limits(
        cls,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        page_size: int,
        banned_len: int,
        min_tokens: int = 8,
        spec_rows: int = 0,
        num_spec_tokens: int = 0,
        spec_chain: bool = False,
        spec_lookup: bool = False,
        bitmask_words: int = 0,
        lora: bool = False,
    ) -> StepShapes:
        return cls(
            token_buckets=_powers_of_two(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens),
            max_num_seqs=max_num_seqs,
            max_pages_per_seq=-(-max_model_len // page_size),
            page_size=page_size,
            history_len=max_model_len,
            banned_len=banned_len,
            spec_rows=min(spec_rows, max_num_seqs),
            num_spec_tokens=num_spec_tokens,
            spec_chain=spec_chain and spec_rows > 0,
            spec_lookup=spec_chain and spec_lookup and spec_rows > 0,
            bitmask_words=bitmask_words,
            lora=lora,
        )


def verification_rows(num_tokens_padded: int, spec_rows: int, positions: int) -> int:
    """Rows a verification program of ``num_tokens_padded`` tokens samples, ``positions`` (k + 1) each: about one
    row per k + 1 tokens, so the LM head and the sampler cost what the bucket holds (one lone request verifying
    k drafts fills the smallest bucket and samples one row, not ``spec_rows``). A step with more rows takes a
    larger bucket (``StepShapes.verify_bucket``)."""
    return min(spec_rows, max(1, -(-num_tokens_padded // positions)))
