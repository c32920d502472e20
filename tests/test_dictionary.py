"""Dictionary folders: save/load, validation against a model, corruption, ``with_codec``."""

import dataclasses
import json
import pickle

import pytest
import torch

from csr_vllm.codec.coefficients import ladder_positions
from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    DictionaryError,
    DictionarySet,
    ModelShape,
)

SHAPE = ModelShape(architecture="LlamaForCausalLM", num_layers=3, num_kv_heads=2, head_dim=8,
                   rope_theta=10000.0, name="tiny-llama")
CONFIG = CodecConfig(
    key=TensorCodecConfig(num_atoms=16, chunks=1, atoms_per_chunk=2, coef="fp8"),
    value=TensorCodecConfig(num_atoms=16, chunks=2, atoms_per_chunk=2, coef="int5"),
    layer_group=2,
    per_head=True,
)


@pytest.fixture
def dictset(unit_atoms):
    # 3 layers in groups of 2 -> 2 groups; per-head -> 2 heads.
    return DictionarySet(CONFIG, SHAPE, unit_atoms(2, 2, 1, 16, 8), unit_atoms(2, 2, 2, 16, 4),
                         info={"corpus": "unit-test", "steps": 3})


@pytest.fixture
def saved(dictset, tmp_path):
    folder = tmp_path / "dict"
    dictset.save(folder)
    return folder


def rewrite_manifest(folder, **changes):
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def test_save_load_roundtrip(dictset, saved):
    loaded = DictionarySet.load(saved, expect=SHAPE)
    assert loaded.config == CONFIG
    assert loaded.shape == SHAPE
    assert loaded.info == dictset.info
    assert torch.equal(loaded.key_atoms, dictset.key_atoms)
    assert torch.equal(loaded.value_atoms, dictset.value_atoms)
    assert loaded.key_atoms.dtype == torch.float32


def test_saved_folder_holds_only_json_and_safetensors(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([MANIFEST_FILE, TENSORS_FILE])
    assert {p.suffix for p in saved.iterdir()} == {".json", ".safetensors"}


def test_load_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dictionary loader must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    DictionarySet.load(saved)


def test_manifest_records_codec_and_slot_accounting(saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["slot_bytes"] == CONFIG.slot_bytes()
    assert manifest["bits_per_channel"] == CONFIG.bits_per_channel(SHAPE.head_dim)
    assert manifest["model"]["name"] == "tiny-llama"
    assert len(manifest["tensors_sha256"]) == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_layers", 4),
        ("head_dim", 16),
        ("num_kv_heads", 4),
        ("architecture", "MistralForCausalLM"),
        ("rope_theta", 500000.0),
    ],
)
def test_load_refuses_another_model(saved, field, value):
    other = dataclasses.replace(SHAPE, **{field: value})
    with pytest.raises(DictionaryError) as err:
        DictionarySet.load(saved, expect=other)
    message = str(err.value)
    assert field in message
    assert repr(getattr(SHAPE, field)) in message
    assert repr(value) in message


def test_load_ignores_model_name(saved):
    DictionarySet.load(saved, expect=dataclasses.replace(SHAPE, name="renamed/checkpoint"))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_corrupt_tensor_file_is_refused(saved, where):
    path = saved / TENSORS_FILE
    data = bytearray(path.read_bytes())
    pos = {"start": 3, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DictionaryError, match="corrupt"):
        DictionarySet.load(saved)


def test_truncated_tensor_file_is_refused(saved):
    path = saved / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(DictionaryError, match="corrupt"):
        DictionarySet.load(saved)


@pytest.mark.parametrize("missing", [MANIFEST_FILE, TENSORS_FILE])
def test_missing_file_is_named(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(DictionaryError, match=missing.replace(".", r"\.")):
        DictionarySet.load(saved)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DictionaryError, match=MANIFEST_FILE.replace(".", r"\.")):
        DictionarySet.load(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", "", '{"format_version": 1,'])
def test_invalid_json_manifest_is_refused(saved, text):
    (saved / MANIFEST_FILE).write_text(text)
    with pytest.raises(DictionaryError, match="not valid JSON"):
        DictionarySet.load(saved)


@pytest.mark.parametrize("text", ["[]", "1", "null", '"manifest"'])
def test_manifest_that_is_not_an_object_is_refused(saved, text):
    (saved / MANIFEST_FILE).write_text(text)
    with pytest.raises(DictionaryError):
        DictionarySet.load(saved)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_wrong_format_version_is_refused(saved, version):
    if version is None:
        rewrite_manifest(saved, format_version=None)
    else:
        rewrite_manifest(saved, format_version=version)
    with pytest.raises(DictionaryError, match="format_version"):
        DictionarySet.load(saved)


@pytest.mark.parametrize(
    "change",
    [
        {"model": None},
        {"codec": None},
        {"model": {"architecture": "LlamaForCausalLM"}},
        {"codec": {"key": {"coef": "int9"}, "value": {}, "key_rope": "pre", "layer_group": 1,
                   "per_head": False}},
    ],
    ids=["no-model", "no-codec", "partial-model", "bad-codec"],
)
def test_malformed_manifest_is_refused(saved, change):
    rewrite_manifest(saved, **change)
    with pytest.raises(DictionaryError, match="malformed"):
        DictionarySet.load(saved)


@pytest.mark.parametrize(("field", "value"), [("num_layers", "3"), ("head_dim", None)])
def test_manifest_model_field_of_wrong_type_is_refused(saved, field, value):
    model = json.loads((saved / MANIFEST_FILE).read_text())["model"]
    model[field] = value
    rewrite_manifest(saved, model=model)
    with pytest.raises(DictionaryError):
        DictionarySet.load(saved)


def test_manifest_codec_disagreeing_with_tensor_shapes_is_refused(saved):
    codec = CONFIG.to_dict()
    codec["key"]["num_atoms"] = 32
    rewrite_manifest(saved, codec=codec)
    with pytest.raises(DictionaryError, match="key atoms have shape"):
        DictionarySet.load(saved)


def test_non_unit_norm_atoms_are_refused(dictset, tmp_path):
    scaled = DictionarySet(CONFIG, SHAPE, dictset.key_atoms * 1.1, dictset.value_atoms)
    scaled.save(tmp_path / "scaled")
    with pytest.raises(DictionaryError, match="unit-norm"):
        DictionarySet.load(tmp_path / "scaled")


@pytest.mark.parametrize("kind", ["key", "value"])
def test_wrong_atom_shape_is_refused_on_construction(dictset, kind):
    atoms = {"key_atoms": dictset.key_atoms, "value_atoms": dictset.value_atoms}
    atoms[f"{kind}_atoms"] = atoms[f"{kind}_atoms"][:1]  # one layer group too few
    with pytest.raises(DictionaryError, match=f"{kind} atoms have shape"):
        DictionarySet(CONFIG, SHAPE, **atoms)


def test_codec_picks_layer_group_and_head(dictset):
    codec = dictset.codec("key", layer=2, head=1)
    assert torch.equal(codec.atoms, dictset.key_atoms[1, 1])
    assert codec.config == CONFIG.key
    codec = dictset.codec("value", layer=1, head=0)
    assert torch.equal(codec.atoms, dictset.value_atoms[0, 0])
    assert codec.config == CONFIG.value


def test_with_codec_accepts_other_atoms_per_vector_and_format(dictset):
    other = dataclasses.replace(
        CONFIG,
        key=dataclasses.replace(CONFIG.key, atoms_per_chunk=4, coef="int8", pursuit="mp"),
        value=dataclasses.replace(CONFIG.value, atoms_per_chunk=1, coef="fp16"),
    )
    recoded = dictset.with_codec(other)
    assert recoded.config == other
    assert recoded.key_atoms is dictset.key_atoms
    assert recoded.value_atoms is dictset.value_atoms
    assert recoded.codec("key", 0).config.atoms_per_chunk == 4


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"key": dataclasses.replace(CONFIG.key, num_atoms=32)}, "key atoms"),
        ({"value": dataclasses.replace(CONFIG.value, num_atoms=8)}, "value atoms"),
        ({"key": dataclasses.replace(CONFIG.key, chunks=2)}, "key chunks"),
        ({"value": dataclasses.replace(CONFIG.value, chunks=1)}, "value chunks"),
        ({"key_rope": "post"}, "key_rope"),
        ({"layer_group": 1}, "layer_group"),
        ({"per_head": False}, "per_head"),
    ],
)
def test_with_codec_refuses_a_differently_shaped_setting(dictset, change, named):
    other = dataclasses.replace(CONFIG, **change)
    with pytest.raises(DictionaryError, match=named) as err:
        dictset.with_codec(other)
    if named.endswith("atoms"):
        field = "key" if named.startswith("key") else "value"
        want, got = getattr(CONFIG, field).num_atoms, getattr(other, field).num_atoms
        assert f"dictionary has {want}, requested {got}" in str(err.value)


def test_model_shape_from_hf_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, intermediate_size=32, vocab_size=32,
                      rope_theta=123456.0, architectures=["LlamaForCausalLM"])
    shape = ModelShape.from_hf_config(cfg)
    assert shape.mismatches(dataclasses.replace(SHAPE, head_dim=16, rope_theta=123456.0)) == []
    assert shape.architecture == "LlamaForCausalLM"
    assert shape.head_dim == 16
    assert shape.rope_theta == 123456.0


# -- ladder tops (logB coefficient formats) ----------------------------------------------------
LOG_CONFIG = dataclasses.replace(
    CONFIG, key=dataclasses.replace(CONFIG.key, coef="log5", atoms_per_chunk=2),
    value=dataclasses.replace(CONFIG.value, coef="log3", atoms_per_chunk=1))


def with_ladders(dictset, gen):
    # Key chunks of 8 channels -> 2 calibrated positions; value chunks of 4 -> 1.
    assert (ladder_positions(8), ladder_positions(4)) == (2, 1)
    kl = torch.rand(2, 2, 1, 2, 2, generator=gen).tril() + 0.5 * torch.eye(2)
    vl = torch.rand(2, 2, 2, 1, 1, generator=gen) + 0.5
    return dataclasses.replace(dictset, key_ladder=kl, value_ladder=vl)


def test_ladders_save_load_and_reach_the_codec(dictset, gen, tmp_path):
    d = with_ladders(dictset, gen)
    d.save(tmp_path / "d")
    loaded = DictionarySet.load(tmp_path / "d", expect=SHAPE).with_codec(LOG_CONFIG)
    assert loaded.has_ladders
    assert torch.equal(loaded.key_ladder, d.key_ladder)
    codec = loaded.codec("key", layer=2, head=1)
    # S = 2 key atoms: row S - 1 of group 1, head 1, first 2 positions.
    assert torch.equal(codec.ladder, d.key_ladder[1, 1, :, 1, :2])
    assert torch.equal(loaded.codec("value", 0, 0).ladder, d.value_ladder[0, 0, :, 0, :1])
    x = torch.randn(20, 8, generator=gen)
    assert torch.equal(codec.unpack(codec.pack(codec.encode(x))).coefs, codec.encode(x).coefs)


def test_shard_keeps_the_ladders_of_its_layers_and_heads(dictset, gen):
    d = with_ladders(dictset, gen)
    part = d.shard(layers=(2, 3), heads=(1, 2))
    assert torch.equal(part.key_ladder, d.key_ladder[1:2, 1:2])
    assert torch.equal(part.with_codec(LOG_CONFIG).codec("key", 2, 0).ladder,
                       d.key_ladder[1, 1, :, 1, :2])


def test_log_format_on_a_dictionary_without_ladders_says_how_to_add_them(dictset):
    assert not dictset.has_ladders
    d = dictset.with_codec(LOG_CONFIG)
    with pytest.raises(DictionaryError, match="train-dict"):
        d.codec("key", 0)
    dictset.codec("key", 0)  # fp8 still works without ladders


@pytest.mark.parametrize("bad", ["shape", "negative", "nan", "one-sided"])
def test_malformed_ladders_are_refused(dictset, gen, bad):
    d = with_ladders(dictset, gen)
    kl = {"shape": d.key_ladder[..., :1, :1], "negative": -d.key_ladder,
          "nan": d.key_ladder * float("nan"), "one-sided": d.key_ladder}[bad]
    vl = None if bad == "one-sided" else d.value_ladder
    with pytest.raises(DictionaryError, match="ladder"):
        dataclasses.replace(d, key_ladder=kl, value_ladder=vl)


def test_more_atoms_than_calibrated_positions_is_refused(dictset, gen):
    d = with_ladders(dictset, gen).with_codec(dataclasses.replace(
        LOG_CONFIG, key=dataclasses.replace(LOG_CONFIG.key, atoms_per_chunk=3)))
    with pytest.raises(DictionaryError, match="3 atoms per chunk exceed the 2 positions"):
        d.codec("key", 0)


def test_default_dictionary_without_ladders_is_completed_not_served(tmp_path, monkeypatch,
                                                                    unit_atoms):
    """A default dictionary cached before ladder tops existed cannot serve csr-2b (log5): the
    resumable training run is started to calibrate them; one with ladders is served as is."""
    from transformers import LlamaConfig

    import csr_vllm.dict_training.train as train
    from csr_vllm.defaults import DEFAULT_DICT_NAME, default_dictionary

    model = tmp_path / "tiny-llama"
    LlamaConfig(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                hidden_size=128, intermediate_size=32, vocab_size=64).save_pretrained(model)
    shape = ModelShape.from_hf_config(LlamaConfig.from_pretrained(model))
    out = tmp_path / "cache" / "dicts" / model.name / DEFAULT_DICT_NAME
    cfg = CodecConfig(key=TensorCodecConfig(16, 1, 2, "fp8"), value=TensorCodecConfig(16, 1, 2,
                                                                                      "fp8"))
    atoms = unit_atoms(3, 1, 1, 16, 64)
    DictionarySet(cfg, shape, atoms, atoms.clone()).save(out)
    runs = []
    monkeypatch.setattr(train, "train_dictionaries", lambda *a, **k: runs.append(a[1]))
    assert default_dictionary(model, tmp_path / "cache", progress=False) == out
    assert runs == [out]
    p = ladder_positions(64)
    ladder = torch.ones(3, 1, 1, p, p).tril()
    DictionarySet(cfg, shape, atoms, atoms.clone(), key_ladder=ladder,
                  value_ladder=ladder.clone()).save(out)
    assert default_dictionary(model, tmp_path / "cache", progress=False) == out
    assert runs == [out]
