"""The perplexity harness on the real default model (short windows to stay fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.dict_training.collect import token_windows
from csr_vllm.evaluation.methods import CSR, KIVI, KVMethod, PerTokenHead, make_method
from csr_vllm.evaluation.perplexity import perplexity, window_nlls

pytestmark = pytest.mark.slow

WINDOW = 384


@pytest.fixture(scope="module")
def windows(tokenizer, eval_text):
    return token_windows(tokenizer, eval_text, WINDOW, 2)


def test_exact_reproduces_model_perplexity(model, windows):
    stock = window_nlls(model, windows, None, guard=0, progress=False)
    harness = window_nlls(model, windows, make_method("exact"), guard=16, progress=False)
    for (a, n), (b, m) in zip(stock, harness, strict=True):
        assert n == m
        assert math.isclose(a, b, rel_tol=2e-5)


def test_bf16_is_close_to_exact(model, tokenizer, eval_text):
    exact = perplexity(model, tokenizer, eval_text, make_method("exact"), 16, WINDOW, 1, False)
    bf16 = perplexity(model, tokenizer, eval_text, make_method("bf16"), 16, WINDOW, 1, False)
    assert bf16.bits_per_channel == 16
    assert abs(bf16.perplexity / exact.perplexity - 1) < 5e-3


def test_window_covering_everything_is_exact(model, windows):
    """With W >= sequence length no token is read compressed, whatever the method."""
    exact = window_nlls(model, windows[:1], make_method("exact"), WINDOW, progress=False)
    kivi = window_nlls(model, windows[:1], make_method("kivi-2"), WINDOW, progress=False)
    assert math.isclose(exact[0][0], kivi[0][0], rel_tol=1e-6)


def test_compression_outside_the_window_costs_perplexity(model, windows):
    exact = window_nlls(model, windows[:1], make_method("exact"), 16, progress=False)
    kivi = window_nlls(model, windows[:1], make_method("kivi-2"), 16, progress=False)
    assert kivi[0][0] > exact[0][0]


def test_lossless_codec_gives_exact_perplexity(model, tokenizer, eval_text):
    """An orthonormal dictionary with S = D atoms and fp16 coefficients is (nearly) lossless."""
    shape = ModelShape.from_hf_config(model.config)
    d = shape.head_dim
    t = TensorCodecConfig(num_atoms=d, chunks=1, atoms_per_chunk=d, coef="fp16", pursuit="mp")
    cfg = CodecConfig(key=t, value=t, key_rope="pre")
    eye = torch.eye(d).expand(shape.num_layers, 1, 1, d, d).contiguous()
    lossless = CSR(DictionarySet(cfg, shape, eye, eye.clone()), "csr-lossless")
    exact = perplexity(model, tokenizer, eval_text, make_method("exact"), 16, WINDOW, 1, False)
    got = perplexity(model, tokenizer, eval_text, lossless, 16, WINDOW, 1, False)
    assert abs(got.perplexity / exact.perplexity - 1) < 1e-3


@pytest.mark.parametrize(("method", "bits"), [
    (KIVI(2), 3.0), (KIVI(4), 5.0), (PerTokenHead(8), 8.5), (PerTokenHead(4), 4.5)])
def test_peer_bits_per_channel(method, bits):
    assert method.bits_per_channel(64) == bits


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="kivi-2"):
        make_method("kivi-3")


def test_cli_eval_writes_json(model_dir, eval_text_file, tmp_path):
    from csr_vllm.cli import main

    out = tmp_path / "r.json"
    main(["eval", "--model", str(model_dir), "--text", str(eval_text_file), "--method", "int8",
          "--guard", "32", "--window", "256", "--windows", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["method"] == "int8" and r["tokens"] == 255 and r["perplexity"] > 1


class Shrink(KVMethod):
    """A smooth stand-in codec (halves K and V): a wrong window split shows up at once, and
    unlike a quantiser it does not turn GEMM rounding differences into whole steps."""

    name = "shrink"

    def bits_per_channel(self, head_dim):
        return 32.0

    def compress(self, layer, keys, values, positions):
        return 0.5 * keys, 0.5 * values


@pytest.mark.parametrize("sinks", [0, 2])
def test_decode_step_matches_full_forward(model, windows, sinks):
    """Incremental decoding (one query, cached reconstructions) sees what a full pass sees."""
    from csr_vllm.evaluation.attention import guard_window_attention

    ids = windows[0][:96][None]
    with torch.inference_mode(), guard_window_attention(model, Shrink(), 8, sinks) as attn:
        full = model(ids).logits[0, -1]
        attn.reset()
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values).logits[0, -1]
        plain = model(ids).logits[0, -1]  # harness still installed: same as `full`
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, full, rtol=1e-4, atol=1e-4)


def test_sinks_keep_the_first_tokens_exact(model, windows):
    exact = window_nlls(model, windows[:1], make_method("exact"), 16, progress=False)
    kivi = window_nlls(model, windows[:1], make_method("kivi-2"), 16, progress=False)
    kivi_sinks = window_nlls(model, windows[:1], make_method("kivi-2"), 16, False, sinks=4)
    all_sinks = window_nlls(model, windows[:1], make_method("kivi-2"), 16, False, sinks=WINDOW)
    assert kivi_sinks[0][0] != kivi[0][0]
    assert math.isclose(all_sinks[0][0], exact[0][0], rel_tol=1e-6)


def test_outlier_guard_keeps_the_worst_vectors_and_counts_them(model, windows, tokenizer):
    """A Guard that may hold every vector restores exact attention, and its bytes are counted."""
    shape = ModelShape.from_hf_config(model.config)
    d = shape.head_dim
    t = TensorCodecConfig(num_atoms=d, chunks=1, atoms_per_chunk=1, coef="fp8", pursuit="mp")
    eye = torch.eye(d).expand(shape.num_layers, 1, 1, d, d).contiguous()
    dicts = DictionarySet(CodecConfig(key=t, value=t), shape, eye, eye.clone())
    exact = window_nlls(model, windows[:1], make_method("exact"), 8, progress=False)
    lossy = window_nlls(model, windows[:1], CSR(dicts), 8, progress=False)
    everything = CSR(dicts, guard_fraction=1.0)
    guarded = window_nlls(model, windows[:1], everything, 8, progress=False)
    assert lossy[0][0] > exact[0][0]
    assert math.isclose(guarded[0][0], exact[0][0], rel_tol=1e-5)
    assert everything.guard_bits_per_channel(d) == pytest.approx(16 + 32 / d)
    partial = CSR(dicts, guard_fraction=0.05)
    some = window_nlls(model, windows[:1], partial, 8, progress=False)
    assert exact[0][0] < some[0][0] < lossy[0][0]
    assert 0 < partial.guard_bits_per_channel(d) <= 0.05 * (16 + 32 / d) + 1e-9


def test_outlier_guard_method_names(tmp_path):
    from csr_vllm.codec.dictionary import ModelShape
    from csr_vllm.codec.identity import identity_dictionary

    shape = ModelShape("LlamaForCausalLM", 2, 1, 8, 10000.0, "tiny")
    identity_dictionary(shape).save(tmp_path)
    method = make_method("csr+outliers=0.05", tmp_path, shape)
    assert isinstance(method, CSR) and method.guard_fraction == 0.05
    assert make_method("csr", tmp_path, shape).guard_fraction == 0.0
    with pytest.raises(ValueError, match="bad outlier fraction"):
        make_method("csr+outliers=lots", tmp_path, shape)


def test_coefficient_format_options_refit_the_preset_budget(tmp_path):
    """``csr-2b+coef=fp8``: csr-2b's bytes with fp8 coefficients (6 atoms where its log5 fits
    7); ``+vcoef=`` changes the values only; an unknown format is named in the error."""
    from csr_vllm.codec.config import get_preset
    from csr_vllm.codec.dictionary import ModelShape

    shape = ModelShape("LlamaForCausalLM", 1, 1, 64, 10000.0, "tiny")
    cfg = get_preset("csr-2b").config_for(64)
    atoms = torch.nn.functional.normalize(torch.randn(1, 1, 1, 8192, 64), dim=-1)
    ladder = torch.ones(1, 1, 1, 16, 16).tril()
    DictionarySet(cfg, shape, atoms, atoms.clone(), key_ladder=ladder,
                  value_ladder=ladder.clone()).save(tmp_path)
    for name in ("csr-2b", "csr-2b+coef=log5"):
        m = make_method(name, tmp_path, shape)
        k, v = m.dicts.config.key, m.dicts.config.value
        assert (k.coef, k.atoms_per_chunk, v.coef, v.atoms_per_chunk) == ("log5", 7, "log5", 7)
        assert m.bits_per_channel(64) == 2.0
    m = make_method("csr-2b+coef=fp8", tmp_path, shape)
    k, v = m.dicts.config.key, m.dicts.config.value
    assert (k.coef, k.atoms_per_chunk, v.coef, v.atoms_per_chunk) == ("fp8", 6, "fp8", 6)
    assert m.bits_per_channel(64) == 2.0
    m = make_method("csr-1b+coef=fp8+vcoef=log3", tmp_path, shape)
    k, v = m.dicts.config.key, m.dicts.config.value
    assert (k.coef, k.atoms_per_chunk, v.coef, v.atoms_per_chunk) == ("fp8", 3, "log3", 4)
    assert "log3" in m.setting
    # csr-1b's 16 bytes split unevenly: the spare log5 atom to the keys, or to the values.
    for name, atoms in (("csr-1b", (4, 3)), ("csr-1b+spare=value", (3, 4)),
                        ("csr-1b+coef=fp8", (3, 3))):
        c = make_method(name, tmp_path, shape).dicts.config
        assert (c.key.atoms_per_chunk, c.value.atoms_per_chunk) == atoms, name
        assert c.bits_per_channel(64) == 1.0
    with pytest.raises(ValueError, match=r"bad spare atom's tensor"):
        make_method("csr-1b+spare=both", tmp_path, shape)
    with pytest.raises(ValueError, match=r"bad coefficient format .*log3\.\.log6"):
        make_method("csr-2b+coef=log9", tmp_path, shape)


def test_dense_layers_are_exact_and_counted(tmp_path):
    """``+dense=0/2``: those layers' K/V pass exactly, 16 bits per channel each averaged over
    the layers on top of the codes (the engine keeps their code slots too); the default is the
    dictionary's recommendation, ``+dense=`` none."""
    from csr_vllm.codec.config import get_preset

    shape = ModelShape("LlamaForCausalLM", 4, 1, 64, 10000.0, "tiny")
    cfg = get_preset("csr-2b").config_for(64)
    atoms = torch.nn.functional.normalize(torch.randn(4, 1, 1, 8192, 64), dim=-1)
    ladder = torch.ones(4, 1, 1, 16, 16).tril()
    DictionarySet(cfg, shape, atoms, atoms.clone(), {"dense_layers": [3]}, key_ladder=ladder,
                  value_ladder=ladder.clone()).save(tmp_path)
    k, v = torch.randn(2, 1, 40, 64).unbind(0)
    pos = torch.arange(40)
    m = make_method("csr-2b+dense=0/2", tmp_path, shape)
    assert m.dense_layers == {0, 2} and "dense=0/2" in m.setting
    assert m.bits_per_channel(64) == 2.0 + 16 * 2 / 4
    for layer in range(4):
        k_hat, v_hat = m.compress(layer, k, v, pos)
        assert torch.equal(k_hat, k) == torch.equal(v_hat, v) == (layer in (0, 2))
    assert make_method("csr-2b", tmp_path, shape).dense_layers == {3}
    assert make_method("csr-2b+dense=", tmp_path, shape).bits_per_channel(64) == 2.0
    with pytest.raises(ValueError, match=r"bad dense layers"):
        make_method("csr-2b+dense=first", tmp_path, shape)
