"""The Triton kernels against their PyTorch references (csr_vllm/ops/reference.py).

Runs under Triton's interpreter on CPU (``TRITON_INTERPRET=1`` must be set before triton is
imported: tests/test_ops_interpreter.py starts this module in such a subprocess) at tiny
shapes, or on a CUDA machine, where the ``*_real_shapes`` tests also run at Llama-3-8B shapes.
Inputs are random and fresh every run (the seed is in each failure message); outputs and
unwritten cache bytes are poisoned first; block tables are permuted and lengths ragged.

Tolerance: a kernel's error against the float64 reference may be at most twice the float32
reference's own error (same codes, float32 arithmetic, torch's summation order).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels: run under TRITON_INTERPRET=1 (tests/test_ops_interpreter.py starts "
           "this module so) or on a CUDA machine")
DEV = "cuda" if CUDA else "cpu"
THETA = 10000.0
# The references are the codec's own (csr_vllm.codec, which reads dictionaries with safetensors).
pytest.importorskip("safetensors")


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _assert_float32_noise(got: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor,
                          msg: str) -> None:
    """The kernel may differ from the float64 reference only as much as float32 rounding does.

    The bound is 2x the float32 reference's own error, floored at 4 ulps of the output scale:
    one max over a few hundred values can land far below the typical rounding error (seed
    147329561 put the reference at 7.7e-8 and the kernel, summing in another order, at 1.6e-7,
    both under one ulp of 1.0), so without the floor the test failed by chance.
    """
    err = (got.cpu().double().reshape(ref64.shape) - ref64).abs().max().item()
    ref_err = (ref32.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(ref64.abs().max().item(), 1.0)
    assert err <= max(2 * ref_err, floor), f"{msg}: kernel error {err:.3g}, float32 reference " \
        f"{ref_err:.3g}, floor {floor:.3g}"


def _atoms(c, a, dc):
    x = torch.randn(c, a, dc, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float().to(DEV)


def _codec(a, c, s, d, coef, pursuit, spread):
    """A codec over random atoms; logB formats get ladder tops calibrated as a dictionary's
    are (csr_vllm.codec.coefficients.ladder_tops) on vectors like the test's (randn x spread),
    so the ladder both clips and floors some of the test's coefficients."""
    from csr_vllm.codec.codec import TensorCodec
    from csr_vllm.codec.coefficients import ladder_tops
    from csr_vllm.codec.config import TensorCodecConfig

    cfg = TensorCodecConfig(a, c, s, coef, pursuit)
    atoms = _atoms(c, a, d // c)
    ladder = None
    if cfg.coef_format.uses_ladder:
        ladder = torch.stack([ladder_tops(torch.randn(256, d // c) * spread, atoms[i].cpu(), s)
                              [s - 1, :s] for i in range(c)]).to(DEV)
    return TensorCodec(cfg, atoms, ladder)


def _codecs(a, d, ck, sk, cv, sv, coef, pursuit):
    return (_codec(a, ck, sk, d, coef, pursuit, 2.0), _codec(a, cv, sv, d, coef, pursuit, 1.0))


def _fmts(kcod, vcod):
    from csr_vllm.ops.code_format import CodeFormat

    return CodeFormat.of(kcod.config), CodeFormat.of(vcod.config)


def _ladders(kcod, vcod) -> dict:
    """The kernels' ladder-table arguments (None for fp8 / fp16)."""
    return {"key_ladder": kcod.ladder_table(), "value_ladder": vcod.ladder_table()}


def _cpu_codec(codec):
    from csr_vllm.codec.codec import TensorCodec

    ladder = None if codec.ladder is None else codec.ladder.cpu()
    return TensorCodec(codec.config, codec.atoms.cpu(), ladder)


ENCODE_CASES = [  # pursuit, coef, (key chunks, atoms), (value chunks, atoms), key_rope
    ("omp", "fp8", (1, 3), (1, 3), "pre"),
    ("omp", "fp8", (1, 2), (2, 2), "post"),
    ("mp", "fp16", (2, 2), (1, 4), "pre"),
    ("mp", "fp8", (1, 3), (1, 2), "post"),
    ("omp", "log5", (1, 4), (2, 2), "pre"),
    ("mp", "log3", (2, 2), (1, 3), "post"),
]


def _encode_case(seed, pursuit, coef, kcs, vcs, rope, n, h, d, a, bs, nblocks):
    from csr_vllm.ops.encode import encode_store, rope_rows
    from csr_vllm.ops.reference import decode_slots, encode_store_reference

    kcod, vcod = _codecs(a, d, *kcs, *vcs, coef, pursuit)
    kf, vf = _fmts(kcod, vcod)
    key = torch.randn(n, h, d, device=DEV) * 2
    value = torch.randn(n, h, d, device=DEV)
    positions = torch.randint(0, 4096, (n,), device=DEV)
    slots = torch.randperm(nblocks * bs, device=DEV)[:n]
    slots[torch.rand(n, device=DEV) < 0.1] = -1  # padding
    cache = torch.randint(0, 256, (nblocks, h, bs, kf.slot_bytes + vf.slot_bytes),
                          dtype=torch.uint8, device=DEV)
    ref = cache.clone()
    cos, sin = rope_rows(positions, d, THETA) if rope == "pre" else (None, None)
    encode_store(key, value, slots, cache, kcod.atoms, vcod.atoms, kf, vf, cos, sin,
                 **_ladders(kcod, vcod))
    kc_cpu, vc_cpu = _cpu_codec(kcod), _cpu_codec(vcod)
    ref = ref.cpu()
    encode_store_reference(key.cpu(), value.cpu(), positions.cpu(), slots.cpu(), ref, kc_cpu,
                           vc_cpu, rope == "pre", THETA)
    cache = cache.cpu()
    written = torch.zeros(nblocks * bs, dtype=torch.bool)
    live = slots.cpu() >= 0
    written[slots.cpu()[live]] = True
    written = written.reshape(nblocks, bs)[:, None, :].expand(-1, h, -1)
    msg = f"seed {seed}"
    # Slots not written keep their poisoned bytes.
    assert torch.equal(cache[~written], ref[~written]), msg
    same = (cache == ref).all(-1)[written]
    assert same.float().mean() >= 0.98, f"{msg}: {same.float().mean():.3f} of slots identical"
    # Where a near-tie legitimately flipped a choice, the code is as good as the reference's.
    s = slots.cpu()[live]
    got, want = cache[s // bs, :, s % bs], ref[s // bs, :, s % bs]
    p = positions.cpu()[live]
    for slots_, tag in ((got, "kernel"), (want, "reference")):
        k, v = decode_slots(slots_, p, kc_cpu, vc_cpu, rope == "pre", THETA, torch.float64)
        err = ((k - key.cpu()[live].double()).norm(dim=-1) + (v - value.cpu()[live].double())
               .norm(dim=-1))
        if tag == "kernel":
            k_err = err
        else:
            r_err = err
    assert (k_err <= r_err * 1.05 + 1e-5).all(), msg
    return same


@pytest.mark.parametrize("pursuit, coef, kcs, vcs, rope", ENCODE_CASES)
def test_encode_store_matches_reference_bytes(seed, pursuit, coef, kcs, vcs, rope):
    _encode_case(seed, pursuit, coef, kcs, vcs, rope, n=24, h=2, d=32, a=96, bs=8, nblocks=5)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
def test_encode_store_real_shapes(seed):
    same = _encode_case(seed, "omp", "fp8", (1, 12), (1, 12), "pre", n=256, h=8, d=128,
                        a=8192, bs=16, nblocks=64)
    assert same.float().mean() >= 0.98


def test_encode_store_refuses_bad_input(seed):
    from csr_vllm.ops.code_format import CodeFormat
    from csr_vllm.ops.encode import encode_store

    kcod, vcod = _codecs(32, 16, 1, 2, 1, 2, "fp8", "omp")
    kf, vf = _fmts(kcod, vcod)
    key = torch.randn(4, 1, 16, device=DEV)
    slots = torch.arange(4, device=DEV)
    bad = torch.zeros(2, 1, 4, kf.slot_bytes + vf.slot_bytes + 1, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="bytes do not hold"):
        encode_store(key, key, slots, bad, kcod.atoms, vcod.atoms, kf, vf)
    with pytest.raises(NotImplementedError, match="coefficient formats"):
        CodeFormat(32, 1, 2, "int5")
    lcod, _ = _codecs(32, 16, 1, 2, 1, 2, "log5", "omp")
    lf = CodeFormat.of(lcod.config)
    lcache = torch.zeros(2, 1, 4, 2 * lf.slot_bytes, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match=r"log5 codes need a contiguous float32 ladder "
                                         r"table \(1, 2, 16\)"):
        encode_store(key, key, slots, lcache, lcod.atoms, lcod.atoms, lf, lf)
    with pytest.raises(ValueError, match="a ladder table was given for fp8"):
        encode_store(key, key, slots, bad[..., :-1], kcod.atoms, vcod.atoms, kf, vf,
                     key_ladder=lcod.ladder_table())
    with pytest.raises(ValueError, match="do not match"):
        encode_store(key, key, slots, bad[..., :-1], vcod.atoms[:, :16], vcod.atoms, kf, vf)


DECODE_CASES = [  # coef, (key chunks, atoms), (value chunks, atoms), key_rope
    ("fp8", (1, 3), (1, 2), "post"),
    ("fp8", (1, 3), (1, 2), "pre"),
    ("fp16", (2, 2), (2, 1), "post"),
    ("fp16", (2, 1), (1, 2), "pre"),
    ("log5", (1, 3), (2, 2), "pre"),
    ("log4", (2, 2), (1, 3), "post"),
]


def _paged_codes(seed, kcod, vcod, seq_lens, h, d, bs, rope, extra_blocks=3):
    """A cache with every sequence's tokens encoded through a permuted block table."""
    from csr_vllm.ops.encode import encode_store, rope_rows

    kf, vf = _fmts(kcod, vcod)
    b = len(seq_lens)
    mb = max(-(-int(t) // bs) for t in seq_lens)
    nblocks = b * mb + extra_blocks
    table = torch.randperm(nblocks, device=DEV)[: b * mb].reshape(b, mb).int()
    cache = torch.randint(0, 256, (nblocks, h, bs, kf.slot_bytes + vf.slot_bytes),
                          dtype=torch.uint8, device=DEV)
    pos = torch.cat([torch.arange(int(t), device=DEV) for t in seq_lens])
    req = torch.repeat_interleave(torch.arange(b, device=DEV), seq_lens.to(DEV))
    slots = table.long()[req, pos // bs] * bs + pos % bs
    cos, sin = rope_rows(pos, d, THETA) if rope == "pre" else (None, None)
    n = len(pos)
    encode_store(torch.randn(n, h, d, device=DEV), torch.randn(n, h, d, device=DEV), slots,
                 cache, kcod.atoms, vcod.atoms, kf, vf, cos, sin, **_ladders(kcod, vcod))
    return cache, table


def _decode_case(seed, coef, kcs, vcs, rope, seq_lens, n_tail, h, g, d, a, bs, split):
    from csr_vllm.ops.encode import rope_rows
    from csr_vllm.ops.reference import sparse_decode_reference
    from csr_vllm.ops.sparse_decode import sparse_decode_attention, workspace_floats

    kcod, vcod = _codecs(a, d, *kcs, *vcs, coef, "omp")
    kf, vf = _fmts(kcod, vcod)
    seq_lens, n_tail = torch.tensor(seq_lens), torch.tensor(n_tail)
    cache, table = _paged_codes(seed, kcod, vcod, seq_lens, h, d, bs, rope)
    b = len(seq_lens)
    w = max(1, int(n_tail.max()))
    tail_k = torch.randn(b, w, h, d, device=DEV)
    tail_v = torch.randn(b, w, h, d, device=DEV)
    q = torch.randn(b, h * g, d, device=DEV)
    scale = d ** -0.5
    tables = rope_rows(torch.arange(int(seq_lens.max()), device=DEV), d, THETA) \
        if rope == "pre" else (None, None)
    # A caller-reserved workspace, poisoned: every temporary must be written before it is read.
    nsp = -(-int(seq_lens.max()) // split) + 1
    need = workspace_floats(b, h * g, h, d, kf, vf, nsp, rope == "pre")
    workspace = torch.full((need + 7,), float("nan"), device=DEV)
    with pytest.raises(ValueError, match="workspace"):
        sparse_decode_attention(q, cache, table, seq_lens.to(DEV), n_tail.to(DEV), tail_k,
                                tail_v, kcod.atoms, vcod.atoms, kf, vf, scale, *tables,
                                split_tokens=split, workspace=workspace[: need - 1],
                                **_ladders(kcod, vcod))
    out = sparse_decode_attention(q, cache, table, seq_lens.to(DEV), n_tail.to(DEV), tail_k,
                                  tail_v, kcod.atoms, vcod.atoms, kf, vf, scale, *tables,
                                  split_tokens=split, workspace=workspace,
                                  **_ladders(kcod, vcod))
    args = (q.cpu(), cache.cpu(), table.cpu(), seq_lens, n_tail, tail_k.cpu(), tail_v.cpu(),
            _cpu_codec(kcod), _cpu_codec(vcod), scale, rope == "pre", THETA)
    ref64 = sparse_decode_reference(*args, dtype=torch.float64)
    ref32 = sparse_decode_reference(*args, dtype=torch.float32)
    _assert_float32_noise(out, ref64, ref32, f"seed {seed}")


@pytest.mark.parametrize("coef, kcs, vcs, rope", DECODE_CASES)
def test_sparse_decode_matches_reference(seed, coef, kcs, vcs, rope):
    # Ragged: a long sequence over several splits, one whose tail is all of it, one with none.
    # g = 3 query heads per KV head: the kernel pads them to 4 and masks the padding.
    _decode_case(seed, coef, kcs, vcs, rope, seq_lens=[29, 5, 13], n_tail=[4, 5, 0], h=2, g=3,
                 d=32, a=64, bs=4, split=8)


@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU")
@pytest.mark.parametrize("rope", ["post", "pre"])
def test_sparse_decode_real_shapes(seed, rope):
    _decode_case(seed, "fp8", (1, 12), (1, 12), rope, seq_lens=[4100, 70, 2049, 1],
                 n_tail=[128, 64, 1, 1], h=8, g=4, d=128, a=8192, bs=16, split=1024)


@pytest.mark.parametrize("coef, kcs, vcs, rope", [*DECODE_CASES[:2], DECODE_CASES[4]])
def test_decode_pages_matches_reference(seed, coef, kcs, vcs, rope):
    from csr_vllm.ops.encode import rope_rows
    from csr_vllm.ops.reconstruct import decode_pages
    from csr_vllm.ops.reference import decode_pages_reference

    h, d, a, bs = 2, 32, 64, 4
    kcod, vcod = _codecs(a, d, *kcs, *vcs, coef, "omp")
    kf, vf = _fmts(kcod, vcod)
    # Whole blocks: every slot of the decoded blocks holds a code (not poison bytes).
    cache, table = _paged_codes(seed, kcod, vcod, torch.tensor([12, 8]), h, d, bs, rope)
    used = torch.cat([table[0, :3], table[1, :2]])
    blocks = used[torch.randperm(len(used), device=DEV)[:3]]
    pos0 = torch.randint(0, 50, (3,), device=DEV) * bs
    k_out = torch.full((3, bs, h, d), float("nan"), device=DEV)
    v_out = torch.full_like(k_out, float("nan"))
    tables = rope_rows(torch.arange(60 * bs, device=DEV), d, THETA) if rope == "pre" \
        else (None, None)
    decode_pages(cache, blocks, kcod.atoms, vcod.atoms, kf, vf, k_out, v_out, pos0, *tables,
                 **_ladders(kcod, vcod))
    args = (cache.cpu(), blocks.cpu(), pos0.cpu(), _cpu_codec(kcod), _cpu_codec(vcod),
            rope == "pre", THETA)
    k64, v64 = decode_pages_reference(*args, torch.float64)
    k32, v32 = decode_pages_reference(*args, torch.float32)
    for got, r64, r32 in ((k_out, k64, k32), (v_out, v64, v32)):
        _assert_float32_noise(got, r64, r32, f"seed {seed}")


@pytest.mark.parametrize("coef", ["fp8", "log5"])
def test_custom_ops_fake_impls_and_schema(seed, coef):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from csr_vllm.ops import library  # noqa: F401  (registers torch.ops.csr.*)

    h, g, d, a, bs = 1, 2, 16, 32, 4
    kcod, vcod = _codecs(a, d, 1, 2, 1, 2, coef, "omp")
    kf, vf = _fmts(kcod, vcod)
    lad = (kcod.ladder_table(), vcod.ladder_table())
    seq_lens = torch.tensor([6, 3])
    cache, table = _paged_codes(seed, kcod, vcod, seq_lens, h, d, bs, "post")
    q = torch.randn(2, h * g, d, device=DEV)
    tail = torch.randn(2, 2, h, d, device=DEV)
    dec_args = (q, cache, table, seq_lens.to(DEV), torch.tensor([1, 2], device=DEV), tail, tail,
                kcod.atoms, vcod.atoms, kf.to_ints(), vf.to_ints(), 0.25, None, None, 0, 0, None,
                *lad)
    enc_args = (torch.randn(3, h, d, device=DEV), torch.randn(3, h, d, device=DEV),
                torch.tensor([0, 5, -1], device=DEV), cache.clone(), kcod.atoms, vcod.atoms,
                kf.to_ints(), vf.to_ints(), None, None, None, *lad)
    out = torch.empty(1, bs, h, d, device=DEV)
    pages_args = (cache, table[0, :1].contiguous(), kcod.atoms, vcod.atoms, kf.to_ints(),
                  vf.to_ints(), out, out.clone(), None, None, None, *lad)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.csr.sparse_decode.default, dec_args, test_utils=utils)
    torch.library.opcheck(torch.ops.csr.encode_store.default, enc_args, test_utils=utils)
    torch.library.opcheck(torch.ops.csr.decode_pages.default, pages_args, test_utils=utils)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in dec_args]
        res = torch.ops.csr.sparse_decode(*fake)
    assert res.shape == q.shape and res.dtype == torch.float32


def test_cuda_backend_write_and_decode_glue(seed):
    """The CUDA backend's write and decode paths (positions -> RoPE rows, the in-flight token
    as exact tail, output rows) on the kernels, against the reference. Runs vLLM's Triton
    impl class on CPU tensors: its prefill path (vLLM's unified_attention) is not covered."""
    from unittest import mock

    pytest.importorskip("vllm")
    from csr_vllm.codec.codec import TensorCodec
    from csr_vllm.codec.config import CodecConfig, TensorCodecConfig
    from csr_vllm.codec.dictionary import DictionarySet, ModelShape
    from csr_vllm.engine import cuda_backend as cb
    from csr_vllm.engine.settings import CSRSettings
    from csr_vllm.ops.reference import sparse_decode_reference

    h, g, d, a, bs, layers = 2, 2, 32, 64, 4, 2
    cfg = CodecConfig(key=TensorCodecConfig(a, 1, 3, "fp8"), value=TensorCodecConfig(a, 1, 2, "fp8"),
                      key_rope="pre")
    shape = ModelShape("LlamaForCausalLM", layers, h, d, THETA)
    atoms = [torch.nn.functional.normalize(torch.randn(layers, 1, 1, a, d), dim=-1)
             for _ in range(2)]
    dicts = DictionarySet(cfg, shape, *atoms, {})
    cb.CSRCudaBackend.configure(dicts, CSRSettings(guard_window=0))
    impl = object.__new__(cb.CSRCudaImpl)
    impl.num_heads, impl.head_size, impl.scale = h * g, d, d ** -0.5
    impl.state = cb.DeviceState(dicts, torch.device(DEV), 64, bs, torch.float32, h * g)
    layer = type("Layer", (), {"layer_name": "model.layers.1.self_attn.attn"})()
    seq_lens = torch.tensor([9, 14])
    table = torch.randperm(12, device=DEV)[:8].reshape(2, 4).int()
    slot = lambda r, p: int(table[r, p // bs]) * bs + p % bs  # noqa: E731
    cache = torch.randint(0, 256, (12, h, bs, cfg.slot_bytes()), dtype=torch.uint8, device=DEV)
    # History: every token but the last of each sequence, written through the backend.
    hist = [(r, p) for r in range(2) for p in range(int(seq_lens[r]) - 1)]
    meta = types_meta(len(hist), torch.tensor([p for _, p in hist], device=DEV))
    hk, hv = torch.randn(len(hist), h, d, device=DEV), torch.randn(len(hist), h, d, device=DEV)
    slots = torch.tensor([slot(r, p) for r, p in hist], device=DEV)
    with mock.patch.object(cb, "metadata_of", lambda _layer: meta):
        impl.do_kv_cache_update(layer, hk, hv, cache, slots)
    # Decode step: one new token per sequence.
    q = torch.randn(2, h * g, d, device=DEV)
    nk, nv = torch.randn(2, h, d, device=DEV), torch.randn(2, h, d, device=DEV)
    meta = types_meta(2, (seq_lens - 1).to(DEV), num_decodes=2, block_table=table,
                      seq_lens=seq_lens.to(DEV), seq_lens_cpu=seq_lens,
                      qsl_cpu=torch.tensor([0, 1, 2]))
    new_slots = torch.tensor([slot(r, int(seq_lens[r]) - 1) for r in range(2)], device=DEV)
    out = torch.full((2, h * g * d), float("nan"), device=DEV)
    with mock.patch.object(cb, "metadata_of", lambda _layer: meta):
        impl.do_kv_cache_update(layer, nk, nv, cache, new_slots)
        impl.forward(layer, q, nk, nv, cache, meta, out)
    codecs = [TensorCodec(cfg.key, atoms[0][1, 0]), TensorCodec(cfg.value, atoms[1][1, 0])]
    args = (q.cpu(), cache.cpu(), table.cpu(), seq_lens, torch.ones(2, dtype=torch.long),
            nk.cpu()[:, None], nv.cpu()[:, None], *codecs, d ** -0.5, True, THETA)
    ref64 = sparse_decode_reference(*args, dtype=torch.float64)
    ref32 = sparse_decode_reference(*args, dtype=torch.float32)
    _assert_float32_noise(out, ref64, ref32, f"seed {seed}")


def types_meta(n, positions, num_decodes=0, block_table=None, seq_lens=None, seq_lens_cpu=None,
               qsl_cpu=None):
    """The fields of CSRCudaMetadata the write and decode paths read."""
    import types

    return types.SimpleNamespace(num_actual_tokens=n, csr_positions=positions,
                                 csr_num_decodes=num_decodes, block_table=block_table,
                                 seq_lens=seq_lens, csr_seq_lens_cpu=seq_lens_cpu,
                                 csr_query_start_loc_cpu=qsl_cpu)
