"""Train a model's CSR dictionaries: collect K/V, k-means init, NeuralDict, save + manifest.

Work is split into units (kind, layer group, head group, chunk). Each finished unit is written
to ``OUT/partial/`` as safetensors, so an interrupted run resumes where it stopped; the final
``dictionary.safetensors`` + ``manifest.json`` are written last.

Each unit also gets its coefficient ladder (:func:`csr_vllm.codec.coefficients.ladder_tops`),
calibrated on its training vectors. A unit trained before ladders existed gets one added on the
next run with the same ``--out``, its atoms untouched.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from csr_vllm.codec.coefficients import ladder_positions, ladder_tops
from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.codec.pursuit import PURSUITS, reconstruct
from csr_vllm.dict_training.collect import collect_kv, token_windows
from csr_vllm.dict_training.neuraldict import neuraldict, spherical_kmeans


@dataclass
class TrainConfig:
    """Everything that decides the trained dictionaries (recorded in the manifest)."""

    codec: CodecConfig
    preset: str | None = None
    corpus: str = "train-hotpotqa"  # a corpus name (csr_vllm.data.corpora) or a text file
    window: int = 2048
    # Defaults are the default dictionary's recipe, sized so that all 60 SmolLM2 dictionaries
    # (30 layers x K, V; 8192 atoms each) train in under 15 minutes on 2 CPU cores.
    train_windows: int = 16
    holdout_windows: int = 2
    max_vectors: int = 49152  # per unit, subsampled from what was collected
    kmeans_iters: int = 4
    neuraldict_steps: int = 20
    neuraldict_batch: int = 2048
    neuraldict_lr: float = 1e-3
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    kind: str  # "key" | "value"
    group: int
    head: int  # head group index (0 when dictionaries are shared by heads)
    chunk: int

    @property
    def tag(self) -> str:
        return f"{self.kind}_g{self.group}_h{self.head}_c{self.chunk}"


def unit_seed(unit: Unit, seed: int) -> int:
    """Seed of one unit's k-means/NeuralDict: stable across processes (unlike ``hash``, which
    Python salts per process), so a rerun or a resume trains the same atoms."""
    return (zlib.crc32(unit.tag.encode()) + seed) % 2**63


def unit_vectors(kv: Tensor, unit: Unit, codec: CodecConfig, tcfg: TensorCodecConfig) -> Tensor:
    """Vectors [N, Dc] a unit trains on, from collected [L, T, H, D]."""
    layers = range(unit.group * codec.layer_group,
                   min((unit.group + 1) * codec.layer_group, kv.shape[0]))
    x = kv[list(layers)]
    x = x[:, :, unit.head : unit.head + 1] if codec.per_head else x
    dc = x.shape[-1] // tcfg.chunks
    return x[..., unit.chunk * dc : (unit.chunk + 1) * dc].reshape(-1, dc).float()


def relative_error(x: Tensor, atoms: Tensor, tcfg: TensorCodecConfig) -> float:
    """||x - x_hat|| / ||x|| under the unit's pursuit (unquantised coefficients)."""
    idx, coef = PURSUITS[tcfg.pursuit](x, atoms, tcfg.atoms_per_chunk)
    return float((x - reconstruct(idx, coef, atoms)).norm() / x.norm())


# Training vectors a unit's ladder is calibrated on: ~1 s a unit on 2 cores (60 units for
# SmolLM2), a small part of the default dictionary's 15-minute budget.
LADDER_VECTORS = 1024


def unit_ladder(x: Tensor, atoms: Tensor, seed: int) -> Tensor:
    """Ladder tops [P, P] of one unit, from a seeded subsample of its training vectors (the
    same subsample whether the unit was just trained or trained before ladders existed)."""
    gen = torch.Generator().manual_seed(seed + 1)
    if x.shape[0] > LADDER_VECTORS:
        x = x[torch.randperm(x.shape[0], generator=gen)[:LADDER_VECTORS]]
    return ladder_tops(x, atoms).contiguous()


def _has_ladder(partial: Path, unit: Unit, codec: CodecConfig, shape: ModelShape) -> bool:
    """True when the unit's file holds a ladder of the current calibration's shape (read from
    the file's header, not by loading its tensors)."""
    tcfg = codec.key if unit.kind == "key" else codec.value
    p = ladder_positions(shape.head_dim // tcfg.chunks)
    with safe_open(str(partial / f"{unit.tag}.safetensors"), "pt") as f:
        # safe_open handles list their keys but do not support `in`.
        return "ladder" in f.keys() and tuple(f.get_slice("ladder").get_shape()) == (p, p)  # noqa: SIM118


def _split(kv, unit: Unit, split: int) -> tuple[Tensor, Tensor]:
    """The unit's tensor (keys or values) of the collected K/V: training part, held-out part."""
    src = kv.keys if unit.kind == "key" else kv.values
    return src[:, :split], src[:, split:]


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def train_unit(x: Tensor, x_eval: Tensor, tcfg: TensorCodecConfig, cfg: TrainConfig,
               gen: torch.Generator) -> tuple[Tensor, dict]:
    """k-means then NeuralDict for one unit; returns atoms [A, Dc] and statistics."""
    if x.shape[0] > cfg.max_vectors:
        x = x[torch.randperm(x.shape[0], generator=gen)[: cfg.max_vectors]]
    t0 = time.perf_counter()
    atoms = spherical_kmeans(x, tcfg.num_atoms, cfg.kmeans_iters, gen)
    t1 = time.perf_counter()
    stats = {"vectors": x.shape[0], "kmeans_seconds": round(t1 - t0, 2),
             "kmeans_rel_error": relative_error(x_eval, atoms, tcfg)}
    if cfg.neuraldict_steps > 0:
        atoms, nd = neuraldict(x, atoms, tcfg.atoms_per_chunk, tcfg.pursuit,
                               cfg.neuraldict_steps, cfg.neuraldict_batch, cfg.neuraldict_lr, gen)
        stats.update(neuraldict_seconds=round(time.perf_counter() - t1, 2),
                     neuraldict_rel_error=relative_error(x_eval, atoms, tcfg),
                     neuraldict_mse_start=nd.mse_start, neuraldict_mse_end=nd.mse_end,
                     neuraldict_orthogonality=nd.ortho_end)
    return atoms, stats


def train_dictionaries(model_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
                       progress: bool = True) -> DictionarySet:
    """Train, save to ``out_dir`` (resumable) and return the dictionary set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csr_vllm.data.corpora import training_text

    out = Path(out_dir)
    partial = out / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    run_file = partial / "run.json"
    run = {"train": _jsonable(asdict(cfg)), "model_dir": str(model_dir)}
    if run_file.is_file() and json.loads(run_file.read_text())["train"] != run["train"]:
        raise ValueError(f"{partial} holds a run with other settings; delete it or pick another --out")
    run_file.write_text(json.dumps(run, indent=1))

    codec = cfg.codec
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = ModelShape.from_hf_config(model.config)
    units = _units(shape, codec)
    todo = [u for u in units if not (partial / f"{u.tag}.safetensors").is_file()]
    no_ladder = [u for u in units if u not in todo and not _has_ladder(partial, u, codec, shape)]

    if todo or no_ladder:
        text = training_text(cfg.corpus)
        windows = token_windows(tokenizer, text, cfg.window, cfg.train_windows + cfg.holdout_windows)
        kv = collect_kv(model, windows, codec.key_rope, progress)
        split = cfg.train_windows * cfg.window
        gen = torch.Generator().manual_seed(cfg.seed)
        for unit in tqdm(todo, desc="train dictionaries", disable=not progress):
            tcfg = codec.key if unit.kind == "key" else codec.value
            x, x_eval = (unit_vectors(part, unit, codec, tcfg)
                         for part in _split(kv, unit, split))
            gen.manual_seed(unit_seed(unit, cfg.seed))
            atoms, stats = train_unit(x, x_eval, tcfg, cfg, gen)
            ladder = unit_ladder(x, atoms, unit_seed(unit, cfg.seed))
            save_file({"atoms": atoms.contiguous(), "ladder": ladder},
                      partial / f"{unit.tag}.safetensors", metadata={"stats": json.dumps(stats)})
        for unit in tqdm(no_ladder, desc="calibrate ladders", disable=not progress):
            path = partial / f"{unit.tag}.safetensors"
            atoms, meta = load_file(path)["atoms"], _metadata(path)
            tcfg = codec.key if unit.kind == "key" else codec.value
            x = unit_vectors(_split(kv, unit, split)[0], unit, codec, tcfg)
            ladder = unit_ladder(x, atoms, unit_seed(unit, cfg.seed))
            save_file({"atoms": atoms, "ladder": ladder}, path, metadata=meta)
    del model

    dicts = _assemble(shape, cfg, units, partial)
    from csr_vllm.model_fetch import dense_layers_for

    dicts.info["dense_layers"] = list(dense_layers_for(model_dir))
    dicts.save(out)
    return dicts


def _units(shape: ModelShape, codec: CodecConfig) -> list[Unit]:
    groups = -(-shape.num_layers // codec.layer_group)
    heads = shape.num_kv_heads if codec.per_head else 1
    return [Unit(kind, g, h, c)
            for kind, tcfg in (("key", codec.key), ("value", codec.value))
            for g in range(groups) for h in range(heads) for c in range(tcfg.chunks)]


def _assemble(shape: ModelShape, cfg: TrainConfig, units: list[Unit], partial: Path) -> DictionarySet:
    codec = cfg.codec
    groups = -(-shape.num_layers // codec.layer_group)
    heads = shape.num_kv_heads if codec.per_head else 1
    atoms, ladders = {}, {}
    all_stats = {}
    for kind, tcfg in (("key", codec.key), ("value", codec.value)):
        dc = shape.head_dim // tcfg.chunks
        atoms[kind] = torch.zeros(groups, heads, tcfg.chunks, tcfg.num_atoms, dc)
        p = ladder_positions(dc)
        ladders[kind] = torch.zeros(groups, heads, tcfg.chunks, p, p)
    for u in units:
        path = partial / f"{u.tag}.safetensors"
        unit = load_file(path)
        atoms[u.kind][u.group, u.head, u.chunk] = unit["atoms"]
        ladders[u.kind][u.group, u.head, u.chunk] = unit["ladder"]
        all_stats[u.tag] = json.loads(_metadata(path)["stats"])
    info = {"preset": cfg.preset, "training": _jsonable(asdict(cfg)), "units": all_stats,
            "summary": _summary(all_stats)}
    return DictionarySet(codec, shape, atoms["key"], atoms["value"], info,
                         key_ladder=ladders["key"], value_ladder=ladders["value"])


def _summary(stats: dict) -> dict:
    out = {}
    for kind in ("key", "value"):
        rows = [s for tag, s in stats.items() if tag.startswith(kind)]
        if not rows:
            continue
        km = sum(r["kmeans_rel_error"] for r in rows) / len(rows)
        out[f"{kind}_kmeans_rel_error"] = km
        if "neuraldict_rel_error" in rows[0]:
            nd = sum(r["neuraldict_rel_error"] for r in rows) / len(rows)
            out[f"{kind}_neuraldict_rel_error"] = nd
            out[f"{kind}_neuraldict_gain"] = km - nd
    return out


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
