"""``int8-mixed``'s shared prefill quantization op (``lowbit::quantize_rows_copies_cpu``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from qcompile.kernels import cpu_int8, cpu_quantize_copies
from qcompile.kernels import reference as ref

pytestmark = pytest.mark.skipif(
    not cpu_quantize_copies.available(), reason="no C++ compiler for the CPU kernel"
)
op = torch.ops.lowbit.quantize_rows_copies_cpu


def _case(rows, k, n_out, max_copies, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 3
    cols = torch.randperm(k, generator=g)[:n_out]
    x[:, cols] *= torch.empty(n_out).uniform_(1, 300, generator=g)  # outliers of every size
    copies = torch.ones(k)
    copies[cols] = torch.randint(2, max_copies + 1, (n_out,), generator=g).float()
    return (x.to(dtype), copies, *ref.outlier_expansion(copies))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    k=st.integers(1, 70),
    n_out=st.integers(0, 12),
    max_copies=st.sampled_from([2, 5, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
# a row whose 127 / absmax differs in the last bit from torch's reciprocal(absmax) * 127
@example(rows=7, k=43, n_out=0, max_copies=2, dtype=torch.bfloat16, seed=0)
def test_op_is_the_reference_bit_for_bit(rows, k, n_out, max_copies, dtype, seed):
    """The same codes and scales as ``reference.quantize_rows_copies``: vector bodies and
    scalar tails (K and E from 1 to past several 8-wide vectors), codes on every copy."""
    args = _case(rows, k, min(n_out, k), max_copies, seed, dtype)
    q, s = op(*args)
    q_ref, s_ref = ref.quantize_rows_copies(*args)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_edge_rows_shapes_and_opcheck():
    """A zero row (the EPS scale), rows with a NaN or an infinity (zero codes, NaN scale;
    the other rows untouched), a 3-d input, and the op's registration (opcheck)."""
    x, copies, src, piece = _case(4, 40, 3, 4, seed=1)
    x[0] = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("-inf")
    q, s = op(x, copies, src, piece)
    q_ref, s_ref = ref.quantize_rows_copies(x[:2], copies, src, piece)
    assert torch.equal(q[:2], q_ref) and torch.equal(s[:2], s_ref)
    assert s[0].item() == pytest.approx(ref.EPS / 127) and not q[0].any()
    assert not q[2:].any() and s[2:].isnan().all()
    q3, s3 = op(x[:2].view(1, 2, 40), copies, src, piece)
    assert q3.shape == (1, 2, src.numel()) and s3.shape == (1, 2, 1)
    assert torch.equal(q3[0], q_ref)
    torch.library.opcheck(op.default, _case(3, 40, 3, 4, seed=2))


def test_bad_arguments_say_what_to_pass():
    x, copies, src, piece = _case(2, 16, 2, 3, seed=3)
    with pytest.raises(RuntimeError, match="copies must be contiguous float32 with K = 16"):
        op(x, copies[:8], src, piece)
    with pytest.raises(RuntimeError, match="src .int64. and piece .float32."):
        op(x, copies, src.int(), piece)
    bad = src.clone()
    bad[-1] = 99
    with pytest.raises(RuntimeError, match="src holds column 99 outside"):
        op(x, copies, bad, piece)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_cpu_lowering_calls_the_op(monkeypatch):
    """The cpu target's quantization with copies is the op (aten gathers only where it
    cannot be built), with the same result."""
    args = _case(5, 48, 4, 6, seed=4)
    with _Calls() as calls:
        q, s = cpu_int8.quantize_rows_copies(*args)
    assert calls.names == ["lowbit.quantize_rows_copies_cpu.default"]
    monkeypatch.setattr(cpu_quantize_copies, "available", lambda: False)
    with _Calls() as calls:
        q_aten, s_aten = cpu_int8.quantize_rows_copies(*args)
    assert "lowbit.quantize_rows_copies_cpu.default" not in calls.names
    assert torch.equal(q, q_aten) and torch.equal(s, s_aten)
