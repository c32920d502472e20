"""Decode step of the attention layers on this machine: dense bf16 vs CSR, native and reference.

    python benchmarks/read_paths.py [--preset csr-2b] [--contexts 512,2048,8192,32768]
        [--batches 1,16] [--kernels native,reference] [--reference-max-tokens 65536]
        [--layers 30]

``--layers`` attention layers of the default model's shape (9 query heads, 3 KV heads,
head_dim 64, block 128), each with its own dictionaries and pages, one after another as a
decode step runs them (so each layer finds the caches as the layers before it left them;
``--layers 1`` times one layer over and over, its dictionaries hot), decoding each batch of
sequences at each context length, through the real code:
vLLM's CPU kernel over bf16 pages (``dense``), and CSRAttentionImpl.forward over CSR pages for
each ``--kernels`` (``native``: csr_vllm.native; ``reference``: the PyTorch codec) with decode
rows on the ``sparse`` path (attention from the pages) and on ``reconstruct`` (pages decoded
into a dense scratch for vLLM's kernel); ``write`` is the step's other half, coding the batch's
new tokens' K and V into their slots. Codes are random valid codes of the preset (every atom
equally likely: the dictionary's cache behaviour is the worst case). The reference is timed
only while batch x context <= ``--reference-max-tokens`` (it takes seconds beyond). Times are
per layer: a step's time over the layers (the CSR plan, built once per step as in the engine,
included). Achieved
rates: ``dense GB/s`` = bf16 K/V bytes read / time; ``native GFLOP/s`` = the codec's
arithmetic (2 x atoms x D per vector for rebuilding K and V, plus attention's 4 x D x G).
Medians over ``--repeats``; ratios are within this one run. Writes ``OUT/read_paths.json``
and ``OUT/read_paths.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path
from unittest import mock

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends import cpu_attn

from csr_vllm.codec.codec import SparseCode
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.engine.backend import CSRAttentionImpl, CSRMetadata
from csr_vllm.engine.runtime import CSRRuntime
from csr_vllm.engine.settings import CSRSettings
from csr_vllm.evaluation.methods import make_method

HQ, H, D, BS = 9, 3, 64, 128
DTYPE = torch.bfloat16


def random_pages(runtime: CSRRuntime, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    codec = runtime.codecs[0]
    parts = []
    n = num_blocks * H * BS
    for c in (codec.keys[0], codec.values[0]):
        cfg = c.config
        shape = (n, cfg.chunks, cfg.atoms_per_chunk)
        idx = torch.randint(0, cfg.num_atoms, shape, generator=gen)
        coef = (torch.randn(shape, generator=gen) * 0.5).to(torch.float8_e4m3fn).float()
        parts.append(c.pack(SparseCode(idx, coef, None)))
    return torch.cat(parts, 1).reshape(num_blocks, H, BS, -1)


def bench(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_context(t: int, b: int, repeats: int, dicts: DictionarySet, impl, layers: list,
                    isa: str, gen: torch.Generator, kernels_list: list[str],
                    reference_max: int) -> dict:
    """Median times per layer of one decode step over ``layers``, batch ``b`` at context ``t``."""
    nl = len(layers)
    nb = -(-t // BS)
    block_table = torch.randperm(b * nb, generator=gen).reshape(b, nb).to(torch.int32)
    seq_lens = torch.full((b,), t, dtype=torch.int32)
    qsl = torch.arange(b + 1, dtype=torch.int32)
    slot_mapping = (block_table[:, (t - 1) // BS].long() * BS + (t - 1) % BS)
    query = torch.randn(b, HQ, D, generator=gen).to(DTYPE)
    key = torch.randn(b, H, D, generator=gen).to(DTYPE)
    value = torch.randn(b, H, D, generator=gen).to(DTYPE)
    out = torch.empty(b, HQ, D, dtype=DTYPE)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=b, num_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=seq_lens,
        dtype=DTYPE, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False, dynamic_causal=None, kv_cache_dtype="auto")

    n = b * nb * BS  # every slot written in the kernel's own layout
    dense = []
    for _ in range(nl):
        kv = torch.empty(b * nb, H, 2 * BS, D, dtype=DTYPE)
        kc, vc = kv.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            torch.randn(n, H, D, generator=gen).to(DTYPE),
            torch.randn(n, H, D, generator=gen).to(DTYPE),
            kc, vc, torch.arange(n), isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        dense.append((kc, vc))

    def run_dense():
        for kc, vc in dense:
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                seq_lens=seq_lens, scale=D**-0.5, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=block_table, softcap=0,
                scheduler_metadata=sched, s_aux=None, dynamic_causal=None, k_scale=1.0,
                v_scale=1.0, kv_cache_dtype="auto")

    row = {"context": t, "batch": b, "layers": nl,
           "dense_ms": 1e3 * bench(run_dense, repeats) / nl}
    row["dense_GBps"] = b * t * H * 2 * D * 2 / row["dense_ms"] / 1e6
    pages = None
    for kernels, path in [(k, p) for k in kernels_list for p in ("sparse", "reconstruct")]:
        if kernels == "reference" and b * t > reference_max:
            continue
        runtime = CSRRuntime(dicts, CSRSettings(read_path=path, kernels=kernels), BS, DTYPE)
        if kernels == "native" and runtime.native is None:
            raise SystemExit(f"native kernels unavailable: {runtime.native_off}")
        if pages is None:
            pages = [random_pages(runtime, b * nb, gen) for _ in range(nl)]

        def run_csr(runtime=runtime, path=path, pages=pages):
            plan = runtime.plan(block_table, seq_lens, qsl, slot_mapping,
                                sparse_decodes=path == "sparse")
            meta = CSRMetadata(
                num_actual_tokens=b, max_query_len=1, query_start_loc=qsl, max_seq_len=t,
                seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping,
                scheduler_metadata=sched, csr_plan=plan, csr_runtime=runtime)
            for layer, page in zip(layers, pages, strict=True):
                impl.forward(layer, query, key, value, page, meta, out)

        row[f"{kernels}_{path}_ms"] = 1e3 * bench(run_csr, repeats) / nl
        if path == "sparse":  # the step's other half: coding its b new tokens' K and V
            plan = runtime.plan(block_table, seq_lens, qsl, slot_mapping)

            def run_write(runtime=runtime, plan=plan, pages=pages):
                for layer, page in zip(layers, pages, strict=True):
                    runtime.write(layer._csr_layer_index, plan, key, value, page, slot_mapping)

            row[f"{kernels}_write_ms"] = 1e3 * bench(run_write, repeats) / nl
        if kernels == "native" and path == "sparse":
            codec = runtime.codecs[layers[0]._csr_layer_index]
            kc, vc = codec.keys[0].config, codec.values[0].config
            flops = b * t * H * 2 * D * (kc.atoms_per_chunk + vc.atoms_per_chunk + 2 * HQ // H)
            row["native_GFLOPs"] = flops / row["native_sparse_ms"] / 1e6
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--preset", default="csr-2b",
                   help="a preset, or one with other coefficients (csr-2b+coef=fp8)")
    p.add_argument("--contexts", default="512,2048,8192,32768")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--kernels", default="native,reference")
    p.add_argument("--reference-max-tokens", type=int, default=65536)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=30,
                   help="layers run one after another per timed step, each with its own "
                        "dictionaries and pages (the model's 30 = a real step's cache "
                        "behaviour; 1 = one layer, hot)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    # vLLM's CPU worker asks the kernel for AMX tile permission at start-up; this script runs
    # the kernels outside a worker, so it asks itself (else: SIGILL on AMX machines).
    if torch.cpu._is_amx_tile_supported():
        torch._C._cpu._init_amx()
    if args.dict is None:
        from csr_vllm.cli import model_dir_or_default
        from csr_vllm.defaults import default_dictionary

        args.dict = str(default_dictionary(model_dir_or_default(None)))
    if "+" in args.preset and not all(o.split("=")[0] in ("coef", "vcoef")
                                      for o in args.preset.split("+")[1:]):
        p.error("--preset takes a preset, optionally with +coef=/+vcoef= (e.g. csr-2b+coef=fp8)")
    # make_method applies the preset (and any coefficient format option) to the dictionary.
    dicts = make_method(args.preset, args.dict).dicts
    if not 1 <= args.layers <= dicts.shape.num_layers:
        p.error(f"--layers must be in [1, {dicts.shape.num_layers}]")
    dicts = dicts.shard(layers=(0, args.layers))
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cfg = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=DTYPE))
    with mock.patch.object(cpu_attn, "get_current_vllm_config", lambda: cfg):
        impl = CSRAttentionImpl(HQ, D, D**-0.5, H, None, None, "auto")
    isa = cpu_attn._get_attn_isa(DTYPE, BS, D)
    layers = [types.SimpleNamespace(isa=isa, layer_name=f"model.layers.{i}.self_attn.attn",
                                    _csr_layer_index=i) for i in range(args.layers)]

    rows = []
    kernels_list = args.kernels.split(",")
    for b in [int(x) for x in args.batches.split(",")]:
        for t in [int(x) for x in args.contexts.split(",")]:
            row = measure_context(t, b, args.repeats, dicts, impl, layers, isa, gen,
                                  kernels_list, args.reference_max_tokens)
            for k in [k for k in row if k.endswith("_ms") and k != "dense_ms"]:
                row[k[:-3] + "_vs_dense"] = row[k] / row["dense_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "threads": torch.get_num_threads(), "layers": args.layers,
            "rows": rows}
    (out_dir / "read_paths.json").write_text(json.dumps(meta, indent=1))

    def cell(r: dict, key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[key]) if key in r else "-"

    lines = [f"| context | batch | dense ms | dense GB/s | {args.preset} native sparse ms | "
             "native / dense | native GFLOP/s | native reconstruct ms | native write ms | "
             "reference sparse ms | reference reconstruct ms | reference write ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['dense_ms']:.2f} | {r['dense_GBps']:.1f} | "
            f"{cell(r, 'native_sparse_ms')} | {cell(r, 'native_sparse_vs_dense', '{:.2f}x')} | "
            f"{cell(r, 'native_GFLOPs', '{:.1f}')} | {cell(r, 'native_reconstruct_ms')} | "
            f"{cell(r, 'native_write_ms')} | {cell(r, 'reference_sparse_ms')} | "
            f"{cell(r, 'reference_reconstruct_ms')} | {cell(r, 'reference_write_ms')} |")
    table = "\n".join(lines) + "\n"
    (out_dir / "read_paths.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
