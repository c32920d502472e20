"""The CUDA backend's wiring, on CPU (no GPU here: its forward paths are not run; see the
module docstring of csr_vllm/engine/cuda_backend.py for what is unverified)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.codec.identity import identity_dictionary
from csr_vllm.engine.settings import CSRSettings

SHAPE = ModelShape("LlamaForCausalLM", 2, 2, 16, 10000.0)


def _dicts(coef="fp8", per_head=False):
    cfg = CodecConfig(key=TensorCodecConfig(64, 1, 3, coef), value=TensorCodecConfig(64, 1, 2, coef),
                      per_head=per_head)
    heads = SHAPE.num_kv_heads if per_head else 1
    atoms = torch.nn.functional.normalize(torch.randn(2, heads, 1, 64, 16), dim=-1)
    ladder = torch.ones(2, heads, 1, 4, 4).tril()
    return DictionarySet(cfg, SHAPE, atoms, atoms.clone(), {}, key_ladder=ladder,
                         value_ladder=ladder.clone())


def test_backend_is_a_triton_backend_with_csr_pages():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from csr_vllm.engine.cuda_backend import CSRCudaBackend, CSRCudaImpl, CSRCudaMetadataBuilder

    dicts = _dicts()
    CSRCudaBackend.configure(dicts, CSRSettings())
    assert issubclass(CSRCudaBackend, TritonAttentionBackend)
    assert CSRCudaBackend.get_name() == "TRITON_ATTN"  # an existing enum member (pickling)
    assert CSRCudaBackend.get_impl_cls() is CSRCudaImpl
    assert CSRCudaBackend.get_builder_cls() is CSRCudaMetadataBuilder
    assert CSRCudaMetadataBuilder._cudagraph_support == AttentionCGSupport.NEVER
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
    csr = CSRCudaBackend.customize_spec(spec)
    slot = dicts.config.slot_bytes()
    assert csr.dtype == torch.uint8 and csr.state_content_bytes == slot
    assert csr.page_size_bytes == 2 * 16 * slot
    assert CSRCudaBackend.customize_spec(csr) is csr  # idempotent


@pytest.mark.parametrize("make, settings, match", [
    (lambda: _dicts(per_head=True), CSRSettings(), "per-head"),
    (lambda: _dicts(coef="int5"), CSRSettings(), "coefficient formats"),
    (_dicts, CSRSettings(outlier_threshold=0.3), "outlier Guard"),
    (_dicts, CSRSettings(dense_layers=(0,)), "dense layers"),
])
def test_backend_refuses_what_the_kernels_do_not_implement(make, settings, match):
    from csr_vllm.engine.cuda_backend import CSRCudaBackend

    with pytest.raises(NotImplementedError, match=match):
        CSRCudaBackend.configure(make(), settings)


def test_identity_dictionary_is_accepted():
    from csr_vllm.engine.cuda_backend import CSRCudaBackend

    CSRCudaBackend.configure(identity_dictionary(SHAPE), CSRSettings())


def test_ladder_formats_are_accepted_with_their_tables():
    """logB codes (csr-2b's format) run on the kernels, each layer with its ladder table."""
    from csr_vllm.engine.cuda_backend import CSRCudaBackend, DeviceState

    dicts = _dicts(coef="log5")
    CSRCudaBackend.configure(dicts, CSRSettings())
    st = DeviceState(dicts, torch.device("cpu"), 32, 16, torch.float32, 4)
    assert len(st.key_ladders) == SHAPE.num_layers
    assert st.key_ladders[1].shape == (1, 3, 16) and st.value_ladders[0].shape == (1, 2, 16)
    assert st.key_ladders[0][0, 2, 0] == 1.0 and st.key_ladders[0][0, 2, 15] == 2.0 ** -6
    assert DeviceState(_dicts(), torch.device("cpu"), 32, 16, torch.float32, 4).key_ladders \
        == [None, None]


def test_metadata_positions_and_decode_split():
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    from csr_vllm.engine.cuda_backend import csr_metadata

    base = TritonAttentionMetadata(**{f.name: None for f in dataclasses.fields(
        TritonAttentionMetadata) if f.default is dataclasses.MISSING and
        f.default_factory is dataclasses.MISSING})
    common = types.SimpleNamespace(query_start_loc_cpu=torch.tensor([0, 1, 2, 5, 9]),
                                   seq_lens=torch.tensor([7, 3, 5, 20]))
    meta = csr_metadata(base, common)
    assert meta.csr_num_decodes == 2
    assert meta.csr_positions.tolist() == [6, 2, 2, 3, 4, 16, 17, 18, 19]
