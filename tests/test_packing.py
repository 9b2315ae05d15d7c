"""Dense low-bit packing (kernels/packing.py): bit-exact round trips and the layout.

The layout is a little-endian bit stream per row (code k at stream bits
[k*bits, (k+1)*bits), int32 word j = stream bits [32j, 32j+32)); 3-bit codes
are packed densely, so a row of K codes takes ceil(3K/32) words.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.kernels import packing
from qcompile.kernels.packing import pack, packed_bits_per_weight, packed_words, unpack

BITS = [2, 3, 4, 8]


def _codes(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)


def _stream_words(row: torch.Tensor, bits: int) -> list[int]:
    """The packed words of one row, computed with Python integers (the spec)."""
    stream = sum(int(v) << (bits * i) for i, v in enumerate(row.tolist()))
    return [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(packed_words(len(row), bits))]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    n=st.integers(0, 6),
    k=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_bit_exact(bits, n, k, seed):
    q = _codes(n, k, bits, seed)
    p = pack(q, bits)
    assert p.dtype == torch.int32
    assert p.shape == (n, math.ceil(k * bits / 32))
    u = unpack(p, bits, k)
    assert u.dtype == torch.uint8 and u.shape == (n, k)
    assert torch.equal(u, q)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(BITS), k=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_layout_is_the_dense_bit_stream(bits, k, seed):
    q = _codes(3, k, bits, seed)
    p = pack(q, bits)
    for r in range(3):
        assert [int(w) & 0xFFFFFFFF for w in p[r]] == _stream_words(q[r], bits)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_and_tail_padding_is_zero(bits):
    k = 45  # not a multiple of any pack unit
    q = torch.full((2, k), (1 << bits) - 1, dtype=torch.uint8)
    q[1] = 0
    p = pack(q, bits)
    assert torch.equal(unpack(p, bits, k), q)
    used = k * bits - 32 * (p.shape[1] - 1)  # bits used in the last word
    last = int(p[0, -1]) & 0xFFFFFFFF
    assert last == (1 << used) - 1  # all code bits set, padding bits zero
    assert int(p[1].abs().sum()) == 0


def test_three_bit_density():
    # 32 three-bit codes in exactly three words, no 4-bit padding
    assert packed_words(32, 3) == 3
    assert packed_words(576, 3) == 54  # SmolLM2 hidden size: 576 * 3 / 32
    assert packed_words(1536, 3) == 144
    assert packed_words(33, 3) == 4  # only the tail is padded
    q = _codes(4, 576, 3, 0)
    assert pack(q, 3).numel() * 32 == q.numel() * 3
    # codes 10 and 21 of each 32 straddle word boundaries
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 10] = 0b111
    p = pack(q, 3)
    assert (int(p[0, 0]) & 0xFFFFFFFF) >> 30 == 0b11 and int(p[0, 1]) & 1 == 1
    assert torch.equal(unpack(p, 3, 32), q)


@pytest.mark.parametrize("bits,per_word", [(2, 16), (4, 8), (8, 4)])
def test_power_of_two_widths_do_not_straddle(bits, per_word):
    assert packed_words(per_word * 5, bits) == 5
    q = _codes(2, per_word * 5, bits, 1)
    p = pack(q, bits)
    # word j depends only on codes [j*per_word, (j+1)*per_word)
    q2 = q.clone()
    q2[:, per_word : 2 * per_word] = 0
    p2 = pack(q2, bits)
    assert torch.equal(p[:, [0, 2, 3, 4]], p2[:, [0, 2, 3, 4]])


def test_chunked_rows_match(monkeypatch):
    q = _codes(37, 50, 3, 7)
    whole = pack(q, 3)
    monkeypatch.setattr(packing, "_CHUNK_ELEMS", 64)  # ~1 row per chunk
    assert torch.equal(pack(q, 3), whole)
    assert torch.equal(unpack(whole, 3, 50), q)


def test_accepts_wider_integer_codes():
    q = _codes(3, 40, 4, 2)
    assert torch.equal(pack(q.to(torch.int32), 4), pack(q, 4))


def test_errors():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(2, 8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack(torch.full((2, 8), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(TypeError):
        pack(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="words per row"):
        unpack(torch.zeros(2, 3, dtype=torch.int32), 3, 40)


def test_packed_bits_per_weight():
    assert packed_bits_per_weight(4, 128, 2) == 4.25
    assert packed_bits_per_weight(3, 64, 2) == 3.5
    assert packed_bits_per_weight(2, 32, 4) == 4.0
    assert packed_bits_per_weight(8, 128, 2) == 8.25
    with pytest.raises(ValueError):
        packed_bits_per_weight(4, 0, 2)
