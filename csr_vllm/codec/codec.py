"""The CSR codec for one tensor (K or V) of one layer: encode, decode, pack, unpack.

This plain-PyTorch module is the reference every fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from csr_vllm.codec.adaptation import LocalAtoms
from csr_vllm.codec.config import TensorCodecConfig
from csr_vllm.codec.packing import pack_fields, unpack_fields
from csr_vllm.codec.pursuit import PURSUITS, reconstruct
from csr_vllm.codec.search import AtomClusters


@dataclass
class SparseCode:
    """Sparse code of N vectors.

    Attributes:
        indices: [N, C, S] int64 atom indices.
        coefs: [N, C, S] coefficients as stored (already quantised/dequantised).
        scale: [N] per-vector scale for intB formats, else None.
    """

    indices: Tensor
    coefs: Tensor
    scale: Tensor | None


class TensorCodec:
    """Codes vectors [N, D] with C chunk dictionaries ``atoms`` [C, A, Dc].

    With ``config.sampled_atoms = E > 0`` codes address the first A - E trained atoms and, at
    indices ``[A - E, A)``, the E sampled atoms of the vector's group (``local``, see
    :mod:`csr_vllm.codec.adaptation`).

    With a screened search (``config.search`` = ``K/P``), ``clusters`` = (centroids
    [C, K, Dc], offsets [C, K + 1]) of the atoms, which are ordered by cluster
    (:mod:`csr_vllm.codec.search`).
    """

    def __init__(self, config: TensorCodecConfig, atoms: Tensor,
                 ladder: Tensor | None = None,
                 clusters: tuple[Tensor, Tensor] | None = None) -> None:
        if atoms.ndim != 3 or atoms.shape[0] != config.chunks or atoms.shape[1] != config.num_atoms:
            raise ValueError(
                f"atoms shape {tuple(atoms.shape)} does not match config "
                f"(chunks={config.chunks}, num_atoms={config.num_atoms})"
            )
        self.config = config
        self.atoms = atoms
        self.fmt = config.coef_format
        # [C, S] ladder tops of a logB format (the dictionary's calibration for S atoms).
        self.ladder = None
        if self.fmt.uses_ladder:
            want = (config.chunks, config.atoms_per_chunk)
            if ladder is None or tuple(ladder.shape) != want:
                got = None if ladder is None else tuple(ladder.shape)
                raise ValueError(f"coefficient format {config.coef} needs ladder tops of shape "
                                 f"{want} from the dictionary, got {got}")
            self.ladder = ladder.to(atoms.dtype)
        self._pursuit = PURSUITS[config.pursuit]
        spec = config.search_spec
        self.clusters: list[AtomClusters] | None = None
        if not spec.full:
            want = (config.chunks, spec.clusters)
            if clusters is None or tuple(clusters[0].shape[:2]) != want or \
                    int(clusters[1][0, -1]) != config.shared_atoms:
                raise ValueError(f"search {config.search} needs clusters of shape {want} "
                                 f"over the {config.shared_atoms} trained atoms")
            self.clusters = [AtomClusters(clusters[0][c], clusters[1][c], spec.probes)
                             for c in range(config.chunks)]

    @property
    def head_dim(self) -> int:
        return self.atoms.shape[0] * self.atoms.shape[2]

    @property
    def shared_atoms(self) -> Tensor:
        """[C, A - E, Dc]: the trained atoms codes may address."""
        return self.atoms[:, : self.config.shared_atoms]

    def encode(self, x: Tensor, local: LocalAtoms | None = None) -> SparseCode:
        """x [N, D] -> SparseCode; coefficients are quantised inside the pursuit. ``local``:
        each vector's sampled atoms (only with ``sampled_atoms > 0``)."""
        n, d = x.shape
        if d != self.head_dim:
            raise ValueError(f"expected vectors of dim {self.head_dim}, got {d}")
        self._check_local(local, n)
        x = x.to(self.atoms.dtype)
        scale = self.fmt.scale_for(x) if self.fmt.has_scale else None
        chunks = x.reshape(n, self.config.chunks, -1)
        shared = self.shared_atoms
        idx, coef = [], []
        for c in range(self.config.chunks):
            quant = self._quantizer(scale, c)
            extra = local.per_vector(c).to(x.dtype) if local is not None else None
            i, w = self._pursuit(chunks[:, c], shared[c], self.config.atoms_per_chunk, quant,
                                 extra=extra,
                                 clusters=self.clusters[c] if self.clusters else None)
            idx.append(i)
            coef.append(w)
        return SparseCode(torch.stack(idx, 1), torch.stack(coef, 1), scale)

    def _check_local(self, local: LocalAtoms | None, n: int) -> None:
        if local is None:
            return
        e = self.config.sampled_atoms
        if not e:
            raise ValueError("sampled atoms given to a codec with sampled_atoms = 0")
        want = (self.config.chunks, e, self.atoms.shape[2])
        if tuple(local.atoms.shape[1:]) != want or local.group.shape != (n,):
            raise ValueError(f"local atoms {tuple(local.atoms.shape)} / groups "
                             f"{tuple(local.group.shape)} do not fit {n} vectors, (C, E, Dc) "
                             f"= {want}")

    def _quantizer(self, scale: Tensor | None, chunk: int):
        fmt, ladder = self.fmt, self.ladder

        def quantize(c: Tensor, k: int) -> Tensor:
            top = ladder[chunk, k : k + 1] if ladder is not None else None
            return fmt.roundtrip(c[:, None], scale, top)[:, 0]

        return quantize

    def ladder_table(self) -> Tensor | None:
        """[C, S, M] float32: entry ``[c, s, i]`` is what magnitude index i of field (c, s)
        of a ``logB`` code reads back as (top x ladder step, the product :meth:`decode`
        computes), the table the Triton kernels read; None for the other formats."""
        if self.ladder is None:
            return None
        steps = self.fmt.ladder_steps(torch.float32)
        return (self.ladder.float()[..., None] * steps).contiguous()

    @property
    def _tops(self) -> Tensor | None:
        """Ladder tops in code field order (chunk-major), or None."""
        return self.ladder.reshape(-1) if self.ladder is not None else None

    def decode(self, code: SparseCode, local: LocalAtoms | None = None) -> Tensor:
        """SparseCode -> reconstructed vectors [N, D] (dtype of the atoms).

        Indices ``>= A - E`` read the vector's group's sampled atoms from ``local``: one table
        ``[shared atoms ; every group's sampled atoms]`` and the indices remapped into it."""
        n = code.indices.shape[0]
        a = self.config.shared_atoms
        if local is None:
            if self.config.sampled_atoms and n and bool((code.indices >= a).any()):
                raise ValueError("codes address sampled atoms but none were given")
            parts = [reconstruct(code.indices[:, c], code.coefs[:, c], self.atoms[c])
                     for c in range(self.config.chunks)]
            return torch.cat(parts, dim=1)
        self._check_local(local, n)
        e = self.config.sampled_atoms
        idx = code.indices
        own = idx >= a
        remapped = torch.where(own, a + local.group[:, None, None] * e + (idx - a), idx)
        parts = []
        for c in range(self.config.chunks):
            table = torch.cat([self.atoms[c, :a],
                               local.atoms[:, c].reshape(-1, self.atoms.shape[2])
                               .to(self.atoms.dtype)])
            parts.append(reconstruct(remapped[:, c], code.coefs[:, c], table))
        return torch.cat(parts, dim=1)

    def roundtrip(self, x: Tensor) -> Tensor:
        """decode(encode(x)), in x's dtype."""
        return self.decode(self.encode(x)).to(x.dtype)

    # -- storage ---------------------------------------------------------------------------
    def pack(self, code: SparseCode) -> Tensor:
        """SparseCode -> [N, slot_bytes] uint8 (layout: :mod:`csr_vllm.codec.packing`)."""
        n = code.indices.shape[0]
        fields = []
        if self.fmt.has_scale:
            half = code.scale.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
            fields.append((half[:, None], 16))
        fields.append((self.fmt.encode(code.coefs.reshape(n, -1), code.scale, self._tops),
                       self.fmt.bits))
        fields.append((code.indices.reshape(n, -1), self.config.index_bits))
        return pack_fields(fields, self.config.slot_bytes)

    def unpack(self, packed: Tensor) -> SparseCode:
        """[N, slot_bytes] uint8 -> SparseCode (inverse of :meth:`pack`)."""
        n = packed.shape[0]
        k = self.config.chunks * self.config.atoms_per_chunk
        layout = ([(1, 16)] if self.fmt.has_scale else []) + [
            (k, self.fmt.bits), (k, self.config.index_bits)
        ]
        fields = unpack_fields(packed, layout)
        scale = None
        if self.fmt.has_scale:
            raw = fields.pop(0)[:, 0]
            raw = torch.where(raw >= 1 << 15, raw - (1 << 16), raw)
            scale = raw.to(torch.int16).view(torch.float16).to(self.atoms.dtype)
        coefs = self.fmt.decode(fields[0], scale, self.atoms.dtype, self._tops)
        shape = (n, self.config.chunks, self.config.atoms_per_chunk)
        return SparseCode(fields[1].reshape(shape), coefs.reshape(shape), scale)
