"""KV capacity and speed through vLLM: bf16 vs each CSR preset at the same KV budget.

    python benchmarks/capacity.py [--kv-space-gib 1] [--batch 4] [--repeats 3]
        [--contexts 1024,8192] [--kernels native|reference]

Each method runs in its own engine process (same ``VLLM_CPU_KVCACHE_SPACE``), and reports:

* vLLM's own token capacity (``num_blocks x block_size``, the "CPU KV cache size: N tokens"
  it logs and exports as ``kv_cache_size_tokens``),
* bytes per token in the pool, and the CSR backend's side memory outside the pool
  (dictionaries, dense window guard, outlier guard), read from the worker (collective_rpc),
* for ``--speed-methods``: decode tokens/s at batch 1 and at ``--batch`` (requests of
  ``--prompt-tokens`` held-out tokens, ``--decode-tokens`` generated; decode time =
  time(n tokens) - time(1 token), median over ``--repeats``; repeated prompts hit vLLM's prefix
  cache, so the prefill is paid once), and the CSR/bf16 ratio from this one run;
* for ``--speed-methods`` and each of ``--contexts``: one request of that many held-out tokens,
  its TTFT (a fresh prompt each repeat, so the prefix cache cannot serve it: the time of a
  1-token generation) and its decode tokens/s (``--decode-tokens`` more: time(n + 1 tokens) -
  time(1 token) of the same prompt, now prefix-cached), medians over ``--repeats``.

Writes ``OUT/capacity.json`` and ``OUT/capacity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from engine_process import csr_settings, resolve_model_and_dict, run_worker, serve_as_worker

METHODS = ["bf16", "csr-4b", "csr-2b", "csr-1.5b", "csr-1b"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the default model)")
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--kv-space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--speed-methods", default="bf16,csr-2b,csr-1b",
                   help="methods whose decode speed is timed (the CPU reference encoder makes "
                        "each CSR preset take minutes)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-path", default="auto", choices=["auto", "reconstruct", "sparse"])
    p.add_argument("--kernels", default="native", choices=["native", "reference"])
    p.add_argument("--contexts", default="",
                   help="single-request TTFT / decode speed at these prompt lengths (e.g. "
                   "1024,8192; empty: none)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--render", help="print the table of an existing capacity.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method
    return p.parse_args(argv)


def run_method(args: argparse.Namespace) -> dict:
    """One engine: capacity, side memory and decode timings (runs in its own process)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from csr_vllm.data.corpora import corpus_file

    method = args.worker
    contexts = [int(c) for c in args.contexts.split(",") if c]
    kw = {"max_model_len": max([2048, *[c + args.decode_tokens + 16 for c in contexts]]),
          "enforce_eager": True, "seed": 0}
    if method != "bf16":
        kw["additional_config"] = {"kv_cache_backend": "csr", "csr": {
            **csr_settings(method, args.dict), "read_path": args.read_path,
            "kernels": args.kernels}}
    llm = LLM(args.model, **kw)
    cache = llm.llm_engine.vllm_config.cache_config
    res = {"method": method, "num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
           "capacity_tokens": cache.num_gpu_blocks * cache.block_size}
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(corpus_file("eval-essays").read_text()[:400000])["input_ids"]
    if method != "bf16":
        # One request first: the dense layers' store is allocated with the pool's block
        # count at the first write, and its bytes count in the side memory.
        llm.generate([TokensPrompt(prompt_token_ids=ids[:16])],
                     SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        res["csr"] = llm.collective_rpc("csr_stats")[0]

    n = args.prompt_tokens
    prompts = [TokensPrompt(prompt_token_ids=ids[i * n:(i + 1) * n]) for i in range(args.batch)]

    def timed(batch: int, tokens: int) -> float:
        sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts[:batch], sp, use_tqdm=False)
        return time.perf_counter() - t

    if method not in args.speed_methods.split(","):
        return res
    start = args.batch * n
    for c in contexts:  # one request: TTFT and decode speed at context c
        ttft, decode = [], []
        for r in range(args.repeats + 1):  # the first is a warm-up
            prompt = [TokensPrompt(prompt_token_ids=ids[start:start + c])]
            start += c

            def run(tokens: int, prompt=prompt) -> float:
                sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
                t = time.perf_counter()
                llm.generate(prompt, sp, use_tqdm=False)
                return time.perf_counter() - t

            first = run(1)  # a fresh prompt: the whole prefill (TTFT)
            cached = run(1)  # again: the prefix cache serves all but the last block
            full = run(args.decode_tokens + 1)
            if r:
                ttft.append(first)
                decode.append(args.decode_tokens / max(full - cached, 1e-9))
        res[f"ttft_s_{c}"] = statistics.median(ttft)
        res[f"decode_tok_s_{c}"] = statistics.median(decode)
        res[f"ttft_s_{c}_all"], res[f"decode_tok_s_{c}_all"] = ttft, decode
    for batch in (1, args.batch):
        timed(batch, 2)  # warm-up
        per = []
        for _ in range(args.repeats):
            prefill = timed(batch, 1)
            full = timed(batch, args.decode_tokens + 1)
            per.append(batch * args.decode_tokens / max(full - prefill, 1e-9))
        res[f"decode_tok_s_b{batch}"] = statistics.median(per)
        res[f"decode_tok_s_b{batch}_all"] = per
    return res


def main() -> None:
    args = parse_args()
    if args.render:  # re-render the table from a results file
        data = json.loads(Path(args.render).read_text())
        print(render(data["results"], data["settings"]["batch"], data["settings"]["kv_space_gib"])
              + render_contexts(data["results"]))
        return
    resolve_model_and_dict(args)
    if serve_as_worker(args, run_method):
        return
    # Every figure is a ratio to bf16 in the same run: without it the run would end, minutes
    # later, with nothing to divide by.
    if "bf16" not in args.methods.split(","):
        raise SystemExit("capacity.py: --methods must include bf16 (every ratio is against "
                         "bf16 measured in the same run)")

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib)}
    results = []
    for method in args.methods.split(","):
        print(f"[capacity] {method} ...", flush=True)
        results.append(run_worker(__file__, method, args, env))

    bf16 = next(r for r in results if r["method"] == "bf16")
    pool = args.kv_space_gib * 2**30
    for r in results:
        r["capacity_ratio"] = r["capacity_tokens"] / bf16["capacity_tokens"]
        # At the same total memory: bf16 given CSR's pool plus everything CSR holds beside it.
        side = sum(r["csr"]["side_bytes"].values()) if r.get("csr") else 0
        r["total_memory_ratio"] = r["capacity_ratio"] * pool / (pool + side)
        for b in (1, args.batch):
            if f"decode_tok_s_b{b}" in r and f"decode_tok_s_b{b}" in bf16:
                r[f"speed_ratio_b{b}"] = r[f"decode_tok_s_b{b}"] / bf16[f"decode_tok_s_b{b}"]
        for c in [int(c) for c in args.contexts.split(",") if c]:
            if f"ttft_s_{c}" in r and f"ttft_s_{c}" in bf16:
                r[f"ttft_ratio_{c}"] = r[f"ttft_s_{c}"] / bf16[f"ttft_s_{c}"]
                r[f"decode_ratio_{c}"] = r[f"decode_tok_s_{c}"] / bf16[f"decode_tok_s_{c}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("kv_space_gib", "batch", "prompt_tokens",
                                         "decode_tokens", "repeats", "read_path", "kernels",
                                         "contexts", "speed_methods")}
    (out / "capacity.json").write_text(json.dumps({"settings": meta, "results": results},
                                                  indent=1))
    table = render(results, args.batch, args.kv_space_gib) + render_contexts(results)
    (out / "capacity.md").write_text(table)
    print(table)


def render_contexts(results: list[dict]) -> str:
    """Single-request TTFT and decode speed per context (empty when none was measured)."""
    cs = sorted({int(k.split("_")[-1]) for r in results for k in r
                 if k.startswith("ttft_s_") and not k.endswith("_all")})
    if not cs:
        return ""
    lines = ["", "| method | context | TTFT s | CSR/bf16 TTFT | decode tok/s | CSR/bf16 decode |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for c in cs:
            if f"ttft_s_{c}" in r:
                lines.append(f"| {r['method']} | {c} | {r[f'ttft_s_{c}']:.2f} | "
                             f"{r.get(f'ttft_ratio_{c}', 1.0):.2f} | "
                             f"{r[f'decode_tok_s_{c}']:.1f} | {r.get(f'decode_ratio_{c}', 1.0):.2f} |")
    return "\n".join(lines) + "\n"


def render(results: list[dict], batch: int, gib: int) -> str:
    lines = [
        f"| method | KV tokens at {gib} GiB (vLLM) | x bf16 | x bf16 at the same total memory "
        f"| pool bytes/token | side memory (dict + window + outliers + native tables + dense "
        f"layers) | decode tok/s b1 | b{batch} | CSR/bf16 b1 | b{batch} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_bpt = next((r["csr"]["dense_bytes_per_token"] for r in results if r.get("csr")), None)
    for r in results:
        csr = r.get("csr")
        per_token = csr["kv_bytes_per_token"] if csr else dense_bpt
        if csr:
            side = csr["side_bytes"]
            side_txt = (f"{side['dictionaries'] / 2**20:.0f} + {side['window_guard'] / 2**20:.0f}"
                        f" + {side['outlier_guard'] / 2**20:.0f} + "
                        f"{side.get('native_tables', 0) / 2**20:.0f} + "
                        f"{side.get('dense_layers', 0) / 2**20:.0f} MiB")
        else:
            side_txt = "0"
        speed = [f"{r[k]:.{p}f}" if k in r else "-" for k, p in (
            ("decode_tok_s_b1", 1), (f"decode_tok_s_b{batch}", 1), ("speed_ratio_b1", 2),
            (f"speed_ratio_b{batch}", 2))]
        lines.append(
            f"| {r['method']} | {r['capacity_tokens']:,} | {r['capacity_ratio']:.1f}x | "
            f"{r.get('total_memory_ratio', r['capacity_ratio']):.1f}x | "
            f"{per_token if per_token else '-'} | {side_txt} | " + " | ".join(speed) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
