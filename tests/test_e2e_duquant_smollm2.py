"""End to end on the real SmolLM2-135M (slow tier): the DuQuant recipes on real text.

SmolLM2 has real massive outliers (down_proj inputs reach |x| ~ 2800), where W4A4
round-to-nearest collapses. On 2048 dev tokens, with one calibration (8 x 512
tokens, ``sample_rows=512``) and every linear quantized (lm_head included):
``w6a6-duquant`` stays within 5% of the fp perplexity, and ``w4a4-duquant`` is
strictly better than the ``w4a4-hadamard`` (QuaRot-style) and ``w4a4-rtn``
baselines measured in the same run. The exact passes run under ``verify``.
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
    batches = calibration_batches(tok, n_batches=8, seq_len=512)
    calibration = qcompile.calibrate(model, batches, sample_rows=512)
    fp = perplexity(model, tokens, batch_size=4)
    return model, tokens, calibration, fp


def lowbit_perplexity(model, tokens, calibration, recipe, **options):
    torch._dynamo.reset()
    opts = {"recipe": recipe, "calibration": calibration, "handoff": "eager", **options}
    ppl = perplexity(torch.compile(model, backend="lowbit", options=opts), tokens, batch_size=4)
    report = qcompile.compiled_reports()[-1]
    assert len(report.quantized) == 30 * 7 + 1, report.summary()
    return ppl, report


@pytest.mark.usefixtures("fresh_dynamo")
def test_duquant_recipes_on_smollm2(smollm2):
    model, tokens, calibration, fp = smollm2
    ppl = {"fp": fp}
    ppl["w6a6-duquant"], report = lowbit_perplexity(
        model, tokens, calibration, "w6a6-duquant", verify=True
    )
    down = next(r for r in report.sites if r.fqn == "model.layers.11.mlp.down_proj.weight")
    assert down.act_absmax_before > 1000 and down.act_absmax_after < down.act_absmax_before / 10
    assert "fused into model.layers.11.mlp.up_proj.weight rows" in down.transforms
    for recipe in ("w4a4-duquant", "w4a4-hadamard", "w4a4-rtn"):
        ppl[recipe], _ = lowbit_perplexity(model, tokens, calibration, recipe)
    print("  ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    assert ppl["w6a6-duquant"] <= 1.05 * fp
    assert ppl["w4a4-duquant"] < ppl["w4a4-hadamard"]
    assert ppl["w4a4-duquant"] < ppl["w4a4-rtn"]
