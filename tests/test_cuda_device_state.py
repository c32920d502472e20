"""The CUDA backend's device state belongs to its engine (built on CPU here: no GPU).

:meth:`DeviceState.get` once kept the first engine's state in a class variable and ignored
later arguments, so a second engine in the same process decoded with the first one's
dictionaries.
"""

from __future__ import annotations

import gc
import weakref

import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape

SHAPE = ModelShape("LlamaForCausalLM", 2, 2, 16, 10000.0)
CPU = torch.device("cpu")


def _dicts(seed: int) -> DictionarySet:
    tcfg = TensorCodecConfig(64, 1, 3, "fp8")
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(2, 2, 1, 1, 64, 16, generator=gen), dim=-1)
    return DictionarySet(CodecConfig(key=tcfg, value=tcfg), SHAPE, atoms[0], atoms[1])


def _get(dicts: DictionarySet, max_model_len: int = 32):
    from csr_vllm.engine.cuda_backend import DeviceState

    return DeviceState.get(dicts, CPU, max_model_len, 16, torch.float32, 4)


def test_layers_of_one_engine_share_one_state():
    dicts = _dicts(0)
    first = _get(dicts)
    assert _get(dicts) is first  # built once: the dictionaries are copied to the device once


def test_a_second_engine_gets_its_own_dictionaries_and_sizes():
    one, two = _dicts(1), _dicts(2)
    a = _get(one)
    b = _get(two, max_model_len=64)
    assert b is not a
    for layer in range(SHAPE.num_layers):
        assert torch.equal(b.key_atoms[layer], two.codec("key", layer, 0).atoms)
        assert torch.equal(b.value_atoms[layer], two.codec("value", layer, 0).atoms)
        assert not torch.equal(b.key_atoms[layer], a.key_atoms[layer])
    assert b.scratch_k.shape[0] == 64 // 16 and a.scratch_k.shape[0] == 32 // 16
    assert _get(one) is a  # the first engine keeps its own


def test_the_state_goes_with_the_engine_that_holds_it():
    """No process-wide copy outlives the layers (device memory of a finished engine)."""
    state = weakref.ref(_get(_dicts(3)))
    gc.collect()
    assert state() is None
