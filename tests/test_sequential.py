"""qcompile.quantize_sequential: a meta-device model quantized block by block from its
checkpoint saves what the whole-model path saves (bit for bit when calibrated on the fp
hidden states, the default, or without statistics), for every recipe family."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile
from qcompile.calibration import calibrate
from qcompile.recipes import get_recipe


def tiny(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (1, 24), generator=g) for _ in range(4)]


@pytest.mark.parametrize(
    "recipe, tie, calibrate_on, exact",
    [
        ("w4a16-g32", True, "quantized", True),
        ("int8-mixed", False, "quantized", True),
        ("w4a16-g32-gptq", False, "quantized", False),
        ("w6a6-duquant", True, "quantized", False),
        ("w4a16-g32-gptq", True, "fp", True),
        ("w6a6-duquant", False, "fp", True),
    ],
)
def test_sequential_matches_the_whole_model_path(tmp_path, recipe, tie, calibrate_on, exact):
    source, batches = tiny(tie), data()
    source.save_pretrained(tmp_path / "fp")
    with init_empty_weights():
        model = LlamaForCausalLM(source.config).eval()
    result = qcompile.quantize_sequential(
        model,
        tmp_path / "fp",
        batches,
        tmp_path / "q",
        options={"recipe": recipe},
        calibrate_on=calibrate_on,
    )
    assert len(result.block_seconds) == 4 and not result.left_in_fp
    loaded = qcompile.from_pretrained(tmp_path / "q", options={"handoff": "eager"})
    r = get_recipe(recipe)
    cal = calibrate(source, batches, hessian=r.gptq, sample_rows=512 if r.transform else 0)
    opts = {"recipe": recipe, "calibration": cal, "handoff": "eager"}
    whole = torch.compile(source, backend="lowbit", options=opts)
    with torch.no_grad():
        want, got = whole(batches[0]).logits, loaded(batches[0]).logits
    torch._dynamo.reset()
    if exact:  # the statistics of the same hidden states, or none: the same products
        assert torch.equal(got, want), (got - want).abs().max()
    else:  # calibrated on the quantized blocks' outputs, not the fp ones: close
        assert (got - want).abs().max() < 0.25 * want.abs().max()


def test_sequential_needs_a_meta_model_and_its_own_options(tmp_path):
    source = tiny(False)
    with pytest.raises(ValueError, match="init_empty_weights"):
        qcompile.quantize_sequential(source, None, data(), tmp_path / "q", options={})
    with init_empty_weights():
        model = LlamaForCausalLM(source.config)
    with pytest.raises(ValueError, match="drop the option 'calibration'"):
        qcompile.quantize_sequential(
            model, tmp_path, data(), tmp_path / "q", options={"calibration": None}
        )
    with pytest.raises(ValueError, match="calibrate_on='fast'"):
        qcompile.quantize_sequential(
            model, tmp_path, data(), tmp_path / "q", options={}, calibrate_on="fast"
        )
    with pytest.raises(ValueError, match="checkpoint="):
        qcompile.quantize_sequential(model, None, data(), tmp_path / "q", options={})
