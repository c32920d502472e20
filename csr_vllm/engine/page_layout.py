"""The CSR page: what one (token, KV head) slot of vLLM's paged KV cache holds.

vLLM hands the backend one ``uint8`` tensor per layer, ``[num_blocks, H, block_size, C]``
(``C = state_content_bytes`` from :meth:`CSRAttentionBackend.customize_spec`). Byte layout of
one slot, C = Ck + Cv bytes::

    bytes [0, Ck)      key code    (bit stream of csr_vllm.codec.packing: [scale] coefs indices)
    bytes [Ck, Ck+Cv)  value code  (same layout, the value dictionary's widths)

With ``csr-1b`` at head_dim 64: Ck = Cv = 8 (3 atoms x (13-bit index + fp8 coefficient) = 63
bits each), C = 16 bytes against bf16's 256: 16x the tokens per block of memory. Keys are coded
before or after RoPE as the dictionary says; pre-RoPE keys are rotated back with the token's
position before coding and forward again after decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from csr_vllm.codec.codec import TensorCodec
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope


@dataclass(frozen=True)
class SlotLayout:
    """Byte sizes of one (token, KV head) slot."""

    key_bytes: int
    value_bytes: int

    @property
    def slot_bytes(self) -> int:
        return self.key_bytes + self.value_bytes

    @classmethod
    def of(cls, dicts: DictionarySet) -> SlotLayout:
        return cls(dicts.config.key.slot_bytes, dicts.config.value.slot_bytes)


class LayerCodec:
    """Encodes and decodes one layer's K/V slots ([N, H, D] <-> [N, H, C] bytes)."""

    def __init__(self, dicts: DictionarySet, layer: int) -> None:
        shape = dicts.shape
        self.layout = SlotLayout.of(dicts)
        self.num_heads = dicts.kv_heads  # this worker's share under tensor parallelism
        self.head_dim = shape.head_dim
        self.rope_theta = shape.rope_theta
        self.pre_rope = dicts.config.key_rope == "pre"
        # One codec per head when dictionaries are per head, else one shared by all heads.
        heads = range(dicts.kv_heads) if dicts.config.per_head else range(1)
        self.keys = [dicts.codec("key", layer, h) for h in heads]
        self.values = [dicts.codec("value", layer, h) for h in heads]

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = rope_tables(self.head_dim, self.rope_theta, positions, dtype)
        return cos[:, None], sin[:, None]  # broadcast over heads

    @staticmethod
    def _per_head(codecs: list[TensorCodec], x: Tensor, fn) -> list[Tensor]:
        if len(codecs) == 1:
            n, h = x.shape[:2]
            return [fn(codecs[0], x.reshape(n * h, *x.shape[2:]))]
        return [fn(c, x[:, i]) for i, c in enumerate(codecs)]

    def encode(self, key: Tensor, value: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """key/value [N, H, D] (keys after RoPE), positions [N] -> (slots [N, H, C] uint8,
        key and value reconstructions [N, H, D] float32 for error checks)."""
        n, h, d = key.shape
        key = key.float()
        if self.pre_rope:
            cos, sin = self._rope(positions, torch.float32)
            key = undo_rope(key, cos, sin)
        out, recon = [], []
        for codecs, x in ((self.keys, key), (self.values, value.float())):
            codes = self._per_head(codecs, x, lambda c, v: c.encode(v))
            packed = [c.pack(code) for c, code in zip(codecs, codes, strict=True)]
            rec = [c.decode(code) for c, code in zip(codecs, codes, strict=True)]
            out.append(self._merge(packed, n, h))
            recon.append(self._merge(rec, n, h))
        k_rec, v_rec = recon
        if self.pre_rope:
            k_rec = apply_rope(k_rec, cos, sin)
        return torch.cat(out, dim=-1), k_rec, v_rec

    @staticmethod
    def _merge(parts: list[Tensor], n: int, h: int) -> Tensor:
        if len(parts) == 1:
            return parts[0].reshape(n, h, -1)
        return torch.stack(parts, dim=1)

    def decode(self, slots: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """slots [N, H, C] uint8, positions [N] -> keys (after RoPE), values [N, H, D] float32."""
        n, h, _ = slots.shape
        kb = self.layout.key_bytes
        out = []
        for codecs, raw in ((self.keys, slots[..., :kb]), (self.values, slots[..., kb:])):
            dec = self._per_head(codecs, raw.contiguous(), lambda c, b: c.decode(c.unpack(b)))
            out.append(self._merge(dec, n, h))
        k, v = out
        if self.pre_rope:
            cos, sin = self._rope(positions, torch.float32)
            k = apply_rope(k, cos, sin)
        return k, v
