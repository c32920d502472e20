"""Device helpers shared by the kernels: bit fields of packed slots and coefficient formats.

Slots are little-endian bit streams (:mod:`csr_vllm.codec.packing`); every field is at most
16 bits, so it lies within 3 bytes of its first byte and is read as one 24-bit word.
Coefficient formats are decoded with integer arithmetic (no fp8 dtype needed, so Triton's
interpreter runs them too); fp8 is e4m3fn with torch's saturating conversion. ``logB`` reads a
per-layer table of the magnitudes its levels stand for (top x ladder step, built on the host
exactly as the reference multiplies them, so a decoded level is bit-identical).
"""

from __future__ import annotations

import triton.language as tl

from csr_vllm.ops._triton import jit


@jit
def read_field(base, off, BITS: tl.constexpr, NBYTES: tl.constexpr, mask):
    """Unsigned field of ``BITS`` bits at bit ``off`` of the byte rows at ``base`` (pointers
    [R] to each row's first byte); bytes at or past ``NBYTES`` read as 0."""
    byte = mask.to(tl.int32) * 0 + off // 8  # a tensor, so the masks below stay boolean tensors
    b0 = tl.load(base + byte, mask=mask & (byte < NBYTES), other=0).to(tl.int32)
    b1 = tl.load(base + byte + 1, mask=mask & (byte + 1 < NBYTES), other=0).to(tl.int32)
    b2 = tl.load(base + byte + 2, mask=mask & (byte + 2 < NBYTES), other=0).to(tl.int32)
    word = b0 | (b1 << 8) | (b2 << 16)
    return (word >> (byte * 0 + off % 8)) & ((1 << BITS) - 1)


@jit
def pack_field(acc, cols, off, val):
    """OR the field ``val`` [R] (int32, already masked to its width) at bit ``off`` into the
    byte accumulator ``acc`` [R, NB] (int32 bytes; ``cols`` = arange(NB))."""
    byte = off // 8
    word = val << (off % 8)
    acc = acc | tl.where(cols[None, :] == byte, (word & 0xFF)[:, None], 0)
    acc = acc | tl.where(cols[None, :] == byte + 1, ((word >> 8) & 0xFF)[:, None], 0)
    acc = acc | tl.where(cols[None, :] == byte + 2, ((word >> 16) & 0xFF)[:, None], 0)
    return acc


@jit
def pow2(e):
    """2**e for integer e in the normal fp32 range, exact (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@jit
def decode_coef(code, COEF_FMT: tl.constexpr, ladder_ptr, field):
    """Stored code (int32) -> coefficient (fp32). COEF_FMT 0 = fp8 e4m3fn, 1 = fp16, B (3..6)
    = logB: sign bit over a magnitude index into row ``field`` (the code field c * S + s) of
    the ladder table at ``ladder_ptr`` ([C, S, M] float32; unused by the other formats)."""
    if COEF_FMT == 0:
        ex = (code >> 3) & 15
        man = code & 7
        mag = tl.where(ex == 0, man.to(tl.float32) * 0.001953125,
                       (man + 8).to(tl.float32) * pow2(ex - 10))
        return tl.where((code & 0x80) != 0, -mag, mag)
    elif COEF_FMT == 1:
        return code.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        levels = 1 << (COEF_FMT - 1)
        mag = tl.load(ladder_ptr + field * levels + (code & (levels - 1)))
        return tl.where(((code >> (COEF_FMT - 1)) & 1) != 0, -mag, mag)


@jit
def quantize_coef(c, COEF_FMT: tl.constexpr, ladder_ptr, field):
    """Coefficient (fp32) -> (stored code int32, the value it reads back as fp32).

    fp8: round to nearest even in e4m3fn, saturating at 448 like torch's conversion.
    logB: the ladder level nearest in the log domain (as the reference's rounding of
    ``log2(top / |c|)`` in ladder steps; above the top clips to it, below the last level and
    zero read back as the last level; a zero top codes level 0)."""
    if COEF_FMT == 0:
        bits = c.to(tl.int32, bitcast=True)
        a = tl.abs(c)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(e, -6), 8)
        y = a * pow2(3 - e)  # exact: a power-of-two scale
        f = tl.floor(y)
        d = y - f
        fi = f.to(tl.int32)
        up = (d > 0.5) | ((d == 0.5) & ((fi & 1) == 1))
        mag = ((e + 7) << 3) + fi + up.to(tl.int32) - 8
        mag = tl.minimum(mag, 126)
        code = mag | (((bits >> 31) & 1) << 7)
        return code, decode_coef(code, 0, ladder_ptr, field)
    elif COEF_FMT == 1:
        h = c.to(tl.float16)
        code = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return code, h.to(tl.float32)
    else:
        levels = 1 << (COEF_FMT - 1)
        row = ladder_ptr + field * levels
        lc = tl.log2(tl.maximum(tl.abs(c), 1.1754943508222875e-38))  # fp32 tiny, as the reference
        best = tl.zeros(c.shape, dtype=tl.int32)
        best_d = tl.full(c.shape, float("inf"), tl.float32)
        for i in tl.static_range(1 << (COEF_FMT - 1)):  # a constexpr bound (not `levels`)
            dist = tl.abs(lc - tl.log2(tl.load(row + i)))
            closer = dist < best_d
            best = tl.where(closer, i, best)
            best_d = tl.where(closer, dist, best_d)
        code = best | ((c < 0).to(tl.int32) << (COEF_FMT - 1))
        return code, decode_coef(code, COEF_FMT, ladder_ptr, field)
