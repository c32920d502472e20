"""Sampling-based dictionary adaptation (csr_vllm/codec/adaptation.py): the codec reference,
the harness method, and the engine's write/read paths under block reuse, prefix sharing and
preemption (driven through the simulated engine of tests/test_backend.py)."""

from __future__ import annotations

import math

import pytest
import torch
from test_backend import BS, DTYPE, SHAPE, D, Engine, G, H, random_dictionary

from csr_vllm.codec.adaptation import (
    LocalAtoms,
    adapted_bits_per_channel,
    atom_limit,
    encode_adaptive,
    filled_atoms,
)
from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.codec.pursuit import PURSUITS, best_atom, gather_atoms
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope
from csr_vllm.engine.page_layout import SlotLayout
from csr_vllm.engine.settings import CSRSettings
from csr_vllm.evaluation.methods import CSR, make_method

E = 3


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# -- codec reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("pursuit", ["mp", "omp"])
def test_a_vector_equal_to_its_own_atom_is_coded_with_it(gen, pursuit):
    atoms = unit(torch.randn(64, 16, generator=gen))
    x = torch.randn(5, 16, generator=gen)
    extra = torch.zeros(5, 2, 16)
    extra[:, 1] = unit(x)  # slot 0 empty (zero), slot 1 the vector itself
    idx, coef = PURSUITS[pursuit](x, atoms, 2, extra=extra)
    assert (idx[:, 0] == 64 + 1).all()  # index A + e
    rec = (coef[..., None] * gather_atoms(atoms, idx, extra)).sum(1)
    torch.testing.assert_close(rec, x, atol=1e-4, rtol=1e-4)


def test_empty_extra_atoms_are_never_picked_and_ties_go_to_the_dictionary(gen):
    atoms = unit(torch.randn(32, 8, generator=gen))
    x = torch.randn(7, 8, generator=gen)
    i0, c0 = best_atom(x, atoms)
    i1, c1 = best_atom(x, atoms, torch.zeros(7, 4, 8))
    assert torch.equal(i0, i1) and torch.equal(c0, c1)


def test_decode_with_local_atoms_equals_the_gather_reference(gen):
    tcfg = TensorCodecConfig(num_atoms=128, chunks=2, atoms_per_chunk=3, coef="fp8",
                             sampled_atoms=4)
    from csr_vllm.codec.codec import TensorCodec

    codec = TensorCodec(tcfg, unit(torch.randn(2, 128, 16, generator=gen)))
    group = torch.tensor([0, 0, 1, 2, 1])
    local = LocalAtoms(unit(torch.randn(3, 2, 4, 16, generator=gen)), group)
    code = codec.encode(torch.randn(5, 32, generator=gen), local)
    got = codec.decode(code, local)
    want = []
    for c in range(2):
        a = gather_atoms(codec.shared_atoms[c], code.indices[:, c], local.per_vector(c))
        want.append((code.coefs[:, c, :, None] * a).sum(1))
    torch.testing.assert_close(got, torch.cat(want, 1), atol=1e-5, rtol=1e-5)
    code.indices[0, 0, 0] = tcfg.shared_atoms  # a sampled atom, but none given
    with pytest.raises(ValueError, match="sampled atoms but none"):
        codec.decode(code)


def test_encode_adaptive_is_bounded_append_only_and_helps(gen):
    tcfg = TensorCodecConfig(num_atoms=256, chunks=1, atoms_per_chunk=2, coef="fp8",
                             sampled_atoms=E)
    from csr_vllm.codec.codec import TensorCodec

    codec = TensorCodec(tcfg, unit(torch.randn(1, 256, D, generator=gen)))
    x = torch.randn(60, D, generator=gen)
    group = torch.arange(60) // 20  # three blocks of 20 vectors
    atoms = torch.zeros(3, 1, E, D)
    atoms[2, 0, 0] = unit(torch.randn(D, generator=gen)).half().float()  # already held
    held = atoms[2, 0, 0].clone()
    limit = torch.tensor([1, E, E])
    code, new = encode_adaptive(codec, x, group, atoms, limit)
    assert filled_atoms(new)[:, 0].tolist() == [1, E, E]  # bounded by the limit
    assert torch.equal(new[2, 0, 0], held)  # existing atoms never change
    # Every sampled atom is a group member, normalised, as stored (fp16).
    for g in range(3):
        members = unit(x[group == g]).half().float()
        for a in new[g, 0][new[g, 0].abs().amax(-1) > 0][(1 if g == 2 else 0):]:
            assert (members - a).abs().amax(-1).min() < 1e-6
    # The vectors sampled are the worst coded ones and are now nearly exact.
    rec = codec.decode(code, LocalAtoms(new, group))
    base = codec.decode(codec.encode(x))
    err_new, err_base = (x - rec).norm(dim=-1), (x - base).norm(dim=-1)
    assert err_new.sum() < err_base.sum()
    assert (err_new / x.norm(dim=-1) < 0.07).sum() >= 1 + E + (E - 1)


def test_atom_limit_spreads_the_budget_over_the_block():
    offsets = torch.tensor([0, 9, 10, 63, 127])
    assert atom_limit(offsets, 128, 4).tolist() == [1, 1, 1, 2, 4]
    assert atom_limit(torch.tensor([127]), 128, 4).item() == 4


# -- the harness method ------------------------------------------------------------------------
def test_harness_method_names_bits_and_blocks(gen, tmp_path):
    dicts = random_dictionary(gen, atoms=256, s=3)
    dicts.save(tmp_path)
    m = make_method("csr+adapt=3", tmp_path)
    assert isinstance(m, CSR) and m.adapt == 3
    # Block atom bytes: 2 tensors x 3 atoms x 64 fp16 channels = 768 over H * BS = 256 slots.
    slot = dicts.config.slot_bytes() + math.ceil(2 * 3 * D * 2 / (H * 128))
    assert m.bits_per_channel(D) == 8 * slot / (2 * D)
    with pytest.raises(ValueError, match="adapt value"):
        make_method("csr+adapt=x", tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        make_method("csr+adapt=3+foo=1", tmp_path)
    # Coding twice 160 tokens (a block and a bit) with and without adaptation.
    k = torch.randn(H, 160, D, generator=gen)
    v = torch.randn(H, 160, D, generator=gen)
    pos = torch.arange(160)
    plain = CSR(dicts)
    kp, vp = plain.compress(0, k, v, pos)
    ka, va = m.compress(0, k, v, pos)
    assert (va - v).norm() < (vp - v).norm() and (ka - k).norm() < (kp - k).norm()
    assert m.sampled_atoms() == 2 * (E + math.ceil(E * 32 / 128))  # K and V, 2 blocks


# -- the engine --------------------------------------------------------------------------------
def content_of(seed_of):
    """Deterministic K/V/Q per (request, position): seed_of(r, p) picks the content."""

    def draw(r, pos):
        ks, vs, qs = [], [], []
        for p in pos.tolist():
            g = torch.Generator().manual_seed(seed_of(r, p))
            ks.append(torch.randn(H, D, generator=g))
            vs.append(torch.randn(H, D, generator=g))
            qs.append(torch.randn(H * G, D, generator=g))
        cos, sin = rope_tables(D, SHAPE.rope_theta, pos)
        k = apply_rope(torch.stack(ks), cos[:, None], sin[:, None])
        return k.to(DTYPE), torch.stack(vs).to(DTYPE), torch.stack(qs).to(DTYPE)

    return draw


def adapted_view(eng, dicts, window):
    """Reference read-as: the harness's adaptive CSR method (one per request, fed the same
    chunks the engine wrote) outside the window and the current chunk, exact inside."""
    methods: dict[int, CSR] = {}
    recs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(ids, qlens):
        for r, q in zip(ids, qlens, strict=True):
            m = methods.setdefault(r, CSR(dicts, adapt=E, block_size=BS))
            t = len(eng.k[r])
            k, v = eng.k[r][t - q:].float(), eng.v[r][t - q:].float()
            kh, vh = m.compress(0, k.transpose(0, 1), v.transpose(0, 1), torch.arange(t - q, t))
            old = recs.get(r, (kh.new_zeros(0, H, D), vh.new_zeros(0, H, D)))
            recs[r] = (torch.cat([old[0], kh.transpose(0, 1)]),
                       torch.cat([old[1], vh.transpose(0, 1)]))

    def read_as(r, t, q):
        exact = (torch.arange(t) >= max(0, t - q - window))[:, None, None]
        k, v = recs[r]
        return (torch.where(exact, eng.k[r].float(), k.to(DTYPE).float()),
                torch.where(exact, eng.v[r].float(), v.to(DTYPE).float()))

    return record, read_as


SCHEDULE = [  # chunked prefill across block boundaries, then mixed prefill/decode batches
    {0: 70, 1: 33},
    {0: 1, 1: 40, 2: 5},
    {0: 1, 1: 1, 2: 64},
    {0: 1, 1: 1, 2: 1, 3: 100},
    {0: 1, 1: 1, 2: 1, 3: 1},
]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("window", [0, 16])
def test_real_codec_with_adaptation_matches_the_reference(gen, sparse, window):
    dicts = random_dictionary(gen)
    eng = Engine(dicts, CSRSettings(guard_window=window, guard_max_seqs=8, adapt_atoms=E), gen)
    record, read_as = adapted_view(eng, dicts, window)
    used = 0
    for chunks in SCHEDULE:
        out, query, ids, qlens = eng.step(chunks, sparse=sparse)
        record(ids, qlens)
        torch.testing.assert_close(out.double(), eng.reference(ids, qlens, query, read_as),
                                   atol=3e-2, rtol=3e-2)
        used = sum(eng.runtime.sampled_atoms().values())
    assert used > 0


def lossless_with_spare_atoms(key_rope: str) -> DictionarySet:
    """The identity basis plus E spare atoms at the top (the ones adaptation drops). OMP with
    D + E atoms a vector fits any vector exactly by least squares (its support spans R^D
    whichever sampled atoms it picks), fp16 coefficients: lossless up to fp16 rounding."""
    tcfg = TensorCodecConfig(num_atoms=D + E, chunks=1, atoms_per_chunk=D + E, coef="fp16",
                             pursuit="omp")
    cfg = CodecConfig(key=tcfg, value=tcfg, key_rope=key_rope)
    atoms = torch.cat([torch.eye(D), unit(torch.ones(E, D))])[None, None, None]
    return DictionarySet(cfg, SHAPE, atoms, atoms.clone())


@pytest.mark.heavy
@pytest.mark.parametrize("sparse", [False, True])
def test_lossless_codec_with_adaptation_matches_dense_attention(gen, sparse):
    """A short schedule (a block boundary, a mixed batch). Heavy: the reference OMP over
    D + E = 67 atoms a vector takes minutes here (3 min per case on a loaded 2-core box)."""
    eng = Engine(lossless_with_spare_atoms("pre"), CSRSettings(guard_window=0, adapt_atoms=E),
                 gen)
    exact = lambda r, t, q: (eng.k[r].float(), eng.v[r].float())  # noqa: E731
    for chunks in ({0: 34, 1: 5}, {0: 1, 1: 1, 2: 3}):
        out, query, ids, qlens = eng.step(chunks, sparse=sparse)
        torch.testing.assert_close(out.double(), eng.reference(ids, qlens, query, exact),
                                   atol=2e-2, rtol=2e-2)
    assert sum(eng.runtime.sampled_atoms().values()) > 0


def atoms_of(eng, block):
    codec = eng.runtime.codecs[0]
    k, v = codec.read_atoms(eng.kv_cache, torch.tensor([block]))
    return k[0, 0, 0], v[0, 0, 0]  # [E, D] (shared dictionary, one chunk)


def coded_frame_keys(eng, r, pos):
    cos, sin = rope_tables(D, SHAPE.rope_theta, pos)
    return undo_rope(eng.k[r][pos].float(), cos[:, None], sin[:, None])


@pytest.mark.parametrize("sparse", [False, True])
def test_reused_block_leaves_no_stale_atoms(gen, sparse):
    """Request 0 fills two blocks (atoms sampled); they go to request 1, which writes other
    content from offset 0: its atoms come from its own vectors only, and its outputs equal
    those of a fresh engine that never saw request 0."""
    dicts = random_dictionary(gen)
    settings = CSRSettings(guard_window=0, adapt_atoms=E)
    draw = content_of(lambda r, p: 1000 * r + p)
    order = list(range(40))
    eng = Engine(dicts, settings, gen, num_blocks=40, free=order, content=draw)
    eng.step({0: 2 * BS})
    eng.step({0: 1})
    first = eng.tables[0][0]
    assert (atoms_of(eng, first)[0].abs().amax(-1) > 0).sum() == E
    eng.finish(0)
    fresh = Engine(dicts, settings, gen, num_blocks=40, free=list(eng.free), content=draw)
    outs = []
    for e in (eng, fresh):
        o1, *_ = e.step({1: 20}, sparse=sparse)  # offset 0..19 of request 0's first block
        o2, *_ = e.step({1: 1}, sparse=sparse)
        o3, *_ = e.step({1: 1}, sparse=sparse)
        outs.append((o1, o2, o3))
    assert eng.tables[1][0] == first
    k_atoms, v_atoms = atoms_of(eng, first)
    live = k_atoms.abs().amax(-1) > 0
    assert 0 < live.sum() <= atom_limit(torch.tensor(21), BS, E)
    mine = unit(coded_frame_keys(eng, 1, torch.arange(22)).reshape(-1, D)).half().float()
    for a in k_atoms[live]:
        assert (mine - a).abs().amax(-1).min() < 1e-6  # sampled from request 1, not 0
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_prefix_shared_blocks_bring_their_atoms(gen):
    """Request 1 shares request 0's two full blocks (a prefix-cache hit: never rewritten);
    reading them uses the atoms sampled when request 0 wrote them."""
    dicts = random_dictionary(gen)
    settings = CSRSettings(guard_window=0, adapt_atoms=E)
    draw = content_of(lambda r, p: p if p < 2 * BS else 1000 * r + p)  # same prefix
    eng = Engine(dicts, settings, gen, num_blocks=40, free=list(range(40)), content=draw)
    eng.step({0: 2 * BS + 10})
    shared = eng.tables[0][:2]
    eng.tables[1] = list(shared)  # prefix hit: request 1 starts with the cached blocks
    eng.k[1], eng.v[1] = eng.k[0][: 2 * BS].clone(), eng.v[0][: 2 * BS].clone()
    fresh = Engine(dicts, settings, gen, num_blocks=40, content=draw,
                   free=[b for b in range(40) if b not in eng.tables[0]] + shared[::-1])
    fresh.step({1: 2 * BS})  # the same prefix, written by request 1 itself
    fresh.free = list(eng.free)
    assert fresh.tables[1] == shared
    for _ in range(2):
        got, q1, ids, qlens = eng.step({1: 30} if _ == 0 else {1: 1})
        want, q2, *_ = fresh.step({1: 30} if _ == 0 else {1: 1})
        assert torch.equal(q1, q2)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    for b in shared:  # the shared blocks' atoms were written once, by request 0
        assert (atoms_of(eng, b)[1].abs().amax(-1) > 0).sum() == E


@pytest.mark.parametrize("sparse", [False, True])
def test_preempted_and_recomputed_request_equals_a_fresh_run(gen, sparse):
    """Request 0 is preempted (blocks freed, partly reused by request 1) and recomputed from
    scratch: its outputs equal those of a fresh engine running the recompute alone."""
    dicts = random_dictionary(gen)
    settings = CSRSettings(guard_window=16, guard_max_seqs=4, adapt_atoms=E)
    draw = content_of(lambda r, p: 1000 * (r % 10) + p)  # 10 = request 0 recomputed
    eng = Engine(dicts, settings, gen, num_blocks=40, free=list(range(40)), content=draw)
    eng.step({0: 150})
    for _ in range(3):
        eng.step({0: 1}, sparse=sparse)
    eng.finish(0)  # preempted: blocks back to the pool
    eng.step({1: 40})  # another request writes into some of them
    eng.step({1: 1, 10: 153}, sparse=sparse)  # recompute (all 153 tokens again)
    fresh = Engine(dicts, settings, gen, num_blocks=40, content=draw,
                   free=[b for b in range(40) if b not in eng.tables[10]] + eng.tables[10][::-1])
    fresh.step({10: 153})
    assert fresh.tables[10] == eng.tables[10]
    got, *_ = eng.step({1: 1, 10: 1}, sparse=sparse)
    want, *_ = fresh.step({10: 1}, sparse=sparse)
    torch.testing.assert_close(got[1:], want, atol=1e-2, rtol=1e-2)


def test_decode_filled_block_spreads_its_atoms(gen):
    dicts = random_dictionary(gen)
    eng = Engine(dicts, CSRSettings(guard_window=0, adapt_atoms=E), gen, num_blocks=8)
    eng.step({0: BS})  # block 0 full
    counts = []
    for o in range(BS):  # block 1 filled one token at a time
        eng.step({0: 1})
        n = int((atoms_of(eng, eng.tables[0][1])[0].abs().amax(-1) > 0).sum())
        assert n <= math.ceil(E * (o + 1) / BS)
        counts.append(n)
    assert counts[-1] == E and counts[0] == 1 and counts == sorted(counts)


def test_bytes_are_counted_and_bounded(gen):
    dicts = random_dictionary(gen)
    eng = Engine(dicts, CSRSettings(guard_window=0, adapt_atoms=E), gen)
    for chunks in SCHEDULE:
        eng.step(chunks)
    rt, codec = eng.runtime, eng.runtime.codecs[0]
    layout = rt.layout
    # The slot carries the block's atoms: 2 tensors x E x D fp16 over H x BS slots.
    assert layout.atom_bytes == math.ceil(2 * E * D * 2 / (H * BS))
    assert layout == SlotLayout.of(rt.dicts, BS)
    cfg = rt.dicts.config
    assert adapted_bits_per_channel(cfg, D, H, BS) == 8 * layout.slot_bytes / (2 * D)
    # What the pages hold, counted from the bytes: never more than E per block and tensor,
    # and exactly what the statistics report.
    blocks = torch.arange(eng.kv_cache.shape[0])
    k, v = codec.read_atoms(eng.kv_cache, blocks)
    per_block = filled_atoms(k[:, 0]) + filled_atoms(v[:, 0])  # [blocks, C=1]
    assert int(per_block.max()) <= 2 * E
    assert sum(rt.sampled_atoms().values()) == int(per_block.sum()) > 0
    assert rt.sampled_atom_bytes() == int(per_block.sum()) * D * 2
    # Bytes past the atoms in each block's area stay zero.
    area = eng.kv_cache[:, :, :, layout.code_bytes:].reshape(len(blocks), -1)
    assert not area[:, 2 * E * D * 2:].any()


def test_worker_stats_report_sampled_atoms(gen):
    from csr_vllm.engine import backend
    from csr_vllm.engine.stats import worker_stats

    eng = Engine(random_dictionary(gen), CSRSettings(guard_window=0, adapt_atoms=E), gen)
    eng.step({0: 70})
    backend._RUNTIMES.add(eng.runtime)
    try:
        stats = worker_stats()
    finally:
        backend._RUNTIMES.discard(eng.runtime)
    assert stats["sampled_atoms"] == sum(eng.runtime.sampled_atoms().values()) > 0
    assert stats["sampled_atom_bytes"] == stats["sampled_atoms"] * D * 2
    assert stats["sampled_atoms_per_layer"] == [stats["sampled_atoms"]]
    assert stats["bits_per_channel"] == 8 * eng.runtime.layout.slot_bytes / (2 * D)


def test_cli_flag_reaches_the_settings():
    import argparse

    from csr_vllm.engine.settings import settings_from_additional_config
    from csr_vllm.plugin import add_csr_arguments, fold_csr_flags

    parser = argparse.ArgumentParser()
    add_csr_arguments(parser)
    args = parser.parse_args(["--kv-cache-backend", "csr", "--csr-adapt-atoms", "3"])
    assert settings_from_additional_config(fold_csr_flags(args, None)).adapt_atoms == 3
    with pytest.raises(ValueError, match="adapt_atoms"):
        settings_from_additional_config({"kv_cache_backend": "csr",
                                         "csr": {"adapt_atoms": -1}})
