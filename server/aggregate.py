"""Fold the per-worker ``csr_stats`` dicts into the one report ``GET /csr/stats`` returns.

Pure functions (no vLLM import) so the arithmetic is unit-tested on its own. With tensor or
pipeline parallelism each worker holds a share of the layers / KV heads: per-token bytes and
memory add up across workers, occupancy adds up, and settings (preset, dictionary) must agree.
"""

from __future__ import annotations

from typing import Any


def _sum(workers: list[dict], key: str) -> float:
    return sum(w.get(key) or 0 for w in workers)


def _sum_lists(workers: list[dict], key: str) -> list[int]:
    """Element-wise sum of per-layer lists (pipeline stages hold disjoint layers; their lists
    are concatenated in stage order instead)."""
    lists = [w.get(key) or [] for w in workers]
    if len({w.get("pp_rank", 0) for w in workers}) > 1:
        by_stage: dict[int, list[int]] = {}
        for w, lst in zip(workers, lists, strict=True):
            stage = by_stage.setdefault(w.get("pp_rank", 0), [0] * len(lst))
            for i, v in enumerate(lst):
                stage[i] += v
        return [v for s in sorted(by_stage) for v in by_stage[s]]
    n = max((len(lst) for lst in lists), default=0)
    return [sum(lst[i] for lst in lists if i < len(lst)) for i in range(n)]


def aggregate(workers: list[dict[str, Any]], num_blocks: int | None,
              block_size: int | None) -> dict[str, Any]:
    """The ``/csr/stats`` report.

    Args:
        workers: ``collective_rpc("csr_stats")`` results, one dict per worker.
        num_blocks: KV blocks vLLM allocated (``cache_config.num_gpu_blocks``; None before the
            engine reported it).
        block_size: tokens per block.
    """
    active = [w for w in workers if w.get("active")]
    if not active:
        return {"active": False, "workers": len(workers),
                "reason": "the CSR KV cache is not active in this engine "
                          "(start vllm serve with --kv-cache-backend csr)"}
    first = active[0]
    kv_bpt = int(_sum(active, "kv_bytes_per_token"))
    dense_bpt = int(_sum(active, "dense_bytes_per_token"))
    capacity = num_blocks * block_size if num_blocks and block_size else None
    pool = capacity * kv_bpt if capacity is not None else None
    dense_capacity = pool // dense_bpt if pool is not None and dense_bpt else None
    side: dict[str, int] = {}
    for w in active:
        for kind, n in (w.get("side_bytes") or {}).items():
            side[kind] = side.get(kind, 0) + int(n)
    buckets = list(first.get("encode_buckets") or [])
    counts = [0] * (len(buckets) + 1)
    for w in active:
        for i, c in enumerate(w.get("encode_bucket_counts") or []):
            counts[i] += c
    vectors = int(_sum(active, "encoded_vectors"))
    seconds = float(_sum(active, "encode_seconds_total"))
    errs = [(w.get("reconstruction_rel_error_mean") or 0.0,
             w.get("reconstruction_rel_error_samples") or 0) for w in active]
    err_weight = sum(n for _, n in errs)
    dictionaries = []
    for w in active:
        entry = {"path": w.get("dictionary_path"), "sha256": w.get("dictionary_sha256"),
                 "bytes": w.get("dictionary_bytes", (w.get("side_bytes") or {}).get(
                     "dictionaries")),
                 "tp_rank": w.get("tp_rank", 0), "pp_rank": w.get("pp_rank", 0)}
        dictionaries.append(entry)
    presets = sorted({str(w.get("preset")) for w in active})
    return {
        "active": True,
        "workers": len(workers),
        "preset": first.get("preset") if len(presets) == 1 else presets,
        "bits_per_channel": first.get("bits_per_channel"),
        "dense_layers": sorted({i for w in active for i in w.get("dense_layers") or ()}),
        "guard_window": first.get("guard_window"),
        "dictionaries": dictionaries,
        "kv_bytes_per_token": kv_bpt,
        "dense_equivalent_bytes_per_token": dense_bpt,
        "compression_ratio": dense_bpt / kv_bpt if kv_bpt else None,
        "kv_pool_bytes": pool,
        "kv_capacity_tokens": capacity,
        "dense_equivalent_capacity_tokens": dense_capacity,
        "capacity_ratio": capacity / dense_capacity if capacity and dense_capacity else None,
        "side_bytes": side,
        "guard": {
            "window_tokens": int(_sum(active, "window_guard_tokens")),
            "window_blocks": int(_sum(active, "window_guard_blocks")),
            "window_capacity_blocks": int(_sum(active, "window_guard_capacity_blocks")),
            "window_bytes_allocated": int(_sum(active, "window_guard_bytes_allocated")),
            "window_misses": int(_sum(active, "window_misses")),
            "outlier_vectors": int(_sum(active, "outlier_vectors")),
            "outlier_vectors_per_layer": _sum_lists(active, "outlier_vectors_per_layer"),
            "bytes": int(_sum(active, "window_guard_bytes_allocated"))
            + int(side.get("outlier_guard", 0)),
        },
        "sampled_atoms": {
            "live": int(_sum(active, "sampled_atoms")),
            "bytes": int(_sum(active, "sampled_atom_bytes")),
            "per_layer": _sum_lists(active, "sampled_atoms_per_layer"),
        },
        "encode": {
            "vectors": vectors,
            "calls": int(_sum(active, "encode_calls")),
            "seconds_total": seconds,
            "microseconds_per_vector": 1e6 * seconds / vectors if vectors else None,
            "histogram": {"le": buckets + ["+Inf"], "counts": counts},
        },
        "reconstruction_rel_error_mean": (
            sum(e * n for e, n in errs) / err_weight if err_weight else None),
        "scratch_bytes_peak": int(max((w.get("scratch_bytes_peak") or 0) for w in active)),
        "per_worker": workers,
    }
