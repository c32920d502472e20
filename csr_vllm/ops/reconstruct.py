"""Packed pages -> dense pages: the reconstruct read path for prefill / continuation chunks.

One program per (referenced block, KV head) decodes the block's key and value codes (keys
rotated to their positions when coded before RoPE) into dense pages ``[R, block_size, H, D]``,
the per-block layout of vLLM's Triton attention (``unified_attention`` reads
``key_cache[block, offset, head, :]``), so a chunk then attends with vLLM's own kernel over a
block table remapped onto these pages.
"""

from __future__ import annotations

import torch
import triton.language as tl

from csr_vllm.ops._fields import decode_coef, read_field
from csr_vllm.ops._triton import check_device, jit
from csr_vllm.ops.code_format import CodeFormat


@jit
def _decode_tensor(base, atoms_ptr, ladder_ptr, tm, A, D: tl.constexpr, cols, C: tl.constexpr,
                   S: tl.constexpr, DC: tl.constexpr, NBYTES: tl.constexpr, CB: tl.constexpr,
                   IB: tl.constexpr, FMT: tl.constexpr, BS: tl.constexpr):
    """Sum of coefficient-weighted atoms at columns ``cols`` [D] of each row ([BS, D])."""
    out = tl.zeros([BS, D], dtype=tl.float32)
    for k in range(C * S):
        c = k // S
        code = read_field(base, k * CB, CB, NBYTES, tm)
        idx = read_field(base, C * S * CB + k * IB, IB, NBYTES, tm)
        coef = tl.where(tm, decode_coef(code, FMT, ladder_ptr, k), 0.0)
        inch = (cols // DC) == c
        arow = atoms_ptr + (c * A + idx).to(tl.int64) * DC
        out += coef[:, None] * tl.load(arow[:, None] + (cols - c * DC)[None, :],
                                       mask=tm[:, None] & inch[None, :], other=0.0)
    return out


@jit
def _decode_pages_kernel(
    cache_ptr, scb, sch, sct, blocks_ptr, pos0_ptr, katoms_ptr, vatoms_ptr, klad_ptr, vlad_ptr,
    rcos_ptr, rsin_ptr,
    k_out, v_out, sor, sot, soh, H, KA, VA,
    BS: tl.constexpr, D: tl.constexpr,
    CK: tl.constexpr, SK: tl.constexpr, CV: tl.constexpr, SV: tl.constexpr,
    KBYTES: tl.constexpr, VBYTES: tl.constexpr, KCB: tl.constexpr, KIB: tl.constexpr,
    VCB: tl.constexpr, VIB: tl.constexpr, KFMT: tl.constexpr, VFMT: tl.constexpr,
    PRE_ROPE: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    rb = tl.arange(0, BS)
    cd = tl.arange(0, D)
    tm = rb < BS
    phys = tl.load(blocks_ptr + r).to(tl.int64)
    base = cache_ptr + phys * scb + h.to(tl.int64) * sch + rb.to(tl.int64) * sct
    k = _decode_tensor(base, katoms_ptr, klad_ptr, tm, KA, D, cd, CK, SK, D // CK, KBYTES, KCB,
                       KIB, KFMT, BS)
    if PRE_ROPE:
        partner = (cd + D // 2) % D
        kswp = _decode_tensor(base, katoms_ptr, klad_ptr, tm, KA, D, partner, CK, SK, D // CK,
                              KBYTES, KCB, KIB, KFMT, BS)
        pos = tl.load(pos0_ptr + r).to(tl.int64) + rb
        rofs = pos[:, None] * D + cd[None, :]
        sign = tl.where(cd < D // 2, -1.0, 1.0)
        k = k * tl.load(rcos_ptr + rofs) + sign[None, :] * kswp * tl.load(rsin_ptr + rofs)
    v = _decode_tensor(base + KBYTES, vatoms_ptr, vlad_ptr, tm, VA, D, cd, CV, SV, D // CV,
                       VBYTES, VCB, VIB, VFMT, BS)
    ofs = r.to(tl.int64) * sor + rb[:, None].to(tl.int64) * sot + h * soh + cd[None, :]
    tl.store(k_out + ofs, k.to(k_out.dtype.element_ty))
    tl.store(v_out + ofs, v.to(v_out.dtype.element_ty))


def decode_pages(
    kv_cache: torch.Tensor, blocks: torch.Tensor, key_atoms: torch.Tensor,
    value_atoms: torch.Tensor, key_fmt: CodeFormat, value_fmt: CodeFormat,
    key_out: torch.Tensor, value_out: torch.Tensor, pos0: torch.Tensor | None = None,
    rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None,
    key_ladder: torch.Tensor | None = None, value_ladder: torch.Tensor | None = None,
) -> None:
    """Decode the physical ``blocks`` [R] of ``kv_cache`` into ``key_out`` / ``value_out``
    [R, block_size, H, D] (any float dtype; keys after RoPE).

    ``pos0`` [R]: position of each block's first slot, with ``rope_cos`` / ``rope_sin``
    float32 [P, D] tables (P >= every position) when keys are coded before RoPE.
    ``key_ladder`` / ``value_ladder``: float32 [C, S, M] ladder tables of ``logB`` codes.
    """
    nb, h, bs, cbytes = kv_cache.shape
    check_device(kv_cache, blocks, key_atoms, value_atoms, key_out, value_out)
    r = blocks.shape[0]
    d = key_atoms.shape[0] * key_atoms.shape[2]
    if kv_cache.dtype != torch.uint8 or cbytes != key_fmt.slot_bytes + value_fmt.slot_bytes or \
            kv_cache.stride(3) != 1:
        raise ValueError("kv_cache must be uint8 with contiguous key + value code slots")
    for out in (key_out, value_out):
        if out.shape != (r, bs, h, d) or out.stride(3) != 1 or out.stride() != key_out.stride():
            raise ValueError(f"outputs must be [{r}, {bs}, {h}, {d}] with equal strides")
    for atoms, fmt, what in ((key_atoms, key_fmt, "key"), (value_atoms, value_fmt, "value")):
        want = (fmt.chunks, fmt.num_atoms, d // fmt.chunks)
        if tuple(atoms.shape) != want or atoms.dtype != torch.float32 or \
                not atoms.is_contiguous():
            raise ValueError(f"{what} atoms must be contiguous float32 {want}")
    key_fmt.check_ladder(key_ladder, "key")
    value_fmt.check_ladder(value_ladder, "value")
    if d & (d - 1) or bs & (bs - 1):
        raise NotImplementedError("head_dim and block_size must be powers of two")
    pre_rope = rope_cos is not None
    if pre_rope and (pos0 is None or rope_sin is None or pos0.shape != (r,)):
        raise ValueError("pre-RoPE keys need pos0 [R] and both rope tables")
    if r == 0:
        return
    dummy = key_atoms
    _decode_pages_kernel[(r, h)](
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), blocks,
        pos0 if pre_rope else blocks, key_atoms, value_atoms,
        dummy if key_ladder is None else key_ladder,
        dummy if value_ladder is None else value_ladder,
        rope_cos if pre_rope else dummy, rope_sin if pre_rope else dummy,
        key_out, value_out, key_out.stride(0), key_out.stride(1), key_out.stride(2),
        h, key_fmt.num_atoms, value_fmt.num_atoms,
        BS=bs, D=d, CK=key_fmt.chunks, SK=key_fmt.atoms_per_chunk, CV=value_fmt.chunks,
        SV=value_fmt.atoms_per_chunk, KBYTES=key_fmt.slot_bytes, VBYTES=value_fmt.slot_bytes,
        KCB=key_fmt.coef_bits, KIB=key_fmt.index_bits, VCB=value_fmt.coef_bits,
        VIB=value_fmt.index_bits, KFMT=key_fmt.coef_id, VFMT=value_fmt.coef_id,
        PRE_ROPE=pre_rope,
    )
