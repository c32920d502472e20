"""Time the CSR Triton kernels against dense paged attention on a GPU.

    python benchmarks/kernels/bench_kernels.py                 # Llama-3-8B shapes, needs CUDA
    python benchmarks/kernels/bench_kernels.py --interpret     # tiny CPU smoke run (interpreter)

Shapes (default): 32 query heads, 8 KV heads, head_dim 128, block 16, 8192-atom dictionaries,
batch 1-64, context 4k-128k. Per (batch, context): sparse-domain decode attention (codes for
every token but a 128-token exact tail, the Guard window) vs dense bf16 paged attention (vLLM's
Triton ``unified_attention`` when vLLM is importable, else PyTorch SDPA over the gathered pages,
which also pays the gather), and the fused encode of one decode step's new K/V. Medians over
``--repeats`` timed with CUDA events. Bytes/s = the bytes each kernel must read (sparse: 2 key
codes + 1 value code per coded token and KV head plus the dense tail; dense: K and V in bf16)
over its time, against the copy bandwidth measured in the same run. Codes are real: a few
thousand random vectors are encoded by the kernel and tiled over the cache.

Prints a markdown table and, last, one JSON line. Bars for the GPU run: sparse decode faster than
dense at 32k and >= 3x at 128k; encode < 10% of a decode step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

# (bits per channel, coefficient format) of each preset, as csr_vllm.codec.config.PRESETS
# (not imported: this script runs where only torch and triton exist; tested equal).
PRESETS = {"csr-1b": (1.0, "log5"), "csr-1.5b": (1.5, "log5"), "csr-2b": (2.0, "log5"),
           "csr-4b": (4.0, "fp8")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interpret", action="store_true",
                   help="tiny shapes on CPU under Triton's interpreter (checks the script runs)")
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--context", default="4096,32768,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--atoms", type=int, default=8192)
    p.add_argument("--preset", default="csr-2b", choices=sorted(PRESETS))
    p.add_argument("--coef", default=None, choices=["fp8", "fp16", "log5"],
                   help="coefficient format (default: the preset's; log5 codes are read "
                        "through a ladder table)")
    p.add_argument("--key-rope", default="post", choices=["post", "pre"])
    p.add_argument("--window", type=int, default=128, help="exact tail tokens per sequence")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-gib", type=float, default=40.0,
                   help="skip shapes whose dense cache (+ gathered copy) would exceed this")
    args = p.parse_args(argv)
    if args.interpret:
        args.batch, args.context = "2", "40"
        args.heads, args.kv_heads, args.head_dim, args.block_size = 4, 2, 32, 8
        args.atoms, args.repeats, args.window = 64, 1, 8
    return args


def split_atoms(bits: float, head_dim: int, num_atoms: int, coef_bits: int = 8) -> tuple[int, int]:
    """(key, value) atoms a preset fits per vector (``coef_bits`` coefficients, ceil(log2 A)-bit
    indices, no per-vector scale): as csr_vllm.codec.config.Preset, without importing the codec
    package — halves of the slot each, unless moving bytes fits one more atom in all, keys and
    values at most one atom apart, the spare one to the keys."""
    per_atom = coef_bits + max(1, math.ceil(math.log2(num_atoms)))
    half = int(bits * head_dim) // 8
    even = (8 * half // per_atom,) * 2
    splits = [even]
    for sk in range(1, 16 * half // per_atom + 1):
        sv = (8 * (2 * half - -(-sk * per_atom // 8))) // per_atom
        if abs(sk - sv) <= 1:
            splits.append((sk, sv))
    return max(splits, key=lambda x: (min(x) >= 1, sum(x), x == even, x[0]))


def ladder_table(fmt, device):
    """A plausible [C, S, M] ladder table for ``logB`` codes (tops falling with the pursuit
    position, 6 octaves below each); its values do not change the kernels' work."""
    import torch

    if not fmt.uses_ladder:
        return None
    tops = 1.0 / torch.arange(1, fmt.atoms_per_chunk + 1, dtype=torch.float32).sqrt()
    m = fmt.ladder_levels
    steps = torch.exp2(torch.arange(m, dtype=torch.float32) * (-6.0 / (m - 1)))
    return (tops[:, None] * steps).expand(fmt.chunks, -1, -1).contiguous().to(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (no device found). Use --interpret for a tiny CPU "
              "smoke run of the same code.", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from csr_vllm.ops.code_format import COEF_FORMATS, CodeFormat
    from csr_vllm.ops.encode import encode_store, rope_rows

    dev = "cpu" if args.interpret else "cuda"
    torch.manual_seed(0)
    h, d, bs, a = args.kv_heads, args.head_dim, args.block_size, args.atoms
    bits, preset_coef = PRESETS[args.preset]
    args.coef = args.coef or preset_coef
    sk, sv = split_atoms(bits, d, a, COEF_FORMATS[args.coef])
    kfmt, vfmt = CodeFormat(a, 1, sk, args.coef, "omp"), CodeFormat(a, 1, sv, args.coef, "omp")
    slot = kfmt.slot_bytes + vfmt.slot_bytes
    ladders = {"key_ladder": ladder_table(kfmt, dev), "value_ladder": ladder_table(vfmt, dev)}

    def timed(fn) -> float:
        """Median seconds of fn over the repeats (one warm-up call first)."""
        fn()
        times = []
        for _ in range(args.repeats):
            if dev == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # Copy bandwidth (read + write) of this device, the yardstick for bytes/s.
    n_copy = (1 << 28) if dev == "cuda" else (1 << 20)
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * n_copy / timed(lambda: dst.copy_(src))

    def unit(*shape):
        x = torch.randn(*shape, dtype=torch.float64)
        return (x / x.norm(dim=-1, keepdim=True)).float().to(dev)

    katoms, vatoms = unit(1, a, d), unit(1, a, d)
    # A pool of real codes: random vectors encoded by the kernel.
    pool_n = 32 if args.interpret else 4096
    pool = torch.zeros(-(-pool_n // bs), h, bs, slot, dtype=torch.uint8, device=dev)
    pool_pos = torch.arange(pool_n, device=dev)
    rope = rope_rows(pool_pos, d, 500000.0) if args.key_rope == "pre" else (None, None)
    encode_store(torch.randn(pool_n, h, d, device=dev), torch.randn(pool_n, h, d, device=dev),
                 pool_pos, pool, katoms, vatoms, kfmt, vfmt, *rope, **ladders)
    pool_slots = pool.permute(0, 2, 1, 3).reshape(-1, h, slot)[:pool_n]

    dense_fn_name = "sdpa-gather"
    unified = None
    if not args.interpret:
        try:
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention
            unified, dense_fn_name = unified_attention, "vllm-unified_attention"
        except Exception:  # vLLM not installed on this machine: the PyTorch baseline
            unified = None
    ctx_ = {"args": args, "dev": dev, "fmts": (kfmt, vfmt), "slot": slot, "katoms": katoms,
            "vatoms": vatoms, "pool_slots": pool_slots, "pool_n": pool_n, "unified": unified,
            "timed": timed, "ladders": ladders}
    rows = [bench_shape(ctx_, b, ctx) for ctx in [int(x) for x in args.context.split(",")]
            for b in [int(x) for x in args.batch.split(",")]]
    device = "cpu (Triton interpreter; smoke run, timings meaningless)" if args.interpret \
        else torch.cuda.get_device_name()
    print(f"device: {device}; dense baseline: {dense_fn_name}; preset {args.preset} "
          f"({sk} + {sv} atoms of {args.coef}, {slot}-byte slot vs {4 * d} bf16); keys "
          f"{args.key_rope}-RoPE; "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print("| batch | context | sparse ms | sparse GB/s (% copy) | dense ms | dense GB/s | "
          "dense/sparse | encode ms | encode Mvec/s | encode/decode |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dn = r.get("dense_ms")
        print(f"| {r['batch']} | {r['context']} | {r['sparse_ms']:.3f} | {r['sparse_gbps']:.1f} "
              f"({100 * r['sparse_gbps'] * 1e9 / copy_bw:.0f}%) | "
              + (f"{dn:.3f} | {r['dense_gbps']:.1f} | {r['speedup']:.2f}x" if dn is not None
                 else f"- | - | {r['note']}")
              + f" | {r['encode_ms']:.3f} | {r['encode_vectors_per_s'] / 1e6:.2f} | "
              f"{100 * r['encode_over_decode']:.1f}% |")
    print(json.dumps({"device": device, "dense_baseline": dense_fn_name, "preset": args.preset,
                      "coef": args.coef, "key_rope": args.key_rope, "copy_gbps": copy_bw / 1e9, "rows": rows}))
    return 0


def bench_shape(env: dict, b: int, ctx: int) -> dict:
    """Sparse decode, dense decode and one step's encode at batch ``b``, context ``ctx``."""
    import torch

    from csr_vllm.ops.encode import encode_store, rope_rows
    from csr_vllm.ops.sparse_decode import sparse_decode_attention

    args, dev, slot, timed = env["args"], env["dev"], env["slot"], env["timed"]
    kfmt, vfmt = env["fmts"]
    katoms, vatoms, unified = env["katoms"], env["vatoms"], env["unified"]
    ladders = env["ladders"]
    hq, h, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    row = {"batch": b, "context": ctx}
    mb = -(-ctx // bs)
    nblocks = b * mb
    dense_gib = nblocks * bs * h * d * 2 * 2 / 2**30
    table = torch.randperm(nblocks, device=dev).reshape(b, mb).int()
    cache = env["pool_slots"][torch.arange(nblocks * bs, device=dev) % env["pool_n"]]
    cache = cache.reshape(nblocks, bs, h, slot).permute(0, 2, 1, 3).contiguous()
    seq = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    w = min(args.window, ctx)
    ntail = torch.full((b,), w, dtype=torch.int32, device=dev)
    tail_k = torch.randn(b, w, h, d, device=dev, dtype=torch.bfloat16)
    tail_v = torch.randn_like(tail_k)
    q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
    pre = args.key_rope == "pre"
    tables = rope_rows(torch.arange(ctx, device=dev), d, 500000.0) if pre else (None, None)
    sparse_s = timed(lambda: sparse_decode_attention(
        q, cache, table, seq, ntail, tail_k, tail_v, katoms, vatoms, kfmt, vfmt, d ** -0.5,
        *tables, max_seq_len=ctx, **ladders))
    sparse_bytes = b * h * ((ctx - w) * (2 * kfmt.slot_bytes + vfmt.slot_bytes) + w * d * 2 * 2)
    row.update(sparse_ms=sparse_s * 1e3, sparse_gbps=sparse_bytes / sparse_s / 1e9)
    cache = None  # free the codes before the dense cache is allocated
    # Encode of one decode step's new K/V (b tokens x h heads, keys and values).
    new_k = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    scratch = torch.zeros(b, h, 1, slot, dtype=torch.uint8, device=dev)
    new_slots = torch.arange(b, device=dev)
    erope = rope_rows(seq.long() - 1, d, 500000.0) if pre else (None, None)
    enc_s = timed(lambda: encode_store(new_k, new_v, new_slots, scratch, katoms, vatoms, kfmt,
                                       vfmt, *erope, **ladders))
    row.update(encode_ms=enc_s * 1e3, encode_vectors_per_s=2 * b * h / enc_s,
               encode_over_decode=enc_s / sparse_s)
    if dense_gib * (1 if unified else 2) > args.max_gib:
        row.update(dense_ms=None, note=f"dense skipped: {dense_gib:.1f} GiB cache")
        return row
    kc = torch.randn(nblocks, bs, h, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    dense_bytes = b * h * ctx * d * 2 * 2
    if unified is not None:
        out = torch.empty_like(q)
        cu = torch.arange(b + 1, device=dev, dtype=torch.int32)
        dense_s = timed(lambda: unified(
            q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=seq,
            max_seqlen_k=ctx, softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1),
            block_table=table, softcap=0, q_descale=None, k_descale=None, v_descale=None,
            alibi_slopes=None))
    else:
        def dense():
            kk = kc[table.long()].reshape(b, mb * bs, h, d)[:, :ctx].transpose(1, 2)
            vv = vc[table.long()].reshape(b, mb * bs, h, d)[:, :ctx].transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], kk, vv, scale=d ** -0.5, enable_gqa=True)
        dense_s = timed(dense)
    row.update(dense_ms=dense_s * 1e3, dense_gbps=dense_bytes / dense_s / 1e9,
               speedup=dense_s / sparse_s)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
