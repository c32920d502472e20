"""The kernels as ``torch.library`` custom ops (namespace ``csr``), with fake implementations
so vLLM's compiled paths (torch.compile, CUDA graphs capture) can trace through them.

Code formats travel as 5 integers (:meth:`CodeFormat.to_ints`); optional RoPE tables as
``None`` for post-RoPE dictionaries, ladder tables as ``None`` for fp8 / fp16 codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from csr_vllm.ops.code_format import CodeFormat
from csr_vllm.ops.encode import encode_store
from csr_vllm.ops.reconstruct import decode_pages
from csr_vllm.ops.sparse_decode import sparse_decode_attention


@torch.library.custom_op("csr::encode_store", mutates_args=("kv_cache", "workspace"))
def encode_store_op(key: Tensor, value: Tensor, slot_mapping: Tensor, kv_cache: Tensor,
                    key_atoms: Tensor, value_atoms: Tensor, key_format: list[int],
                    value_format: list[int], rope_cos: Tensor | None,
                    rope_sin: Tensor | None, workspace: Tensor | None,
                    key_ladder: Tensor | None, value_ladder: Tensor | None) -> None:
    """Fused encode + store (:func:`csr_vllm.ops.encode.encode_store`)."""
    encode_store(key, value, slot_mapping, kv_cache, key_atoms, value_atoms,
                 CodeFormat.from_ints(key_format), CodeFormat.from_ints(value_format),
                 rope_cos, rope_sin, workspace=workspace, key_ladder=key_ladder,
                 value_ladder=value_ladder)


@encode_store_op.register_fake
def _encode_store_fake(key, value, slot_mapping, kv_cache, key_atoms, value_atoms, key_format,
                       value_format, rope_cos, rope_sin, workspace, key_ladder,
                       value_ladder) -> None:
    return None


@torch.library.custom_op("csr::sparse_decode", mutates_args=("workspace",))
def sparse_decode_op(query: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                     n_tail: Tensor, tail_k: Tensor, tail_v: Tensor, key_atoms: Tensor,
                     value_atoms: Tensor, key_format: list[int], value_format: list[int],
                     scale: float, rope_cos: Tensor | None, rope_sin: Tensor | None,
                     max_seq_len: int, split_tokens: int,
                     workspace: Tensor | None, key_ladder: Tensor | None,
                     value_ladder: Tensor | None) -> Tensor:
    """Sparse-domain decode attention (:func:`csr_vllm.ops.sparse_decode.
    sparse_decode_attention`); ``max_seq_len`` / ``split_tokens`` <= 0 = derive / default."""
    return sparse_decode_attention(
        query, kv_cache, block_table, seq_lens, n_tail, tail_k, tail_v, key_atoms, value_atoms,
        CodeFormat.from_ints(key_format), CodeFormat.from_ints(value_format), scale, rope_cos,
        rope_sin, max_seq_len if max_seq_len > 0 else None,
        split_tokens if split_tokens > 0 else None, workspace, key_ladder, value_ladder)


@sparse_decode_op.register_fake
def _sparse_decode_fake(query, kv_cache, block_table, seq_lens, n_tail, tail_k, tail_v,
                        key_atoms, value_atoms, key_format, value_format, scale, rope_cos,
                        rope_sin, max_seq_len, split_tokens, workspace, key_ladder,
                        value_ladder) -> Tensor:
    return query.new_empty(query.shape, dtype=torch.float32)


@torch.library.custom_op("csr::decode_pages", mutates_args=("key_out", "value_out"))
def decode_pages_op(kv_cache: Tensor, blocks: Tensor, key_atoms: Tensor, value_atoms: Tensor,
                    key_format: list[int], value_format: list[int], key_out: Tensor,
                    value_out: Tensor, pos0: Tensor | None, rope_cos: Tensor | None,
                    rope_sin: Tensor | None, key_ladder: Tensor | None,
                    value_ladder: Tensor | None) -> None:
    """Packed pages -> dense pages (:func:`csr_vllm.ops.reconstruct.decode_pages`)."""
    decode_pages(kv_cache, blocks, key_atoms, value_atoms, CodeFormat.from_ints(key_format),
                 CodeFormat.from_ints(value_format), key_out, value_out, pos0, rope_cos,
                 rope_sin, key_ladder, value_ladder)


@decode_pages_op.register_fake
def _decode_pages_fake(kv_cache, blocks, key_atoms, value_atoms, key_format, value_format,
                       key_out, value_out, pos0, rope_cos, rope_sin, key_ladder,
                       value_ladder) -> None:
    return None
