"""Worker-side CSR statistics, gathered with vLLM's ``collective_rpc``.

With CSR on, the plugin installs :class:`CSRWorkerExtension` as vLLM's worker extension, so
``llm.collective_rpc("csr_stats")`` (or ``await engine_client.collective_rpc("csr_stats")``)
runs :func:`worker_stats` in every worker process, where the CSR runtimes live, and returns
one dict per worker: the numbers come from the workers, never from guesses in the caller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def worker_stats(worker: Any = None) -> dict:
    """Statistics of this process's CSR runtimes (``{"active": False}`` when CSR is not active).

    A worker holds one runtime per attention metadata builder vLLM makes (one per KV cache
    group; normally one in all). Counters, occupancy and Guard memory are summed over them
    (each runtime encodes and guards its own layers' tokens); what describes the worker (its
    layers and KV heads, dictionary, slot and per-token bytes, settings) is the first
    runtime's, since every runtime's dictionary covers all of the worker's layers.
    ``per_runtime`` holds each runtime's own report, with the same keys.
    """
    from csr_vllm.engine.backend import runtimes

    rts = runtimes()
    if not rts:
        return {"active": False}
    return {"active": True, **_describe(rts[0]), **_totals(rts), "runtimes": len(rts),
            "per_runtime": [{**_describe(rt), **_totals([rt])} for rt in rts]}


def _describe(rt: Any) -> dict[str, Any]:
    """What one runtime says about the worker: shape, slot, settings, parallel share."""
    shape = rt.dicts.shape
    local = rt.dicts.kv_heads * len(rt.dicts.layers)
    # The dense layers' store, per (token, KV head), averaged over this worker's layers.
    dense = rt.dense.bytes_per_token() / rt.dicts.kv_heads / len(rt.dicts.layers)
    return {
        # All-in: the slot with the sampled atoms' share, as vLLM sizes the pool with it, plus
        # the dense layers' store beside it.
        "bits_per_channel": 8 * (rt.layout.slot_bytes + dense) / (2 * shape.head_dim),
        "dense_layers": sorted(rt.dense.layers),
        "slot_bytes": rt.layout.slot_bytes,
        "dense_slot_bytes": 4 * shape.head_dim,  # bf16 K + V
        # This worker's share (its KV heads x its layers): sum over workers for the model.
        "kv_bytes_per_token": rt.layout.slot_bytes * local,
        "dense_bytes_per_token": 4 * shape.head_dim * local,
        **_parallel_share(rt.dicts),
        "preset": rt.settings.preset,
        "dictionary_path": rt.settings.dictionary,
        "dictionary_sha256": _tensors_sha256(rt.settings.dictionary),
        "block_size": rt.block_size,
        "adapt_atoms": rt.settings.adapt_atoms,
        "guard_window": rt.settings.guard_window,
        "encode_buckets": list(rt.stats.encode_buckets),
    }


def _totals(rts: list[Any]) -> dict[str, Any]:
    """Counters, occupancy and memory of the runtimes together."""
    stats = [rt.stats for rt in rts]
    counts = [sum(c) for c in zip(*(st.encode_bucket_counts for st in stats), strict=True)]
    err_n = sum(st.rel_error_count for st in stats)
    # window_guard: each runtime's reservation covers all of the worker's layers though it
    # allocates only for the layers it writes, so with several runtimes the sum is a bound.
    side: dict[str, int] = {}
    for rt in rts:
        for kind, n in rt.side_bytes().items():
            side[kind] = side.get(kind, 0) + n
    # Runtimes built from one dictionary share its tensors: count them once.
    dict_bytes = _dictionary_bytes(rts)
    side["dictionaries"] = dict_bytes
    sampled = _per_layer(rt.sampled_atoms() for rt in rts)  # atoms (K + V) in the pages
    return {
        "dictionary_bytes": dict_bytes,
        "side_bytes": side,
        "window_guard_tokens": sum(rt.window.tokens() for rt in rts),
        "outlier_vectors_per_layer": list(_per_layer(_outliers_per_layer(rt)
                                                     for rt in rts).values()),
        "window_guard_blocks": sum(rt.window.occupancy() for rt in rts),
        "window_guard_bytes_allocated": sum(rt.window.nbytes for rt in rts),
        # Transient (one layer at a time), so the largest, not a sum.
        "scratch_bytes_peak": max(st.scratch_bytes_peak for st in stats),
        "window_guard_capacity_blocks": sum(rt.window.capacity for rt in rts),
        "window_misses": sum(rt.window.window_misses for rt in rts),
        "outlier_vectors": sum(p.occupancy() for rt in rts for p in rt.outliers.values()),
        "sampled_atoms": sum(sampled.values()),
        "sampled_atom_bytes": sum(rt.sampled_atom_bytes() for rt in rts),
        "sampled_atoms_per_layer": list(sampled.values()),
        "encoded_vectors": sum(st.encoded_vectors for st in stats),
        "encode_calls": sum(st.encode_calls for st in stats),
        "encode_seconds_total": sum(st.encode_seconds_total for st in stats),
        "encode_bucket_counts": counts,
        "reconstruction_rel_error_mean": sum(st.rel_error_sum for st in stats) / max(err_n, 1),
        "reconstruction_rel_error_samples": err_n,
    }


def _per_layer(dicts: Iterable[dict[int, int]]) -> dict[int, int]:
    """Per-layer counts of several runtimes added up, in layer order."""
    total: dict[int, int] = {}
    for d in dicts:
        for layer, n in d.items():
            total[layer] = total.get(layer, 0) + n
    return dict(sorted(total.items()))


def _dictionary_bytes(rts: list[Any]) -> int:
    """Bytes of the distinct dictionaries the runtimes hold (a runtime's may be a new
    DictionarySet over the same atom tensors, e.g. with sampled atoms added)."""
    held = {(rt.dicts.key_atoms.data_ptr(), rt.dicts.value_atoms.data_ptr()): rt.dicts.nbytes
            for rt in rts}
    return sum(held.values())


def _tensors_sha256(folder: str | None) -> str | None:
    """The dictionary's tensor hash from its manifest (checked against the file at load)."""
    if folder is None:
        return None
    try:
        return json.loads((Path(folder) / "manifest.json").read_text()).get("tensors_sha256")
    except (OSError, ValueError):
        return None


def _outliers_per_layer(rt: Any) -> dict[int, int]:
    """Exact outlier vectors held per layer with a pool (K and V pools together)."""
    counts: dict[int, int] = {}
    for (layer, _kind), pool in rt.outliers.items():
        counts[layer] = counts.get(layer, 0) + pool.occupancy()
    return counts


def _parallel_share(dicts: Any) -> dict[str, Any]:
    """Which worker this is and what it serves (tensor/pipeline parallel ranks, global layer
    and KV head ranges, half-open)."""
    from csr_vllm.engine.parallel import current_share

    share = current_share(dicts.shape.num_layers, dicts.shape.num_kv_heads)
    return {"tp_rank": share.tp_rank, "tp_size": share.tp_size, "pp_rank": share.pp_rank,
            "pp_size": share.pp_size, "layers": [dicts.layers.start, dicts.layers.stop],
            "kv_heads": dicts.kv_heads, "kv_head_range": list(dicts.head_range or
                                                             (0, dicts.shape.num_kv_heads))}


class CSRWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): adds ``csr_stats``."""

    def csr_stats(self) -> dict:
        return worker_stats(self)
