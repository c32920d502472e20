"""Check a CSR dictionary volume against the model before the server starts.

Run as the Kubernetes init container (deploy/k8s): the same checks the engine makes when it
loads the dictionary (files present, SHA-256, format version, unit-norm atoms, the model's
architecture / layers / KV heads / head_dim / RoPE, the preset fits, pre-RoPE keys need
default RoPE), but before any engine process starts, so a bad volume fails the pod with the
reason in its log instead of a crash-looping server. Prints, as one JSON line, the slot size
and the dictionary bytes each tensor/pipeline-parallel worker will hold.

    python deploy/validate_dictionary.py --model /models/M --dict /dicts/M/D --preset csr-2b \
        [--tensor-parallel-size 3] [--pipeline-parallel-size 2]

Exit status 0: valid; 1: invalid (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys


def plan(model: str, dictionary: str, preset: str | None, tp: int, pp: int) -> dict:
    """Validate and describe what each worker of a ``tp`` x ``pp`` engine holds."""
    from transformers import AutoConfig

    from csr_vllm.engine.parallel import shard_for_worker, worker_share
    from csr_vllm.engine.settings import CSRSettings
    from csr_vllm.plugin import load_dictionaries

    hf_config = AutoConfig.from_pretrained(model)
    settings = CSRSettings(dict=dictionary, preset=preset)
    dicts = load_dictionaries(settings, hf_config, model)
    shape = dicts.shape
    ranks = []
    for p in range(pp):
        for t in range(tp):
            share = worker_share(shape.num_layers, shape.num_kv_heads, t, tp, p, pp)
            part = shard_for_worker(dicts, share)
            ranks.append({"tp_rank": t, "pp_rank": p, "layers": list(share.layers),
                          "kv_heads": list(share.kv_heads), "dictionary_bytes": part.nbytes,
                          "kv_bytes_per_token": dicts.config.slot_bytes() * part.kv_heads
                          * len(part.layers)})
    return {"valid": True, "model": model, "dictionary": dictionary, "preset": preset,
            "slot_bytes": dicts.config.slot_bytes(),
            "bits_per_channel": dicts.config.bits_per_channel(shape.head_dim),
            "dictionary_bytes_total": dicts.nbytes, "workers": ranks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--dict", required=True, help="dictionary folder (csr-vllm train-dict)")
    p.add_argument("--preset", default="csr-2b",
                   help="csr-1b | csr-1.5b | csr-2b | csr-4b | none (the dictionary's own)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    args = p.parse_args(argv)
    try:
        preset = None if args.preset.lower() == "none" else args.preset
        out = plan(args.model, args.dict, preset, args.tensor_parallel_size,
                   args.pipeline_parallel_size)
    except (ValueError, OSError, NotImplementedError) as e:  # DictionaryError is a ValueError
        print(f"CSR dictionary check failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
