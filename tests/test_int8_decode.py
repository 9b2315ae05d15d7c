"""The int8 recipes' one-call decode kernel (``lowbit::int8_gemv_cpu``) and its lowering."""

from __future__ import annotations

import pytest
import torch
from test_lowering import tiny_llama
from transformers import DynamicCache

from qcompile.kernels import cpu_int8_gemv
from qcompile.kernels import reference as ref

pytestmark = pytest.mark.skipif(
    not cpu_int8_gemv.available(), reason="no C++ compiler for the CPU kernel"
)


def _site(m, k, n, n_out, dtype=torch.float32, seed=0, bias=True):
    """A site with ``n_out`` outlier columns (40x the rest) spread over 2-5 int8 copies."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    idx = torch.randperm(k, generator=g)[:n_out].sort().values
    x[:, idx] *= 40  # the outlier columns
    x[:, idx[:1]] /= 40  # one this input leaves small: its codes fit one copy
    copies = torch.ones(k)
    copies[idx] = torch.randint(2, 6, (n_out,), generator=g).float()
    src, piece = ref.outlier_expansion(copies)
    w_q, w_scale = ref.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    return x, w_q[:, src].contiguous(), w_scale, b, (copies, src, piece), w_q


@pytest.fixture(params=["vnni", "avx2"])
def isa(request):
    """Each test runs the AVX-512 VNNI loop and the other (AVX2, or scalar where the
    compiler does not target AVX2); the VNNI run is skipped on a CPU without it."""
    lib = cpu_int8_gemv.library()
    if lib.lowbit_int8_gemv_use_vnni(int(request.param == "vnni")) != (request.param == "vnni"):
        lib.lowbit_int8_gemv_use_vnni(1)
        pytest.skip(
            "no AVX-512 VNNI loop here (the CPU lacks it, or the kernel was built without AVX2)"
        )
    yield request.param
    lib.lowbit_int8_gemv_use_vnni(1)


def _reference(x, w_q, w_scale, b, expansion, out_dtype):
    q, s = ref.quantize_rows_copies(x, *expansion)
    return ref.int8_linear(q, s, w_q, w_scale, b, None, out_dtype)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("k", "n", "n_out"), [(64, 40, 3), (100, 37, 0), (576, 96, 17), (8, 5, 3), (150, 9, 40)]
)
def test_kernel_is_the_int8_reference(m, k, n, n_out, isa):
    """With and without outlier copies the result is the reference's bit for bit (the
    same codes, int32 sums and float epilogue; the copies' codes summed onto their weight
    column). K = 100 runs the tail past the last 32- or 64-byte vector; K = 8 with 3
    outliers the outliers' scalar loop; 40 outliers more than two 16-wide steps."""
    x, w_q, w_scale, b, expansion, w_plain = _site(m, k, n, n_out, seed=m * k)
    got = cpu_int8_gemv.int8_linear_gemv(x, w_q, w_scale, b, expansion[0], torch.float32)
    assert torch.equal(got, _reference(x, w_q, w_scale, b, expansion, torch.float32))
    got = cpu_int8_gemv.int8_linear_gemv(x, w_plain, w_scale, b, None, torch.float32)
    q, s = ref.quantize_rows(x)
    assert torch.equal(got, ref.int8_linear(q, s, w_plain, w_scale, b, None, torch.float32))


def test_kernel_many_copies_is_the_int8_reference(isa):
    """Codes up to 127 x 256 (the most copies a column may have): rests up to 127 x 255,
    the int16 range's edge; still the reference bit for bit, for 1 to 4 rows."""
    g = torch.Generator().manual_seed(7)
    copies = torch.ones(96)
    copies[[3, 40, 41]] = torch.tensor([256.0, 130.0, 2.0])
    expansion = (copies, *ref.outlier_expansion(copies))
    w_q, w_scale = ref.quantize_weight_per_channel(torch.randn(24, 96, generator=g))
    w_q = w_q[:, expansion[1]].contiguous()
    for m in range(1, 5):
        x = torch.randn(m, 96, generator=g)
        x[:, 3] = 1e4 * torch.rand(m, generator=g)  # the row's absmax: |v| near 127 x 256
        x[:, 40] = -3e3
        x[:, 41] = 1.5
        got = cpu_int8_gemv.int8_linear_gemv(x, w_q, w_scale, None, copies, torch.float32)
        assert torch.equal(got, _reference(x, w_q, w_scale, None, expansion, torch.float32))


def test_kernel_edge_rows_and_dtypes(isa):
    """A zero row (the EPS scale), a NaN row (NaN out, other rows untouched), bf16 in and
    out, and a 3-d input."""
    x, w_q, w_scale, b, expansion, _ = _site(3, 64, 24, 2)
    x[0] = 0
    x[2, 5] = float("nan")
    got = torch.ops.lowbit.int8_gemv_cpu(x, w_q, w_scale, b, expansion[0])
    assert torch.equal(got[:2], _reference(x[:2], w_q, w_scale, b, expansion, torch.float32))
    assert got[2].isnan().all()
    xb = x[:2].to(torch.bfloat16).view(1, 2, 64)
    got = cpu_int8_gemv.int8_linear_gemv(xb, w_q, w_scale, b, expansion[0], torch.bfloat16)
    assert got.shape == (1, 2, 24) and got.dtype == torch.bfloat16
    assert torch.equal(got, _reference(xb, w_q, w_scale, b, expansion, torch.bfloat16))


def test_kernel_opcheck_and_bad_arguments():
    x, w_q, w_scale, b, (copies, _, _), w_plain = _site(1, 64, 8, 2)
    torch.library.opcheck(torch.ops.lowbit.int8_gemv_cpu.default, (x, w_q, w_scale, b, copies))
    with pytest.raises(RuntimeError, match="w_q must be contiguous int8"):
        torch.ops.lowbit.int8_gemv_cpu(x, w_q.float(), w_scale, None, copies)
    with pytest.raises(RuntimeError, match=r"w_q must be contiguous int8 \[N, K \+ E\]"):
        torch.ops.lowbit.int8_gemv_cpu(x, w_plain, w_scale, None, copies)
    with pytest.raises(RuntimeError, match="whole numbers"):
        torch.ops.lowbit.int8_gemv_cpu(x, w_q, w_scale, None, copies - 0.5)


@pytest.mark.parametrize("bad", [0.0, 0.5, 2.5, 257.0, float("nan"), float("inf")])
@pytest.mark.parametrize("at", [3, 66])  # in an 8-wide vector step, in the scalar tail
def test_kernel_rejects_bad_copy_counts(bad, at):
    """Every count that is not a whole number in [1, 256] is an error, wherever it sits."""
    x, w_q, w_scale, _, (copies, _, _), _ = _site(1, 67, 8, 3)
    copies = copies.clone()
    copies[at] = bad
    with pytest.raises(RuntimeError, match="whole numbers in"):
        torch.ops.lowbit.int8_gemv_cpu(x, w_q, w_scale, None, copies)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("recipe", ["int8-mixed", "w8a8"])
@pytest.mark.parametrize("handoff", ["eager", "inductor"])
def test_decode_step_uses_the_kernel_and_keeps_the_logits(recipe, handoff, monkeypatch):
    """A one-token decode step lowers every int8 linear to the kernel (outlier copies
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


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n_out", [0, 5])
def test_group_kernel_gives_each_single_call_bit_for_bit(m, n_out, isa):
    """One call for the linears of one input (q/k/v, gate/up): each output equals the
    single call's, with and without copies, biases and sizes mixed, a zero-row weight."""
    x, w_q, w_scale, b, (copies, src, _), _ = _site(m, 96, 40, n_out, seed=m + n_out)
    g = torch.Generator().manual_seed(3)
    weights = [(w_q, w_scale, b)]
    for n, bias in ((7, False), (130, True), (0, False)):
        w, s = ref.quantize_weight_per_channel(torch.randn(n, 96, generator=g))
        weights.append((w[:, src].contiguous(), s, torch.randn(n, generator=g) if bias else None))
    cp = copies if n_out else None
    if cp is None:
        weights = [(w[:, :96].contiguous(), s, bias) for w, s, bias in weights]
    got = torch.ops.lowbit.int8_gemv_cpu_group(
        x, [w for w, _, _ in weights], [s for _, s, _ in weights], [b for _, _, b in weights], cp
    )
    for y, (w, s, bias) in zip(got, weights, strict=True):
        assert torch.equal(y, torch.ops.lowbit.int8_gemv_cpu(x, w, s, bias, cp))
    torch.library.opcheck(
        torch.ops.lowbit.int8_gemv_cpu_group.default,
        (x, [w for w, _, _ in weights], [s for _, s, _ in weights], [b for _, _, b in weights], cp),
    )
    with pytest.raises(RuntimeError, match="one w_scale and one bias"):
        torch.ops.lowbit.int8_gemv_cpu_group(x, [w_q], [w_scale, w_scale], [None], cp)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("recipe", ["int8-mixed", "w8a8"])
def test_decode_graph_calls_the_kernel_once_per_input(recipe, monkeypatch):
    """q/k/v and gate/up share their input: one grouped call each per layer, and the
    logits equal those of one call per linear bit for bit (inductor)."""
    import qcompile

    model = tiny_llama(seed=5, layers=2, hidden=64)
    prompt = torch.randint(0, 96, (1, 9))
    calls = []

    def counting(*args):
        calls.append(len(args[1]))
        return grouped(*args)

    def one_call_each(x, w_qs, w_scales, biases, copies, out_dtypes):
        return [cpu_int8_gemv.int8_linear_gemv(x, w, s, b, copies, d)
                for w, s, b, d in zip(w_qs, w_scales, biases, out_dtypes)]  # fmt: skip

    grouped = cpu_int8_gemv.int8_linear_gemv_group
    with torch.no_grad():
        cal = qcompile.calibrate(model, [torch.randint(0, 96, (2, 24))], sample_rows=32)
        opts = {"recipe": recipe, "calibration": cal, "handoff": "inductor", "threshold": 1.0}
        logits = []
        for group in (counting, one_call_each):
            torch._dynamo.reset()
            monkeypatch.setattr(cpu_int8_gemv, "int8_linear_gemv_group", group)
            fast = torch.compile(model, backend="lowbit", options=opts)
            cache = DynamicCache(config=model.config)
            model(prompt[:, :-1], past_key_values=cache, use_cache=True)
            logits.append(fast(prompt[:, -1:], past_key_values=cache, use_cache=True).logits)
    assert set(calls) == {2, 3} and calls.count(2) == calls.count(3)  # per layer: gate/up, q/k/v
    assert torch.equal(logits[0], logits[1])
