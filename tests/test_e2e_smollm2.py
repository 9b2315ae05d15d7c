"""End to end on the real SmolLM2-135M (slow tier): int8 quality on real text.

CI installs the model package (scripts/dev.sh), so these run there; without it
they fail with the install hint rather than skip.
"""

from __future__ import annotations

import pytest
import torch

import qcompile
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
def test_int8_mixed_perplexity_within_1p5_percent_of_fp(smollm2):
    model, _, tokens, calibration, fp = smollm2
    options = {"recipe": "int8-mixed", "calibration": calibration, "handoff": "eager"}
    ppl = perplexity(torch.compile(model, backend="lowbit", options=options), tokens)
    report = qcompile.compiled_reports()[-1]
    print(f"fp {fp:.3f}  int8-mixed {ppl:.3f}  ({(ppl / fp - 1) * 100:+.2f}%)")
    assert len(report.quantized) == 30 * 7 + 1  # every linear, lm_head included
    assert sum(map(len, (r.outlier_channels for r in report.sites))) > 0
    assert ppl <= fp * 1.015


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
