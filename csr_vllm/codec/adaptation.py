"""Sampling-based dictionary adaptation: atoms sampled from the coded K/V itself.

The trained dictionary is fixed; a prompt from another domain (the essays, for a dictionary
trained on Wikipedia) codes worse. The paper's answer is to add vectors sampled from the
prompt's own K/V as extra atoms. Here, decided for serving (vLLM frees, reuses, shares and
recomputes blocks at any time):

* **Scope: one KV block.** Every block (the ``BS`` consecutive positions of one vLLM block)
  owns ``E`` sampled atoms per tensor (K, V) and per dictionary: one set shared by the layer's
  KV heads (their dictionary is shared too), or one per head with per-head dictionaries. A
  vector may only use the atoms of its own block. The engine stores them inside the block's
  own page (:mod:`csr_vllm.engine.page_layout`), so they live, are shared by prefix caching
  and are freed exactly with the block: no reference counts, nothing to go stale.
* **Index space: E reserved values.** Index values ``[A - E, A)`` of the existing index width
  address the block's sampled atoms; the trained atoms at those indices are dropped. The slot
  keeps its size (one more index bit would cost ``csr-1b`` one of its seven atoms).
* **Sampling: the worst-coded vectors.** A step's vectors of one block are coded against the
  trained atoms plus the block's atoms so far; the block's empty atom slots are then filled
  with the vectors (per chunk) that this left with the largest absolute error, normalised and
  rounded to fp16 (what is stored, so coder and decoder use identical atoms), and those
  vectors are coded again. A sampled vector is then coded almost exactly (one atom carries
  it, the others absorb the coefficient's rounding) and vectors near it in the same block
  gain too.
* **Append-only, bounded.** Once offset ``o`` of a block is written the block holds at most
  ``ceil(E * (o + 1) / BS)`` atoms, so a block filled token by token (decode) spreads its
  budget over its length instead of spending it on its first token; a prefill that writes a
  whole block takes all ``E`` at once. Filled atom slots are never changed; a write to offset
  0 (vLLM rewrites a block from its first slot whenever it reuses it) empties them first. A
  code only addresses atoms that existed when it was written, in its own block, so no atom is
  ever overwritten while a code that references it is live.
* **Cost, counted:** ``E * D * 2`` bytes (fp16) per block, tensor and dictionary, i.e.
  ``16 E / (BS * H)`` bits per channel with shared dictionaries (:func:`atom_slot_bytes` is
  the engine's exact figure: the bytes are added to every slot, so vLLM sizes the pool with
  them).

Shapes: ``N`` vectors, ``G`` groups (blocks, or (block, head) pairs), ``C`` chunks, ``E``
sampled atoms, ``Dc = D / C``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from csr_vllm.codec.codec import SparseCode, TensorCodec
    from csr_vllm.codec.config import CodecConfig

ATOM_DTYPE = torch.float16  # how sampled atoms are stored
ATOM_BYTES = 2


@dataclass
class LocalAtoms:
    """The sampled atoms each vector may use.

    Attributes:
        atoms: [G, C, E, Dc] sampled atoms per group (all-zero rows are empty slots).
        group: [N] int64, each vector's group.
    """

    atoms: Tensor
    group: Tensor

    def per_vector(self, chunk: int) -> Tensor:
        """[N, E, Dc]: each vector's own atoms for ``chunk``."""
        return self.atoms[self.group, chunk]


def atom_limit(last_offset: Tensor, block_size: int, sampled: int) -> Tensor:
    """Atoms a block may hold once offsets up to ``last_offset`` [G] are written:
    ``ceil(E * (o + 1) / BS)``."""
    return torch.div(sampled * (last_offset + 1) + block_size - 1, block_size,
                     rounding_mode="floor").clamp_max(sampled)


def filled_atoms(atoms: Tensor) -> Tensor:
    """[G, C] filled slots of atoms [G, C, E, Dc] (slots fill in order, empty = zero)."""
    return (atoms.abs().amax(-1) > 0).sum(-1)


def encode_adaptive(codec: TensorCodec, x: Tensor, group: Tensor, atoms: Tensor,
                    limit: Tensor) -> tuple[SparseCode, Tensor]:
    """Code vectors x [N, D] with their groups' sampled atoms, sampling new ones first where
    a group has free slots under ``limit`` [G]. The reference procedure (module docstring).

    Args:
        codec: a codec with ``sampled_atoms = E > 0``.
        x: [N, D] vectors; group: [N] their groups; atoms: [G, C, E, Dc] atoms so far.
        limit: [G] atoms each group may hold after this call.
    Returns:
        (codes [N], atoms [G, C, E, Dc] with the new atoms added; existing ones unchanged).
    """
    e, chunks = codec.config.sampled_atoms, codec.config.chunks
    atoms = atoms.to(codec.atoms.dtype).clone()
    code = codec.encode(x, LocalAtoms(atoms, group))
    want = (limit[:, None] - filled_atoms(atoms)).clamp_min(0)  # [G, C]
    if not bool(want.any()) or not x.shape[0]:
        return code, atoms
    xc = x.to(codec.atoms.dtype).reshape(x.shape[0], chunks, -1)
    rec = codec.decode(code, LocalAtoms(atoms, group)).reshape_as(xc)
    changed = torch.zeros(atoms.shape[0], dtype=torch.bool)
    for c in range(chunks):
        new_at, slot, vec = _pick(xc[:, c], rec[:, c], group, filled_atoms(atoms)[:, c],
                                  want[:, c])
        atoms[new_at, c, slot] = vec.to(ATOM_DTYPE).to(atoms.dtype)
        changed[new_at] = True
    redo = changed[group].nonzero().squeeze(1)
    if redo.numel():
        sub = codec.encode(x[redo], LocalAtoms(atoms, group[redo]))
        code.indices[redo], code.coefs[redo] = sub.indices, sub.coefs
        if code.scale is not None:
            code.scale[redo] = sub.scale
    assert int(filled_atoms(atoms).max()) <= e
    return code, atoms


def _pick(x: Tensor, rec: Tensor, group: Tensor, filled: Tensor,
          want: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ``want[g]`` worst-coded non-zero vectors of each group g: (group [K], slot [K],
    normalised vector [K, Dc]); slots continue after the ``filled[g]`` ones."""
    norm = x.norm(dim=-1)
    err = (x - rec).norm(dim=-1)
    err = torch.where(norm > 1e-6, err, torch.full_like(err, -1.0))  # zero vectors: never
    order = torch.argsort(err, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by group, worst first within
    g = group[order]
    first = torch.searchsorted(g, g, right=False)
    rank = torch.arange(len(order)) - first
    take = (rank < want[g]) & (err[order] >= 0)
    rows = order[take]
    return g[take], filled[g[take]] + rank[take], x[rows] / norm[rows, None]


def atom_block_bytes(config: CodecConfig, head_dim: int, dict_heads: int) -> int:
    """Bytes of one block's sampled atoms, K and V (``dict_heads`` dictionaries each)."""
    total = 0
    for tcfg in (config.key, config.value):
        total += dict_heads * tcfg.sampled_atoms * head_dim * ATOM_BYTES  # C chunks x Dc = D
    return total


def atom_slot_bytes(config: CodecConfig, head_dim: int, num_kv_heads: int, per_head: bool,
                    block_size: int) -> int:
    """Bytes added to every (token, KV head) slot so that a block's slots hold its sampled
    atoms: ``ceil(block atom bytes / (H * BS))`` (0 without adaptation)."""
    need = atom_block_bytes(config, head_dim, num_kv_heads if per_head else 1)
    return math.ceil(need / (num_kv_heads * block_size))


def adapted_bits_per_channel(config: CodecConfig, head_dim: int, num_kv_heads: int,
                             block_size: int) -> float:
    """All-in bits per K/V channel with the sampled atoms' bytes: the engine's slot
    (codes + the atom share) over 2 D channels."""
    extra = atom_slot_bytes(config, head_dim, num_kv_heads, config.per_head, block_size)
    return 8 * (config.slot_bytes() + extra) / (2 * head_dim)
