"""Number formats: round trip on the grid, error bounds, padding of uneven widths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.core.formats import FP4_E2M1_LEVELS, NF4_LEVELS, AffineFormat, get_format, list_formats
from llmopt.core.primitives import dequantize_weight, quantize_weight, to_groups
from llmopt.testing import check_format

# Every registered format (built-in or added to llmopt later) runs through the same contract
# (llmopt.testing.check_format). Adding a format to llmopt = its class in llmopt/core/formats.py + one row
# here pinning its grid (the values for unit scale): test_every_format_has_a_row fails without it.
FORMATS = list_formats()
GRIDS = {
    "int8": ("affine", 8),
    "int4": ("affine", 4),
    "int3": ("affine", 3),
    "int2": ("affine", 2),
    "nf4": ("levels", NF4_LEVELS),
    "fp4_e2m1": ("levels", sorted(set(FP4_E2M1_LEVELS))),
    "fp8_e4m3": ("float8", torch.float8_e4m3fn),
}


def _expected_grid(kind, value) -> torch.Tensor:
    if kind == "affine":  # codes 0..2**bits-1 around the mid code
        return torch.arange(-(2 ** (value - 1)), 2 ** (value - 1), dtype=torch.float32)
    if kind == "levels":
        return torch.tensor(list(value), dtype=torch.float32)
    finite = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(value).float()  # every bit pattern
    return torch.unique(finite[torch.isfinite(finite)])
shapes = st.tuples(st.integers(1, 24), st.integers(1, 300))
group_sizes = st.sampled_from([None, 8, 16, 32, 64, 128])


def test_every_format_has_a_row():
    assert sorted(GRIDS) == sorted(FORMATS)


@pytest.mark.parametrize("name", FORMATS)
def test_format_contract(name):
    """What every method, kernel and save relies on (see llmopt.testing.check_format)."""
    check_format(name)


@pytest.mark.parametrize("name", FORMATS)
def test_format_grid_is_pinned(name):
    assert torch.equal(get_format(name).grid().float(), _expected_grid(*GRIDS[name]))


def _roundtrip(weight, fmt, group_size):
    q = quantize_weight(weight, fmt, group_size, torch.float32)
    return q, dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float64)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, group_size=group_sizes, bits=st.sampled_from([2, 3, 4, 8]),
       symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_affine_error_at_most_half_scale(shape, group_size, bits, symmetric, seed):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fmt = AffineFormat(bits, symmetric=symmetric)
    q, deq = _roundtrip(weight, fmt, group_size)
    gs = q.group_size
    scale = q.scale.to(torch.float64).repeat_interleave(gs, dim=1)[:, : shape[1]]
    # Inside the representable range rounding error is <= scale/2; the maths runs in float32, so
    # allow float32 rounding of the weight itself (|w| * 2**-23, doubled for safety).
    err = (deq - weight).abs()
    slack = scale / 2 * 1e-5 + weight.abs() * 2.4e-7 + 1e-12
    assert torch.all(err <= scale / 2 + slack), float((err - scale / 2 - slack).max())
    assert q.codes.shape == shape and int(q.codes.max()) < (1 << bits)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, group_size=group_sizes, name=st.sampled_from(FORMATS), seed=st.integers(0, 2**16))
def test_dequantized_values_lie_on_grid(shape, group_size, name, seed):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    fmt = get_format(name)
    q, deq = _roundtrip(weight, fmt, group_size)
    gs = q.group_size
    scale = q.scale.to(torch.float64).repeat_interleave(gs, dim=1)[:, : shape[1]]
    offset = 0.0
    if q.zero_point is not None:
        offset = q.zero_point.to(torch.float64).repeat_interleave(gs, dim=1)[:, : shape[1]]
    normalized = (deq - offset) / scale
    grid = fmt.grid().to(torch.float64)
    distance = (normalized.unsqueeze(-1) - grid).abs().min(dim=-1).values
    # Dequantization runs in float32: allow its rounding (|value| * 2**-23, doubled) in grid units.
    tolerance = 1e-4 + deq.abs() * 2.4e-7 / scale
    assert torch.all(distance < tolerance), float((distance - tolerance).max())
    # quantize(dequantize(x)) is a fixed point: the grid values map to themselves.
    again = fmt.quantize(deq.float().view(shape[0], -1), scale.float(), offset if isinstance(offset, float)
                         else offset.float())
    assert torch.equal(fmt.dequantize(again, scale.float(), offset if isinstance(offset, float) else
                                      offset.float()).double(), deq.float().double())


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), k=st.integers(2, 200), group_size=st.sampled_from([16, 32, 64, 128]),
       name=st.sampled_from(FORMATS), seed=st.integers(0, 2**16))
def test_padding_does_not_change_valid_columns(rows, k, group_size, name, seed):
    """A ragged last group must give the same codes/params as quantizing that group on its own."""
    weight = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    fmt = get_format(name)
    q = quantize_weight(weight, fmt, group_size, torch.bfloat16)
    full = (k // group_size) * group_size
    if full == k or full == 0:
        return
    tail = quantize_weight(weight[:, full:], fmt, None, torch.bfloat16)
    assert torch.equal(q.codes[:, full:], tail.codes)
    assert torch.equal(q.scale[:, -1:], tail.scale)
    if q.zero_point is not None:
        assert torch.equal(q.zero_point[:, -1:], tail.zero_point)


def test_group_view_replicates_last_column():
    w = torch.arange(10.0).view(1, 10)
    g = to_groups(w, 4)
    assert g.shape == (1, 3, 4)
    assert torch.equal(g[0, 2], torch.tensor([8.0, 9.0, 9.0, 9.0]))


def test_symmetric_zero_is_exact():
    w = torch.randn(4, 64)
    w[:, 5] = 0
    for name in ["nf4", "fp4_e2m1", "fp8_e4m3"]:
        fmt = get_format(name)
        q, deq = _roundtrip(w, fmt, 32)
        assert torch.all(deq[:, 5] == 0), name
    q, deq = _roundtrip(w, get_format("int4", symmetric=True), 32)
    assert torch.all(deq[:, 5] == 0)


def test_nf4_levels_match_normal_quantile_shape():
    grid = get_format("nf4").grid()
    assert grid.numel() == 16 and grid.min() == -1 and grid.max() == 1 and (grid == 0).any()


def test_fp4_grid():
    expected = torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert torch.allclose(get_format("fp4_e2m1").grid(), expected)


def test_to_dict_roundtrip():
    for name in FORMATS:
        fmt = get_format(name)
        assert get_format(fmt.to_dict()) == fmt
    sym = get_format("int4", symmetric=True)
    assert sym.to_dict() == {"name": "int4", "symmetric": True}
    assert get_format(sym.to_dict()) == sym


def test_unknown_format_and_bad_options():
    with pytest.raises(ValueError, match="unknown weight format"):
        get_format("int5x")
    with pytest.raises(ValueError, match="does not accept"):
        get_format("nf4", symmetric=True)


def test_constant_and_zero_groups_are_finite():
    w = torch.zeros(3, 64)
    w[1] = 2.5
    for name in FORMATS:
        q, deq = _roundtrip(w, get_format(name), 32)
        assert torch.isfinite(deq).all()
        assert torch.allclose(deq.float(), w, atol=1e-6), name


def test_directly_built_formats_of_different_bits_are_not_equal():
    """Unnamed formats share the empty name; equality must still tell 3 bits from 2 (caches key on it)."""
    from llmopt.core.formats import AffineFormat

    assert AffineFormat(3) != AffineFormat(2)
    assert hash(AffineFormat(3)) != hash(AffineFormat(2))
    assert AffineFormat(4, symmetric=True) == AffineFormat(4, symmetric=True)
