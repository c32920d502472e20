"""The benchmark scripts run: a tiny smoke run of each one that has no test of its own
elsewhere, so a change to the engine's internals cannot silently break a benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_read_paths_benchmark_runs(tmp_path, default_dict):
    """benchmarks/read_paths.py at one short context (it crashed once after the runtime's
    codecs became a per-layer dict)."""
    pytest.importorskip("vllm")
    out = subprocess.run([sys.executable, "benchmarks/read_paths.py", "--dict", default_dict,
                          "--contexts", "256", "--batch", "2", "--repeats", "1",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "read_paths.json").read_text())["rows"]
    assert rows[0]["context"] == 256 and rows[0]["reconstruct_ms"] > 0 and rows[0]["sparse_ms"] > 0
