"""/metrics after a known workload, against the fake shard: TGI's names, exact counts, buckets."""

import asyncio

import pytest
from observed_router import observed_router, stream_until_first_token_then_disconnect
from prometheus_client.parser import text_string_to_metric_families

from textgen.router.telemetry import WeightedHistogram, duration_buckets


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the page, keyed by (name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def run_workload(client, app, num_successes: int) -> None:
    for _ in range(num_successes):
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
        assert (await client.post("/generate", json=body)).status_code == 200
    invalid = {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}
    assert (await client.post("/generate", json=invalid)).status_code == 422
    await stream_until_first_token_then_disconnect(
        app, {"inputs": "Long", "parameters": {"max_new_tokens": 50}}
    )


async def test_metrics_after_a_known_workload():
    async with observed_router() as (client, app, allocator):
        await run_workload(client, app, num_successes=3)
        for _ in range(100):  # the dropped request leaves at the next step
            if allocator.num_used_blocks == 0:
                break
            await asyncio.sleep(0.01)
        response = await client.get("/metrics")
    m = scrape(response.text)
    assert m["tgi_request_count_total", ()] == 5
    assert m["tgi_request_success_total", ()] == 3
    failures = {err: m["tgi_request_failure_total", (("err", err),)] for err in _REASONS}
    assert failures == {"validation": 1, "dropped": 1, "overloaded": 0, "generation": 0}
    for name in _REQUEST_HISTOGRAMS:
        assert m[f"{name}_count", ()] == 3, name
        assert m[f"{name}_sum", ()] > 0, name
    assert m["tgi_request_generated_tokens_sum", ()] == 15
    assert m["tgi_request_input_length_count", ()] == 4  # every validated request
    assert m["tgi_request_input_length_sum", ()] == 3 * 2 + 4
    assert m["tgi_request_max_new_tokens_sum", ()] == 3 * 5 + 50
    assert m["textgen_time_to_first_token_seconds_count", ()] == 4
    prefill, decode = (("method", "prefill"),), (("method", "decode"),)
    assert m["tgi_batch_inference_count_total", prefill] == 4
    assert m["tgi_batch_inference_success_total", prefill] == 4
    assert m["tgi_batch_inference_failure_total", decode] == 0
    num_decodes = m["tgi_batch_inference_count_total", decode]
    assert num_decodes >= 3 * 4 + 1  # 4 decode steps per success, at least 1 for the dropped
    assert m["tgi_batch_inference_success_total", decode] == num_decodes
    assert m["tgi_batch_inference_duration_count", decode] == num_decodes
    assert m["tgi_batch_forward_duration_count", prefill] == 4
    assert m["tgi_batch_filter_duration_count", decode] == num_decodes
    assert m["textgen_shard_step_duration_seconds_count", (*decode, ("phase", "forward"))] > 0
    assert m["tgi_batch_next_size_count", ()] == 4
    # Every decode gave each running request one token: one ITL observation per token.
    assert m["textgen_inter_token_latency_seconds_count", ()] == num_decodes
    assert m["textgen_inter_token_latency_seconds_sum", ()] > 0
    assert m["textgen_prefix_cache_hit_tokens_total", ()] == 0
    assert m["tgi_queue_size", ()] == 0
    assert m["textgen_kv_blocks_used", ()] == 0


_REASONS = ("validation", "overloaded", "generation", "dropped")
_REQUEST_HISTOGRAMS = (
    "tgi_request_duration",
    "tgi_request_validation_duration",
    "tgi_request_queue_duration",
    "tgi_request_inference_duration",
    "tgi_request_mean_time_per_token_duration",
    "tgi_request_generated_tokens",
)


async def test_overloaded_and_concat_counters():
    async with observed_router(step_interval_s=0.005) as (client, _, _):
        body = {"inputs": "Long", "parameters": {"max_new_tokens": 40}}
        results = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(10)))
        metrics = scrape((await client.get("/metrics")).text)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 8 + [429] * 2  # max_concurrent_requests = 8
    assert metrics["tgi_request_failure_total", (("err", "overloaded"),)] == 2
    assert metrics["tgi_request_count_total", ()] == 10
    concat = sum(metrics["tgi_batch_concat_total", (("reason", r),)] for r in _CONCAT)
    assert concat == metrics["tgi_batch_next_size_count", ()] - 1  # all but the first batch


_CONCAT = ("backpressure", "wait_exceeded")


async def test_bucket_layouts_are_tgis():
    async with observed_router() as (client, _, _):
        page = (await client.get("/metrics")).text
    bounds = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if (
                sample.name.endswith("_bucket")
                and sample.labels.get("method", "decode") == "decode"
            ):
                bounds.setdefault(family.name, []).append(float(sample.labels["le"]))
    geometric = [*duration_buckets(), float("inf")]
    assert geometric[0] == pytest.approx(0.00015) and len(geometric) == 36
    assert geometric[-2] == pytest.approx(0.0001 * 1.5**35)
    for name in ("tgi_request_duration", "tgi_batch_forward_duration"):
        assert bounds[name] == geometric, name
    assert bounds["tgi_request_input_length"][:3] == [0.32, 0.64, 0.96]
    assert bounds["tgi_request_input_length"][-2:] == [32.0, float("inf")]
    assert bounds["tgi_request_generated_tokens"][-2:] == [64.0, float("inf")]
    assert bounds["tgi_batch_next_size"][-2:] == [1024.0, float("inf")]
    assert len(bounds["tgi_batch_next_size"]) == 1025


def test_weighted_histogram_counts_each_observation():
    histogram = WeightedHistogram("h", "doc", [0.1, 1.0])
    histogram.observe(0.5, 3)
    histogram.observe(2.0)
    samples = {(s.name, s.labels.get("le")): s.value for s in next(histogram.collect()).samples}
    assert samples["h_bucket", "0.1"] == 0
    assert samples["h_bucket", "1.0"] == 3
    assert samples["h_bucket", "+Inf"] == 4
    assert samples["h_count", None] == 4
    assert samples["h_sum", None] == 3.5
