"""The server extension's pure parts: worker reports folded into /csr/stats, the Prometheus
mirror, the launcher's plugin allow-list. (The live server is tests/test_server.py.)"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csr_vllm.engine.runtime import ENCODE_BUCKETS
from csr_vllm.server.aggregate import aggregate
from csr_vllm.server.launch import capacity_line
from csr_vllm.server.metrics import GAUGES, CSRMetrics
from csr_vllm.vllm_launcher import SERVER_PLUGIN, csr_requested, plugin_allowlist


def worker(**over) -> dict:
    w = {
        "active": True, "preset": "csr-2b", "bits_per_channel": 2.0, "guard_window": 128,
        "kv_bytes_per_token": 1440, "dense_bytes_per_token": 11520,
        "side_bytes": {"dictionaries": 1000, "window_guard": 200, "outlier_guard": 10},
        "dictionary_path": "/d", "dictionary_sha256": "ab" * 32,
        "window_guard_tokens": 5, "window_guard_blocks": 1, "window_guard_capacity_blocks": 4,
        "window_guard_bytes_allocated": 64, "window_misses": 0, "outlier_vectors": 2,
        "outlier_vectors_per_layer": [1, 1], "sampled_atoms": 3, "sampled_atom_bytes": 30,
        "sampled_atoms_per_layer": [2, 1], "encoded_vectors": 100, "encode_calls": 10,
        "encode_seconds_total": 0.5, "encode_buckets": list(ENCODE_BUCKETS),
        "encode_bucket_counts": [0, 0, 0, 0, 10] + [0] * (len(ENCODE_BUCKETS) - 4),
        "reconstruction_rel_error_mean": 0.2, "reconstruction_rel_error_samples": 10,
        "scratch_bytes_peak": 7,
    }
    return w | over


def test_tensor_parallel_workers_add_up():
    r = aggregate([worker(tp_rank=0), worker(tp_rank=1, reconstruction_rel_error_mean=0.4,
                                              reconstruction_rel_error_samples=30)], 10, 128)
    assert r["kv_bytes_per_token"] == 2880 and r["dense_equivalent_bytes_per_token"] == 23040
    assert r["compression_ratio"] == 8.0
    assert r["kv_capacity_tokens"] == 1280 and r["kv_pool_bytes"] == 1280 * 2880
    assert r["dense_equivalent_capacity_tokens"] == 160 and r["capacity_ratio"] == 8.0
    assert r["side_bytes"] == {"dictionaries": 2000, "window_guard": 400, "outlier_guard": 20}
    assert r["guard"]["outlier_vectors_per_layer"] == [2, 2]  # same layers, heads split
    assert r["guard"]["bytes"] == 128 + 20
    assert r["sampled_atoms"] == {"live": 6, "bytes": 60, "per_layer": [4, 2]}
    assert r["encode"]["histogram"]["counts"][4] == 20 and r["encode"]["vectors"] == 200
    assert r["reconstruction_rel_error_mean"] == pytest.approx((0.2 * 10 + 0.4 * 30) / 40)
    assert [d["tp_rank"] for d in r["dictionaries"]] == [0, 1]


def test_pipeline_stages_concatenate_their_layers():
    r = aggregate([worker(pp_rank=1, outlier_vectors_per_layer=[7]),
                   worker(pp_rank=0, outlier_vectors_per_layer=[5, 6])], 10, 128)
    assert r["guard"]["outlier_vectors_per_layer"] == [5, 6, 7]


def test_inactive_engine_and_unknown_capacity():
    assert aggregate([{"active": False}], 10, 128)["active"] is False
    r = aggregate([worker()], None, 128)
    assert r["kv_capacity_tokens"] is None and r["dense_equivalent_capacity_tokens"] is None


def scrape(registry: CollectorRegistry) -> dict:
    text = generate_latest(registry).decode()
    return {s.name + str(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(samples: dict, name: str, **labels) -> float:
    labels = {"model_name": "m"} | labels
    return samples[name + str(sorted(labels.items()))]


def test_metrics_mirror_the_workers_totals_exactly():
    reg = CollectorRegistry()
    m = CSRMetrics("m", ENCODE_BUCKETS, writer=True, registry=reg)
    m.update(aggregate([worker()], 10, 128))
    s = scrape(reg)
    assert value(s, "csr:compression_ratio") == 8.0
    assert value(s, "csr:kv_capacity_tokens") == 1280
    assert value(s, "csr:side_bytes", kind="dictionaries") == 1000
    assert value(s, "csr:encode_seconds_count") == 10
    assert value(s, "csr:encode_seconds_sum") == pytest.approx(0.5)
    assert value(s, "csr:encoded_vectors_total") == 100
    # Later totals: the mirror adds the difference, never double counts.
    counts = [0, 0, 0, 0, 10, 5] + [0] * (len(ENCODE_BUCKETS) - 5)
    m.update(aggregate([worker(encode_calls=15, encode_seconds_total=0.9, encoded_vectors=150,
                               encode_bucket_counts=counts)], 10, 128))
    s = scrape(reg)
    assert value(s, "csr:encode_seconds_count") == 15
    assert value(s, "csr:encode_seconds_bucket", le="0.01") == 10
    assert value(s, "csr:encode_seconds_bucket", le="0.03") == 15
    assert value(s, "csr:encode_seconds_sum") == pytest.approx(0.9)
    assert value(s, "csr:encoded_vectors_total") == 150
    # A restarted engine (totals fall) restarts the mirror from its new totals.
    m.update(aggregate([worker(encode_calls=1, encode_seconds_total=0.01, encoded_vectors=3,
                               encode_bucket_counts=[0, 0, 0, 0, 1] + [0] * 5)], 10, 128))
    assert value(scrape(reg), "csr:encode_seconds_count") == 16


def test_only_the_writer_process_exports_cumulative_series():
    reg = CollectorRegistry()
    CSRMetrics("m", ENCODE_BUCKETS, writer=False, registry=reg).update(
        aggregate([worker()], 10, 128))
    names = {k.split("[")[0] for k in scrape(reg)}
    assert "csr:encode_seconds_count" not in names and "csr:encoded_vectors_total" not in names
    assert {n for n in GAUGES} <= names


def test_launcher_allowlists_the_endpoint_plugin_only_for_csr():
    assert csr_requested(["serve", "m", "--kv-cache-backend", "csr"])
    assert csr_requested(["serve", "m", "--kv-cache-backend=csr"])
    assert csr_requested(["serve", "m", "--additional-config", '{"kv_cache_backend": "csr"}'])
    assert csr_requested(["serve", "m", "--additional-config.kv_cache_backend", "csr"])
    assert not csr_requested(["serve", "m", "--kv-cache-backend", "dense"])
    assert not csr_requested(["serve", "m", "--additional-config", "{not json"])
    names = plugin_allowlist().split(",")
    assert SERVER_PLUGIN in names and "csr_vllm" in names  # the general plugin stays on


def test_capacity_line():
    line = capacity_line(aggregate([worker()], 10, 128))
    assert "1,280 tokens with csr-2b" in line and "160 tokens in bf16" in line and "8.0x" in line
    assert "dense" not in line.replace("tokens in bf16", "")
    # Dense layers (each pipeline stage names its own): said, and where their bytes are.
    stages = [worker() | {"dense_layers": [0]}, worker() | {"dense_layers": []}]
    line = capacity_line(aggregate(stages, 10, 128))
    assert "layers 0 kept dense beside the pool (side_bytes.dense_layers" in line


class _Engine:
    """The two things CSRServerState reads from vLLM's engine client, counted."""

    class _Processor:
        unfinished = 0

        def get_num_unfinished_requests(self) -> int:
            return self.unfinished

    class _Cache:
        num_gpu_blocks, block_size = 10, 128

    class _Config:
        pass

    def __init__(self) -> None:
        self.rpcs = 0
        self.output_processor = self._Processor()
        self.vllm_config = self._Config()
        self.vllm_config.cache_config = self._Cache()

    async def collective_rpc(self, method: str, timeout: float | None = None):
        assert method == "csr_stats"
        self.rpcs += 1
        return [worker(encode_calls=self.rpcs)]


def test_scrapes_refresh_only_when_something_can_have_changed():
    """A vLLM worker busy-polls for a second after each RPC: an idle server must not be
    asked at every scrape."""
    import asyncio

    from csr_vllm.server.plugin import CSRServerState

    eng = _Engine()
    reg = CollectorRegistry()
    state = CSRServerState(eng, [], CSRMetrics("m", ENCODE_BUCKETS, True, reg), min_interval=0)

    async def scrapes(n: int) -> None:
        for _ in range(n):
            await state.refresh_for_scrape(wait=True)

    asyncio.run(scrapes(3))
    assert eng.rpcs == 1  # first scrape; then idle, nothing new
    state.activity += 1  # a request came in
    asyncio.run(scrapes(2))
    assert eng.rpcs == 2
    eng.output_processor.unfinished = 1  # a request in flight: every scrape refreshes
    asyncio.run(scrapes(2))
    assert eng.rpcs == 4
    assert value(scrape(reg), "csr:encode_seconds_count") == 10  # from the last report
    throttled = CSRServerState(eng, [], None, min_interval=3600)
    asyncio.run(throttled.refresh_for_scrape(wait=True))  # no metrics here: no RPC
    assert eng.rpcs == 4
