"""Prometheus metrics for the server: request outcomes, token counts and latencies, plus engine state read at
scrape time.

Names are vLLM's with our prefix (``vllm:X`` is ``jserve:X``) so dashboards carry over; what vLLM has no metric
for keeps a ``jserve:`` name that says what it is. Every series carries ``model_name`` (the served model name).
Engine gauges and counters (running/waiting, KV pages, preemptions, computed prompt tokens) are not pushed by the
engine thread: a collector reads ``Engine.stats()`` when Prometheus scrapes, so the hot path pays nothing. The
list, with meanings, is in docs/api.md ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "jserve:"
MODEL_LABEL = "model_name"

OUTCOMES = ("stop", "length", "abort", "cancelled", "deadline", "invalid", "queue_full", "unavailable", "error")
"""Request outcomes: finish reasons, then the ways a call can end before or without finishing."""
FINISHED_REASONS = ("stop", "length", "abort")
"""The outcomes of a request that ran to its end (vLLM's ``request_success`` reasons)."""

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
)


class _EngineCollector(Collector):
    """Engine state as gauges/counters, read from ``stats()`` on every scrape."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self._stats = stats
        self._model = model_name

    def _family(self, kind: type, name: str, doc: str, value: float, **labels: str):
        family = kind(PREFIX + name, doc, labels=[MODEL_LABEL, *labels])
        family.add_metric([self._model, *labels.values()], float(value))
        return family

    def collect(self) -> Iterator:
        s = self._stats()
        gauges, counters = _engine_gauges(s), _engine_counters(s)
        if "host_pages_total" in s:  # the host KV tier (--kv-offloading-size)
            tier_gauges, tier_counters = _host_tier_families(s)
            gauges += tier_gauges
            counters += tier_counters
        if "lora_slots" in s:  # multi-LoRA (--enable-lora)
            lora_gauges, lora_counters = _lora_families(s)
            gauges += lora_gauges
            counters += lora_counters
        for name, doc, value in gauges:
            yield self._family(GaugeMetricFamily, name, doc, value)
        for name, doc, value in counters:
            yield self._family(CounterMetricFamily, name, doc, value)
        if "spec_method" in s:  # vLLM's names, per method
            yield from self._speculation_families(s)

    def _speculation_families(self, s: dict) -> Iterator:
        method = s["spec_method"]
        for name, doc, key in (
            ("spec_decode_num_drafts", "Verifications that carried drafts.", "spec_num_drafting_rows"),
            ("spec_decode_num_draft_tokens", "Draft tokens verified.", "spec_num_draft_tokens"),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", "spec_num_accepted_tokens"),
        ):
            yield self._family(CounterMetricFamily, name, doc, s[key], method=method)
        yield self._family(
            GaugeMetricFamily,
            "spec_decode_acceptance_rate",
            "Accepted / verified draft tokens, since start.",
            s["spec_acceptance_rate"],
            method=method,
        )


def _engine_gauges(s: dict) -> list:
    """(name, doc, value) of the engine's gauges, from ``Engine.stats()``."""
    total = s["pages_total"]
    used = total - s["pages_free"]
    return [
        (
            "num_requests_running",
            "Sequences in the running batch (a request with n samples counts n).",
            s["num_running"],
        ),
        ("num_requests_waiting", "Sequences waiting to be scheduled.", s["num_waiting"]),
        (
            "kv_cache_usage_perc",
            "Fraction of KV cache pages held by requests, 0-1 (unreferenced prefix-cache pages count as free).",
            used / total if total else 0.0,
        ),
        ("kv_cache_pages_total", "KV cache pages in the pool.", total),
        ("kv_cache_pages_used", "KV cache pages held by requests.", used),
        (
            "kv_cache_pages_cached",
            "Unreferenced prefix-cache pages (evictable, counted as free).",
            s["pages_cached"],
        ),
        (
            "prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens looked up in it, since start.",
            s["prefix_cache_hit_rate"],
        ),
        (
            "compiled_programs",
            "Step programs built (compiled or loaded; steps, and their sampling when deferred); below "
            "compiled_programs_expected while precompile='background' builds the rest.",
            s["num_programs"],
        ),
        (
            "compiled_programs_expected",
            "Step programs the engine uses once all are built.",
            s["num_programs_total"],
        ),
    ]


def _engine_counters(s: dict) -> list:
    """(name, doc, value) of the engine's counters; the optional ones once ``Engine.stats()`` reports them."""
    counters = [
        ("num_preemptions", "Sequences preempted for lack of KV pages.", s["num_preemptions"]),
        (
            "prompt_tokens_computed",
            "Prefill tokens the engine ran: prompt_tokens_total - prompt_tokens_cached_total + "
            "prompt_tokens_recomputed_total (up to requests in flight).",
            s["prompt_tokens_computed"],
        ),
        (
            "engine_step_failures",
            "Engine steps that raised; their requests were recomputed, and any that failed alone refused.",
            s.get("num_step_failures", 0),
        ),
        (
            "programs_lowered_while_serving",
            "XLA programs lowered after the engine was ready (should stay 0: serving never compiles).",
            s["programs_lowered_while_serving"],
        ),
    ]
    optional = [  # only once Engine.stats() reports them
        (
            "prompt_tokens_recomputed",
            "Tokens prefilled again after a preemption (the prompt and what was generated before it); "
            "prompt_tokens_computed_total = prompt_tokens_total - prompt_tokens_cached_total + this.",
            "prompt_tokens_recomputed",
        ),
        ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
        ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ]
    return counters + [(name, doc, s[key]) for name, doc, key in optional if key in s]


def _lora_families(s: dict) -> tuple[list, list]:
    """(gauges, counters) of multi-LoRA, from ``Engine.stats()``."""
    gauges = [
        ("lora_slots", "Adapter slots on the device (max_loras).", s["lora_slots"]),
        ("lora_adapters_resident", "Adapters in device slots.", s["lora_resident"]),
        ("lora_adapters_on_host", "Adapters loaded in host memory (max_cpu_loras).", s["lora_on_host"]),
    ]
    counters = [
        ("lora_loads", "Adapters written into a device slot.", s["lora_loads"]),
        ("lora_evictions", "Resident adapters replaced in their slot by another.", s["lora_evictions"]),
        ("lora_slot_waits", "Requests that waited for an adapter slot.", s["lora_slot_waits"]),
        (
            "lora_slot_wait_seconds",
            "Seconds requests spent waiting for an adapter slot.",
            s["lora_slot_wait_seconds"],
        ),
    ]
    return gauges, counters


def _host_tier_families(s: dict) -> tuple[list, list]:
    """(gauges, counters) of the host KV tier, from ``Engine.stats()``."""
    gauges = [
        (
            "kv_host_tier_active",
            "1 while the host tier runs; 0 where restoring a page was measured to cost more than recomputing it.",
            s["host_tier_active"],
        ),
        ("kv_host_pages_total", "Pages the host tier holds (kv_offloading_size).", s["host_pages_total"]),
        ("kv_host_pages_used", "Host pages holding a cached page.", s["host_pages_used"]),
    ]
    counters = [
        (
            "prefix_cache_device_hits",
            "Prompt tokens found in the device tier of the prefix cache.",
            s["prefix_cache_hits"] - s["host_hit_tokens"],
        ),
        ("prefix_cache_host_hits", "Prompt tokens found in the host tier (copied back).", s["host_hit_tokens"]),
        ("kv_offload_pages_to_host", "Evicted device pages copied to the host tier.", s["host_pages_offloaded"]),
        ("kv_offload_pages_to_device", "Host pages copied back to the device.", s["host_pages_restored"]),
        ("kv_offload_bytes_to_host", "Bytes copied device to host.", s["host_bytes_to_host"]),
        ("kv_offload_bytes_to_device", "Bytes copied host to device.", s["host_bytes_to_device"]),
        (
            "kv_offload_copy_seconds",
            "Engine-thread seconds spent issuing and landing the copies.",
            s["host_copy_seconds"],
        ),
        ("kv_host_pages_evicted", "Host pages dropped for newer ones (LRU).", s["host_pages_evicted"]),
        ("kv_host_pages_corrupted", "Host pages that failed their checksum (recomputed).", s["host_pages_corrupted"]),
    ]
    return gauges, counters


class ServerMetrics:
    """The server's metrics on their own registry (no process-global state, so tests can build several)."""

    def __init__(
        self,
        engine_stats: Callable[[], dict] | None = None,
        registry: CollectorRegistry | None = None,
        *,
        model_name: str = "",
    ):
        self.registry = reg = registry or CollectorRegistry()
        self.model_name = model_name

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(PREFIX + name, doc, [MODEL_LABEL, *labels], registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(PREFIX + name, doc, [MODEL_LABEL], buckets=buckets, registry=reg).labels(model_name)

        self._requests = counter("requests", "Calls by outcome: finish reasons, then refusals and cut-offs.", "outcome")
        for outcome in OUTCOMES:
            self._requests.labels(model_name, outcome)  # export zeros so rates exist before the first event
        self._success = counter(
            "request_success", "Requests that ran to their end, by finish reason.", "finished_reason"
        )
        for reason in FINISHED_REASONS:
            self._success.labels(model_name, reason)
        self.prompt_tokens = counter(
            "prompt_tokens",
            "Prompt tokens of requests whose prefill finished (cache hits included); "
            "prompt_tokens_computed_total = this - prompt_tokens_cached_total + prompt_tokens_recomputed_total.",
        ).labels(model_name)
        self.prompt_tokens_cached = counter(
            "prompt_tokens_cached", "Prompt tokens of those requests served from the prefix cache, not computed."
        ).labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Generated tokens.").labels(model_name)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between two outputs of a request that carried tokens.", _TPOT_BUCKETS
        )
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (end-to-end latency - time to first token) / (output tokens - 1).",
            _TPOT_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds", "Time from arrival to first being scheduled.", _LATENCY_BUCKETS
        )
        if engine_stats is not None:
            self.registry.register(_EngineCollector(engine_stats, model_name))

    def record_outcome(self, outcome: str) -> None:
        self._requests.labels(self.model_name, outcome).inc()
        if outcome in FINISHED_REASONS:
            self._success.labels(self.model_name, outcome).inc()

    def record_prefill(self, *, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """A request's prefill finished (its first token came)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prompt_tokens_cached.inc(num_cached_tokens)

    def record_request(
        self, *, ttft: float | None, e2e: float, num_output_tokens: int, queue_time: float | None = None
    ) -> None:
        """Latencies of one request that produced output (finished or not)."""
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_output_tokens - 1))
        if queue_time is not None:
            self.queue.observe(max(queue_time, 0.0))
        self.e2e.observe(e2e)
        self.generation_tokens.inc(num_output_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for a /metrics endpoint."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint on a daemon thread; returns the bound port (port 0 picks one)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(httpd.server_port)
