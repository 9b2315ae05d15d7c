"""The fused CPU transform + quantization kernel (kernels/cpu_lowbit.py) against its
reference ``lowbit_reference.rotate_quantize_rows_bits`` (issue 3), on ragged shapes: token
counts that are not a multiple of the 16-row tile (decode's single token included),
remainder blocks, each stage optional, bits 4 / 6 / 8, several leading dimensions.

* fp32 operands: the reference's products summed in another order, so scales within
  float32 rounding and a code differs only where the exact value (float64) lies within
  1e-4 of a rounding boundary;
* bf16 operands on AMX (where the CPU has AMX-BF16): the reference computed on the
  same bf16-rounded operands in float64; codes within one step, scales within 1e-3;
  elsewhere a bf16 request runs the fp32 kernel, bit for bit;
* exact sums (small-integer activations, blocks with entries in {-1, 0, 1}): codes and
  scales bit-exact in both modes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.kernels import cpu_lowbit
from qcompile.kernels import lowbit_act as la
from qcompile.kernels import lowbit_reference as lr
from qcompile.transforms import random_orthogonal


def _transform(k, block, seed, second=True, permute=True, exact=False):
    """(blocks, tail, perm, blocks2, tail2) of a block transform over K = k."""
    g = torch.Generator().manual_seed(seed)
    sizes = [min(block, k - i) for i in range(0, k, block)]

    def matrix(offset):
        if exact:  # signed permutation blocks: every sum exact
            mats = [torch.eye(b)[torch.randperm(b, generator=g)] for b in sizes]
            mats = [
                m * (torch.randint(0, 2, (b, 1), generator=g) * 2 - 1) for m, b in zip(mats, sizes)
            ]
        else:
            mats = [random_orthogonal(b, seed=offset + i).float() for i, b in enumerate(sizes)]
        return la.split_blocks(torch.block_diag(*mats), block)

    b1, t1 = matrix(seed)
    b2, t2 = matrix(seed + 50) if second else (None, None)
    perm = torch.randperm(k, generator=g) if permute else None
    return b1, t1, perm, b2, t2


def _fused(x, transform, bits, dtype):
    ops = cpu_lowbit.prepare(*transform, dtype=dtype)
    q, s = cpu_lowbit.rotate_quantize_rows_bits_cpu(x, ops, bits)
    return q, s, ops.amx


def _near_boundary(x64, transform, bits) -> torch.Tensor:
    """Where the exact scaled value lies within 1e-4 of a rounding boundary k + 1/2."""
    y = la.block_rotate(
        x64, *(None if t is None else t.double() if t.is_floating_point() else t for t in transform)
    )
    scaled = y * (la.qmax_for(bits) / y.abs().amax(-1, keepdim=True))
    return ((scaled - scaled.floor()) - 0.5).abs() < 1e-4


@settings(max_examples=30, deadline=None)
@given(
    m=st.sampled_from([0, 1, 5, 16, 17, 40]),
    k=st.sampled_from([24, 40, 70, 96, 128]),
    block=st.sampled_from([16, 32, 64]),
    bits=st.sampled_from([4, 6, 8]),
    second=st.booleans(),
    permute=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fp32_matches_reference(m, k, block, bits, second, permute, seed):
    transform = _transform(k, block, seed, second, permute)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(seed)) * 3
    q, s, amx = _fused(x, transform, bits, torch.float32)
    q_ref, s_ref = lr.rotate_quantize_rows_bits(x, *transform, bits)
    assert not amx and q.shape == q_ref.shape and s.shape == s_ref.shape == (2, m, 1)
    torch.testing.assert_close(s, s_ref, rtol=4e-7 * k, atol=0)
    differ = q != q_ref
    assert ((q.int() - q_ref.int()).abs() <= 1).all()
    assert not (differ & ~_near_boundary(x.double(), transform, bits)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,block", [(70, 32), (96, 64), (128, 128)])
def test_exact_sums_are_bit_exact(k, block, dtype):
    """Signed permutation blocks and small integers: every product and sum is exact in
    bf16 and fp32, so both modes equal the reference bit for bit."""
    transform = _transform(k, block, seed=k, exact=True)
    x = torch.randint(-20, 21, (33, k), generator=torch.Generator().manual_seed(k)).float()
    for bits in (4, 6, 8):
        q, s, _ = _fused(x, transform, bits, dtype)
        q_ref, s_ref = lr.rotate_quantize_rows_bits(x, *transform, bits)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize(
    "m,k,block", [(1, 96, 32), (37, 100, 32), (45, 128, 32), (512, 576, 64), (20, 200, 64)]
)
def test_bf16_request_matches_its_reference(m, k, block):
    """Blocks of a multiple of 32: on a CPU with AMX-BF16 the products take bf16 operands
    (checked against the same bf16-rounded operands in float64); elsewhere the request
    falls back to fp32 operands, bit for bit the fp32 kernel."""
    transform = _transform(k, block, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    if not cpu_lowbit.amx_available():
        for bits in (4, 6):
            q, s, amx = _fused(x, transform, bits, torch.bfloat16)
            q32, s32, _ = _fused(x, transform, bits, torch.float32)
            assert not amx and torch.equal(q, q32) and torch.equal(s, s32)
        return

    def bf16(t):
        return t if t is None or not t.is_floating_point() else t.bfloat16().double()

    b1, t1, perm, b2, t2 = transform
    y = la.block_rotate(bf16(x), bf16(b1), t1.double() if t1 is not None else None, perm)
    y = la.block_rotate(bf16(y.float()), bf16(b2), t2.double() if t2 is not None else None)
    for bits in (4, 6):
        q, s, amx = _fused(x, transform, bits, torch.bfloat16)
        q_ref, s_ref = la.quantize_rows_bits(y, bits)
        assert amx
        torch.testing.assert_close(s, s_ref.float(), rtol=1e-3, atol=0)
        assert (q.int() - q_ref.int()).abs().max() <= 1
        assert (q != q_ref).float().mean() < 0.01


@pytest.mark.parametrize("m,k,block", [(1, 96, 32), (45, 128, 32), (77, 576, 64)])
def test_bf16_activations_give_the_codes_of_their_fp32_values(m, k, block):
    """A bf16 model's activations: the AMX path multiplies them as they are (no fp32
    copy), the same codes as the same values in fp32; elsewhere (and for the fp32
    request) they are widened first, which is exact."""
    transform = _transform(k, block, seed=m)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    for dtype in (torch.bfloat16, torch.float32):
        q, s, _ = _fused(x, transform, 4, dtype)
        q32, s32, _ = _fused(x.float(), transform, 4, dtype)
        assert torch.equal(q, q32) and torch.equal(s, s32)


def test_bf16_request_without_amx_blocks_runs_fp32():
    """Blocks that are not a multiple of 32 channels cannot use AMX: fp32 operands."""
    transform = _transform(40, 16, seed=3)
    x = torch.randn(9, 40)
    q, s, amx = _fused(x, transform, 4, torch.bfloat16)
    assert not amx
    assert torch.equal(q, _fused(x, transform, 4, torch.float32)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,block", [(100, 32), (576, 64)])
def test_a_nan_row_gets_a_nan_scale(k, block, dtype):
    """A NaN anywhere in a row (spread over its block by the rotation) makes that row's
    scale NaN, as the reference's, so it reaches the linear's output instead of finite
    codes; the other rows are as without it. Also for one token and a plain
    quantization (no transform)."""
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(k)) * 3
    bad = x.clone()
    bad[4, 7] = float("nan")
    bad[11, k - 1] = float("nan")  # the last channel: past the vector loop when k = 100
    for transform in (_transform(k, block, seed=2), (None,) * 5):
        for bits in (4, 8):
            q, s, _ = _fused(bad, transform, bits, dtype)
            q_ok, s_ok, _ = _fused(x, transform, bits, dtype)
            _, s_ref = lr.rotate_quantize_rows_bits(bad, *transform, bits)
            nan_rows = torch.isnan(s_ref.flatten())
            assert nan_rows.tolist() == [r in (4, 11) for r in range(19)]
            assert torch.equal(torch.isnan(s.flatten()), nan_rows)
            assert torch.equal(q[~nan_rows], q_ok[~nan_rows])
            assert torch.equal(s[~nan_rows], s_ok[~nan_rows])
            _, s_one, _ = _fused(bad[4:5], transform, bits, dtype)
            assert torch.isnan(s_one).all()


def test_operand_errors_are_clear():
    from dataclasses import replace

    transform = _transform(40, 16, seed=1)
    ops = cpu_lowbit.prepare(*transform, dtype=torch.float32)
    x = torch.randn(3, 40)
    run = cpu_lowbit.rotate_quantize_rows_bits_cpu
    with pytest.raises(RuntimeError, match="do not cover K = 32"):
        run(x[:, :32], replace(ops, perm=None), 4)
    with pytest.raises(RuntimeError, match="perm must be contiguous int32"):
        run(x, replace(ops, perm=transform[2]), 4)
    with pytest.raises(RuntimeError, match=r"blocks must be contiguous (bf16 pairs|fp32)"):
        run(x, replace(ops, blocks=transform[0].double()), 4)
    with pytest.raises(RuntimeError, match="bit width"):
        run(x, ops, 9)
    if not cpu_lowbit.amx_available():
        with pytest.raises(RuntimeError, match="without AMX-BF16"):
            run(x, replace(ops, amx=True), 4)
    else:
        with pytest.raises(RuntimeError, match="blocks must be contiguous bf16 pairs"):
            run(x, replace(ops, amx=True), 4)


def _swiglu_operands(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randint(-3000, 3001, (m, k), generator=g, dtype=torch.int32) for _ in "gu")
    act_scale = torch.rand(m, generator=g) * 1e-3 + 1e-4
    gate_scale, up_scale = (torch.rand(k, generator=g) * 1e-2 + 1e-3 for _ in "gu")
    return gate, up, act_scale, gate_scale, up_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,block", [(1, 96, 32), (37, 100, 32), (45, 128, 32), (77, 576, 64)])
def test_swiglu_prologue_gives_the_codes_of_its_product(m, k, block, dtype):
    """From the gate / up int32 accumulators the kernel forms ``silu(gate) * up`` per tile
    (dequantized as int8_linear does, in float32): the codes and scales of the same
    product computed first, up to exp's rounding (a code within one, rarely)."""
    gate, up, act_scale, gate_scale, up_scale = _swiglu_operands(m, k, seed=m + k)
    ops = cpu_lowbit.prepare(*_transform(k, block, seed=m), dtype=dtype)
    q, s = torch.ops.lowbit.swiglu_rotate_quantize_rows_bits_cpu(
        gate, up, act_scale, gate_scale, up_scale,
        ops.blocks, ops.tail, ops.perm, ops.blocks2, ops.tail2, 4, ops.amx,
    )  # fmt: skip
    rows = act_scale.reshape(-1, 1)
    x = torch.nn.functional.silu(gate.float() * rows * gate_scale) * (up.float() * rows * up_scale)
    q_ref, s_ref = cpu_lowbit.rotate_quantize_rows_bits_cpu(x, ops, 4)
    assert q.shape == q_ref.shape == (m, k) and s.shape == (m, 1)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1
    assert (q != q_ref).float().mean() < 0.01


def test_swiglu_prologue_graph_function_and_errors():
    """The graph-level function runs the two int8 GEMMs (leading dimensions kept) and the
    op; wrong operands get errors that name them."""
    from qcompile.kernels import cpu_int8

    k_in, k = 40, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-7, 8, (2, 3, k_in), generator=g, dtype=torch.int8)
    x_scale = torch.rand(2, 3, 1, generator=g) + 0.1
    w_gate, w_up = (torch.randint(-7, 8, (k, k_in), generator=g, dtype=torch.int8) for _ in "gu")
    gate_scale, up_scale = (torch.rand(k, generator=g) * 1e-2 + 1e-3 for _ in "gu")
    ops = cpu_lowbit.prepare(*_transform(k, 32, seed=5), dtype=torch.float32)
    consts = (ops.blocks, ops.tail, ops.perm, ops.blocks2, ops.tail2)
    codes, scale = cpu_lowbit.swiglu_rotate_quantize_rows_bits_cpu(
        q, x_scale, w_gate, gate_scale, w_up, up_scale, *consts, 4, False
    )

    def linear(w, ws):
        return cpu_int8.int8_linear(q, x_scale, w, ws, None, None, torch.float32)

    x = torch.nn.functional.silu(linear(w_gate, gate_scale)) * linear(w_up, up_scale)
    q_ref, s_ref = cpu_lowbit.rotate_quantize_rows_bits_cpu(x, ops, 4)
    assert codes.shape == (2, 3, k) and scale.shape == (2, 3, 1)
    assert (codes.int() - q_ref.int()).abs().max() <= 1
    torch.testing.assert_close(scale, s_ref, rtol=1e-5, atol=0)
    op = torch.ops.lowbit.swiglu_rotate_quantize_rows_bits_cpu
    gate, up, act_scale, gate_scale, up_scale = _swiglu_operands(3, k, seed=1)
    with pytest.raises(RuntimeError, match="gate and up must be contiguous int32"):
        op(gate.float(), up, act_scale, gate_scale, up_scale, *consts, 4, False)
    with pytest.raises(RuntimeError, match="act_scale must be contiguous float32 with 3"):
        op(gate, up, act_scale[:2], gate_scale, up_scale, *consts, 4, False)
    with pytest.raises(RuntimeError, match="up_scale must be contiguous float32 with 64"):
        op(gate, up, act_scale, gate_scale, up_scale.double(), *consts, 4, False)
