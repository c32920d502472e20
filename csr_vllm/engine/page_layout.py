"""The CSR page: what one (token, KV head) slot of vLLM's paged KV cache holds.

vLLM hands the backend one ``uint8`` tensor per layer, ``[num_blocks, H, block_size, C]``
(``C = state_content_bytes`` from :meth:`CSRAttentionBackend.customize_spec`). Byte layout of
one slot, C = Ck + Cv bytes::

    bytes [0, Ck)      key code    (bit stream of csr_vllm.codec.packing: [scale] coefs indices)
    bytes [Ck, Ck+Cv)  value code  (same layout, the value dictionary's widths)

With ``csr-1b`` at head_dim 64: Ck = 9 (4 atoms x (13-bit index + log5 coefficient) = 72
bits), Cv = 7 (3 atoms, 54 bits), C = 16 bytes against bf16's 256: 16x the tokens per block of
memory. Keys are coded
before or after RoPE as the dictionary says; pre-RoPE keys are rotated back with the token's
position before coding and forward again after decoding.

With sampling-based adaptation (``adapt_atoms = E``, :mod:`csr_vllm.codec.adaptation`) every
slot has ``Ca`` more bytes, ``C = Ck + Cv + Ca``, and the block's sampled atoms live in them:
the bytes ``[Ck + Cv, C)`` of the block's ``H x BS`` slots, concatenated in memory order
(head-major, then offset), hold the key atoms then the value atoms, each fp16
``[Hd, Ck, E, D/Ck]`` (Hd = 1 for dictionaries shared by the heads, H for per-head ones), the
rest zero. ``Ca = ceil(2 x Hd x E x D x 2 / (H x BS))``; at head_dim 64, 3 KV heads and vLLM's
CPU block of 128, E = 3 costs 2 bytes a slot (``csr-1b``: 18 bytes, 1.125 bits/channel). The
atoms thus live, are shared by prefix caching and are freed exactly with their block, and
vLLM's block manager counts their bytes when it sizes the pool. An all-zero atom is an empty
slot; a write to offset 0 of a block empties all of them first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from csr_vllm.codec.adaptation import (
    ATOM_BYTES,
    ATOM_DTYPE,
    LocalAtoms,
    atom_slot_bytes,
    encode_adaptive,
)
from csr_vllm.codec.codec import TensorCodec
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope


@dataclass(frozen=True)
class SlotLayout:
    """Byte sizes of one (token, KV head) slot: key code, value code, sampled-atom share."""

    key_bytes: int
    value_bytes: int
    atom_bytes: int = 0

    @property
    def code_bytes(self) -> int:
        return self.key_bytes + self.value_bytes

    @property
    def slot_bytes(self) -> int:
        return self.key_bytes + self.value_bytes + self.atom_bytes

    @classmethod
    def of(cls, dicts: DictionarySet, block_size: int | None = None) -> SlotLayout:
        """The slot of ``dicts``; with sampled atoms the block size decides their share."""
        cfg = dicts.config
        atoms = 0
        if cfg.key.sampled_atoms or cfg.value.sampled_atoms:
            if block_size is None:
                raise ValueError("the slot size with sampled atoms depends on the block size")
            heads = dicts.kv_heads if hasattr(dicts, "kv_heads") else dicts.shape.num_kv_heads
            atoms = atom_slot_bytes(cfg, dicts.shape.head_dim, heads, cfg.per_head, block_size)
        return cls(cfg.key.slot_bytes, cfg.value.slot_bytes, atoms)


def with_adaptation(dicts: DictionarySet, sampled: int) -> DictionarySet:
    """``dicts`` with E = ``sampled`` atoms per block sampled from the data (0 = off)."""
    if dicts.config.key.sampled_atoms == dicts.config.value.sampled_atoms == sampled:
        return dicts
    return dicts.with_codec(dicts.config.with_sampled_atoms(sampled))


@dataclass
class BlockAtoms:
    """Sampled atoms of R blocks and, for N token rows, the block each one is in.

    Attributes:
        key, value: [R, Hd, C, E, Dc] (Hd = 1 shared dictionary, or H per-head ones).
        block_of: [N] int64, index into R of each row's block.
        limit: [R] atoms each block may hold after a write (None when only reading).
    """

    key: Tensor
    value: Tensor
    block_of: Tensor
    limit: Tensor | None = None


class LayerCodec:
    """Encodes and decodes one layer's K/V slots ([N, H, D] <-> [N, H, C] bytes)."""

    def __init__(self, dicts: DictionarySet, layer: int, block_size: int | None = None) -> None:
        shape = dicts.shape
        self.layout = SlotLayout.of(dicts, block_size)
        self.block_size = block_size
        self.num_heads = dicts.kv_heads  # this worker's share under tensor parallelism
        self.head_dim = shape.head_dim
        self.rope_theta = shape.rope_theta
        self.pre_rope = dicts.config.key_rope == "pre"
        # One codec per head when dictionaries are per head, else one shared by all heads.
        heads = range(dicts.kv_heads) if dicts.config.per_head else range(1)
        self.keys = [dicts.codec("key", layer, h) for h in heads]
        self.values = [dicts.codec("value", layer, h) for h in heads]
        self.sampled = dicts.config.key.sampled_atoms  # E (keys and values alike)
        # Bytes of one block's key atoms and value atoms (fp16 [Hd, C, E, Dc] each).
        self._atom_bytes = [len(heads) * c.config.sampled_atoms * self.head_dim * ATOM_BYTES
                            for c in (self.keys[0], self.values[0])]

    # -- the sampled-atom area of a block (module docstring) --------------------------------
    def _atom_shape(self, codec: TensorCodec) -> tuple[int, int, int, int]:
        c = codec.config
        return len(self.keys), c.chunks, c.sampled_atoms, self.head_dim // c.chunks

    def read_atoms(self, kv_cache: Tensor, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Sampled atoms of ``blocks`` [R]: key, value [R, Hd, C, E, Dc] float32."""
        r = len(blocks)
        area = kv_cache[blocks, :, :, self.layout.code_bytes:].reshape(r, -1)
        flat = area[:, : sum(self._atom_bytes)].contiguous().view(ATOM_DTYPE).float()
        k, v = flat.split([b // 2 for b in self._atom_bytes], dim=1)
        return (k.reshape(r, *self._atom_shape(self.keys[0])),
                v.reshape(r, *self._atom_shape(self.values[0])))

    def write_atoms(self, kv_cache: Tensor, blocks: Tensor, key: Tensor, value: Tensor) -> None:
        """Store the sampled atoms of ``blocks`` [R] (key, value [R, Hd, C, E, Dc])."""
        r = len(blocks)
        _, h, bs, c = kv_cache.shape
        flat = torch.cat([key.reshape(r, -1), value.reshape(r, -1)], 1).to(ATOM_DTYPE)
        area = torch.zeros(r, h * bs * (c - self.layout.code_bytes), dtype=torch.uint8)
        area[:, : flat.shape[1] * 2] = flat.view(torch.uint8)
        kv_cache[blocks, :, :, self.layout.code_bytes:] = area.reshape(r, h, bs, -1)

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = rope_tables(self.head_dim, self.rope_theta, positions, dtype)
        return cos[:, None], sin[:, None]  # broadcast over heads

    @staticmethod
    def _per_head(codecs: list[TensorCodec], x: Tensor, fn) -> list[Tensor]:
        """fn(codec, vectors, head) per dictionary: one call over all heads' vectors
        (token-major) for a shared dictionary, one per head otherwise."""
        if len(codecs) == 1:
            n, h = x.shape[:2]
            return [fn(codecs[0], x.reshape(n * h, *x.shape[2:]), None)]
        return [fn(c, x[:, i], i) for i, c in enumerate(codecs)]

    def _local(self, atoms: Tensor, block_of: Tensor, head: int | None) -> LocalAtoms:
        """The sampled atoms of head ``head`` (None: the shared dictionary's, every head)."""
        if head is None:
            return LocalAtoms(atoms[:, 0], block_of.repeat_interleave(self.num_heads))
        return LocalAtoms(atoms[:, head], block_of)

    def encode(self, key: Tensor, value: Tensor, positions: Tensor,
               atoms: BlockAtoms | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """key/value [N, H, D] (keys after RoPE), positions [N] -> (slots [N, H, Ck + Cv]
        uint8 codes, key and value reconstructions [N, H, D] float32 for error checks).

        With ``atoms`` (adaptation on) the blocks' sampled atoms are used and, where a block
        has room under ``atoms.limit``, new ones sampled first: ``atoms.key`` / ``.value`` are
        updated in place (existing atoms never change)."""
        n, h, d = key.shape
        key = key.float()
        if self.pre_rope:
            cos, sin = self._rope(positions, torch.float32)
            key = undo_rope(key, cos, sin)
        out, recon = [], []
        for kind, codecs, x in (("key", self.keys, key), ("value", self.values, value.float())):
            held = getattr(atoms, kind) if atoms is not None else None

            def code_one(c: TensorCodec, v: Tensor, head: int | None, held=held):
                if held is None:
                    code = c.encode(v)
                    return c.pack(code), c.decode(code)
                local = self._local(held, atoms.block_of, head)
                code, new = encode_adaptive(c, v, local.group, local.atoms, atoms.limit)
                held[:, 0 if head is None else head] = new
                return c.pack(code), c.decode(code, LocalAtoms(new, local.group))

            res = self._per_head(codecs, x, code_one)
            out.append(self._merge([p for p, _ in res], n, h))
            recon.append(self._merge([r for _, r in res], n, h))
        k_rec, v_rec = recon
        if self.pre_rope:
            k_rec = apply_rope(k_rec, cos, sin)
        return torch.cat(out, dim=-1), k_rec, v_rec

    @staticmethod
    def _merge(parts: list[Tensor], n: int, h: int) -> Tensor:
        if len(parts) == 1:
            return parts[0].reshape(n, h, -1)
        return torch.stack(parts, dim=1)

    def decode(self, slots: Tensor, positions: Tensor,
               atoms: BlockAtoms | None = None) -> tuple[Tensor, Tensor]:
        """slots [N, H, C] uint8, positions [N] -> keys (after RoPE), values [N, H, D] float32.
        ``atoms``: the sampled atoms of the rows' blocks (adaptation on)."""
        n, h, _ = slots.shape
        kb, cb = self.layout.key_bytes, self.layout.code_bytes
        out = []
        for kind, codecs, raw in (("key", self.keys, slots[..., :kb]),
                                  ("value", self.values, slots[..., kb:cb])):
            held = getattr(atoms, kind) if atoms is not None else None

            def dec(c: TensorCodec, b: Tensor, head: int | None, held=held) -> Tensor:
                local = self._local(held, atoms.block_of, head) if held is not None else None
                return c.decode(c.unpack(b), local)

            out.append(self._merge(self._per_head(codecs, raw.contiguous(), dec), n, h))
        k, v = out
        if self.pre_rope:
            cos, sin = self._rope(positions, torch.float32)
            k = apply_rope(k, cos, sin)
        return k, v
