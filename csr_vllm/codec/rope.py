"""Undo and redo rotary position embeddings (half-rotation convention, as Llama in HF and vLLM).

vLLM's attention layer receives keys after RoPE. To code keys before RoPE we rotate them back
with the same cos/sin tables, code them, and rotate the reconstruction forward again. The
rotation is orthogonal, so this is exact up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(head_dim: int, theta: float, positions: Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin tables [T, D] for integer positions [T] (default, unscaled RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., T, D] forward."""
    return x * cos + _rotate_half(x) * sin


def undo_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., T, D] back (inverse of :func:`apply_rope`)."""
    return x * cos - _rotate_half(x) * sin
