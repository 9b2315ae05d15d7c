"""qcompile.save / qcompile.load: a quantized model round-trips bit for bit, without
calibrating again, onto a meta-device model or one with other fp weights; a bad file
or another model is a ValueError that leaves the target model as it was."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct

import pytest
import torch
from helpers import TinySpec, build_model, input_ids
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile
from qcompile import artifacts

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SPEC = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=False)
CALIBRATION_WARNING = "calibrating on this graph's example inputs"
RECIPES = ["int8-mixed", "w8a8", "w4a16-g32", "w3a16-g32-gptq"]


def recipe_options(recipe: str) -> dict:
    opts = {"recipe": recipe, "handoff": "eager"}
    if recipe == "int8-mixed":
        opts["threshold"] = 0.5  # low enough that some input channels are outliers
    return opts


def compiled_logits(model, ids, options) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="lowbit", options=options)(ids).logits


def meta_model(spec: TinySpec = SPEC):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**config_kwargs(spec))).eval()


def config_kwargs(spec: TinySpec) -> dict:
    return dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=spec.tied,
    )


def snapshot(model) -> dict:
    """Identity, placement and (when materialized) value of every parameter and buffer."""
    out = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, t in named:
        value = None if t.device.type == "meta" else t.detach().clone()
        out[name] = (t, t.device, t.dtype, tuple(t.shape), t.stride(), value)
    return out


def assert_unchanged(model, snap: dict) -> None:
    now = snapshot(model)
    assert now.keys() == snap.keys()
    for name, (t, device, dtype, shape, stride, value) in snap.items():
        t2, device2, dtype2, shape2, stride2, value2 = now[name]
        assert t2 is t, name
        assert (device2, dtype2, shape2, stride2) == (device, dtype, shape, stride), name
        assert (value is None) == (value2 is None) and (value is None or torch.equal(value, value2))


def saved_model(tmp_path_factory, recipe: str, spec: TinySpec = SPEC):
    """(path, reference logits, ids): ``recipe`` compiled on a calibrated model and saved."""
    model = build_model(spec)
    ids = input_ids(spec, batch=1, seq=8)
    calibration = qcompile.calibrate(
        model, [input_ids(spec, batch=2, seq=16, seed=s) for s in (2, 3)], hessian=True
    )
    reference = compiled_logits(model, ids, {**recipe_options(recipe), "calibration": calibration})
    if recipe == "int8-mixed":
        outliers = [r.outlier_channels for r in qcompile.compiled_reports()[-1].sites]
        assert any(outliers), "the test needs outlier channels"
    path = tmp_path_factory.mktemp("saved") / f"{recipe}.safetensors"
    qcompile.save(model, path)
    torch._dynamo.reset()
    return path, reference, ids


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """``get(recipe)`` -> (recipe, path, reference logits, ids), saved once per module."""
    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            cache[recipe] = (recipe, *saved_model(tmp_path_factory, recipe))
        return cache[recipe]

    return get


@pytest.fixture(params=RECIPES)
def saved(request, saved_files):
    return saved_files(request.param)


@pytest.mark.parametrize("target", ["meta", "other-weights"])
def test_round_trip_is_bit_exact_without_calibrating(saved, target, caplog):
    recipe, path, reference, ids = saved
    model = meta_model() if target == "meta" else build_model(dataclasses.replace(SPEC, seed=7))
    if target == "other-weights":
        assert not torch.equal(model.model.norm.weight, build_model(SPEC).model.norm.weight)
    assert qcompile.load(path, model) is model
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        out = compiled_logits(model, ids, recipe_options(recipe))
    assert CALIBRATION_WARNING not in caplog.text
    assert torch.equal(out, reference)
    report = qcompile.compiled_reports()[-1]
    assert len(report.quantized) == 8 and report.memory["freed_bytes"] > 0
    # the quantized linears hold no full-precision weight; the file does not either
    down = model.model.layers[0].mlp.down_proj
    assert artifacts.is_freed(down.weight) and down.weight.shape == (32, 64)
    assert not any(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(RuntimeError, match="lowbit freed"):
        model(ids)


def test_plan_records_the_quantization(saved):
    recipe, path, _, _ = saved
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    plan = json.loads(meta["lowbit"])
    assert plan["format"] == "lowbit.model" and plan["version"] == 1
    assert plan["model_class"] == "LlamaForCausalLM"
    assert plan["config"]["hidden_size"] == 32 and plan["recipes"] == [recipe]
    entry = plan["quantized"]["model.layers.0.mlp.down_proj.weight"]
    assert entry["shape"] == [32, 64] and entry["dtype"] == "float32" and not entry["keep_fp"]
    assert entry["tensor"] is None, "a quantized linear's fp weight is not saved"
    (art,) = entry["artifacts"]
    assert art["key"]["scheme"] == recipe
    assert art["sites"] == ["model.layers.0.mlp.down_proj.weight"]
    if recipe.startswith("w") and "a16" in recipe:
        assert art["meta"]["group_size"] == 32 and set(art["tensors"]) == {
            "packed",
            "scales",
            "zeros",
        }
    else:
        assert art["meta"]["bits"] == 8 and {"w_q", "w_scale"} <= set(art["tensors"])
    assert "model.embed_tokens.weight" in plan["fp"] and "model.norm.weight" in plan["fp"]
    assert len(meta["lowbit_sha256"]) == 64


def test_tied_weights_and_a_model_compiled_with_free_weights(tmp_path):
    """A tied lm_head keeps its fp weight (the embedding needs it) and its products;
    a model whose weights free_weights released saves and loads the same way."""
    spec = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=True)
    model = build_model(spec)
    ids = input_ids(spec, batch=1, seq=8)
    calibration = qcompile.calibrate(model, [input_ids(spec, batch=2, seq=16)])
    opts = {**recipe_options("int8-mixed"), "free_weights": True}
    torch._dynamo.reset()
    with torch.no_grad():
        fast = torch.compile(model, backend="lowbit", options={**opts, "calibration": calibration})
        reference = fast(ids).logits
        assert torch.equal(fast(ids).logits, reference)  # recompiled on the placeholders
    assert artifacts.is_freed(model.model.layers[0].mlp.down_proj.weight)
    assert not artifacts.is_freed(model.lm_head.weight)
    path = tmp_path / "tied.safetensors"
    qcompile.save(fast, path)  # an OptimizedModule is unwrapped
    loaded = qcompile.load(path, meta_model(spec))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(compiled_logits(loaded, ids, opts), reference)


def test_other_recipe_after_load_raises(saved_files):
    _, path, _, ids = saved_files("w8a8")
    model = qcompile.load(path, meta_model())
    torch._dynamo.reset()
    with pytest.raises(Exception, match="was released") as ei:
        with torch.no_grad():
            torch.compile(model, backend="lowbit", options=recipe_options("w4a16-g32"))(ids)
    assert "no stored quantization matches" in str(ei.value)


def test_save_needs_a_compiled_model(tmp_path):
    with pytest.raises(ValueError, match="quantized none"):
        qcompile.save(build_model(SPEC), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# bad files and other models ------------------------------------------------------------


def corrupt(path, tmp_path, case: str):
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    out = tmp_path / f"{case}.safetensors"
    if case == "flipped-data":
        for i in (len(data) - 5, 8 + n + 3):
            data[i] ^= 0xFF
    elif case == "flipped-plan":
        i = data.index(b"down_proj", 8, 8 + n)
        data[i] ^= 0x01  # still valid JSON: a different name
    elif case == "flipped-header":
        data[8 + n // 2] ^= 0xFF
    elif case == "truncated":
        data = data[: len(data) - 17]
    elif case == "truncated-header":
        data = data[: 8 + n // 2]
    elif case == "empty":
        data = b""
    elif case == "missing":
        return tmp_path / "nope.safetensors"
    out.write_bytes(bytes(data))
    return out


CASES = [
    "flipped-data",
    "flipped-plan",
    "flipped-header",
    "truncated",
    "truncated-header",
    "empty",
    "missing",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target", ["meta", "fp"])
def test_bad_file_raises_and_leaves_model_unchanged(saved_files, tmp_path, case, target):
    _, path, _, _ = saved_files("int8-mixed")  # the file format does not depend on the recipe
    model = meta_model() if target == "meta" else build_model(SPEC)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="lowbit.load") as ei:
        qcompile.load(corrupt(path, tmp_path, case), model)
    assert str(tmp_path) in str(ei.value)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "other, words",
    [
        (TinySpec(hidden=48, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=False), ["48"]),
        (TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, layers=2, tied=False),
         ["layers.1"]),
        (TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=True), ["tied"]),
    ],
    ids=["hidden-size", "more-layers", "tied"],
)  # fmt: skip
def test_other_model_raises_and_is_left_unchanged(saved_files, other, words):
    _, path, _, _ = saved_files("w4a16-g32")
    for model in (meta_model(other), build_model(other)):
        snap = snapshot(model)
        with pytest.raises(ValueError, match="lowbit.load") as ei:
            qcompile.load(path, model)
        for word in words:
            assert word in str(ei.value)
        assert_unchanged(model, snap)


def test_other_class_and_dtype_raise(saved_files):
    _, path, _, _ = saved_files("w8a8")
    inner = build_model(SPEC).model  # a LlamaModel, not a LlamaForCausalLM
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        qcompile.load(path, inner)
    half = build_model(SPEC, dtype=torch.bfloat16)
    snap = snapshot(half)
    with pytest.raises(ValueError, match="bfloat16"):
        qcompile.load(path, half)
    assert_unchanged(half, snap)


def test_calibration_file_is_not_a_model_file(tmp_path):
    model = build_model(SPEC)
    path = tmp_path / "calibration.safetensors"
    qcompile.calibrate(model, [input_ids(SPEC)]).save(path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not a lowbit model file"):
        qcompile.load(path, model)
    assert_unchanged(model, snap)
