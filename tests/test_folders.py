"""Model folders: ``qcompile.save(model, folder, tokenizer=tok)`` writes a Hugging Face-style
folder and ``qcompile.from_pretrained(folder)`` rebuilds the model on the meta device and
computes what the saved model computed, without calibrating; the one-file form stays."""

from __future__ import annotations

import json

import pytest
import torch
from model_folder import TEXT, tiny_llama
from transformers import AutoTokenizer

import qcompile
from qcompile import artifacts, folder

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def quantized(ids, options):
    """A tiny Llama compiled with ``options`` and run once; its logits."""
    torch._dynamo.reset()
    model = tiny_llama()
    calibration = qcompile.calibrate(model, [ids], hessian=True)
    fast = torch.compile(
        model, backend="lowbit", options={"handoff": "eager", "calibration": calibration, **options}
    )
    with torch.no_grad():
        return fast, fast(ids).logits


@pytest.mark.parametrize(
    "options, recorded",
    [
        (
            {"recipe": "w4a16-g32", "overrides": {"lm_head": "fp"}},
            {"recipe": "w4a16-g32", "overrides": {"lm_head": "fp"}},
        ),
        (
            {"recipe": "int8-mixed", "threshold": 0.5},
            {"recipe": "int8-mixed", "threshold": 0.5, "outlier_ratio": 0.0},
        ),
        (
            {"recipe": "w3a16-g32-gptq", "overrides": {"*.down_proj": "w8a8"}},
            {
                "recipe": "w3a16-g32-gptq",
                "overrides": {"model.layers.1.mlp.down_proj.weight": "w8a8"},
            },
        ),
    ],
)
def test_folder_round_trip_is_bit_exact(tmp_path, tok, ids, options, recorded):
    fast, logits = quantized(ids, options)
    out = tmp_path / "quantized"
    qcompile.save(fast, out, tokenizer=tok)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "lowbit.safetensors", "lowbit_config.json", "tokenizer.json"} <= names
    saved = json.loads((out / "lowbit_config.json").read_text())["options"]
    assert saved.items() >= {k: v for k, v in recorded.items() if k != "overrides"}.items()
    assert saved.get("overrides", {}).items() >= recorded.get("overrides", {}).items()

    torch._dynamo.reset()
    model = qcompile.from_pretrained(out, options={"handoff": "eager"})
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert artifacts.is_freed(q_proj)  # never materialised in full precision
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == ids[0].tolist()
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert greedy.shape == (1, ids.shape[1] + 4)


def test_given_options_are_recorded_without_objects(tmp_path, ids):
    fast, _ = quantized(ids, {"recipe": "w8a8"})
    calibration = qcompile.calibrate(tiny_llama(), [ids])
    given = {"recipe": "w8a8", "calibration": calibration, "free_weights": True, "target": "cpu"}
    qcompile.save(fast, tmp_path / "m", options=given)
    config = folder.folder_config(tmp_path / "m")
    assert config["options"] == {"recipe": "w8a8", "target": "cpu"}


def test_a_file_path_holds_the_weights_only(tmp_path, tok, ids):
    fast, logits = quantized(ids, {"recipe": "w4a16-g32"})
    with pytest.raises(ValueError, match="give a folder path"):
        qcompile.save(fast, tmp_path / "m.safetensors", tokenizer=tok)
    qcompile.save(fast, tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = type(fast._orig_mod)(fast._orig_mod.config).eval()
    qcompile.load(tmp_path / "m.safetensors", model)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(
            model, backend="lowbit", options={"recipe": "w4a16-g32", "handoff": "eager"}
        )
        assert torch.equal(out(ids).logits, logits)


def test_not_a_lowbit_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="not a lowbit model folder"):
        qcompile.from_pretrained(tmp_path / "hf")
