"""The embedded default: SmolLM2-135M-Instruct and its default dictionary, built on first use."""

from __future__ import annotations

from pathlib import Path

from csr_vllm.codec.config import Preset
from csr_vllm.codec.dictionary import DictionaryError, DictionarySet, ModelShape
from csr_vllm.paths import cache_root

DEFAULT_DICT_NAME = "default-8192-pre"
TRAINING_RECIPE = Preset("csr-1b", 1.0)


def default_train_config(head_dim: int):
    """Training settings of the default dictionary (fits the 15-minute, 2-core budget)."""
    from csr_vllm.dict_training.train import TrainConfig

    # Trained through a 1-bit pursuit (3 atoms a vector, fp8): the most demanding budget, and a
    # cheaper NeuralDict step than 6 atoms. The atoms serve every preset. Spelled out rather
    # than looked up, so the recipe (and the cached atoms) stay the same if csr-1b changes.
    return TrainConfig(codec=TRAINING_RECIPE.config_for(head_dim), preset=TRAINING_RECIPE.name)


def default_dictionary(model_dir: Path, cache_dir: Path | None = None,
                       progress: bool = True) -> Path:
    """Folder of the default dictionary for ``model_dir``; trains it once if absent or invalid."""
    from transformers import AutoConfig

    from csr_vllm.dict_training.train import train_dictionaries

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(model_dir))
    out = (cache_dir or cache_root()) / "dicts" / Path(model_dir).name / DEFAULT_DICT_NAME
    try:
        # A dictionary cached before ladder tops existed cannot serve the log5 presets: the
        # training run resumes and only calibrates them (its units keep their atoms).
        if DictionarySet.load(out, expect=shape).has_ladders:
            return out
    except DictionaryError:
        pass
    train_dictionaries(model_dir, out, default_train_config(shape.head_dim), progress=progress)
    return out
