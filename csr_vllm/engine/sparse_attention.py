"""Decode attention in the sparse domain (read path ``sparse``), plain PyTorch.

For one decode query against T cached tokens whose K and V are sparse codes (indices ``idx``,
coefficients ``c`` into unit-norm dictionaries ``D_K``, ``D_V``)::

    score_t = q . k_t        post-RoPE keys: sum_s c_ts (q D_K^T)[idx_ts]   (q D_K^T once, [A])
                             pre-RoPE keys:  the key is rebuilt and rotated (RoPE makes q . R_t d
                                             depend on t, so no per-atom table is shared)
    out     = sum_t p_t v_t = (sum_t p_t sum_s c_ts e_{idx_ts}) D_V     (scatter p*c into A bins,
                                                                       then one [A] x [A, D])

So the value side reads S (index, coefficient) pairs per token instead of D channels, plus one
pass over the dictionary per query head. Tokens held exactly (the dense window, outliers, the
query's own token) use their exact K/V instead of their codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from csr_vllm.codec.rope import apply_rope, rope_tables


def _chunked(x: Tensor, chunks: int) -> Tensor:
    return x.reshape(*x.shape[:-1], chunks, x.shape[-1] // chunks)


def sparse_decode_attention(
    q: Tensor,
    k_idx: Tensor, k_coef: Tensor, key_atoms: Tensor,
    v_idx: Tensor, v_coef: Tensor, value_atoms: Tensor,
    positions: Tensor, exact_k_mask: Tensor, exact_k: Tensor, exact_v_mask: Tensor,
    exact_v: Tensor,
    scale: float, pre_rope: bool, rope_theta: float,
    k_extra: Tensor | None = None, v_extra: Tensor | None = None,
) -> Tensor:
    """One decode query over T coded tokens.

    Args:
        q: [Hq, D] query (after RoPE); Hq = H * g (grouped-query attention).
        k_idx, k_coef: [T, H, Ck, Sk] key codes; key_atoms [Ck, A, D/Ck].
        v_idx, v_coef: [T, H, Cv, Sv] value codes; value_atoms [Cv, A, D/Cv].
        positions: [T] token positions.
        exact_k_mask / exact_v_mask: [T, H] bool, keys / values read exactly (window, outliers,
            the query's own token); exact_k / exact_v [T, H, D] those exact vectors.
        k_extra / v_extra: [T, H, D] or None, a dense part added to each coded vector (the
            entries that address a block's sampled atoms; keys in the coded frame, i.e.
            before RoPE for pre-RoPE dictionaries).
    Returns:
        [Hq, D] attention output (float32).
    """
    t, h, ck, _ = k_idx.shape
    hq, d = q.shape
    g = hq // h
    q = q.float().reshape(h, g, d)
    heads = torch.arange(h)[None, :, None, None]
    chunk = torch.arange(ck)[None, None, :, None]

    if pre_rope:
        rec = (k_coef[..., None] * key_atoms[chunk, k_idx]).sum(3).reshape(t, h, d)
        if k_extra is not None:
            rec = rec + k_extra.float()
        cos, sin = rope_tables(d, rope_theta, positions)
        rec = apply_rope(rec, cos[:, None], sin[:, None])
        scores = torch.einsum("thd,hgd->thg", rec, q)
    else:
        qd = torch.einsum("hgcd,cad->hcag", _chunked(q, ck), key_atoms)  # [H, Ck, A, g]
        scores = (k_coef[..., None] * qd[heads, chunk, k_idx]).sum((2, 3))  # [T, H, g]
        if k_extra is not None:
            scores = scores + torch.einsum("thd,hgd->thg", k_extra.float(), q)
    exact_scores = torch.einsum("thd,hgd->thg", exact_k.float(), q)
    scores = torch.where(exact_k_mask[..., None], exact_scores, scores) * scale
    p = torch.softmax(scores, dim=0)  # [T, H, g]

    cv, a = v_idx.shape[2], value_atoms.shape[1]
    coded = (~exact_v_mask).float()[..., None] * p  # weights that go through the codes
    bins = torch.zeros(h * cv * a, g)
    flat = ((torch.arange(h)[None, :, None, None] * cv + torch.arange(cv)[None, None, :, None])
            * a + v_idx)  # [T, H, Cv, Sv]
    src = coded[:, :, None, None, :] * v_coef[..., None]  # [T, H, Cv, Sv, g]
    bins.index_add_(0, flat.reshape(-1), src.reshape(-1, g))
    out = torch.einsum("hcag,cad->hgcd", bins.reshape(h, cv, a, g), value_atoms)
    out = out.reshape(h, g, d)
    if v_extra is not None:
        out = out + torch.einsum("thg,thd->hgd", coded, v_extra.float())
    out = out + torch.einsum("thg,thd->hgd", p * exact_v_mask.float()[..., None],
                             exact_v.float())
    return out.reshape(hq, d)
