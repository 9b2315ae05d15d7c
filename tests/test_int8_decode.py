"""The int8 recipes' one-call decode kernel (``lowbit::int8_gemv_cpu``) and its lowering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_lowering import tiny_llama
from transformers import DynamicCache

from qcompile.kernels import cpu_int8_gemv
from qcompile.kernels import reference as ref

pytestmark = pytest.mark.skipif(
    not cpu_int8_gemv.available(), reason="no C++ compiler for the CPU kernel"
)


def _site(m, k, n, n_out, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w_q, w_scale = ref.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    idx = torch.randperm(k, generator=g)[:n_out].sort().values
    mask = torch.ones(k, dtype=torch.bool)
    mask[idx] = False
    x[:, idx] *= 40  # the outlier columns
    w_out = torch.randn(n, n_out, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return x, mask, w_q, w_scale, b, idx, w_out


def _reference(x, mask, w_q, w_scale, b, idx, w_out, out_dtype):
    q, s = ref.quantize_rows(x, mask if idx.numel() else None)
    addend = F.linear(x[..., idx].float(), w_out) if idx.numel() else None
    return ref.int8_linear(q, s, w_q, w_scale, b, addend, out_dtype)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize(("k", "n", "n_out"), [(64, 40, 3), (100, 37, 0), (576, 96, 17)])
def test_kernel_is_the_int8_reference(m, k, n, n_out):
    """Without outliers the result is the reference's bit for bit (the same int32 sums and
    float epilogue); the outlier partial is a float sum in another order. K = 100 runs the
    tail past the last 32-byte vector."""
    x, mask, w_q, w_scale, b, idx, w_out = _site(m, k, n, n_out, seed=m * k)
    if n_out:
        got = cpu_int8_gemv.int8_linear_gemv(x, mask, w_q, w_scale, b, idx, w_out, torch.float32)
        expect = _reference(x, mask, w_q, w_scale, b, idx, w_out, torch.float32)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4)
        mask_only = (mask, None, None)
    else:
        mask_only = (None, None, None)
    got = cpu_int8_gemv.int8_linear_gemv(
        x, mask_only[0], w_q, w_scale, b, None, None, torch.float32
    )
    q, s = ref.quantize_rows(x, mask_only[0])
    assert torch.equal(got, ref.int8_linear(q, s, w_q, w_scale, b, None, torch.float32))


def test_kernel_edge_rows_and_dtypes():
    """A zero row (the EPS scale), a NaN row (NaN out, other rows untouched), bf16 in and
    out, and a 3-d input."""
    x, mask, w_q, w_scale, b, idx, w_out = _site(3, 64, 24, 2)
    x[0] = 0
    x[2, 5] = float("nan")
    got = torch.ops.lowbit.int8_gemv_cpu(x, mask, w_q, w_scale, b, idx, w_out)
    expect = _reference(x[:2], mask, w_q, w_scale, b, idx, w_out, torch.float32)
    torch.testing.assert_close(got[:2], expect, rtol=1e-5, atol=1e-4)
    assert got[2].isnan().all()
    xb = x[:2].to(torch.bfloat16).view(1, 2, 64)
    got = cpu_int8_gemv.int8_linear_gemv(xb, mask, w_q, w_scale, b, idx, w_out, torch.bfloat16)
    expect = _reference(xb, mask, w_q, w_scale, b, idx, w_out, torch.bfloat16)
    assert got.shape == (1, 2, 24) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expect, rtol=1e-2, atol=1e-2)


def test_kernel_opcheck_and_bad_arguments():
    x, mask, w_q, w_scale, b, idx, w_out = _site(1, 64, 8, 2)
    torch.library.opcheck(
        torch.ops.lowbit.int8_gemv_cpu.default, (x, mask, w_q, w_scale, b, idx, w_out)
    )
    with pytest.raises(RuntimeError, match="w_q must be contiguous int8"):
        torch.ops.lowbit.int8_gemv_cpu(x, None, w_q.float(), w_scale, None, None, None)
    with pytest.raises(RuntimeError, match="come together"):
        torch.ops.lowbit.int8_gemv_cpu(x, mask, w_q, w_scale, None, idx, None)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.lowbit.int8_gemv_cpu(x, mask, w_q, w_scale, None, idx + 64, w_out)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("recipe", ["int8-mixed", "w8a8"])
@pytest.mark.parametrize("handoff", ["eager", "inductor"])
def test_decode_step_uses_the_kernel_and_keeps_the_logits(recipe, handoff, monkeypatch):
    """A one-token decode step lowers every int8 linear to the kernel (outlier partials
    included) and gives the logits of the same graph lowered without it."""
    import qcompile
    from qcompile.lowering import lower as lower_mod

    model = tiny_llama(seed=4, layers=2, hidden=64)
    prompt = torch.randint(0, 96, (1, 9))
    rewritten, rewrite = [], lower_mod.lower_int8_decode_cpu

    def spy(gm):
        rewritten.append(rewrite(gm))
        return rewritten[-1]

    with torch.no_grad():
        cal = qcompile.calibrate(model, [torch.randint(0, 96, (2, 24))], sample_rows=32)
        opts = {"recipe": recipe, "calibration": cal, "handoff": handoff, "threshold": 1.0}
        logits = {}
        for use_kernel in (True, False):
            torch._dynamo.reset()
            monkeypatch.setattr(
                lower_mod, "lower_int8_decode_cpu", spy if use_kernel else (lambda gm: 0)
            )
            fast = torch.compile(model, backend="lowbit", options=opts)
            cache = DynamicCache(config=model.config)
            model(prompt[:, :-1], past_key_values=cache, use_cache=True)
            logits[use_kernel] = fast(prompt[:, -1:], past_key_values=cache, use_cache=True).logits
            report = qcompile.compiled_reports()[-1]
    assert rewritten == [len(report.quantized)]  # every int8 linear of the decode graph
    if recipe == "int8-mixed":
        assert any(r.outlier_channels for r in report.sites)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
