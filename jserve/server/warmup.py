"""Warm-up before the port opens: compile the step shapes that ordinary traffic hits first.

The engine compiles one program per (token bucket, page bucket, sampler flags) on first use; on an accelerator
that is seconds per shape, so the first clients would see multi-second TTFTs. Warm-up runs a few waves of
throw-away requests through the engine on this thread (the engine thread does not exist yet): greedy and
sampled, short to medium prompts, one and several sequences. Rarer shapes (long prompts, penalties, logprobs)
still compile on first use. Afterwards the prefix cache and its counters are reset so that served traffic
starts from a clean slate.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from jserve.engine.engine import Engine
from jserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class Wave:
    num_seqs: int
    prompt_len: int
    greedy: bool


def plan(*, page_size: int, max_model_len: int, max_num_seqs: int) -> list[Wave]:
    """Greedy and sampled; prompts of 1, 2 and 8 pages; 1 sequence and a batch of up to 16."""
    lengths = sorted({max(1, min(n * page_size - 1, max_model_len - 2)) for n in (1, 2, 8)})
    batch = min(16, max_num_seqs)
    waves = [Wave(1, length, greedy) for greedy in (True, False) for length in lengths]
    waves += [Wave(batch, lengths[0], greedy) for greedy in (True, False) if batch > 1]
    return waves


def warm_up(engine: Engine, *, page_size: int, max_num_seqs: int, max_tokens: int = 3) -> float:
    """Runs the plan, showing progress on stderr; returns the seconds it took. ``engine`` may also be a
    DataParallelEngine (same interface; its replicas are reset one by one)."""
    start = time.perf_counter()
    vocab = max(engine.vocab_size - 1, 1)
    waves = plan(page_size=page_size, max_model_len=engine.max_model_len, max_num_seqs=max_num_seqs)
    for i, wave in enumerate(tqdm(waves, desc="jserve: warm-up", unit="wave", file=sys.stderr)):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if wave.greedy else 1.0, ignore_eos=True, seed=i)
        for j in range(wave.num_seqs):
            ids = [1 + (i * 7919 + j * 104729 + k * 31) % vocab for k in range(wave.prompt_len)]
            engine.add_request(ids, params, request_id=f"warmup-{i}-{j}")
        while engine.has_unfinished():
            engine.step()
    engine.reset_prefix_cache()
    for replica in getattr(engine, "replicas", [engine]):  # the hit rate should describe served traffic only
        replica.kv_cache.num_queried_tokens = replica.kv_cache.num_hit_tokens = 0
    seconds = time.perf_counter() - start
    print(f"jserve: warm-up done in {seconds:.1f}s", file=sys.stderr, flush=True)
    return seconds
