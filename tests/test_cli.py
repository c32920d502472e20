"""The csr-vllm command line: bad input stops with a clear message, not a traceback."""

from __future__ import annotations

import pytest

from csr_vllm.cli import build_parser, main


def test_subcommands_are_registered():
    parser = build_parser()
    for cmd in ("fetch-model", "prepare-data", "train-dict", "eval", "ruler", "serve"):
        assert parser.parse_args([cmd] + (["--out", "x"] if cmd == "train-dict" else [])
                                 + (["--text", "t", "--method", "bf16"] if cmd == "eval" else []))


def test_unknown_preset_is_rejected_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        main(["train-dict", "--out", "x", "--preset", "csr-3b"])
    err = capsys.readouterr().err
    assert "csr-3b" in err and "csr-1b" in err and "csr-2b" in err


def test_model_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="not a Hugging Face model folder"):
        main(["eval", "--model", str(tmp_path), "--text", str(tmp_path / "t.txt"),
              "--method", "bf16"])


def test_csr_method_without_dictionary_is_an_error(tmp_path):
    from csr_vllm.evaluation.methods import make_method

    with pytest.raises(ValueError, match="needs --dict"):
        make_method("csr-2b")
