"""Packing: exact inverses and stored sizes equal to the theory."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.core.packing import pack_codes, packed_row_bytes, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_identity(bits, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, math.ceil(cols * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_sizes(bits):
    # 3-bit: 8 codes in 3 bytes; 4-bit: 2 per byte; 2-bit: 4 per byte.
    assert packed_row_bytes(8, 3) == 3
    assert packed_row_bytes(576, bits) == 576 * bits // 8


def test_bit_order_is_little_endian_stream():
    # code i occupies stream bits [bits*i, bits*(i+1)): check one hand-computed 3-bit row.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    expected = torch.tensor([[(stream >> (8 * j)) & 0xFF for j in range(3)]], dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, 3), expected)
    codes4 = torch.tensor([[0x1, 0xF, 0x7]], dtype=torch.uint8)
    assert torch.equal(pack_codes(codes4, 4), torch.tensor([[0xF1, 0x07]], dtype=torch.uint8))


def test_batch_dims():
    codes = torch.randint(0, 8, (2, 3, 11), dtype=torch.int64).to(torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, 11), codes)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), bits)


def test_unpack_wrong_size():
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(1, 5, dtype=torch.uint8), 4, 8)
