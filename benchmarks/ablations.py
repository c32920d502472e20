"""Controlled ablations behind the preset choices (what each design decision buys).

    python benchmarks/ablations.py [--windows 2]

Every comparison holds everything else fixed and reports the relative L2 reconstruction error
(held-out SQuAD K/V) and the perplexity increase over bf16 (held-out SQuAD, guard W):

1. keys coded before vs after RoPE (k-means dictionaries trained by the same recipe)
2. matching pursuit (the paper) vs OMP, same dictionary
3. k-means-only vs NeuralDict dictionaries
4. guard window W for csr-1b and kivi-2
5. attention sinks: the first 4 tokens also kept exact (csr-1b, csr-2b, kivi-2)

Writes ``OUT/ablations.json`` and ``OUT/ablations.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from csr_vllm.codec.config import get_preset
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.data.corpora import corpus_file
from csr_vllm.dict_training.collect import collect_kv, token_windows
from csr_vllm.dict_training.train import train_dictionaries
from csr_vllm.evaluation.methods import CSR, make_method
from csr_vllm.evaluation.perplexity import perplexity


def rel_error(dicts: DictionarySet, kind: str, vectors: torch.Tensor) -> float:
    """Mean over layers of ||x - x_hat|| / ||x|| for held-out vectors [L, T, H, D]."""
    errs = []
    for layer in range(vectors.shape[0]):
        x = vectors[layer].float()
        for h in range(x.shape[1]):
            y = dicts.codec(kind, layer, h).roundtrip(x[:, h])
            errs.append(float((x[:, h] - y).norm() / x[:, h].norm()))
    return sum(errs) / len(errs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--dict", help="the NeuralDict dictionary (default: the default dictionary)")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--guard", type=int, default=128)
    p.add_argument("--guards", default="32,128,512")
    p.add_argument("--only", default="rope,pursuit,dict,guard,sinks",
                   help="comma-separated sections to run")
    p.add_argument("--presets", default="csr-1b,csr-2b")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    only = set(args.only.split(","))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csr_vllm.cli import model_dir_or_default
    from csr_vllm.defaults import default_dictionary, default_train_config
    from csr_vllm.paths import cache_root

    model_dir = model_dir_or_default(args.model)
    nd_dir = Path(args.dict) if args.dict else default_dictionary(model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "ablations.json"
    res = json.loads(json_path.read_text()) if json_path.is_file() else {}

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = ModelShape.from_hf_config(model.config)
    text = corpus_file("eval-squad").read_text()
    nd = DictionarySet.load(nd_dir, expect=shape)
    held = token_windows(tok, text, 2048, 1, offset_tokens=2048 * 40)  # not a ppl window

    def ppl(method, guard=args.guard, sinks=0) -> float:
        return perplexity(model, tok, text, method, guard, 2048, args.windows, False,
                          sinks).perplexity

    def record(key: str, fn) -> dict:
        if key not in res:
            res[key] = fn()
            json_path.write_text(json.dumps(res, indent=1))
        return res[key]

    base = record(f"bf16|W{args.guard}", lambda: {"ppl": ppl(make_method("bf16"))})["ppl"]
    inc = lambda v: 100 * (v / base - 1)  # noqa: E731

    # k-means-only dictionaries, differing only in key RoPE placement.
    km = {}
    for rope in ("pre", "post") if only & {"rope", "dict"} else ():
        # The default recipe with NeuralDict switched off: same data, same seeded k-means, so
        # "pre" is exactly the initialisation NeuralDict started from.
        base_cfg = default_train_config(shape.head_dim)
        cfg = dataclasses.replace(base_cfg, neuraldict_steps=0,
                                  codec=dataclasses.replace(base_cfg.codec, key_rope=rope))
        km[rope] = train_dictionaries(model_dir, cache_root() / "ablations" / f"kmeans-{rope}",
                                      cfg, progress=True)
    kv = {rope: collect_kv(model, held, rope, progress=False) for rope in ("pre", "post")}

    for preset in args.presets.split(","):
        cfg = get_preset(preset).config_for(shape.head_dim)
        for rope in ("pre", "post") if "rope" in only else ():
            d = km[rope].with_codec(dataclasses.replace(cfg, key_rope=rope))
            record(f"rope|{preset}|{rope}", lambda d=d, rope=rope: {
                "key_rel_error": rel_error(d, "key", kv[rope].keys),
                "ppl_increase": inc(ppl(CSR(d)))})
        for pursuit in ("mp", "omp") if "pursuit" in only else ():
            c = dataclasses.replace(cfg, key=dataclasses.replace(cfg.key, pursuit=pursuit),
                                    value=dataclasses.replace(cfg.value, pursuit=pursuit))
            d = nd.with_codec(c)
            record(f"pursuit|{preset}|{pursuit}", lambda d=d: {
                "key_rel_error": rel_error(d, "key", kv["pre"].keys),
                "value_rel_error": rel_error(d, "value", kv["pre"].values),
                "ppl_increase": inc(ppl(CSR(d)))})
        for name, src in (("kmeans", km["pre"]), ("neuraldict", nd)) if "dict" in only else ():
            d = src.with_codec(cfg)
            record(f"dict|{preset}|{name}", lambda d=d: {
                "key_rel_error": rel_error(d, "key", kv["pre"].keys),
                "value_rel_error": rel_error(d, "value", kv["pre"].values),
                "ppl_increase": inc(ppl(CSR(d)))})
    for w in (int(x) for x in args.guards.split(",")) if "guard" in only else ():
        b = record(f"bf16|W{w}", lambda w=w: {"ppl": ppl(make_method("bf16"), w)})["ppl"]
        for m in ("csr-1b", "kivi-2"):
            record(f"guard|{m}|W{w}", lambda m=m, w=w, b=b: {
                "ppl_increase": 100 * (ppl(make_method(m, nd_dir, shape), w) / b - 1)})

    for m in ("csr-1b", "csr-2b", "kivi-2") if "sinks" in only else ():
        for sinks in (0, 4):
            record(f"sinks|{m}|{sinks}", lambda m=m, sinks=sinks: {
                "ppl_increase": inc(ppl(make_method(m, nd_dir, shape), sinks=sinks))})

    lines = ["| ablation | setting | key rel. error | value rel. error | ppl increase |",
             "|---|---|---|---|---|"]
    for key, r in res.items():
        if key.startswith("bf16"):
            continue
        kind, *rest = key.split("|")
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
        lines.append(f"| {kind} | {' '.join(rest)} | {fmt(r.get('key_rel_error'))} | "
                     f"{fmt(r.get('value_rel_error'))} | {r['ppl_increase']:+.2f}% |")
    table = "\n".join(lines) + "\n"
    (out / "ablations.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
