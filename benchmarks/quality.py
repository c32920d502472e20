"""Quality sweep: perplexity and RULER needle retrieval for bf16, CSR presets and peers.

    python benchmarks/quality.py [--windows 4] [--guard 128] [--ruler-samples 20]

Writes ``OUT/quality.json`` (every number, per-trial RULER outcomes), ``OUT/quality.md`` (the
README table) and ``OUT/quality_ppl_vs_bits.png``. Results are cached in the JSON by a key of
their settings, so an interrupted sweep resumes and a rerun with new methods adds only those.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from csr_vllm.codec.dictionary import ModelShape
from csr_vllm.data.corpora import corpus_file
from csr_vllm.evaluation.methods import make_method
from csr_vllm.evaluation.perplexity import perplexity

DEFAULT_METHODS = ["bf16", "int8", "kivi-4", "int4", "kivi-2", "csr-4b", "csr-2b", "csr-1.5b",
                   "csr-1b"]
DEFAULT_RULER_METHODS = ["bf16", "kivi-2", "csr-2b", "csr-1b"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the default model)")
    p.add_argument("--dict", help="dictionary folder (default: the default dictionary)")
    p.add_argument("--texts", default="eval-squad,eval-essays", help="held-out corpora")
    p.add_argument("--windows", type=int, default=4, help="2048-token windows per text")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--guard", type=int, default=128, help="dense recent window W")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--ruler-task", default="niah_single_1")
    p.add_argument("--ruler-lengths", default="1024,2048,4096")
    p.add_argument("--ruler-samples", type=int, default=20)
    p.add_argument("--ruler-methods", default=",".join(DEFAULT_RULER_METHODS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csr_vllm.cli import model_dir_or_default
    from csr_vllm.defaults import default_dictionary

    model_dir = model_dir_or_default(args.model)
    dict_dir = Path(args.dict) if args.dict else default_dictionary(model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "quality.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results.setdefault("perplexity", {})
    results.setdefault("ruler", {})
    results["settings"] = {"model": model_dir.name, "dictionary": str(dict_dir),
                           "guard": args.guard, "window": args.window, "windows": args.windows}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = ModelShape.from_hf_config(model.config)

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1))

    # Entries as they were before this run: a preset redefined as an option (csr-2b taking
    # over csr-2b+coef=log5) must not hide its old entry from the option that now names it.
    before = dict(results["perplexity"])
    for text_name in args.texts.split(","):
        text = corpus_file(text_name).read_text()
        for name in args.methods.split(","):
            key = f"{text_name}|{name}|W{args.guard}|{args.windows}x{args.window}"
            method = make_method(name, dict_dir, shape)
            # A cached number is reused only for the same setting (a preset may change), under
            # whichever name it was measured (a preset may take over a measured option).
            if results["perplexity"].get(key, {}).get("setting") == method.setting:
                continue
            twin = same_setting(before, key, method.setting) or \
                same_setting(results["perplexity"], key, method.setting)
            if twin is not None:
                results["perplexity"][key] = dict(twin)
                save()
                continue
            r = perplexity(model, tokenizer, text, method, args.guard, args.window, args.windows)
            results["perplexity"][key] = r.to_dict() | {"text": text_name,
                                                        "setting": method.setting}
            save()

    if args.ruler_samples > 0:
        from csr_vllm.evaluation.ruler import run_ruler

        methods = {m: make_method(m, dict_dir, shape) for m in args.ruler_methods.split(",")}
        run_ruler(model_dir, args.ruler_task, [int(x) for x in args.ruler_lengths.split(",")],
                  args.ruler_samples, methods, args.guard, model=model, tokenizer=tokenizer,
                  results=results["ruler"].setdefault(f"{args.ruler_task}|W{args.guard}", {}),
                  on_result=save)
    save()
    table = markdown(results, args)
    (out / "quality.md").write_text(table)
    plot(results, args, out / "quality_ppl_vs_bits.png")
    print(table)


def same_setting(entries: dict, key: str, setting: str) -> dict | None:
    """The perplexity entry of another method with ``setting`` on the same text, Guard and
    windows as ``key`` (``text|method|W|windows``), or None."""
    text, _, guard, size = key.split("|")
    for other, entry in entries.items():
        t, _, g, sz = other.split("|")
        if (t, g, sz) == (text, guard, size) and entry.get("setting") == setting:
            return entry
    return None


def _ppl_rows(results: dict, args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    rows: dict[str, dict[str, dict]] = {}
    for key, r in results["perplexity"].items():
        text, name, guard, size = key.split("|")
        if guard == f"W{args.guard}" and size == f"{args.windows}x{args.window}":
            rows.setdefault(name, {})[text] = r
    return rows


def markdown(results: dict, args: argparse.Namespace) -> str:
    rows = _ppl_rows(results, args)
    texts = args.texts.split(",")
    base = rows.get("bf16", {})
    head = "| method | bits/channel | " + " | ".join(
        f"ppl {t} | Δ {t}" for t in texts) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(texts))]
    for name in args.methods.split(","):
        if name not in rows:
            continue
        cells = [name, f"{next(iter(rows[name].values()))['bits_per_channel']:.3f}"]
        for t in texts:
            r, b = rows[name].get(t), base.get(t)
            cells += [f"{r['perplexity']:.3f}" if r else "-",
                      f"{100 * (r['perplexity'] / b['perplexity'] - 1):+.2f}%" if r and b else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    ruler = results.get("ruler", {}).get(f"{args.ruler_task}|W{args.guard}", {})
    if ruler:
        lengths = sorted({int(length) for name, m in ruler.items()
                          if name in args.ruler_methods.split(",") for length in m})
        lines += ["", f"RULER `{args.ruler_task}` accuracy (same trials for every method):", "",
                  "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                  "|" + "---|" * (1 + len(lengths))]
        for name in [n for n in args.ruler_methods.split(",") if n in ruler]:
            per = ruler[name]
            cells = [name] + [_ruler_cell(per.get(str(n))) for n in lengths]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Guard window W={args.guard}; {args.windows} windows of {args.window} tokens "
              "per text; Δ is relative to bf16 on the same windows."]
    return "\n".join(lines) + "\n"


def _ruler_cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    cell = f"{entry['correct']}/{entry['trials']}"
    return cell + " (partial)" if entry.get("complete") is False else cell


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ppl_rows(results, args)
    texts = args.texts.split(",")
    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4), squeeze=False)
    for ax, t in zip(axes[0], texts, strict=True):
        base = rows.get("bf16", {}).get(t)
        if not base:
            continue
        families = (("CSR", "tab:blue", "o", lambda n: n.startswith("csr")),
                    ("KIVI", "tab:orange", "s", lambda n: n.startswith("kivi")),
                    ("int per-token-head", "tab:green", "^", lambda n: n.startswith("int")))
        for label, color, marker, member in families:
            pts = sorted((r[t]["bits_per_channel"], 100 * (r[t]["perplexity"] / base["perplexity"] - 1), n)
                         for n, r in rows.items() if member(n) and "+" not in n and t in r)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                    label=label)
            for x, y, n in pts:
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("all-in bits per channel")
        ax.set_ylabel("perplexity increase over bf16 (%)")
        ax.set_title(f"{results['settings']['model']} on {t} (W={args.guard})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
