"""Dictionaries for a whole model, their on-disk format, and validation against a model.

On disk a dictionary set is a folder with two files:

* ``dictionary.safetensors``: ``key.atoms`` and ``value.atoms``, each [G, Hg, C, A, Dc] float32
  (G layer groups, Hg = H with per-head dictionaries else 1), rows unit-norm.
* ``manifest.json``: format version, the model's identity and shape, the codec settings, the
  training data and statistics, and the SHA-256 of the tensor file.

Only safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from csr_vllm.codec.codec import TensorCodec
from csr_vllm.codec.coefficients import ladder_positions
from csr_vllm.codec.config import CodecConfig
from csr_vllm.files import sha256_file

FORMAT_VERSION = 1
TENSORS_FILE = "dictionary.safetensors"
MANIFEST_FILE = "manifest.json"


class DictionaryError(ValueError):
    """A dictionary folder is missing, corrupt, or made for another model."""


@dataclass(frozen=True)
class ModelShape:
    """What a dictionary must agree with in the model it serves."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    name: str = ""

    @classmethod
    def from_hf_config(cls, cfg) -> ModelShape:
        """Build from a transformers config (or anything with the same attributes)."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        archs = getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "")]
        return cls(
            architecture=archs[0],
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            name=getattr(cfg, "_name_or_path", "") or "",
        )

    def mismatches(self, other: ModelShape) -> list[str]:
        """Human-readable differences in the fields that decide compatibility (name excluded)."""
        out = []
        for f in ("architecture", "num_layers", "num_kv_heads", "head_dim", "rope_theta"):
            mine, theirs = getattr(self, f), getattr(other, f)
            if mine != theirs:
                out.append(f"{f}: dictionary has {mine!r}, model has {theirs!r}")
        return out


@dataclass
class DictionarySet:
    """All K and V dictionaries of one model.

    Attributes:
        config: codec settings the dictionaries were trained for.
        shape: the model they belong to.
        key_atoms, value_atoms: [G, Hg, C, A, Dc] unit-norm atoms.
        info: training provenance and statistics (free-form JSON).
        key_ladder, value_ladder: [G, Hg, C, P, P] ladder tops of the ``logB`` coefficient
            formats (:func:`csr_vllm.codec.coefficients.ladder_tops`: entry ``[..., S-1, k]``
            for pursuit position k of S), calibrated when the dictionary was trained; None in
            dictionaries made before them, which then serve the other formats only.
        key_clusters, value_clusters: (centroids [G, Hg, C, K, Dc], offsets [G, Hg, C, K + 1])
            of a screened search, with the atoms ordered by cluster
            (:func:`csr_vllm.codec.search.ordered_for_search`); None = atoms as trained.
    """

    config: CodecConfig
    shape: ModelShape
    key_atoms: Tensor
    value_atoms: Tensor
    info: dict = field(default_factory=dict)
    # A shard (see :meth:`shard`): the global layers [start, end) and KV heads [start, end)
    # this set serves; None = all of the model's.
    layer_range: tuple[int, int] | None = None
    head_range: tuple[int, int] | None = None
    key_ladder: Tensor | None = None
    value_ladder: Tensor | None = None
    key_clusters: tuple[Tensor, Tensor] | None = None
    value_clusters: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        lo, hi = self.layers.start, self.layers.stop
        if not 0 <= lo < hi <= self.shape.num_layers:
            raise DictionaryError(f"layer range [{lo}, {hi}) outside the model's "
                                  f"{self.shape.num_layers} layers")
        h0, h1 = self.head_range or (0, self.shape.num_kv_heads)
        if not 0 <= h0 < h1 <= self.shape.num_kv_heads:
            raise DictionaryError(f"KV head range [{h0}, {h1}) outside the model's "
                                  f"{self.shape.num_kv_heads} KV heads")
        groups = self._first_group_past(hi) - self.group_offset
        heads = self.kv_heads if self.config.per_head else 1
        if (self.key_ladder is None) != (self.value_ladder is None):
            raise DictionaryError("a dictionary has ladder tops for both K and V or for neither")
        for kind, atoms, tcfg in (
            ("key", self.key_atoms, self.config.key),
            ("value", self.value_atoms, self.config.value),
        ):
            want = (groups, heads, tcfg.chunks, tcfg.num_atoms, self.shape.head_dim // tcfg.chunks)
            if tuple(atoms.shape) != want:
                raise DictionaryError(
                    f"{kind} atoms have shape {tuple(atoms.shape)}, expected {want} for "
                    f"{self.shape.num_layers} layers, {self.shape.num_kv_heads} KV heads, "
                    f"head_dim {self.shape.head_dim} and the codec settings"
                )
            ladder = self.ladder(kind)
            if ladder is not None:
                p = ladder_positions(want[-1])
                if tuple(ladder.shape) != (*want[:3], p, p):
                    raise DictionaryError(f"{kind} ladder has shape {tuple(ladder.shape)}, "
                                          f"expected {(*want[:3], p, p)}")
                if not bool(torch.isfinite(ladder).all()) or bool((ladder < 0).any()):
                    raise DictionaryError(f"{kind} ladder tops must be finite and >= 0")

    def ladder(self, kind: str) -> Tensor | None:
        """[G, Hg, C, P, P] ladder tops of ``kind`` ('key' or 'value'), or None."""
        return self.key_ladder if kind == "key" else self.value_ladder

    @property
    def has_ladders(self) -> bool:
        """True when the ``logB`` coefficient formats can be used with these atoms."""
        return self.key_ladder is not None and self.value_ladder is not None

    @property
    def layers(self) -> range:
        """Global indices of the layers this set serves (all, unless it is a shard)."""
        return range(*(self.layer_range or (0, self.shape.num_layers)))

    @property
    def kv_heads(self) -> int:
        """KV heads this set serves (the model's, or a tensor-parallel rank's share)."""
        h0, h1 = self.head_range or (0, self.shape.num_kv_heads)
        return h1 - h0

    @property
    def group_offset(self) -> int:
        """Index of the first held layer group among the model's groups."""
        return self.layers.start // self.config.layer_group

    def _first_group_past(self, end: int) -> int:
        return -(-end // self.config.layer_group)

    def group_of(self, layer: int) -> int:
        """Row of ``key_atoms`` / ``value_atoms`` that serves global ``layer``."""
        if layer not in self.layers:
            raise DictionaryError(f"layer {layer} is not in this dictionary shard (layers "
                                  f"{self.layers.start}-{self.layers.stop - 1})")
        return layer // self.config.layer_group - self.group_offset

    def codec(self, kind: str, layer: int, head: int = 0) -> TensorCodec:
        """The codec for ``kind`` ('key' or 'value') of global ``layer`` and KV ``head``, the
        head counted within this set (a tensor-parallel rank numbers its heads from 0)."""
        atoms = self.key_atoms if kind == "key" else self.value_atoms
        tcfg = self.config.key if kind == "key" else self.config.value
        if not 0 <= head < self.kv_heads:
            raise DictionaryError(f"KV head {head} is not in this set ({self.kv_heads} heads)")
        h = head if self.config.per_head else 0
        g = self.group_of(layer)
        ladder = None
        if tcfg.coef_format.uses_ladder:
            full = self.ladder(kind)
            s = tcfg.atoms_per_chunk
            if full is None:
                raise DictionaryError(
                    f"coefficient format {tcfg.coef} needs ladder tops, which this dictionary "
                    "predates; rerun `csr-vllm train-dict` with the same --out (it adds them "
                    "without retraining the atoms)")
            if s > full.shape[-1]:
                raise DictionaryError(f"{s} atoms per chunk exceed the {full.shape[-1]} "
                                      "positions the dictionary's ladders were calibrated for")
            ladder = full[g, h, :, s - 1, :s]
        clusters = None
        if not tcfg.search_spec.full:
            both = self.key_clusters if kind == "key" else self.value_clusters
            if both is None:
                raise DictionaryError(f"search {tcfg.search} needs the atoms ordered by "
                                      "cluster (csr_vllm.codec.search.ordered_for_search)")
            clusters = (both[0][g, h], both[1][g, h])
        return TensorCodec(tcfg, atoms[g, h], ladder, clusters)

    def shard(self, layers: tuple[int, int] | None = None,
              heads: tuple[int, int] | None = None) -> DictionarySet:
        """The part of this set that global layers ``[start, end)`` and KV heads
        ``[start, end)`` need (a pipeline stage's layers, a tensor-parallel rank's heads).

        Keeps the layer groups that overlap the layers and, with per-head dictionaries, the
        heads' own dictionaries; shared (per-layer) dictionaries serve every head, so a rank
        keeps them whole. The atoms are copied, so the full set can be freed.
        """
        layers = layers or (self.layers.start, self.layers.stop)
        h_all = self.head_range or (0, self.shape.num_kv_heads)
        heads = heads or h_all
        if not (self.layers.start <= layers[0] < layers[1] <= self.layers.stop):
            raise DictionaryError(f"cannot shard layers {layers} out of a set holding "
                                  f"{self.layers.start}-{self.layers.stop - 1}")
        if not (h_all[0] <= heads[0] < heads[1] <= h_all[1]):
            raise DictionaryError(f"cannot shard KV heads {heads} out of a set holding "
                                  f"{h_all[0]}-{h_all[1] - 1}")
        if tuple(layers) == (self.layers.start, self.layers.stop) and tuple(heads) == h_all:
            return self
        g0 = layers[0] // self.config.layer_group - self.group_offset
        g1 = self._first_group_past(layers[1]) - self.group_offset
        hs = slice(heads[0] - h_all[0], heads[1] - h_all[0]) if self.config.per_head \
            else slice(None)
        key, value = (a[g0:g1, hs].clone() for a in (self.key_atoms, self.value_atoms))
        kl, vl = (a[g0:g1, hs].clone() if a is not None else None
                  for a in (self.key_ladder, self.value_ladder))
        kc, vc = (tuple(t[g0:g1, hs].clone() for t in c) if c is not None else None
                  for c in (self.key_clusters, self.value_clusters))
        whole_layers = tuple(layers) == (0, self.shape.num_layers)
        whole_heads = tuple(heads) == (0, self.shape.num_kv_heads)
        return DictionarySet(self.config, self.shape, key, value, self.info,
                             None if whole_layers else tuple(layers),
                             None if whole_heads else tuple(heads), kl, vl, kc, vc)

    def with_codec(self, config: CodecConfig) -> DictionarySet:
        """The same atoms coded with another setting (e.g. a preset's atoms per vector).

        Atoms per vector and coefficient format may differ from what the dictionary was trained
        with; everything that shapes the atoms must agree.
        """
        mine, theirs = self.config, config
        diffs = [
            f"{name}: dictionary has {a!r}, requested {b!r}"
            for name, a, b in (
                ("key atoms", mine.key.num_atoms, theirs.key.num_atoms),
                ("value atoms", mine.value.num_atoms, theirs.value.num_atoms),
                ("key chunks", mine.key.chunks, theirs.key.chunks),
                ("value chunks", mine.value.chunks, theirs.value.chunks),
                ("key_rope", mine.key_rope, theirs.key_rope),
                ("layer_group", mine.layer_group, theirs.layer_group),
                ("per_head", mine.per_head, theirs.per_head),
            )
            if a != b
        ]
        if diffs:
            raise DictionaryError("dictionary does not fit this codec setting: " + "; ".join(diffs))
        return DictionarySet(config, self.shape, self.key_atoms, self.value_atoms, self.info,
                             self.layer_range, self.head_range, self.key_ladder,
                             self.value_ladder, self.key_clusters, self.value_clusters)

    @property
    def nbytes(self) -> int:
        """Bytes the atoms (and a screened search's clusters) occupy in memory."""
        clusters = sum(t.nbytes for c in (self.key_clusters, self.value_clusters) if c
                       for t in c)
        return self.key_atoms.nbytes + self.value_atoms.nbytes + clusters

    # -- persistence -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        if self.layer_range is not None or self.head_range is not None:
            raise DictionaryError("a dictionary shard cannot be saved; save the full set")
        if self.key_clusters is not None or self.value_clusters is not None:
            raise DictionaryError("a set ordered for a screened search cannot be saved; save "
                                  "the set as loaded")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"key.atoms": self.key_atoms.float().contiguous(),
                   "value.atoms": self.value_atoms.float().contiguous()}
        if self.has_ladders:
            tensors["key.ladder"] = self.key_ladder.float().contiguous()
            tensors["value.ladder"] = self.value_ladder.float().contiguous()
        save_file(tensors, folder / TENSORS_FILE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": asdict(self.shape),
            "codec": self.config.to_dict(),
            "bits_per_channel": self.config.bits_per_channel(self.shape.head_dim),
            "slot_bytes": self.config.slot_bytes(),
            "tensors_sha256": sha256_file(folder / TENSORS_FILE),
            "info": self.info,
        }
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, folder: str | Path, expect: ModelShape | None = None) -> DictionarySet:
        """Load and validate a dictionary folder; ``expect`` is the model it must match."""
        folder = Path(folder)
        manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
        for p in (manifest_path, tensors_path):
            if not p.is_file():
                raise DictionaryError(f"dictionary folder {folder} has no {p.name}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DictionaryError(f"{manifest_path} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise DictionaryError(f"{manifest_path}: malformed manifest (not a JSON object)")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DictionaryError(
                f"{manifest_path}: format_version {version!r}, this csr-vllm reads {FORMAT_VERSION}"
            )
        try:
            shape = ModelShape(**manifest["model"])
            config = CodecConfig.from_dict(manifest["codec"])
        except (KeyError, TypeError, ValueError) as e:
            raise DictionaryError(f"{manifest_path}: malformed manifest ({e})") from None
        if expect is not None and (diff := shape.mismatches(expect)):
            raise DictionaryError(
                f"dictionary {folder} was made for another model ({shape.name or '?'}): "
                + "; ".join(diff)
            )
        digest = sha256_file(tensors_path)
        if digest != manifest.get("tensors_sha256"):
            raise DictionaryError(
                f"{tensors_path} is corrupt: SHA-256 {digest[:12]}... does not match the manifest"
            )
        try:
            tensors = load_file(tensors_path)
            key, value = tensors["key.atoms"], tensors["value.atoms"]
            ladders = (tensors.get("key.ladder"), tensors.get("value.ladder"))
        except (SafetensorError, KeyError, OSError) as e:
            raise DictionaryError(f"{tensors_path} cannot be read: {e}") from None
        norms = torch.cat([key.norm(dim=-1).flatten(), value.norm(dim=-1).flatten()])
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise DictionaryError(f"{tensors_path}: atoms are not unit-norm")
        try:
            return cls(config, shape, key, value, manifest.get("info", {}),
                       key_ladder=ladders[0], value_ladder=ladders[1])
        except TypeError as e:  # e.g. "num_layers": "3" slips past the dataclass constructor
            raise DictionaryError(f"{manifest_path}: malformed manifest ({e})") from None
