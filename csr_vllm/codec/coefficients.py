"""Storage formats of sparse-code coefficients.

``fp16``, ``fp8`` (e4m3) store each coefficient on its own. ``intB`` (B in 3..8) stores
``round(c / scale * (2^(B-1) - 1))`` with one fp16 ``scale`` per vector, the vector's L2 norm:
every MP coefficient satisfies |c| <= ||x|| (atoms are unit-norm), so the norm is a scale known
before the pursuit starts, which lets the pursuit quantise each coefficient as it picks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_BITS = 16  # fp16 per-vector scale


@dataclass(frozen=True)
class CoefFormat:
    """One coefficient storage format: ``fp16``, ``fp8`` or ``int3``..``int8``."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ("fp16", "fp8") and not (
            self.name.startswith("int") and self.name[3:].isdigit() and 3 <= int(self.name[3:]) <= 8
        ):
            raise ValueError(f"unknown coefficient format {self.name!r}: use fp16, fp8 or int3..int8")

    @property
    def bits(self) -> int:
        """Bits per stored coefficient."""
        return {"fp16": 16, "fp8": 8}.get(self.name) or int(self.name[3:])

    @property
    def has_scale(self) -> bool:
        """True when a per-vector fp16 scale is stored."""
        return self.name.startswith("int")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scale_for(self, x: Tensor) -> Tensor:
        """Per-vector scale [N] for vectors x [N, ...] (their L2 norm, rounded to fp16)."""
        norm = x.flatten(1).norm(dim=1)
        return norm.to(torch.float16).to(x.dtype).clamp_min(1e-8)

    def encode(self, c: Tensor, scale: Tensor | None) -> Tensor:
        """Coefficients [N, K] -> integer codes [N, K] (int64, two's complement in ``bits``)."""
        if self.name == "fp16":
            return c.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        if self.name == "fp8":
            return c.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
        q = torch.round(c / scale[:, None] * self.qmax).clamp(-self.qmax, self.qmax)
        return q.to(torch.int64) & ((1 << self.bits) - 1)

    def decode(self, codes: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Integer codes [N, K] -> coefficients [N, K] in ``dtype``."""
        if self.name == "fp16":
            signed = torch.where(codes >= 1 << 15, codes - (1 << 16), codes)
            return signed.to(torch.int16).view(torch.float16).to(dtype)
        if self.name == "fp8":
            return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
        signed = torch.where(codes >= 1 << (self.bits - 1), codes - (1 << self.bits), codes)
        return signed.to(dtype) / self.qmax * scale[:, None]

    def roundtrip(self, c: Tensor, scale: Tensor | None) -> Tensor:
        """What a coefficient reads back as after storage (same shape and dtype as ``c``)."""
        flat = c.reshape(c.shape[0], -1)
        return self.decode(self.encode(flat, scale), scale, c.dtype).reshape(c.shape)
