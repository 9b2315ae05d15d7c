"""End to end on the real SmolLM2-135M (slow tier): int8 quality on real text.

CI installs the model package (scripts/dev.sh), so these run there; without it
they fail with the install hint rather than skip.
"""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile import corpus
from qcompile.perplexity import calibration_batches, dev_tokens, perplexity
from qcompile.smollm2 import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_smollm2()
    tokens = dev_tokens(tok, 2048)
    calibration = qcompile.calibrate(model, calibration_batches(tok, n_batches=8, seq_len=512))
    fp = perplexity(model, tokens)
    return model, tok, tokens, calibration, fp


@pytest.mark.usefixtures("fresh_dynamo")
def test_int8_mixed_holds_on_text_unlike_its_calibration(smollm2):
    """Calibrated on the dev text; measured on it and on three kinds it never saw. The
    absolute threshold 6 (LLM.int8()'s rule, the default before the ratio) gave 1.025-1.036
    on the legal text (docs/results.md); float rounding moves these ratios by about
    +-0.5% (the same docs), hence the margins."""
    model, tok, _, calibration, _ = smollm2
    options = {"recipe": "int8-mixed", "calibration": calibration, "handoff": "eager"}
    fast = torch.compile(model, backend="lowbit", options=options)
    ratios = {}
    for kind in corpus.KINDS:
        tokens = corpus.eval_tokens(tok, kind, 2048)
        ratios[kind] = perplexity(fast, tokens) / perplexity(model, tokens)
    report = qcompile.compiled_reports()[-1]
    print({k: round(v, 4) for k, v in ratios.items()})
    assert len(report.quantized) == 30 * 7 + 1  # every linear, lm_head included
    columns = sum(len(r.outlier_channels) for r in report.sites)
    assert 0 < columns < 4000  # the absolute threshold kept 4803
    assert all(r <= 1.012 for k, r in ratios.items() if k != "legal"), ratios
    assert sum(ratios.values()) / len(ratios) <= 1.01, ratios
    assert ratios["legal"] <= 1.02, ratios


@pytest.mark.usefixtures("fresh_dynamo")
def test_fp_recipe_reproduces_eager_and_w8a8_is_worse_than_mixed(smollm2):
    model, _, tokens, calibration, fp = smollm2
    short = tokens[:, :512]
    results = {}
    for recipe in ("fp", "w8a8", "int8-mixed"):
        torch._dynamo.reset()
        options = {"recipe": recipe, "calibration": calibration, "handoff": "eager"}
        results[recipe] = perplexity(torch.compile(model, backend="lowbit", options=options), short)
    assert results["fp"] == pytest.approx(perplexity(model, short), rel=1e-6)
    assert results["int8-mixed"] < results["w8a8"]


@pytest.mark.usefixtures("fresh_dynamo")
def test_int8_mixed_site_kernels_agree_under_inductor(smollm2):
    """Every one of the 211 sites, fed the same inputs, computes under inductor what it
    computes eagerly (the whole model's logits differ more: float rounding upstream
    flips codes, which depth amplifies; docs/results.md)."""
    from helpers import lowered_graph, node_values, site_kernels_program
    from torch._inductor.compile_fx import compile_fx

    model, _, tokens, calibration, _ = smollm2
    gm, inputs = lowered_graph(model, tokens[:, :128], {"calibration": calibration})
    program, reads = site_kernels_program(gm)
    values = node_values(gm, inputs, reads)
    with torch.no_grad():
        eager = program(*values)
        compiled = compile_fx(program, values)(*values)
    assert len(eager) == 30 * 7 + 1
    worst = max(((e - c).abs().max() / e.abs().max()).item() for e, c in zip(eager, compiled))
    assert worst < 1e-5
