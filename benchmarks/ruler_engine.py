"""RULER needle retrieval through the vLLM engine, as ``vllm serve`` runs it.

    python benchmarks/ruler_engine.py [--methods bf16,csr-2b] [--lengths 1024,2048,4096]
        [--samples 20] [--task niah_single_1] [--max-num-batched-tokens 2048]

The trials are the ones ``benchmarks/quality.py`` scores in the harness (same RULER generator,
seed and count, same prompt ids with BOS, same answer budget and scoring), but each method is
a real vLLM engine in its own process, every trial submitted at once and decoded greedily.
The two views differ in the prompt: the harness makes every prompt token read the tokens more
than the Guard window behind it through the compressed cache; the engine prefills a prompt in
chunks of at most ``--max-num-batched-tokens`` tokens shared by the running requests (2048 is
``vllm serve``'s default on CPU), each chunk reading its own tokens and the window exactly and
earlier chunks through the compressed pages, and every generated token reads the prompt
through them. So the harness is the stricter test; this one is what a served request gets.

Results accumulate in ``OUT/ruler_engine.json`` (a method and length already measured with
the same setting is not rerun) with ``OUT/ruler_engine.md``.
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
    p.add_argument("--model", help="HF model folder (default: the default model)")
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--methods", default="bf16,csr-2b", help="bf16 and/or CSR presets")
    p.add_argument("--task", default="niah_single_1")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prefill chunk budget per engine step (vllm serve's CPU default)")
    p.add_argument("--kv-space-gib", type=int, default=4,
                   help="VLLM_CPU_KVCACHE_SPACE: enough that no trial is preempted")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one method's engine
    return p.parse_args(argv)


def trials_for(args: argparse.Namespace, lengths: list[int]) -> dict[int, list[dict]]:
    """The harness's trials at each length: prompt ids and answer budget per sample."""
    from transformers import AutoTokenizer

    from csr_vllm.evaluation.ruler import answer_budget, generate_tasks, prompt_ids

    tok = AutoTokenizer.from_pretrained(args.model)
    return {n: [{"ids": prompt_ids(tok, s.input).tolist(),
                 "budget": answer_budget(tok, s.outputs), "outputs": s.outputs}
                for s in generate_tasks(args.task, args.model, n, args.samples)]
            for n in lengths}


def answer_all(args: argparse.Namespace) -> dict:
    """One engine (``args.worker``) answers every trial of every length."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from csr_vllm.evaluation.ruler import answer_text, score

    trials = trials_for(args, [int(x) for x in args.lengths.split(",")])
    longest = max(len(t["ids"]) + t["budget"] for ts in trials.values() for t in ts)
    kw = {"max_model_len": longest, "enforce_eager": True, "seed": 0, "disable_log_stats": False,
          "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.worker != "bf16":
        kw["additional_config"] = {"kv_cache_backend": "csr",
                                   "csr": csr_settings(args.worker, args.dict)}
    llm = LLM(args.model, **kw)

    def preemptions() -> float:  # vLLM's counter is cumulative over the engine's life
        return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")

    out = {}
    for n, ts in trials.items():
        before = preemptions()
        params = [SamplingParams(temperature=0, max_tokens=t["budget"]) for t in ts]
        res = llm.generate([TokensPrompt(prompt_token_ids=t["ids"]) for t in ts], params,
                           use_tqdm=False)
        preds = [answer_text(r.outputs[0].text) for r in res]
        correct = [score(p, t["outputs"]) == 1.0 for p, t in zip(preds, ts, strict=True)]
        out[str(n)] = {"per_trial": correct, "predictions": preds, "correct": sum(correct),
                       "trials": len(correct), "preemptions": preemptions() - before}
    return out


def setting(args: argparse.Namespace, method: str) -> dict:
    """What decides a method's answers (a stored result is reused only when it matches)."""
    from csr_vllm.evaluation.methods import make_method

    s = {"task": args.task, "samples": args.samples,
         "max_num_batched_tokens": args.max_num_batched_tokens}
    if method != "bf16":
        s["csr"] = make_method(method, args.dict).setting
        s["dictionary_sha256"] = json.loads(
            (Path(args.dict) / "manifest.json").read_text())["tensors_sha256"]
    return s


def render(results: dict, lengths: list[int]) -> str:
    lines = ["| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for method, per in results.items():
        cells = [f"{per[str(n)]['correct']}/{per[str(n)]['trials']}" if str(n) in per else "-"
                 for n in lengths]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    resolve_model_and_dict(args)
    if serve_as_worker(args, answer_all):
        return

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "ruler_engine.json"
    data = json.loads(store.read_text()) if store.is_file() else {"results": {}}
    lengths = [int(x) for x in args.lengths.split(",")]
    trials_for(args, lengths)  # RULER's generator runs (once, cached) before any engine starts
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib),
           "TOKENIZERS_PARALLELISM": "false"}
    for method in args.methods.split(","):
        want = setting(args, method)
        have = data["results"].get(method, {})
        todo = [n for n in lengths
                if have.get(str(n), {}).get("setting") != want]
        if not todo:
            continue
        print(f"[ruler-engine] {method} at {todo} ...", flush=True)
        res = run_worker(__file__, method, args, env,
                         ("--lengths", ",".join(map(str, todo))))
        for n, entry in res.items():
            have[n] = entry | {"setting": want}
        data["results"][method] = have
        store.write_text(json.dumps(data, indent=1))
        print(render({method: have}, lengths), flush=True)
    # Every length measured so far, not only this invocation's: the file is the whole record.
    measured = sorted({int(n) for per in data["results"].values() for n in per})
    table = render(data["results"], measured)
    (out_dir / "ruler_engine.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
