"""Runs one vLLM engine scenario in its own process and prints one JSON line.

Used by tests/test_vllm_e2e.py (each engine is a separate process: vLLM keeps per-process
state, such as its backend-selection cache, that must not leak between scenarios).

    python tests/e2e/driver.py SPEC_JSON
SPEC: {"model", "csr": {...} | null, "prompts": [[ids]], "max_tokens", "engine": {...},
       "logprob_prompts": [[ids]] (optional), "logprob_chunk": int}
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
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
    out["plugins"] = os.environ.get("VLLM_PLUGINS")
    if spec.get("logprob_prompts"):
        lp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["logprob_prompts"]],
                           lp, use_tqdm=False)
        nll = []
        for r, ids in zip(res, spec["logprob_prompts"], strict=True):
            nll.append([-r.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0])
        out["prompt_nll"] = nll
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
