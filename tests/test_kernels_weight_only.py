"""Weight-only low-bit kernels against kernels/weight_only_reference.py.

* RTN numerics: the half-step error bound, parameters on the grid.
* Triton dequant GEMM / split-K GEMV (interpreter on CPU): per-dtype tolerance,
  ragged M and N, every bit width, the M == 1 path, opcheck.
* CPU lowering (cpu_weight_only): every path against the reference within its
  documented tolerance, aten-traceability.

Float comparisons are relative to ``|x| @ |W|^T`` (the scale of the rounding
errors of a dot product) so one tolerance fits every shape.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qcompile.kernels import cpu_packed  # noqa: E402
from qcompile.kernels import cpu_weight_only as cw  # noqa: E402
from qcompile.kernels import weight_only_reference as ref  # noqa: E402
from qcompile.kernels.packing import pack  # noqa: E402

BITS = [2, 3, 4, 8]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |y - y_ref| <= TOL * (|x| @ |W|^T) + TOL * |bias| for the Triton kernels: summation
# order (fp32) plus at most one rounding of the output (fp16 2^-11, bf16 2^-8)
TRITON_TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}
# CPU bf16 paths: x, scales and offsets rounded to bf16 (module docstring)
CPU_BF16_TOL = 8e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(n, k, seed, scale=0.1):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * scale
    w[0] = w[0].abs() + 0.05  # a row whose groups are all positive
    if n > 2:
        w[1] = -w[1].abs()  # all negative
        w[2, : k // 2] = 0.0  # all-zero groups
    return w


def _case(n, k, bits, g, dtype, seed):
    w = _weight(n, k, seed)
    q, s, z = ref.quantize_groupwise(w, bits, g, scale_dtype=dtype)
    return w, q, s, z, pack(q, bits)


def _assert_close_scaled(y, y_ref, x, q, s, z, g, bias, tol):
    w = ref.dequantize_groupwise(q, s, z, g, dtype=torch.float32)
    scale = x.reshape(-1, x.shape[-1]).float().abs() @ w.abs().t()
    if bias is not None:
        scale = scale + bias.float().abs()
    err = (y.float() - y_ref.float()).reshape(scale.shape).abs()
    bad = err > tol * scale + 1e-6
    assert not bad.any(), f"max err/scale {(err / (scale + 1e-12)).max():.3g} > {tol}"


# --------------------------------------------------------------------------- #
# RTN reference
# --------------------------------------------------------------------------- #


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    g=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 3),
    n=st.integers(3, 9),
    dtype=st.sampled_from(FLOAT_DTYPES),
    magnitude=st.sampled_from([1e-4, 0.05, 3.0, 200.0]),
    seed=st.integers(0, 2**16),
)
def test_rtn_error_bound(bits, g, groups, n, dtype, magnitude, seed):
    k = g * groups
    w = _weight(n, k, seed, magnitude)
    q, s, z = ref.quantize_groupwise(w, bits, g, scale_dtype=dtype)
    qmax = (1 << bits) - 1
    assert q.dtype == torch.uint8 and q.shape == (n, k) and int(q.max()) <= qmax
    assert s.dtype == dtype and z.dtype == dtype and s.shape == z.shape == (n, groups)
    assert bool((s > 0).all())
    zd = z.double()
    assert torch.equal(zd, zd.round()) and bool(((zd >= 0) & (zd <= qmax)).all())
    deq = ref.dequantize_groupwise(q, s, z, g, dtype=torch.float64)
    half_step = s.double().repeat_interleave(g, 1) / 2
    err = (w.double() - deq).abs()
    assert bool((err <= half_step + 1e-6 * w.double().abs()).all()), (err - half_step).max()


def test_rtn_exact_on_grid_and_zero_groups():
    # weights already on a 4-bit grid come back exactly; an all-zero group is all zeros
    s = 0.125
    codes = torch.arange(16, dtype=torch.float64).repeat(2, 2)  # [2, 32]
    w = ((codes - 5) * s).float()
    w[1] = 0.0
    q, sc, z = ref.quantize_groupwise(w, 4, 32)
    deq = ref.dequantize_groupwise(q, sc, z, 32, dtype=torch.float32)
    assert torch.equal(deq, w)
    assert float(sc[0, 0]) == s and float(z[0, 0]) == 5


def test_quantize_with_qparams_on_column_slices():
    # how GPTQ uses it: one column at a time with its group's parameters
    w = _weight(6, 64, 3)
    q, s, z = ref.quantize_groupwise(w, 3, 32)
    for j in (0, 17, 40, 63):
        g = j // 32
        qj = ref.quantize_with_qparams(w[:, j : j + 1], s[:, g : g + 1], z[:, g : g + 1], 3, 1)
        assert torch.equal(qj[:, 0], q[:, j])


def test_reference_linear_matches_float64():
    w, q, s, z, p = _case(24, 64, 4, 32, torch.float32, 0)
    x = torch.randn(2, 3, 64, dtype=torch.float32)
    b = torch.randn(24)
    y = ref.dequant_linear(x, p, s, z, 4, 32, b)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    w64 = ref.dequantize_groupwise(q, s, z, 32, dtype=torch.float64)
    torch.testing.assert_close(y.double(), x.double() @ w64.t() + b.double(), rtol=1e-5, atol=1e-5)


def test_reference_rejects_bad_group():
    with pytest.raises(ValueError, match="divide"):
        ref.quantize_groupwise(torch.randn(4, 48), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        ref.quantize_groupwise(torch.randn(4, 64), 5, 32)


# --------------------------------------------------------------------------- #
# Triton (interpreter on CPU)
# --------------------------------------------------------------------------- #

try:
    from qcompile.kernels import triton_dequant_gemm as tdg
    from qcompile.kernels import triton_int8

    _ok, _why = triton_int8.triton_available()
except ImportError as e:  # pragma: no cover - triton missing
    _ok, _why = False, str(e)
needs_triton = pytest.mark.skipif(not _ok, reason=_why)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_check(m, n, k, g, bits, dtype, has_bias, seed, path="auto", lead=None):
    w, q, s, z, p = _case(n, k, bits, g, dtype, seed)
    gen = _gen(seed + 1)
    shape = (*(lead or (m,)), k)
    x = torch.randn(shape, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    y_ref = ref.dequant_linear(x, p, s, z, bits, g, b)
    d = DEVICE
    y = tdg.dequant_linear_triton_impl(
        x.to(d), p.to(d), s.to(d), z.to(d), None if b is None else b.to(d), bits, g, path=path
    )
    assert y.dtype == dtype and y.shape == y_ref.shape
    _assert_close_scaled(y.cpu(), y_ref, x, q, s, z, g, b, TRITON_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_gemm_matches_reference(bits, dtype):
    # ragged M and N (not multiples of the 16 x 16 tiles), two K tiles, bias
    _triton_check(m=19, n=40, k=64, g=32, bits=bits, dtype=dtype, has_bias=True, seed=bits)


@needs_triton
@pytest.mark.parametrize("bits", BITS)
def test_triton_m1_uses_gemv_and_matches(bits, monkeypatch):
    calls = []
    orig = tdg._split_k

    def spy(*a):
        calls.append(a)
        return orig(*a)

    monkeypatch.setattr(tdg, "_split_k", spy)
    # K = 4 groups -> the split-K path reduces two K ranges
    _triton_check(
        m=1, n=24, k=128, g=32, bits=bits, dtype=torch.float16, has_bias=bits != 8, seed=5
    )
    assert calls, "M == 1 should take the split-K GEMV"


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    m=st.sampled_from([1, 2, 17]),
    n=st.sampled_from([8, 24, 33]),
    g=st.sampled_from([16, 32, 64]),
    groups=st.sampled_from([1, 3, 5]),
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from(FLOAT_DTYPES),
    path=st.sampled_from(["auto", "gemm", "gemv"]),
    seed=st.integers(0, 2**16),
)
def test_triton_ragged_shapes(m, n, g, groups, bits, dtype, path, seed):
    # g = 16 puts a group boundary inside a K tile (BLOCK_K = 32 under the
    # interpreter) and, with an odd number of groups, leaves a ragged last K tile
    k = g * groups
    if k > 128:
        k = g * 2
    if path == "gemv" and m > 1:
        m = 2  # the GEMV handles M rows one program row each; keep it cheap
    _triton_check(m, n, k, g, bits, dtype, seed % 2 == 0, seed, path)


@needs_triton
def test_triton_3d_input_and_custom_op_opcheck():
    w, q, s, z, p = _case(16, 64, 3, 32, torch.bfloat16, 9)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    b = torch.randn(16).to(torch.bfloat16)
    d = DEVICE
    args = (x.to(d), p.to(d), s.to(d), z.to(d), b.to(d), 3, 32)
    y = torch.ops.lowbit.dequant_linear_triton(*args)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    _assert_close_scaled(y.cpu(), ref.dequant_linear(x, p, s, z, 3, 32, b), x, q, s, z, 32, b, 8e-3)
    torch.library.opcheck(tdg.dequant_linear_triton, args)
    x1 = torch.randn(1, 64).to(d)
    torch.library.opcheck(
        tdg.dequant_linear_triton, (x1, p.to(d), s.float().to(d), z.float().to(d), None, 3, 32)
    )


@needs_triton
def test_triton_rejects_bad_arguments():
    w, q, s, z, p = _case(8, 64, 4, 32, torch.float32, 0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="packed"):
        tdg.dequant_linear_triton_impl(x, p[:, :-1], s, z, None, 4, 32)
    with pytest.raises(ValueError, match="divide"):
        tdg.dequant_linear_triton_impl(x, p, s, z, None, 4, 48)
    with pytest.raises(ValueError, match="path"):
        tdg.dequant_linear_triton_impl(x, p, s, z, None, 4, 32, path="splitk")


def test_configs_come_from_functions():
    tdg_mod = pytest.importorskip("qcompile.kernels.triton_dequant_gemm")
    gemm, gemv = tdg_mod.dequant_gemm_configs(), tdg_mod.dequant_gemv_configs()
    assert gemm and gemv
    for c in gemm:
        assert min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) >= 16
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert len(gemm) == 1 and len(gemv) == 1


# --------------------------------------------------------------------------- #
# CPU lowering
# --------------------------------------------------------------------------- #


def _int8_act_bound(x, q, s, z, g):
    """What rounding x to int8 per block of 32 (``cpu_packed``'s decode) may move
    x @ W^T by: half a step of each block's grid times |W|."""
    k = x.shape[-1]
    xb = x.reshape(-1, k // 32, 32).float()
    half_step = (xb.abs().amax(-1, keepdim=True) / 254).expand_as(xb).reshape(-1, k)
    w = ref.dequantize_groupwise(q, s, z, g, dtype=torch.float32)
    return half_step @ w.abs().t()


def _cpu_check(
    n,
    k,
    g,
    bits,
    dtype,
    m,
    exact=False,
    lead=None,
    has_bias=True,
    seed=0,
    positive=False,
    legacy=False,
):
    w, q, s, z, p = _case(n, k, bits, g, dtype, seed)
    pre = cw.prepack_cpu(q, s, z, bits, g, dtype, exact=exact, packed_kernels=not legacy)
    gen = _gen(seed + 1)
    x = torch.randn((*(lead or (m,)), k), generator=gen)
    if positive:  # no cancellation in x @ W^T: the worst case for relative errors
        x = x.abs() + 0.5
    x = x.to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    y = cw.dequant_linear_cpu(x, pre, bits, g, b)
    y_ref = ref.dequant_linear(x, p, s, z, bits, g, b)
    assert y.dtype == dtype and y.shape == y_ref.shape
    path = cw.cpu_path(pre, x.numel() // k)
    if path == "packed_gemv":  # int8 activations: their rounding, then the output's
        slack = _int8_act_bound(x, q, s, z, g).reshape(y.shape) * 1.001
        w_hat = ref.dequantize_groupwise(q, s, z, g, dtype=torch.float32)
        err = (y.float() - y_ref.float()).abs()
        scale = (x.reshape(-1, k).float().abs() @ w_hat.abs().t()).reshape(y.shape)
        assert (err <= slack + TRITON_TOL[dtype] * (scale + y_ref.float().abs()) + 1e-6).all()
        return pre, path
    tol = TRITON_TOL[dtype] if path == "exact" else CPU_BF16_TOL
    _assert_close_scaled(y, y_ref, x, q, s, z, g, b, tol)
    return pre, path


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_decode_and_prefill_match_reference(bits, dtype):
    n, k, g = 64, 128, 32
    pre, path = _cpu_check(n, k, g, bits, dtype, m=1, seed=bits)
    assert path == "packed_gemv"  # the stored codes, fp16 scales, uint8 zero points
    assert set(pre) == {"packed", "scales16", "zeros8"}
    assert pre["packed"].dtype == torch.int32 and pre["packed"].shape[1] * 32 == k * bits
    _, path = _cpu_check(n, k, g, bits, dtype, m=cpu_packed.GEMV_MAX_M + 1, seed=bits)
    assert path == "packed_dequant"
    # oneDNN's int4 layout (packed_kernels=False): the earlier default
    pre, path = _cpu_check(n, k, g, bits, dtype, m=1, seed=bits, legacy=True)
    assert path == ("int4pack" if bits <= 4 else "int4pack_x2")
    assert "codes" not in pre  # the blocked int4 layout was decodable: 4 bits per weight
    _, path = _cpu_check(n, k, g, bits, dtype, m=cw.DECODE_MAX_M + 7, seed=bits, legacy=True)
    assert path == "dequant"


@pytest.fixture(params=["vnni", "avx2"])
def packed_isa(request):
    """The 4-bit AVX-512 VNNI loop (groups of a multiple of 64) and the other (AVX2, or
    scalar where the compiler does not target AVX2); the VNNI run is skipped on a CPU
    without it."""
    lib = cpu_packed.library()
    if lib.lowbit_packed_use_vnni(int(request.param == "vnni")) != (request.param == "vnni"):
        lib.lowbit_packed_use_vnni(1)
        pytest.skip("no AVX-512 VNNI loop here (the CPU lacks it, or the build has no AVX2)")
    yield request.param
    lib.lowbit_packed_use_vnni(1)


def test_cpu_packed_kernel_is_its_reference(packed_isa):
    """lowbit::packed_linear_cpu computes cpu_packed.reference_linear (int8 activations per
    block of 32, integer dot products, fp16 scales) to float32 rounding: every bit width,
    group sizes 32-128, row counts around the 4-row tiles, a 3-bit K whose codes straddle
    words, a bias, and a NaN row that must stay NaN without touching the others. 4 bits
    in groups of 64 and 128 run the VNNI loop where it is on."""
    gen = _gen(7)
    cases = [(2, 32, 96, 1), (3, 64, 192, 5), (4, 128, 256, 3), (8, 32, 64, 9), (4, 64, 576, 1),
             (4, 64, 1536, 6), (4, 32, 96, 2)]  # fmt: skip
    for bits, g, k, m in cases:
        n = 24
        w = torch.randn(n, k, generator=gen) * 0.1
        q, s, z = ref.quantize_groupwise(w, bits, g)
        s16, z8 = s.half(), z.to(torch.uint8)
        x = torch.randn(m, k, generator=gen)
        x[0, :32] *= 50  # an outlier block
        if m > 2:
            x[2, 5] = float("nan")
        b = torch.randn(n, generator=gen)
        y = torch.ops.lowbit.packed_linear_cpu(x, pack(q, bits), s16, z8, b, bits, g)
        want = cpu_packed.reference_linear(x, q, s16, z8, bits, g, b)
        ok = ~torch.isnan(want)
        assert torch.equal(torch.isnan(y), ~ok)
        assert bool(ok[0].all()) and (m <= 2 or not bool(ok[2].any()))
        bound = 1e-5 * (x.nan_to_num().abs() @ w.abs().t() + b.abs())
        assert ((y.double() - want)[ok].abs() <= bound[ok] + 1e-6).all(), (bits, g, k, m)
        dense = torch.ops.lowbit.dequant_packed_cpu(
            pack(q, bits), s16, z8, bits, g, k, torch.float32
        )
        torch.testing.assert_close(
            dense, ref.dequantize_groupwise(q, s16.float(), z, g), rtol=0, atol=0
        )


def test_cpu_packed_prepack_keeps_the_stored_codes_and_refuses_what_fp16_cannot_hold():
    w, q, s, z, p = _case(64, 128, 4, 32, torch.float32, 3)
    pre = cw.prepack_cpu(q, s, z, 4, 32, torch.float32, packed=p)
    assert pre["packed"] is p  # the stored tensor itself: no second copy of the codes
    assert torch.equal(pre["scales16"].float(), s)  # compute_qparams: fp16's grid
    tiny = s * 1e-6  # below fp16's normal range
    assert cpu_packed.prepack(tiny, z, 4) is None
    assert cw.cpu_path(cw.prepack_cpu(q, tiny, z, 4, 32, torch.float32), 1) != "packed_gemv"
    assert cpu_packed.prepack(s, z + 0.5, 4) is None  # zero points must be integers


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, cw.DECODE_MAX_M + 1])
def test_cpu_positive_activations(bits, m):
    _cpu_check(128, 256, 64, bits, torch.float32, m=m, positive=True, seed=11)
    _cpu_check(128, 256, 64, bits, torch.bfloat16, m=m, positive=True, seed=12)


@pytest.mark.parametrize("bits", [3, 8])
def test_cpu_smollm2_like_shape_and_3d_input(bits):
    # hidden 576 is not a multiple of 128; K/G = 9 groups
    _cpu_check(192, 576, 64, bits, torch.float32, m=None, lead=(1, 1))
    _cpu_check(192, 576, 64, bits, torch.float32, m=None, lead=(2, 40))


@pytest.mark.parametrize("bits", BITS)
def test_cpu_exact_path_and_fallbacks(bits):
    # exact=True: float32 dequantization, the reference numerics
    pre, path = _cpu_check(64, 128, 32, bits, torch.float32, m=1, exact=True)
    assert path == "exact" and set(pre) == {"codes", "scales", "zeros"}
    # N % 16 != 0: the packed kernels take it, oneDNN's int4 kernels cannot
    _, path = _cpu_check(40, 64, 32, bits, torch.bfloat16, m=3)
    assert path == "packed_gemv"
    _, path = _cpu_check(40, 64, 32, bits, torch.bfloat16, m=3, legacy=True)
    assert path == "exact"
    # a group of 16: not the packed kernels' blocks of 32
    _, path = _cpu_check(64, 64, 16, bits, torch.float32, m=1)
    assert path == "exact"
    # N % 64 != 0: torch's blocked layout is not decoded; a codes copy serves prefill
    pre, path = _cpu_check(48, 64, 32, bits, torch.float32, m=40, has_bias=False, legacy=True)
    assert "codes" in pre and path == "dequant"
    _, path = _cpu_check(48, 64, 32, bits, torch.float32, m=1, legacy=True)
    assert path != "exact"


def test_cpu_two_three_bit_offsets_are_exact():
    # re-centred codes: zf = (8 - z - c) * s is exactly 0 for 2 and 3 bits
    for bits in (2, 3):
        w, q, s, z, p = _case(64, 128, bits, 64, torch.float32, 1)
        pre = cw.prepack_cpu(q, s, z, bits, 64, torch.float32, packed_kernels=False)
        assert float(pre["sz"][..., 1].abs().max()) == 0.0
        dq = cw._dequant_bf16(pre, bits, 64, 64, 128).float()
        want = ref.dequantize_groupwise(q, s.bfloat16(), z, 64, dtype=torch.float32)
        torch.testing.assert_close(dq, want.bfloat16().float(), rtol=0, atol=0)


def test_cpu_decode_and_prefill_agree():
    # the two paths use the same bf16 weight; only GEMM summation order differs
    w, q, s, z, p = _case(128, 256, 4, 64, torch.bfloat16, 4)
    pre = cw.prepack_cpu(q, s, z, 4, 64, torch.bfloat16, packed_kernels=False)
    x = torch.randn(cw.DECODE_MAX_M + 1, 256).to(torch.bfloat16)
    y_pre = cw.dequant_linear_cpu(x, pre, 4, 64)
    y_dec = torch.cat([cw.dequant_linear_cpu(x[i : i + 1], pre, 4, 64) for i in range(len(x))])
    torch.testing.assert_close(y_dec.float(), y_pre.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("bits,m", [(4, 1), (4, 40), (8, 1), (3, 1)])
def test_cpu_lowering_is_aten_traceable(bits, m):
    from torch.fx.experimental.proxy_tensor import make_fx

    w, q, s, z, p = _case(64, 128, bits, 32, torch.float32, 0)
    pre = cw.prepack_cpu(q, s, z, bits, 32, torch.float32, packed_kernels=False)
    keys = sorted(pre)

    def f(x, *tensors):
        return cw.dequant_linear_cpu(x, dict(zip(keys, tensors)), bits, 32)

    x = torch.randn(m, 128)
    gm = make_fx(f, tracing_mode="fake")(x, *(pre[key] for key in keys))
    targets = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    assert all(t.startswith("aten.") for t in targets), targets
    if m == 1:
        assert "aten._weight_int4pack_mm_for_cpu.default" in targets
    torch.testing.assert_close(
        gm(x, *(pre[key] for key in keys)), f(x, *(pre[key] for key in keys))
    )


def test_cpu_prepack_rejects_bad_arguments():
    w, q, s, z, p = _case(64, 128, 4, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="divide"):
        cw.prepack_cpu(q, s, z, 4, 48, torch.float32)
    with pytest.raises(ValueError, match="bits"):
        cw.prepack_cpu(q, s, z, 5, 32, torch.float32)
    with pytest.raises(TypeError):
        cw.prepack_cpu(q, s, z, 4, 32, torch.int8)


def test_cpu_packed_path_traces_to_its_ops():
    from torch.fx.experimental.proxy_tensor import make_fx

    w, q, s, z, p = _case(64, 128, 3, 32, torch.float32, 0)
    pre = cw.prepack_cpu(q, s, z, 3, 32, torch.float32)
    keys = sorted(pre)

    def f(x, *tensors):
        return cw.dequant_linear_cpu(x, dict(zip(keys, tensors)), 3, 32)

    for m, op in ((1, "lowbit.packed_linear_cpu"), (40, "lowbit.dequant_packed_cpu")):
        x = torch.randn(m, 128)
        gm = make_fx(f, tracing_mode="fake")(x, *(pre[key] for key in keys))
        targets = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
        assert f"{op}.default" in targets, targets
        torch.testing.assert_close(
            gm(x, *(pre[key] for key in keys)), f(x, *(pre[key] for key in keys))
        )


@pytest.mark.parametrize("bits,legacy", [(4, False), (8, False), (4, True), (8, True)])
def test_cpu_lowering_compiles_with_inductor(bits, legacy, fresh_dynamo):
    # fullgraph: aten ops or lowbit's custom ops (no graph break); decode and prefill
    w, q, s, z, p = _case(64, 128, bits, 32, torch.float32, 2)
    pre = cw.prepack_cpu(q, s, z, bits, 32, torch.float32, packed_kernels=not legacy)
    b = torch.randn(64)

    def f(x):
        return torch.relu(cw.dequant_linear_cpu(x, pre, bits, 32, b))

    cf = torch.compile(f, fullgraph=True)
    for m in (1, 40) if bits == 4 or not legacy else (1,):
        x = torch.randn(m, 128)
        torch.testing.assert_close(cf(x), f(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpu_packed_group_gives_each_single_call_bit_for_bit(bits, packed_isa):
    """One call for the packed weights of one input (q/k/v, gate/up): each output is the
    single call's bit for bit, for 1 to 5 rows, with and without a bias."""
    gen = _gen(bits)
    k, g = 128, 64
    weights = []
    for n, bias in ((24, True), (7, False), (64, True)):
        q, s, z = ref.quantize_groupwise(torch.randn(n, k, generator=gen), bits, g)
        weights.append((pack(q, bits), s.half(), z.to(torch.uint8),
                        torch.randn(n, generator=gen) if bias else None))  # fmt: skip
    lists = [list(t) for t in zip(*weights, strict=True)]
    for m in (1, 4, 5):
        x = torch.randn(m, k, generator=gen)
        got = torch.ops.lowbit.packed_linear_cpu_group(x, *lists, bits, g)
        for y, (p, s16, z8, b) in zip(got, weights, strict=True):
            assert torch.equal(y, torch.ops.lowbit.packed_linear_cpu(x, p, s16, z8, b, bits, g))
    torch.library.opcheck(torch.ops.lowbit.packed_linear_cpu_group.default, (x, *lists, bits, g))
    with pytest.raises(RuntimeError, match="one scales, zeros and bias"):
        torch.ops.lowbit.packed_linear_cpu_group(
            x, lists[0], lists[1][:1], lists[2], lists[3], bits, g
        )


@pytest.mark.parametrize("handoff", ["eager", "inductor"])
def test_cpu_decode_graph_groups_the_linears_of_one_input(handoff, fresh_dynamo, monkeypatch):
    """A weight-only decode step: q/k/v and gate/up each one grouped call per layer, the
    logits those of one call per linear bit for bit; prefill keeps each linear's path."""
    from helpers import TinySpec, build_model, input_ids
    from transformers import DynamicCache

    spec = TinySpec(hidden=64, heads=4, kv_heads=2, intermediate=64, vocab=96, layers=2)
    model = build_model(spec)
    prompt = input_ids(spec, batch=1, seq=9)
    grouped, sizes = cw.dequant_linear_cpu_group, []

    def counting(x, prepacked, bits, group, biases):
        sizes.append(len(prepacked))
        return grouped(x, prepacked, bits, group, biases)

    def one_call_each(x, prepacked, bits, group, biases):
        return [cw.dequant_linear_cpu(x, p, bits, group, b) for p, b in zip(prepacked, biases)]

    logits = []
    with torch.no_grad():
        for group in (counting, one_call_each):
            torch._dynamo.reset()
            monkeypatch.setattr(cw, "dequant_linear_cpu_group", group)
            opts = {"recipe": "w4a16-g32", "handoff": handoff}
            fast = torch.compile(model, backend="lowbit", options=opts)
            cache = DynamicCache(config=model.config)
            full = fast(prompt[:, :-1], past_key_values=cache, use_cache=True).logits
            logits.append(fast(prompt[:, -1:], past_key_values=cache, use_cache=True).logits)
            logits.append(full)
    assert {2, 3} <= set(sizes)  # gate/up, q/k/v
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[3])
