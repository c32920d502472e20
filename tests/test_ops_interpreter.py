"""Start the kernel tests and the kernel benchmark's smoke mode under Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when kernels (its own standard library included) are
decorated, i.e. when triton is first imported; this process may already have imported it
without the variable (vLLM does), so the interpreted runs get their own processes. They are
started at collection (tests/conftest.py, ``BACKGROUND_RUNS``), so they run while the tests
before these ones do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_tests_pass_under_the_interpreter(background_run):
    out = background_run("interpreted-kernel-tests")
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "failed" not in out.stdout, tail


def test_benchmark_smoke_mode_runs_on_cpu(background_run):
    out = background_run("interpreted-kernel-benchmark")
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] and result["rows"][0]["sparse_ms"] > 0
    assert "interpreter" in result["device"]


def test_benchmark_refuses_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "benchmarks/kernels/bench_kernels.py"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "--interpret" in out.stderr
