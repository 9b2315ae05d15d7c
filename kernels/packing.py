"""Dense bit packing of low-bit weight codes along K (the reduction dimension).

API
---
``pack(q: Tensor[uint8, N, K], bits: int) -> Tensor[int32, N, packed_words(K, bits)]``
    ``bits`` in {2, 3, 4, 8}; every code must lie in ``[0, 2**bits)`` (checked).
``unpack(packed: Tensor[int32, N, W], bits: int, k: int) -> Tensor[uint8, N, k]``
    Exact inverse: ``unpack(pack(q, b), b, q.shape[1]) == q`` bit for bit.
``packed_words(k: int, bits: int) -> int``
    Words per row: ``ceil(k * bits / 32)``.
``packed_bits_per_weight(bits, group_size, scale_dtype_bytes=2) -> float``
    Storage cost per weight including one scale and one zero point per group.
``pack_int4(q) -> Tensor[int8, ..., ceil(K / 2)]`` / ``unpack_int4(packed, k)``
    Signed int4 pairs per byte, a layout of its own (the W4A4 GEMM's operands; below).

Layout (one definition for every bit width)
-------------------------------------------
Each row is a little-endian bit stream: code ``k`` occupies stream bits
``[k*bits, (k+1)*bits)``, and int32 word ``j`` of the row holds stream bits
``[32*j, 32*j + 32)`` with stream bit ``32*j`` in the word's least significant
bit. For 2, 4 and 8 bits a code never straddles two words (16, 8 and 4 codes
per word). For 3 bits the stream is dense: 32 codes fill exactly three words
(10.67 codes per word) and codes 10 and 21 of each 32 straddle a word boundary.
When ``k * bits`` is not a multiple of 32 only the tail of the last word is
padding (zero bits). To read code ``k`` (what the Triton kernel does)::

    bit = k * bits; j = bit >> 5; s = bit & 31
    v = (word[j] >>> s) | (word[j + 1] << (32 - s) if s + bits > 32 else 0)
    v &= (1 << bits) - 1

Words are stored as int32 (two's complement of the unsigned 32-bit word) so
that Triton and torch can both hold them; kernels bitcast to uint32 before
shifting. The packing works in int64 on chunks of rows, so memory stays bounded
for large matrices (the 49152 x 576 lm_head packs in well under a second).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32
_CHUNK_ELEMS = 1 << 18  # int64 temporaries per chunk: 2 MiB


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words that hold ``k`` codes of ``bits`` bits (dense)."""
    _check_bits(bits)
    return (k * bits + _WORD - 1) // _WORD


def packed_bits_per_weight(bits: int, group_size: int, scale_dtype_bytes: int = 2) -> float:
    """Bits of storage per weight: the code plus a scale and a zero point per group.

    Scales and zero points are both stored in a float dtype of
    ``scale_dtype_bytes`` bytes (2 for fp16/bf16 activations, 4 for fp32). Tail
    padding of the last word of a row is ignored (it is < 32 bits per row).
    Example: ``packed_bits_per_weight(4, 128, 2) == 4.25``.
    """
    _check_bits(bits)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return bits + 2 * 8 * scale_dtype_bytes / group_size


def _positions(k: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    bit = torch.arange(k, device=device, dtype=torch.int64) * bits
    return bit >> 5, bit & 31  # word index, shift within the word


def _spills(k: int, bits: int) -> bool:
    """Whether a code of a ``k``-code row straddles two words (3 bits, k > 10): decided
    from the sizes alone, so the unpacking traces without reading tensor values."""
    return any(((i * bits) & 31) + bits > _WORD for i in range(min(k, 32)))


def _to_int32_words(u: torch.Tensor) -> torch.Tensor:
    # unsigned 32-bit values held in int64 -> int32 with the same bit pattern
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``q[N, K]`` (uint8, values < 2**bits) densely along K into int32 words."""
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    if q.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack expects integer codes, got {q.dtype}")
    n, k = q.shape
    words = packed_words(k, bits)
    out = torch.empty((n, words), dtype=torch.int32, device=q.device)
    if n == 0 or k == 0:
        return out
    widx, shift = _positions(k, bits, q.device)
    spill = (shift + bits) > _WORD  # only possible for 3 bits
    rows = max(1, _CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, n, rows):  # int64 temporaries the size of a chunk
        v = q[r0 : r0 + rows].to(torch.int64)
        if bool(((v < 0) | (v >= (1 << bits))).any()):
            raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
        o = torch.zeros((v.shape[0], words + 1), dtype=torch.int64, device=q.device)  # +1: spill
        # codes own disjoint bits of a word, so adding is the same as OR-ing
        o.index_add_(1, widx, (v << shift) & 0xFFFFFFFF)
        if bool(spill.any()):
            o.index_add_(1, widx[spill] + 1, v[:, spill] >> (_WORD - shift[spill]))
        out[r0 : r0 + rows] = _to_int32_words(o[:, :words])
    return out


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words ``[N, W]`` -> uint8 codes ``[N, k]``."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack expects a 2-D [N, W] tensor, got shape {tuple(packed.shape)}")
    n, words = packed.shape
    if words != packed_words(k, bits):
        raise ValueError(
            f"{words} words per row do not hold k={k} codes of {bits} bits "
            f"(expected {packed_words(k, bits)})"
        )
    out = torch.empty((n, k), dtype=torch.uint8, device=packed.device)
    if n == 0 or k == 0:
        return out
    widx, shift = _positions(k, bits, packed.device)
    spill = (shift + bits) > _WORD
    mask = (1 << bits) - 1
    hi_idx = torch.clamp(widx + 1, max=words - 1)
    hi_shift = (_WORD - shift) & 31
    rows = max(1, _CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, n, rows):
        w = packed[r0 : r0 + rows].to(torch.int64) & 0xFFFFFFFF
        v = w.index_select(1, widx) >> shift
        if _spills(k, bits):
            hi = (w.index_select(1, hi_idx) << hi_shift) * spill
            v = v | hi
        out[r0 : r0 + rows] = (v & mask).to(torch.uint8)
    return out


# --------------------------------------------------------------------------- packed int4
# Signed int4 pairs (the W4A4 GEMM's operands, ``triton_lowbit``), a layout apart from the
# int32 words above: two signed 4-bit values (``[-8, 7]``, two's complement) per int8 byte
# along the last dimension; byte ``j`` holds element ``2j`` in its low nibble (bits 0-3)
# and element ``2j + 1`` in its high nibble (bits 4-7). An odd ``K`` is padded with one
# zero element (the last byte's high nibble is 0), so ``[..., K]`` packs to
# ``[..., ceil(K / 2)]``; since padding nibbles are zero, a dot product over packed
# operands of equal width needs no ``K``.


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed int4 values per int8 byte along the last dimension (layout above).

    ``q`` is an integer tensor ``[..., K]`` with values in ``[-8, 7]`` (checked);
    returns int8 ``[..., ceil(K / 2)]``.
    """
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"pack_int4 expects integer values, got {q.dtype}")
    if q.numel() and bool(((q < -8) | (q > 7)).any()):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    v = q.to(torch.int16)
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    lo, hi = v[..., 0::2], v[..., 1::2]
    return ((hi << 4) | (lo & 0xF)).to(torch.int8)  # in [-128, 127]: exact


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., W]`` -> int8 ``[..., k]`` in ``[-8, 7]``."""
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4 expects int8 bytes, got {packed.dtype}")
    w = packed.shape[-1]
    if k < 0 or (k + 1) // 2 != w:
        raise ValueError(f"{w} bytes per row do not hold k={k} int4 values")
    v = packed.to(torch.int16)
    lo = ((v & 0xF) ^ 8) - 8  # sign-extend the low nibble
    hi = v >> 4  # arithmetic shift: the signed high nibble
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * w)
    return out[..., :k].to(torch.int8)


__all__ = [
    "SUPPORTED_BITS",
    "pack",
    "unpack",
    "packed_words",
    "packed_bits_per_weight",
    "pack_int4",
    "unpack_int4",
]
