"""Greedy continuations through the vLLM engine: how far each method follows bf16.

    python benchmarks/engine_agreement.py [--model qwen2.5-coder-1.5b] [--dict DIR]
        [--methods bf16,csr-2b,csr-2b+dense=] [--prompts 4] [--prompt-tokens 1024]
        [--max-tokens 64] [--text eval-code]

Each method is a real engine in its own process (``benchmarks/engine_process.py``); every
prompt (consecutive windows of ``--text``, a held-out corpus) is continued greedily for
``--max-tokens`` tokens. Reported per method: tokens equal to bf16's up to each continuation's
first divergence (the share of all generated tokens), how many continuations equal bf16's
entirely, and the bf16 model's own negative log-likelihood per token of each method's
continuation (a bf16 engine scores prompt + continuation with prompt logprobs): a coherent
continuation that merely differs from bf16's scores close to bf16's own, a degenerate one
far above it. Prompts longer than the Guard window (128) make every generated token read most of
its prompt through the compressed pages. ``csr-2b+dense=`` is csr-2b without the dictionary's
dense layers (``+dense=0/27`` names others; see csr_vllm.engine.dense_layers).

Writes ``OUT/engine_agreement.json`` and ``OUT/engine_agreement.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from engine_process import csr_settings, resolve_model_and_dict, run_worker, serve_as_worker

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder or registry name (default: the default model)")
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--methods", default="bf16,csr-2b,csr-2b+dense=,csr-1b,csr-1b+dense=")
    p.add_argument("--text", default="eval-code", help="held-out corpus the prompts come from")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one method's engine
    return p.parse_args(argv)


def prompts_for(args: argparse.Namespace) -> list[list[int]]:
    from transformers import AutoTokenizer

    from csr_vllm.data.corpora import corpus_file

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(corpus_file(args.text).read_text())["input_ids"]
    n = args.prompt_tokens
    return [ids[i * n:(i + 1) * n] for i in range(args.prompts)]


def score(args: argparse.Namespace) -> dict:
    """The bf16 engine's NLL per token of each method's continuations (``args.worker`` =
    ``score:FILE``, the results so far)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = json.loads(Path(args.worker.split(":", 1)[1]).read_text())["results"]
    prompts = prompts_for(args)
    llm = LLM(args.model, max_model_len=args.prompt_tokens + args.max_tokens + 1,
              enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = {}
    for method, r in results.items():
        seqs = [p + c for p, c in zip(prompts, r["outputs"], strict=True)]
        res = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params,
                           use_tqdm=False)
        nll = []
        for p, s, g in zip(prompts, seqs, res, strict=True):
            lps = g.prompt_logprobs[len(p):]
            nll.append(-sum(d[t].logprob for d, t in zip(lps, s[len(p):], strict=True))
                       / max(len(lps), 1))
        out[method] = nll
    return out


def generate(args: argparse.Namespace) -> dict:
    """One engine (``args.worker``) continues every prompt."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if args.worker.startswith("score:"):
        return score(args)
    prompts = prompts_for(args)
    kw = {"max_model_len": args.prompt_tokens + args.max_tokens, "enforce_eager": True,
          "seed": 0}
    if args.worker != "bf16":
        kw["additional_config"] = {"kv_cache_backend": "csr",
                                   "csr": csr_settings(args.worker, args.dict)}
    llm = LLM(args.model, **kw)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                       use_tqdm=False)
    out = {"outputs": [list(r.outputs[0].token_ids) for r in res],
           "texts": [r.outputs[0].text for r in res]}
    if args.worker != "bf16":
        stats = llm.collective_rpc("csr_stats")[0]
        out["side_bytes"] = stats.get("side_bytes", {})
    return out


def agreement(got: list[list[int]], ref: list[list[int]]) -> tuple[float, int]:
    """(share of tokens equal up to each sequence's first divergence, sequences equal)."""
    same = total = whole = 0
    for x, y in zip(got, ref, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        same, total, whole = same + n, total + len(x), whole + (n == len(x))
    return same / max(total, 1), whole


def render(data: dict) -> str:
    ref = data["results"].get("bf16")
    nll = data.get("bf16_nll", {})
    lines = ["| method | tokens as bf16 (to first divergence) | continuations equal to bf16 | "
             "bf16's NLL/token of the continuation |", "|---|---|---|---|"]
    for method, r in data["results"].items():
        if ref is None:
            continue
        share, whole = agreement(r["outputs"], ref["outputs"])
        mean = sum(nll[method]) / len(nll[method]) if method in nll else float("nan")
        lines.append(f"| {method} | {share:.1%} | {whole}/{len(r['outputs'])} | {mean:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    resolve_model_and_dict(args)
    if serve_as_worker(args, generate):
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "engine_agreement.json"
    setting = {k: getattr(args, k) for k in ("model", "dict", "text", "prompts",
                                               "prompt_tokens", "max_tokens")}
    data = json.loads(store.read_text()) if store.is_file() else {}
    if data.get("setting") != setting:
        data = {"setting": setting, "results": {}}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "TOKENIZERS_PARALLELISM": "false"}
    for method in args.methods.split(","):
        if method in data["results"]:
            continue
        print(f"[engine-agreement] {method} ...", flush=True)
        data["results"][method] = run_worker(__file__, method, args, env)
        store.write_text(json.dumps(data, indent=1))
    if set(data.get("bf16_nll", {})) != set(data["results"]):
        print("[engine-agreement] bf16 scores the continuations ...", flush=True)
        data["bf16_nll"] = run_worker(__file__, f"score:{store}", args, env)
        store.write_text(json.dumps(data, indent=1))
    table = render(data)
    (out_dir / "engine_agreement.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
