"""Triton int8 kernels (kernels/triton_int8.py) against kernels/reference.py.

Without a GPU the kernels run in the Triton interpreter, so shapes stay small.
Integer results must be bit-exact; float GEMM outputs use a per-dtype tolerance
(the interpreter happens to reproduce the reference exactly, a GPU may not
because of FMA contraction in the epilogue).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qcompile.kernels import ops  # noqa: E402,F401  (registers the generic lowbit:: ops)
from qcompile.kernels import reference as ref  # noqa: E402
from qcompile.kernels import triton_int8 as tk  # noqa: E402

ok, why = tk.triton_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) for the dequantized GEMM output; outputs here are O(1)
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
SMALL = settings(max_examples=15, deadline=None)

Ms = st.sampled_from([1, 3, 17, 33])
Ks = st.sampled_from([16, 40, 72])
Ns = st.sampled_from([8, 24, 50])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_quant_equal(x, mask, **kw):
    q, s = tk.quantize_rows_triton_impl(x, mask, **kw)
    q_ref, s_ref = ref.quantize_rows(x, mask)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
    torch.testing.assert_close(q.cpu(), q_ref.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# quantize_rows
# --------------------------------------------------------------------------- #


@SMALL
@given(
    M=Ms,
    K=Ks,
    dtype=st.sampled_from(FLOAT_DTYPES),
    masked=st.booleans(),
    block_k=st.sampled_from([None, 16]),  # 16 forces several K blocks per row
    seed=st.integers(0, 2**16),
)
def test_quantize_bit_exact(M, K, dtype, masked, block_k, seed):
    g = _gen(seed)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10).to(dtype)
    mask = (torch.rand(K, generator=g) > 0.2) if masked else None
    if masked:  # make the outlier columns large, as in LLM.int8()
        x[:, ~mask] *= 50
    _assert_quant_equal(x.to(DEVICE), None if mask is None else mask.to(DEVICE), block_k=block_k)


def _rdiv_sensitive_rows(rows: int = 16, K: int = 40) -> torch.Tensor:
    """Rows whose quantization depends on how 127 / absmax is rounded.

    The reference computes ``127 / absmax`` through torch's ``__rdiv__``
    (``reciprocal(absmax) * 127``), which for about a quarter of all absmax
    values differs by one ulp from the correctly rounded quotient. Each row is
    ``[absmax, x...]`` with x chosen near .5 ties so that the two ways of
    computing the multiplier give different q.
    """
    g = _gen(0)
    a = torch.rand(4096, generator=g) * 10 + 0.1
    inv_ref = a.reciprocal() * 127
    inv_div = (127 / a.double()).float()
    a, inv_ref, inv_div = (t[inv_ref != inv_div] for t in (a, inv_ref, inv_div))
    x = (torch.arange(126.0) + 0.5)[None, :] / inv_ref[:, None]
    out = []
    for _ in range(2):  # the tie point and its upper neighbour
        flips = torch.round(x * inv_ref[:, None]) != torch.round(x * inv_div[:, None])
        for i in range(len(a)):
            vals = x[i][flips[i]][: K - 1]
            if len(out) < rows and len(vals) == K - 1:
                out.append(torch.cat([a[i : i + 1], vals]))
        x = torch.nextafter(x, torch.full_like(x, float("inf")))
    assert len(out) == rows
    return torch.stack(out)


def test_quantize_multiplier_rounding_matches_reference():
    x = _rdiv_sensitive_rows()
    _assert_quant_equal(x.to(DEVICE), None)
    # sanity: the correctly rounded multiplier would have given a different q
    inv_div = (127 / x[:, :1].double()).float()
    q_div = torch.round(x * inv_div).clamp(-127, 127).to(torch.int8)
    assert not torch.equal(q_div, ref.quantize_rows(x)[0])


def test_quantize_many_rows_bit_exact():
    g = _gen(0)
    x = torch.randn(192, 40, generator=g) * torch.rand(192, 1, generator=g) * 4
    _assert_quant_equal(x.to(DEVICE), None)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("absmax", [127.0, 254.0])
def test_quantize_ties_round_half_even(dtype, absmax):
    # absmax 127 gives 127/absmax == 1 and absmax 254 gives 0.5, so these
    # inputs land exactly on .5 after scaling
    c = absmax / 127
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 125.5, 126.5, -126.5]) * c
    x = torch.cat([torch.tensor([absmax]), ties, torch.zeros(5)]).reshape(1, 16).to(dtype)
    x = x.repeat(3, 1)
    x[1] = -x[1]
    q, _ = tk.quantize_rows_triton_impl(x.to(DEVICE), None)
    expected = [0, 2, 2, 4, 0, -2, -2, 126, 126, -126]
    assert q[0, 1:11].tolist() == expected
    assert q[1, 1:11].tolist() == [-e for e in expected]
    _assert_quant_equal(x.to(DEVICE), None)


@pytest.mark.parametrize("masked", [False, True])
def test_quantize_zero_rows(masked):
    x = torch.zeros(4, 40)
    mask = None
    if masked:
        mask = torch.ones(40, dtype=torch.bool)
        mask[[3, 17, 39]] = False
        x[1, [3, 17, 39]] = 100.0  # only outliers: inlier part is all zero
    x[2, 5] = -0.0
    _assert_quant_equal(x.to(DEVICE), None if mask is None else mask.to(DEVICE), block_k=16)
    q, s = tk.quantize_rows_triton_impl(x.to(DEVICE), None if mask is None else mask.to(DEVICE))
    if masked:
        assert (q == 0).all()
        assert torch.all(s.cpu() == torch.tensor(ref.EPS, dtype=torch.float32) / ref.QMAX)


def test_quantize_leading_dims_and_noncontiguous():
    g = _gen(1)
    x = torch.randn(2, 40, 3, generator=g).transpose(1, 2)  # [2, 3, 40], non-contiguous
    mask = torch.rand(40, generator=g) > 0.3
    _assert_quant_equal(x.to(DEVICE), mask.to(DEVICE))


# --------------------------------------------------------------------------- #
# int8 GEMM
# --------------------------------------------------------------------------- #


def _gemm_inputs(M, K, N, seed, act_dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(M, K, generator=g).to(act_dtype)
    q, xs = ref.quantize_rows(x)
    w_q, ws = ref.quantize_weight_per_channel(torch.randn(N, K, generator=g) * 0.05)
    bias = torch.randn(N, generator=g).to(act_dtype)
    addend = torch.randn(M, N, generator=g).to(act_dtype)
    return q, xs, w_q, ws, bias, addend


@SMALL
@given(M=Ms, K=Ks, N=Ns, seed=st.integers(0, 2**16))
def test_gemm_int32_bit_exact(M, K, N, seed):
    g = _gen(seed)
    q = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    if seed % 3 == 0:  # saturated inputs: largest magnitudes int32 must hold
        q.fill_(-127)
        w_q.fill_(127)
    acc = tk.int8_matmul_int32_triton(q.to(DEVICE), w_q.to(DEVICE))
    assert acc.dtype == torch.int32
    torch.testing.assert_close(acc.cpu(), ref.int8_matmul_int32(q, w_q), rtol=0, atol=0)


@SMALL
@given(
    M=Ms,
    K=Ks,
    N=Ns,
    out_dtype=st.sampled_from(FLOAT_DTYPES),
    has_bias=st.booleans(),
    has_addend=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_epilogue_matches_reference(M, K, N, out_dtype, has_bias, has_addend, seed):
    q, xs, w_q, ws, bias, addend = _gemm_inputs(M, K, N, seed, act_dtype=out_dtype)
    bias = bias if has_bias else None
    addend = addend if has_addend else None
    expected = ref.int8_linear(q, xs, w_q, ws, bias, addend, out_dtype)
    args = [t.to(DEVICE) if t is not None else None for t in (q, xs, w_q, ws, bias, addend)]
    out = tk.int8_linear_triton_impl(*args, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    rtol, atol = TOL[out_dtype]
    torch.testing.assert_close(out.cpu(), expected, rtol=rtol, atol=atol)


def test_gemm_leading_dims_and_strided_weight():
    q, xs, w_q, ws, bias, addend = _gemm_inputs(6, 40, 24, seed=3)
    q3, xs3, add3 = q.reshape(2, 3, 40), xs.reshape(2, 3, 1), addend.reshape(2, 3, 24)
    w_t = w_q.t().contiguous().t()  # same values, column-major storage
    expected = ref.int8_linear(q3, xs3, w_q, ws, bias, add3, torch.float32)
    d = DEVICE
    out = tk.int8_linear_triton_impl(
        q3.to(d), xs3.to(d), w_t.to(d), ws.to(d), bias.to(d), add3.to(d), torch.float32
    )
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(
        out.cpu(), expected, **dict(zip(("rtol", "atol"), TOL[torch.float32]))
    )


# --------------------------------------------------------------------------- #
# custom ops
# --------------------------------------------------------------------------- #


def test_custom_ops_match_generic_ops_and_opcheck():
    q, xs, w_q, ws, bias, addend = _gemm_inputs(5, 40, 24, seed=7)
    x = torch.randn(5, 40, generator=_gen(8))
    mask = torch.rand(40, generator=_gen(9)) > 0.2
    d = DEVICE

    qt, st_ = torch.ops.lowbit.quantize_rows_triton(x.to(d), mask.to(d))
    qg, sg = torch.ops.lowbit.quantize_rows(x, mask)
    assert torch.equal(qt.cpu(), qg) and torch.equal(st_.cpu(), sg)

    lin_args = (q, xs, w_q, ws, bias, addend)
    out = torch.ops.lowbit.int8_linear_triton(*(t.to(d) for t in lin_args), torch.float16)
    expected = torch.ops.lowbit.int8_linear(*lin_args, torch.float16)
    torch.testing.assert_close(
        out.cpu(), expected, rtol=TOL[torch.float16][0], atol=TOL[torch.float16][1]
    )

    torch.library.opcheck(tk.quantize_rows_triton, (x.to(d), mask.to(d)))
    torch.library.opcheck(tk.quantize_rows_triton, (x.to(d), None))
    torch.library.opcheck(tk.int8_linear_triton, (*(t.to(d) for t in lin_args), torch.float32))
    torch.library.opcheck(
        tk.int8_linear_triton, (q.to(d), xs.to(d), w_q.to(d), ws.to(d), None, None, torch.bfloat16)
    )


# --------------------------------------------------------------------------- #
# availability / error message
# --------------------------------------------------------------------------- #


def test_triton_available_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tk.triton_available()[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    avail, reason = tk.triton_available()
    assert not avail
    assert "TRITON_INTERPRET=1" in reason and "target='cpu'" in reason

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tk.triton_available()[0]

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.triton_available()[0]

    # set too late: kernels were built for a GPU at import time
    monkeypatch.setattr(tk, "_kernels_interpreted", lambda: False)
    avail, reason = tk.triton_available()
    assert not avail and "after" in reason


def test_clear_error_without_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.quantize_rows_triton_impl(x, None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.lowbit.quantize_rows_triton(x, None)
    q = torch.zeros(2, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="target='cpu'"):
        torch.ops.lowbit.int8_linear_triton(
            q, torch.ones(2, 1), q, torch.ones(2), None, None, torch.float32
        )
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.int8_matmul_int32_triton(q, q)
