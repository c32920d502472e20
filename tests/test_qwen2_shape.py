"""A head_dim-128 Qwen2 model (GQA, Q/K/V biases, RoPE base 1e6) through csr-vllm's model-facing
code: its shape, the K/V the trainer collects from it, and the dictionary check at engine start.

The model is a tiny random Qwen2 built here (2 layers, 4 query heads over 2 KV heads of 128
channels) so the suite needs no download; Qwen2.5-Coder-1.5B itself is in the heavy tests.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csr_vllm import plugin
from csr_vllm.cli import main
from csr_vllm.codec.dictionary import DictionaryError, ModelShape
from csr_vllm.codec.identity import identity_dictionary
from csr_vllm.dict_training.collect import collect_kv
from csr_vllm.engine.settings import CSRSettings

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, THETA = 2, 4, 2, 128, 1e6
SHAPE = ModelShape("Qwen2ForCausalLM", LAYERS, KV_HEADS, HEAD_DIM, THETA)
# The default model's shape: its dictionaries are what a user might point a Qwen server at.
SMOLLM2_SHAPE = ModelShape("LlamaForCausalLM", 30, 3, 64, 100000.0, "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Folder of a random Qwen2ForCausalLM with Qwen2.5's attention geometry, saved as HF."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=Q_HEADS * HEAD_DIM, intermediate_size=64,
                      num_hidden_layers=LAYERS, num_attention_heads=Q_HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": THETA})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    return out


def test_shape_of_a_qwen2_model(tiny_qwen2):
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_qwen2))
    assert dataclasses.replace(shape, name="") == SHAPE  # head_dim = hidden / query heads


def test_collected_kv_is_the_models_own_cache(tiny_qwen2):
    """The trainer's hooks (k_proj / v_proj outputs, biases included) and its RoPE at base 1e6
    and head_dim 128 give the keys and values transformers itself caches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.k_proj.bias.abs().max() > 0.1
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    sample = collect_kv(model, [ids], key_rope="post", progress=False)
    with torch.inference_mode():
        cache = model(ids[None], use_cache=True).past_key_values
    assert sample.keys.shape == (LAYERS, 300, KV_HEADS, HEAD_DIM)
    for i, layer in enumerate(cache.layers):
        want_k, want_v = (t[0].transpose(0, 1) for t in (layer.keys, layer.values))  # [T, H, D]
        torch.testing.assert_close(sample.keys[i].float(), want_k, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(sample.values[i].float(), want_v, atol=2e-2, rtol=1e-2)


def _hf_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


@pytest.mark.parametrize(("made_for", "named"), [
    (dataclasses.replace(SHAPE, head_dim=64), ["head_dim: dictionary has 64, model has 128"]),
    (dataclasses.replace(SHAPE, num_layers=28), ["num_layers: dictionary has 28, model has 2"]),
    (SMOLLM2_SHAPE, ["architecture: dictionary has 'LlamaForCausalLM', model has "
                     "'Qwen2ForCausalLM'", "num_layers: dictionary has 30", "num_kv_heads: "
                     "dictionary has 3, model has 2", "head_dim: dictionary has 64"]),
], ids=["head_dim", "layers", "smollm2"])
def test_engine_start_refuses_a_dictionary_for_another_shape(tiny_qwen2, tmp_path, made_for,
                                                             named):
    identity_dictionary(made_for).save(tmp_path / "d")
    settings = CSRSettings(dictionary=str(tmp_path / "d"), preset=None)
    with pytest.raises(DictionaryError, match="made for another model") as err:
        plugin.load_dictionaries(settings, _hf_config(tiny_qwen2), str(tiny_qwen2))
    for text in named:
        assert text in str(err.value)


def test_engine_start_takes_a_dictionary_of_the_models_shape(tiny_qwen2, tmp_path):
    identity_dictionary(dataclasses.replace(SHAPE, name="tiny")).save(tmp_path / "d")
    settings = CSRSettings(dictionary=str(tmp_path / "d"), preset=None)
    dicts = plugin.load_dictionaries(settings, _hf_config(tiny_qwen2), str(tiny_qwen2))
    assert dicts.shape.head_dim == HEAD_DIM and dicts.key_atoms.shape[-1] == HEAD_DIM


def test_serve_stops_with_one_line_for_a_misfit_dictionary(tiny_qwen2, tmp_path, capsys):
    identity_dictionary(SMOLLM2_SHAPE).save(tmp_path / "d")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tiny_qwen2), "--dict", str(tmp_path / "d"), "--dry-run"])
    message = str(exit_.value.code)
    assert message.startswith("error: dictionary") and "head_dim: dictionary has 64, model " \
        "has 128" in message and "\n" not in message
