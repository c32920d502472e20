"""Dense layers: layers whose K and V CSR keeps exactly, in the model's dtype.

Some layers do not survive a few bits per channel. Qwen2.5-Coder-1.5B's layer 0 is one: its
pre-RoPE keys are dominated by the k_proj bias (entries up to ~380), its attention scores
reach ~3000, so a key code with 1% relative error (csr-2b's at that layer) moves scores by
several units and the softmax picks other tokens; greedy output degenerates within a few
tokens, while keeping only that layer's keys exact restores it (docs/design.md, *Dense
layers*). vLLM's TurboQuant keeps its boundary layers unquantised for the same reason.

vLLM sizes one page for every layer of a KV cache group, so a dense layer cannot have a larger
slot in the pool without making every layer's slot that large (or splitting the model into one
group per slot size, which vLLM's hybrid allocator does one layer per group here: 28 block
tables). Instead the dense layers' K/V live in a side store with the pool's own block ids:
``[NB, H, BS, 2, D]`` per dense layer, written wherever vLLM writes a slot (so prefix caching,
preemption and block reuse need no extra rules: a slot reads what vLLM last wrote to it, as in
the pages), allocated with the pool's block count at the first write and counted as side
memory (``side_bytes()["dense_layers"]``), which every capacity and bits figure includes. The
pool still holds the dense layers' (unused) code slots: their bytes count too.

Reads: the reconstruct path takes the layer's K/V from the store; decode rows read it through
the native kernel's exact-row input (:func:`full_index`, every position exact) or exact
attention in PyTorch (reference kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor


class DenseLayerStore:
    """Exact K/V of the dense layers, by physical slot (see module docstring)."""

    def __init__(self, layers: tuple[int, ...], num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.layers = frozenset(layers)
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.storage: dict[int, Tensor] = {}  # layer -> [NB, H, BS, 2, D]

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __bool__(self) -> bool:
        return bool(self.layers)

    def store(self, layer: int, kv_cache: Tensor) -> Tensor:
        """The layer's store, shaped after its pages ``kv_cache`` [NB, H, BS, C]."""
        s = self.storage.get(layer)
        nb, h, bs, _ = kv_cache.shape
        if s is None or s.shape[0] != nb or s.shape[2] != bs:
            s = self.storage[layer] = torch.zeros(nb, h, bs, 2, self.head_dim,
                                                  dtype=self.dtype)
        return s

    def write(self, layer: int, kv_cache: Tensor, key: Tensor, value: Tensor,
              slots: Tensor) -> None:
        """K/V [K, H, D] into slots [K] (all >= 0)."""
        s = self.store(layer, kv_cache)
        bs = s.shape[2]
        s[slots // bs, :, slots % bs] = torch.stack([key, value], dim=2).to(self.dtype)

    def read_blocks(self, layer: int, kv_cache: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """K, V [R * BS, H, D] of every slot of blocks [R], in block order."""
        s = self.store(layer, kv_cache)[blocks]  # [R, H, BS, 2, D]
        r, h, bs, _, d = s.shape
        kv = s.permute(0, 2, 1, 3, 4).reshape(r * bs, h, 2, d)
        return kv[:, :, 0], kv[:, :, 1]

    def read_tokens(self, layer: int, kv_cache: Tensor, phys: Tensor) -> tuple[Tensor, Tensor]:
        """K, V [T, H, D] of physical slots [T]."""
        s = self.store(layer, kv_cache)
        bs = s.shape[2]
        kv = s[phys // bs, :, phys % bs]  # [T, H, 2, D]
        return kv[:, :, 0], kv[:, :, 1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.storage.values())

    def bytes_per_token(self) -> int:
        """Side bytes one token takes in every dense layer (all KV heads)."""
        return (len(self.layers) * self.num_kv_heads * 2 * self.head_dim
                * torch.finfo(self.dtype).bits // 8)


def full_index(table: Tensor, seq_lens: Tensor, block_size: int) -> Tensor:
    """[B, W] with W = max(seq_lens): entry w of request i is the physical slot of position
    ``seq_lens[i] - 1 - W + w`` (the native kernel's exact-row index, here covering every
    position before the request's own token), -1 where that position is < 0."""
    b = len(seq_lens)
    w = int(seq_lens.max()) if b else 0
    pos = seq_lens[:, None] - 1 - w + torch.arange(w)[None, :]  # [B, W]
    ok = pos >= 0
    p = pos.clamp_min(0)
    phys = table.long().gather(1, p // block_size) * block_size + p % block_size
    return torch.where(ok, phys, torch.full_like(phys, -1))


def exact_decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """One decode query q [Hq, D] over exact K, V [T, H, D] (grouped-query): [Hq, D] fp32."""
    t, h, d = k.shape
    g = q.shape[0] // h
    qf = q.float().reshape(h, g, d)
    scores = torch.einsum("hgd,thd->hgt", qf, k.float()) * scale
    return torch.einsum("hgt,thd->hgd", scores.softmax(-1), v.float()).reshape(h * g, d)
