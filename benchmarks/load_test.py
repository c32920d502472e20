"""Load test through vLLM's OpenAI server: bf16 vs CSR at the same total KV memory.

    python benchmarks/load_test.py [--budget-mib 56] [--methods bf16,csr-1b]
        [--levels 1,2,4,8,16] [--prompt-tokens 1024] [--output-tokens 64] [--same-pool]
    python benchmarks/load_test.py --render benchmarks/results/load_test.json

Every CSR server gets a ``--budget-mib`` KV pool; CSR also holds memory outside it (its
dictionaries, the dense-window Guard, the native kernels' tables: ``side_bytes`` of
``/csr/stats``), so bf16's pool is ``--budget-mib`` plus the largest CSR side memory measured:
the same total memory (``--same-pool``: every server the same pool, the older comparison). The
CSR servers run first so their side memory is known. For each method one ``vllm serve``
(prefix caching off so every request pays for its own KV) is driven by vLLM's own benchmark client, ``vllm bench
serve``, with the same workload: long prompts cut from held-out text (the Paul Graham essays,
never used for dictionary training), ``--output-tokens`` each, at each offered concurrency
level (``--max-concurrency L``, ``2 L`` requests, all sent at once). A sampler polls vLLM's
``/metrics`` every 0.25 s during each level for requests running vs waiting and KV usage;
preemptions and completions are the counters' differences over the level; TTFT / TPOT
percentiles and output tokens/s come from ``vllm bench serve``'s result file.

"Held without preemption" is the largest number of requests a server ran at once during a
level with no preemption. Writes ``OUT/load_test.json``, ``OUT/load_test.md`` and
``OUT/load_test.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the default model)")
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--methods", default="bf16,csr-1b")
    p.add_argument("--budget-mib", type=int, default=56,
                   help="KV pool of every server (--kv-cache-memory-bytes), MiB")
    p.add_argument("--levels", default="1,2,4,8,16", help="offered concurrency levels")
    p.add_argument("--requests-per-level", type=float, default=2.0,
                   help="requests sent per level, as a multiple of the level")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--text", default="eval-essays", help="held-out corpus name")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--same-pool", action="store_true",
                   help="give bf16 the CSR pool only (not the pool plus CSR's side memory)")
    p.add_argument("--render", help="print the table and redraw the plot of a load_test.json")
    return p.parse_args(argv)


# -- workload ---------------------------------------------------------------------------------
def write_prompts(model: Path, text_name: str, n: int, tokens: int, path: Path) -> int:
    """``n`` distinct held-out passages of about ``tokens`` tokens as a ``vllm bench serve``
    custom dataset (JSONL); returns the longest prompt in tokens."""
    from transformers import AutoTokenizer

    from csr_vllm.data.corpora import corpus_file

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(corpus_file(text_name).read_text()[: 12 * tokens * n])["input_ids"]
    if len(ids) < n * tokens:
        sys.exit(f"error: {text_name} holds {len(ids)} tokens, {n * tokens} needed")
    longest = 0
    with path.open("w") as f:
        for i in range(n):
            text = tok.decode(ids[i * tokens:(i + 1) * tokens - 8])
            longest = max(longest, len(tok(text)["input_ids"]))
            f.write(json.dumps({"prompt": text}) + "\n")
    return longest


# -- /metrics sampling ------------------------------------------------------------------------
def scrape(base: str) -> dict[str, float]:
    """vLLM's and csr-vllm's unlabelled-by-kind series, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                          "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                          "vllm:request_success_total", "vllm:generation_tokens_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


class Sampler(threading.Thread):
    """Polls /metrics until stopped; keeps the maxima that matter."""

    def __init__(self, base: str, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.base, self.period = base, period
        self.max_running = self.max_waiting = self.max_usage = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                m = scrape(self.base)
                self.max_running = max(self.max_running, m.get("vllm:num_requests_running", 0))
                self.max_waiting = max(self.max_waiting, m.get("vllm:num_requests_waiting", 0))
                self.max_usage = max(self.max_usage, m.get("vllm:kv_cache_usage_perc", 0))
            except OSError:
                pass
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- one server -------------------------------------------------------------------------------
def server_flags(method: str, pool_bytes: int, dict_dir: str, max_len: int) -> list[str]:
    flags = ["--kv-cache-memory-bytes", str(pool_bytes), "--max-model-len",
             str(max_len), "--no-enable-prefix-caching", "--max-num-seqs", "64",
             "--served-model-name", "model", "--enforce-eager"]
    if method != "bf16":
        flags += ["--kv-cache-backend", "csr", "--csr-dict", dict_dir, "--csr-preset", method]
    return flags


def bench_level(base: str, model: Path, dataset: Path, level: int, n: int, out_tokens: int,
                tmp: Path) -> dict:
    result = tmp / f"bench-{level}.json"
    cmd = [sys.executable, "-m", "csr_vllm.vllm_launcher", "bench", "serve",
           "--backend", "vllm", "--base-url", base, "--endpoint", "/v1/completions",
           "--model", "model", "--tokenizer", str(model),
           "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
           "--custom-output-len", str(out_tokens), "--ignore-eos", "--num-prompts", str(n),
           "--max-concurrency", str(level), "--request-rate", "inf",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(tmp), "--result-filename", result.name,
           "--disable-tqdm", "--seed", str(level)]
    before = scrape(base)
    sampler = Sampler(base)
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sampler.stop()
    after = scrape(base)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    r = json.loads(result.read_text())
    preempted = after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"]
    return {
        "level": level, "requests": n, "completed": r["completed"],
        "failed": r.get("failed", n - r["completed"]), "wall_s": wall,
        "max_running": sampler.max_running, "max_waiting": sampler.max_waiting,
        "max_kv_usage": sampler.max_usage, "preemptions": preempted,
        "output_tokens_per_s": r["output_throughput"],
        **{f"{m}_{q}_ms": r.get(f"{q}_{m}_ms") for m in ("ttft", "tpot", "e2el")
           for q in ("median", "p90", "p99")},
    }


def run_method(method: str, args: argparse.Namespace, model: Path, dict_dir: str,
               dataset: Path, levels: list[int], max_len: int, tmp: Path,
               pool_bytes: int) -> dict:
    from tqdm import tqdm

    from csr_vllm.server.launch import ServerProcess, get_json

    env = {"TOKENIZERS_PARALLELISM": "false"}
    with ServerProcess(str(model), server_flags(method, pool_bytes, dict_dir, max_len), env) as srv:
        stats = get_json(srv.base + "/csr/stats") if method != "bf16" else None
        rows = []
        for level in tqdm(levels, desc=method, unit="level"):
            n = max(2, round(level * args.requests_per_level))
            rows.append(bench_level(srv.base, model, dataset, level, n, args.output_tokens, tmp))
        log = srv.log()
    tokens = next((int(ln.split("CPU KV cache size:")[1].split("tokens")[0].replace(",", ""))
                   for ln in log.splitlines() if "CPU KV cache size:" in ln), None)
    held = max((r["max_running"] for r in rows if r["preemptions"] == 0), default=0)
    side = sum(stats["side_bytes"].values()) if stats else 0
    return {"method": method, "kv_capacity_tokens": tokens, "levels": rows,
            "pool_mib": pool_bytes / MIB, "total_mib": (pool_bytes + side) / MIB,
            "held_without_preemption": held,
            "kv_bytes_per_token": stats["kv_bytes_per_token"] if stats else None,
            "dense_bytes_per_token": stats["dense_equivalent_bytes_per_token"] if stats else None,
            "side_bytes": stats["side_bytes"] if stats else {}}


# -- report -----------------------------------------------------------------------------------
def table(res: dict) -> str:
    memory = ("the same KV pool for every server" if res.get("same_pool", True) else
              "the same total memory: bf16's pool is CSR's plus CSR's side memory")
    lines = [f"CSR KV pool {res['budget_mib']} MiB, {memory}; prompts of ~{res['prompt_tokens']} "
             f"held-out tokens, {res['output_tokens']} output tokens each; vLLM {res['vllm']}.",
             "",
             "| method | pool MiB | pool + side MiB | KV capacity (tokens) | held w/o preemption | offered | done/sent | "
             "max running | max waiting | preemptions | out tok/s | TTFT p50 (s) | "
             "TPOT p50 (ms) | TPOT p99 (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in res["methods"]:
        for r in m["levels"]:
            pool = m.get("pool_mib", res["budget_mib"])
            lines.append(
                f"| {m['method']} | {pool:.0f} | {m.get('total_mib', pool):.0f} | "
                f"{m['kv_capacity_tokens'] or '?':,} | "
                f"{m['held_without_preemption']:.0f} | {r['level']} | "
                f"{r['completed']}/{r['requests']} | {r['max_running']:.0f} | "
                f"{r['max_waiting']:.0f} | {r['preemptions']:.0f} | "
                f"{r['output_tokens_per_s']:.1f} | {r['ttft_median_ms'] / 1e3:.2f} | "
                f"{r['tpot_median_ms']:.0f} | {r['tpot_p99_ms']:.0f} |")
    summary = res.get("summary", {})
    if "held_csr" in summary:  # a file written before per-method summaries
        summary = {summary.get("csr_method", "csr"): summary}
    for name, s in summary.items():
        lines += ["", f"{name}: held without preemption {s['held_csr']:.0f} vs bf16 "
                      f"{s['held_bf16']:.0f} requests ({s['held_ratio']:.1f}x). Output tokens/s "
                      f"at the highest level: {s['tput_csr']:.1f} vs bf16 {s['tput_bf16']:.1f} "
                      f"({s['tput_ratio']:.2f}x). Single-request decode speed CSR/bf16 "
                      f"(1 / TPOT p50 at concurrency 1): {s['decode_speed_ratio']:.2f}."]
    return "\n".join(lines)


def summarise(res: dict) -> dict:
    """Per CSR method against bf16: requests held, top-level throughput, single decode."""
    by = {m["method"]: m for m in res["methods"]}
    if "bf16" not in by or len(by) < 2:
        return {}
    b = by["bf16"]
    one_b = next((r for r in b["levels"] if r["level"] == 1), None)
    out = {}
    for name, c in by.items():
        if name == "bf16":
            continue
        top_b, top_c = b["levels"][-1], c["levels"][-1]
        one_c = next((r for r in c["levels"] if r["level"] == 1), None)
        out[name] = {
            "held_bf16": b["held_without_preemption"], "held_csr": c["held_without_preemption"],
            "held_ratio": c["held_without_preemption"] / max(b["held_without_preemption"], 1),
            "tput_bf16": top_b["output_tokens_per_s"], "tput_csr": top_c["output_tokens_per_s"],
            "tput_ratio": top_c["output_tokens_per_s"] / top_b["output_tokens_per_s"],
            "preemptions_csr": sum(r["preemptions"] for r in c["levels"]),
            "decode_speed_ratio": (one_b["tpot_median_ms"] / one_c["tpot_median_ms"]
                                   if one_b and one_c else float("nan")),
        }
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for m in res["methods"]:
        lv = [r["level"] for r in m["levels"]]
        name = m["method"]
        ax[0, 0].plot(lv, [r["max_running"] for r in m["levels"]], "o-", label=name)
        ax[0, 1].plot(lv, [r["output_tokens_per_s"] for r in m["levels"]], "o-", label=name)
        ax[1, 0].plot(lv, [r["ttft_median_ms"] / 1e3 for r in m["levels"]], "o-",
                      label=f"{name} TTFT p50 (s)")
        ax[1, 0].plot(lv, [r["tpot_median_ms"] / 1e3 for r in m["levels"]], "s--",
                      label=f"{name} TPOT p50 (s)")
        used = [r["max_kv_usage"] * m["kv_capacity_tokens"] for r in m["levels"]]
        bpt = m["kv_bytes_per_token"] or res["dense_bytes_per_token"]
        ax[1, 1].plot(lv, [u * bpt / MIB for u in used], "o-", label=f"{name}: pool used")
        if m["kv_bytes_per_token"]:
            ax[1, 1].plot(lv, [u * res["dense_bytes_per_token"] / MIB for u in used], "x:",
                          label=f"{name}: same tokens in bf16")
    ax[0, 0].plot(lv, lv, "k:", lw=0.8, label="offered")
    titles = [("Requests running at once (max)", "requests"),
              ("Output throughput", "tokens/s"),
              ("Latency", "seconds"),
              ("KV memory at peak", "MiB")]
    for a, (t, y) in zip(ax.flat, titles, strict=True):
        a.set_title(t)
        a.set_xlabel("offered concurrency")
        a.set_ylabel(y)
        a.set_xscale("log", base=2)
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    ax[1, 0].set_yscale("log")
    ax[1, 1].axhline(res["budget_mib"], color="k", lw=0.8, ls="--")
    fig.suptitle(f"bf16 vs CSR at the same {res['budget_mib']} MiB KV budget "
                 f"(~{res['prompt_tokens']}-token prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        print(table(res))
        plot(res, Path(args.render).with_suffix(".png"))
        return
    import vllm

    from csr_vllm.cli import model_dir_or_default
    from csr_vllm.defaults import default_dictionary

    model = model_dir_or_default(args.model)
    dict_dir = args.dict or str(default_dictionary(model))
    levels = [int(x) for x in args.levels.split(",")]
    n_max = max(max(2, round(lv * args.requests_per_level)) for lv in levels)
    tmp = Path(tempfile.mkdtemp(prefix="csr-load-"))
    dataset = tmp / "prompts.jsonl"
    longest = write_prompts(model, args.text, n_max, args.prompt_tokens, dataset)
    max_len = longest + args.output_tokens + 16
    names = args.methods.split(",")
    methods = []
    for m in sorted(names, key=lambda m: m == "bf16"):  # CSR first: its side memory is known
        pool = args.budget_mib * MIB
        if m == "bf16" and not args.same_pool:
            pool += max((sum(r["side_bytes"].values()) for r in methods), default=0)
        methods.append(run_method(m, args, model, dict_dir, dataset, levels, max_len, tmp, pool))
    methods.sort(key=lambda r: names.index(r["method"]))
    dense = next((m["dense_bytes_per_token"] for m in methods if m["dense_bytes_per_token"]),
                 None)
    res = {"budget_mib": args.budget_mib, "same_pool": args.same_pool,
           "prompt_tokens": args.prompt_tokens,
           "output_tokens": args.output_tokens, "levels": levels, "vllm": vllm.__version__,
           "text": args.text, "dense_bytes_per_token": dense, "methods": methods,
           "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:])}
    res["summary"] = summarise(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_test.json").write_text(json.dumps(res, indent=1))
    (out / "load_test.md").write_text(table(res) + "\n")
    plot(res, out / "load_test.png")
    print(table(res))
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
