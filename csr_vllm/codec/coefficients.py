"""Storage formats of sparse-code coefficients.

``fp16``, ``fp8`` (e4m3) store each coefficient on its own. ``intB`` (B in 3..8) stores
``round(c / scale * (2^(B-1) - 1))`` with one fp16 ``scale`` per vector, the vector's L2 norm:
every MP coefficient satisfies |c| <= ||x|| (atoms are unit-norm), so the norm is a scale known
before the pursuit starts, which lets the pursuit quantise each coefficient as it picks it.

``logB`` (B in 3..6) stores a sign bit (the field's top bit) and a (B-1)-bit magnitude index
``i`` into a geometric ladder of ``M = 2^(B-1)`` levels, ``top * 2^(-O * i / (M - 1))``,
spanning ``O`` = :data:`LADDER_OCTAVES` octaves below ``top``. ``top`` is the ladder top of the
coefficient's pursuit position, calibrated per dictionary when it is trained (the 99.5th
percentile of that position's least-squares coefficients on training vectors, see
:func:`ladder_tops`), so it costs no bits per vector. Rounding is to the nearest level in the
log domain; magnitudes above ``top`` clip to it, and those below the last level (zero included)
read back as the last level. Fewer coefficient bits buy more atoms for the same slot: at
13-bit indices, ``log5`` fits 7 atoms in 128 bits where ``fp8`` fits 6 (README, *Presets*).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_BITS = 16  # fp16 per-vector scale
# Octaves a logB ladder spans below its top: in exploratory runs on SmolLM2's K/V (not in the
# results files) the best of {2, 3, 4} for log3 and of {4, 6} for log4; log5/log6 follow the
# rule. log5's 6 octaves are the setting measured in the README.
LADDER_OCTAVES = {3: 2, 4: 4, 5: 6, 6: 8}


@dataclass(frozen=True)
class CoefFormat:
    """One coefficient storage format: ``fp16``, ``fp8``, ``int3``..``int8`` or ``log3``..``log6``."""

    name: str

    def __post_init__(self) -> None:
        ok = self.name in ("fp16", "fp8") or (
            self.name[:3] in ("int", "log") and self.name[3:].isdigit()
            and 3 <= int(self.name[3:]) <= (8 if self.name[:3] == "int" else 6))
        if not ok:
            raise ValueError(f"unknown coefficient format {self.name!r}: use fp16, fp8, "
                             "int3..int8 or log3..log6")

    @property
    def bits(self) -> int:
        """Bits per stored coefficient."""
        return {"fp16": 16, "fp8": 8}.get(self.name) or int(self.name[3:])

    @property
    def uses_ladder(self) -> bool:
        """True for ``logB``: decoding needs the dictionary's per-position ladder tops."""
        return self.name.startswith("log")

    @property
    def octaves(self) -> int:
        """Octaves a ``logB`` ladder spans below its top."""
        return LADDER_OCTAVES[self.bits]

    def ladder_steps(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[M] ``2^(-O * i / (M - 1))``: level i of a ladder with top 1. One table, indexed,
        so a level reads back bit-identical whatever the tensor shape (vectorised and scalar
        ``exp2`` may differ in the last bit). Do not modify it: it is cached."""
        return _ladder_steps(self.bits, self.octaves, dtype)

    def _check_top(self, top: Tensor | None) -> Tensor:
        if top is None:
            raise ValueError(f"coefficient format {self.name} needs the dictionary's ladder tops")
        return top

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

    def encode(self, c: Tensor, scale: Tensor | None, top: Tensor | None = None) -> Tensor:
        """Coefficients [N, K] -> integer codes [N, K] (int64, two's complement in ``bits``;
        ``logB``: sign bit over the ladder index). ``top`` [K]: ladder tops (``logB`` only)."""
        if self.uses_ladder:
            levels = (1 << (self.bits - 1)) - 1
            top = self._check_top(top).to(c.dtype)
            ratio = torch.log2(top / c.abs().clamp_min(torch.finfo(c.dtype).tiny))
            i = torch.round(ratio * (levels / self.octaves)).clamp(0, levels).to(torch.int64)
            return i | ((c < 0).to(torch.int64) << (self.bits - 1))
        if self.name == "fp16":
            return c.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        if self.name == "fp8":
            return c.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
        q = torch.round(c / scale[:, None] * self.qmax).clamp(-self.qmax, self.qmax)
        return q.to(torch.int64) & ((1 << self.bits) - 1)

    def decode(self, codes: Tensor, scale: Tensor | None, dtype: torch.dtype,
               top: Tensor | None = None) -> Tensor:
        """Integer codes [N, K] -> coefficients [N, K] in ``dtype``."""
        if self.uses_ladder:
            levels = (1 << (self.bits - 1)) - 1
            mag = self._check_top(top).to(dtype) * self.ladder_steps(dtype)[codes & levels]
            return torch.where(codes >> (self.bits - 1) != 0, -mag, mag)
        if self.name == "fp16":
            signed = torch.where(codes >= 1 << 15, codes - (1 << 16), codes)
            return signed.to(torch.int16).view(torch.float16).to(dtype)
        if self.name == "fp8":
            return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
        signed = torch.where(codes >= 1 << (self.bits - 1), codes - (1 << self.bits), codes)
        return signed.to(dtype) / self.qmax * scale[:, None]

    def roundtrip(self, c: Tensor, scale: Tensor | None, top: Tensor | None = None) -> Tensor:
        """What a coefficient reads back as after storage (same shape and dtype as ``c``;
        ``top`` as in :meth:`encode`, for the flattened trailing dimensions)."""
        flat = c.reshape(c.shape[0], -1)
        return self.decode(self.encode(flat, scale, top), scale, c.dtype, top).reshape(c.shape)


@functools.cache
def _ladder_steps(bits: int, octaves: int, dtype: torch.dtype) -> Tensor:
    # Cached: the pursuit quantises every pick through it, and at a decode step's handful of
    # vectors rebuilding it cost as much as the quantisation itself.
    levels = (1 << (bits - 1)) - 1
    return torch.exp2(torch.arange(levels + 1, dtype=torch.float64)
                      * (-octaves / levels)).to(dtype)


LADDER_QUANTILE = 0.995


def ladder_positions(dim: int) -> int:
    """Pursuit positions calibrated for chunks of ``dim`` channels: a quarter of them, at
    most 32 (log5 at 4 bits per channel is 14 atoms at 64 channels and 28 at 128; calibrating
    is an OMP run of this many picks, so no more than needed)."""
    return max(1, min(32, dim // 4))


@torch.no_grad()
def ladder_tops(x: Tensor, atoms: Tensor, positions: int | None = None) -> Tensor:
    """Ladder tops [P, P] of one dictionary: entry ``[S - 1, k]`` (k < S) is the
    :data:`LADDER_QUANTILE` of |coefficient k| when OMP codes ``x`` [N, Dc] with S atoms.

    OMP's supports are nested (S atoms = the first S picks of a longer run), so one run of P
    picks gives every S; the coefficients are refit by least squares for each S, as the
    coder does. Entries above the diagonal are 0."""
    from csr_vllm.codec.pursuit import least_squares_coefficients, orthogonal_matching_pursuit

    p = positions or ladder_positions(x.shape[1])
    x = x.float()
    idx, _ = orthogonal_matching_pursuit(x, atoms.float(), p)
    tops = torch.zeros(p, p)
    for s in range(1, p + 1):
        coef = least_squares_coefficients(x, atoms.float(), idx[:, :s])
        tops[s - 1, :s] = coef.abs().quantile(LADDER_QUANTILE, dim=0)
    return tops
