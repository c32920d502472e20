"""Tensor/pipeline parallel CSR without an engine: which layers and KV heads a worker serves
(vLLM's own split), dictionary shards, and the runtime sized from a shard. The engine runs
(TP 3, PP 2 against one process) are in tests/test_vllm_e2e.py."""

import pytest
import torch

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionaryError, DictionarySet, ModelShape
from csr_vllm.engine.page_layout import LayerCodec
from csr_vllm.engine.parallel import shard_for_worker, worker_share
from csr_vllm.engine.runtime import CSRRuntime
from csr_vllm.engine.settings import CSRSettings

SHAPE = ModelShape("LlamaForCausalLM", num_layers=6, num_kv_heads=3, head_dim=8,
                   rope_theta=10000.0, name="tiny")
TCFG = TensorCodecConfig(num_atoms=16, chunks=1, atoms_per_chunk=2, coef="fp8")


def make(unit_atoms, layer_group=1, per_head=False) -> DictionarySet:
    config = CodecConfig(key=TCFG, value=TCFG, layer_group=layer_group, per_head=per_head)
    groups = -(-SHAPE.num_layers // layer_group)
    heads = SHAPE.num_kv_heads if per_head else 1
    return DictionarySet(config, SHAPE, unit_atoms(groups, heads, 1, 16, 8),
                         unit_atoms(groups, heads, 1, 16, 8))


def test_worker_share_follows_vllms_split():
    # SmolLM2's shape: 30 layers, 3 KV heads.
    tp3 = [worker_share(30, 3, t, 3, 0, 1) for t in range(3)]
    assert [s.kv_heads for s in tp3] == [(0, 1), (1, 2), (2, 3)]
    assert all(s.layers == (0, 30) for s in tp3)
    pp2 = [worker_share(30, 3, 0, 1, p, 2) for p in range(2)]
    assert [s.layers for s in pp2] == [(0, 15), (15, 30)]
    assert all(s.kv_heads == (0, 3) for s in pp2)
    # Uneven: vLLM gives the extra layer to a middle/first stage, never the last.
    assert [worker_share(7, 3, 0, 1, p, 2).layers for p in range(2)] == [(0, 4), (4, 7)]
    # More ranks than KV heads: each head replicated on TP/H consecutive ranks.
    assert [worker_share(30, 3, t, 6, 0, 1).kv_heads for t in range(6)] == \
        [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]
    with pytest.raises(ValueError, match="do not split"):
        worker_share(30, 3, 0, 2, 0, 1)


def test_vllm_partition_override_is_honoured(monkeypatch):
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "20,10")
    assert worker_share(30, 3, 0, 1, 1, 2).layers == (20, 30)


@pytest.mark.parametrize("layer_group", [1, 2, 4])
def test_layer_shard_keeps_exactly_the_stages_layers(unit_atoms, layer_group):
    full = make(unit_atoms, layer_group=layer_group)
    part = full.shard(layers=(3, 6))
    assert part.layers == range(3, 6) and part.kv_heads == 3
    for layer in range(3, 6):
        for kind in ("key", "value"):
            assert torch.equal(part.codec(kind, layer).atoms, full.codec(kind, layer).atoms)
    with pytest.raises(DictionaryError, match="not in this dictionary shard"):
        part.codec("key", 2)
    groups = {full.group_of(layer) for layer in range(3, 6)}
    assert part.key_atoms.shape[0] == len(groups)
    assert part.nbytes == full.nbytes * len(groups) // full.key_atoms.shape[0]
    assert part.key_atoms.data_ptr() != full.key_atoms.data_ptr()  # a copy: full can go


def test_head_shard_of_per_head_dictionaries(unit_atoms):
    full = make(unit_atoms, per_head=True)
    part = full.shard(heads=(1, 2))
    assert part.kv_heads == 1 and part.nbytes * 3 == full.nbytes
    for layer in range(6):
        # The rank numbers its heads from 0: local head 0 is global head 1.
        assert torch.equal(part.codec("key", layer, 0).atoms, full.codec("key", layer, 1).atoms)
    with pytest.raises(DictionaryError, match="KV head 1"):
        part.codec("key", 0, 1)


def test_shared_dictionaries_stay_whole_for_a_tensor_parallel_rank(unit_atoms):
    """Per-layer dictionaries serve every head: a TP rank needs (and reports) all of them."""
    full = make(unit_atoms)
    part = full.shard(heads=(2, 3))
    assert part.kv_heads == 1 and part.nbytes == full.nbytes
    assert torch.equal(part.codec("value", 4, 0).atoms, full.codec("value", 4, 2).atoms)


def test_shards_compose_and_refuse_what_they_do_not_hold(unit_atoms):
    full = make(unit_atoms, per_head=True)
    assert full.shard() is full and full.shard(layers=(0, 6), heads=(0, 3)) is full
    stage = full.shard(layers=(2, 5))
    rank = stage.shard(heads=(2, 3))
    assert rank.layers == range(2, 5) and rank.head_range == (2, 3)
    assert torch.equal(rank.codec("key", 4, 0).atoms, full.codec("key", 4, 2).atoms)
    with pytest.raises(DictionaryError, match="cannot shard layers"):
        stage.shard(layers=(0, 3))
    with pytest.raises(DictionaryError, match="cannot shard KV heads"):
        rank.shard(heads=(0, 1))
    with pytest.raises(DictionaryError, match="cannot be saved"):
        rank.save("/nonexistent")
    # with_codec keeps the shard's ranges
    assert rank.with_codec(rank.config).head_range == (2, 3)


def test_shard_for_worker(unit_atoms):
    full = make(unit_atoms, per_head=True)
    share = worker_share(6, 3, 1, 3, 1, 2)
    part = shard_for_worker(full, share)
    assert part.layers == range(3, 6) and part.head_range == (1, 2)


@pytest.mark.parametrize("per_head", [False, True])
def test_runtime_on_a_shard_codes_like_the_full_set(unit_atoms, gen, per_head):
    """A worker's runtime holds only its layers and heads, its Guard is sized for its heads,
    and what it writes for its head equals what one process writes for that head."""
    full = make(unit_atoms, per_head=per_head)
    part = full.shard(layers=(3, 6), heads=(1, 2))
    settings = CSRSettings(guard_window=32, guard_max_seqs=2, outlier_threshold=0.1)
    rt = CSRRuntime(part, settings, block_size=16, dtype=torch.bfloat16)
    assert sorted(rt.codecs) == [3, 4, 5]
    assert rt.window.num_kv_heads == 1
    assert rt.side_bytes()["dictionaries"] == part.nbytes
    assert rt.side_bytes()["window_guard"] == rt.window.reserved_bytes(3)
    assert rt._outlier_pool(4, "key").num_kv_heads == 1

    n = 10
    k = torch.randn(n, 3, 8, generator=gen)
    v = torch.randn(n, 3, 8, generator=gen)
    pos = torch.arange(n)
    want, _, _ = LayerCodec(full, 4).encode(k, v, pos)
    got, _, _ = rt.codecs[4].encode(k[:, 1:2], v[:, 1:2], pos)
    assert torch.equal(got, want[:, 1:2])


def test_pipeline_receive_buffer_patch_is_idempotent():
    """The one vLLM wrap TP/PP needs (see csr_vllm.plugin._patch_pp_receive_buffer): applied
    once however often a worker selects the backend; the engine runs in
    tests/test_vllm_e2e.py fail without it (vLLM 0.32, eager CPU, pipeline stage 2)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from csr_vllm.plugin import _PATCHED, _patch_pp_receive_buffer

    original = CPUModelRunner.initialize_kv_cache
    try:
        _patch_pp_receive_buffer()
        patched = CPUModelRunner.initialize_kv_cache
        _patch_pp_receive_buffer()
        assert CPUModelRunner.initialize_kv_cache is patched
        assert getattr(patched, _PATCHED) and patched.__wrapped__ is original
    finally:
        CPUModelRunner.initialize_kv_cache = original
