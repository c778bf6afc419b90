"""Prometheus metrics for the server: request outcomes and latencies, plus engine state read at scrape time.

Latency names follow vLLM's (time to first token, time per output token, end-to-end latency) so dashboards
carry over. Engine gauges (running/waiting, KV pages, prefix-cache hit rate, preemptions) are not pushed by
the engine thread: a collector reads ``Engine.stats()`` when Prometheus scrapes, so the hot path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

OUTCOMES = ("stop", "length", "abort", "cancelled", "deadline", "invalid", "queue_full", "unavailable", "error")
"""Request outcomes: finish reasons, then the ways a call can end before or without finishing."""

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

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self) -> Iterator:
        s = self._stats()
        gauges = {
            "jserve_num_requests_running": ("Sequences in the running batch.", s["num_running"]),
            "jserve_num_requests_waiting": ("Sequences waiting to be scheduled.", s["num_waiting"]),
            "jserve_kv_cache_pages_total": ("KV cache pages in the pool.", s["pages_total"]),
            "jserve_kv_cache_pages_used": ("KV cache pages held by requests.", s["pages_total"] - s["pages_free"]),
            "jserve_kv_cache_pages_cached": ("Unreferenced prefix-cache pages (evictable).", s["pages_cached"]),
            "jserve_prefix_cache_hit_rate": (
                "Prompt tokens served from the prefix cache / prompt tokens.",
                s["prefix_cache_hit_rate"],
            ),
            "jserve_compiled_programs": ("Step programs compiled before ready.", s["num_programs"]),
        }
        counters = {
            "jserve_num_preemptions": ("Sequences preempted for lack of KV pages.", s["num_preemptions"]),
            "jserve_prompt_tokens_computed": (
                "Prefill tokens run after prefix-cache hits.",
                s["prompt_tokens_computed"],
            ),
            "jserve_programs_lowered_while_serving": (
                "XLA programs lowered after the engine was ready (should stay 0: serving never compiles).",
                s["programs_lowered_while_serving"],
            ),
        }
        if "spec_method" in s:  # vLLM's names, per method
            for name, doc, key in (
                ("jserve_spec_decode_num_draft_tokens", "Draft tokens verified.", "spec_num_draft_tokens"),
                ("jserve_spec_decode_num_accepted_tokens", "Draft tokens accepted.", "spec_num_accepted_tokens"),
                ("jserve_spec_decode_num_drafts", "Verifications that carried drafts.", "spec_num_drafting_rows"),
            ):
                family = CounterMetricFamily(name, doc, labels=["method"])
                family.add_metric([s["spec_method"]], float(s[key]))
                yield family
            rate = GaugeMetricFamily(
                "jserve_spec_decode_acceptance_rate", "Accepted / drafted tokens.", labels=["method"]
            )
            rate.add_metric([s["spec_method"]], float(s["spec_acceptance_rate"]))
            yield rate
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """The server's metrics on their own registry (no process-global state, so tests can build several)."""

    def __init__(self, engine_stats: Callable[[], dict] | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.requests = Counter("jserve_requests", "Requests by outcome.", ["outcome"], registry=reg)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export zeros so rates exist before the first event
        self.prompt_tokens = Counter(
            "jserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=self.registry
        )
        self.generation_tokens = Counter("jserve_generation_tokens", "Generated tokens.", registry=reg)
        self.ttft = Histogram(
            "jserve_time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "jserve_time_per_output_token_seconds",
            "Time per output token after the first.",
            buckets=_TPOT_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "jserve_e2e_request_latency_seconds",
            "End-to-end request latency.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        if engine_stats is not None:
            self.registry.register(_EngineCollector(engine_stats))

    def record_outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def record_request(self, *, ttft: float | None, e2e: float, num_output_tokens: int) -> None:
        """Latencies of one request that produced output (finished or not)."""
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_output_tokens - 1))
        self.e2e.observe(e2e)
        self.generation_tokens.inc(num_output_tokens)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint on a daemon thread; returns the bound port (port 0 picks one)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(httpd.server_port)
