"""The native CPU kernels (csr_vllm/native) against the PyTorch reference codec.

Random dictionaries and vectors at head_dim 64 and 128, every coefficient format the kernels
take, pre- and post-RoPE keys; decode attention against float64 attention over the
reference's reconstruction, with the exact overrides (the step's own token, the dense window).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
import sys
import sysconfig

import pytest
import torch

from csr_vllm import native
from csr_vllm.codec.codec import SparseCode, TensorCodec
from csr_vllm.codec.coefficients import ladder_tops
from csr_vllm.codec.config import TensorCodecConfig
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope

OPS = native.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"native kernels unavailable: {native.error()}")

THETA = 10000.0


def make_codec(gen, d: int, atoms: int, s: int, coef: str, pursuit: str = "omp",
               bf16_atoms: bool = False) -> TensorCodec:
    """A random codec; ``bf16_atoms``: atoms exactly representable in bf16 (the kernels'
    bf16 path then reads the reference's own values)."""
    cfg = TensorCodecConfig(atoms, 1, s, coef, pursuit)
    a = torch.randn(1, atoms, d, generator=gen)
    a = a / a.norm(dim=-1, keepdim=True)
    if bf16_atoms:
        a = a.to(torch.bfloat16).float()
    ladder = None
    if cfg.coef_format.uses_ladder:
        train = torch.randn(400, d, generator=gen) * torch.linspace(2, 0.2, d)
        ladder = ladder_tops(train, a[0])[s - 1, :s][None]
    return TensorCodec(cfg, a, ladder)


def ladder_of(codec: TensorCodec) -> torch.Tensor:
    table = codec.ladder_table()
    return table[0] if table is not None else torch.empty(0)


def correlation_layouts() -> list[str]:
    """The correlation tables this build takes (fp32 always; bf16 / int8 per instruction set)."""
    return native.correlation_layouts(OPS) if OPS is not None else ["fp32"]


def encode_native(codec: TensorCodec, x: torch.Tensor, positions: torch.Tensor | None,
                  offset: int = 0, extra: int = 0,
                  layout: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H, D] -> (slots [N, H, bytes] as stored, rel_err [N, H]); the codec's screened
    search when it has one."""
    """x [N, H, D] -> (slots [N, H, bytes] as stored, rel_err [N, H])."""
    n, h, d = x.shape
    cfg = codec.config
    cache = torch.full((n, h, 1, offset + cfg.slot_bytes + extra), 0xA5, dtype=torch.uint8)
    cos = sin = torch.empty(0)
    if positions is not None:
        cos, sin = rope_tables(d, THETA, torch.arange(int(positions.max()) + 1))
    atoms = codec.atoms[0]
    atoms_t, corr_scale = native.correlation_table(atoms, layout)
    screen = codec.clusters[0] if codec.clusters else None
    err = OPS.encode_store(x, positions if positions is not None else torch.zeros(n, dtype=torch.long),
                           cos, sin, atoms, atoms_t, corr_scale, ladder_of(codec), cache,
                           torch.arange(n), native.format_ints(cfg, offset), cfg.pursuit == "omp",
                           positions is not None, screen.centroids if screen else None,
                           screen.offsets if screen else None, screen.probes if screen else 0)
    return cache[:, :, 0], err


def codes_both_ways(codec: TensorCodec, x: torch.Tensor, layout: str):
    """x [N, H, D] coded by the native encoder and the reference: (native slots [N*H, bytes],
    native errors [N, H], reference code, native code unpacked, rows whose picks agree)."""
    d = x.shape[-1]
    slots, err = encode_native(codec, x, None, layout=layout)
    slots = slots.reshape(-1, codec.config.slot_bytes)
    ref = codec.encode(x.reshape(-1, d))
    got = codec.unpack(slots)
    return slots, err, ref, got, (got.indices == ref.indices).all(-1).all(-1)


def screened(codec: TensorCodec, spec: str) -> TensorCodec:
    """The codec with the screened search ``spec`` (its atoms ordered by cluster)."""
    from csr_vllm.codec.search import SearchSpec, cluster_atoms

    k = SearchSpec.parse(spec).clusters
    order, cent, off = cluster_atoms(codec.atoms[0], k)
    return TensorCodec(dataclasses.replace(codec.config, search=spec), codec.atoms[:, order],
                       codec.ladder, (cent[None], off[None]))


@pytest.mark.parametrize("d,coef,s,pursuit", [(64, "log5", 7, "omp"), (128, "log5", 14, "omp"),
                                              (64, "fp8", 5, "mp")])
@pytest.mark.parametrize("spec", ["32/4", "50/7"])
@pytest.mark.parametrize("layout", correlation_layouts())
def test_screened_search_equals_the_reference(gen, d, coef, s, pursuit, spec, layout):
    # Clusters of uneven sizes (not multiples of the kernels' 16 atom lanes), the last one
    # ending at the table's end: every range path of the kernel.
    codec = screened(make_codec(gen, d, 1000, s, coef, pursuit), spec)
    x = torch.randn(40, 3, d, generator=gen) * torch.linspace(2, 0.2, d)
    slots, err, ref, got, same = codes_both_ways(codec, x, layout)
    # Measured 96.7-98.3% at 14 atoms (int8): two sources of near-ties now, the atom and the
    # cluster; where picks differ, the native one must be a near-tie of the reference's.
    assert same.float().mean() >= 0.95
    assert torch.equal(codec.pack(ref)[same], slots[same])
    if pursuit == "omp":
        from csr_vllm.codec.pursuit import least_squares_coefficients

        atoms, xs = codec.atoms[0], x.reshape(-1, d)
        for i in torch.nonzero(~same)[:, 0]:
            r_idx, g_idx = ref.indices[i, 0], got.indices[i, 0]
            k = int((r_idx != g_idx).nonzero()[0])
            r = xs[i]
            if k:  # OMP picks off the least-squares residual of the picks so far
                c = least_squares_coefficients(xs[i:i + 1], atoms, r_idx[None, :k])[0]
                r = r - (c[:, None] * atoms[r_idx[:k]]).sum(0)
            assert abs(float(r @ atoms[g_idx[k]])) >= 0.97 * abs(float(r @ atoms[r_idx[k]]))
    # The screen is real: the full search's codes are not these.
    full = TensorCodec(dataclasses.replace(codec.config, search="full"), codec.atoms,
                       codec.ladder).encode(x.reshape(-1, d))
    assert (full.indices != ref.indices).any(-1).any(-1).float().mean() > 0.3
    rec = codec.decode(ref)
    ref_err = (x.reshape(-1, d) - rec).norm(dim=-1) / x.reshape(-1, d).norm(dim=-1)
    torch.testing.assert_close(err.reshape(-1)[same], ref_err[same], atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("d,coef,s,pursuit", [
    (64, "log5", 7, "omp"), (64, "fp8", 6, "omp"), (64, "fp16", 3, "omp"),
    (128, "log5", 14, "omp"), (128, "log3", 9, "omp"), (64, "log4", 4, "omp"),
    (64, "fp8", 5, "mp"), (128, "log5", 6, "mp")])
@pytest.mark.parametrize("layout", correlation_layouts())
def test_encode_store_equals_the_reference_pursuit(gen, d, coef, s, pursuit, layout):
    codec = make_codec(gen, d, 1024, s, coef, pursuit)
    x = torch.randn(40, 3, d, generator=gen) * torch.linspace(2, 0.2, d)
    slots, err, ref, got, same = codes_both_ways(codec, x, layout)
    # Atom choices may differ only at near-ties (least squares by Gram-Schmidt, not LU).
    assert same.float().mean() >= 0.97
    assert torch.equal(got.coefs[same], ref.coefs[same])
    assert torch.equal(codec.pack(ref)[same], slots[same])
    rec = codec.decode(ref)
    ref_err = (x.reshape(-1, d) - rec).norm(dim=-1) / x.reshape(-1, d).norm(dim=-1)
    torch.testing.assert_close(err.reshape(-1)[same], ref_err[same], atol=1e-5, rtol=1e-4)
    assert (err > 0.05).all()  # a real (lossy) code: the comparison is not vacuous


@pytest.mark.parametrize("atoms", [1024, 1040, 1030])
@pytest.mark.parametrize("layout", correlation_layouts())
def test_encode_store_codes_a_row_alike_in_any_batch(gen, atoms, layout):
    # A decode step codes a handful of rows (one token's heads), which the correlation
    # kernels take through their few-row paths (two atom groups per pass, then a last group
    # and a scalar tail for the atom counts here); a prefill codes them in full tiles. A row's
    # code must not depend on which path or neighbours it had.
    codec = make_codec(gen, 64, atoms, 7, "log5")
    x = torch.randn(12, 3, 64, generator=gen) * torch.linspace(2, 0.2, 64)
    batch, batch_err = encode_native(codec, x, None, layout=layout)
    for i in range(len(x)):
        one, one_err = encode_native(codec, x[i:i + 1], None, layout=layout)
        assert torch.equal(one[0], batch[i])
        torch.testing.assert_close(one_err[0], batch_err[i], atol=0, rtol=0)


def test_the_blocked_int8_table_holds_the_strided_tables_entries(gen):
    """AVX2's [A/16, D/4, 16, 4] table: the same entries and scales as VNNI's [D/4, A, 4], the
    atoms past A (padding to 16) zero with scale 0."""
    atoms = torch.randn(1030, 64, generator=gen)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    strided, scale = native.correlation_table(atoms, "int8")
    blocked, blocked_scale = native.correlation_table(atoms, "int8-blocked")
    assert blocked.shape == (65, 16, 16, 4) and blocked_scale.shape == (1040,)
    per_atom = blocked.permute(0, 2, 1, 3).reshape(1040, 64)
    assert torch.equal(per_atom[:1030], strided.permute(1, 0, 2).reshape(1030, 64))
    assert (per_atom[1030:] == 128).all() and (blocked_scale[1030:] == 0).all()
    assert torch.equal(blocked_scale[:1030], scale)


@pytest.mark.skipif(OPS is None or "amx" not in OPS.isa(), reason="no AMX in this build or CPU")
@pytest.mark.parametrize("d,s", [(64, 7), (128, 14), (256, 9)])
@pytest.mark.parametrize("rows", [1, 5, 16, 37])
def test_amx_tiles_code_exactly_as_the_vnni_kernel(gen, d, s, rows):
    """AMX over the blocked table computes VNNI's int32 sums and updates the lanes in the same
    order, so every slot and error is bit-equal to the VNNI kernel's (not only near-tie
    close to the reference's); 1030 atoms: a last partial group of 16."""
    codec = make_codec(gen, d, 1030, s, "log5")
    x = torch.randn(rows, 3, d, generator=gen) * torch.linspace(2, 0.2, d)
    vnni, vnni_err = encode_native(codec, x, None, layout="int8")
    amx, amx_err = encode_native(codec, x, None, layout="int8-blocked")
    assert torch.equal(amx, vnni)
    torch.testing.assert_close(amx_err, vnni_err, atol=0, rtol=0)


@pytest.mark.skipif(OPS is None or len({"int8", "int8-blocked"} & set(correlation_layouts())) != 1,
                    reason="this build takes no int8 table, or both (AMX)")
def test_encode_store_refuses_the_other_int8_layout(gen):
    """An int8 table in the layout the other tier takes is refused by name, not misread."""
    taken = "int8" if "int8" in correlation_layouts() else "int8-blocked"
    other = "int8-blocked" if taken == "int8" else "int8"
    codec = make_codec(gen, 64, 1024, 2, "fp16")
    x = torch.randn(1, 1, 64, generator=gen)
    with pytest.raises(RuntimeError, match=f"layout {taken}"):
        encode_native(codec, x, None, layout=other)


@pytest.mark.parametrize("layout", correlation_layouts())
def test_encode_store_finds_the_last_atoms_of_a_dictionary_not_a_multiple_of_16(gen, layout):
    """Atoms in a group of 16 past the dictionary's end (the blocked table's padding) are never
    picked; the real last ones are."""
    codec = make_codec(gen, 64, 1030, 2, "fp16")
    a = codec.atoms[0]
    x = (3.0 * a[1029] + 1.0 * a[1026])[None, None]
    slots, _ = encode_native(codec, x, None, layout=layout)
    assert sorted(codec.unpack(slots.reshape(1, -1)).indices.flatten().tolist()) == [1026, 1029]


@pytest.mark.parametrize("layout", correlation_layouts())
def test_encode_store_undoes_rope_and_writes_only_its_bytes(gen, layout):
    d = 64
    codec = make_codec(gen, d, 512, 5, "log5")
    x = torch.randn(30, 2, d, generator=gen)
    pos = torch.randint(0, 4000, (30,), generator=gen)
    slots, _ = encode_native(codec, x.to(torch.bfloat16), pos, offset=3, extra=2, layout=layout)
    cos, sin = rope_tables(d, THETA, pos)
    pre = undo_rope(x.to(torch.bfloat16).float(), cos[:, None], sin[:, None])
    ref = codec.pack(codec.encode(pre.reshape(-1, d))).reshape(30, 2, -1)
    same = (slots[..., 3:3 + codec.config.slot_bytes] == ref).all(-1)
    assert same.float().mean() >= 0.97
    assert (slots[..., :3] == 0xA5).all() and (slots[..., -2:] == 0xA5).all()


def test_encode_store_rejects_bad_input(gen):
    codec = make_codec(gen, 64, 256, 3, "fp8")
    cache = torch.zeros(4, 2, 1, 8, dtype=torch.uint8)
    atoms = codec.atoms[0]
    args = dict(positions=torch.zeros(4, dtype=torch.long), rope_cos=torch.empty(0),
                rope_sin=torch.empty(0), atoms=atoms, atoms_t=atoms.t().contiguous(),
                corr_scale=torch.empty(0), ladder=torch.empty(0), undo_rope=False)
    with pytest.raises(RuntimeError, match="fit in the slot"):  # code wider than the slot
        OPS.encode_store(torch.randn(4, 2, 64), kv_cache=cache, slots=torch.arange(4),
                         fmt=native.format_ints(codec.config, 4), omp=True, **args)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        OPS.encode_store(torch.randn(4, 2, 64), kv_cache=cache, slots=torch.tensor([0, 1, 2, 9]),
                         fmt=native.format_ints(codec.config, 0), omp=True, **args)


def random_pages(gen, kc: TensorCodec, vc: TensorCodec, blocks: int, h: int, bs: int):
    """Pages [blocks, H, BS, Ck + Cv] of valid random codes."""
    n = blocks * h * bs
    parts = []
    for c in (kc, vc):
        s = c.config.atoms_per_chunk
        idx = torch.randint(0, c.config.num_atoms, (n, 1, s), generator=gen)
        vals = torch.randn(n, 1, s, generator=gen) * 0.5
        coef = c.fmt.roundtrip(vals.reshape(n, -1), None, c._tops).reshape(n, 1, s)
        parts.append(c.pack(SparseCode(idx, coef, None)))
    return torch.cat(parts, 1).reshape(blocks, h, bs, -1).contiguous()


def reference_kv(kc, vc, pages, phys, pos, pre_rope):
    """Decoded K (post-RoPE), V [T, H, D] of physical slots [T] at positions [T]."""
    bs = pages.shape[2]
    sl = pages[phys // bs, :, phys % bs]
    t, h, _ = sl.shape
    kb = kc.config.slot_bytes
    k = kc.decode(kc.unpack(sl[..., :kb].reshape(t * h, -1))).reshape(t, h, -1)
    v = vc.decode(vc.unpack(sl[..., kb:].reshape(t * h, -1).contiguous())).reshape(t, h, -1)
    if pre_rope:
        cos, sin = rope_tables(k.shape[-1], THETA, pos)
        k = apply_rope(k, cos[:, None], sin[:, None])
    return k, v


# bf16 atoms at head_dim 64 / 128 / 256: the vectorised rows; fp32 and head_dim 96: the scalar ones.
@pytest.mark.parametrize("d,pre_rope,atom_dtype,out_dtype", [
    (64, True, torch.float32, torch.float32), (128, True, torch.float32, torch.float32),
    (64, False, torch.float32, torch.float32), (64, True, torch.bfloat16, torch.float32),
    (128, True, torch.bfloat16, torch.bfloat16), (256, False, torch.bfloat16, torch.float32),
    (96, True, torch.bfloat16, torch.float32)])
def test_decode_dense_equals_the_reference_decode(gen, d, pre_rope, atom_dtype, out_dtype):
    bf16 = atom_dtype == torch.bfloat16
    kc = make_codec(gen, d, 512, 7, "log5", bf16_atoms=bf16)
    vc = make_codec(gen, d, 512, 5, "fp8", bf16_atoms=bf16)
    h, bs = 3, 16
    pages = random_pages(gen, kc, vc, 10, h, bs)
    blocks, counts = torch.tensor([3, 7, 1]), torch.tensor([16, 16, 5])
    pos0 = torch.tensor([0, 16, 32])
    out_k = torch.full((3 * bs, h, d), 7.0, dtype=out_dtype)
    out_v = out_k.clone()
    cos, sin = rope_tables(d, THETA, torch.arange(64))
    OPS.decode_dense(pages, blocks, counts, pos0, native.format_ints(kc.config, 0),
                     native.format_ints(vc.config, kc.config.slot_bytes),
                     kc.atoms[0].to(atom_dtype), ladder_of(kc), vc.atoms[0].to(atom_dtype),
                     ladder_of(vc), cos, sin, pre_rope, out_k, out_v)
    phys = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)
    pos = (pos0[:, None] + torch.arange(bs)).reshape(-1)
    rk, rv = reference_kv(kc, vc, pages, phys, pos, pre_rope)
    written = (torch.arange(bs)[None] < counts[:, None]).reshape(-1)
    if out_dtype == torch.bfloat16:  # the reference rounded as the kernel rounds its output
        rk, rv = rk.to(out_dtype), rv.to(out_dtype)
    tol = {"atol": 2e-6, "rtol": 1e-5} if out_dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(out_k[written], rk[written], **tol)
    torch.testing.assert_close(out_v[written], rv[written], **tol)
    assert (out_k[~written] == 7.0).all()  # slots past a block's count are not touched


# g 1-4 / 5-8 / 9-16: the kernel's 4-, 8- and 16-lane score groups; 20 key atoms and fp16
# values: the code reader's scalar path and its fp16 branch (the rest take the vector reader).
@pytest.mark.parametrize("d,g,pre_rope,atom_dtype,key_s,value_coef", [
    (64, 3, True, torch.float32, 7, "fp8"), (64, 3, True, torch.bfloat16, 7, "fp8"),
    (128, 6, True, torch.float32, 7, "fp8"), (64, 1, False, torch.float32, 7, "fp8"),
    (128, 4, False, torch.bfloat16, 7, "fp8"), (96, 2, True, torch.float32, 7, "fp8"),
    (64, 12, True, torch.bfloat16, 7, "fp16"), (256, 8, True, torch.bfloat16, 20, "log4")])
def test_decode_attention_equals_float64_attention(gen, d, g, pre_rope, atom_dtype, key_s,
                                                   value_coef):
    kc, vc = make_codec(gen, d, 512, key_s, "log5"), make_codec(gen, d, 512, 6, value_coef)
    h, bs, nb = 2, 16, 80
    pages = random_pages(gen, kc, vc, nb, h, bs)
    lens = torch.tensor([1100, 17, 1, 600])  # 1100 and 600 span several splits
    b = len(lens)
    table = torch.stack([torch.randperm(nb, generator=gen)[:70] for _ in range(b)])
    rows = torch.tensor([2, 0, 3, 1])  # requests' query rows, out of order
    q = torch.randn(b, h * g, d, generator=gen).to(torch.bfloat16)
    own_k, own_v = (torch.randn(b, h, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    w, cap = 8, 4
    store = torch.randn(cap, h, bs, 2, d, generator=gen).to(torch.bfloat16)
    win_index = torch.full((b, w), -1, dtype=torch.long)
    win_index[0, 2], win_index[0, 7], win_index[1, 0], win_index[3, 5] = 19, 2 * bs + 9, 5, 50
    out = torch.zeros(b, h * g, d, dtype=torch.float32)
    cos, sin = rope_tables(d, THETA, torch.arange(2048))
    scale = 1 / math.sqrt(d)
    OPS.decode_attention(q, pages, table, lens, rows, native.format_ints(kc.config, 0),
                         native.format_ints(vc.config, kc.config.slot_bytes),
                         kc.atoms[0].to(atom_dtype), ladder_of(kc), vc.atoms[0].to(atom_dtype),
                         ladder_of(vc), cos, sin, pre_rope, store, win_index, own_k, own_v, scale,
                         out)
    tol = 2e-3 if atom_dtype == torch.bfloat16 else 2e-5
    for i in range(b):
        t, row = int(lens[i]), int(rows[i])
        pos = torch.arange(t)
        k, v = reference_kv(kc, vc, pages, table[i, pos // bs] * bs + pos % bs, pos, pre_rope)
        for j in range(w):
            e, p = int(win_index[i, j]), t - 1 - w + j
            if e >= 0 and p >= 0:
                k[p], v[p] = store[e // bs, :, e % bs, 0].float(), store[e // bs, :, e % bs, 1].float()
        k[t - 1], v[t - 1] = own_k[row].float(), own_v[row].float()
        qq = q[row].double().reshape(h, g, d)
        p = (torch.einsum("hgd,thd->hgt", qq, k.double()) * scale).softmax(-1)
        want = torch.einsum("hgt,thd->hgd", p, v.double()).reshape(h * g, d)
        torch.testing.assert_close(out[row].double(), want, atol=tol, rtol=tol)


def test_a_failed_build_warns_once_and_falls_back():
    code = ("import warnings, csr_vllm.native as n\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert n.load() is None and n.load() is None\n"
            "print(len(w), n.error())\n")
    env = dict(os.environ, CSR_VLLM_NATIVE_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("1 ") and "CSR_VLLM_NATIVE_DISABLE" in out


# Every instruction-set tier the kernels have: AVX-512 (VNNI, BF16), AVX2 (its own int8
# correlation and the 16-lane kernels as ymm pairs), and none. The default build covers this
# CPU's tier; the others are built here too (a build that failed only on other CPUs once sent
# every AVX2 machine to the reference path): run where this CPU can, else compiled only.
TIERS = {"sapphirerapids": ("avx512_vnni_bf16_amx", {"avx512f", "avx512_vnni", "avx512_bf16", "avx512bw", "amx_tile", "amx_int8"}),
         "x86-64-v3": ("avx2", {"avx2", "fma"}), "x86-64": ("generic", set())}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction-set tiers")
@pytest.mark.parametrize("march", list(TIERS))
def test_every_instruction_set_tier_builds_and_matches_the_reference(march, tmp_path):
    isa, flags = TIERS[march]
    if OPS.isa() == isa:
        pytest.skip("this CPU's own build, tested above")
    cpu_flags = set(native._cpu_flags().split())
    if not flags <= cpu_flags:  # cannot run here: the compiler must still take it
        from torch.utils import cpp_extension
        inc = [f"-I{p}" for p in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]]
        subprocess.run(["c++", "-fsyntax-only", "-std=c++20", "-O3", f"-march={march}", "-fopenmp",
                        *inc, str(native.SOURCE)], check=True, capture_output=True, text=True)
        return
    env = dict(os.environ, CSR_VLLM_NATIVE_MARCH=march)
    check = f"from csr_vllm import native; ops = native.load(); assert ops and ops.isa() == {isa!r}, native.error()"
    subprocess.run([sys.executable, "-c", check], env=env, check=True, capture_output=True, text=True)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "(reference or float64 or alike) and not tier"], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
