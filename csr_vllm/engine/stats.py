"""Worker-side CSR statistics, gathered with vLLM's ``collective_rpc``.

With CSR on, the plugin installs :class:`CSRWorkerExtension` as vLLM's worker extension, so
``llm.collective_rpc("csr_stats")`` (or ``await engine_client.collective_rpc("csr_stats")``)
runs :func:`worker_stats` in every worker process, where the CSR runtimes live, and returns
one dict per worker: the numbers come from the workers, never from guesses in the caller.
"""

from __future__ import annotations

from typing import Any


def worker_stats(worker: Any = None) -> dict:
    """Statistics of this process's CSR runtimes (empty when CSR is not active)."""
    from csr_vllm.engine.backend import runtimes

    out: dict[str, Any] = {"active": False}
    for rt in runtimes():
        shape = rt.dicts.shape
        side = rt.side_bytes()
        st = rt.stats
        out = {
            "active": True,
            "bits_per_channel": rt.dicts.config.bits_per_channel(shape.head_dim),
            "slot_bytes": rt.layout.slot_bytes,
            "dense_slot_bytes": 4 * shape.head_dim,  # bf16 K + V
            "kv_bytes_per_token": rt.layout.slot_bytes * shape.num_kv_heads * shape.num_layers,
            "dense_bytes_per_token": 4 * shape.head_dim * shape.num_kv_heads * shape.num_layers,
            "side_bytes": side,
            "window_guard_blocks": rt.window.occupancy(),
            "window_guard_bytes_allocated": rt.window.nbytes,
            "scratch_bytes_peak": st.scratch_bytes_peak,
            "window_guard_capacity_blocks": rt.window.capacity,
            "window_misses": rt.window.window_misses,
            "outlier_vectors": sum(p.occupancy() for p in rt.outliers.values()),
            "encoded_vectors": st.encoded_vectors,
            "encode_calls": st.encode_calls,
            "encode_seconds_total": st.encode_seconds_total,
            "encode_buckets": list(st.encode_buckets),
            "encode_bucket_counts": list(st.encode_bucket_counts),
            "reconstruction_rel_error_mean": st.rel_error_sum / max(st.rel_error_count, 1),
        }
    return out


class CSRWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): adds ``csr_stats``."""

    def csr_stats(self) -> dict:
        return worker_stats(self)
