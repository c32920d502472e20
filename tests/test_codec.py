"""The codec core: pursuit, coefficient formats, bit packing, slot sizes, presets and RoPE."""

import dataclasses
import math

import pytest
import torch

from csr_vllm.codec import pursuit as pursuit_mod
from csr_vllm.codec.codec import SparseCode, TensorCodec
from csr_vllm.codec.coefficients import CoefFormat, ladder_tops
from csr_vllm.codec.config import (
    PRESETS,
    CodecConfig,
    Preset,
    TensorCodecConfig,
    get_preset,
)
from csr_vllm.codec.packing import (
    index_bits,
    pack_fields,
    unpack_fields,
    unpack_fields_reference,
)
from csr_vllm.codec.pursuit import (
    PURSUITS,
    best_atom,
    matching_pursuit,
    orthogonal_matching_pursuit,
    reconstruct,
)
from csr_vllm.codec.rope import apply_rope, rope_tables, undo_rope

ALL_FORMATS = ["fp16", "fp8", "int3", "int4", "int5", "int6", "int7", "int8"]


def make_quantizer(fmt, scale, top=None):
    """quantize(c, k) for a pursuit; ``top`` [S]: a logB format's ladder tops."""
    return lambda c, k: fmt.roundtrip(c[:, None], scale,
                                      top[k : k + 1] if top is not None else None)[:, 0]


def relative_error(x, x_hat):
    return ((x - x_hat).norm(dim=1) / x.norm(dim=1)).mean().item()


def orthonormal_rows(n, gen, dtype=torch.float32):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.T.contiguous().to(dtype)


def low_rank_data(n, d, rank, gen, noise=0.05):
    basis = torch.randn(rank, d, generator=gen)
    return torch.randn(n, rank, generator=gen) @ basis + noise * torch.randn(n, d, generator=gen)


# -- pursuit -----------------------------------------------------------------------------------


def test_mp_one_atom_picks_largest_absolute_correlation(gen, unit_atoms):
    atoms = unit_atoms(8, 4)
    x = torch.randn(64, 4, generator=gen)
    idx, coef = matching_pursuit(x, atoms, 1)
    for n in range(x.shape[0]):
        corr = [float(x[n] @ atoms[j]) for j in range(atoms.shape[0])]
        best = max(range(len(corr)), key=lambda j: abs(corr[j]))
        assert idx[n, 0].item() == best
        assert coef[n, 0].item() == pytest.approx(corr[best], abs=1e-6)


def test_mp_two_atoms_matches_brute_force_greedy(gen, unit_atoms):
    atoms = unit_atoms(8, 4, dtype=torch.float64)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    idx, coef = matching_pursuit(x, atoms, 2)
    for n in range(x.shape[0]):
        residual = x[n].clone()
        for k in range(2):
            corr = [float(residual @ atoms[j]) for j in range(atoms.shape[0])]
            best = max(range(len(corr)), key=lambda j: abs(corr[j]))
            assert idx[n, k].item() == best
            assert coef[n, k].item() == pytest.approx(corr[best], abs=1e-12)
            residual = residual - corr[best] * atoms[best]


def test_best_atom_row_blocks_agree_with_one_block(gen, unit_atoms, monkeypatch):
    atoms = unit_atoms(8, 4)
    x = torch.randn(50, 4, generator=gen)
    whole_idx, whole_corr = best_atom(x, atoms)
    monkeypatch.setattr(pursuit_mod, "BLOCK_ENTRIES", 7 * 8)  # 7 rows of 8 atoms
    block_idx, block_corr = best_atom(x, atoms)
    assert torch.equal(whole_idx, block_idx)
    torch.testing.assert_close(whole_corr, block_corr)  # BLAS blocking may differ by 1 ulp
    assert torch.equal(whole_idx, (x @ atoms.T).abs().argmax(dim=1))


@pytest.mark.parametrize("s", [1, 2, 3])
def test_omp_coefficients_are_least_squares_on_their_support(gen, unit_atoms, s):
    atoms = unit_atoms(16, 8, dtype=torch.float64)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    idx, coef = orthogonal_matching_pursuit(x, atoms, s)
    assert idx.shape == coef.shape == (40, s)
    for n in range(x.shape[0]):
        support = atoms[idx[n]].T  # [D, s]
        expected = torch.linalg.lstsq(support, x[n, :, None]).solution[:, 0]
        torch.testing.assert_close(coef[n], expected, atol=1e-4, rtol=1e-4)


def test_omp_first_atom_is_the_mp_atom(gen, unit_atoms):
    atoms = unit_atoms(32, 8)
    x = torch.randn(100, 8, generator=gen)
    mp_idx, _ = matching_pursuit(x, atoms, 3)
    omp_idx, _ = orthogonal_matching_pursuit(x, atoms, 3)
    assert torch.equal(mp_idx[:, 0], omp_idx[:, 0])


@pytest.mark.parametrize("s", [2, 3, 4])
def test_omp_error_is_at_most_mp_error_on_average(gen, unit_atoms, s):
    atoms = unit_atoms(64, 16)
    x = torch.randn(512, 16, generator=gen)
    mp_err = relative_error(x, reconstruct(*matching_pursuit(x, atoms, s), atoms))
    omp_err = relative_error(x, reconstruct(*orthogonal_matching_pursuit(x, atoms, s), atoms))
    assert omp_err <= mp_err


@pytest.mark.parametrize("pursuit", ["mp", "omp"])
@pytest.mark.parametrize("s", [1, 2])
def test_scaled_atom_is_reconstructed_exactly(gen, unit_atoms, pursuit, s):
    atoms = unit_atoms(16, 8)
    which = torch.randint(0, 16, (20,), generator=gen)
    scale = torch.randn(20, generator=gen) * 5
    x = scale[:, None] * atoms[which]
    idx, coef = PURSUITS[pursuit](x, atoms, s)
    assert torch.equal(idx[:, 0], which)
    # Once x is matched the residual is ~0, and OMP may re-pick the same atom and split the
    # weight between the copies (ridge), so compare the total weight on the true atom.
    on_atom = (coef * (idx == which[:, None])).sum(1)
    torch.testing.assert_close(on_atom, scale, atol=1e-5, rtol=1e-5)
    off_atom = coef * (idx != which[:, None])
    torch.testing.assert_close(off_atom, torch.zeros_like(off_atom), atol=1e-5, rtol=0)
    torch.testing.assert_close(reconstruct(idx, coef, atoms), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pursuit", ["mp", "omp"])
@pytest.mark.parametrize("fmt_name", ["fp16", "fp8", "int3", "int4", "int8"])
def test_quantised_pursuit_coefficients_are_representable(gen, unit_atoms, pursuit, fmt_name):
    fmt = CoefFormat(fmt_name)
    atoms = unit_atoms(32, 8)
    x = torch.randn(64, 8, generator=gen) * 3
    scale = fmt.scale_for(x) if fmt.has_scale else None
    idx, coef = PURSUITS[pursuit](x, atoms, 3, make_quantizer(fmt, scale))
    assert torch.equal(fmt.roundtrip(coef, scale), coef)
    assert torch.equal(fmt.decode(fmt.encode(coef, scale), scale, coef.dtype), coef)
    if fmt.has_scale:
        steps = coef / scale[:, None] * fmt.qmax
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)


def test_reconstruct_is_the_weighted_sum_of_atoms(gen, unit_atoms):
    atoms = unit_atoms(10, 6)
    idx = torch.randint(0, 10, (5, 3), generator=gen)
    coef = torch.randn(5, 3, generator=gen)
    expected = torch.stack(
        [sum(coef[n, k] * atoms[idx[n, k]] for k in range(3)) for n in range(5)]
    )
    torch.testing.assert_close(reconstruct(idx, coef, atoms), expected)
    torch.testing.assert_close(reconstruct(idx, coef, atoms),
                               torch.einsum("ns,nsd->nd", coef, atoms[idx]))


# -- encode / decode round trips -----------------------------------------------------------------


@pytest.mark.parametrize("pursuit", ["mp", "omp"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_orthonormal_basis_with_full_support_is_near_exact(gen, pursuit, chunks):
    d = 16
    dc = d // chunks
    atoms = torch.stack([orthonormal_rows(dc, gen) for _ in range(chunks)])
    cfg = TensorCodecConfig(num_atoms=dc, chunks=chunks, atoms_per_chunk=dc, coef="fp16",
                            pursuit=pursuit)
    x = torch.randn(200, d, generator=gen)
    x_hat = TensorCodec(cfg, atoms).roundtrip(x)
    per_vector = (x - x_hat).norm(dim=1) / x.norm(dim=1)
    assert per_vector.max().item() < 1e-3


@pytest.mark.parametrize("data", ["random", "low_rank"])
@pytest.mark.parametrize("pursuit", ["mp", "omp"])
@pytest.mark.parametrize("coef", ["fp16", "fp8", "int8"])
def test_error_decreases_as_atoms_per_vector_grow(gen, unit_atoms, data, pursuit, coef):
    d = 16
    x = torch.randn(400, d, generator=gen) if data == "random" else low_rank_data(400, d, 4, gen)
    atoms = unit_atoms(1, 64, d)
    errors = []
    for s in (1, 2, 4, 8):
        cfg = TensorCodecConfig(num_atoms=64, chunks=1, atoms_per_chunk=s, coef=coef,
                                pursuit=pursuit)
        errors.append(relative_error(x, TensorCodec(cfg, atoms).roundtrip(x)))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_encode_shapes_and_dim_check(gen, unit_atoms):
    cfg = TensorCodecConfig(num_atoms=16, chunks=2, atoms_per_chunk=3, coef="int5")
    codec = TensorCodec(cfg, unit_atoms(2, 16, 4))
    assert codec.head_dim == 8
    code = codec.encode(torch.randn(7, 8, generator=gen))
    assert code.indices.shape == code.coefs.shape == (7, 2, 3)
    assert code.indices.dtype == torch.int64
    assert code.scale.shape == (7,)
    with pytest.raises(ValueError, match="dim 8"):
        codec.encode(torch.randn(7, 6, generator=gen))


def test_codec_rejects_atoms_not_matching_config(unit_atoms):
    cfg = TensorCodecConfig(num_atoms=16, chunks=2, atoms_per_chunk=1)
    with pytest.raises(ValueError, match="does not match config"):
        TensorCodec(cfg, unit_atoms(1, 16, 8))
    with pytest.raises(ValueError, match="does not match config"):
        TensorCodec(cfg, unit_atoms(2, 15, 4))


# -- bit packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_bytes", [0, 2])
def test_pack_unpack_fields_roundtrip_odd_widths(gen, extra_bytes):
    layout = [(1, 1), (3, 3), (2, 12), (5, 13), (4, 16), (1, 3)]
    fields = [(torch.randint(0, 1 << bits, (33, k), generator=gen), bits) for k, bits in layout]
    num_bytes = math.ceil(sum(k * bits for k, bits in layout) / 8) + extra_bytes
    packed = pack_fields(fields, num_bytes)
    assert packed.shape == (33, num_bytes)
    assert packed.dtype == torch.uint8
    out = unpack_fields(packed, layout)
    for (values, _), got in zip(fields, out, strict=True):
        assert torch.equal(values, got)


def test_fast_unpack_equals_bit_level_reference_on_random_bytes(gen):
    layout = [(1, 16), (6, 8), (6, 13), (2, 17), (3, 5)]
    nbytes = math.ceil(sum(k * b for k, b in layout) / 8)
    packed = torch.randint(0, 256, (257, nbytes), generator=gen, dtype=torch.uint8)
    for a, b in zip(unpack_fields(packed, layout), unpack_fields_reference(packed, layout),
                    strict=True):
        assert torch.equal(a, b)


def test_pack_fields_extreme_values_roundtrip():
    layout = [(2, 1), (2, 3), (2, 12), (2, 13), (2, 16)]
    fields = [(torch.tensor([[0, (1 << b) - 1], [(1 << b) - 1, 0]]), b) for _, b in layout]
    out = unpack_fields(pack_fields(fields, 12), layout)
    for (values, _), got in zip(fields, out, strict=True):
        assert torch.equal(values, got)


def test_pack_fields_is_lsb_first_bit_stream():
    # 1 (1 bit) then 5 = 0b101 (3 bits) then 0x1FF (9 bits): stream 1,1,0,1,1,1,1,1,1,1,1,1,1
    fields = [(torch.tensor([[1]]), 1), (torch.tensor([[5]]), 3), (torch.tensor([[0x1FF]]), 9)]
    packed = pack_fields(fields, 2)
    assert packed.tolist() == [[0b11111011, 0b00011111]]


def test_pack_fields_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="out of range"):
        pack_fields([(torch.tensor([[8]]), 3)], 1)
    with pytest.raises(ValueError, match="out of range"):
        pack_fields([(torch.tensor([[-1]]), 3)], 1)
    with pytest.raises(ValueError, match="out of range"):
        pack_fields([(torch.tensor([[0, 1]]), 1), (torch.tensor([[1 << 13]]), 13)], 4)


def test_pack_fields_rejects_too_many_bits():
    fields = [(torch.zeros(2, 1, dtype=torch.int64), 16), (torch.zeros(2, 1, dtype=torch.int64), 1)]
    with pytest.raises(ValueError, match="do not fit"):
        pack_fields(fields, 2)
    assert pack_fields(fields, 3).shape == (2, 3)


@pytest.mark.parametrize("coef", ["fp16", "fp8", "int4", "int5", "int8"])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("pursuit", ["mp", "omp"])
def test_codec_pack_unpack_is_bit_exact(gen, unit_atoms, coef, chunks, pursuit):
    cfg = TensorCodecConfig(num_atoms=40, chunks=chunks, atoms_per_chunk=3, coef=coef,
                            pursuit=pursuit)
    codec = TensorCodec(cfg, unit_atoms(chunks, 40, 16 // chunks))
    x = torch.randn(50, 16, generator=gen) * 4
    code = codec.encode(x)
    packed = codec.pack(code)
    assert packed.shape == (50, cfg.slot_bytes)
    assert packed.dtype == torch.uint8
    back = codec.unpack(packed)
    assert torch.equal(back.indices, code.indices)
    assert torch.equal(back.coefs, code.coefs)
    if cfg.coef_format.has_scale:
        assert torch.equal(back.scale, code.scale)
    else:
        assert back.scale is None
    assert torch.equal(codec.decode(back), codec.decode(code))
    assert torch.equal(codec.pack(back), packed)


@pytest.mark.parametrize("coef", ["int3", "int8"])
def test_packed_slot_starts_with_fp16_scale(gen, unit_atoms, coef):
    """Documented layout: for intB the first 16 bits are the fp16 scale, little-endian."""
    cfg = TensorCodecConfig(num_atoms=32, chunks=1, atoms_per_chunk=2, coef=coef)
    codec = TensorCodec(cfg, unit_atoms(1, 32, 8))
    code = codec.encode(torch.randn(10, 8, generator=gen))
    packed = codec.pack(code)
    scale = packed[:, :2].contiguous().view(torch.float16)[:, 0]
    assert torch.equal(scale.float(), code.scale)


def test_fp16_slot_layout_coefs_then_indices(unit_atoms):
    """fp16, C=1, S=2, A=32 (5-bit indices): bytes 0-3 are two fp16 coefs, then 2x5 index bits."""
    cfg = TensorCodecConfig(num_atoms=32, chunks=1, atoms_per_chunk=2, coef="fp16")
    codec = TensorCodec(cfg, unit_atoms(1, 32, 8))
    coefs = torch.tensor([[[1.5, -0.25]]])
    code = SparseCode(torch.tensor([[[19, 6]]]), coefs, None)
    packed = codec.pack(code)
    assert packed.shape == (1, 6)
    assert torch.equal(packed[:, :4].contiguous().view(torch.float16).float(), coefs[:, 0])
    stream = int.from_bytes(bytes(packed[0, 4:].tolist()), "little")
    assert stream & 0x1F == 19
    assert (stream >> 5) & 0x1F == 6
    assert stream >> 10 == 0


def test_codec_pack_rejects_index_beyond_index_bits(unit_atoms):
    cfg = TensorCodecConfig(num_atoms=32, chunks=1, atoms_per_chunk=1, coef="fp8")
    codec = TensorCodec(cfg, unit_atoms(1, 32, 4))
    with pytest.raises(ValueError, match="out of range"):
        codec.pack(SparseCode(torch.tensor([[[32]]]), torch.tensor([[[1.0]]]), None))


# -- bits accounting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_atoms", "bits"),
    [(2, 1), (3, 2), (4, 2), (5, 3), (256, 8), (257, 9), (4096, 12), (5000, 13), (8192, 13),
     (8193, 14)],
)
def test_index_bits(num_atoms, bits):
    assert index_bits(num_atoms) == bits
    assert TensorCodecConfig(num_atoms=num_atoms).index_bits == bits


SLOT_CONFIGS = [
    TensorCodecConfig(num_atoms=4096, chunks=1, atoms_per_chunk=2, coef="int5"),
    TensorCodecConfig(num_atoms=8192, chunks=1, atoms_per_chunk=3, coef="fp8"),
    TensorCodecConfig(num_atoms=5000, chunks=2, atoms_per_chunk=2, coef="fp16"),
    TensorCodecConfig(num_atoms=4096, chunks=2, atoms_per_chunk=4, coef="int4"),
    TensorCodecConfig(num_atoms=300, chunks=4, atoms_per_chunk=1, coef="int8"),
    TensorCodecConfig(num_atoms=2, chunks=1, atoms_per_chunk=1, coef="int3"),
    TensorCodecConfig(num_atoms=8192, chunks=1, atoms_per_chunk=5, coef="int7"),
]


@pytest.mark.parametrize("cfg", SLOT_CONFIGS, ids=str)
def test_slot_bytes_matches_formula_and_pack(gen, unit_atoms, cfg):
    fmt = cfg.coef_format
    ib = math.ceil(math.log2(cfg.num_atoms))
    cs = cfg.chunks * cfg.atoms_per_chunk
    expected = math.ceil((16 * fmt.has_scale + cs * (fmt.bits + ib)) / 8)
    assert cfg.slot_bytes == expected
    d = 8 * cfg.chunks
    codec = TensorCodec(cfg, unit_atoms(cfg.chunks, cfg.num_atoms, 8))
    packed = codec.pack(codec.encode(torch.randn(4, d, generator=gen)))
    assert packed.shape == (4, cfg.slot_bytes)


@pytest.mark.parametrize("key", SLOT_CONFIGS[:4], ids=str)
@pytest.mark.parametrize("value", SLOT_CONFIGS[2:5], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bits_per_channel_is_slot_bits_over_channels(key, value, head_dim):
    cfg = CodecConfig(key=key, value=value)
    assert cfg.slot_bytes() == key.slot_bytes + value.slot_bytes
    assert cfg.bits_per_channel(head_dim) == 8 * (key.slot_bytes + value.slot_bytes) / (2 * head_dim)


def test_bits_per_channel_rejects_indivisible_head_dim():
    cfg = CodecConfig(value=TensorCodecConfig(chunks=3))
    with pytest.raises(ValueError, match="not divisible"):
        cfg.bits_per_channel(64)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_presets_stay_within_budget(name, head_dim):
    preset = get_preset(name)
    assert preset.name == name
    cfg = preset.config_for(head_dim)
    assert cfg.bits_per_channel(head_dim) <= preset.budget_bits
    assert cfg.key.atoms_per_chunk >= 1 and cfg.value.atoms_per_chunk >= 1
    assert abs(cfg.key.atoms_per_chunk - cfg.value.atoms_per_chunk) <= 1


def test_csr_1b_at_head_dim_64_is_the_documented_layout():
    """4 key atoms and 3 value atoms of log5 share the 16 bytes that halves fit 3 + 3 in."""
    cfg = get_preset("csr-1b").config_for(64)
    assert (cfg.key.atoms_per_chunk, cfg.key.num_atoms, cfg.key.coef) == (4, 8192, "log5")
    assert (cfg.value.atoms_per_chunk, cfg.value.num_atoms, cfg.value.coef) == (3, 8192, "log5")
    assert (cfg.key.payload_bits, cfg.value.payload_bits) == (72, 54)
    assert (cfg.key.slot_bytes, cfg.value.slot_bytes) == (9, 7)
    assert cfg.bits_per_channel(64) == 1.0


def test_presets_split_the_slot_evenly_when_that_fits_as_many_atoms():
    """csr-2b: 7 + 7 in 16 + 16 bytes (8 + 6 would fit too, no more atoms); csr-1.5b's fp8
    coding: 4 + 4 in 11 + 11, not the 6 + 3 that one more atom would need."""
    cfg = get_preset("csr-2b").config_for(64)
    assert (cfg.key.atoms_per_chunk, cfg.value.atoms_per_chunk) == (7, 7)
    fp8 = dataclasses.replace(get_preset("csr-1.5b"), key_coef="fp8", value_coef="fp8")
    cfg = fp8.config_for(64)
    assert (cfg.key.atoms_per_chunk, cfg.value.atoms_per_chunk) == (4, 4)
    assert (cfg.key.slot_bytes, cfg.value.slot_bytes) == (11, 11)


def test_preset_spare_atom_goes_where_asked():
    to_values = dataclasses.replace(get_preset("csr-1b"), spare="value").config_for(64)
    assert (to_values.key.atoms_per_chunk, to_values.value.atoms_per_chunk) == (3, 4)
    assert (to_values.key.slot_bytes, to_values.value.slot_bytes) == (7, 9)
    with pytest.raises(ValueError, match="spare must be"):
        Preset("x", 1.0, spare="both")


def test_a_log_format_preset_fits_more_atoms_in_the_same_slot():
    fp8 = Preset("a", 2.0).config_for(64)
    log5 = Preset("b", 2.0, key_coef="log5", value_coef="log3").config_for(64)
    assert (fp8.key.atoms_per_chunk, fp8.key.payload_bits, fp8.key.slot_bytes) == (6, 126, 16)
    assert (log5.key.atoms_per_chunk, log5.key.payload_bits, log5.key.slot_bytes) == (7, 126, 16)
    assert (log5.value.atoms_per_chunk, log5.value.coef, log5.value.slot_bytes) == (8, "log3", 16)


CHUNKED_PRESETS = [
    Preset("two-chunk-values", 2.0, value_chunks=2),
    Preset("four-chunk-keys", 4.0, key_chunks=4, key_coef="int5", value_coef="int5",
           num_atoms=4096),
    Preset("two-chunk-int", 1.5, key_chunks=2, value_chunks=2, key_coef="int4",
           value_coef="int4"),
]


@pytest.mark.parametrize("preset", list(PRESETS.values()) + CHUNKED_PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_preset_uses_as_many_atoms_as_fit(preset, head_dim):
    """Preset docstring: no split of the slot's whole bytes with keys and values at most one
    atom apart fits more atoms in all."""
    cfg = preset.config_for(head_dim)
    slot = 2 * (int(preset.budget_bits * head_dim) // 8)
    assert cfg.slot_bytes() <= slot

    def grown(tcfg, extra):
        return dataclasses.replace(tcfg, atoms_per_chunk=tcfg.atoms_per_chunk + extra)

    have = cfg.key.atoms_per_chunk + cfg.value.atoms_per_chunk
    for dk in range(-have, have + 2):
        for dv in range(-have, have + 2):
            if dk + dv < 1:
                continue
            sk, sv = cfg.key.atoms_per_chunk + dk, cfg.value.atoms_per_chunk + dv
            if min(sk, sv) < 1 or abs(sk - sv) > 1:
                continue
            assert grown(cfg.key, dk).slot_bytes + grown(cfg.value, dv).slot_bytes > slot, (
                f"{sk} key + {sv} value atoms fit in {slot} bytes; {preset.name} uses {have}")


def test_get_preset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nope") as err:
        get_preset("nope")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_atoms": 1}, {"chunks": 0}, {"atoms_per_chunk": 0}, {"coef": "int9"},
     {"pursuit": "lasso"}],
)
def test_tensor_codec_config_rejects_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        TensorCodecConfig(**kwargs)


def test_codec_config_rejects_invalid_settings():
    with pytest.raises(ValueError, match="key_rope"):
        CodecConfig(key_rope="during")
    with pytest.raises(ValueError, match="layer_group"):
        CodecConfig(layer_group=0)


def test_codec_config_dict_roundtrip():
    cfg = CodecConfig(key=TensorCodecConfig(5000, 2, 3, "fp16", "mp"), key_rope="post",
                      layer_group=3, per_head=True)
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg


# -- coefficient formats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "fp32", "bf16", "fp4", "int", "int2", "int9", "int16", "intx", "INT4", "int-4"]
)
def test_coef_format_rejects_invalid_names(name):
    with pytest.raises(ValueError, match="unknown coefficient format"):
        CoefFormat(name)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_coef_format_bits(name):
    fmt = CoefFormat(name)
    expected_bits = {"fp16": 16, "fp8": 8}.get(name) or int(name[3:])
    assert fmt.bits == expected_bits
    assert fmt.has_scale == name.startswith("int")
    assert not fmt.uses_ladder


LOG_FORMATS = ["log3", "log4", "log5", "log6"]


@pytest.mark.parametrize("name", ["log2", "log7", "logx", "fp4"])
def test_unknown_coefficient_format_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match="log3..log6"):
        CoefFormat(name)


@pytest.mark.parametrize("name", LOG_FORMATS)
def test_log_format_is_the_nearest_ladder_level_in_the_log_domain(gen, name):
    fmt = CoefFormat(name)
    assert fmt.bits == int(name[3:]) and fmt.uses_ladder and not fmt.has_scale
    top = torch.tensor([4.0, 1.0, 0.25])
    c = torch.randn(200, 3, generator=gen) * top * 2
    c = torch.cat([c, torch.tensor([[0.0, -0.0, 1e-30], [100.0, -100.0, 0.25]])])
    levels = (1 << (fmt.bits - 1)) - 1
    ladder = top[None, :, None] * 2.0 ** (-fmt.octaves * torch.arange(levels + 1) / levels)[
        None, None]  # [1, K, M]
    got = fmt.roundtrip(c, None, top)
    # Brute force: the level nearest |c| in log2, with c's sign (clipped at both ends).
    dist = (torch.log2(c.abs().clamp_min(1e-38))[..., None] - torch.log2(ladder)).abs()
    want = ladder.expand(*c.shape, -1).gather(-1, dist.argmin(-1, keepdim=True))[..., 0]
    want = torch.where(c < 0, -want, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    codes = fmt.encode(c, None, top)
    assert codes.min() >= 0 and codes.max() < 1 << fmt.bits
    assert torch.equal(fmt.decode(codes, None, torch.float32, top), got)
    assert torch.equal(fmt.encode(got, None, top), codes)  # stored values re-encode exactly


def test_log_format_without_ladder_is_an_error():
    with pytest.raises(ValueError, match="ladder"):
        CoefFormat("log4").encode(torch.ones(2, 2), None)
    cfg = TensorCodecConfig(16, 1, 2, "log4", "omp")
    with pytest.raises(ValueError, match=r"ladder tops of shape \(1, 2\)"):
        TensorCodec(cfg, torch.eye(16)[None])


@pytest.mark.parametrize("pursuit", ["mp", "omp"])
@pytest.mark.parametrize("name", LOG_FORMATS)
def test_log_codec_roundtrip_packs_exactly(gen, unit_atoms, pursuit, name):
    atoms = unit_atoms(64, 8)
    x = torch.randn(300, 8, generator=gen) * 2
    ladder = ladder_tops(x, atoms, positions=4)
    cfg = TensorCodecConfig(64, 1, 3, name, pursuit)
    codec = TensorCodec(cfg, atoms[None], ladder[2, :3][None])
    code = codec.encode(x)
    assert torch.equal(CoefFormat(name).roundtrip(code.coefs[:, 0], None, ladder[2, :3]),
                       code.coefs[:, 0])
    packed = codec.pack(code)
    assert packed.shape == (300, cfg.slot_bytes) and cfg.slot_bytes == -(-3 * (6 + cfg.coef_format.bits) // 8)
    back = codec.unpack(packed)
    assert torch.equal(back.indices, code.indices) and torch.equal(back.coefs, code.coefs)
    assert relative_error(x, codec.decode(code)) < 0.9


def test_ladder_tops_are_quantiles_of_omp_coefficients_for_every_support_size(gen, unit_atoms):
    atoms = unit_atoms(32, 6)
    x = torch.randn(400, 6, generator=gen)
    tops = ladder_tops(x, atoms, positions=4)
    assert tops.shape == (4, 4)
    assert torch.equal(tops.triu(1), torch.zeros(4, 4))
    for s in range(1, 5):
        idx, coef = orthogonal_matching_pursuit(x, atoms, s)
        torch.testing.assert_close(tops[s - 1, :s], coef.abs().quantile(0.995, dim=0))



def test_fp8_roundtrip_equals_torch_e4m3fn_rounding(gen):
    fmt = CoefFormat("fp8")
    c = torch.randn(64, 8, generator=gen) * torch.logspace(-4, 3, 8)
    c = torch.cat([c, torch.tensor([[0.0, -0.0, 448.0, -448.0, 1e-9, 2.0**-9, 1000.0, -1e4]])])
    expected = c.to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(fmt.roundtrip(c, None), expected)
    codes = fmt.encode(c, None)
    assert codes.min() >= 0 and codes.max() < 256
    assert torch.isfinite(fmt.roundtrip(c, None)).all()


def test_fp16_roundtrip_equals_torch_half_rounding(gen):
    fmt = CoefFormat("fp16")
    c = torch.randn(32, 8, generator=gen) * torch.logspace(-6, 4, 8)
    codes = fmt.encode(c, None)
    assert codes.min() >= 0 and codes.max() < 1 << 16
    assert torch.equal(fmt.roundtrip(c, None), c.half().float())


@pytest.mark.parametrize("name", [f"int{b}" for b in range(3, 9)])
def test_int_codes_in_range_and_error_bounded(gen, name):
    fmt = CoefFormat(name)
    x = torch.randn(64, 16, generator=gen)
    scale = fmt.scale_for(x)
    c = torch.randn(64, 6, generator=gen) * scale[:, None] / 3
    c[:, 0] = scale * 1.5  # beyond the scale: clamped, still in range
    c[:, 1] = -scale * 1.5
    codes = fmt.encode(c, scale)
    assert codes.min() >= 0 and codes.max() < 1 << fmt.bits
    signed = torch.where(codes >= 1 << (fmt.bits - 1), codes - (1 << fmt.bits), codes)
    assert signed.abs().max() <= fmt.qmax
    back = fmt.roundtrip(c, scale)
    inside = c.abs() <= scale[:, None]
    step = (scale / fmt.qmax)[:, None].expand_as(c)
    assert ((back - c).abs()[inside] <= step[inside] / 2 + 1e-6).all()
    torch.testing.assert_close(back[:, 0], scale)
    torch.testing.assert_close(back[:, 1], -scale)
    assert torch.equal(fmt.roundtrip(back, scale), back)


def test_int_scale_is_fp16_rounded_norm(gen):
    fmt = CoefFormat("int5")
    x = torch.randn(16, 8, generator=gen) * 7
    scale = fmt.scale_for(x)
    assert torch.equal(scale, x.norm(dim=1).half().float())


# -- RoPE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_undo_rope_inverts_apply_rope(gen, dtype):
    head_dim, positions = 16, torch.arange(0, 4000, 37)
    cos, sin = rope_tables(head_dim, 10000.0, positions, dtype)
    x = torch.randn(3, len(positions), head_dim, generator=gen, dtype=torch.float64).to(dtype)
    rotated = apply_rope(x, cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(undo_rope(rotated, cos, sin), x, atol=tol, rtol=tol)
    torch.testing.assert_close(apply_rope(undo_rope(x, cos, sin), cos, sin), x, atol=tol, rtol=tol)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=tol, rtol=tol)


def test_rope_at_position_zero_is_identity(gen):
    cos, sin = rope_tables(16, 10000.0, torch.zeros(1, dtype=torch.long))
    x = torch.randn(1, 16, generator=gen)
    torch.testing.assert_close(apply_rope(x, cos, sin), x)


def test_rope_matches_transformers_llama(gen):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=1, intermediate_size=32, vocab_size=32,
                         rope_theta=10000.0)
    positions = torch.arange(300)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 1, 16), positions[None])
    cos, sin = rope_tables(16, 10000.0, positions)
    assert cos.shape == sin.shape == (300, 16)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-5, rtol=0)

    q = torch.randn(1, 4, 300, 16, generator=gen)
    k = torch.randn(1, 2, 300, 16, generator=gen)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, atol=1e-4, rtol=1e-4)
