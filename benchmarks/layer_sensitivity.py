"""Which layers a preset breaks: each layer's attention with its K/V coded, against exact.

    python benchmarks/layer_sensitivity.py [--model qwen2.5-coder-1.5b] [--dict DIR]
        [--preset csr-2b] [--text eval-code] [--tokens 1024] [--queries 64] [--guard 128]

One window of a held-out text goes through the model (transformers, bf16 weights in fp32);
each layer's queries, keys and values are captured (after the projections' biases, RoPE
applied as the model does). Then, one layer at a time, the keys (and, separately, keys and
values) are coded with the preset through the harness's CSR method (the reference codec), the
last ``--queries`` positions attend over them, the Guard window's ``--guard`` most recent
tokens exact as in the engine, and the attention output's relative error against exact K/V is
reported with the largest score change. A layer whose output error stands out is the one to
keep dense (``--csr-dense-layers``; docs/design.md, *Dense layers*).

Writes ``OUT/layer_sensitivity_<preset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder or registry name (default: the default model)")
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--preset", default="csr-2b")
    p.add_argument("--text", default="eval-code")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--guard", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args()


@torch.no_grad()
def capture(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (q [Hq, T, D], k [H, T, D], v [H, T, D]) as the attention sees them (after
    RoPE), from hooks on the q/k/v projections."""
    from csr_vllm.codec.rope import apply_rope, rope_tables

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    cos, sin = rope_tables(d, theta, torch.arange(ids.shape[1]))
    raw: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("q", "k", "v"):
            proj = getattr(layer.self_attn, f"{name}_proj")
            hooks.append(proj.register_forward_hook(
                lambda m, a, out, i=i, name=name: raw.__setitem__((i, name), out[0].float())))
    model(ids)
    for h in hooks:
        h.remove()
    layers = []
    for i in range(len(model.model.layers)):
        q, k, v = (raw[(i, n)].reshape(ids.shape[1], -1, d).transpose(0, 1) for n in "qkv")
        layers.append((apply_rope(q, cos, sin), apply_rope(k, cos, sin), v))
    return layers


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
    """Causal attention of queries at ``positions`` (q [Hq, Q, D]) over k, v [H, T, D]:
    (output [Hq, Q, D], scores [Hq, Q, T])."""
    h, t, d = k.shape
    g = q.shape[0] // h
    kk, vv = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    scores = torch.einsum("hqd,htd->hqt", q, kk) / math.sqrt(d)
    scores = scores.masked_fill(torch.arange(t)[None, None] > positions[None, :, None], -math.inf)
    return torch.einsum("hqt,htd->hqd", scores.softmax(-1), vv), scores


def main() -> None:
    args = parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csr_vllm.cli import model_dir_or_default
    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.data.corpora import corpus_file
    from csr_vllm.defaults import default_dictionary
    from csr_vllm.evaluation.methods import make_method

    model_dir = model_dir_or_default(args.model)
    dict_dir = Path(args.dict) if args.dict else default_dictionary(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = ModelShape.from_hf_config(model.config)
    method = make_method(f"{args.preset}+dense=", dict_dir, shape)  # every layer coded
    ids = torch.tensor([tok(corpus_file(args.text).read_text())["input_ids"][:args.tokens]])
    layers = capture(model, ids)
    del model
    t = ids.shape[1]
    positions = torch.arange(t - args.queries, t)
    pos_all = torch.arange(t)
    rows = []
    for i, (q, k, v) in enumerate(layers):
        qq = q[:, positions]
        exact, s_exact = attend(qq, k, v, positions)
        k_hat, v_hat = method.compress(i, k, v, pos_all)
        # The Guard window: each query reads the most recent --guard tokens exactly; the
        # earliest query's window is the shared exact tail (a lower bound on what is coded).
        coded = pos_all < t - args.queries - args.guard
        k_c = torch.where(coded[None, :, None], k_hat, k)
        v_c = torch.where(coded[None, :, None], v_hat, v)
        out_k, s_k = attend(qq, k_c, v, positions)
        out_kv, _ = attend(qq, k_c, v_c, positions)
        def rel(a: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return float((a - exact).norm() / exact.norm())

        key_err = float(((k_hat - k).norm(dim=-1) / k.norm(dim=-1)).mean())
        finite = torch.isfinite(s_exact)
        rows.append({"layer": i, "key_rel_error": key_err,
                     "out_rel_error_keys_coded": rel(out_k), "out_rel_error_kv_coded": rel(out_kv),
                     "max_score": float(s_exact[finite].abs().max()),
                     "max_score_change": float((s_k - s_exact)[finite].abs().max())})
        print(f"layer {i:2d}: key err {key_err:.4f}  out err K {rows[-1]['out_rel_error_keys_coded']:.3f}"
              f"  K+V {rows[-1]['out_rel_error_kv_coded']:.3f}  max |score| "
              f"{rows[-1]['max_score']:.0f}  max score change {rows[-1]['max_score_change']:.2f}",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = {"model": model_dir.name, "dictionary": str(dict_dir), "preset": args.preset,
               "codec": method.setting, "text": args.text, "tokens": t, "queries": args.queries,
               "guard": args.guard}
    stem = out / f"layer_sensitivity_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps({"setting": setting, "layers": rows}, indent=1))
    lines = ["| layer | key rel. error | output error, K coded | output error, K+V coded | "
             "max score | max score change |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['key_rel_error']:.4f} | {r['out_rel_error_keys_coded']:.3f} | "
              f"{r['out_rel_error_kv_coded']:.3f} | {r['max_score']:.0f} | "
              f"{r['max_score_change']:.2f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
