"""One vLLM engine per benchmarked method, each in a process of its own.

vLLM keeps per-process state (its attention backend choice, the KV pool it sized at start), so
a benchmark comparing methods runs itself again with ``--worker METHOD`` for each one; the
worker prints one ``RESULT {json}`` line that the parent reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def resolve_model_and_dict(args: argparse.Namespace) -> None:
    """Fill ``args.model`` / ``args.dict`` with the default model and dictionary if unset."""
    from csr_vllm.cli import model_dir_or_default

    args.model = str(model_dir_or_default(args.model))
    if args.dict is None:
        from csr_vllm.defaults import default_dictionary

        args.dict = str(default_dictionary(Path(args.model)))


def csr_settings(method: str, dict_dir: str) -> dict:
    """The engine's ``csr`` settings for a method name: a preset, optionally with
    ``+dense=0/27`` (dense layers; ``+dense=`` none) and ``+search=256/32`` (a screened
    search) as the harness's names take them."""
    from csr_vllm.evaluation.methods import _csr_options

    preset, options = _csr_options(method)
    unknown = set(options) - {"dense", "search"}
    if unknown:
        raise ValueError(f"the engine benchmarks take +dense= and +search= only, not "
                         f"{sorted(unknown)}")
    out = {"dict": dict_dir, "preset": preset}
    if "dense" in options:
        out["dense_layers"] = list(options["dense"])
    if "search" in options:
        out["search"] = str(options["search"])
    return out


def serve_as_worker(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict]) -> bool:
    """In a worker process (``args.worker`` set): run it, print its RESULT line, return True."""
    if not args.worker:
        return False
    print("RESULT " + json.dumps(run(args)), flush=True)
    return True


def run_worker(script: str, method: str, args: argparse.Namespace, env: dict[str, str],
               extra: tuple[str, ...] = ()) -> dict:
    """Run ``script --worker method`` with this invocation's own arguments, the resolved
    ``--model`` / ``--dict`` (:func:`resolve_model_and_dict`) and ``extra`` (later flags win),
    and return its result; exits with the worker's stderr tail if it failed."""
    argv = [*sys.argv[1:], "--model", args.model, "--dict", args.dict, *extra]
    cmd = [sys.executable, script, *argv, "--worker", method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])
