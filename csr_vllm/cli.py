"""``csr-vllm``: fetch the default model, train dictionaries, evaluate KV methods."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csr_vllm.kv_budget import KVBudget


def model_dir_or_default(arg: str | None) -> Path:
    """The HF model folder ``arg``, a model of the registry by name (``qwen2.5-coder-1.5b``),
    or the default model; registry models are fetched on first use."""
    from csr_vllm.model_fetch import MODELS, fetch_model

    if arg in MODELS:
        return fetch_model(arg)
    if arg:
        path = Path(arg)
        if not (path / "config.json").is_file():
            sys.exit(f"error: {path} is not a Hugging Face model folder (no config.json)")
        return path
    return fetch_model()


def cmd_fetch_model(args: argparse.Namespace) -> None:
    from csr_vllm.model_fetch import fetch_model

    print(fetch_model(args.model, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                      force=args.force))


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from csr_vllm.data.corpora import CORPORA, corpus_file

    for name in CORPORA:
        print(f"{name}\t{corpus_file(name)}")


def _codec_from_args(args: argparse.Namespace, head_dim: int):
    from csr_vllm.codec.config import CodecConfig, TensorCodecConfig, get_preset

    if args.preset:
        return get_preset(args.preset).config_for(head_dim)
    return CodecConfig(
        key=TensorCodecConfig(args.atoms, 1, args.key_atoms, args.coef, args.pursuit),
        value=TensorCodecConfig(args.atoms, args.value_chunks, args.value_atoms, args.coef,
                                args.pursuit),
        key_rope=args.key_rope, layer_group=args.layer_group, per_head=args.per_head)


def cmd_train_dict(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.dict_training.train import TrainConfig, train_dictionaries

    model = model_dir_or_default(args.model)
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model))
    cfg = TrainConfig(codec=_codec_from_args(args, shape.head_dim), preset=args.preset,
                      corpus=args.corpus, train_windows=args.windows,
                      neuraldict_steps=args.steps, seed=args.seed,
                      kmeans_iters=args.kmeans_iters, max_vectors=args.max_vectors)
    dicts = train_dictionaries(model, args.out, cfg)
    print(json.dumps({"out": str(args.out), "bits_per_channel":
                      dicts.config.bits_per_channel(shape.head_dim), **dicts.info["summary"]},
                     indent=1))


def cmd_eval(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.evaluation.methods import make_method
    from csr_vllm.evaluation.perplexity import perplexity

    model_dir = model_dir_or_default(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = ModelShape.from_hf_config(model.config)
    method = make_method(args.method, args.dict, shape)
    result = perplexity(model, tokenizer, Path(args.text).read_text(), method, args.guard,
                        args.window, args.windows, sinks=args.sinks)
    out = result.to_dict() | {"model": str(model_dir), "text": str(args.text)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def cmd_serve(args: argparse.Namespace) -> None:
    """Prepare the default model and dictionary, serve them with CSR and report the capacity."""
    import gc
    import os

    from transformers import AutoConfig

    from csr_vllm.codec.config import PRESETS, get_preset
    from csr_vllm.codec.dictionary import DictionarySet, ModelShape

    model = model_dir_or_default(args.model)
    print(f"model:      {model}")
    hf_config = AutoConfig.from_pretrained(model)
    shape = ModelShape.from_hf_config(hf_config)
    if args.dict:
        dict_dir = Path(args.dict)
    else:
        from csr_vllm.defaults import default_dictionary

        dict_dir = default_dictionary(model)
    dicts = DictionarySet.load(dict_dir, expect=shape)
    # What the workers will ask of it, asked here: a misfit stops with one line, not a
    # traceback from a worker.
    dicts = dicts.with_codec(get_preset(args.preset).config_for(shape.head_dim))
    for kind in ("key", "value"):
        dicts.codec(kind, dicts.layers.start)
    print(f"dictionary: {dict_dir} ({dicts.nbytes / 2**20:.1f} MiB of atoms)")
    vllm_args = [a for a in args.vllm_args if a != "--"]
    dense = _dense_layers(dicts, vllm_args)
    bf16 = 2 * shape.head_dim * 2  # bf16 K + V bytes per (token, KV head)
    # The dense layers' store per (token, KV head), averaged over the layers: all-in figures.
    extra = len(dense) * bf16 / shape.num_layers
    for name, preset in PRESETS.items():
        cfg = preset.config_for(shape.head_dim)
        slot = cfg.slot_bytes() + extra
        print(f"  {name:12s} {cfg.slot_bytes():3d} B per (token, KV head) vs {bf16} B bf16: "
              f"{8 * slot / (2 * shape.head_dim):.3f} bits/channel, {bf16 / slot:.1f}x the "
              "tokens" + (" (dense layers counted)" if dense else ""))
    from csr_vllm.kv_budget import csr_side_bytes

    side = csr_side_bytes(dicts)
    dense_per_token = len(dense) * shape.num_kv_heads * bf16
    if dense:
        print(f"dense:      layers {', '.join(map(str, dense))} kept exactly "
              f"({dense_per_token:,} B per token beside the pool)")
    del dicts  # the worker loads its own copy; this process need not hold one while serving
    gc.collect()
    budget = _kv_budget(model, hf_config, shape, side, args.preset, vllm_args, os.environ,
                        dense_per_token)
    if budget is not None:
        print(budget.line)
        vllm_args += budget.flags()
    cmd = [sys.executable, "-m", "csr_vllm.vllm_launcher", "serve", str(model),
           "--kv-cache-backend", "csr", "--csr-dict", str(dict_dir),
           "--csr-preset", args.preset, "--host", args.host, "--port", str(args.port),
           *vllm_args]
    print("serving:    vllm " + " ".join(cmd[3:]), flush=True)
    if args.dry_run:
        return
    from csr_vllm.server.launch import serve_and_report

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    key = next((v for a, v in zip(cmd[:-1], cmd[1:], strict=True) if a == "--api-key"), None)
    sys.exit(serve_and_report(cmd, f"http://{host}:{args.port}", key))


def _dense_layers(dicts, vllm_args: list[str]) -> tuple[int, ...]:
    """The dense layers the engine will keep: ``--csr-dense-layers`` if given, else the
    dictionary's recommendation."""
    from csr_vllm import kv_budget as kb
    from csr_vllm.plugin import layer_list

    given = kb.flag_value(vllm_args, "--csr-dense-layers")
    if given is not None:
        return tuple(layer_list(given))
    return tuple(int(i) for i in dicts.info.get("dense_layers", ()))


def _kv_budget(model: Path, hf_config, shape, side_bytes: int, preset: str,
               vllm_args: list[str], environ, dense_per_token: int = 0) -> KVBudget | None:
    """The KV pool to ask vLLM's CPU backend for (:mod:`csr_vllm.kv_budget`), ``side_bytes``
    being CSR's memory outside it; None on other platforms, where vLLM's own default (a share
    of the device's memory) is right."""
    from csr_vllm import kv_budget as kb
    from csr_vllm.codec.config import get_preset

    if not kb.is_cpu_build():
        return None
    slot = get_preset(preset).config_for(shape.head_dim).slot_bytes()
    needs = kb.PoolNeeds(
        process_bytes=kb.process_bytes(model), side_bytes=side_bytes,
        bytes_per_token=slot * shape.num_kv_heads * shape.num_layers,
        max_model_len=kb.int_flag(vllm_args, "--max-model-len",
                                  getattr(hf_config, "max_position_embeddings", None) or 8192),
        max_num_seqs=kb.int_flag(vllm_args, "--max-num-seqs", kb.CPU_DEFAULT_MAX_NUM_SEQS),
        side_bytes_per_token=dense_per_token)
    node, available = kb.node_available_memory()
    return kb.choose_kv_budget(available, needs, kb.user_override(vllm_args, environ),
                               where=f"NUMA node {node}")


def cmd_ruler(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.evaluation.methods import make_method
    from csr_vllm.evaluation.ruler import run_ruler

    model_dir = model_dir_or_default(args.model)
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    if args.dict is None and any(m.startswith("csr") for m in args.methods.split(",")):
        from csr_vllm.defaults import default_dictionary

        args.dict = default_dictionary(model_dir)
    methods = {m: make_method(m, args.dict, shape) for m in args.methods.split(",")}
    res = run_ruler(model_dir, args.task, [int(x) for x in args.lengths.split(",")],
                    args.samples, methods, args.guard)
    bits = {}
    for name, method in methods.items():
        bits[name] = method.bits_per_channel(shape.head_dim)
        if hasattr(method, "guard_bits_per_channel"):  # outlier Guard bytes, amortised
            bits[name] += method.guard_bits_per_channel(shape.head_dim)
    out = {"task": args.task, "guard": args.guard, "bits_per_channel": bits, "results": res}
    summary = {m: {"bits_per_channel": round(bits[m], 3),
                   **{n: f"{r['correct']}/{r['trials']}" for n, r in per.items()}}
               for m, per in res.items()}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


MODEL_HELP = "HF model folder or a fetch-model name (default: the default model)"


def build_parser() -> argparse.ArgumentParser:
    from csr_vllm.codec.config import PRESETS
    from csr_vllm.model_fetch import DEFAULT_MODEL, MODELS

    p = argparse.ArgumentParser(prog="csr-vllm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch-model", help="fetch and convert a model (default: the default "
                       "model); print its path")
    f.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                   help=f"which model (default {DEFAULT_MODEL})")
    f.add_argument("--cache-dir", help="cache root (default $CSR_VLLM_CACHE or ~/.cache/csr-vllm)")
    f.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    f.set_defaults(fn=cmd_fetch_model)

    sv = sub.add_parser("serve", help="prepare the default model + dictionary and serve it "
                        "with CSR through vLLM's OpenAI server")
    sv.add_argument("--model", help=MODEL_HELP)
    sv.add_argument("--dict", help="dictionary folder (default: the default dictionary of the "
                    "model, trained on first use)")
    sv.add_argument("--preset", default="csr-2b", choices=sorted(PRESETS))
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--dry-run", action="store_true", help="prepare and print, do not serve")
    sv.add_argument("vllm_args", nargs=argparse.REMAINDER,
                    help="further `vllm serve` flags (after --)")
    sv.set_defaults(fn=cmd_serve)

    d = sub.add_parser("prepare-data", help="write the training/evaluation text files")
    d.set_defaults(fn=cmd_prepare_data)

    t = sub.add_parser("train-dict", help="train CSR dictionaries (resumable)")
    t.add_argument("--model", help=MODEL_HELP)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--preset", choices=sorted(PRESETS), help="codec preset (else explicit options)")
    t.add_argument("--atoms", type=int, default=8192)
    t.add_argument("--key-atoms", type=int, default=3, help="atoms per key vector (MP level)")
    t.add_argument("--value-atoms", type=int, default=3, help="atoms per value chunk")
    t.add_argument("--value-chunks", type=int, default=1, help="value channel split s_n")
    t.add_argument("--coef", default="fp8", help="fp16 | fp8 | int3..int8 | log3..log6")
    t.add_argument("--pursuit", default="omp", choices=["mp", "omp"])
    t.add_argument("--key-rope", default="pre", choices=["pre", "post"])
    t.add_argument("--layer-group", type=int, default=1)
    t.add_argument("--per-head", action="store_true")
    t.add_argument("--corpus", default="train-hotpotqa",
                   help="training text: a corpus name (see prepare-data) or a UTF-8 text file; "
                   "it needs --windows + 2 windows of 2048 tokens")
    t.add_argument("--windows", type=int, default=16, help="2048-token training windows")
    t.add_argument("--steps", type=int, default=20, help="NeuralDict steps per dictionary (0: k-means only)")
    t.add_argument("--kmeans-iters", type=int, default=4)
    t.add_argument("--max-vectors", type=int, default=49152, help="training vectors per dictionary")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_train_dict)

    e = sub.add_parser("eval", help="perplexity with a compressed KV cache")
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--method", required=True,
                   help="bf16 | exact | int8 | int4 | kivi-2 | kivi-4 | csr | csr-<preset>")
    e.add_argument("--dict", help="dictionary folder (csr methods)")
    e.add_argument("--guard", type=int, default=128, help="dense recent window W (tokens)")
    e.add_argument("--sinks", type=int, default=0,
                   help="first tokens of each window also kept exact (attention sinks)")
    e.add_argument("--window", type=int, default=2048, help="tokens per evaluation window")
    e.add_argument("--windows", type=int, default=8, help="number of windows")
    e.add_argument("--json", help="write the result here")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("ruler", help="RULER needle retrieval accuracy with compressed KV")
    r.add_argument("--model", help=MODEL_HELP)
    r.add_argument("--task", default="niah_single_1",
                   help="niah_single_1 | niah_multikey_2 | niah_multikey_3")
    r.add_argument("--lengths", default="1024,2048,4096")
    r.add_argument("--samples", type=int, default=20, help="trials per length")
    r.add_argument("--methods", default="bf16,csr-2b", help="comma-separated methods")
    r.add_argument("--dict", help="dictionary folder (csr methods; default: the default "
                   "dictionary of the default model)")
    r.add_argument("--guard", type=int, default=128)
    r.add_argument("--json", help="write the result here")
    r.set_defaults(fn=cmd_ruler)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:  # bad input: say what is wrong, no traceback
        sys.exit(f"error: {e}")
