"""The CSR backend's write and read paths against dense attention, without an engine.

A small simulated engine drives :class:`CSRRuntime` and :class:`CSRAttentionImpl` the way vLLM
does (plan per step, write per layer, then forward) over randomly permuted block tables,
ragged lengths and mixed prefill/decode batches. The reference is plain causal softmax
attention in float64 over the K/V each token should be read as: exact inside the dense window
and the current chunk, the reference codec's reconstruction elsewhere.
"""

from __future__ import annotations

import dataclasses
import types
from unittest import mock

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends import cpu_attn
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet, ModelShape
from csr_vllm.codec.identity import identity_dictionary
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope
from csr_vllm.engine.backend import CSRAttentionImpl, CSRMetadata
from csr_vllm.engine.runtime import CSRRuntime
from csr_vllm.engine.settings import CSRSettings

H, G, D, BS = 2, 2, 64, 32  # KV heads, queries per KV head, head_dim, block size
SHAPE = ModelShape("LlamaForCausalLM", 1, H, D, 10000.0, "tiny")
# head_dim 128 and RoPE base 1e6: Qwen2.5's attention (and Llama-3's, Mistral's head size)
SHAPE_128 = ModelShape("Qwen2ForCausalLM", 1, H, 128, 1e6, "tiny-qwen2")
SHAPES = pytest.mark.parametrize("shape", [SHAPE, SHAPE_128], ids=["d64", "d128"])
DTYPE = torch.bfloat16


def random_dictionary(gen, key_rope="pre", atoms=256, s=3, shape=SHAPE) -> DictionarySet:
    tcfg = TensorCodecConfig(num_atoms=atoms, chunks=1, atoms_per_chunk=s, coef="fp8",
                             pursuit="omp")
    cfg = CodecConfig(key=tcfg, value=tcfg, key_rope=key_rope)
    a = torch.randn(2, 1, 1, 1, atoms, shape.head_dim, generator=gen)
    a = a / a.norm(dim=-1, keepdim=True)
    return DictionarySet(cfg, shape, a[0], a[1])


class Engine:
    """Just enough of vLLM's step loop to drive one attention layer."""

    def __init__(self, dicts, settings, gen, num_blocks=64, free=None, content=None):
        self.shape = dicts.shape
        self.d = D = dicts.shape.head_dim
        self.runtime = CSRRuntime(dicts, settings, BS, DTYPE)
        self.kv_cache = torch.zeros(num_blocks, H, BS, self.runtime.layout.slot_bytes,
                                    dtype=torch.uint8)
        # permuted tables (or the given free list: the last entry is handed out first)
        self.free = torch.randperm(num_blocks, generator=gen).tolist() if free is None \
            else list(free)
        # content(r, positions) -> (k, v, q) of request r's tokens (None: draws from gen)
        self.content = content
        self.gen = gen
        cfg = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=DTYPE))
        with mock.patch.object(cpu_attn, "get_current_vllm_config", lambda: cfg):
            self.impl = CSRAttentionImpl(H * G, D, D**-0.5, H, None, None, "auto")
        self.layer = types.SimpleNamespace(isa=_get_attn_isa(DTYPE, BS, D), layer_name="l.0")
        self.tables: dict[int, list[int]] = {}
        self.k: dict[int, torch.Tensor] = {}  # exact keys (after RoPE) per request
        self.v: dict[int, torch.Tensor] = {}

    def step(self, chunks: dict[int, int], sparse: bool = False):
        """Run one step: request -> number of new tokens. Returns (outputs, queries)."""
        D = self.d
        seq_lens, qlens, keys, values, queries, slots, ids = [], [], [], [], [], [], []
        for r, q in chunks.items():
            ctx = len(self.k.get(r, []))
            t = ctx + q
            table = self.tables.setdefault(r, [])
            while len(table) * BS < t:
                table.append(self.free.pop())
            pos = torch.arange(ctx, t)
            k, v, qry = self.draw(r, pos)
            self.k[r] = torch.cat([self.k.get(r, k[:0]), k])
            self.v[r] = torch.cat([self.v.get(r, v[:0]), v])
            keys.append(k), values.append(v)
            queries.append(qry)
            slots.append(torch.tensor([table[p // BS] * BS + p % BS for p in pos.tolist()]))
            seq_lens.append(t), qlens.append(q), ids.append(r)
        m = max(len(self.tables[r]) for r in ids)
        block_table = torch.zeros(len(ids), m, dtype=torch.int32)
        for i, r in enumerate(ids):
            block_table[i, : len(self.tables[r])] = torch.tensor(self.tables[r])
        seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        qsl = torch.zeros(len(ids) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(qlens), 0)
        slot_mapping = torch.cat(slots).long()
        key, value, query = torch.cat(keys), torch.cat(values), torch.cat(queries)

        plan = self.runtime.plan(block_table, seq_lens, qsl, slot_mapping, sparse_decodes=sparse)
        self.runtime.write(0, plan, key, value, self.kv_cache, slot_mapping)
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(ids), num_heads=H * G, num_kv_heads=H, head_dim=D, seq_lens=seq_lens,
            dtype=DTYPE, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa=self.layer.isa, enable_kv_split=False, dynamic_causal=None,
            kv_cache_dtype="auto")
        rest = None
        nd = plan.num_decodes
        if 0 < nd < len(ids):
            rest = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(ids) - nd, num_heads=H * G, num_kv_heads=H, head_dim=D,
                seq_lens=seq_lens[nd:], dtype=DTYPE, query_start_loc=qsl[nd:] - qsl[nd],
                causal=True, sliding_window_size=-1, isa=self.layer.isa,
                enable_kv_split=False, dynamic_causal=None, kv_cache_dtype="auto")
        meta = CSRMetadata(
            num_actual_tokens=len(key), max_query_len=max(qlens), query_start_loc=qsl,
            max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=block_table,
            slot_mapping=slot_mapping, scheduler_metadata=sched, csr_plan=plan,
            csr_runtime=self.runtime, csr_prefill_scheduler_metadata=rest)
        out = torch.full((len(key), H * G, D), float("nan"), dtype=DTYPE)  # poisoned
        self.impl.forward(self.layer, query, key, value, self.kv_cache, meta, out)
        return out, query, ids, qlens

    def draw(self, r: int, pos: torch.Tensor):
        """K (after RoPE), V [q, H, D] and queries [q, H * G, D] of request r at ``pos``."""
        if self.content is not None:
            return self.content(r, pos)
        q, D = len(pos), self.d
        k = torch.randn(q, H, D, generator=self.gen)
        cos, sin = rope_tables(D, self.shape.rope_theta, pos)
        k = apply_rope(k, cos[:, None], sin[:, None]).to(DTYPE)
        v = torch.randn(q, H, D, generator=self.gen).to(DTYPE)
        return k, v, torch.randn(q, H * G, D, generator=self.gen).to(DTYPE)

    def finish(self, r: int) -> None:
        """Free a request's blocks; they are the next ones handed out (reuse)."""
        self.free.extend(reversed(self.tables.pop(r)))
        del self.k[r], self.v[r]

    def reference(self, ids, qlens, query, read_as):
        """float64 causal attention; read_as(r, T, q_len) -> K, V [T, H, D] for request r."""
        outs, row, D = [], 0, self.d
        for r, q in zip(ids, qlens, strict=True):
            t = len(self.k[r])
            k, v = read_as(r, t, q)
            qq = query[row: row + q].double().reshape(q, H, G, D)
            scores = torch.einsum("qhgd,thd->hgqt", qq, k.double()) * D**-0.5
            causal = torch.arange(t)[None, :] <= torch.arange(t - q, t)[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            o = torch.einsum("hgqt,thd->qhgd", scores.softmax(-1), v.double())
            outs.append(o.reshape(q, H * G, D))
            row += q
        return torch.cat(outs)


def codec_view(engine, dicts, window):
    """What each token should read as: exact in the window / current chunk, else coded."""
    kc, vc = dicts.codec("key", 0), dicts.codec("value", 0)
    D, theta = dicts.shape.head_dim, dicts.shape.rope_theta

    def read_as(r, t, q):
        k, v = engine.k[r].float(), engine.v[r].float()
        pos = torch.arange(t)
        cos, sin = rope_tables(D, theta, pos)
        kk = undo_rope(k, cos[:, None], sin[:, None]) if dicts.config.key_rope == "pre" else k
        kr = kc.roundtrip(kk.reshape(t * H, D)).reshape(t, H, D)
        if dicts.config.key_rope == "pre":
            kr = apply_rope(kr, cos[:, None], sin[:, None])
        vr = vc.roundtrip(v.reshape(t * H, D)).reshape(t, H, D)
        exact = pos >= max(0, t - q - window)
        return (torch.where(exact[:, None, None], k, kr.to(DTYPE).float()),
                torch.where(exact[:, None, None], v, vr.to(DTYPE).float()))

    return read_as


SCHEDULE = [  # (request -> new tokens) per step: chunked prefill, then mixed batches
    {0: 70, 1: 33},
    {0: 1, 1: 40, 2: 5},
    {0: 1, 1: 1, 2: 64},
    {0: 1, 1: 1, 2: 1, 3: 100},
    {0: 1, 1: 1, 2: 1, 3: 1},
]


KERNELS = ["native", "reference"]  # CI runs both: the reference is the spec


@pytest.fixture(autouse=True)
def exact_native_picks(monkeypatch):
    """The native encoder's fastest correlation (int8 / bf16 candidates rescored in fp32) may
    pick another atom at a near-tie (tests/test_native_kernels.py measures how often); these
    tests compare the engine's plumbing with the reference codec token by token, so they
    take the kernels' exact fp32 correlation."""
    from csr_vllm import native

    monkeypatch.setattr(native, "best_layout", lambda *args, **kwargs: "fp32")


@SHAPES
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("key_rope", ["post", "pre"])
def test_lossless_codec_matches_dense_attention(gen, sparse, key_rope, kernels, shape):
    dicts = identity_dictionary(shape, key_rope=key_rope)
    eng = Engine(dicts, CSRSettings(guard_window=0, kernels=kernels), gen)
    # The identity codes head_dim atoms a vector; the native kernels code at most 64, so at
    # head_dim 128 the engine must say so and take the reference.
    native = kernels == "native" and shape.head_dim <= 64
    assert (eng.runtime.native is not None) == native
    if kernels == "native" and not native:  # head_dim 128: the engine says why
        assert eng.runtime.native_off == "128 atoms per vector"
    exact = lambda r, t, q: (eng.k[r].float(), eng.v[r].float())  # noqa: E731
    for chunks in SCHEDULE:
        out, query, ids, qlens = eng.step(chunks, sparse=sparse)
        want = eng.reference(ids, qlens, query, exact)
        torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@SHAPES
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sparse", [False, True])
def test_dense_layer_is_exact_attention(gen, sparse, kernels, shape):
    # A lossy dictionary: only the dense store can make this layer's attention exact.
    dicts = random_dictionary(gen, shape=shape)
    eng = Engine(dicts, CSRSettings(guard_window=0, kernels=kernels, dense_layers=(0,)), gen)
    assert (eng.runtime.native is not None) == (kernels == "native")
    exact = lambda r, t, q: (eng.k[r].float(), eng.v[r].float())  # noqa: E731
    for chunks in SCHEDULE:
        out, query, ids, qlens = eng.step(chunks, sparse=sparse)
        want = eng.reference(ids, qlens, query, exact)
        torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    assert not eng.kv_cache.any()  # no codes written: the layer reads its store only
    store = eng.kv_cache.shape[0] * H * BS * 2 * shape.head_dim * 2  # bf16 K + V per slot
    assert eng.runtime.side_bytes()["dense_layers"] == store


def test_a_coded_layer_is_not_exact(gen):
    """The control of the test above: the same dictionary without the dense layer."""
    eng = Engine(random_dictionary(gen), CSRSettings(guard_window=0), gen)
    exact = lambda r, t, q: (eng.k[r].float(), eng.v[r].float())  # noqa: E731
    worst = 0.0
    for chunks in SCHEDULE:
        out, query, ids, qlens = eng.step(chunks)
        worst = max(worst, float((out.double() - eng.reference(ids, qlens, query, exact))
                                 .abs().max()))
    assert worst > 0.1


def test_dense_layers_outside_the_model_are_refused():
    dicts = random_dictionary(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"dense_layers \[3\] are not layers of this model"):
        CSRRuntime(dicts, CSRSettings(dense_layers=(0, 3)), BS, DTYPE)
    with pytest.raises(ValueError, match="layer indices >= 0"):
        CSRSettings(dense_layers=(-1,))


def test_dense_layers_default_to_the_dictionarys_recommendation():
    dicts = random_dictionary(torch.Generator().manual_seed(0))
    dicts = dataclasses.replace(dicts, info={"dense_layers": [0]})
    assert CSRRuntime(dicts, CSRSettings(), BS, DTYPE).dense.layers == {0}
    assert not CSRRuntime(dicts, CSRSettings(dense_layers=()), BS, DTYPE).dense


@SHAPES
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("window", [0, 16, 50])
def test_real_codec_matches_reference_codec(gen, sparse, window, kernels, shape):
    dicts = random_dictionary(gen, shape=shape)
    eng = Engine(dicts, CSRSettings(guard_window=window, guard_max_seqs=8, kernels=kernels),
                 gen)
    native = kernels == "native"
    assert (eng.runtime.native is not None) == native
    for chunks in SCHEDULE:
        out, query, ids, qlens = eng.step(chunks, sparse=sparse)
        want = eng.reference(ids, qlens, query,
                             codec_view(eng, as_used(dicts, "native" if native else ""), window))
        torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


def as_used(dicts: DictionarySet, kernels: str) -> DictionarySet:
    """The atoms an engine with ``kernels`` codes and reads with: the native kernels use the
    dictionaries rounded to bf16 (csr_vllm.engine.native_path.TensorTables), so the reference
    they are held to is the reference codec over those atoms."""
    if kernels != "native":
        return dicts
    return dataclasses.replace(dicts, key_atoms=dicts.key_atoms.bfloat16().float(),
                               value_atoms=dicts.value_atoms.bfloat16().float())


def test_scratch_peak_is_recorded(gen):
    """The reconstruct path's transient scratch is memory outside the pool: it is measured."""
    eng = Engine(random_dictionary(gen), CSRSettings(guard_window=0), gen)
    eng.step({0: 40, 1: 70})
    blocks = len(eng.tables[0]) + len(eng.tables[1])
    dense_pages = blocks * H * 2 * BS * D * 2  # bf16 scratch pages
    assert eng.runtime.stats.scratch_bytes_peak == 2 * dense_pages  # + decoded K and V


def test_codec_error_is_visible(gen):
    """The reference comparison above is not vacuous: exact K/V give a different answer."""
    dicts = random_dictionary(gen, s=1)
    eng = Engine(dicts, CSRSettings(guard_window=0), gen)
    exact = lambda r, t, q: (eng.k[r].float(), eng.v[r].float())  # noqa: E731
    eng.step({0: 100})
    out, query, ids, qlens = eng.step({0: 1})
    assert (out.double() - eng.reference(ids, qlens, query, exact)).abs().max() > 0.1


@pytest.mark.parametrize("sparse", [False, True])
def test_reused_blocks_leave_no_stale_guard_state(gen, sparse):
    """A finished request's blocks go straight to a new one: its window copies and outliers
    must not leak into the new request's attention."""
    dicts = random_dictionary(gen)
    settings = CSRSettings(guard_window=40, guard_max_seqs=4, outlier_threshold=0.3)
    eng = Engine(dicts, settings, gen)
    eng.step({0: 90})
    eng.step({0: 1})
    assert eng.runtime.outliers[(0, "key")].occupancy() > 0
    eng.finish(0)
    eng.step({1: 20})  # reuses request 0's blocks, writes only their first slots
    # Every outlier entry on a slot request 1 wrote holds request 1's vector.
    slots, heads, vecs = eng.runtime.outliers[(0, "key")].entries()
    table = eng.tables[1]
    pos_of = {table[p // BS] * BS + p % BS: p for p in range(20)}
    mine = [i for i, s in enumerate(slots.tolist()) if s in pos_of]
    assert mine
    for i in mine:
        assert torch.equal(vecs[i], eng.k[1][pos_of[int(slots[i])], heads[i]])
    out, query, ids, qlens = eng.step({1: 1})
    # Request 1's tokens are all inside its window: everything must be exact.
    exact = lambda r, t, q: (eng.k[r].float(), eng.v[r].float())  # noqa: E731
    torch.testing.assert_close(out.double(), eng.reference(ids, qlens, query, exact),
                               atol=2e-2, rtol=2e-2)


def test_window_pool_full_evicts_least_recently_used(gen):
    dicts = random_dictionary(gen)
    eng = Engine(dicts, CSRSettings(guard_window=8, guard_max_seqs=1), gen)
    guard = eng.runtime.window
    assert guard.capacity == 2  # ceil(8 / 32) + 1 blocks
    eng.step({0: 10})
    eng.step({1: 10})
    eng.step({2: 10})  # third request: the pool evicts request 0's block (least recent)
    assert guard.occupancy() == 2
    held = set(guard.slot_block.tolist())
    assert eng.tables[0][0] not in held and eng.tables[2][0] in held
    # Request 0 now reads its window through the codes: counted, and still correct.
    misses = guard.window_misses
    out, query, ids, qlens = eng.step({0: 1})
    assert guard.window_misses > misses
    want = eng.reference(ids, qlens, query, codec_view_without_window(eng, dicts))
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


def codec_view_without_window(engine, dicts):
    return codec_view(engine, dicts, window=0)


def test_outlier_pool_keeps_bad_vectors_exact_and_drops_oldest_when_full(gen):
    dicts = random_dictionary(gen, s=1)
    eng = Engine(dicts, CSRSettings(guard_window=0, outlier_threshold=1e-6,
                                    outlier_capacity=8), gen)
    eng.step({0: 3})  # 3 tokens x 2 heads = 6 outliers per tensor
    pool = eng.runtime.outliers[(0, "value")]
    assert pool.occupancy() == 6 and pool.dropped == 0
    eng.step({0: 2})  # 4 more: the 2 oldest are dropped
    assert pool.occupancy() == 8 and pool.dropped == 2
    slots, heads, _ = pool.entries()
    first = eng.tables[0][0] * BS
    assert not ((slots == first) & (heads == 0)).any()  # token 0, head 0 was the oldest


def test_outlier_pool_size_formula_matches_allocation():
    from csr_vllm.engine.guard import OutlierGuard

    pool = OutlierGuard(100, D, H, DTYPE)
    assert pool.nbytes == OutlierGuard.bytes_for(100, D, DTYPE)


def test_native_engines_hold_their_dictionaries_in_bf16_only(gen):
    """With the native kernels the backend keeps bf16 atoms, not the fp32 set: half the
    dictionaries' side memory, no second copy in the native tables, and exactly the outputs
    of an engine handed the fp32 set (the kernels round it to bf16 themselves)."""
    from csr_vllm.engine.backend import CSRAttentionBackend
    from csr_vllm.engine.native_path import dictionaries_for

    dicts = random_dictionary(gen)
    kept = dictionaries_for(dicts, CSRSettings())
    assert kept.key_atoms.dtype == kept.value_atoms.dtype == torch.bfloat16
    assert kept.nbytes * 2 == dicts.nbytes
    assert torch.equal(kept.key_atoms.float(), dicts.key_atoms.bfloat16().float())
    for settings in (CSRSettings(kernels="reference"),
                     CSRSettings(outlier_threshold=0.5, outlier_capacity=8)):
        assert dictionaries_for(dicts, settings) is dicts  # the reference codec's fp32

    saved = CSRAttentionBackend.dicts, CSRAttentionBackend.settings
    try:
        CSRAttentionBackend.configure(dicts, CSRSettings())
        assert CSRAttentionBackend.dicts.key_atoms.dtype == torch.bfloat16
    finally:
        CSRAttentionBackend.dicts, CSRAttentionBackend.settings = saved

    outs, sides = [], []
    for d in (dicts, kept):
        eng = Engine(d, CSRSettings(guard_window=16, guard_max_seqs=8),
                     torch.Generator().manual_seed(5))
        outs.append([eng.step(chunks, sparse=True)[0] for chunks in SCHEDULE])
        sides.append(eng.runtime.side_bytes())
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    full, half = sides
    assert half["dictionaries"] * 2 == full["dictionaries"]
    assert full["native_tables"] - half["native_tables"] == kept.nbytes  # the bf16 copy


@pytest.mark.parametrize("kernels", KERNELS)
def test_screened_search_through_the_backend_matches_its_reference_codec(gen, kernels):
    """--csr-search 16/4: the runtime orders the atoms by cluster (the same ordering the
    reference codec is then given), writes and reads through both kernels as vLLM drives
    them, and attends over what the screened reference codec reconstructs."""
    from csr_vllm.codec.search import SearchSpec, ordered_for_search

    dicts = random_dictionary(gen)
    settings = CSRSettings(guard_window=16, guard_max_seqs=8, kernels=kernels, search="16/4")
    eng = Engine(dicts, settings, gen)
    ordered = eng.runtime.dicts
    assert ordered.config.key.search == "16/4" and ordered.key_clusters is not None
    assert ordered_for_search(ordered, SearchSpec(16, 4)) is ordered  # not ordered twice
    for chunks in SCHEDULE:
        out, query, ids, qlens = eng.step(chunks)
        want = eng.reference(ids, qlens, query, codec_view(eng, as_used(ordered, kernels), 16))
        torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)
