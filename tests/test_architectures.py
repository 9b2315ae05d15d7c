"""Every matmul weight of every Hugging Face causal LM is a site: tiny random configs of
25 transformers architectures (tests/architectures.py: GPT-2's Conv1D, Falcon's
``x @ W.T``, fused QKV, parallel blocks, Mixture-of-Experts tensors, ...).

Per architecture and recipe: every matmul weight is quantized or reported with its
reason (``qcompile.model_report``: zero silent full-precision weights, routers the only
ones kept), the logits stay within the recipe's tolerance of the fp model, ``fp`` is
exact, and ``free_weights`` + save / load onto a meta-device model is bit-exact. The
per-expert rewrite of grouped products is checked against ``grouped_mm`` by hypothesis.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import transformers
from architectures import ARCHITECTURES, batches, build, config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

import qcompile
from qcompile import artifacts
from qcompile.calibration import SiteStats
from qcompile.coverage import LowbitCoverageWarning, matmul_shaped
from qcompile.passes._expert_sites import split_grouped_products
from qcompile.recipes import get_recipe, tied_embedding_recipe

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

# relative error of the logits (||y - y_fp|| / ||y_fp||) each recipe must stay within on
# every architecture: about 1.5x the largest measured over the 25 (Gemma's; docs/results.md)
TOLERANCE = {
    "int8-mixed": 0.04,
    "w8a8": 0.04,
    "w4a16-g32": 0.3,
    "w4a16-g32-gptq": 0.25,
    "w4a4-duquant": 0.5,
}
# the whole recipe matrix runs on these (one of each site form); w8a8 and fp on all
MATRIX = ("gpt2", "falcon", "phi3", "gemma3", "mixtral", "qwen3_moe")
EVAL = batches(1, seq=12, seed=9)[0]


def _compile(model, recipe, calibration, **extra):
    options = {"recipe": recipe, "calibration": calibration, "handoff": "eager", **extra}
    return torch.compile(model, backend="lowbit", options=options)


def _calibration(model, recipe):
    return qcompile.calibrate(
        model,
        batches(4),
        hessian=recipe.endswith("gptq"),
        sample_rows=64 if "duquant" in recipe else 0,
    )


def _relative_error(y, ref) -> float:
    return float((y - ref).norm() / ref.norm())


def _check_coverage(model) -> qcompile.Report:
    """Every matmul weight quantized, or kept for a chosen reason (routers); no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowbitCoverageWarning)
        report = qcompile.model_report(model)
    cov = report.coverage
    assert cov.total == len(matmul_shaped(model)) > 0
    assert not cov.never_seen and not cov.unexpected, cov.lines()
    kept = {name for name, _, _ in cov.full_precision}
    assert all(name.endswith("mlp.gate.weight") for name in kept), kept  # the MoE routers
    assert cov.quantized_share > 0.9, cov.lines()
    return report


def _quantize(name, recipe):
    model = build(name)
    with torch.no_grad():
        ref = model(EVAL).logits
        fast = _compile(model, recipe, _calibration(model, recipe))
        y = fast(EVAL).logits
    return model, ref, y


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_w8a8_quantizes_every_matmul_weight_and_fp_is_exact(name):
    model, ref, y = _quantize(name, "w8a8")
    _check_coverage(model)
    assert _relative_error(y, ref) < TOLERANCE["w8a8"]
    torch._dynamo.reset()
    with torch.no_grad():
        exact = _compile(model, "fp", None)(EVAL).logits
    assert torch.equal(exact, ref)


@pytest.mark.parametrize("recipe", ["int8-mixed", "w4a16-g32", "w4a16-g32-gptq", "w4a4-duquant"])
@pytest.mark.parametrize("name", MATRIX)
def test_recipe_quantizes_every_matmul_weight_within_tolerance(name, recipe):
    model, ref, y = _quantize(name, recipe)
    report = _check_coverage(model)
    # a tied lm_head takes the recipe's rule for tied weights (w4 weight-only: 8 bits)
    assert {r.scheme for r in report.quantized} <= {recipe, tied_embedding_recipe(recipe)}
    assert _relative_error(y, ref) < TOLERANCE[recipe]


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("gpt2", "w4a16-g32"),
        ("gpt2", "w4a4-duquant"),
        ("falcon", "int8-mixed"),
        ("mixtral", "w4a16-g32-gptq"),
        ("mixtral", "w4a4-duquant"),
        ("qwen3_moe", "w8a8"),
    ],
)
def test_free_weights_then_save_load_is_exact(name, recipe):
    model = build(name)
    fast = _compile(model, recipe, _calibration(model, recipe), free_weights=True)
    with torch.no_grad():
        fast(EVAL)  # compiles, runs, releases the fp weights
        expected = fast(EVAL).logits  # the graph recompiled from the stored products
    released = {n for n, p in model.named_parameters() if artifacts.is_freed(p)}
    # kept: the routers, and a tied embedding table unless its lookups read the codes
    # (weight-only recipes: passes/quantize_embedding.py)
    table = model.get_input_embeddings().weight
    weight_only = get_recipe(recipe).weight_only
    assert released >= {
        n
        for n, p in matmul_shaped(model)
        if not n.endswith("mlp.gate.weight") and (p is not table or weight_only)
    }
    path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    qcompile.save(fast, path)
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(config(name)).eval()
    qcompile.load(path, fresh)
    torch._dynamo.reset()
    again = _compile(fresh, recipe, None)
    with torch.no_grad():
        assert torch.equal(again(EVAL).logits, expected)


@pytest.mark.parametrize("name", ["gpt2", "mixtral"])
def test_inductor_handoff_computes_what_eager_does(name):
    model = build(name)
    calibration = _calibration(model, "w8a8")
    outs = {}
    for handoff in ("eager", "inductor"):
        torch._dynamo.reset()
        with torch.no_grad():
            outs[handoff] = _compile(model, "w8a8", calibration, handoff=handoff)(EVAL).logits
        _check_coverage(model)
    torch.testing.assert_close(outs["inductor"], outs["eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g32"])
def test_expert_sites_run_the_triton_kernels(recipe):
    """Target "triton" (the interpreter on CPU tensors): the experts' products give what
    the CPU kernels give (int8: bit for bit; weight-only: the kernels' tolerance)."""
    model = build("mixtral")
    x = EVAL[:, :5]
    calibration = _calibration(model, recipe)
    outs = {}
    for target in ("triton", "cpu"):
        torch._dynamo.reset()
        with torch.no_grad():
            outs[target] = _compile(model, recipe, calibration, target=target)(x).logits
        assert qcompile.compiled_reports()[-1].target == target
        _check_coverage(model)
    torch.testing.assert_close(outs["triton"], outs["cpu"], rtol=0, atol=0.02)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g32"])
def test_moe_block_error_matches_a_dense_mlp_of_the_same_width(recipe):
    """The MoE block alone (its router in fp, the same inputs) loses what a dense MLP of
    the same width loses: each expert is quantized as a dense linear is."""
    torch.manual_seed(3)
    x = torch.randn(1, 64, 32)
    errors = {}
    for name in ("mixtral", "llama"):
        torch._dynamo.reset()
        mlp = build(name).model.layers[0].mlp
        with torch.no_grad():
            ref = mlp(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            calibration = qcompile.calibrate(mlp, [torch.randn(1, 64, 32) for _ in range(4)])
            y = _compile(mlp, recipe, calibration)(x)
            y = y[0] if isinstance(y, tuple) else y
        errors[name] = _relative_error(y, ref)
    assert errors["mixtral"] < 1.5 * errors["llama"], errors


def test_expert_no_calibration_token_reached_is_reported():
    model = build("mixtral")
    calibration = _calibration(model, "w4a16-g32-gptq")
    key = "model.layers.0.mlp.experts.gate_up_proj[1]"
    assert calibration[key].rows > 0
    empty = SiteStats.empty(32, calibration[key].threshold, hessian=True)
    starved = qcompile.Calibration({**calibration.stats, key: empty})  # no token routed
    with torch.no_grad():
        _compile(model, "w4a16-g32-gptq", starved)(EVAL)
    report = qcompile.compiled_reports()[-1]
    row = next(r for r in report.sites if r.fqn == key)
    assert row.scheme == "w4a16-g32" and row.fp_reason is None
    assert any(key in note for note in report.notes)
    torch._dynamo.reset()
    with torch.no_grad():
        _compile(model, "w4a16-g32-gptq", starved, uncalibrated_experts="fp")(EVAL)
    row = next(r for r in qcompile.compiled_reports()[-1].sites if r.fqn == key)
    assert "no calibration token" in row.fp_reason
    with pytest.warns(LowbitCoverageWarning, match="gate_up_proj"):
        qcompile.model_report(model)


def test_router_quantized_only_when_an_override_names_it():
    model = build("mixtral")
    calibration = _calibration(model, "w8a8")
    with torch.no_grad():
        _compile(model, "w8a8", calibration, overrides={"*.mlp.gate": "w8a8"})(EVAL)
    assert not qcompile.model_report(model).coverage.full_precision


def test_override_matching_nothing_names_the_closest_weights():
    model = build("gpt2")
    fast = _compile(model, "w8a8", None, overrides={"transformer.h.*.attn.c_atn": "fp"})
    with pytest.raises(
        Exception, match=r"matches no weight.*closest names: transformer\.h\.\*\.attn\.c_attn"
    ):
        with torch.no_grad():
            fast(EVAL)


def test_weight_run_outside_the_compiled_function_is_never_seen():
    model = build("mistral")
    with torch.no_grad():
        _compile(model.model, "w8a8", None)(EVAL)  # the base model: lm_head never runs
    with pytest.warns(LowbitCoverageWarning, match="lm_head.weight"):
        report = qcompile.model_report(model)
    assert [name for name, _ in report.coverage.never_seen] == ["lm_head.weight"]
    assert "quantized 14 of 15 matmul weights" in report.summary()
    assert "never seen by lowbit: 1: lm_head.weight" in report.summary()


@st.composite
def grouped_problems(draw):
    experts = draw(st.integers(1, 5))
    rows = draw(st.lists(st.integers(0, 6), min_size=experts, max_size=experts))
    k, n = draw(st.sampled_from([4, 8, 12])), draw(st.sampled_from([4, 8, 12]))
    transposed = draw(st.booleans())  # [E, out, in] multiplied as W.transpose(-2, -1)
    return experts, rows, k, n, transposed


class _Grouped(torch.nn.Module):
    def __init__(self, weight, transposed):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.transposed = transposed

    def forward(self, x, offs):
        w = self.weight.transpose(-2, -1) if self.transposed else self.weight
        return torch._grouped_mm(x, w, offs=offs)


@settings(max_examples=25, deadline=None)
@given(grouped_problems())
def test_per_expert_rewrite_computes_what_grouped_mm_does(problem):
    experts, rows, k, n, transposed = problem
    g = torch.Generator().manual_seed(sum(rows) + 7 * k + n)
    shape = (experts, n, k) if transposed else (experts, k, n)
    module = _Grouped(torch.randn(shape, generator=g), transposed)
    x = torch.randn(max(sum(rows), 1), k, generator=g)
    offs = torch.tensor(rows, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    gm = fx.symbolic_trace(module)
    params = {n.name: module.weight for n in gm.graph.nodes if n.op == "get_attr"}
    assert len(split_grouped_products(gm, params)) == 1
    gm.recompile()
    expected = module(x, offs)
    expected[int(offs[-1]) :] = 0  # rows past the last expert's: grouped_mm leaves them
    torch.testing.assert_close(gm(x, offs), expected, rtol=1e-5, atol=1e-5)
