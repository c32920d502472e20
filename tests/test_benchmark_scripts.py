"""The benchmark scripts run: a tiny smoke run of each one that has no test of its own
elsewhere, so a change to the engine's internals cannot silently break a benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_read_paths_benchmark_runs(tmp_path, test_dict):
    """benchmarks/read_paths.py at one short context (it crashed once after the runtime's
    codecs became a per-layer dict)."""
    pytest.importorskip("vllm")
    out = subprocess.run([sys.executable, "benchmarks/read_paths.py", "--dict", test_dict,
                          "--contexts", "256", "--batches", "2", "--repeats", "1",
                          "--layers", "2", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads((tmp_path / "read_paths.json").read_text())["rows"][0]
    assert row["context"] == 256 and row["batch"] == 2 and row["dense_ms"] > 0
    assert row["layers"] == 2
    for kernels in ("native", "reference"):  # both kernels, both read paths, the write
        for part in ("sparse", "reconstruct", "write"):
            assert row[f"{kernels}_{part}_ms"] > 0


def test_capacity_benchmark_refuses_a_run_without_bf16(tmp_path, test_dict):
    """Every capacity figure is a ratio to bf16 of the same run: a run without it used to
    measure every method (minutes) and then fail with a StopIteration, keeping nothing."""
    out = subprocess.run([sys.executable, "benchmarks/capacity.py", "--dict", test_dict,
                          "--methods", "csr-2b", "--speed-methods", "csr-2b",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "must include bf16" in out.stderr
    assert "[capacity] csr-2b" not in out.stdout  # refused before any engine started


def test_kernel_benchmark_presets_match_the_codec():
    """benchmarks/kernels/bench_kernels.py spells the presets out (it runs without the codec
    package): they must say what csr_vllm.codec.config.PRESETS says."""
    import importlib.util

    from csr_vllm.codec.config import PRESETS

    spec = importlib.util.spec_from_file_location(
        "bench_kernels", ROOT / "benchmarks" / "kernels" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, p in PRESETS.items():
        assert p.key_coef == p.value_coef
        assert mod.PRESETS[name] == (p.budget_bits, p.key_coef)
        for d in (64, 128, 256):  # csr-1b splits unevenly at 64, csr-1.5b at 128
            cfg = p.config_for(d)
            assert mod.split_atoms(p.budget_bits, d, p.num_atoms, cfg.key.coef_format.bits) == \
                (cfg.key.atoms_per_chunk, cfg.value.atoms_per_chunk), (name, d)
    assert set(mod.PRESETS) == set(PRESETS)


@pytest.mark.heavy  # RULER's generator and an engine (~57 s); read_paths above stays
def test_ruler_engine_benchmark_runs_and_reuses_its_results(tmp_path, test_dict):
    """benchmarks/ruler_engine.py with one trial through a real CSR engine; a second run with
    the same setting reuses the stored result instead of starting an engine."""
    pytest.importorskip("vllm")
    cmd = [sys.executable, "benchmarks/ruler_engine.py", "--dict", test_dict,
           "--methods", "csr-2b", "--lengths", "1024", "--samples", "1", "--out", str(tmp_path)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    entry = json.loads((tmp_path / "ruler_engine.json").read_text())["results"]["csr-2b"]["1024"]
    assert entry["trials"] == 1 and len(entry["predictions"]) == 1
    assert entry["preemptions"] == 0  # this length's own count (the engine's is cumulative)
    assert entry["setting"]["csr"].startswith("K ") and entry["setting"]["dictionary_sha256"]
    assert "| csr-2b | " in (tmp_path / "ruler_engine.md").read_text()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "[ruler-engine]" not in again.stdout, again.stderr[-3000:]


@pytest.mark.slow
def test_layer_sensitivity_benchmark_runs(tmp_path, test_dict):
    """benchmarks/layer_sensitivity.py on the default model, one short window: a row per layer
    with finite errors, and the coded layers' outputs not exact (the comparison is real)."""
    out = subprocess.run([sys.executable, "benchmarks/layer_sensitivity.py", "--dict", test_dict,
                          "--tokens", "96", "--queries", "8", "--guard", "16",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "layer_sensitivity_csr-2b.json").read_text())["layers"]
    assert [r["layer"] for r in rows] == list(range(30))
    assert all(0 < r["out_rel_error_keys_coded"] < 2 and r["key_rel_error"] > 0 for r in rows)


@pytest.mark.heavy  # two engines (~60 s)
def test_engine_agreement_benchmark_runs(tmp_path, test_dict):
    """benchmarks/engine_agreement.py: bf16 and csr-2b with every layer dense, one prompt;
    all layers exact through the engine continue exactly as bf16 does."""
    pytest.importorskip("vllm")
    dense = "/".join(map(str, range(30)))
    out = subprocess.run([sys.executable, "benchmarks/engine_agreement.py", "--dict", test_dict,
                          "--methods", f"bf16,csr-2b+dense={dense}", "--prompts", "1",
                          "--prompt-tokens", "300", "--max-tokens", "8", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"| csr-2b+dense={dense} | 100.0% | 1/1 |" in out.stdout
    assert "| bf16 | 100.0% | 1/1 |" in out.stdout
