"""Fused encode + store: pursuit of new K/V vectors over a layer's dictionary, packed slots
written straight into the paged cache at ``slot_mapping``.

One program takes ``M`` vectors ((token, KV head) rows) at a time, looping over row tiles
(persistent grid). Per chunk and pursuit step it streams the dictionary in ``BLOCK_A`` atom
blocks, one ``[M, Dc] x [Dc, BLOCK_A]`` fp32 product each (IEEE precision: a tf32 product would
pick other atoms than the reference), keeping the running largest positive and negative
correlation exactly as :func:`csr_vllm.codec.pursuit.best_atom` decides.

OMP without a linear solve: the least-squares fit over the chosen atoms is a projection, so the
residual is updated by modified Gram-Schmidt against an orthonormal basis of the chosen atoms
(kept in a per-program workspace). The reference's quantisation phase (coefficient k quantised,
then atoms k+1.. refit) needs the first least-squares coefficient over atoms k..S-1, which is
``<target, e_k> / |u_k|`` with ``u_k`` atom k orthogonalised against atoms k+1..S-1 (a second,
backward Gram-Schmidt). Same mathematics as the reference's ridge-regularised solves (ridge
1e-6), different float order: the bytes equal the reference's except where a near-tie in an
argmax or a coefficient at a rounding boundary of its stored format flips (tested: the
fraction of identical slots and the reconstruction error of the others).

Keys coded before RoPE are rotated back in the kernel with per-token cos/sin rows the caller
computes in float64 (as :func:`csr_vllm.codec.rope.rope_tables`).
"""

from __future__ import annotations

import torch
import triton.language as tl

from csr_vllm.ops._fields import pack_field, quantize_coef
from csr_vllm.ops._triton import INTERPRET, check_device, jit, next_pow2
from csr_vllm.ops.code_format import CodeFormat

EPS = tl.constexpr(1e-12)  # a constexpr: compiled kernels cannot read plain globals


@jit
def _encode_kernel(
    x_ptr, sxn, sxh, cos_ptr, sin_ptr, atoms_ptr, ladder_ptr, slot_ptr,
    cache_ptr, scb, sch, sct, byte_base, work_ptr,
    n_rows, H, A, BS,
    D: tl.constexpr, DC: tl.constexpr, C: tl.constexpr, S: tl.constexpr, S_P2: tl.constexpr,
    M: tl.constexpr, BLOCK_A: tl.constexpr, NB_P2: tl.constexpr, NB: tl.constexpr,
    CB: tl.constexpr, IB: tl.constexpr, COEF_FMT: tl.constexpr, OMP: tl.constexpr,
    PRE_ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_tiles = tl.cdiv(n_rows, M)
    rm = tl.arange(0, M)
    cd = tl.arange(0, DC)
    ca = tl.arange(0, BLOCK_A)
    cs = tl.arange(0, S_P2)
    cb = tl.arange(0, NB_P2)
    work = work_ptr + pid * (S * M * DC)
    wofs = rm[:, None] * DC + cd[None, :]
    idx_off = C * S * CB
    for tile in range(pid, n_tiles, nprog):
        rows = tile * M + rm
        rv = rows < n_rows
        n = rows // H
        h = rows % H
        slot = tl.load(slot_ptr + n, mask=rv, other=-1).to(tl.int64)
        live = rv & (slot >= 0)
        acc = tl.zeros([M, NB_P2], dtype=tl.int32)
        for c in range(C):
            col = c * DC + cd
            xp = x_ptr + n.to(tl.int64)[:, None] * sxn + h[:, None] * sxh
            x = tl.load(xp + col[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            if PRE_ROPE:
                partner = (col + D // 2) % D
                xr = tl.load(xp + partner[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                sign = tl.where(col < D // 2, -1.0, 1.0)
                rofs = n.to(tl.int64)[:, None] * D + col[None, :]
                cosv = tl.load(cos_ptr + rofs, mask=live[:, None], other=1.0)
                sinv = tl.load(sin_ptr + rofs, mask=live[:, None], other=0.0)
                x = x * cosv - (sign[None, :] * xr) * sinv
            atoms_c = atoms_ptr + c * A * DC
            r = x
            idx_all = tl.zeros([M, S_P2], dtype=tl.int32)
            for s in range(S):
                best_pv = tl.full([M], float("-inf"), tl.float32)
                best_pi = tl.zeros([M], dtype=tl.int32)
                best_nv = tl.full([M], float("inf"), tl.float32)
                best_ni = tl.zeros([M], dtype=tl.int32)
                for a0 in range(0, A, BLOCK_A):
                    arow = a0 + ca
                    am = arow < A
                    blk = tl.load(atoms_c + arow[:, None] * DC + cd[None, :], mask=am[:, None],
                                  other=0.0)
                    corr = tl.dot(r, tl.trans(blk), input_precision="ieee")
                    cmax = tl.where(am[None, :], corr, float("-inf"))
                    cmin = tl.where(am[None, :], corr, float("inf"))
                    vmax = tl.max(cmax, 1)
                    imax = tl.argmax(cmax, 1).to(tl.int32) + a0
                    vmin = tl.min(cmin, 1)
                    imin = tl.argmin(cmin, 1).to(tl.int32) + a0
                    up = vmax > best_pv
                    best_pv = tl.where(up, vmax, best_pv)
                    best_pi = tl.where(up, imax, best_pi)
                    dn = vmin < best_nv
                    best_nv = tl.where(dn, vmin, best_nv)
                    best_ni = tl.where(dn, imin, best_ni)
                take_min = -best_nv > best_pv
                j = tl.where(take_min, best_ni, best_pi)
                idx_all = tl.where(cs[None, :] == s, j[:, None], idx_all)
                d = tl.load(atoms_c + j[:, None] * DC + cd[None, :])
                if OMP:
                    for i in range(s):
                        qi = tl.load(work + i * M * DC + wofs)
                        d = d - tl.sum(qi * d, 1)[:, None] * qi
                    nrm = tl.sqrt(tl.sum(d * d, 1))
                    q = tl.where(nrm[:, None] > EPS, d / tl.maximum(nrm, EPS)[:, None], 0.0)
                    tl.store(work + s * M * DC + wofs, q)
                    tl.debug_barrier()
                    r = r - tl.sum(r * q, 1)[:, None] * q
                else:
                    cval = tl.where(take_min, best_nv, best_pv)
                    code, val = quantize_coef(cval, COEF_FMT, ladder_ptr, c * S + s)
                    acc = pack_field(acc, cb, (c * S + s) * CB, code)
                    acc = pack_field(acc, cb, idx_off + (c * S + s) * IB, j)
                    r = r - val[:, None] * d
            if OMP:
                # Backward Gram-Schmidt: e_k, |u_k| for atom k against atoms k+1..S-1.
                nrms = tl.zeros([M, S_P2], dtype=tl.float32)
                for kk in range(S):
                    k = S - 1 - kk
                    jk = tl.sum(tl.where(cs[None, :] == k, idx_all, 0), 1)
                    v = tl.load(atoms_c + jk[:, None] * DC + cd[None, :])
                    for i in range(k + 1, S):
                        ei = tl.load(work + i * M * DC + wofs)
                        v = v - tl.sum(ei * v, 1)[:, None] * ei
                    nrm = tl.sqrt(tl.sum(v * v, 1))
                    e = tl.where(nrm[:, None] > EPS, v / tl.maximum(nrm, EPS)[:, None], 0.0)
                    tl.debug_barrier()
                    tl.store(work + k * M * DC + wofs, e)
                    tl.debug_barrier()
                    nrms = tl.where(cs[None, :] == k, nrm[:, None], nrms)
                target = x
                for k in range(S):
                    jk = tl.sum(tl.where(cs[None, :] == k, idx_all, 0), 1)
                    ek = tl.load(work + k * M * DC + wofs)
                    nk = tl.sum(tl.where(cs[None, :] == k, nrms, 0.0), 1)
                    free = tl.where(nk > EPS, tl.sum(target * ek, 1) / tl.maximum(nk, EPS), 0.0)
                    code, val = quantize_coef(free, COEF_FMT, ladder_ptr, c * S + k)
                    acc = pack_field(acc, cb, (c * S + k) * CB, code)
                    acc = pack_field(acc, cb, idx_off + (c * S + k) * IB, jk)
                    dk = tl.load(atoms_c + jk[:, None] * DC + cd[None, :])
                    target = target - val[:, None] * dk
                tl.debug_barrier()
        dst = cache_ptr + (slot // BS) * scb + h.to(tl.int64) * sch + (slot % BS) * sct + byte_base
        tl.store(dst[:, None] + cb[None, :], acc.to(tl.uint8),
                 mask=live[:, None] & (cb[None, :] < NB))


def _check_atoms(atoms: torch.Tensor, fmt: CodeFormat, head_dim: int, what: str) -> None:
    want = (fmt.chunks, fmt.num_atoms, head_dim // fmt.chunks)
    if head_dim % fmt.chunks or tuple(atoms.shape) != want:
        raise ValueError(f"{what} atoms {tuple(atoms.shape)} do not match the code format "
                         f"(expected {want})")
    if atoms.dtype != torch.float32 or not atoms.is_contiguous():
        raise ValueError(f"{what} atoms must be contiguous float32")
    dc = want[2]
    if dc < 16 or dc & (dc - 1):
        raise NotImplementedError(f"chunk width {dc} must be a power of two >= 16 for the kernels")


def encode_store(
    key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
    key_atoms: torch.Tensor, value_atoms: torch.Tensor, key_fmt: CodeFormat,
    value_fmt: CodeFormat, rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None, block_m: int = 16, block_a: int | None = None,
    num_programs: int | None = None, workspace: torch.Tensor | None = None,
    key_ladder: torch.Tensor | None = None, value_ladder: torch.Tensor | None = None,
) -> None:
    """Encode ``key``/``value`` [N, H, D] and write their packed slots into ``kv_cache``.

    Args:
        key, value: the step's new vectors (keys after RoPE, as vLLM passes them).
        slot_mapping: [>= N] int slot per token (block * block_size + offset); < 0 = skip.
        kv_cache: uint8 [num_blocks, H, block_size, Ck + Cv] (layout:
            :mod:`csr_vllm.engine.page_layout`); the key code goes to bytes [0, Ck), the value
            code to [Ck, Ck + Cv).
        key_atoms, value_atoms: float32 [C, A, D / C] unit-norm dictionaries.
        key_fmt, value_fmt: the code layouts (:class:`CodeFormat`).
        rope_cos, rope_sin: float32 [N, D] per-token tables when keys are coded before RoPE
            (:func:`rope_rows`), else None.
        workspace: float32 scratch of the OMP basis (reserved by the caller); None = allocate.
            Its size bounds the programs: :func:`workspace_floats` per program.
        key_ladder, value_ladder: float32 [C, S, M] ladder tables of ``logB`` codes
            (:meth:`CodeFormat.check_ladder`), else None.
    """
    n, h, d = key.shape
    check_device(key, value, slot_mapping, kv_cache, key_atoms, value_atoms)
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if slot_mapping.ndim != 1 or slot_mapping.shape[0] < n or slot_mapping.is_floating_point():
        raise ValueError("slot_mapping must be an integer vector with one entry per token")
    if kv_cache.dtype != torch.uint8 or kv_cache.ndim != 4 or kv_cache.shape[1] != h:
        raise ValueError(f"kv_cache must be uint8 [blocks, {h}, block_size, slot_bytes], got "
                         f"{kv_cache.dtype} {tuple(kv_cache.shape)}")
    if kv_cache.shape[3] != key_fmt.slot_bytes + value_fmt.slot_bytes or kv_cache.stride(3) != 1:
        raise ValueError(f"kv_cache slots of {kv_cache.shape[3]} bytes do not hold a "
                         f"{key_fmt.slot_bytes} + {value_fmt.slot_bytes}-byte code")
    _check_atoms(key_atoms, key_fmt, d, "key")
    _check_atoms(value_atoms, value_fmt, d, "value")
    key_fmt.check_ladder(key_ladder, "key")
    value_fmt.check_ladder(value_ladder, "value")
    pre_rope = rope_cos is not None
    if pre_rope != (rope_sin is not None):
        raise ValueError("give both rope_cos and rope_sin or neither")
    if pre_rope:
        for t in (rope_cos, rope_sin):
            if t.shape != (n, d) or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"rope tables must be contiguous float32 [{n}, {d}]")
    if n == 0:
        return
    dummy = key_atoms  # stands in for absent tables (never read: PRE_ROPE, COEF_FMT are constants)
    for x, atoms, ladder, fmt, base, rope in (
        (key, key_atoms, key_ladder, key_fmt, 0, pre_rope),
        (value, value_atoms, value_ladder, value_fmt, key_fmt.slot_bytes, False),
    ):
        if x.stride(2) != 1:
            x = x.contiguous()
        rows = n * h
        tiles = -(-rows // block_m)
        if num_programs is None:
            progs = min(tiles, 4 if INTERPRET else
                        4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
        else:
            progs = min(tiles, num_programs)
        dc = d // fmt.chunks
        per_prog = workspace_floats(1, fmt, d, block_m)
        if workspace is None:
            work = torch.empty(progs * per_prog, dtype=torch.float32, device=x.device)
        else:
            if workspace.dtype != torch.float32 or workspace.numel() < per_prog or \
                    workspace.device != x.device:
                raise ValueError(f"workspace must be float32 with >= {per_prog} elements")
            progs = min(progs, workspace.numel() // per_prog)
            work = workspace
        ba = block_a or min(next_pow2(fmt.num_atoms), 1024 if INTERPRET else 64)
        _encode_kernel[(progs,)](
            x, x.stride(0), x.stride(1),
            rope_cos if rope else dummy, rope_sin if rope else dummy, atoms,
            dummy if ladder is None else ladder, slot_mapping,
            kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), base, work,
            rows, h, fmt.num_atoms, kv_cache.shape[2],
            D=d, DC=dc, C=fmt.chunks, S=fmt.atoms_per_chunk,
            S_P2=next_pow2(fmt.atoms_per_chunk), M=block_m, BLOCK_A=ba,
            NB_P2=next_pow2(fmt.slot_bytes), NB=fmt.slot_bytes, CB=fmt.coef_bits,
            IB=fmt.index_bits, COEF_FMT=fmt.coef_id, OMP=fmt.pursuit == "omp", PRE_ROPE=rope,
        )


def rope_rows(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """cos, sin float32 [N, D] for integer ``positions`` [N], computed in float64 (the same
    tables as :func:`csr_vllm.codec.rope.rope_tables`, half-rotation convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                        device=positions.device) / head_dim))
    f = positions.to(torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().float().contiguous(), emb.sin().float().contiguous()


def workspace_floats(num_programs: int, fmt: CodeFormat, head_dim: int, block_m: int = 16) -> int:
    """float32 elements of the encode kernel's scratch for ``num_programs`` programs (the
    orthonormal basis of the chosen atoms: S x block_m x Dc each)."""
    return num_programs * fmt.atoms_per_chunk * block_m * (head_dim // fmt.chunks)
