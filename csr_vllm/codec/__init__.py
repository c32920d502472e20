"""The CSR codec: dictionaries, sparse pursuit, coefficient formats and packed slots."""

from csr_vllm.codec.codec import SparseCode, TensorCodec
from csr_vllm.codec.config import PRESETS, CodecConfig, Preset, TensorCodecConfig, get_preset
from csr_vllm.codec.dictionary import DictionaryError, DictionarySet, ModelShape

__all__ = [
    "PRESETS",
    "CodecConfig",
    "DictionaryError",
    "DictionarySet",
    "ModelShape",
    "Preset",
    "SparseCode",
    "TensorCodec",
    "TensorCodecConfig",
    "get_preset",
]
