"""Numerical contracts of the pass pipeline on random tiny Llama models.

* recipe "fp" is the eager model, bit for bit;
* threshold = inf: "int8-mixed" splits nothing and is exactly "w8a8";
* threshold = 0: every channel is an outlier spread over the most int8 copies, so
  "int8-mixed" is the model of int8 weights and (nearly) exact activations;
* split_mixed_mm alone changes no output (it only marks sites and adds constants);
* w8a8 / int8-mixed stay close to fp, and the split helps where outliers are planted;
* the dynamic (per-batch) outlier mode runs, and with threshold = inf is w8a8.

Most properties re-run one captured dynamo graph per model under several option
sets (``helpers.Traced``), because dynamo's trace dominates the compile time here.
"""

import copy as copy_module

import pytest
import torch
from helpers import (
    TinySpec,
    Traced,
    build_model,
    eager_logits,
    input_ids,
    rel_err,
    run_lowbit,
    tiny_specs,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import Options
from qcompile.context import PassContext
from qcompile.graph_utils import OUTLIER_COPIES
from qcompile.kernels.reference import quantize_weight_per_channel
from qcompile.passes.bind import bind
from qcompile.passes.collect_stats import collect_stats
from qcompile.passes.detect_outliers import MAX_COPIES, detect_outliers
from qcompile.passes.split_mixed_mm import split_mixed_mm

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
INF = float("inf")
SMALL = settings(max_examples=8, deadline=None)


def quantized_sites(report):
    return [r for r in report.sites if r.fp_reason is None]


# (a) -----------------------------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(spec=tiny_specs(), seq=st.integers(1, 9))
def test_fp_recipe_is_the_eager_model(spec, seq):
    model = build_model(spec)
    ids = input_ids(spec, batch=2, seq=seq)
    out = run_lowbit(model, ids, {"recipe": "fp"})
    assert torch.equal(out, eager_logits(model, ids))
    report = qcompile.compiled_reports()[-1]
    assert report.sites and not quantized_sites(report)


def test_fp_recipe_with_debug_dir_is_exact(tmp_path):
    spec = TinySpec(layers=2, tied=False, attention_bias=True, mlp_bias=True, hidden=40)
    model = build_model(spec)
    ids = input_ids(spec)
    out = run_lowbit(model, ids, {"recipe": "fp", "debug_dir": str(tmp_path)})
    assert torch.equal(out, eager_logits(model, ids))
    assert list(tmp_path.glob("graph_*/*_bind.after.py"))


# (b) + (c, float32) + (f) ------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(spec=tiny_specs())
def test_int8_mixed_limits_float32(spec):
    model = build_model(spec)
    traced = Traced(model, input_ids(spec))
    w8a8 = traced.run({"recipe": "w8a8"})
    report_w8a8 = qcompile.compiled_reports()[-1]
    assert len(quantized_sites(report_w8a8)) == len(report_w8a8.sites) > 0

    # (b) threshold inf: no outlier column anywhere, the pure int8 path
    mixed_inf = traced.run({"recipe": "int8-mixed", "threshold": INF})
    report = qcompile.compiled_reports()[-1]
    assert all(r.outlier_channels == [] for r in report.sites)
    assert torch.equal(mixed_inf, w8a8)

    # (f) the run-time split with threshold inf is the same computation
    dynamic_inf = traced.run({"recipe": "int8-mixed", "threshold": INF, "outlier_mode": "dynamic"})
    assert torch.equal(dynamic_inf, w8a8)

    # (c) threshold 0: every channel is an outlier spread over MAX_COPIES int8 copies, so
    # activations sit on a 64x finer grid: the model of int8 weights and exact activations
    mixed_zero = traced.run({"recipe": "int8-mixed", "threshold": 0})
    report = qcompile.compiled_reports()[-1]
    assert all(len(r.outlier_channels) == r.in_features for r in report.sites)
    assert all(set(r.outlier_copies) == {MAX_COPIES} for r in report.sites)
    weights_only = int8_weights_only(model)(input_ids(spec)).logits
    torch.testing.assert_close(mixed_zero, weights_only, rtol=0, atol=2e-3 * scale(traced))
    err = (mixed_zero - weights_only).abs().max() / (w8a8 - weights_only).abs().max()
    assert err < 0.25  # the activations' share of w8a8's error, mostly gone


def int8_weights_only(model):
    """A copy of ``model`` whose linear weights are their int8 per-channel dequantization
    (in place: a tied embedding reads the dequantized table, as lowbit's lookups do)."""
    copy = copy_module.deepcopy(model)
    with torch.no_grad():
        for mod in copy.modules():
            if isinstance(mod, torch.nn.Linear):
                w_q, w_scale = quantize_weight_per_channel(mod.weight)
                mod.weight.copy_((w_q.double() * w_scale.double()[:, None]).to(mod.weight.dtype))
    return copy


def scale(traced) -> float:
    return traced.eager.abs().max().item()


# (c, float64) + (d) ------------------------------------------------------------


def split_only(gm, ctx, inputs) -> int:
    """The analysis passes and the split, nothing quantized."""
    bind(gm, ctx)
    collect_stats(gm, ctx, inputs)
    n_outliers = detect_outliers(gm, ctx)
    n_split = split_mixed_mm(gm, ctx)
    assert n_split == n_outliers
    gm.graph.lint()
    gm.recompile()
    return n_split


@SMALL
@given(spec=tiny_specs(), threshold=st.floats(0.2, 2.0))
def test_float64_split_is_exact_and_threshold_zero_is_fp(spec, threshold):
    model = build_model(spec, dtype=torch.float64)
    traced = Traced(model, input_ids(spec))
    assert traced.eager.dtype == torch.float64
    tol = 1e-10 * scale(traced)

    # (d) split_mixed_mm alone marks each split site with its copies: 2 or more for an
    # outlier column, 1 for the others; the graph computes what it did
    gm = traced.fresh()
    ctx = PassContext(Options.parse({"threshold": threshold}), graph_index=0)
    n_split = split_only(gm, ctx, traced.inputs)
    assert n_split > 0, "the threshold should leave some outlier channels"
    for site in (s for s in ctx.sites if s.outlier_channels):
        copies = getattr(gm, site.node.meta[OUTLIER_COPIES][0].target)
        assert torch.all(copies[site.outlier_channels] >= 2)
        assert int((copies > 1).sum()) == len(site.outlier_channels)
    out = traced.call(gm)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, traced.eager, rtol=0, atol=tol)

    # (c) in float64: everything is an outlier column on the finest grid (the int8_linear
    # epilogue runs in float32, kernels/reference.py)
    mixed_zero = traced.run({"recipe": "int8-mixed", "threshold": 0})
    assert mixed_zero.dtype == torch.float64
    weights_only = int8_weights_only(model)(input_ids(spec)).logits
    torch.testing.assert_close(mixed_zero, weights_only, rtol=0, atol=2e-3 * scale(traced))


# (e) ---------------------------------------------------------------------------


def planted_model(seed: int):
    """Channels of the RMSNorm outputs scaled 50x: massive outliers at the input
    of q/k/v (input_layernorm) and gate/up (post_attention_layernorm)."""
    spec = TinySpec(
        hidden=48, heads=6, kv_heads=2, intermediate=72, layers=2, vocab=80, tied=False, seed=seed
    )
    model = build_model(spec)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[2, 40]] *= 50
            layer.post_attention_layernorm.weight[[5, 17, 30]] *= 50
    return spec, model


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_mixed_beats_w8a8_on_planted_outliers(seed):
    spec, model = planted_model(seed)
    ids = input_ids(spec, batch=2, seq=9)
    calibration = qcompile.calibrate(model, [ids, input_ids(spec, seed=7)])
    ref = eager_logits(model, ids)
    traced = Traced(model, ids)
    w8a8 = traced.run({"recipe": "w8a8", "calibration": calibration})
    mixed = traced.run({"recipe": "int8-mixed", "calibration": calibration})
    outliers = {r.fqn: r.outlier_channels for r in qcompile.compiled_reports()[-1].sites}
    for i in range(spec.layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert set(outliers[f"model.layers.{i}.{proj}.weight"]) >= {2, 40}
        for proj in ("mlp.gate_proj", "mlp.up_proj"):
            assert set(outliers[f"model.layers.{i}.{proj}.weight"]) >= {5, 17, 30}
    err_w8a8, err_mixed = rel_err(w8a8, ref), rel_err(mixed, ref)
    assert err_mixed < 0.05
    assert err_mixed < 0.75 * err_w8a8, (err_mixed, err_w8a8)


@pytest.mark.parametrize("recipe", ["w8a8", "int8-mixed"])
def test_int8_recipes_stay_close_to_fp(recipe):
    spec = TinySpec(hidden=40, heads=4, kv_heads=1, layers=2, attention_bias=True, mlp_bias=True)
    model = build_model(spec)
    ids = input_ids(spec)
    out = run_lowbit(model, ids, {"recipe": recipe})
    assert len(quantized_sites(qcompile.compiled_reports()[-1])) == 2 * 7 + 1
    assert rel_err(out, eager_logits(model, ids)) < 0.05


# (f) through torch.compile ----------------------------------------------------


def test_dynamic_outlier_mode_through_torch_compile():
    spec, model = planted_model(seed=2)
    ids = input_ids(spec, batch=2, seq=9)
    ref = eager_logits(model, ids)
    dynamic = run_lowbit(model, ids, {"recipe": "int8-mixed", "outlier_mode": "dynamic"})
    report = qcompile.compiled_reports()[-1]
    assert len(quantized_sites(report)) == len(report.sites)
    assert dynamic.shape == ref.shape and torch.isfinite(dynamic).all()
    # the planted columns go through full precision (with int8-dequantized weights)
    w8a8 = run_lowbit(model, ids, {"recipe": "w8a8"})
    assert rel_err(dynamic, ref) < 0.05
    assert rel_err(dynamic, ref) < rel_err(w8a8, ref)
