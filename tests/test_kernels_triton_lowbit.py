"""Triton low-bit kernels (kernels/triton_lowbit.py) against their references (issue 3).

* packed signed int4: ``pack_int4`` / ``unpack_int4`` are exact inverses (hypothesis);
* fused online transform + per-token quantization vs ``block_rotate`` then
  ``quantize_rows_bits`` on small ragged shapes, bits 4 / 6 / 8, with and without the
  permutation, the second stage, the remainder block and packing:
  - bit-exact codes and scales when the transform's sums are exact (small-integer
    activations, blocks with entries in {-1, 0, 1}), in fp32, fp16 and bf16;
  - with random orthogonal blocks (float sums in another order): scales within
    4 float32 ulps, codes within 1, and a code differs only where the reference's
    value (computed in float64) lies within 1e-4 of a rounding boundary k + 1/2;
* the W4A4 GEMM on packed operands: int32 accumulator bit-exact, dequantized output
  within the per-dtype tolerance of test_kernels_triton.py;
* end to end: a tiny Llama with ``w4a4-duquant`` on target "triton" equals target
  "cpu" within 1e-3 relative error (the GEMMs are exact; the fused transform could only
  move a code at a rounding tie), and the lowered graph runs the Triton ops.

Without a GPU the kernels run in the Triton interpreter: shapes stay tiny.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import operator  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TinySpec, Traced, build_model, input_ids, rel_err  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qcompile  # noqa: E402
from qcompile.kernels import lowbit_act as la  # noqa: E402
from qcompile.kernels import lowbit_reference as lr  # noqa: E402
from qcompile.kernels import (
    packing,  # noqa: E402
    triton_int8,  # noqa: E402
)
from qcompile.kernels import reference as ref  # noqa: E402
from qcompile.kernels import triton_lowbit as tlb  # noqa: E402
from qcompile.transforms import random_orthogonal  # noqa: E402

ok, why = triton_int8.triton_available()
pytestmark = [pytest.mark.skipif(not ok, reason=why), pytest.mark.usefixtures("one_thread")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = settings(max_examples=12, deadline=None)
TOL = {  # (rtol, atol) of the dequantized GEMM output; outputs here are O(1)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float64: (1e-12, 1e-12),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- packed int4


@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([(), (1,), (3,), (2, 5)]),
    k=st.integers(1, 41),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_int4_are_exact_inverses(lead, k, seed):
    g = _gen(seed)
    q = torch.randint(-8, 8, (*lead, k), generator=g, dtype=torch.int8)
    p = packing.pack_int4(q)
    assert p.dtype == torch.int8 and p.shape == (*lead, (k + 1) // 2)
    assert torch.equal(packing.unpack_int4(p, k), q)
    if k % 2:  # the padding nibble is zero
        assert bool(((p[..., -1].to(torch.int16) >> 4) == 0).all())
    # every byte is a valid pair: unpack is a bijection on bytes
    b = torch.randint(-128, 128, (*lead, (k + 1) // 2), generator=g, dtype=torch.int8)
    assert torch.equal(packing.pack_int4(packing.unpack_int4(b, 2 * b.shape[-1])), b)


def test_int4_nibble_layout_and_errors():
    # element 2j in the low nibble, 2j + 1 in the high nibble, two's complement
    p = packing.pack_int4(torch.tensor([1, -2, 7, -8, -1], dtype=torch.int8))
    assert [v & 0xFF for v in p.tolist()] == [0xE1, 0x87, 0x0F]
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        packing.pack_int4(torch.tensor([8]))
    with pytest.raises(ValueError, match="bytes per row"):
        packing.unpack_int4(p, 7)
    with pytest.raises(TypeError):
        packing.pack_int4(torch.zeros(4))


# --------------------------------------------------------------------------- fused transform

Ms = st.sampled_from([1, 5, 17, 33])
Ks = st.sampled_from([5, 24, 40, 70])
BLOCKS = st.sampled_from([8, 13, 16, 24])  # 13: odd blocks (packing straddles them)


def _stage(k, b, make):
    """``(blocks [nb, b, b] | None, tail [r, r] | None)`` for K channels in blocks of b."""
    b = min(b, k)
    nb, r = divmod(k, b)
    return (torch.stack([make(b, i) for i in range(nb)]), make(r, nb) if r else None)


def _integer_stage(k, b, g):
    # entries in {-1, 0, 1}: every partial sum of small-integer activations is exact
    return _stage(k, b, lambda n, i: torch.randint(-1, 2, (n, n), generator=g).float())


def _orthogonal_stage(k, b, seed):
    return _stage(k, b, lambda n, i: random_orthogonal(n, seed=seed + i).float())


def _quantize_both(x, args, bits, pack, block_t=None):
    """(kernel, reference) codes unpacked to [..., K], and scales."""
    k = x.shape[-1]
    q, s = tlb.rotate_quantize_rows_bits_triton_from_blocks(x, *args, bits, pack, block_t)
    q_ref, s_ref = lr.rotate_quantize_rows_bits(x.cpu(), *[_cpu(a) for a in args], bits, pack)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape == (*x.shape[:-1], 1)
    if pack:
        q, q_ref = packing.unpack_int4(q.cpu(), k), packing.unpack_int4(q_ref, k)
    return q.cpu(), q_ref, s.cpu(), s_ref


def _cpu(t):
    return None if t is None else t.cpu()


def _transform_args(k, b, perm, stage2, g, integer=True, seed=0):
    make = (lambda: _integer_stage(k, b, g)) if integer else (lambda: _orthogonal_stage(k, b, seed))
    blocks, tail = make()
    p = torch.randperm(k, generator=g) if perm else None
    blocks2, tail2 = make() if stage2 else (None, None)
    return blocks, tail, p, blocks2, tail2


@settings(max_examples=30, deadline=None)
@given(
    M=Ms,
    K=Ks,
    block=BLOCKS,
    bits=st.sampled_from([4, 6, 8]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    transform=st.sampled_from(["none", "r1", "r1+perm", "r1+r2", "r1+perm+r2"]),
    pack=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_quantize_bit_exact_when_sums_are_exact(
    M, K, block, bits, dtype, transform, pack, seed
):
    g = _gen(seed)
    pack = pack and bits == 4
    x = torch.randint(-4, 5, (M, K), generator=g).to(dtype)
    x[0, : K // 2] = 0  # a half-zero row; rows of small integers hit rounding ties
    args = (None,) * 5
    if transform != "none":
        args = _transform_args(K, block, "perm" in transform, "r2" in transform, g)
        args = tuple(None if a is None else a.to(dtype) if a.is_floating_point() else a
                     for a in args)  # fmt: skip
    dev = [None if a is None else a.to(DEVICE) for a in args]
    q, q_ref, s, s_ref = _quantize_both(x.to(DEVICE), dev, bits, pack)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)


def test_fused_quantize_all_zero_rows_and_ragged_leading_dims():
    g = _gen(3)
    x = torch.randn(2, 3, 40, generator=g)
    x[1, 2] = 0
    args = _transform_args(40, 16, True, True, g, integer=False, seed=5)
    q, q_ref, s, s_ref = _quantize_both(x.to(DEVICE), args, 4, True)
    assert q.shape == (2, 3, 40) and not q[1, 2].any() and torch.equal(s[1, 2], s_ref[1, 2])
    assert int((q.int() - q_ref.int()).abs().max()) <= 1
    empty_q, empty_s = tlb.rotate_quantize_rows_bits_triton_from_blocks(
        x[:0], *args, bits=4, pack=True
    )
    assert empty_q.shape == (0, 3, 20) and empty_s.shape == (0, 3, 1)


@FAST
@given(
    M=Ms,
    K=Ks,
    block=BLOCKS,
    bits=st.sampled_from([4, 6, 8]),
    transform=st.sampled_from(["r1", "r1+perm", "r1+r2", "r1+perm+r2"]),
    block_t=st.sampled_from([None, 4]),  # 4: several chunks of the gathered stage
    seed=st.integers(0, 2**16),
)
def test_fused_quantize_random_rotations_within_rounding(M, K, block, bits, transform, block_t,
                                                         seed):  # fmt: skip
    """Float sums in another order: codes move by at most 1, and only at rounding ties."""
    g = _gen(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-1, 1, K)[torch.randperm(K, generator=g)]
    args = _transform_args(K, block, "perm" in transform, "r2" in transform, g, False, seed)
    q, q_ref, s, s_ref = _quantize_both(x.to(DEVICE), args, bits, False, block_t)
    assert ((s - s_ref).abs() <= 4 * torch.finfo(torch.float32).eps * s_ref).all()
    qmax = la.qmax_for(bits)
    y = la.block_rotate(x.double(), *[None if a is None else a.double() if a.is_floating_point()
                                      else a for a in args])  # fmt: skip
    v = y * (qmax / y.abs().amax(-1, keepdim=True).clamp_min(ref.EPS))
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1
    near_tie = ((v.abs() - v.abs().floor()) - 0.5).abs() < 1e-4
    assert bool(near_tie[diff > 0].all()), v[diff > 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_quantize_16bit_random_rotations(dtype):
    """16-bit activations: each stage rounds to the dtype as the reference's matmuls do;
    a one-ulp difference in a stage can move a code by 1 (rarely) and the scale by an ulp."""
    g = _gen(11)
    x = torch.randn(33, 70, generator=g).to(dtype)
    args = _transform_args(70, 16, True, True, g, integer=False, seed=2)
    args = tuple(None if a is None else a.to(dtype) if a.is_floating_point() else a for a in args)
    q, q_ref, s, s_ref = _quantize_both(x.to(DEVICE), args, 4, True)
    ulp = 2.0 ** -(10 if dtype == torch.float16 else 7)
    assert ((s - s_ref).abs() <= ulp * s_ref).all()
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02


def test_prepare_rotation_contract():
    k, b = 40, 16
    blocks, tail = _orthogonal_stage(k, b, 0)
    ops = tlb.prepare_rotation(blocks, tail, torch.randperm(k), *_orthogonal_stage(k, b, 9))
    assert ops.w1.shape == (k, 16) and ops.src.shape == (k,) and ops.w2.shape == (3, 16, 16)
    assert ops.block == b and ops.src.dtype == torch.int32
    with pytest.raises(ValueError, match="partition"):
        tlb.prepare_rotation(blocks, tail, None, *_orthogonal_stage(k, 8, 9))
    big = random_orthogonal(tlb.MAX_FUSED_BLOCK + 8, seed=1)[None]
    assert not tlb.fused_block_ok(big, None) and tlb.fused_block_ok(blocks, tail)
    with pytest.raises(ValueError, match="limit"):
        tlb.prepare_rotation(big, None)
    with pytest.raises(ValueError, match="perm"):
        tlb.prepare_rotation(blocks, tail, torch.arange(k - 1))
    with pytest.raises(ValueError, match="bits <= 4"):
        tlb.rotate_quantize_rows_bits_triton_impl(torch.zeros(2, 8), None, None, None, 0, 6, True)
    with pytest.raises(TypeError, match="fp32"):
        tlb.rotate_quantize_rows_bits_triton_impl(
            torch.zeros(2, 8, dtype=torch.float64), None, None, None, 0, 4, False
        )


# --------------------------------------------------------------------------- W4A4 GEMM


@FAST
@given(
    M=st.sampled_from([1, 3, 17, 40]),
    N=st.sampled_from([5, 24, 50]),
    K=st.sampled_from([1, 7, 40, 65, 72]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_gemm_exact_accumulator_and_epilogue(M, N, K, dtype, has_bias, seed):
    g = _gen(seed)
    q = torch.randint(-8, 8, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    qp, wp = packing.pack_int4(q).to(DEVICE), packing.pack_int4(w).to(DEVICE)
    acc = tlb.int4_matmul_int32_triton(qp, wp)
    assert acc.dtype == torch.int32
    torch.testing.assert_close(acc.cpu(), ref.int8_matmul_int32(q, w), rtol=0, atol=0)

    x_scale = (torch.rand(M, 1, generator=g) * 0.05 + 1e-3).to(DEVICE)
    w_scale = (torch.rand(N, generator=g) * 0.05 + 1e-3).to(DEVICE)
    bias = (torch.randn(N, generator=g).to(dtype).to(DEVICE)) if has_bias else None
    out = tlb.int4_linear_triton_impl(qp, x_scale, wp, w_scale, bias, dtype)
    expect = lr.int4_linear(qp.cpu(), x_scale.cpu(), wp.cpu(), w_scale.cpu(), _cpu(bias), dtype)
    assert out.dtype == dtype and out.shape == (M, N)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu(), expect, rtol=rtol, atol=atol)


def test_int4_gemm_leading_dims_errors_and_ops():
    g = _gen(7)
    q = torch.randint(-7, 8, (2, 3, 9), generator=g, dtype=torch.int8)
    w = torch.randint(-7, 8, (6, 9), generator=g, dtype=torch.int8)
    qp, wp = packing.pack_int4(q), packing.pack_int4(w)
    xs, ws = torch.rand(2, 3, 1, generator=g), torch.rand(6, generator=g)
    out = torch.ops.lowbit.int4_linear_triton(qp, xs, wp, ws, None, torch.float32)
    expect = ref.int8_linear(q, xs, w, ws, None, None, torch.float32)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="widths differ"):
        tlb.int4_linear_triton_impl(qp[..., :4], xs, wp, ws, None, torch.float32)
    with pytest.raises(TypeError, match="int8"):
        tlb.int4_matmul_int32_triton(q.int(), wp)
    torch.library.opcheck(
        torch.ops.lowbit.int4_linear_triton.default, (qp, xs, wp, ws, torch.rand(6), torch.float32)
    )
    x = torch.randn(5, 24, generator=g)
    ops = tlb.prepare_rotation(*_orthogonal_stage(24, 8, 1), torch.randperm(24, generator=g))
    for pack in (False, True):
        torch.library.opcheck(
            torch.ops.lowbit.rotate_quantize_rows_bits_triton.default,
            (x, ops.w1, ops.src, ops.w2, ops.block, 4, pack),
        )
    torch.library.opcheck(
        torch.ops.lowbit.block_rotate.default, (x, *_orthogonal_stage(24, 8, 1), None, None, None)
    )


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny():
    spec = TinySpec(hidden=40, heads=4, kv_heads=2, intermediate=56, layers=1, tied=False)
    model = build_model(spec)
    cal = qcompile.calibrate(
        model, [input_ids(spec, batch=2, seq=24, seed=s) for s in range(2)], sample_rows=32
    )
    return spec, cal, Traced(model, input_ids(spec, batch=2, seq=9))


def _run(traced, options):
    """Logits and the lowbit:: ops of the lowered graph (eager handoff)."""
    from qcompile.backend import lowbit_backend

    fn = lowbit_backend(traced.fresh(), traced.inputs, options={"handoff": "eager", **options})
    ops = Counter(
        str(n.target) if isinstance(n.target, torch._ops.OpOverload) else n.target.__name__
        for n in fn.__self__.graph.nodes
        if n.op == "call_function"
    )
    return traced.call(fn), ops


def _cpu_transforms(traced, options) -> tuple[torch.Tensor, Counter]:
    """Logits and how the lowered graph's online transforms run on the cpu target:
    ``("fused", "amx" | "fp32")`` per fused kernel, ``("unfused", operand dtype)`` per
    ``block_rotate_cpu``, and ``"channels-major"`` per int8 linear computing its output
    channels-major."""
    from qcompile.backend import lowbit_backend
    from qcompile.kernels.cpu_int8 import int8_linear_channels_major
    from qcompile.kernels.cpu_lowbit import swiglu_rotate_quantize_rows_bits_cpu
    from qcompile.kernels.lowbit_act import block_rotate_cpu

    fused = (torch.ops.lowbit.rotate_quantize_rows_bits_cpu.default,
             swiglu_rotate_quantize_rows_bits_cpu)  # fmt: skip
    fn = lowbit_backend(traced.fresh(), traced.inputs, options={"handoff": "eager", **options})
    kinds = Counter()
    for n in fn.__self__.graph.nodes:
        if n.target in fused:
            kinds["fused", "amx" if n.args[-1] else "fp32"] += 1
        elif n.target is block_rotate_cpu:
            kinds["unfused", n.args[-1]] += 1
        elif n.target is int8_linear_channels_major:
            kinds["channels-major"] += 1
    return traced.call(fn), kinds


@pytest.mark.usefixtures("fresh_dynamo")
def test_cpu_fused_transform_operands(tiny):
    """Every online transform is fused with its quantization (one kernel per input node:
    q/k/v and gate/up share one). W4A4 / W6A6 multiply bf16 operands on AMX where the CPU
    has it (the error against the fp model within 10% of fp32 operands'); W4A8 and
    'activation' keep fp32 operands; 'bfloat16' asks for AMX."""
    from qcompile.kernels import cpu_lowbit
    from qcompile.lowering.fuse_cpu import _cpu_has_native_bf16

    spec, cal, traced = tiny
    groups = 4 * spec.layers + 1
    base = {"recipe": "w4a4-duquant", "calibration": cal, "duquant": {"block_size": 32}}
    out32, kinds = _cpu_transforms(traced, {**base, "cpu_transform_dtype": "activation"})
    assert kinds == {("fused", "fp32"): groups}
    amx = cpu_lowbit.amx_available()
    out16, kinds = _cpu_transforms(traced, {**base, "cpu_transform_dtype": "bfloat16"})
    assert kinds == {("fused", "amx" if amx else "fp32"): groups}
    if amx:  # bf16 rounding moves some codes by one step; the error stays that of W4A4
        assert not torch.equal(out16, out32)
        assert rel_err(out16, traced.eager) < 1.1 * rel_err(out32, traced.eager)
    native = "amx" if amx and _cpu_has_native_bf16() else "fp32"
    assert _cpu_transforms(traced, base)[1] == {("fused", native): groups}
    w6 = {**base, "recipe": "w6a6-duquant"}
    assert _cpu_transforms(traced, w6)[1] == {("fused", native): groups}
    w4a8 = {**base, "recipe": "w4a8-duquant"}
    assert _cpu_transforms(traced, w4a8)[1] == {("fused", "fp32"): groups}
    assert rel_err(out32, traced.eager) < 0.5  # a sane W4A4 model


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("dtype", ["activation", "bfloat16"])
def test_cpu_fused_transform_prologues(tiny, monkeypatch, dtype):
    """The fused kernel computes its producer where it can: sites fed by an RMSNorm
    (q/k/v, gate/up; lm_head reads a slice of the final norm: not matched) read the
    residual stream, the norm's weight scaling the first stage's rows and the per-token
    rsqrt factor the scales (lowering/rms_norm_prologue.py); down_proj's site reads the
    gate / up int32 accumulators and forms silu(gate) * up per tile
    (lowering/swiglu_prologue.py). Same model up to rounding, with neither the
    normalized activations nor the product in the graph."""
    from qcompile.backend import lowbit_backend
    from qcompile.kernels.cpu_int8 import int8_linear
    from qcompile.kernels.cpu_lowbit import swiglu_rotate_quantize_rows_bits_cpu
    from qcompile.lowering import fuse_cpu, rms_norm_prologue

    spec, cal, traced = tiny
    opts = {"recipe": "w4a4-duquant", "calibration": cal, "duquant": {"block_size": 32},
            "cpu_transform_dtype": dtype, "handoff": "eager"}  # fmt: skip

    def lowered():
        fn = lowbit_backend(traced.fresh(), traced.inputs, options=opts)
        gm = fn.__self__
        nodes = list(gm.graph.nodes)
        fused = [
            n for n in nodes if n.target is torch.ops.lowbit.rotate_quantize_rows_bits_cpu.default
        ]
        counts = {
            "fused": len(fused),
            "swiglu": sum(n.target is swiglu_rotate_quantize_rows_bits_cpu for n in nodes),
            "linears": sum(n.target is int8_linear for n in nodes),
            "norm inputs": sum(rms_norm_prologue.match(n.args[0], gm) is not None for n in fused),
            "rescaled": sum(
                n.target is operator.mul and n.args[0].target is operator.getitem for n in nodes
            ),
        }  # fmt: skip
        return traced.call(fn), counts

    out, counts = lowered()
    monkeypatch.setattr(fuse_cpu, "NORM_PROLOGUE", False)
    monkeypatch.setattr(fuse_cpu, "SWIGLU_PROLOGUE", False)
    out_off, counts_off = lowered()
    layers, sites = spec.layers, 7 * spec.layers + 1
    assert counts_off == {"fused": 4 * layers + 1, "swiglu": 0, "linears": sites,
                          "norm inputs": 2 * layers, "rescaled": 0}  # fmt: skip
    # q, k, v and gate, up read their site's scales times the rsqrt factor (one product)
    assert counts == {"fused": 3 * layers + 1, "swiglu": layers, "linears": sites - 2 * layers,
                      "norm inputs": 0, "rescaled": 2 * layers}  # fmt: skip
    tolerance = 1e-3 if dtype == "activation" else 0.1  # bf16: gamma rounded with the block
    assert rel_err(out, out_off) < tolerance
    assert rel_err(out, traced.eager) < 1.1 * rel_err(out_off, traced.eager)


@pytest.mark.usefixtures("fresh_dynamo")
def test_cpu_unfused_transform_dtype(tiny, monkeypatch):
    """Blocks over the fused kernel's limit run as ``block_rotate_cpu`` (bf16 operands on
    request) and agree with the fused kernel; down_proj's input ``silu(gate) * up`` is
    then copied channels-major, so gate_proj and up_proj compute their outputs in that
    layout (or not, with ``CHANNELS_MAJOR_PRODUCERS`` off: same result)."""
    from qcompile.kernels import cpu_lowbit
    from qcompile.lowering import fuse_cpu

    spec, cal, traced = tiny
    groups = 4 * spec.layers + 1
    base = {"recipe": "w4a4-duquant", "calibration": cal, "duquant": {"block_size": 16},
            "cpu_transform_dtype": "activation"}  # fmt: skip
    fused, kinds = _cpu_transforms(traced, base)
    assert kinds == {("fused", "fp32"): groups}
    monkeypatch.setattr(cpu_lowbit, "MAX_FUSED_BLOCK", 8)
    out32, kinds = _cpu_transforms(traced, base)
    assert kinds == {("unfused", torch.float32): groups, "channels-major": 2 * spec.layers}
    assert rel_err(out32, fused) < 1e-3  # the same sums in another order
    out16, kinds = _cpu_transforms(traced, {**base, "cpu_transform_dtype": "bfloat16"})
    assert kinds == {("unfused", torch.bfloat16): groups, "channels-major": 2 * spec.layers}
    assert not torch.equal(out16, out32)
    assert rel_err(out16, traced.eager) < 1.1 * rel_err(out32, traced.eager)
    monkeypatch.setattr(fuse_cpu, "CHANNELS_MAJOR_PRODUCERS", False)
    out_rows, kinds = _cpu_transforms(traced, {**base, "cpu_transform_dtype": "bfloat16"})
    assert kinds == {("unfused", torch.bfloat16): groups}
    torch.testing.assert_close(out_rows, out16, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_int8_mixed_triton_target_matches_cpu_target(tiny):
    """int8-mixed's outlier copies on target "triton": the codes from the aten reference
    (inductor's Triton code on a GPU), the int8 GEMM over the K + E columns the Triton
    kernel's; the result is the CPU target's."""
    spec, cal, traced = tiny
    opts = {"recipe": "int8-mixed", "calibration": cal, "outlier_ratio": 1.2}
    out_cpu, _ = _run(traced, {**opts, "target": "cpu"})
    out, ops = _run(traced, {**opts, "target": "triton"})
    report = qcompile.compiled_reports()[-1]
    assert report.target == "triton" and sum(bool(r.outlier_copies) for r in report.sites) >= 2
    assert ops["lowbit.int8_linear_triton.default"] == len(report.quantized) == 7 * spec.layers + 1
    assert ops["quantize_rows_copies"] >= 2
    torch.testing.assert_close(out, out_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_w4a4_duquant_triton_target_matches_cpu_target(tiny):
    spec, cal, traced = tiny
    opts = {"recipe": "w4a4-duquant", "calibration": cal, "duquant": {"block_size": 16}}
    # fp32 operands on both targets (the cpu default is bf16 for W4A4: test below)
    out_cpu, ops_cpu = _run(traced, {**opts, "target": "cpu", "cpu_transform_dtype": "activation"})
    out, ops = _run(traced, {**opts, "target": "triton"})
    report = qcompile.compiled_reports()[-1]
    sites, groups = 7 * spec.layers + 1, 4 * spec.layers + 1  # q/k/v and gate/up share inputs
    assert report.target == "triton" and len(report.quantized) == sites
    assert ops["lowbit.rotate_quantize_rows_bits_triton.default"] == groups
    assert ops["lowbit.int4_linear_triton.default"] == sites
    assert not {"block_rotate", "lowbit.int8_linear_triton.default"} & set(ops)
    assert "lowbit.quantize_rows_bits.default" not in ops
    # down_proj's site forms silu(gate) * up from the gate / up GEMMs (swiglu_prologue)
    assert ops_cpu["lowbit.rotate_quantize_rows_bits_cpu.default"] == groups - spec.layers
    assert ops_cpu["swiglu_rotate_quantize_rows_bits_cpu"] == spec.layers
    assert ops_cpu["int8_linear"] == sites - 2 * spec.layers
    assert all(4 < row.bits_per_weight < 5 for row in report.sites)  # packed int4 + scales
    # exact integer GEMMs on both targets; the fused transform sums in another order
    assert rel_err(out, out_cpu) < 1e-3
    assert rel_err(out_cpu, traced.eager) < 0.5  # and it is a sane W4A4 model


@pytest.mark.usefixtures("fresh_dynamo")
def test_triton_lowering_unfused_paths(tiny, monkeypatch):
    """W6A6: fused quantization, unpacked int8 GEMM; a transform with a non-quantized
    reader keeps block_rotate for it; blocks over the fused limit stay block_rotate."""
    spec, cal, traced = tiny
    # fp32 transform operands on the cpu target: the same sums as the triton kernels
    base = {"calibration": cal, "duquant": {"block_size": 16}, "cpu_transform_dtype": "activation"}
    out_cpu, _ = _run(traced, {**base, "recipe": "w6a6-duquant", "target": "cpu"})
    out, ops = _run(traced, {**base, "recipe": "w6a6-duquant", "target": "triton"})
    assert ops["lowbit.rotate_quantize_rows_bits_triton.default"] == 4 * spec.layers + 1
    assert ops["lowbit.int8_linear_triton.default"] == 7 * spec.layers + 1
    assert rel_err(out, out_cpu) < 1e-3

    fp_k = {**base, "recipe": "w4a4-duquant", "overrides": {"*.k_proj": "fp"}}
    out_cpu, _ = _run(traced, {**fp_k, "target": "cpu"})
    out, ops = _run(traced, {**fp_k, "target": "triton"})
    assert ops["block_rotate"] == 1 and ops["lowbit.int4_linear_triton.default"] == 7
    assert rel_err(out, out_cpu) < 1e-3

    monkeypatch.setattr(tlb, "MAX_FUSED_BLOCK", 8)
    w4 = {**base, "recipe": "w4a4-duquant"}
    out_cpu, _ = _run(traced, {**w4, "target": "cpu"})
    out, ops = _run(traced, {**w4, "target": "triton"})
    assert ops["block_rotate"] == ops["lowbit.rotate_quantize_rows_bits_triton.default"] == 5
    assert ops["lowbit.int4_linear_triton.default"] == 8
    assert rel_err(out, out_cpu) < 1e-3
