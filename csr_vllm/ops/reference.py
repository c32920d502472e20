"""Plain-PyTorch references of the kernels (the specification they are tested against).

Built on the codec's own reference (:class:`csr_vllm.codec.codec.TensorCodec`: unpack, decode,
pursuit) and RoPE tables, so a kernel agreeing with these agrees with the CPU backend. The
codec package is imported lazily: the kernels themselves need only torch and triton.
"""

from __future__ import annotations

import torch
from torch import Tensor


def encode_store_reference(key: Tensor, value: Tensor, positions: Tensor, slot_mapping: Tensor,
                           kv_cache: Tensor, key_codec, value_codec, pre_rope: bool,
                           rope_theta: float) -> None:
    """What :func:`csr_vllm.ops.encode.encode_store` writes, through the reference codec
    (the same steps as :meth:`csr_vllm.engine.page_layout.LayerCodec.encode`)."""
    from csr_vllm.codec.rope import rope_tables, undo_rope

    n, h, d = key.shape
    slots = slot_mapping[:n].long()
    live = slots >= 0
    k, v = key[live].float(), value[live].float()
    if pre_rope:
        cos, sin = rope_tables(d, rope_theta, positions[live], torch.float32)
        k = undo_rope(k, cos[:, None], sin[:, None])
    m = k.shape[0]
    kb = key_codec.pack(key_codec.encode(k.reshape(m * h, d))).reshape(m, h, -1)
    vb = value_codec.pack(value_codec.encode(v.reshape(m * h, d))).reshape(m, h, -1)
    s = slots[live]
    bs = kv_cache.shape[2]
    kv_cache[s // bs, :, s % bs] = torch.cat([kb, vb], dim=-1)


def decode_slots(slots: Tensor, positions: Tensor, key_codec, value_codec, pre_rope: bool,
                 rope_theta: float, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """slots uint8 [N, H, Ck + Cv], positions [N] -> K (after RoPE), V [N, H, D] in ``dtype``
    (reconstruction in ``dtype``: float64 gives the exact value of the stored codes)."""
    from csr_vllm.codec.pursuit import reconstruct
    from csr_vllm.codec.rope import apply_rope, rope_tables

    n, h, _ = slots.shape
    kb = key_codec.config.slot_bytes
    out = []
    for codec, raw in ((key_codec, slots[..., :kb]), (value_codec, slots[..., kb:])):
        code = codec.unpack(raw.reshape(n * h, raw.shape[-1]).contiguous())
        atoms = codec.atoms.to(dtype)
        parts = [reconstruct(code.indices[:, c], code.coefs[:, c].to(dtype), atoms[c])
                 for c in range(codec.config.chunks)]
        out.append(torch.cat(parts, dim=1).reshape(n, h, codec.head_dim))
    k, v = out
    if pre_rope:
        cos, sin = rope_tables(k.shape[-1], rope_theta, positions, dtype)
        k = apply_rope(k, cos[:, None], sin[:, None])
    return k, v


def gather_slots(kv_cache: Tensor, block_table_row: Tensor, num_tokens: int) -> Tensor:
    """Slots [T, H, C] of a sequence's first ``num_tokens`` tokens through its block table."""
    bs = kv_cache.shape[2]
    pos = torch.arange(num_tokens, device=kv_cache.device)
    blocks = block_table_row.long()[pos // bs]
    return kv_cache[blocks, :, pos % bs]


def sparse_decode_reference(query: Tensor, kv_cache: Tensor, block_table: Tensor,
                            seq_lens: Tensor, n_tail: Tensor, tail_k: Tensor, tail_v: Tensor,
                            key_codec, value_codec, scale: float, pre_rope: bool,
                            rope_theta: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Decode attention over codes + exact tail, all arithmetic in ``dtype`` ([B, Hq, D])."""
    b, hq, d = query.shape
    h = kv_cache.shape[1]
    g = hq // h
    out = torch.empty(b, hq, d, dtype=dtype)
    for i in range(b):
        t, w = int(seq_lens[i]), int(n_tail[i])
        coded = t - w
        slots = gather_slots(kv_cache, block_table[i], coded)
        k, v = decode_slots(slots, torch.arange(coded), key_codec, value_codec, pre_rope,
                            rope_theta, dtype)
        k = torch.cat([k, tail_k[i, :w].to(dtype)])
        v = torch.cat([v, tail_v[i, :w].to(dtype)])
        q = query[i].to(dtype).reshape(h, g, d)
        scores = torch.einsum("thd,hgd->hgt", k, q) * scale
        p = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("hgt,thd->hgd", p, v).reshape(hq, d)
    return out


def decode_pages_reference(kv_cache: Tensor, blocks: Tensor, pos0: Tensor, key_codec,
                           value_codec, pre_rope: bool, rope_theta: float,
                           dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Dense pages K, V [R, block_size, H, D] of the physical ``blocks`` [R] whose first slot
    is at position ``pos0`` [R] (what :func:`csr_vllm.ops.reconstruct.decode_pages` writes),
    reconstructed in ``dtype``."""
    r = blocks.shape[0]
    _, h, bs, c = kv_cache.shape
    slots = kv_cache[blocks.long()].permute(0, 2, 1, 3).reshape(r * bs, h, c)
    pos = (pos0.long()[:, None] + torch.arange(bs)).reshape(-1)
    k, v = decode_slots(slots, pos, key_codec, value_codec, pre_rope, rope_theta, dtype)
    return k.reshape(r, bs, h, -1), v.reshape(r, bs, h, -1)
