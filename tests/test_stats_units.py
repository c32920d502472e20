"""Worker statistics (``collective_rpc("csr_stats")``) over every CSR runtime of a worker.

vLLM makes one attention metadata builder, hence one :class:`CSRRuntime`, per KV cache group.
``worker_stats`` once overwrote its report with each runtime in turn, so a worker with two
reported one runtime's counters. Here two real runtimes encode real K/V into their own layers,
as two groups would.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.engine import backend
from csr_vllm.engine.runtime import CSRRuntime
from csr_vllm.engine.settings import CSRSettings
from csr_vllm.engine.stats import worker_stats
from csr_vllm.server.aggregate import aggregate

L, H, D, BS = 2, 2, 32, 16  # layers, KV heads, head_dim, block size
SHAPE = ModelShape("LlamaForCausalLM", L, H, D, 10000.0, "tiny")
DTYPE = torch.bfloat16
# A dense window, the outlier Guard (a low threshold: random atoms code random K/V poorly)
# and sampled atoms, so that every counter has something to count.
SETTINGS = CSRSettings(guard_window=BS, guard_max_seqs=2, outlier_threshold=0.3,
                       outlier_capacity=64, adapt_atoms=2, preset=None)
NUM_BLOCKS = 8


def _dictionary(gen) -> DictionarySet:
    tcfg = TensorCodecConfig(num_atoms=64, chunks=1, atoms_per_chunk=2, coef="fp8",
                             pursuit="omp")
    a = torch.nn.functional.normalize(torch.randn(2, L, 1, 1, 64, D, generator=gen), dim=-1)
    return DictionarySet(CodecConfig(key=tcfg, value=tcfg), SHAPE, a[0], a[1])


def _encode(rt: CSRRuntime, layer: int, tokens: int, gen) -> None:
    """One prefill of ``tokens`` tokens (one request, blocks 0, 1, ...) into ``layer``."""
    kv_cache = torch.zeros(NUM_BLOCKS, H, BS, rt.layout.slot_bytes, dtype=torch.uint8)
    slots = torch.arange(tokens)
    plan = rt.plan(torch.arange(NUM_BLOCKS, dtype=torch.int32)[None],
                   torch.tensor([tokens], dtype=torch.int32),
                   torch.tensor([0, tokens], dtype=torch.int32), slots)
    k = torch.randn(tokens, H, D, generator=gen).to(DTYPE)
    v = torch.randn(tokens, H, D, generator=gen).to(DTYPE)
    rt.write(layer, plan, k, v, kv_cache, slots)


@pytest.fixture
def two_groups(gen, monkeypatch):
    """Two runtimes of one worker, over one dictionary: layer 0 in one, layer 1 in the other."""
    dicts = _dictionary(gen)
    a, b = (CSRRuntime(dicts, SETTINGS, BS, DTYPE) for _ in range(2))
    _encode(a, 0, 20, gen)
    _encode(b, 1, 45, gen)
    # The process's registry holds exactly these (none left over from other tests).
    monkeypatch.setattr(backend, "_RUNTIMES", weakref.WeakSet([a, b]))
    return dicts, a, b


def test_counters_and_memory_add_up_over_the_runtimes(two_groups):
    dicts, a, b = two_groups
    stats = worker_stats()
    assert stats["active"] and stats["runtimes"] == 2
    sa, sb = a.stats, b.stats
    assert 0 < sa.encoded_vectors < sb.encoded_vectors  # both encoded, different amounts
    assert stats["encoded_vectors"] == sa.encoded_vectors + sb.encoded_vectors
    assert stats["encode_calls"] == 2
    assert stats["encode_seconds_total"] == pytest.approx(sa.encode_seconds_total
                                                          + sb.encode_seconds_total)
    assert stats["encode_bucket_counts"] == [x + y for x, y in zip(
        sa.encode_bucket_counts, sb.encode_bucket_counts, strict=True)]
    n = sa.rel_error_count + sb.rel_error_count
    assert stats["reconstruction_rel_error_samples"] == n
    assert stats["reconstruction_rel_error_mean"] == pytest.approx(
        (sa.rel_error_sum + sb.rel_error_sum) / n)
    assert stats["scratch_bytes_peak"] == max(sa.scratch_bytes_peak, sb.scratch_bytes_peak)

    # The Guards: each runtime keeps its own pools.
    assert stats["window_guard_tokens"] == a.window.tokens() + b.window.tokens()
    assert a.window.tokens() > 0 and b.window.tokens() > 0
    assert stats["window_guard_blocks"] == a.window.occupancy() + b.window.occupancy()
    assert stats["window_guard_bytes_allocated"] == a.window.nbytes + b.window.nbytes
    assert stats["window_guard_capacity_blocks"] == a.window.capacity + b.window.capacity
    per_layer = [sum(p.occupancy() for (lay, _), p in rt.outliers.items() if lay == layer)
                 for layer, rt in ((0, a), (1, b))]
    assert min(per_layer) > 0
    assert stats["outlier_vectors_per_layer"] == per_layer
    assert stats["outlier_vectors"] == sum(per_layer)
    sampled = [a.sampled_atoms()[0], b.sampled_atoms()[1]]
    assert min(sampled) > 0 and stats["sampled_atoms_per_layer"] == sampled
    assert stats["sampled_atoms"] == sum(sampled)
    assert stats["sampled_atom_bytes"] == a.sampled_atom_bytes() + b.sampled_atom_bytes()

    # Memory outside the pool: Guards add up; the dictionary both read is held once.
    side_a, side_b = a.side_bytes(), b.side_bytes()
    assert a.dicts is not b.dicts and a.dicts.key_atoms is b.dicts.key_atoms
    assert stats["side_bytes"] == {
        "dictionaries": dicts.nbytes,
        "window_guard": side_a["window_guard"] + side_b["window_guard"],
        "outlier_guard": side_a["outlier_guard"] + side_b["outlier_guard"],
        "native_tables": side_a["native_tables"] + side_b["native_tables"],  # each its own
        "dense_layers": 0}
    assert stats["dictionary_bytes"] == dicts.nbytes

    # What describes the worker is not summed: its layers' per-token bytes are counted once.
    assert stats["kv_bytes_per_token"] == a.layout.slot_bytes * H * L
    assert stats["dense_bytes_per_token"] == 4 * D * H * L
    assert stats["layers"] == [0, L] and stats["block_size"] == BS


def test_each_runtime_is_listed_with_its_own_report(two_groups):
    _, a, b = two_groups
    stats = worker_stats()
    by_vectors = {r["encoded_vectors"]: r for r in stats["per_runtime"]}
    assert set(by_vectors) == {a.stats.encoded_vectors, b.stats.encoded_vectors}
    for rt, layer in ((a, 0), (b, 1)):
        own = by_vectors[rt.stats.encoded_vectors]
        assert own["side_bytes"] == rt.side_bytes()
        assert own["window_guard_tokens"] == rt.window.tokens()
        assert own["sampled_atoms_per_layer"] == [rt.sampled_atoms()[layer]]
        assert set(own) == set(stats) - {"active", "runtimes", "per_runtime"}


def test_one_runtime_reports_as_before(gen, monkeypatch):
    """The single-runtime case (the usual one) keeps every key's meaning."""
    dicts = _dictionary(gen)
    rt = CSRRuntime(dicts, SETTINGS, BS, DTYPE)
    _encode(rt, 1, 30, gen)
    monkeypatch.setattr(backend, "_RUNTIMES", weakref.WeakSet([rt]))
    stats = worker_stats()
    assert stats["runtimes"] == 1
    assert stats["per_runtime"] == [{k: v for k, v in stats.items()
                                     if k not in ("active", "runtimes", "per_runtime")}]
    assert stats["encoded_vectors"] == rt.stats.encoded_vectors > 0
    assert stats["side_bytes"] == rt.side_bytes()
    assert stats["dictionary_bytes"] == dicts.nbytes
    assert stats["sampled_atoms_per_layer"] == list(rt.sampled_atoms().values())
    assert stats["outlier_vectors_per_layer"] == [
        sum(p.occupancy() for p in rt.outliers.values())]
    assert stats["bits_per_channel"] == 8 * rt.layout.slot_bytes / (2 * D)


def test_no_runtime_is_inactive(monkeypatch):
    monkeypatch.setattr(backend, "_RUNTIMES", weakref.WeakSet())
    assert worker_stats() == {"active": False}


def test_the_endpoint_report_counts_both_runtimes(two_groups):
    """/csr/stats (server/aggregate.py) over a worker with two runtimes."""
    _, a, b = two_groups
    report = aggregate([worker_stats()], num_blocks=NUM_BLOCKS, block_size=BS)
    assert report["encode"]["vectors"] == a.stats.encoded_vectors + b.stats.encoded_vectors
    assert report["guard"]["window_tokens"] == a.window.tokens() + b.window.tokens()
    assert report["kv_bytes_per_token"] == a.layout.slot_bytes * H * L
    assert report["sampled_atoms"]["per_layer"] == [a.sampled_atoms()[0], b.sampled_atoms()[1]]
