"""The kernels' PyTorch references (csr_vllm/ops/reference.py) agree with what the CPU backend
does: LayerCodec's bytes and reconstructions, and its sparse-domain decode attention. So a
kernel that matches its reference matches the CPU backend."""

from __future__ import annotations

import pytest
import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.engine.page_layout import LayerCodec
from csr_vllm.ops import reference

H, D, A = 2, 32, 96


def _dicts(rope: str, pursuit: str = "omp", coef: str = "fp8") -> DictionarySet:
    cfg = CodecConfig(key=TensorCodecConfig(A, 1, 3, coef, pursuit),
                      value=TensorCodecConfig(A, 2, 2, coef, pursuit), key_rope=rope)
    shape = ModelShape("LlamaForCausalLM", 1, H, D, 10000.0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, A, D), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(1, 1, 2, A, D // 2), dim=-1)
    return DictionarySet(cfg, shape, k, v, {})


@pytest.mark.parametrize("rope, pursuit, coef", [("pre", "omp", "fp8"), ("post", "mp", "fp16")])
def test_encode_and_decode_references_equal_layer_codec(rope, pursuit, coef):
    dicts = _dicts(rope, pursuit, coef)
    lc = LayerCodec(dicts, 0)
    n, bs = 20, 4
    key, value = torch.randn(n, H, D) * 2, torch.randn(n, H, D)
    pos = torch.randint(0, 3000, (n,))
    slots = torch.randperm(8 * bs)[:n]
    cache = torch.zeros(8, H, bs, lc.layout.slot_bytes, dtype=torch.uint8)
    reference.encode_store_reference(key, value, pos, slots, cache, lc.keys[0], lc.values[0],
                                     rope == "pre", 10000.0)
    codes, k_rec, v_rec = lc.encode(key, value, pos)
    got = cache[slots // bs, :, slots % bs]
    assert torch.equal(got, codes)
    k, v = reference.decode_slots(got, pos, lc.keys[0], lc.values[0], rope == "pre", 10000.0)
    k_lc, v_lc = lc.decode(codes, pos)
    torch.testing.assert_close(k, k_lc)
    torch.testing.assert_close(v, v_lc)


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_sparse_decode_reference_equals_the_cpu_sparse_path(rope):
    from csr_vllm.engine.sparse_attention import sparse_decode_attention

    dicts = _dicts(rope)
    lc = LayerCodec(dicts, 0)
    t, w, g, bs = 23, 3, 2, 4
    table = torch.randperm(8)[:6].reshape(1, 6).int()
    cache = torch.zeros(8, H, bs, lc.layout.slot_bytes, dtype=torch.uint8)
    pos = torch.arange(t)
    k, v = torch.randn(t, H, D), torch.randn(t, H, D)
    codes, _, _ = lc.encode(k, v, pos)
    phys = table[0].long()[pos // bs] * bs + pos % bs
    cache[phys // bs, :, phys % bs] = codes
    q = torch.randn(1, H * g, D)
    tail_k, tail_v = k[None, t - w:], v[None, t - w:]
    ours = reference.sparse_decode_reference(
        q, cache, table, torch.tensor([t]), torch.tensor([w]), tail_k, tail_v, lc.keys[0],
        lc.values[0], 0.2, rope == "pre", 10000.0, dtype=torch.float64)
    kc, vc = lc.keys[0], lc.values[0]
    kcode = kc.unpack(codes[..., :kc.config.slot_bytes].reshape(t * H, -1).contiguous())
    vcode = vc.unpack(codes[..., kc.config.slot_bytes:].reshape(t * H, -1).contiguous())
    exact = torch.zeros(t, H, dtype=torch.bool)
    exact[t - w:] = True
    ks = (t, H, *kcode.indices.shape[1:])
    vs = (t, H, *vcode.indices.shape[1:])
    cpu = sparse_decode_attention(
        q[0], kcode.indices.reshape(ks), kcode.coefs.reshape(ks), kc.atoms,
        vcode.indices.reshape(vs), vcode.coefs.reshape(vs), vc.atoms, pos, exact, k, exact, v,
        0.2, rope == "pre", 10000.0)
    torch.testing.assert_close(ours[0].float(), cpu, atol=1e-5, rtol=1e-5)
