"""End to end on the real SmolLM2-135M (slow tier): 4-bit GPTQ on real text.

Every linear is quantized, lm_head included: its weight is tied to the
embedding, so the recipe keeps it at 8 bits (``recipes.tied_embedding_recipe``)
and the embedding lookups read the same codes. Calibration: 64 x 512 tokens of
the corpus mix (``qcompile.corpus``: reference, docstrings, code) with
``hessian=True``. ``w4a16-g64-gptq`` stays within 10% of the fp perplexity on 2048
dev tokens and beats round-to-nearest in the same run on them and on the legal
text, which calibration never saw, with the full-precision weights released
(``free_weights``) after the first call.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qcompile
from qcompile import artifacts, corpus
from qcompile.perplexity import perplexity
from qcompile.smollm2 import load_smollm2

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("fresh_dynamo")
def test_w4_g64_gptq_within_10_percent_of_fp_with_weights_released():
    model, tok = load_smollm2()
    tokens = corpus.eval_tokens(tok, "reference", 2048)
    unseen = corpus.eval_tokens(tok, "legal", 2048)
    batches = corpus.calibration_batches(tok, n_batches=64, seq_len=512)
    calibration = qcompile.calibrate(model, batches, hessian=True)
    fp = perplexity(model, tokens, batch_size=4)
    fp_unseen = perplexity(model, unseen, batch_size=4)

    def quantized_perplexity(recipe, target_model, **extra):
        torch._dynamo.reset()
        options = {"recipe": recipe, "calibration": calibration, "handoff": "eager", **extra}
        compiled = torch.compile(target_model, backend="lowbit", options=options)
        ppl = perplexity(compiled, tokens, batch_size=4)
        return ppl, perplexity(compiled, unseen, batch_size=4), compiled

    rtn, rtn_unseen, _ = quantized_perplexity("w4a16-g64", model)
    twin = copy.deepcopy(model)
    gptq, gptq_unseen, compiled = quantized_perplexity("w4a16-g64-gptq", twin, free_weights=True)
    report = qcompile.compiled_reports()[-1]
    again = perplexity(compiled, tokens, batch_size=4)  # recompiles onto the released weights
    print(f"fp {fp:.3f} / {fp_unseen:.3f}  w4a16-g64 {rtn:.3f} / {rtn_unseen:.3f}  "
          f"w4a16-g64-gptq {gptq:.3f} / {gptq_unseen:.3f} (dev / legal)")  # fmt: skip
    assert len(report.quantized) == 30 * 7 + 1
    assert sum(r.method == "gptq" for r in report.quantized) > 150
    head = next(r for r in report.sites if r.fqn == "lm_head.weight")
    assert head.scheme == "w8a16-g64-gptq"
    assert any("lookups read lm_head.weight" in line for line in report.embeddings)
    assert artifacts.is_freed(twin.lm_head.weight)
    assert artifacts.is_freed(twin.model.layers[0].mlp.down_proj.weight)
    assert again == pytest.approx(gptq, rel=1e-4)
    assert gptq < rtn
    assert gptq_unseen < rtn_unseen
    assert gptq <= 1.10 * fp
