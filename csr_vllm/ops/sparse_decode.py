"""Paged decode attention in the sparse domain, split-K.

For one decode query per sequence and KV head ``h`` (its ``G`` query heads together, so each
code is read once for all of them), over tokens stored as codes::

    score_t = sum_s c_ts T[idx_ts]         T = (scale q) . D_K^T, [A, G], once per (seq, head)
    out     = (sum_t p_t sum_s c'_ts e_{idx'_ts}) . D_V + sum_{t exact} p_t v_t

Tokens of the exact tail (the Guard window and the in-flight tokens: the last ``n_tail`` of a
sequence, passed dense) use their exact K/V. Bytes read per coded token and KV head: the key
code twice and the value code once, ``2 Ck + Cv`` (csr-2b at head_dim 128: 96 B) against dense
bf16's ``2 * 2 * D`` = 512 B.

Pre-RoPE dictionaries: the rotation makes ``q . R_t d`` depend on the token, so no table is
shared across positions; the kernel rebuilds each key from its atoms (dictionary rows, read from
L2-resident memory), rotates it with the position's cos/sin row and takes the dot product. That
is correct but reads ``S * D`` dictionary entries per key on chip: the speed bars are designed
around post-RoPE dictionaries (the table path).

Three steps, so the value bins need no rescaling (atomic adds from every split go into one
set of bins):

1. ``ACCUMULATE=False``: each split's running max score per query head -> ``maxes``.
2. ``ACCUMULATE=True``: ``p = exp(score - max over all splits)``; ``sum p`` per split ->
   ``sums``; ``p * c`` atomically added into bins ``[B, H, Cv, A, G]``; the tail program adds
   ``sum p v`` of the exact tokens -> ``acc_exact``.
3. PyTorch: ``(bins . D_V + acc_exact) / sum(sums)`` (one ``[A] x [A, D]`` product per head).
"""

from __future__ import annotations

import torch
import triton.language as tl

from csr_vllm.ops._fields import decode_coef, read_field
from csr_vllm.ops._triton import INTERPRET, check_device, jit, next_pow2
from csr_vllm.ops.code_format import CodeFormat


@jit
def _sparse_decode_kernel(
    q_ptr, table_ptr, katoms_ptr, klad_ptr, vlad_ptr, rcos_ptr, rsin_ptr,
    cache_ptr, scb, sch, sct, bt_ptr, sbt, coded_ptr, ntail_ptr,
    tk_ptr, tv_ptr, stb, stw, sth,
    max_ptr, sum_ptr, bins_ptr, accx_ptr,
    H, A, NSP, SPLIT_BLOCKS,
    NSP_P2: tl.constexpr, BS: tl.constexpr,
    G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
    CK: tl.constexpr, SK: tl.constexpr, DCK: tl.constexpr, CV: tl.constexpr, SV: tl.constexpr,
    KBYTES: tl.constexpr, VBYTES: tl.constexpr, KCB: tl.constexpr, KIB: tl.constexpr,
    VCB: tl.constexpr, VIB: tl.constexpr, KFMT: tl.constexpr, VFMT: tl.constexpr,
    PRE_ROPE: tl.constexpr, ACCUMULATE: tl.constexpr, TAIL_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hq_total = H * G
    gi = tl.arange(0, G_P2)
    gm = gi < G
    hq = h * G + gi
    cd = tl.arange(0, D)
    row = b * hq_total + hq  # [G_P2] index of (seq, query head)
    coded = tl.load(coded_ptr + b)
    if ACCUMULATE:
        ns = tl.arange(0, NSP_P2)
        ms = tl.load(max_ptr + row[:, None] * NSP + ns[None, :],
                     mask=gm[:, None] & (ns[None, :] < NSP), other=float("-inf"))
        m_all = tl.where(gm, tl.max(ms, 1), 0.0)  # padded heads: finite, never used
    q = tl.load(q_ptr + row[:, None] * D + cd[None, :], mask=gm[:, None], other=0.0)
    m_run = tl.full([G_P2], float("-inf"), tl.float32)
    l_run = tl.zeros([G_P2], dtype=tl.float32)
    if sp < NSP - 1:
        rb = tl.arange(0, BS)
        blk_end = tl.minimum((sp + 1) * SPLIT_BLOCKS, tl.cdiv(coded, BS))
        for blk in range(sp * SPLIT_BLOCKS, blk_end):
            toks = blk * BS + rb
            tm = toks < coded
            phys = tl.load(bt_ptr + b * sbt + blk).to(tl.int64)
            base = cache_ptr + phys * scb + h.to(tl.int64) * sch + rb.to(tl.int64) * sct
            if PRE_ROPE:
                partner = (cd + D // 2) % D
                kvec = tl.zeros([BS, D], dtype=tl.float32)
                kswp = tl.zeros([BS, D], dtype=tl.float32)
                for k in range(CK * SK):
                    c = k // SK
                    code = read_field(base, k * KCB, KCB, KBYTES, tm)
                    idx = read_field(base, CK * SK * KCB + k * KIB, KIB, KBYTES, tm)
                    coef = tl.where(tm, decode_coef(code, KFMT, klad_ptr, k), 0.0)
                    arow = katoms_ptr + (c * A + idx).to(tl.int64) * DCK
                    inch = (cd // DCK) == c
                    pin = (partner // DCK) == c
                    kvec += coef[:, None] * tl.load(arow[:, None] + (cd - c * DCK)[None, :],
                                                    mask=tm[:, None] & inch[None, :], other=0.0)
                    kswp += coef[:, None] * tl.load(arow[:, None] + (partner - c * DCK)[None, :],
                                                    mask=tm[:, None] & pin[None, :], other=0.0)
                sign = tl.where(cd < D // 2, -1.0, 1.0)
                rofs = toks.to(tl.int64)[:, None] * D + cd[None, :]
                cosv = tl.load(rcos_ptr + rofs, mask=tm[:, None], other=0.0)
                sinv = tl.load(rsin_ptr + rofs, mask=tm[:, None], other=0.0)
                krot = kvec * cosv + sign[None, :] * kswp * sinv
                s = tl.sum(krot[:, None, :] * q[None, :, :], 2)
            else:
                s = tl.zeros([BS, G_P2], dtype=tl.float32)
                for k in range(CK * SK):
                    c = k // SK
                    code = read_field(base, k * KCB, KCB, KBYTES, tm)
                    idx = read_field(base, CK * SK * KCB + k * KIB, KIB, KBYTES, tm)
                    coef = tl.where(tm, decode_coef(code, KFMT, klad_ptr, k), 0.0)
                    # [B, H, CK, A, G]: the G query heads of one atom are adjacent.
                    trow = (((b * H + h) * CK + c) * A + idx).to(tl.int64) * G
                    tv = tl.load(table_ptr + trow[:, None] + gi[None, :],
                                 mask=tm[:, None] & gm[None, :], other=0.0)
                    s += coef[:, None] * tv
            s = tl.where(tm[:, None], s, float("-inf"))
            if ACCUMULATE:
                p = tl.exp(s - m_all[None, :])
                p = tl.where(tm[:, None] & gm[None, :], p, 0.0)
                l_run += tl.sum(p, 0)
                vbase = base + KBYTES
                for k in range(CV * SV):
                    c = k // SV
                    code = read_field(vbase, k * VCB, VCB, VBYTES, tm)
                    idx = read_field(vbase, CV * SV * VCB + k * VIB, VIB, VBYTES, tm)
                    coef = decode_coef(code, VFMT, vlad_ptr, k)
                    bin_row = (((b * H + h) * CV + c) * A + idx).to(tl.int64) * G
                    tl.atomic_add(bins_ptr + bin_row[:, None] + gi[None, :], p * coef[:, None],
                                  mask=tm[:, None] & gm[None, :], sem="relaxed")
            else:
                m_run = tl.maximum(m_run, tl.max(s, 0))
    else:
        nt = tl.load(ntail_ptr + b)
        acc = tl.zeros([G_P2, D], dtype=tl.float32)
        rw = tl.arange(0, TAIL_BLOCK)
        for w0 in range(0, nt, TAIL_BLOCK):
            wi = w0 + rw
            wm = wi < nt
            tofs = b.to(tl.int64) * stb + wi.to(tl.int64)[:, None] * stw + h * sth + cd[None, :]
            kk = tl.load(tk_ptr + tofs, mask=wm[:, None], other=0.0).to(tl.float32)
            s = tl.sum(kk[:, None, :] * q[None, :, :], 2)
            s = tl.where(wm[:, None], s, float("-inf"))
            if ACCUMULATE:
                p = tl.exp(s - m_all[None, :])
                p = tl.where(wm[:, None] & gm[None, :], p, 0.0)
                l_run += tl.sum(p, 0)
                vv = tl.load(tv_ptr + tofs, mask=wm[:, None], other=0.0).to(tl.float32)
                acc += tl.sum(p[:, :, None] * vv[:, None, :], 0)
            else:
                m_run = tl.maximum(m_run, tl.max(s, 0))
        if ACCUMULATE:
            tl.store(accx_ptr + row[:, None] * D + cd[None, :], acc, mask=gm[:, None])
    if ACCUMULATE:
        tl.store(sum_ptr + row * NSP + sp, l_run, mask=gm)
    else:
        tl.store(max_ptr + row * NSP + sp, m_run, mask=gm)


def sparse_decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, n_tail: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
    key_atoms: torch.Tensor, value_atoms: torch.Tensor, key_fmt: CodeFormat,
    value_fmt: CodeFormat, scale: float, rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None, max_seq_len: int | None = None,
    split_tokens: int | None = None, workspace: torch.Tensor | None = None,
    key_ladder: torch.Tensor | None = None, value_ladder: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode query per sequence over its paged CSR codes plus an exact tail.

    Args:
        query: [B, Hq, D] (after RoPE), Hq a multiple of the KV heads H.
        kv_cache: uint8 [num_blocks, H, block_size, Ck + Cv].
        block_table: int [B, max_blocks]; seq_lens: int [B] tokens per sequence (query
            token included).
        n_tail: int [B], the last ``n_tail`` tokens of each sequence are read from
            ``tail_k`` / ``tail_v`` [B, W, H, D] (row w = token seq_len - n_tail + w), not from
            their codes: the Guard window and the in-flight tokens.
        key_atoms, value_atoms: float32 [C, A, D / C]; key_fmt, value_fmt: their code layouts.
        rope_cos, rope_sin: float32 [P, D] tables by position (P >= every seq_len) when keys
            are coded before RoPE, else None.
        max_seq_len: an upper bound of seq_lens (avoids a device sync when given).
        split_tokens: tokens per split-K program (a multiple of the block size); default
            :func:`default_split_tokens`.
        workspace: float32 buffer of at least :func:`workspace_floats` elements holding the
            kernels' temporaries (so a caller can reserve them up front); None = allocate.
        key_ladder, value_ladder: float32 [C, S, M] ladder tables of ``logB`` codes
            (:meth:`CodeFormat.check_ladder`), else None.
    Returns:
        [B, Hq, D] float32.
    """
    b, hq, d = query.shape
    nb, h, bs, cbytes = kv_cache.shape
    check_device(query, kv_cache, block_table, seq_lens, n_tail, tail_k, tail_v, key_atoms,
                 value_atoms)
    if hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of {h} KV heads")
    if kv_cache.dtype != torch.uint8 or cbytes != key_fmt.slot_bytes + value_fmt.slot_bytes:
        raise ValueError("kv_cache must be uint8 with key + value code slots")
    if kv_cache.stride(3) != 1:
        raise ValueError("kv_cache slots must be contiguous bytes")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens), ("n_tail", n_tail)):
        if t.is_floating_point():
            raise ValueError(f"{name} must be integer")
    if block_table.ndim != 2 or block_table.shape[0] != b or seq_lens.shape != (b,) or \
            n_tail.shape != (b,):
        raise ValueError("block_table [B, M], seq_lens [B] and n_tail [B] must match the batch")
    if tail_k.shape != tail_v.shape or tail_k.ndim != 4 or tail_k.shape[0] != b or \
            tail_k.shape[2:] != (h, d) or tail_k.stride() != tail_v.stride() or \
            tail_k.stride(3) != 1:
        raise ValueError(f"tail_k / tail_v must be [B, W, {h}, {d}] with equal strides")
    for atoms, fmt, what in ((key_atoms, key_fmt, "key"), (value_atoms, value_fmt, "value")):
        want = (fmt.chunks, fmt.num_atoms, d // fmt.chunks)
        if d % fmt.chunks or tuple(atoms.shape) != want or atoms.dtype != torch.float32 or \
                not atoms.is_contiguous():
            raise ValueError(f"{what} atoms must be contiguous float32 {want}")
    key_fmt.check_ladder(key_ladder, "key")
    value_fmt.check_ladder(value_ladder, "value")
    if d & (d - 1) or bs & (bs - 1):
        raise NotImplementedError("head_dim and block_size must be powers of two")
    pre_rope = rope_cos is not None
    if pre_rope != (rope_sin is not None):
        raise ValueError("give both rope_cos and rope_sin or neither")
    seq_lens = seq_lens.to(torch.int32)
    n_tail = n_tail.to(torch.int32)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if b else 0
        if b and (int(seq_lens.min()) < 1 or bool((n_tail > seq_lens).any()) or
                  bool((n_tail < 0).any()) or int(n_tail.max()) > tail_k.shape[1]):
            raise ValueError("need 1 <= seq_len, 0 <= n_tail <= min(seq_len, tail rows)")
    if pre_rope:
        for t in (rope_cos, rope_sin):
            if t.ndim != 2 or t.shape[1] != d or t.shape[0] < max_seq_len or \
                    t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"rope tables must be contiguous float32 [>= {max_seq_len}, {d}]")
    if -(-max_seq_len // bs) > block_table.shape[1]:
        raise ValueError("block_table has fewer blocks than max_seq_len needs")
    out_dtype = torch.float32
    if b == 0:
        return query.new_zeros(0, hq, d, dtype=out_dtype)
    g = hq // h
    dev = query.device
    if split_tokens is None:
        split_tokens = default_split_tokens(b, h, max_seq_len, bs, dev)
    if split_tokens % bs:
        raise ValueError(f"split_tokens {split_tokens} is not a multiple of block size {bs}")
    split_blocks = split_tokens // bs
    n_splits = max(1, -(-max_seq_len // split_tokens))
    nsp = n_splits + 1  # + the exact-tail program
    qs = (query.float() * scale).contiguous()
    kf, vf = key_fmt, value_fmt
    need = workspace_floats(b, hq, h, d, kf, vf, nsp, pre_rope)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=dev)
    elif workspace.dtype != torch.float32 or workspace.numel() < need or \
            not workspace.is_contiguous() or workspace.device != dev:
        raise ValueError(f"workspace must be contiguous float32 with >= {need} elements on {dev}")
    sizes = [0 if pre_rope else b * hq * kf.chunks * kf.num_atoms,
             b * h * vf.chunks * vf.num_atoms * g, b * hq * nsp, b * hq * nsp, b * hq * d]
    table, bins, maxes, sums, acc_exact = workspace[:sum(sizes)].split(sizes)
    if pre_rope:
        table = qs  # unused stand-in
    else:
        tv = table.view(b, h, kf.chunks, kf.num_atoms, g)
        if kf.chunks == 1:
            torch.matmul(key_atoms[0], qs.view(b, h, g, d).transpose(-1, -2), out=tv[:, :, 0])
        else:
            tv.copy_(torch.einsum("bhgcd,cad->bhcag",
                                  qs.reshape(b, h, g, kf.chunks, d // kf.chunks), key_atoms))
    bins.zero_()
    bins = bins.view(b, h, vf.chunks, vf.num_atoms, g)
    maxes, sums = maxes.view(b, hq, nsp), sums.view(b, hq, nsp)
    acc_exact = acc_exact.view(b, hq, d)
    coded = (seq_lens - n_tail).contiguous()
    n_tail = n_tail.contiguous()
    rc = rope_cos if pre_rope else qs
    rs = rope_sin if pre_rope else qs
    for accumulate in (False, True):
        _sparse_decode_kernel[(b, h, nsp)](
            qs, table, key_atoms, qs if key_ladder is None else key_ladder,
            qs if value_ladder is None else value_ladder, rc, rs,
            kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            block_table, block_table.stride(0), coded, n_tail,
            tail_k, tail_v, tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
            maxes, sums, bins, acc_exact,
            h, kf.num_atoms, nsp, split_blocks,
            NSP_P2=next_pow2(nsp), BS=bs, G=g,
            G_P2=next_pow2(g), D=d, CK=kf.chunks, SK=kf.atoms_per_chunk,
            DCK=d // kf.chunks, CV=vf.chunks, SV=vf.atoms_per_chunk,
            KBYTES=kf.slot_bytes, VBYTES=vf.slot_bytes, KCB=kf.coef_bits, KIB=kf.index_bits,
            VCB=vf.coef_bits, VIB=vf.index_bits, KFMT=kf.coef_id, VFMT=vf.coef_id,
            PRE_ROPE=pre_rope, ACCUMULATE=accumulate, TAIL_BLOCK=16,
        )
    coded_out = torch.einsum("bhcag,cad->bhgcd", bins, value_atoms).reshape(b, hq, d)
    return (coded_out + acc_exact) / sums.sum(-1)[..., None]


MIN_SPLIT_BLOCKS = 8


def default_split_tokens(batch: int, kv_heads: int, max_seq_len: int, block_size: int,
                         device: torch.device) -> int:
    """Tokens per split: enough splits that batch x heads x splits fills the GPU about 4 times
    over (a batch-1 decode still spreads over every SM), at least ``MIN_SPLIT_BLOCKS`` blocks
    and at most 4096 tokens each. Interpreter: 4 blocks (tiny test shapes still split)."""
    if INTERPRET or device.type != "cuda":
        return 4 * block_size
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, -(-target // max(1, batch * kv_heads)))
    tokens = -(-max_seq_len // splits)
    tokens = -(-tokens // block_size) * block_size
    return int(min(max(tokens, MIN_SPLIT_BLOCKS * block_size), max(4096, block_size)))


def workspace_floats(batch: int, q_heads: int, kv_heads: int, head_dim: int,
                     key_fmt: CodeFormat, value_fmt: CodeFormat, num_splits: int,
                     pre_rope: bool) -> int:
    """float32 elements of the temporaries: the q.D_K table (post-RoPE), the value bins, the
    per-split maxima and sums and the exact tail's sums (``num_splits`` includes the tail's)."""
    g = q_heads // kv_heads
    table = 0 if pre_rope else batch * q_heads * key_fmt.chunks * key_fmt.num_atoms
    bins = batch * kv_heads * value_fmt.chunks * value_fmt.num_atoms * g
    return table + bins + 2 * batch * q_heads * num_splits + batch * q_heads * head_dim
