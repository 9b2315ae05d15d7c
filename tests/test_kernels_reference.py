"""CPU int8 kernels and the ``lowbit::`` custom ops against kernels/reference.py.

Integer results are bit-exact; float results use a per-dtype tolerance.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.kernels import cpu_int8, ops  # noqa: F401  (ops registers torch.ops.lowbit)
from qcompile.kernels import reference as ref

SMALL = settings(max_examples=20, deadline=None)
lowbit = torch.ops.lowbit

# (rtol, atol) of a dequantized GEMM output of magnitude O(1..10)
TOL = {
    torch.float64: (1e-6, 1e-6),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_int8(shape, g) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


def rand_x(shape, g, dtype=torch.float32, outliers: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=g)
    if outliers:
        cols = torch.randperm(shape[-1], generator=g)[:outliers]
        x[..., cols] *= 40
    return x.to(dtype)


# quantize_rows -------------------------------------------------------------


@SMALL
@given(
    rows=st.integers(1, 9),
    k=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    masked=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_quantize_rows_error_bound(rows, k, dtype, masked, seed):
    g = gen(seed)
    x = rand_x((rows, k), g, dtype, outliers=min(2, k)) * 3
    mask = None
    if masked:
        mask = torch.ones(k, dtype=torch.bool)
        mask[torch.randperm(k, generator=g)[: min(masked, k)]] = False
    q, s = ref.quantize_rows(x, mask)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (rows, 1)
    assert (q.abs() <= 127).all()
    xf = x.float()
    inl = torch.ones(k, dtype=torch.bool) if mask is None else mask
    err = (xf - q.float() * s).abs()
    bound = s / 2 * (1 + 1e-5) + 1e-7 * xf.abs()
    assert (err[:, inl] <= bound.expand_as(err)[:, inl]).all(), (err - bound).max()
    # masked (outlier) columns do not count for the scale and quantize to 0
    assert (q[:, ~inl] == 0).all()
    absmax = xf.masked_fill(~inl, 0).abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(s, absmax.clamp_min(ref.EPS) / 127, rtol=0, atol=0)
    # the absmax element of each row hits +-127
    if inl.any():
        assert (q[:, inl].abs().amax(dim=-1) == 127).all() or (absmax == 0).any()


def test_quantize_rows_zero_rows_and_leading_dims():
    x = torch.randn(2, 3, 8)
    x[0, 1] = 0
    q, s = ref.quantize_rows(x)
    assert q.shape == (2, 3, 8) and s.shape == (2, 3, 1)
    assert (q[0, 1] == 0).all()
    assert torch.isfinite(s).all() and s[0, 1].item() == pytest.approx(ref.EPS / 127)
    # a row whose every inlier column is zero (all the mass is in the outliers)
    mask = torch.ones(8, dtype=torch.bool)
    mask[[0, 5]] = False
    x2 = torch.zeros(1, 8)
    x2[0, [0, 5]] = 100.0
    q2, s2 = ref.quantize_rows(x2, mask)
    assert (q2 == 0).all() and torch.isfinite(s2).all()
    # the cpu kernel is the same function
    q3, s3 = cpu_int8.quantize_rows(x, None)
    assert torch.equal(q3, q) and torch.equal(s3, s)


@SMALL
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantize_weight_per_channel_bound(n, k, dtype, seed):
    g = gen(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1).to(dtype)
    if n > 1:
        w[0] = 0  # an all-zero output channel
    w_q, w_scale = ref.quantize_weight_per_channel(w)
    assert w_q.dtype == torch.int8 and w_q.shape == (n, k)
    assert w_scale.dtype == torch.float32 and w_scale.shape == (n,)
    assert (w_q.abs() <= 127).all()
    wd = w.double()
    err = (wd - w_q.double() * w_scale.double().unsqueeze(1)).abs()
    bound = w_scale.double().unsqueeze(1) / 2 * (1 + 1e-6) + 1e-7 * wd.abs()
    assert (err <= bound).all(), (err - bound).max()
    if n > 1:
        assert (w_q[0] == 0).all() and torch.isfinite(w_scale).all()


# int8 GEMM -----------------------------------------------------------------


@SMALL
@given(
    m=st.integers(1, 40) | st.just(1),
    k=st.integers(2, 80),
    n=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_cpu_int8_matmul_bit_exact(m, k, n, seed):
    g = gen(seed)
    q, w_q = rand_int8((m, k), g), rand_int8((n, k), g)
    out = cpu_int8.int8_matmul_int32(q, w_q)
    expected = ref.int8_matmul_int32(q, w_q)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, expected)


def test_cpu_int8_matmul_extremes_and_layouts():
    q = torch.full((5, 300), -127, dtype=torch.int8)
    w_q = torch.full((3, 300), -127, dtype=torch.int8)
    assert torch.equal(cpu_int8.int8_matmul_int32(q, w_q), ref.int8_matmul_int32(q, w_q))
    g = gen(0)
    q_t = rand_int8((16, 5), g).t()  # non-contiguous activations
    w_t = rand_int8((16, 6), g).t()  # non-contiguous weight
    assert torch.equal(cpu_int8.int8_matmul_int32(q_t, w_t), ref.int8_matmul_int32(q_t, w_t))


@pytest.mark.parametrize("m,n", [(1, 5), (3, 16), (1, 1), (4, 1)])
def test_cpu_int8_matmul_single_input_feature(m, n):
    """K = 1 (a linear with one input feature) must not return garbage."""
    g = gen(m * 100 + n)
    q, w_q = rand_int8((m, 1), g), rand_int8((n, 1), g)
    assert torch.equal(cpu_int8.int8_matmul_int32(q, w_q), ref.int8_matmul_int32(q, w_q))


@SMALL
@given(
    lead=st.sampled_from([(1,), (5,), (2, 3), (1, 1)]),
    k=st.integers(2, 64),
    n=st.integers(1, 40),
    bias=st.booleans(),
    addend=st.booleans(),
    out_dtype=st.sampled_from(list(TOL)),
    seed=st.integers(0, 2**16),
)
def test_cpu_int8_linear_matches_reference(lead, k, n, bias, addend, out_dtype, seed):
    g = gen(seed)
    x = rand_x((*lead, k), g)
    q, s = ref.quantize_rows(x)
    w_q, w_scale = ref.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g).to(out_dtype) if bias else None
    add = torch.randn(*lead, n, generator=g).to(out_dtype) if addend else None
    out = cpu_int8.int8_linear(q, s, w_q, w_scale, b, add, out_dtype)
    expected = ref.int8_linear(q, s, w_q, w_scale, b, add, out_dtype)
    assert out.dtype == expected.dtype == out_dtype
    assert out.shape == expected.shape == (*lead, n)
    rtol, atol = TOL[out_dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    # and it is the op the graph holds before lowering
    op = lowbit.int8_linear(q, s, w_q, w_scale, b, add, out_dtype)
    torch.testing.assert_close(out, op, rtol=rtol, atol=atol)


def test_int8_linear_dequantizes_to_the_float_linear():
    """The whole int8 path is a good approximation of ``F.linear`` (SQNR floor)."""
    g = gen(3)
    x, w, b = rand_x((6, 48), g), torch.randn(24, 48, generator=g) * 0.1, torch.randn(24)
    q, s = ref.quantize_rows(x)
    w_q, w_scale = ref.quantize_weight_per_channel(w)
    y = cpu_int8.int8_linear(q, s, w_q, w_scale, b, None, torch.float32)
    y_ref = torch.nn.functional.linear(x, w, b)
    sqnr = 10 * torch.log10(y_ref.pow(2).sum() / (y - y_ref).pow(2).sum())
    assert sqnr > 30


# custom ops ------------------------------------------------------------------


def small_case(seed=0):
    g = gen(seed)
    x = rand_x((2, 3, 24), g, outliers=2)
    mask = torch.ones(24, dtype=torch.bool)
    mask[[3, 7]] = False
    w_q, w_scale = ref.quantize_weight_per_channel(torch.randn(16, 24, generator=g))
    return x, mask, w_q, w_scale, torch.randn(16, generator=g)


def test_opcheck_quantize_rows():
    x, mask, *_ = small_case()
    torch.library.opcheck(lowbit.quantize_rows.default, (x, mask))
    torch.library.opcheck(lowbit.quantize_rows.default, (x, None))


@SMALL
@given(
    rows=st.integers(1, 6),
    k=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantize_rows_copies_spreads_codes_without_clipping(rows, k, dtype, seed):
    """The pieces of a column sum to its code on the row's step, every column (outliers
    too) is within half a step of ``x``, and the step is set by ``max |x| / copies``."""
    g = gen(seed)
    x = rand_x((rows, k), g, dtype, outliers=min(3, k)) * 3
    copies = torch.randint(1, 5, (k,), generator=g).float()
    src, piece = ref.outlier_expansion(copies)
    assert src.numel() == int(copies.sum()) and torch.equal(src[:k], torch.arange(k))
    q, s = ref.quantize_rows_copies(x, copies, src, piece)
    assert q.dtype == torch.int8 and q.shape == (rows, src.numel()) and q.abs().max() <= 127
    codes = torch.zeros(rows, k).index_add_(1, src, q.float())  # each column's pieces summed
    xf = x.float()
    # half a step, plus float32 rounding of x * (127 / absmax) (a code may be 127 x 4)
    assert torch.all((xf - codes * s).abs() <= s / 2 + (codes.abs() + 1) * s * 2**-21)
    assert torch.equal(s, (xf.abs() / copies).amax(-1, keepdim=True).clamp_min(ref.EPS) / 127)
    # the pieces of one column: full (127) pieces first, all with the code's sign
    for c in range(k):
        pieces = q[:, src == c].float()
        assert torch.all(pieces * codes[:, c : c + 1] >= 0)
    torch.library.opcheck(lowbit.quantize_rows_copies.default, (x, copies, src, piece))


def test_opcheck_int8_linear():
    x, mask, w_q, w_scale, b = small_case()
    q, s = ref.quantize_rows(x, mask)
    addend = torch.randn(2, 3, 16)
    torch.library.opcheck(
        lowbit.int8_linear.default, (q, s, w_q, w_scale, b, addend, torch.float32)
    )
    torch.library.opcheck(
        lowbit.int8_linear.default, (q, s, w_q, w_scale, None, None, torch.bfloat16)
    )


def test_opcheck_int8_mixed_linear_dynamic():
    x, _, w_q, w_scale, b = small_case()
    torch.library.opcheck(lowbit.int8_mixed_linear_dynamic.default, (x, w_q, w_scale, b, 6.0))
    torch.library.opcheck(lowbit.int8_mixed_linear_dynamic.default, (x, w_q, w_scale, None, 1e9))


def direct_dynamic(x, w_q, w_scale, bias, threshold):
    """LLM.int8() with run-time outlier columns, written out by hand in float64."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    out_cols = (x2.abs() >= threshold).any(dim=0)
    w = w_q.double() * w_scale.double().unsqueeze(1)  # dequantized int8 weight
    xi = x2.masked_fill(out_cols, 0)
    absmax = xi.abs().amax(dim=1, keepdim=True).clamp_min(ref.EPS)
    q = torch.round(xi.float() * (127 / absmax.float())).clamp(-127, 127).double()
    y = (q @ w_q.double().t()) * (absmax / 127) * w_scale.double()
    y = y + x2[:, out_cols] @ w[:, out_cols].t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1), int(out_cols.sum())


@pytest.mark.parametrize("threshold", [0.0, 2.5, 6.0, float("inf")])
def test_int8_mixed_linear_dynamic_matches_direct_computation(threshold):
    x, _, w_q, w_scale, b = small_case(seed=5)
    out = lowbit.int8_mixed_linear_dynamic(x, w_q, w_scale, b, threshold)
    expected, n_out = direct_dynamic(x, w_q, w_scale, b, threshold)
    assert out.dtype == x.dtype and out.shape == (2, 3, 16)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    if threshold == float("inf"):
        assert n_out == 0
        q, s = ref.quantize_rows(x)
        plain = ref.int8_linear(q, s, w_q, w_scale, b, None, x.dtype)
        assert torch.equal(out, plain)
    if threshold == 6.0:
        assert 0 < n_out < x.shape[-1]


def test_int8_mixed_linear_dynamic_bfloat16():
    x, _, w_q, w_scale, b = small_case(seed=6)
    xb = x.to(torch.bfloat16)
    out = lowbit.int8_mixed_linear_dynamic(xb, w_q, w_scale, b, 6.0)
    assert out.dtype == torch.bfloat16
    expected, _ = direct_dynamic(xb, w_q, w_scale, b, 6.0)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=0.1)
