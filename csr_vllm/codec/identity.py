"""A lossless dictionary: the standard basis, every channel its own atom.

With S = D atoms per vector, fp16 coefficients and matching pursuit, a bf16 vector is coded
exactly (MP over an orthonormal basis peels one coordinate per step, and every bf16 value in
fp16 range is an fp16 value). It costs more than dense bf16, so it is only for checking that
the engine around the codec is exact: outputs must equal stock vLLM's.
"""

from __future__ import annotations

import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape


def identity_dictionary(shape: ModelShape, key_rope: str = "post") -> DictionarySet:
    """The lossless dictionary set for a model of ``shape``."""
    d = shape.head_dim
    tcfg = TensorCodecConfig(num_atoms=d, chunks=1, atoms_per_chunk=d, coef="fp16", pursuit="mp")
    config = CodecConfig(key=tcfg, value=tcfg, key_rope=key_rope, layer_group=shape.num_layers)
    eye = torch.eye(d).expand(1, 1, 1, d, d).contiguous()
    return DictionarySet(config, shape, eye, eye.clone(), {"kind": "identity (lossless)"})
