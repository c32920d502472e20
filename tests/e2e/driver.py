"""Runs vLLM engine scenarios in a process of their own and prints one JSON line each.

Used by tests/test_vllm_e2e.py. Scenarios whose process environment differs (plugins,
threads) run in separate processes; engines of the same environment may share one, one after
another (the plugin re-selects the attention backend for each engine's config).

    python tests/e2e/driver.py SPEC_JSON      (SPEC_JSON: one spec or a list of them)
SPEC: {"model", "csr": {...} | null, "prompts": [[ids]], "max_tokens", "engine": {...},
       "logprob_prompts": [[ids]] (optional), "logprob_chunk": int,
       "refused": true (optional: the engine must fail to start; its error is the result),
       "mode": "cancel" (optional: cancel_mid_stream's scenario, with "fill_prompt")}
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback


async def cancel_mid_stream(spec: dict) -> dict:
    """Stream several requests through AsyncLLM, drop most of them after a few tokens, then
    run one request that needs every block of the (small) pool: it can only finish if the
    cancelled requests gave all their blocks back."""
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_kw = {"model": spec["model"], "enforce_eager": True, "seed": 0,
                 **spec.get("engine", {})}
    if spec.get("csr") is not None:
        engine_kw["additional_config"] = {"kv_cache_backend": "csr", "csr": spec["csr"]}
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kw))
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)

    async def stream(i: int, prompt: list[int], stop_after: int | None) -> int:
        n = 0
        async for out in llm.generate(TokensPrompt(prompt_token_ids=prompt), sp, f"r{i}"):
            n = len(out.outputs[0].token_ids)
            if stop_after is not None and n >= stop_after:
                break  # closing the generator aborts the request
        return n

    prompts = spec["prompts"]
    counts = await asyncio.gather(*[stream(i, p, 3 if i % 3 else None)
                                    for i, p in enumerate(prompts)])
    whole = spec["fill_prompt"]
    final = await asyncio.wait_for(stream(len(prompts), whole, None), timeout=600)
    llm.shutdown()
    return {"streamed": counts, "fill_tokens": final}


def main() -> None:
    import asyncio

    spec = json.loads(sys.argv[1])
    # A list of specs: one engine after another in this process (each deleted before the
    # next starts), one RESULT line each, in order; vLLM is imported once for all of them.
    # A spec with "refused": true must fail to start: its error text is the result.
    for one in spec if isinstance(spec, list) else [spec]:
        if one.get("mode") == "cancel":
            print("RESULT " + json.dumps(asyncio.run(cancel_mid_stream(one))), flush=True)
        elif one.get("refused"):
            try:
                run_engine(one)
            except Exception:  # noqa: BLE001 (the refusal under test, whatever its type)
                print("RESULT " + json.dumps({"refused": traceback.format_exc()}), flush=True)
            else:
                print("RESULT " + json.dumps({"refused": None}), flush=True)
        else:
            print("RESULT " + json.dumps(run_engine(one)), flush=True)
        gc.collect()


def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = {"max_model_len": 2048, "enforce_eager": True, "seed": 0,
              "disable_log_stats": False, **spec.get("engine", {})}
    if spec.get("csr") is not None:
        engine["additional_config"] = {"kv_cache_backend": "csr", "csr": spec["csr"]}
    llm = LLM(spec["model"], **engine)
    cache = llm.llm_engine.vllm_config.cache_config
    out = {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}
    greedy = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], greedy,
                       use_tqdm=False)
    out["outputs"] = [list(r.outputs[0].token_ids) for r in res]
    out["preemptions"] = sum(m.value for m in llm.get_metrics()
                             if m.name == "vllm:num_preemptions")
    csr_on = spec.get("csr") is not None
    out["csr"] = llm.collective_rpc("csr_stats")[0] if csr_on else {"active": False}
    # One dict per worker (tensor/pipeline parallel: each names its ranks and its share).
    out["csr_workers"] = llm.collective_rpc("csr_stats") if csr_on else []
    out["plugins"] = os.environ.get("VLLM_PLUGINS")
    out["pid"] = os.getpid()
    if spec.get("logprob_prompts"):
        lp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["logprob_prompts"]],
                           lp, use_tqdm=False)
        nll = []
        for r, ids in zip(res, spec["logprob_prompts"], strict=True):
            nll.append([-r.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0])
        out["prompt_nll"] = nll
    del llm
    return out


if __name__ == "__main__":
    main()
