"""GPTQ against round-to-nearest on the layer's calibration reconstruction error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.gptq import _fit, gptq_quantize, reconstruction_error
from qcompile.kernels.weight_only_reference import dequantize_groupwise, quantize_groupwise
from qcompile.passes.quantize_weight_only import gptq_or_rtn


def correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.linspace(0.2, 3.0, k)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k**0.5
    return x @ mix


@settings(max_examples=20, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group=st.sampled_from([16, 32]),
    groups=st.integers(1, 4),
    n=st.integers(1, 24),
    act_order=st.booleans(),
    clip_search=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_gptq_never_worse_than_rtn_on_calibration_error(
    bits, group, groups, n, act_order, clip_search, seed
):
    """What the pass keeps (``gptq_or_rtn``) never has a larger calibration
    reconstruction error than RTN; raw GPTQ alone can lose on tiny layers (one row,
    2 bits), which is why the pass compares the two."""
    k = group * groups
    x = correlated_inputs(4 * k, k, seed).double()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    h = x.t() @ x
    gopts = {"act_order": act_order, "damp": 0.01, "block_size": 128, "clip_search": clip_search}
    q, s, z, method = gptq_or_rtn(w, h, bits, group, torch.float32, gopts)
    chosen = reconstruction_error(w, dequantize_groupwise(q, s, z, group, dtype=torch.float64), h)
    rq, rs, rz = quantize_groupwise(w, bits, group)
    rtn = reconstruction_error(w, dequantize_groupwise(rq, rs, rz, group, dtype=torch.float64), h)
    assert chosen <= rtn
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
    raw = gptq_quantize(w, h, bits, group, act_order=act_order, clip_search=clip_search)
    assert (method == "gptq") == (raw.error <= rtn)
    # the reported error is the error of the returned codes and parameters
    deq = dequantize_groupwise(raw.q, raw.scales, raw.zeros, group, dtype=torch.float64)
    assert raw.error == pytest.approx(reconstruction_error(w, deq, h), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    n=st.integers(1, 8),
    size=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_clip_search_fit_never_loses_to_min_max_on_its_weighted_error(bits, n, size, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, size, generator=gen) * torch.rand(n, 1, generator=gen) * 3
    w[:, 0] *= 8  # an outlier column: where shrinking the range pays
    importance = torch.rand(size, generator=gen, dtype=torch.float64)

    def weighted_error(s, z):
        q = torch.clamp(torch.round(w.double() / s.double()[:, None]) + z.double()[:, None], 0,
                        2**bits - 1)  # fmt: skip
        deq = (q - z.double()[:, None]) * s.double()[:, None]
        return (importance * (deq - w.double()).pow(2)).sum(dim=1)

    searched = weighted_error(*_fit(w, bits, torch.float32, importance))
    min_max = weighted_error(*_fit(w, bits, torch.float32))
    assert bool((searched <= min_max * (1 + 1e-12)).all())


def test_clip_search_helps_gptq_on_heavy_tailed_weights():
    x = correlated_inputs(512, 128, 3).double()
    torch.manual_seed(4)
    w = torch.distributions.StudentT(2.0).sample((64, 128))  # heavy tails: min/max wastes levels
    h = x.t() @ x
    plain = gptq_quantize(w, h, 4, 32, act_order=True).error
    searched = gptq_quantize(w, h, 4, 32, act_order=True, clip_search=True).error
    assert searched < 0.99 * plain, (searched, plain)


def test_gptq_clearly_beats_rtn_at_3_bits_on_correlated_inputs():
    x = correlated_inputs(512, 128, 0).double()
    w = torch.randn(64, 128)
    h = x.t() @ x
    q, s, z = quantize_groupwise(w, 3, 32)
    rtn = reconstruction_error(w, dequantize_groupwise(q, s, z, 32, dtype=torch.float64), h)
    assert gptq_quantize(w, h, 3, 32, act_order=True).error < 0.8 * rtn


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), 4, 32)


def test_dead_inputs_get_zero_weight_columns():
    x = correlated_inputs(256, 64, 3).double()
    x[:, 5] = 0
    h = x.t() @ x
    w = torch.randn(8, 64)
    result = gptq_quantize(w, h, 4, 32)
    deq = dequantize_groupwise(result.q, result.scales, result.zeros, 32, dtype=torch.float64)
    assert deq[:, 5].abs().max() <= result.scales[:, 0].double().max() / 2 + 1e-12


def _tiny(hidden=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("recipe", ["w8a16-g32", "w4a16-g64", "w3a16-g32-gptq", "w2a16-g64-gptq"])
def test_weight_only_recipes_end_to_end(recipe):
    import qcompile

    model = _tiny()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        cal = qcompile.calibrate(model, [torch.randint(0, 96, (4, 32))], hessian=True)
        opts = {"recipe": recipe, "calibration": cal, "handoff": "eager"}
        out = torch.compile(model, backend="lowbit", options=opts)(ids).logits
    report = qcompile.compiled_reports()[-1]
    bits = int(recipe[1])
    group = int(recipe.split("-g")[1].split("-")[0])
    assert len(report.quantized) == 8
    for row in report.quantized:
        assert row.bits_per_weight == pytest.approx(bits + 64 / group)  # fp32 scale + zero
        assert row.method in ("rtn", "gptq", "rtn (gptq did not reduce the error)")
        assert recipe.endswith("-gptq") or row.method == "rtn"
    rel = float((out - ref).norm() / ref.norm())
    assert rel < {8: 0.02, 4: 0.3, 3: 0.6, 2: 1.2}[bits]


@pytest.mark.usefixtures("fresh_dynamo")
def test_group_size_that_does_not_divide_names_the_site_and_the_fix():

    model = _tiny(hidden=96)  # 96 = 3 x 32: g64 does not divide the attention inputs
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.compile(model, backend="lowbit",
                      options={"recipe": "w4a16-g64", "handoff": "eager"})(torch.randint(0, 96, (1, 8)))  # fmt: skip
    msg = str(info.value)
    assert "model.layers.0.self_attn.q_proj.weight has in_features=96" in msg
    assert "[32]" in msg and "w4a16-g32" in msg


@pytest.mark.usefixtures("fresh_dynamo")
def test_gptq_recipe_without_hessian_says_how_to_calibrate():
    import qcompile

    model = _tiny()
    cal = qcompile.calibrate(model, [torch.randint(0, 96, (2, 16))])
    with pytest.raises(Exception, match="hessian=True"), torch.no_grad():
        opts = {"recipe": "w4a16-g32-gptq", "calibration": cal, "handoff": "eager"}
        torch.compile(model, backend="lowbit", options=opts)(torch.randint(0, 96, (1, 8)))
