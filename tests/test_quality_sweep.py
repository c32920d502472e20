"""The quality sweep's result cache (benchmarks/quality.py): a number is reused only for the
same setting, under whichever name it was measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_same_setting_finds_the_entry_of_another_name_on_the_same_windows():
    q = _quality()
    entries = {
        "eval-squad|csr-2b+coef=log5|W128|2x2048": {"perplexity": 22.2, "setting": "K log5"},
        "eval-squad|csr-2b|W128|2x2048": {"perplexity": 22.3, "setting": "K fp8"},
        "eval-squad|other|W64|2x2048": {"perplexity": 1.0, "setting": "K log5"},
        "eval-essays|other|W128|2x2048": {"perplexity": 2.0, "setting": "K log5"},
    }
    got = q.same_setting(entries, "eval-squad|csr-2b|W128|2x2048", "K log5")
    assert got == {"perplexity": 22.2, "setting": "K log5"}
    assert q.same_setting(entries, "eval-squad|csr-2b|W128|4x2048", "K log5") is None
    assert q.same_setting(entries, "eval-essays|csr-2b|W128|2x2048", "K fp8") is None
