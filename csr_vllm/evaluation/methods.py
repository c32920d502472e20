"""KV cache compression methods the harness compares, each with its all-in bits per channel.

A method maps one layer's keys/values [H, T, D] to what an engine would read back. Keys arrive
after RoPE (as vLLM stores them) with their positions [T]. Methods that code each (token, head)
vector on its own (``per_vector = True``) let the harness reuse reconstructions of old tokens
while decoding; group-wise ones (KIVI) are recomputed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from csr_vllm.codec.config import get_preset
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope


class KVMethod(ABC):
    """One way of storing the KV cache."""

    name: str
    per_vector: bool = True

    @abstractmethod
    def bits_per_channel(self, head_dim: int) -> float:
        """All-in storage bits per K/V channel."""

    @abstractmethod
    def compress(self, layer: int, keys: Tensor, values: Tensor,
                 positions: Tensor) -> tuple[Tensor, Tensor]:
        """keys, values [H, T, D] (keys post-RoPE), positions [T] -> reconstructions, same shapes."""


class Exact(KVMethod):
    """No compression at all (the model's own compute precision): the harness's control."""

    name = "exact"

    def bits_per_channel(self, head_dim: int) -> float:
        return 32.0

    def compress(self, layer, keys, values, positions):
        return keys, values


class BF16(KVMethod):
    """vLLM's default cache: K/V rounded to bfloat16."""

    name = "bf16"

    def bits_per_channel(self, head_dim: int) -> float:
        return 16.0

    def compress(self, layer, keys, values, positions):
        return keys.bfloat16().to(keys.dtype), values.bfloat16().to(values.dtype)


def _sym_quant(x: Tensor, qmin: int, qmax: int, dim: int) -> Tensor:
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / qmax
    return torch.round(x / scale).clamp(qmin, qmax) * scale


class PerTokenHead(KVMethod):
    """vLLM's ``int8_per_token_head`` / ``int4_per_token_head``: symmetric absmax quantisation
    per (token, head) with an inline fp32 scale for K and one for V."""

    def __init__(self, bits: int) -> None:
        if bits not in (4, 8):
            raise ValueError("per-token-head quantisation is int4 or int8")
        self.bits = bits
        self.name = f"int{bits}"
        self.qmin, self.qmax = (-128, 127) if bits == 8 else (-8, 7)

    def bits_per_channel(self, head_dim: int) -> float:
        return self.bits + 32 / head_dim

    def compress(self, layer, keys, values, positions):
        return (_sym_quant(keys, self.qmin, self.qmax, -1),
                _sym_quant(values, self.qmin, self.qmax, -1))


def _asym_quant(x: Tensor, bits: int, dim: int) -> Tensor:
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


class KIVI(KVMethod):
    """KIVI: asymmetric B-bit quantisation, keys per channel over groups of G tokens, values per
    token over groups of G channels, an fp16 scale and zero point per group."""

    per_vector = False

    def __init__(self, bits: int, group: int = 32) -> None:
        self.bits, self.group = bits, group
        self.name = f"kivi-{bits}"

    def bits_per_channel(self, head_dim: int) -> float:
        return self.bits + 2 * 16 / self.group

    def compress(self, layer, keys, values, positions):
        h, t, d = keys.shape
        g = self.group
        pad = (-t) % g
        # Keys: groups run along the token axis, one range per channel per group.
        kp = torch.nn.functional.pad(keys, (0, 0, 0, pad), mode="replicate")
        kq = _asym_quant(kp.reshape(h, -1, g, d), self.bits, dim=2).reshape(h, -1, d)[:, :t]
        vq = _asym_quant(values.reshape(h, t, d // g, g), self.bits, dim=-1).reshape(h, t, d)
        return kq, vq


class CSR(KVMethod):
    """Dictionary sparse codes (this project): keys optionally coded before RoPE.

    With ``guard_fraction > 0`` the outlier Guard is on: of the vectors a call codes, those
    whose relative reconstruction error exceeds ``guard_threshold`` are kept exact, at most the
    worst ``guard_fraction`` of them (per layer and tensor). Their cost (fp16 vector + a 32-bit
    slot id) is counted in :meth:`guard_bits_per_channel`, amortised over every coded vector.
    """

    def __init__(self, dicts: DictionarySet, name: str = "csr", guard_fraction: float = 0.0,
                 guard_threshold: float = 0.0) -> None:
        if not 0.0 <= guard_fraction <= 1.0:
            raise ValueError("guard_fraction must be within [0, 1]")
        self.dicts = dicts
        self.name = name
        self.guard_fraction = guard_fraction
        self.guard_threshold = guard_threshold
        self.coded = 0
        self.guarded = 0

    def bits_per_channel(self, head_dim: int) -> float:
        return self.dicts.config.bits_per_channel(head_dim)

    def guard_bits_per_channel(self, head_dim: int) -> float:
        """Outlier-Guard bytes so far, as bits per channel over every coded vector."""
        return self.guarded * (16 * head_dim + 32) / max(self.coded * head_dim, 1)

    def _code(self, kind: str, layer: int, x: Tensor) -> Tensor:
        """x [H, T, D] -> reconstruction, with the outlier Guard applied."""
        y = torch.stack([self.dicts.codec(kind, layer, h).roundtrip(x[h])
                         for h in range(x.shape[0])])
        self.coded += x.shape[0] * x.shape[1]
        if self.guard_fraction > 0:
            err = (x - y).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)  # [H, T]
            cap = int(self.guard_fraction * err.numel())
            worst = err.flatten().topk(cap).indices if cap else err.new_zeros(0, dtype=torch.long)
            keep = torch.zeros_like(err, dtype=torch.bool).flatten()
            keep[worst] = True
            keep = keep.view_as(err) & (err > self.guard_threshold)
            y = torch.where(keep[..., None], x, y)
            self.guarded += int(keep.sum())
        return y

    def compress(self, layer, keys, values, positions):
        shape = self.dicts.shape
        if self.dicts.config.key_rope == "pre":
            cos, sin = rope_tables(shape.head_dim, shape.rope_theta, positions, keys.dtype)
            keys = undo_rope(keys, cos, sin)
        k_hat = self._code("key", layer, keys)
        v_hat = self._code("value", layer, values)
        if self.dicts.config.key_rope == "pre":
            k_hat = apply_rope(k_hat, cos, sin)
        return k_hat, v_hat


PEERS = ("bf16", "exact", "kivi-2", "kivi-4", "int8", "int4")


def make_method(name: str, dict_dir: str | Path | None = None,
                shape: ModelShape | None = None) -> KVMethod:
    """Build a method by name: a peer, or ``csr-*`` (a preset, needs ``dict_dir``)."""
    simple = {
        "exact": Exact, "bf16": BF16,
        "int8": lambda: PerTokenHead(8), "int4": lambda: PerTokenHead(4),
        "kivi-2": lambda: KIVI(2), "kivi-4": lambda: KIVI(4),
    }
    if name in simple:
        return simple[name]()
    if name.startswith("csr"):
        if dict_dir is None:
            raise ValueError(f"method {name} needs --dict DIR (a trained dictionary)")
        # "csr-2b+outliers=0.02": the outlier Guard keeps the worst 2% of vectors exact.
        base, _, extra = name.partition("+outliers=")
        try:
            fraction = float(extra) if extra else 0.0
        except ValueError:
            raise ValueError(f"bad outlier fraction in {name!r} (e.g. csr-2b+outliers=0.02)") \
                from None
        dicts = DictionarySet.load(dict_dir, expect=shape)
        if base != "csr":  # a preset applied to the dictionary's atoms
            dicts = dicts.with_codec(get_preset(base).config_for(dicts.shape.head_dim))
        return CSR(dicts, name, guard_fraction=fraction)
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(PEERS)}, csr-<preset>")
