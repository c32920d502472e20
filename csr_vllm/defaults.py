"""The embedded default: SmolLM2-135M-Instruct and its default dictionary, built on first use."""

from __future__ import annotations

from pathlib import Path

from csr_vllm.codec.config import get_preset
from csr_vllm.codec.dictionary import DictionaryError, DictionarySet, ModelShape
from csr_vllm.paths import cache_root

DEFAULT_DICT_NAME = "default-8192-pre"
TRAINING_PRESET = "csr-1b"


def default_train_config(head_dim: int):
    """Training settings of the default dictionary (fits the 15-minute, 2-core budget)."""
    from csr_vllm.dict_training.train import TrainConfig

    # Trained through csr-1b's pursuit (3 atoms a vector): the most demanding preset, and a
    # cheaper NeuralDict step than csr-2b's 6 atoms. The atoms serve every preset.
    return TrainConfig(codec=get_preset(TRAINING_PRESET).config_for(head_dim),
                       preset=TRAINING_PRESET)


def default_dictionary(model_dir: Path, cache_dir: Path | None = None,
                       progress: bool = True) -> Path:
    """Folder of the default dictionary for ``model_dir``; trains it once if absent or invalid."""
    from transformers import AutoConfig

    from csr_vllm.dict_training.train import train_dictionaries

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    out = (cache_dir or cache_root()) / "dicts" / Path(model_dir).name / DEFAULT_DICT_NAME
    try:
        DictionarySet.load(out, expect=shape)
        return out
    except DictionaryError:
        pass
    train_dictionaries(model_dir, out, default_train_config(shape.head_dim), progress=progress)
    return out
