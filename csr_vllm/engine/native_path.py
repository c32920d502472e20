"""The engine's side of the native CPU kernels (:mod:`csr_vllm.native`).

One :class:`NativeKernels` per :class:`~csr_vllm.engine.runtime.CSRRuntime`, built once per
engine: each layer's tables in the layout the kernels read (atoms row-major for gathers and
transposed for the encoder's correlation, ladder tables, code formats) and one RoPE table that
grows with the longest position seen. The runtime calls it instead of the reference codec when
``kernels: native`` and the setting is one the kernels implement (:func:`why_not_native`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from csr_vllm import native
from csr_vllm.codec.codec import TensorCodec
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.codec.rope import rope_tables
from csr_vllm.engine.settings import CSRSettings

_EMPTY = torch.empty(0)

def dictionaries_for(dicts: DictionarySet, settings: CSRSettings) -> DictionarySet:
    """The dictionaries as an engine keeps them: in bf16 when the native kernels serve this
    setting (they read and fit codes to bf16 atoms, :class:`TensorTables`; the fp32 tensors
    are then not held, half the side memory), else as loaded (the reference codec's fp32)."""
    if why_not_native(dicts, settings) is not None or dicts.key_atoms.dtype == torch.bfloat16:
        return dicts
    return dataclasses.replace(dicts, key_atoms=dicts.key_atoms.to(torch.bfloat16),
                               value_atoms=dicts.value_atoms.to(torch.bfloat16))


def why_not_native(dicts: DictionarySet, settings: CSRSettings) -> str | None:
    """Why this engine runs the PyTorch reference (None: the native kernels serve it)."""
    if settings.kernels != "native":
        return "kernels: reference was asked for"
    if dicts.config.per_head:
        return "per-head dictionaries"
    if settings.outlier_threshold > 0 and settings.outlier_capacity:
        return "the outlier Guard"
    for tc in (dicts.config.key, dicts.config.value):
        why = native.unsupported(tc)
        if why:
            return why
    if native.load() is None:
        return f"the native kernels could not be built ({native.error()})"
    return None


@dataclass(frozen=True)
class TensorTables:
    """One layer's tables of one tensor (K or V), as the kernels take them.

    Attributes:
        atoms: [A, D] bfloat16, the atoms both paths use: the read paths gather its rows
            (every decode step reads every layer's dictionaries, so half of fp32's bytes
            matters) and the encoder fits its codes to them (rescoring, least squares), so a
            code is exact for the atoms it is read with. The codec's own tensor when the
            engine holds its dictionaries in bf16 (:func:`dictionaries_for`), else a copy;
            the rounding (2^-9 of an entry) is far below the codes' own error.
        atoms_t, corr_scale: the encoder's correlation table (atoms in SIMD lanes), the
            fastest this build takes (:func:`csr_vllm.native.best_layout`): int8 channel
            quads with per-atom scales (AVX512-VNNI; blocked for AVX2 and AMX), bf16 pairs (AVX512-BF16), or exact
            fp32; int8 and bf16 candidates are rescored in fp32.
        ladder: [S, M] float32 ladder table of a logB code, else empty.
        fmt: :func:`csr_vllm.native.format_ints` at the tensor's byte offset in the slot.
        omp: OMP (True) or matching pursuit.
        own: whether ``atoms`` is a copy held beside the codec's (counted as extra bytes).
        centroids, cluster_offsets, probes: a screened search's clusters (the codec's; the
            atoms are ordered by cluster), or None / None / 0 for the full search.
    """

    atoms: Tensor
    atoms_t: Tensor
    corr_scale: Tensor
    ladder: Tensor
    fmt: list[int]
    omp: bool
    own: bool
    centroids: Tensor | None = None
    cluster_offsets: Tensor | None = None
    probes: int = 0

    @classmethod
    def of(cls, codec: TensorCodec, offset: int, ops) -> TensorTables:
        source = codec.atoms[0]
        atoms = source.to(torch.bfloat16).contiguous()
        layout = native.best_layout(ops, atoms.shape[1], atoms.shape[0], bool(codec.clusters))
        atoms_t, corr_scale = native.correlation_table(atoms.float(), layout)
        ladder = codec.ladder_table()
        screen = codec.clusters[0] if codec.clusters else None
        return cls(atoms, atoms_t, corr_scale, ladder[0] if ladder is not None else _EMPTY,
                   native.format_ints(codec.config, offset), codec.config.pursuit == "omp",
                   atoms.data_ptr() != source.data_ptr(),
                   screen.centroids.float().contiguous() if screen else None,
                   screen.offsets.contiguous() if screen else None,
                   screen.probes if screen else 0)

    @property
    def extra_bytes(self) -> int:
        """Bytes beyond the codec's dictionaries (correlation table, any bf16 copy)."""
        return self.atoms_t.nbytes + self.corr_scale.nbytes + self.atoms.nbytes * self.own


@dataclass(frozen=True)
class LayerTables:
    key: TensorTables
    value: TensorTables


class RopeTable:
    """cos, sin [P, D] float32 for positions [0, P), the reference's values (rope_tables),
    built once and grown (doubling) when a longer position comes."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self.cos = self.sin = torch.empty(0, head_dim)

    def covering(self, max_position: int) -> tuple[Tensor, Tensor]:
        if max_position >= self.cos.shape[0]:
            size = max(4096, 1 << int(max_position).bit_length())
            self.cos, self.sin = rope_tables(self.head_dim, self.theta, torch.arange(size))
        return self.cos, self.sin

    @property
    def nbytes(self) -> int:
        return self.cos.nbytes + self.sin.nbytes


class NativeKernels:
    """Write and read paths of one runtime through the native ops."""

    def __init__(self, layers: dict, key_bytes: int, head_dim: int, rope_theta: float,
                 pre_rope: bool) -> None:
        self.ops = native.load()
        self.tables = {layer: LayerTables(TensorTables.of(c.keys[0], 0, self.ops),
                                          TensorTables.of(c.values[0], key_bytes, self.ops))
                       for layer, c in layers.items()}
        self.pre_rope = pre_rope
        self.rope = RopeTable(head_dim, rope_theta)

    def _rope(self, max_position: int) -> tuple[Tensor, Tensor]:
        if not self.pre_rope:
            return _EMPTY, _EMPTY
        return self.rope.covering(max_position)

    def write(self, layer: int, key: Tensor, value: Tensor, positions: Tensor,
              kv_cache: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Code K/V [K, H, D] (keys after RoPE) of positions [K] into slots [K] (all >= 0);
        returns the relative errors [K, H] of keys and values."""
        t = self.tables[layer]
        cos, sin = self._rope(int(positions.max()))
        errs = []
        for tab, x, undo in ((t.key, key, self.pre_rope), (t.value, value, False)):
            errs.append(self.ops.encode_store(x, positions, cos, sin, tab.atoms, tab.atoms_t,
                                              tab.corr_scale, tab.ladder, kv_cache, slots,
                                              tab.fmt, tab.omp, undo, tab.centroids,
                                              tab.cluster_offsets, tab.probes))
        return errs[0], errs[1]

    def decode_dense(self, layer: int, kv_cache: Tensor, blocks: Tensor, counts: Tensor,
                     pos0: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """K (after RoPE), V [R * BS, H, D] of the first counts[r] slots of blocks [R]
        (positions pos0[r] + offset); the other rows are zero."""
        t = self.tables[layer]
        _, h, bs, _ = kv_cache.shape
        d = t.key.atoms.shape[1]
        out_k = torch.zeros(len(blocks) * bs, h, d, dtype=dtype)
        out_v = torch.zeros_like(out_k)
        if len(blocks):
            cos, sin = self._rope(int((pos0 + counts).max()))
            self.ops.decode_dense(kv_cache, blocks, counts, pos0, t.key.fmt, t.value.fmt,
                                  t.key.atoms, t.key.ladder, t.value.atoms, t.value.ladder, cos,
                                  sin, self.pre_rope, out_k, out_v)
        return out_k, out_v

    def decode_attention(self, layer: int, query: Tensor, kv_cache: Tensor, block_table: Tensor,
                         seq_lens: Tensor, window_store: Tensor | None, window_index: Tensor,
                         own_key: Tensor, own_value: Tensor, scale: float,
                         output: Tensor) -> None:
        """Decode rows [B] (query [B, Hq, D], output [B, Hq * D] or [B, Hq, D]) attend
        their seq_lens [B] tokens straight from the pages; see csr_vllm.native."""
        t = self.tables[layer]
        cos, sin = self._rope(int(seq_lens.max()))
        rows = torch.arange(len(seq_lens))
        self.ops.decode_attention(query, kv_cache, block_table, seq_lens, rows, t.key.fmt,
                                  t.value.fmt, t.key.atoms, t.key.ladder, t.value.atoms,
                                  t.value.ladder, cos, sin, self.pre_rope,
                                  window_store if window_store is not None else _EMPTY,
                                  window_index, own_key, own_value, scale, output)

    @property
    def extra_bytes(self) -> int:
        """Memory the native path holds beyond the codec's dictionaries: correlation tables,
        any bf16 copy of the atoms, the RoPE table."""
        return sum(t.key.extra_bytes + t.value.extra_bytes
                   for t in self.tables.values()) + self.rope.nbytes
