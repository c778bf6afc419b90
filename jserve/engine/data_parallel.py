"""Data parallelism: independent engine replicas, each with its own page pool, scheduler and devices.

A request goes to the replica with the least load (fewest unfinished requests, then most free pages) and stays
there; ``step()`` dispatches every busy replica's step before waiting on any, so replicas on different devices
compute at the same time. Stats are sums over replicas. This is how one server batches
requests across devices without any cross-replica communication on the hot path.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

from jserve.engine.engine import Engine, speculation_counters
from jserve.outputs import RequestOutput
from jserve.sampling_params import SamplingParams

_SPEC_COUNTERS = ("spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_drafting_rows")


class DataParallelEngine:
    """The Engine interface over several replicas."""

    def __init__(self, replicas: list[Engine]):
        self.replicas = replicas
        self._owner: dict[str, Engine] = {}
        self._pending: dict[int, int] = {id(e): 0 for e in replicas}  # added but not yet scheduled
        self._lock = threading.Lock()
        self._ids = itertools.count()

    # the parts of Engine that callers read directly
    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def vocab_size(self) -> int:
        return self.replicas[0].vocab_size

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def limits(self):
        return self.replicas[0].limits

    @property
    def runner(self):
        return self.replicas[0].runner

    def grammar_compiler(self):
        return self.replicas[0].grammar_compiler()  # one compiler serves every replica

    def compile_grammar(self, params: SamplingParams):
        return self.replicas[0].compile_grammar(params)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self.replicas[0].validate(prompt_token_ids, params)

    def _load(self, engine: Engine) -> tuple[int, int]:
        stats = engine.stats()
        busy = stats["num_running"] + stats["num_waiting"] + self._pending[id(engine)]
        return busy, -stats["pages_free"]

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        **kwargs,
    ) -> str:
        if params.structured_outputs is not None and kwargs.get("grammar") is None:
            kwargs["grammar"] = self.compile_grammar(params)  # before the lock: other adds need not wait
        with self._lock:
            if request_id is None:  # ids must be unique across replicas, not just within one
                request_id = f"req-{next(self._ids)}"
            if request_id in self._owner:
                raise ValueError(f"request_id {request_id!r} is already in use")
            engine = min(self.replicas, key=self._load)
            engine.add_request(prompt_token_ids, params, request_id=request_id, **kwargs)
            self._owner[request_id] = engine
            self._pending[id(engine)] += 1
        return request_id

    def register_adapter(self, lora_request):
        """Reads an adapter into every replica's host tier (each replica has its own slots); returns a host
        copy, which any replica's ``add_request`` takes."""
        return [engine.register_adapter(lora_request) for engine in self.replicas][0]

    def unload_adapter(self, lora_int_id: int) -> None:
        for engine in self.replicas:
            engine.unload_adapter(lora_int_id)

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            engine = self._owner.get(request_id)
        if engine is not None:
            engine.abort_request(request_id)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.replicas)

    def step(self) -> list[RequestOutput]:
        """Dispatches every busy replica's step, then collects them: replicas compute concurrently."""
        outputs: list[RequestOutput] = []
        started = []
        for engine in self.replicas:
            if engine.has_unfinished():
                with self._lock:
                    self._pending[id(engine)] = 0  # begin_step drains this replica's inbox
                started.append((engine, engine.begin_step()))
        for engine, step in started:
            outputs.extend(engine.finish_step(step))
        with self._lock:
            for out in outputs:
                if out.finished:
                    self._owner.pop(out.request_id, None)
        return outputs

    def stats(self) -> dict[str, float | int]:
        per_replica = [e.stats() for e in self.replicas]
        total = {key: sum(s[key] for s in per_replica) for key in per_replica[0] if not key.startswith("spec_")}
        if "spec_method" in per_replica[0]:
            total.update(
                speculation_counters(
                    per_replica[0]["spec_method"],
                    *(sum(s[k] for s in per_replica) for k in _SPEC_COUNTERS),
                )
            )
        queried = sum(e.kv_cache.num_queried_tokens for e in self.replicas)
        hits = sum(e.kv_cache.num_hit_tokens for e in self.replicas)
        total["prefix_cache_hit_rate"] = hits / queried if queried else 0.0
        total["num_replicas"] = len(self.replicas)
        total["kv_bytes_per_token"] = per_replica[0]["kv_bytes_per_token"]  # a property of the layout, not summed
        if "host_tier_active" in total:  # the host tier: on only if on in every replica; per-page costs averaged
            total["host_tier_active"] = min(s["host_tier_active"] for s in per_replica)
            for key in [k for k in total if k.endswith("_per_page_seconds")]:
                total[key] /= len(per_replica)
        return total

    def mark_ready(self) -> None:
        for engine in self.replicas:
            engine.mark_ready()

    def reset_prefix_cache(self) -> bool:
        """Every replica's caches, both tiers; False, changing nothing, while any replica has requests running."""
        if any(e.kv_cache.holds_pages for e in self.replicas):
            return False
        return all([e.reset_prefix_cache() for e in self.replicas])
