"""KV cache compression methods the harness compares, each with its all-in bits per channel.

A method maps one layer's keys/values [H, T, D] to what an engine would read back. Keys arrive
after RoPE (as vLLM stores them) with their positions [T]. Methods that code each (token, head)
vector on its own (``per_vector = True``) let the harness reuse reconstructions of old tokens
while decoding; group-wise ones (KIVI) are recomputed.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from csr_vllm.codec.adaptation import (
    LocalAtoms,
    adapted_bits_per_channel,
    atom_limit,
    encode_adaptive,
)
from csr_vllm.codec.coefficients import CoefFormat
from csr_vllm.codec.config import get_preset
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope
from csr_vllm.codec.search import SearchSpec, ordered_for_search


class KVMethod(ABC):
    """One way of storing the KV cache."""

    name: str
    per_vector: bool = True

    @abstractmethod
    def bits_per_channel(self, head_dim: int) -> float:
        """All-in storage bits per K/V channel."""

    @property
    def setting(self) -> str:
        """What decides this method's output beyond its name (a preset's codec, its options):
        results cached under a name are reused only while the setting is the same."""
        return self.name

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

    With ``adapt = E > 0``, sampling-based adaptation as the engine does it
    (:mod:`csr_vllm.codec.adaptation`): tokens are grouped by position into blocks of
    ``block_size`` (vLLM's CPU block, 128), each block samples E atoms per tensor from its own
    vectors and codes them against the dictionary and those atoms; :meth:`bits_per_channel`
    then includes the atoms' bytes exactly as the engine's slot does.

    ``dense_layers``: layers kept exact, as the engine's dense layers
    (:mod:`csr_vllm.engine.dense_layers`); None = the dictionary's recommendation, as the
    engine. Their bf16 K/V are added to :meth:`bits_per_channel` (the engine still holds their
    code slots in the pool, so the bits are the codes' plus 16 per channel per dense layer,
    averaged over the layers).
    """

    def __init__(self, dicts: DictionarySet, name: str = "csr", guard_fraction: float = 0.0,
                 guard_threshold: float = 0.0, adapt: int = 0, block_size: int = 128,
                 dense_layers: tuple[int, ...] | None = None,
                 search: SearchSpec | None = None) -> None:
        if not 0.0 <= guard_fraction <= 1.0:
            raise ValueError("guard_fraction must be within [0, 1]")
        if adapt:
            dicts = dicts.with_codec(dicts.config.with_sampled_atoms(adapt))
        # After adaptation, which reserves atoms the clusters must leave out.
        dicts = ordered_for_search(dicts, search or SearchSpec())
        self.dicts = dicts
        self.name = name
        self.guard_fraction = guard_fraction
        self.guard_threshold = guard_threshold
        self.adapt, self.block_size = adapt, block_size
        # (layer, kind, dictionary head) -> block -> sampled atoms [C, E, Dc]; append-only
        # until the block's offset 0 is coded again, as in the engine.
        self._atoms: dict[tuple[int, str, int], dict[int, Tensor]] = {}
        self.coded = 0
        self.guarded = 0
        if dense_layers is None:
            dense_layers = tuple(int(i) for i in dicts.info.get("dense_layers", ()))
        self.dense_layers = frozenset(dense_layers)

    @property
    def setting(self) -> str:
        c = self.dicts.config

        def tensor(t) -> str:
            return f"{t.chunks}x{t.atoms_per_chunk}x{t.coef}/{t.num_atoms}{t.pursuit}"

        extra = (f" adapt={self.adapt}/{self.block_size}" if self.adapt else "") + (
            f" outliers={self.guard_fraction}" if self.guard_fraction else "") + (
            f" dense={'/'.join(map(str, sorted(self.dense_layers)))}" if self.dense_layers
            else "") + (f" search={c.key.search}" if c.key.search != "full" else "")
        return f"K {tensor(c.key)} V {tensor(c.value)} rope={c.key_rope}{extra}"

    def bits_per_channel(self, head_dim: int) -> float:
        if self.adapt:
            bits = adapted_bits_per_channel(self.dicts.config, head_dim,
                                            self.dicts.shape.num_kv_heads, self.block_size)
        else:
            bits = self.dicts.config.bits_per_channel(head_dim)
        return bits + 16 * len(self.dense_layers) / self.dicts.shape.num_layers

    def sampled_atoms(self) -> int:
        """Sampled atoms currently held (all layers, tensors and blocks)."""
        return sum(int((a.abs().amax(-1) > 0).sum()) for blocks in self._atoms.values()
                   for a in blocks.values())

    def guard_bits_per_channel(self, head_dim: int) -> float:
        """Outlier-Guard bytes so far, as bits per channel over every coded vector."""
        return self.guarded * (16 * head_dim + 32) / max(self.coded * head_dim, 1)

    def _code(self, kind: str, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        """x [H, T, D] -> reconstruction, with the outlier Guard applied."""
        if self.adapt:
            y = self._code_adaptive(kind, layer, x, positions)
        else:
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

    def _code_adaptive(self, kind: str, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        """x [H, T, D] -> reconstruction with per-block sampled atoms (shared by the heads
        unless the dictionaries are per head)."""
        h, t, d = x.shape
        per_head = self.dicts.config.per_head
        heads = [[i] for i in range(h)] if per_head else [list(range(h))]
        y = torch.empty_like(x)
        block, offset = positions // self.block_size, positions % self.block_size
        blocks, tok_group = torch.unique(block, return_inverse=True)
        last = torch.full((len(blocks),), -1, dtype=torch.long)
        last.scatter_reduce_(0, tok_group, offset, reduce="amax")
        starts = set(block[offset == 0].tolist())
        for hs in heads:
            codec = self.dicts.codec(kind, layer, hs[0])
            store = self._atoms.setdefault((layer, kind, hs[0]), {})
            empty = torch.zeros(codec.config.chunks, codec.config.sampled_atoms,
                                d // codec.config.chunks)
            atoms = torch.stack([empty if b in starts else store.get(b, empty)
                                 for b in blocks.tolist()])
            vecs = x[hs].transpose(0, 1).reshape(t * len(hs), d)  # token-major
            group = tok_group.repeat_interleave(len(hs))
            limit = atom_limit(last, self.block_size, codec.config.sampled_atoms)
            code, atoms = encode_adaptive(codec, vecs, group, atoms, limit)
            rec = codec.decode(code, LocalAtoms(atoms, group)).to(x.dtype)
            y[hs] = rec.reshape(t, len(hs), d).transpose(0, 1)
            store.update(zip(blocks.tolist(), atoms, strict=True))
        return y

    def compress(self, layer, keys, values, positions):
        if layer in self.dense_layers:
            return keys, values
        shape = self.dicts.shape
        if self.dicts.config.key_rope == "pre":
            cos, sin = rope_tables(shape.head_dim, shape.rope_theta, positions, keys.dtype)
            keys = undo_rope(keys, cos, sin)
        k_hat = self._code("key", layer, keys, positions)
        v_hat = self._code("value", layer, values, positions)
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
        # "csr-2b+outliers=0.02": the outlier Guard keeps the worst 2% of vectors exact;
        # "csr-1b+adapt=3": 3 atoms per block and tensor sampled from the K/V being coded.
        base, options = _csr_options(name)
        dicts = DictionarySet.load(dict_dir, expect=shape)
        if base != "csr":  # a preset applied to the dictionary's atoms
            preset = get_preset(base)
            # "+coef=log5" / "+vcoef=log3": the preset's budget with other coefficient formats
            # (as many atoms as then fit), for measuring formats no preset uses.
            if "coef" in options or "vcoef" in options:
                kc = options.get("coef", preset.key_coef)
                preset = dataclasses.replace(preset, key_coef=kc,
                                             value_coef=options.get("vcoef", kc))
            # "+spare=value": an uneven split's extra atom to the values instead of the keys.
            if "spare" in options:
                preset = dataclasses.replace(preset, spare=options["spare"])
            dicts = dicts.with_codec(preset.config_for(dicts.shape.head_dim))
        return CSR(dicts, name, guard_fraction=options.get("outliers", 0.0),
                   adapt=int(options.get("adapt", 0)), dense_layers=options.get("dense"),
                   search=options.get("search", SearchSpec()))
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(PEERS)}, csr-<preset>")


def _coef_name(v: str) -> str:
    return CoefFormat(v).name  # raises ValueError listing the valid formats


def _spare(v: str) -> str:
    if v not in ("key", "value"):
        raise ValueError(v)
    return v


def _layers(v: str) -> tuple[int, ...]:
    """``0/27`` -> (0, 27); empty -> () (no dense layers)."""
    layers = tuple(int(x) for x in v.split("/") if x)
    if any(i < 0 for i in layers):
        raise ValueError(v)
    return layers


CSR_OPTIONS = {"outliers": float, "adapt": int, "coef": _coef_name, "vcoef": _coef_name,
               "spare": _spare, "dense": _layers, "search": SearchSpec.parse}


def _csr_options(name: str) -> tuple[str, dict[str, float | str]]:
    """``csr-2b+outliers=0.02+adapt=3`` -> ("csr-2b", {"outliers": 0.02, "adapt": 3})."""
    base, *parts = name.split("+")
    options: dict[str, float | str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in CSR_OPTIONS:
            raise ValueError(f"unknown option {key!r} in {name!r}; valid: "
                             f"{', '.join(CSR_OPTIONS)} (e.g. csr-2b+outliers=0.02+adapt=3)")
        try:
            options[key] = CSR_OPTIONS[key](value)
        except ValueError:
            what = {"outliers": "outlier fraction", "coef": "coefficient format (fp8, fp16, "
                    "int3..int8, log3..log6)", "vcoef": "value coefficient format (fp8, fp16, "
                    "int3..int8, log3..log6)", "spare": "spare atom's tensor (key or value)",
                    "dense": "dense layers (e.g. dense=0/27)",
                    "search": "search (full or clusters/probes, e.g. search=256/32)"}.get(
                        key, f"{key} value")
            raise ValueError(f"bad {what} in {name!r} (e.g. csr-2b+outliers=0.02+adapt=3)") \
                from None
        if isinstance(options[key], (int, float)) and options[key] < 0:
            raise ValueError(f"{key} must be >= 0 in {name!r}")
    return base, options
