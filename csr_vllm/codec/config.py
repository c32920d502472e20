"""Typed codec settings and the named presets.

A preset fixes everything that decides the slot size, so its all-in bits per channel follow
from the layout in :mod:`csr_vllm.codec.packing` and are checked against the preset's name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from csr_vllm.codec.coefficients import SCALE_BITS, CoefFormat
from csr_vllm.codec.packing import index_bits
from csr_vllm.codec.search import SearchSpec

Pursuit = Literal["mp", "omp"]
RopeMode = Literal["pre", "post"]


@dataclass(frozen=True)
class TensorCodecConfig:
    """How one tensor (K or V) of a head vector is coded.

    Attributes:
        num_atoms: A, atoms per dictionary.
        chunks: C (the paper's s_n); the head vector is cut into C equal chunks, each with
            its own dictionary.
        atoms_per_chunk: S, pursuit iterations per chunk.
        coef: coefficient format (``fp16``, ``fp8``, ``int3``..``int8``, ``log3``..``log6``;
            the logB formats need the dictionary's ladder tops).
        pursuit: ``mp`` (the paper) or ``omp``.
        sampled_atoms: E, index values ``[A - E, A)`` reserved for atoms sampled from the
            coded data itself (:mod:`csr_vllm.codec.adaptation`); the trained atoms at those
            indices are not used. 0 = no adaptation.
        search: which atoms a pick looks at: ``full`` (all) or ``K/P``, the atoms of the P
            of K clusters nearest the residual (:mod:`csr_vllm.codec.search`; the atoms
            must be ordered by cluster first). Does not change the slot.
    """

    num_atoms: int = 4096
    chunks: int = 1
    atoms_per_chunk: int = 2
    coef: str = "int5"
    pursuit: Pursuit = "omp"
    sampled_atoms: int = 0
    search: str = "full"

    def __post_init__(self) -> None:
        CoefFormat(self.coef)  # validates the name
        SearchSpec.parse(self.search)  # validates the setting
        if self.num_atoms < 2 or self.chunks < 1 or self.atoms_per_chunk < 1:
            raise ValueError(f"invalid tensor codec config {self}")
        if not 0 <= self.sampled_atoms < self.num_atoms:
            raise ValueError(f"sampled_atoms must be in [0, {self.num_atoms}), got "
                             f"{self.sampled_atoms}")
        if self.pursuit not in ("mp", "omp"):
            raise ValueError(f"pursuit must be 'mp' or 'omp', got {self.pursuit!r}")

    @property
    def coef_format(self) -> CoefFormat:
        return CoefFormat(self.coef)

    @property
    def index_bits(self) -> int:
        return index_bits(self.num_atoms)

    @property
    def search_spec(self) -> SearchSpec:
        return SearchSpec.parse(self.search)

    @property
    def shared_atoms(self) -> int:
        """Atoms of the trained dictionary that codes address (A - E)."""
        return self.num_atoms - self.sampled_atoms

    @property
    def payload_bits(self) -> int:
        """Bits of one vector's code before byte padding."""
        fmt = self.coef_format
        atoms = self.chunks * self.atoms_per_chunk
        return SCALE_BITS * fmt.has_scale + atoms * (fmt.bits + self.index_bits)

    @property
    def slot_bytes(self) -> int:
        """Bytes one vector's code occupies (padded to a whole byte)."""
        return math.ceil(self.payload_bits / 8)

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.chunks:
            raise ValueError(f"head_dim {head_dim} is not divisible into {self.chunks} chunks")


@dataclass(frozen=True)
class CodecConfig:
    """Complete CSR setting for a model: K and V coding plus dictionary sharing.

    Attributes:
        key, value: per-tensor coding.
        key_rope: ``pre`` codes keys before RoPE (RoPE undone, coded, redone), ``post`` codes
            the rotated keys vLLM stores.
        layer_group: adjacent layers sharing one dictionary (1 = per-layer dictionaries).
        per_head: one dictionary per KV head (True) or one shared by the layer's heads.
    """

    key: TensorCodecConfig = field(default_factory=TensorCodecConfig)
    value: TensorCodecConfig = field(default_factory=lambda: TensorCodecConfig(chunks=2))
    key_rope: RopeMode = "pre"
    layer_group: int = 1
    per_head: bool = False

    def __post_init__(self) -> None:
        if self.key_rope not in ("pre", "post"):
            raise ValueError(f"key_rope must be 'pre' or 'post', got {self.key_rope!r}")
        if self.layer_group < 1:
            raise ValueError("layer_group must be >= 1")

    def slot_bytes(self) -> int:
        """Bytes per (token, KV head): K code + V code."""
        return self.key.slot_bytes + self.value.slot_bytes

    def with_sampled_atoms(self, sampled: int) -> CodecConfig:
        """The same setting with E = ``sampled`` atoms per block sampled from the data, for
        keys and values (:mod:`csr_vllm.codec.adaptation`)."""
        return replace(self, key=replace(self.key, sampled_atoms=sampled),
                       value=replace(self.value, sampled_atoms=sampled))

    def bits_per_channel(self, head_dim: int) -> float:
        """All-in bits per K/V channel of the stored codes (layout-derived)."""
        self.key.check_head_dim(head_dim)
        self.value.check_head_dim(head_dim)
        return 8 * self.slot_bytes() / (2 * head_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        return cls(
            key=TensorCodecConfig(**d["key"]),
            value=TensorCodecConfig(**d["value"]),
            key_rope=d["key_rope"],
            layer_group=d["layer_group"],
            per_head=d["per_head"],
        )


@dataclass(frozen=True)
class Preset:
    """A named bit budget; the atoms per vector follow from the model's head_dim.

    The budget is all-in bits per K/V channel of the stored slot (key code + value code, each
    padded to whole bytes). Keys and values get half the slot each, as many atoms as fit in
    their coefficient format, unless moving bytes between them fits another atom in all with
    keys and values at most one atom apart; then the spare atom goes to ``spare`` (the keys
    by default: measured better than the values, README *Presets*).
    At head_dim 64, ``csr-1b``'s 16 bytes hold 4 key atoms (13-bit index + log5 coefficient:
    72 bits, 9 bytes) and 3 value atoms (54 bits, 7 bytes), where halves of 8 bytes fit 3 + 3;
    ``csr-2b`` holds 7 + 7 in 16 + 16 bytes.
    """

    name: str
    budget_bits: float
    num_atoms: int = 8192
    key_coef: str = "fp8"
    value_coef: str = "fp8"
    pursuit: Pursuit = "omp"
    key_chunks: int = 1
    value_chunks: int = 1
    key_rope: RopeMode = "pre"
    spare: Literal["key", "value"] = "key"

    def __post_init__(self) -> None:
        if self.spare not in ("key", "value"):
            raise ValueError(f"spare must be 'key' or 'value', got {self.spare!r}")

    def _tensor(self, chunks: int, coef: str, atoms: int) -> TensorCodecConfig:
        return TensorCodecConfig(self.num_atoms, chunks, atoms, coef, self.pursuit)

    def _fit(self, chunks: int, coef: str, nbytes: int) -> int:
        """Atoms per chunk that fit in ``nbytes`` (0 if none)."""
        probe = self._tensor(chunks, coef, 1)
        per_atom = probe.payload_bits - (SCALE_BITS if probe.coef_format.has_scale else 0)
        fixed = probe.payload_bits - per_atom  # per_atom already spans all C chunks
        return max(0, (8 * nbytes - fixed) // per_atom)

    def config_for(self, head_dim: int) -> CodecConfig:
        """The codec setting this preset means for a model with ``head_dim``."""
        half = int(self.budget_bits * head_dim) // 8  # whole bytes per tensor
        kc, vc = (self.key_chunks, self.key_coef), (self.value_chunks, self.value_coef)
        even = (self._fit(*kc, half), self._fit(*vc, half))
        splits = [even]
        for sk in range(1, self._fit(*kc, 2 * half) + 1):
            rest = 2 * half - self._tensor(*kc, sk).slot_bytes
            sv = self._fit(*vc, rest)
            if abs(sk - sv) <= 1:  # lopsided splits are unmeasured: at most one atom apart
                splits.append((sk, sv))
        to_keys = self.spare == "key"
        sk, sv = max(splits, key=lambda s: (min(s) >= 1, sum(s), s == even,
                                            s[0] if to_keys else s[1]))
        if min(sk, sv) < 1:
            raise ValueError(f"preset {self.name} cannot fit one key and one value atom in "
                             f"{2 * half} bytes at head_dim {head_dim}")
        cfg = CodecConfig(key=self._tensor(*kc, sk), value=self._tensor(*vc, sv),
                          key_rope=self.key_rope)
        assert cfg.bits_per_channel(head_dim) <= self.budget_bits + 1e-9
        return cfg


# Chosen by measurement on SmolLM2 (README, *Presets*). They share one dictionary shape (8192
# atoms, whole vectors, keys before RoPE), so one trained dictionary folder serves every
# preset; presets differ in atoms per vector and coefficient format. log5 coefficients fit
# more atoms (csr-1.5b: 5 where fp8 fits 4; csr-2b: 7 where fp8 fits 6) and measured better on
# both held-out texts (and on RULER at 1024 tokens for csr-2b). At 1 bit log5 fits 4 + 3 atoms
# in csr-1b's 16 bytes where fp8 fits 3 + 3, and measured better on both texts (4 + 3 better
# than 3 + 4); at 4 bits fp8's 12 precise atoms beat 14 of log5: csr-4b keeps fp8.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (Preset("csr-1b", 1.0, key_coef="log5", value_coef="log5"),
              Preset("csr-1.5b", 1.5, key_coef="log5", value_coef="log5"),
              Preset("csr-2b", 2.0, key_coef="log5", value_coef="log5"), Preset("csr-4b", 4.0))
}

DEFAULT_PRESET = "csr-2b"


def get_preset(name: str) -> Preset:
    """Look up a preset by name; an unknown name raises with the list of valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown CSR preset {name!r}; valid presets: {', '.join(PRESETS)}"
        ) from None
