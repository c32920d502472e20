"""Worker-side CSR statistics, gathered with vLLM's ``collective_rpc``.

With CSR on, the plugin installs :class:`CSRWorkerExtension` as vLLM's worker extension, so
``llm.collective_rpc("csr_stats")`` (or ``await engine_client.collective_rpc("csr_stats")``)
runs :func:`worker_stats` in every worker process, where the CSR runtimes live, and returns
one dict per worker: the numbers come from the workers, never from guesses in the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def worker_stats(worker: Any = None) -> dict:
    """Statistics of this process's CSR runtimes (empty when CSR is not active)."""
    from csr_vllm.engine.backend import runtimes

    out: dict[str, Any] = {"active": False}
    for rt in runtimes():
        shape = rt.dicts.shape
        side = rt.side_bytes()
        st = rt.stats
        sampled = rt.sampled_atoms()  # layer -> atoms (K + V) held in the pages
        local = rt.dicts.kv_heads * len(rt.dicts.layers)
        out = {
            "active": True,
            # All-in: the slot with the sampled atoms' share, as vLLM sizes the pool with it.
            "bits_per_channel": 8 * rt.layout.slot_bytes / (2 * shape.head_dim),
            "slot_bytes": rt.layout.slot_bytes,
            "dense_slot_bytes": 4 * shape.head_dim,  # bf16 K + V
            # This worker's share (its KV heads x its layers): sum over workers for the model.
            "kv_bytes_per_token": rt.layout.slot_bytes * local,
            "dense_bytes_per_token": 4 * shape.head_dim * local,
            **_parallel_share(rt.dicts),
            "side_bytes": side,
            "preset": rt.settings.preset,
            "dictionary_path": rt.settings.dictionary,
            "dictionary_sha256": _tensors_sha256(rt.settings.dictionary),
            "block_size": rt.block_size,
            "window_guard_tokens": rt.window.tokens(),
            "outlier_vectors_per_layer": _outliers_per_layer(rt),
            "window_guard_blocks": rt.window.occupancy(),
            "window_guard_bytes_allocated": rt.window.nbytes,
            "scratch_bytes_peak": st.scratch_bytes_peak,
            "window_guard_capacity_blocks": rt.window.capacity,
            "window_misses": rt.window.window_misses,
            "outlier_vectors": sum(p.occupancy() for p in rt.outliers.values()),
            "adapt_atoms": rt.settings.adapt_atoms,
            "sampled_atoms": sum(sampled.values()),
            "sampled_atom_bytes": rt.sampled_atom_bytes(),
            "sampled_atoms_per_layer": list(sampled.values()),
            "encoded_vectors": st.encoded_vectors,
            "encode_calls": st.encode_calls,
            "encode_seconds_total": st.encode_seconds_total,
            "encode_buckets": list(st.encode_buckets),
            "encode_bucket_counts": list(st.encode_bucket_counts),
            "reconstruction_rel_error_mean": st.rel_error_sum / max(st.rel_error_count, 1),
            "reconstruction_rel_error_samples": st.rel_error_count,
            "guard_window": rt.settings.guard_window,
        }
    return out


def _tensors_sha256(folder: str | None) -> str | None:
    """The dictionary's tensor hash from its manifest (checked against the file at load)."""
    if folder is None:
        return None
    try:
        return json.loads((Path(folder) / "manifest.json").read_text()).get("tensors_sha256")
    except (OSError, ValueError):
        return None


def _outliers_per_layer(rt: Any) -> list[int]:
    """Exact outlier vectors held per layer (K and V pools together)."""
    counts: dict[int, int] = {}
    for (layer, _kind), pool in rt.outliers.items():
        counts[layer] = counts.get(layer, 0) + pool.occupancy()
    return [counts.get(layer, 0) for layer in sorted(counts)] if counts else []


def _parallel_share(dicts: Any) -> dict[str, Any]:
    """Which worker this is and what it serves (tensor/pipeline parallel ranks, global layer
    and KV head ranges, half-open) and the dictionary bytes it holds."""
    from csr_vllm.engine.parallel import current_share

    share = current_share(dicts.shape.num_layers, dicts.shape.num_kv_heads)
    return {"tp_rank": share.tp_rank, "tp_size": share.tp_size, "pp_rank": share.pp_rank,
            "pp_size": share.pp_size, "layers": [dicts.layers.start, dicts.layers.stop],
            "kv_heads": dicts.kv_heads, "kv_head_range": list(dicts.head_range or
                                                             (0, dicts.shape.num_kv_heads)),
            "dictionary_bytes": dicts.nbytes}


class CSRWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): adds ``csr_stats``."""

    def csr_stats(self) -> dict:
        return worker_stats(self)
