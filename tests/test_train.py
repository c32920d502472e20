"""Dictionary training end to end on the real model (tiny settings)."""

from __future__ import annotations

import json

import pytest
import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.dict_training.train import TrainConfig, train_dictionaries
from csr_vllm.evaluation.methods import make_method
from csr_vllm.evaluation.perplexity import perplexity

pytestmark = pytest.mark.slow


def tiny_config(**kw) -> TrainConfig:
    t = TensorCodecConfig(num_atoms=64, chunks=1, atoms_per_chunk=2, coef="fp8")
    v = TensorCodecConfig(num_atoms=64, chunks=2, atoms_per_chunk=1, coef="fp8")
    base = dict(codec=CodecConfig(key=t, value=v, layer_group=10), window=256, train_windows=1,
                holdout_windows=1, max_vectors=4096, kmeans_iters=2, neuraldict_steps=4,
                neuraldict_batch=256)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dict")
    return out, train_dictionaries(model_dir, out, tiny_config(), progress=False)


def test_training_writes_a_valid_dictionary(trained, model):
    out, dicts = trained
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "dictionary.safetensors", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    shape = ModelShape.from_hf_config(model.config)
    assert manifest["model"]["num_layers"] == shape.num_layers
    assert manifest["model"]["head_dim"] == shape.head_dim
    assert manifest["codec"]["value"]["chunks"] == 2
    assert manifest["info"]["training"]["corpus"] == "train-hotpotqa"
    assert "key_neuraldict_gain" in manifest["info"]["summary"]
    loaded = DictionarySet.load(out, expect=shape)
    assert torch.equal(loaded.key_atoms, dicts.key_atoms)
    assert loaded.key_atoms.shape == (3, 1, 1, 64, 64)  # 30 layers in groups of 10
    assert loaded.value_atoms.shape == (3, 1, 2, 64, 32)


def test_training_resumes_without_redoing_units(trained, model_dir):
    out, _ = trained
    partial = out / "partial"
    before = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}
    (partial / "value_g2_h0_c1.safetensors").unlink()
    train_dictionaries(model_dir, out, tiny_config(), progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}
    assert after.keys() == before.keys()
    redone = [k for k in before if after[k] != before[k]]
    assert redone == ["value_g2_h0_c1.safetensors"]


def test_training_calibrates_ladders_and_adds_them_to_units_trained_before_them(trained,
                                                                                model_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from csr_vllm.codec.coefficients import ladder_positions

    out, dicts = trained
    assert dicts.has_ladders
    assert dicts.key_ladder.shape == (3, 1, 1, ladder_positions(64), ladder_positions(64))
    assert dicts.value_ladder.shape == (3, 1, 2, 8, 8)  # chunks of 32 channels
    assert bool((dicts.key_ladder.diagonal(dim1=-2, dim2=-1) > 0).all())
    # A unit file from before ladders existed: the next run adds its ladder, atoms untouched.
    path = out / "partial" / "key_g1_h0_c0.safetensors"
    unit = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file({"atoms": unit["atoms"]}, path, metadata=meta)
    again = train_dictionaries(model_dir, out, tiny_config(), progress=False)
    assert torch.equal(load_file(path)["atoms"], unit["atoms"])
    assert torch.equal(load_file(path)["ladder"], unit["ladder"])  # the same seeded subsample
    assert torch.equal(again.key_ladder, dicts.key_ladder)


def test_resume_with_other_settings_is_refused(trained, model_dir):
    out, _ = trained
    with pytest.raises(ValueError, match="other settings"):
        train_dictionaries(model_dir, out, tiny_config(seed=1), progress=False)


def test_trained_dictionary_runs_in_the_harness(trained, model, tokenizer, eval_text):
    out, _ = trained
    shape = ModelShape.from_hf_config(model.config)
    csr = make_method("csr", out, shape)
    exact = perplexity(model, tokenizer, eval_text, make_method("exact"), 16, 256, 1, False)
    got = perplexity(model, tokenizer, eval_text, csr, 16, 256, 1, False)
    assert exact.perplexity < got.perplexity < 3 * exact.perplexity


def test_unit_seeds_are_stable_across_processes():
    """Regression: seeds came from hash(), which Python salts per process."""
    import subprocess
    import sys

    code = ("from csr_vllm.dict_training.train import Unit, unit_seed;"
            "print(unit_seed(Unit('key', 3, 0, 0), 0))")
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONHASHSEED": str(s)}, check=True).stdout
             for s in (1, 2)}
    assert len(seeds) == 1


def test_training_on_a_user_text_file(model_dir, tmp_path, eval_text):
    """``--corpus FILE``: the user's own text; the manifest says which file it was."""
    text = tmp_path / "traffic.txt"
    text.write_text(eval_text[:40_000], encoding="utf-8")
    out = tmp_path / "dict"
    train_dictionaries(model_dir, out, tiny_config(corpus=str(text)), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["training"]["corpus"] == str(text)


def test_training_text_refuses_what_is_not_a_corpus(tmp_path):
    from csr_vllm.data.corpora import training_text

    with pytest.raises(ValueError, match="neither a corpus name .*train-hotpotqa"):
        training_text("wikitext-103")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x9F]) * 64)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        training_text(str(binary))
