"""Bit-exact packing of one tensor's sparse codes into fixed-size byte slots.

Byte layout of one vector's slot (little-endian bit stream, fields in this order, LSB first):

    [scale : 16 bits, fp16, only for intB coefficient formats]
    [coef  : C*S fields of ``coef_bits`` each, chunk-major (chunk 0's S atoms first)]
    [index : C*S fields of ``index_bits`` each, same order; index_bits = ceil(log2 A)]
    [zero padding to a whole byte]

So a slot is ``ceil((16*has_scale + C*S*(coef_bits + index_bits)) / 8)`` bytes. No other
per-vector metadata exists: C, S, A and the formats are fixed per layer by the manifest.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def index_bits(num_atoms: int) -> int:
    """Bits needed to address ``num_atoms`` atoms (at least 1)."""
    return max(1, math.ceil(math.log2(num_atoms)))


def pack_fields(fields: list[tuple[Tensor, int]], num_bytes: int) -> Tensor:
    """Pack per-vector unsigned fields into bytes.

    Args:
        fields: (values [N, K] int64 in [0, 2^bits), bits) in stream order.
        num_bytes: slot size; must hold all the bits.
    Returns:
        [N, num_bytes] uint8.
    """
    n = fields[0][0].shape[0]
    bit_chunks = []
    for values, bits in fields:
        if values.numel() and (values.min() < 0 or values.max() >= 1 << bits):
            raise ValueError(f"field value out of range for {bits} bits")
        shifts = torch.arange(bits, device=values.device)
        bit_chunks.append(((values[:, :, None] >> shifts) & 1).reshape(n, -1))
    stream = torch.cat(bit_chunks, dim=1)
    if stream.shape[1] > num_bytes * 8:
        raise ValueError(f"{stream.shape[1]} bits do not fit in {num_bytes} bytes")
    stream = torch.nn.functional.pad(stream, (0, num_bytes * 8 - stream.shape[1]))
    weights = 1 << torch.arange(8, device=stream.device)
    return (stream.reshape(n, num_bytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_fields(packed: Tensor, layout: list[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`pack_fields`: layout is [(K, bits)] per field; returns [N, K] int64 each.

    Fields of at most 17 bits span at most 3 bytes, so each is read as a 24-bit little-endian
    word gathered at its byte offset, shifted and masked: no per-bit expansion (the read path
    unpacks every referenced slot each step). Wider fields take the bit-level reference.
    """
    if any(bits > 17 for _, bits in layout):
        return unpack_fields_reference(packed, layout)
    n, nbytes = packed.shape
    offsets = torch.cat([pos + torch.arange(count) * bits for pos, (count, bits) in
                         zip(_starts(layout), layout, strict=True)])
    widths = torch.cat([torch.full((count,), bits) for count, bits in layout])
    first = offsets // 8
    padded = torch.nn.functional.pad(packed, (0, 3)).to(torch.int32)
    word = (padded[:, first] | (padded[:, first + 1] << 8) | (padded[:, first + 2] << 16))
    values = ((word >> (offsets % 8).to(torch.int32)) & ((1 << widths) - 1).to(torch.int32))
    return list(values.to(torch.int64).split([count for count, _ in layout], dim=1))


def _starts(layout: list[tuple[int, int]]) -> list[int]:
    out, pos = [], 0
    for count, bits in layout:
        out.append(pos)
        pos += count * bits
    return out


def unpack_fields_reference(packed: Tensor, layout: list[tuple[int, int]]) -> list[Tensor]:
    """Bit-level unpacking (the spec :func:`unpack_fields` is tested against)."""
    n = packed.shape[0]
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64)[:, :, None] >> shifts) & 1).reshape(n, -1)
    out, pos = [], 0
    for count, bits in layout:
        chunk = stream[:, pos : pos + count * bits].reshape(n, count, bits)
        out.append((chunk << torch.arange(bits, device=packed.device)).sum(-1))
        pos += count * bits
    return out
