"""jserve.metrics without a server: names, the model_name label, and the engine counters read at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from jserve.metrics import OUTCOMES, ServerMetrics

STATS = {
    "pages_total": 100,
    "pages_free": 75,
    "pages_cached": 10,
    "num_running": 3,
    "num_waiting": 2,
    "num_preemptions": 1,
    "prefix_cache_hit_rate": 0.25,
    "prompt_tokens_computed": 900,
    "num_programs": 9,
    "num_programs_total": 12,  # precompile="background": 3 still being built
    "programs_lowered_while_serving": 0,
}


def _samples(metrics: ServerMetrics) -> dict[str, dict[tuple, float]]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted({"model_name": "m", **labels}.items()))]


def test_engine_state_is_exported_under_vllm_names_with_the_model_label():
    metrics = ServerMetrics(lambda: STATS, model_name="m")
    samples = _samples(metrics)
    assert _value(samples, "jserve:num_requests_running") == 3
    assert _value(samples, "jserve:num_requests_waiting") == 2
    assert _value(samples, "jserve:kv_cache_usage_perc") == 0.25
    assert _value(samples, "jserve:kv_cache_pages_used") == 25
    assert _value(samples, "jserve:num_preemptions_total") == 1
    assert _value(samples, "jserve:prompt_tokens_computed_total") == 900
    assert _value(samples, "jserve:compiled_programs") == 9
    assert _value(samples, "jserve:compiled_programs_expected") == 12
    for outcome in OUTCOMES:  # zeros exported before any event
        assert _value(samples, "jserve:requests_total", outcome=outcome) == 0
    # counters the engine does not report yet are left out rather than faked
    for name in ("prompt_tokens_recomputed", "prefix_cache_queries", "prefix_cache_hits", "spec_decode_num_drafts"):
        assert f"jserve:{name}_total" not in samples
    labelled = [labels for values in samples.values() for labels in values]
    assert labelled and all(("model_name", "m") in labels for labels in labelled)


def test_optional_engine_counters_and_speculation_appear_once_reported():
    stats = {
        **STATS,
        "prompt_tokens_recomputed": 40,
        "prefix_cache_queries": 1000,
        "prefix_cache_hits": 140,
        "spec_method": "ngram",
        "spec_num_draft_tokens": 30,
        "spec_num_accepted_tokens": 12,
        "spec_num_drafting_rows": 10,
        "spec_acceptance_rate": 0.4,
    }
    samples = _samples(ServerMetrics(lambda: stats, model_name="m"))
    assert _value(samples, "jserve:prompt_tokens_recomputed_total") == 40
    assert _value(samples, "jserve:prefix_cache_queries_total") == 1000
    assert _value(samples, "jserve:prefix_cache_hits_total") == 140
    assert _value(samples, "jserve:spec_decode_num_draft_tokens_total", method="ngram") == 30
    assert _value(samples, "jserve:spec_decode_num_accepted_tokens_total", method="ngram") == 12
    assert _value(samples, "jserve:spec_decode_num_drafts_total", method="ngram") == 10
    assert _value(samples, "jserve:spec_decode_acceptance_rate", method="ngram") == 0.4


def test_host_kv_tier_appears_once_reported():
    tier = {
        "prefix_cache_hits": 300,
        "host_tier_active": 1,
        "host_pages_total": 64,
        "host_pages_used": 40,
        "host_hit_tokens": 120,
        "host_pages_offloaded": 50,
        "host_pages_restored": 15,
        "host_pages_evicted": 3,
        "host_pages_corrupted": 1,
        "host_bytes_to_host": 5000,
        "host_bytes_to_device": 1500,
        "host_copy_seconds": 0.25,
    }
    assert "jserve:kv_host_pages_total" not in _samples(ServerMetrics(lambda: STATS, model_name="m"))
    samples = _samples(ServerMetrics(lambda: {**STATS, **tier}, model_name="m"))
    assert _value(samples, "jserve:kv_host_tier_active") == 1
    assert _value(samples, "jserve:kv_host_pages_total") == 64
    assert _value(samples, "jserve:kv_host_pages_used") == 40
    assert _value(samples, "jserve:prefix_cache_device_hits_total") == 180
    assert _value(samples, "jserve:prefix_cache_host_hits_total") == 120
    assert _value(samples, "jserve:kv_offload_pages_to_host_total") == 50
    assert _value(samples, "jserve:kv_offload_bytes_to_device_total") == 1500
    assert _value(samples, "jserve:kv_offload_copy_seconds_total") == 0.25
    assert _value(samples, "jserve:kv_host_pages_corrupted_total") == 1


def test_request_records():
    metrics = ServerMetrics(model_name="m")
    metrics.record_outcome("length")
    metrics.record_outcome("queue_full")  # a refusal is an outcome, not a success
    metrics.record_prefill(num_prompt_tokens=40, num_cached_tokens=32)
    metrics.record_request(ttft=0.5, e2e=1.5, num_output_tokens=5, queue_time=0.1)
    samples = _samples(metrics)
    assert _value(samples, "jserve:request_success_total", finished_reason="length") == 1
    assert sum(samples["jserve:request_success_total"].values()) == 1
    assert _value(samples, "jserve:requests_total", outcome="queue_full") == 1
    assert _value(samples, "jserve:prompt_tokens_total") == 40
    assert _value(samples, "jserve:prompt_tokens_cached_total") == 32
    assert _value(samples, "jserve:generation_tokens_total") == 5
    assert _value(samples, "jserve:request_time_per_output_token_seconds_sum") == 0.25  # (1.5 - 0.5) / 4
    assert _value(samples, "jserve:request_queue_time_seconds_sum") == 0.1
    assert _value(samples, "jserve:e2e_request_latency_seconds_count") == 1
