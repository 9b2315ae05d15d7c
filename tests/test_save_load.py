"""qcompile.save / qcompile.load: a quantized model round-trips bit for bit, without
calibrating again, onto a meta-device model or one with other fp weights, for every
recipe family (int8, weight-only, and the DuQuant family with its transform plans);
a bad file or another model is a ValueError that leaves the target model as it was."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct

import pytest
import torch
from helpers import TinySpec, build_model, input_ids, llama_config
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import qcompile
from qcompile import artifacts, serialize
from qcompile.passes import quantize_lowbit as quantize_lowbit_mod
from qcompile.passes import rotate as rotate_mod
from qcompile.passes import smooth as smooth_mod

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "one_thread")

SPEC = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=False)
CALIBRATION_WARNING = "calibrating on this graph's example inputs"
TRANSFORM_RECIPES = ["w4a4-duquant", "w6a6-duquant", "w4a4-hadamard"]
RECIPES = ["int8-mixed", "w8a8", "w4a16-g32", "w3a16-g32-gptq", *TRANSFORM_RECIPES]
# blocks of 16 on K = 32 / 64: two-stage rotations, zigzag permutations, P0 into gate/up
DUQUANT = {"block_size": 16}


def recipe_options(recipe: str) -> dict:
    opts = {"recipe": recipe, "handoff": "eager"}
    if recipe == "int8-mixed":
        opts["threshold"] = 0.5  # low enough that some input channels are outliers
    if recipe.endswith("duquant"):
        opts["duquant"] = DUQUANT
    return opts


def compiled_logits(model, ids, options) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="lowbit", options=options)(ids).logits


def meta_model(spec: TinySpec = SPEC):
    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(spec)).eval()


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
        model,
        [input_ids(spec, batch=2, seq=16, seed=s) for s in (2, 3)],
        hessian=True,
        sample_rows=32,  # the DuQuant family builds its transforms from it
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
    assert plan["format"] == "lowbit.model" and plan["version"] == 2
    assert plan["model_class"] == "LlamaForCausalLM"
    assert plan["config"]["hidden_size"] == 32 and plan["recipes"] == [recipe]
    entry = plan["quantized"]["model.layers.0.mlp.down_proj.weight"]
    assert entry["shape"] == [32, 64] and entry["dtype"] == "float32" and not entry["keep_fp"]
    assert entry["tensor"] is None, "a quantized linear's fp weight is not saved"
    (art,) = [a for a in entry["artifacts"] if a["key"].get("kind", "site") == "site"]
    assert art["key"]["scheme"] == recipe
    assert art["sites"] == ["model.layers.0.mlp.down_proj.weight"]
    if recipe.startswith("w") and "a16" in recipe:
        assert art["meta"]["group_size"] == 32 and set(art["tensors"]) == {
            "packed",
            "scales",
            "zeros",
        }
    elif recipe in TRANSFORM_RECIPES:
        assert art["meta"]["bits"] == int(recipe[1]) and {"w_q", "w_scale"} <= set(art["tensors"])
    else:
        assert art["meta"]["bits"] == 8 and {"w_q", "w_scale"} <= set(art["tensors"])
    assert "model.embed_tokens.weight" in plan["fp"]
    assert ("model.norm.weight" in plan["fp"]) == (not recipe.endswith("duquant"))  # folded
    assert len(meta["lowbit_sha256"]) == 64


def read_plan(path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(json.loads(f.read(n))["__metadata__"]["lowbit"])


def products(plan: dict, name: str, kind: str = "site") -> list[dict]:
    """The products of a parameter in a file's plan, of one kind."""
    arts = plan["quantized"][name]["artifacts"]
    return [a for a in arts if a["key"].get("kind", "site") == kind]


@pytest.mark.parametrize("recipe", TRANSFORM_RECIPES)
def test_plan_records_the_transforms(saved_files, recipe):
    """The JSON plan holds each input group's transform (members, fusion decisions, block
    size, notes) and every product names the plans it was built with."""
    _, path, _, _ = saved_files(recipe)
    plan = read_plan(path)
    plans = plan["plans"]
    assert len(plans) == 5  # q/k/v, o, gate/up, down, lm_head
    by_member = {m: (pid, p) for pid, p in plans.items() for m in p["members"]}
    layer = "model.layers.0."
    down_id, down = by_member[layer + "mlp.down_proj.weight"]
    qkv_id, qkv = by_member[layer + "self_attn.k_proj.weight"]
    assert sorted(qkv["members"]) == [f"{layer}self_attn.{p}_proj.weight" for p in "kqv"]
    (up_site,) = products(plan, layer + "mlp.up_proj.weight")
    (up_plan,) = products(plan, layer + "mlp.up_proj.weight", "plan")
    assert up_site["meta"]["row_plans"] == [down_id]  # down's transform folds into its rows
    assert up_site["meta"]["plan"] == up_plan["meta"]["id"] != down_id
    (down_plan,) = products(plan, layer + "mlp.down_proj.weight", "plan")
    if recipe.endswith("duquant"):
        assert down["block_size"] == 16 and down["duquant"]["block_size"] == 16
        assert down["smooth_into"] == f"rows:{layer}mlp.up_proj.weight"
        assert down["perm_into"] == [f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"]
        assert {"r1", "smooth", "pre_perm"} <= set(down_plan["tensors"])
        assert qkv["smooth_into"] == f"norm:{layer}input_layernorm.weight"
        assert plans[by_member[layer + "self_attn.o_proj.weight"][0]]["online_reason"]
        # the RMSNorm weight: saved in full precision and as its folded copy
        norm = plan["quantized"][layer + "input_layernorm.weight"]
        assert norm["keep_fp"] and norm["tensor"] is not None
        (folded,) = products(plan, layer + "input_layernorm.weight", "folded")
        assert folded["key"]["plans"] == [qkv_id]
        (q_site,) = products(plan, layer + "self_attn.q_proj.weight")
        assert "clip search" in q_site["meta"]["method"] and "clip_ratios" in q_site["tensors"]
    else:
        assert down["transform"] == "hadamard" and set(down_plan["tensors"]) == {"r1"}
        assert down["notes"][0].startswith(("hadamard 64x64", "random-orthogonal 64x64"))
    # one plan held by q, k and v is written once
    (q_plan,) = products(plan, layer + "self_attn.q_proj.weight", "plan")
    (v_plan,) = products(plan, layer + "self_attn.v_proj.weight", "plan")
    assert q_plan["tensors"] == v_plan["tensors"]


@pytest.mark.parametrize("recipe", ["w4a4-duquant", "w4a4-hadamard"])
def test_load_computes_no_transform_and_no_quantization(saved_files, recipe, monkeypatch):
    """After load, nothing of the plan or the low-bit weights is computed again."""
    _, path, reference, ids = saved_files(recipe)
    model = qcompile.load(path, meta_model())

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed after load")

    for mod, name in (
        (rotate_mod, "build_plan"),
        (smooth_mod, "smooth_scales"),
        (quantize_lowbit_mod, "search_clip_ratios"),
        (quantize_lowbit_mod, "quantize_weight_per_channel_bits"),
    ):
        monkeypatch.setattr(mod, name, forbidden)
    opts = {**recipe_options(recipe), "verify": True}  # skipped: nothing is recomputed
    assert torch.equal(compiled_logits(model, ids, opts), reference)
    row = next(r for r in qcompile.compiled_reports()[-1].sites if "down_proj" in r.fqn)
    assert row.transforms and row.act_absmax_after is not None and row.method.startswith("rtn")
    # other duquant settings (or recipe) than the saved ones: a clear error, not a silent mix
    other = {**recipe_options(recipe), "duquant": {"block_size": 8}, "recipe": "w4a4-duquant"}
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no stored quantization matches"):
        with torch.no_grad():
            torch.compile(model, backend="lowbit", options=other)(ids)


def test_tied_weights_and_a_model_compiled_with_free_weights(tmp_path):
    """A tied int8 lm_head: the embedding reads its codes, so free_weights releases the
    table too; the model saves and loads tied, released, and gives the same logits."""
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
    assert artifacts.is_freed(model.lm_head.weight)
    path = tmp_path / "tied.safetensors"
    qcompile.save(fast, path)  # an OptimizedModule is unwrapped
    loaded = qcompile.load(path, meta_model(spec))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert artifacts.is_freed(loaded.lm_head.weight)
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
@pytest.mark.parametrize("recipe", ["int8-mixed", "w4a4-duquant"])
def test_bad_file_raises_and_leaves_model_unchanged(saved_files, tmp_path, case, target, recipe):
    _, path, _, _ = saved_files(recipe)
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
@pytest.mark.parametrize("recipe", ["w4a16-g32", "w4a4-duquant"])
def test_other_model_raises_and_is_left_unchanged(saved_files, other, words, recipe):
    _, path, _, _ = saved_files(recipe)
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


def resigned(path, tmp_path, edit) -> str:
    """A copy of a model file with ``edit(plan, tensors)`` applied and a valid checksum
    (what a buggy writer, not a flipped bit, would produce)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    plan, tensors = json.loads(meta["lowbit"]), load_file(path)
    edit(plan, tensors)
    plan["tensors"] = {
        k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for k, t in tensors.items()
    }
    plan["data_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    plan_json = json.dumps(plan, sort_keys=True)
    out = tmp_path / "resigned.safetensors"
    signature = serialize.digest(plan_json, tensors)
    save_file(tensors, out, metadata={"lowbit": plan_json, "lowbit_sha256": signature})
    return out


def _plan_tensor(plan, member: str, role: str) -> str:
    (art,) = products(plan, member, "plan")
    return art["tensors"][role]


def _break_perm(plan, tensors):
    name = _plan_tensor(plan, "model.layers.0.mlp.down_proj.weight", "pre_perm")
    tensors[name] = torch.zeros_like(tensors[name])


def _short_rotation(plan, tensors):
    name = _plan_tensor(plan, "model.layers.0.self_attn.q_proj.weight", "r1")
    tensors[name] = tensors[name][:1].clone()


def _missing_plan(plan, tensors):
    (art,) = products(plan, "model.layers.0.mlp.up_proj.weight")
    art["meta"]["row_plans"] = ["0123456789abcdef"]


def _too_many_bits(plan, tensors):
    (art,) = products(plan, "model.layers.0.mlp.down_proj.weight")
    name = art["tensors"]["w_q"]
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = 100  # not a 4-bit value


def _wrong_folded_norm(plan, tensors):
    (art,) = plan["quantized"]["model.layers.0.input_layernorm.weight"]["artifacts"]
    name = art["tensors"]["value"]
    tensors[name] = torch.ones(31)


@pytest.mark.parametrize(
    "edit, words",
    [
        (_break_perm, "not a permutation"),
        (_short_rotation, "cover 16 of 32 channels"),
        (_missing_plan, "does not hold"),
        (_too_many_bits, "not 4-bit"),
        (_wrong_folded_norm, "folded copy"),
    ],
    ids=["permutation", "rotation-blocks", "plan-missing", "bits", "folded-norm"],
)
def test_inconsistent_duquant_products_raise_before_loading(saved_files, tmp_path, edit, words):
    _, path, _, _ = saved_files("w4a4-duquant")
    bad = resigned(path, tmp_path, edit)
    for model in (meta_model(), build_model(SPEC)):
        snap = snapshot(model)
        with pytest.raises(ValueError, match="lowbit.load") as ei:
            qcompile.load(bad, model)
        assert words in str(ei.value)
        assert_unchanged(model, snap)
    qcompile.load(resigned(path, tmp_path, lambda plan, tensors: None), meta_model())  # valid


def test_duquant_round_trip_with_tied_embeddings_and_generate(tmp_path):
    """A tied lm_head keeps its fp weight; prefill and decode graphs both use the loaded
    transforms: generate() gives the saved model's tokens."""
    spec = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=True)
    model = build_model(spec)
    prompt = input_ids(spec, batch=1, seq=6)
    calibration = qcompile.calibrate(model, [input_ids(spec, batch=2, seq=16)], sample_rows=32)
    opts = recipe_options("w4a4-duquant")
    with torch.no_grad():
        model.compile(backend="lowbit", options={**opts, "calibration": calibration})
        expected = model.generate(prompt, max_new_tokens=3, do_sample=False)
    path = tmp_path / "tied-duquant.safetensors"
    qcompile.save(model, path)
    torch._dynamo.reset()
    loaded = qcompile.load(path, meta_model(spec))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not artifacts.is_freed(loaded.lm_head.weight)
    with torch.no_grad():
        loaded.compile(backend="lowbit", options=opts)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=3, do_sample=False), expected)


def _int8_mixed_with_copies(plan) -> dict:
    arts = [a for q in plan["quantized"].values() for a in q["artifacts"]]
    return next(a for a in arts if "copies" in a["tensors"])


def _retired_outlier_layout(plan, tensors):
    """The int8-mixed layout saved before 2026-12-07: full-precision outlier columns."""
    art = _int8_mixed_with_copies(plan)
    name = art["tensors"].pop("copies")
    tensors[f"{name}_w_outlier"] = torch.zeros(3, 2)
    art["tensors"]["w_outlier"] = f"{name}_w_outlier"


def _copies_off_by_one(plan, tensors):
    name = _int8_mixed_with_copies(plan)["tensors"]["copies"]
    tensors[name] = tensors[name].clone()
    tensors[name][0] += 1  # one more copy than the weight has columns for


@pytest.mark.parametrize(
    "edit, words",
    [(_retired_outlier_layout, "compile the model again"), (_copies_off_by_one, "expected int8")],
    ids=["retired-layout", "copies-width"],
)
def test_int8_mixed_products_with_other_outlier_columns_raise(saved_files, tmp_path, edit, words):
    _, path, _, _ = saved_files("int8-mixed")
    bad = resigned(path, tmp_path, edit)
    model = build_model(SPEC)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="lowbit.load") as ei:
        qcompile.load(bad, model)
    assert words in str(ei.value)
    assert_unchanged(model, snap)
