"""The packed code layout of one tensor (K or V), as plain integers the kernels take.

Mirrors :class:`csr_vllm.codec.config.TensorCodecConfig` and the bit stream of
:mod:`csr_vllm.codec.packing` (fields LSB first: C*S coefficients, then C*S indices, zero
padding) without importing the codec package, so kernels run where only torch and triton exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The formats the kernels implement: no per-vector scale. A ``logB`` code is read through its
# layer's ladder table (:attr:`CodeFormat.uses_ladder`); its id is B, so ids stay distinct.
COEF_FORMATS = {"fp8": 8, "fp16": 16} | {f"log{b}": b for b in range(3, 7)}
COEF_IDS = {"fp8": 0, "fp16": 1} | {f"log{b}": b for b in range(3, 7)}


@dataclass(frozen=True)
class CodeFormat:
    """One tensor's code: ``chunks`` x ``atoms_per_chunk`` (coefficient, index) fields."""

    num_atoms: int
    chunks: int
    atoms_per_chunk: int
    coef: str
    pursuit: str = "omp"

    def __post_init__(self) -> None:
        if self.coef not in COEF_FORMATS:
            raise NotImplementedError(
                f"the Triton kernels implement coefficient formats {sorted(COEF_FORMATS)}; "
                f"{self.coef!r} (a per-vector-scale intB format) runs on the CPU backend only")
        if self.pursuit not in ("mp", "omp"):
            raise ValueError(f"pursuit must be 'mp' or 'omp', got {self.pursuit!r}")
        if self.num_atoms < 2 or self.chunks < 1 or self.atoms_per_chunk < 1:
            raise ValueError(f"invalid code format {self}")

    @classmethod
    def of(cls, config) -> CodeFormat:
        """From a :class:`~csr_vllm.codec.config.TensorCodecConfig` (duck-typed)."""
        if getattr(config, "sampled_atoms", 0):
            raise NotImplementedError("sampled (per-request) atoms are not in the Triton "
                                      "kernels yet; use the CPU backend for dictionary adaptation")
        return cls(config.num_atoms, config.chunks, config.atoms_per_chunk, config.coef,
                   config.pursuit)

    def to_ints(self) -> list[int]:
        """Flat form for custom-op schemas: [A, C, S, coef id, 1 = OMP]."""
        return [self.num_atoms, self.chunks, self.atoms_per_chunk, COEF_IDS[self.coef],
                int(self.pursuit == "omp")]

    @classmethod
    def from_ints(cls, v: list[int]) -> CodeFormat:
        if len(v) != 5:
            raise ValueError(f"a code format is 5 integers, got {v}")
        coef = {i: name for name, i in COEF_IDS.items()}.get(int(v[3]))
        if coef is None:
            raise ValueError(f"unknown coefficient format id {v[3]}")
        return cls(int(v[0]), int(v[1]), int(v[2]), coef, "omp" if v[4] else "mp")

    @property
    def fields(self) -> int:
        return self.chunks * self.atoms_per_chunk

    @property
    def coef_bits(self) -> int:
        return COEF_FORMATS[self.coef]

    @property
    def coef_id(self) -> int:
        return COEF_IDS[self.coef]

    @property
    def uses_ladder(self) -> bool:
        """``logB``: coefficients are read through a ladder table (:meth:`check_ladder`)."""
        return self.coef.startswith("log")

    @property
    def ladder_levels(self) -> int:
        """M = 2^(B-1) magnitudes of a ``logB`` ladder (0 for other formats)."""
        return 1 << (self.coef_bits - 1) if self.uses_ladder else 0

    def check_ladder(self, ladder: torch.Tensor | None, what: str) -> None:
        """A ``logB`` code needs its layer's ladder table: float32 [C, S, M], contiguous,
        entry ``[c, s, i]`` = what magnitude index i of field (c, s) reads back as
        (``TensorCodec.ladder_table``); other formats take None."""
        if not self.uses_ladder:
            if ladder is not None:
                raise ValueError(f"{what}: a ladder table was given for {self.coef} codes")
            return
        want = (self.chunks, self.atoms_per_chunk, self.ladder_levels)
        if ladder is None or tuple(ladder.shape) != want or not ladder.is_contiguous() or \
                ladder.dtype != torch.float32:
            got = None if ladder is None else (tuple(ladder.shape), ladder.dtype)
            raise ValueError(f"{what}: {self.coef} codes need a contiguous float32 ladder "
                             f"table {want}, got {got}")

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_atoms)))

    @property
    def slot_bytes(self) -> int:
        return math.ceil(self.fields * (self.coef_bits + self.index_bits) / 8)

    @property
    def index_offset(self) -> int:
        """Bit offset of the first index field."""
        return self.fields * self.coef_bits
