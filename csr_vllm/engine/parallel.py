"""What one vLLM worker serves under tensor / pipeline parallelism, and its dictionary shard.

vLLM splits a decoder model two ways, and a CSR worker needs exactly the matching part of the
dictionaries:

* Pipeline parallel: stage ``p`` runs the contiguous global layers
  ``get_pp_indices(L, p, PP)`` (vLLM's own split, ``VLLM_PP_LAYER_PARTITION`` included);
  attention layer names keep their global index (``model.layers.17.self_attn.attn``).
* Tensor parallel: rank ``t`` holds ``H / TP`` consecutive KV heads when ``H >= TP``; with
  fewer KV heads than ranks each head is replicated on ``TP / H`` consecutive ranks and rank
  ``t`` holds head ``t // (TP / H)`` (vLLM's ``QKVParallelLinear``).

Per-head dictionaries are then cut to the rank's heads; per-layer dictionaries (the default:
one dictionary shared by a layer's heads) are what every rank's heads need, so a
tensor-parallel rank keeps them whole and reports those bytes as its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from csr_vllm.codec.dictionary import DictionarySet


@dataclass(frozen=True)
class WorkerShare:
    """The global layers and KV heads one worker serves (half-open ranges)."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    layers: tuple[int, int]
    kv_heads: tuple[int, int]


def worker_share(num_layers: int, num_kv_heads: int, tp_rank: int, tp_size: int,
                 pp_rank: int, pp_size: int) -> WorkerShare:
    """The share of worker (``tp_rank``, ``pp_rank``), computed the way vLLM splits models."""
    from vllm.distributed.utils import get_pp_indices

    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over tensor parallel size "
                             f"{tp_size}")
        per_rank = num_kv_heads // tp_size
        heads = (tp_rank * per_rank, (tp_rank + 1) * per_rank)
    else:
        if tp_size % num_kv_heads:
            raise ValueError(f"tensor parallel size {tp_size} is not a multiple of the "
                             f"{num_kv_heads} KV heads")
        head = tp_rank // (tp_size // num_kv_heads)
        heads = (head, head + 1)
    layers = get_pp_indices(num_layers, pp_rank, pp_size)
    return WorkerShare(tp_rank, tp_size, pp_rank, pp_size, tuple(layers), heads)


def current_share(num_layers: int, num_kv_heads: int) -> WorkerShare:
    """This worker's share, from vLLM's initialised parallel state (1 x 1 outside a worker)."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return worker_share(num_layers, num_kv_heads, 0, 1, 0, 1)
    pp = ps.get_pp_group()
    return worker_share(num_layers, num_kv_heads, ps.get_tensor_model_parallel_rank(),
                        ps.get_tensor_model_parallel_world_size(), pp.rank_in_group,
                        pp.world_size)


def shard_for_worker(dicts: DictionarySet, share: WorkerShare) -> DictionarySet:
    """The dictionaries ``share``'s layers and KV heads need (the full set when it is all)."""
    return dicts.shard(layers=share.layers, heads=share.kv_heads)
