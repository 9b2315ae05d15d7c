"""options["free_weights"]: after the first compiled call the fp weights of the replaced
linears are released; the compiled model's outputs do not change (including the
recompile that follows and a new input shape), eager calls of a released layer raise,
and without the option the user's parameters are untouched. For every recipe family,
the DuQuant family's transform plans included; and the stored products
(``qcompile.artifacts``) are reused by a second compile with the same calibration and
recomputed when what they depend on changes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import TinySpec, build_model, eager_logits, input_ids

import qcompile
from qcompile import artifacts
from qcompile.kernels import cpu_packed, cpu_weight_only
from qcompile.lowering import derived
from qcompile.passes import quantize_lowbit as quantize_lowbit_mod
from qcompile.passes import rotate as rotate_mod
from qcompile.passes import smooth as smooth_mod

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "one_thread")

SPEC = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=False)
LINEAR_BYTES = 4 * (4 * 32 * 32 + 3 * 32 * 64 + 64 * 32 - 2 * 16 * 32)  # q,o + k,v + mlp + head


def resident_bytes(model) -> int:
    """Bytes of the unique storages behind the model's parameters and buffers."""
    storages = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def options(recipe: str, calibration, **extra) -> dict:
    opts = {"recipe": recipe, "calibration": calibration, "handoff": "eager", **extra}
    if recipe == "int8-mixed":
        opts["threshold"] = 0.5
    if recipe.endswith("duquant"):
        opts.setdefault("duquant", {"block_size": 16})  # two-stage rotations, P0
    return opts


@pytest.fixture
def model_and_data():
    model = build_model(SPEC)
    calibration = qcompile.calibrate(
        model, [input_ids(SPEC, batch=2, seq=16, seed=2)], sample_rows=32
    )
    return model, calibration, input_ids(SPEC, batch=1, seq=8), input_ids(SPEC, batch=1, seq=5)


def reference_logits(model, opts, *inputs) -> list[torch.Tensor]:
    """What a copy of the model compiled without free_weights returns."""
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    fast = torch.compile(twin, backend="lowbit", options=opts)
    with torch.no_grad():
        return [fast(x).logits for x in inputs]


@pytest.mark.parametrize("recipe", ["int8-mixed", "w4a4-duquant", "w4a4-hadamard"])
def test_outputs_unchanged_memory_released(model_and_data, recipe):
    model, calibration, ids, short = model_and_data
    opts = options(recipe, calibration)  # split + int8 products; transform plans
    ref_long, ref_short = reference_logits(model, opts, ids, short)
    before = resident_bytes(model)

    torch._dynamo.reset()
    fast = torch.compile(model, backend="lowbit", options={**opts, "free_weights": True})
    with torch.no_grad():
        first = fast(ids).logits  # compiles, runs, then releases the fp weights
        after = resident_bytes(model)
        second = fast(ids).logits  # stride guard fails: recompiles on the placeholders
        third = fast(ids).logits
        other_shape = fast(short).logits  # another recompile
    for out in (first, second, third):
        assert torch.equal(out, ref_long)
    assert torch.equal(other_shape, ref_short)
    assert before - after == LINEAR_BYTES - 8 * 4  # 8 linears, each keeps a 4-byte scalar
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert artifacts.is_freed(mod.weight), name
            assert mod.weight.shape == (mod.out_features, mod.in_features)
    assert not artifacts.is_freed(model.model.embed_tokens.weight)
    reports = qcompile.compiled_reports()[-3:]
    assert [r.memory["fp_bytes_replaced"] for r in reports] == [LINEAR_BYTES] * 3
    assert all(r.memory["freed_bytes"] == LINEAR_BYTES for r in reports)
    assert "released" in reports[0].summary()
    assert 0 < reports[0].memory["quantized_bytes"]


def test_deep_copied_model_releases_its_weights(model_and_data):
    # dynamo reaches a deep-copied HF model's parameters through L['args'][0]
    model, calibration, ids, _ = model_and_data
    twin = copy.deepcopy(model)
    before = resident_bytes(twin)
    torch._dynamo.reset()
    opts = options("w4a16-g32", calibration, free_weights=True)
    fast = torch.compile(twin, backend="lowbit", options=opts)
    with torch.no_grad():
        fast(ids)
    assert before - resident_bytes(twin) == LINEAR_BYTES - 8 * 4
    assert all(
        artifacts.is_freed(m.weight) for m in twin.modules() if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.parametrize("recipe", ["w8a8", "w6a6-duquant"])
def test_eager_call_of_a_released_layer_raises(model_and_data, recipe):
    model, calibration, ids, _ = model_and_data
    torch._dynamo.reset()
    fast = torch.compile(
        model, backend="lowbit", options=options(recipe, calibration, free_weights=True)
    )
    with torch.no_grad():
        fast(ids)
        with pytest.raises(RuntimeError, match="lowbit freed") as ei:
            model(ids)  # the user's model, eagerly
        assert "model.layers.0.self_attn.q_proj.weight" in str(ei.value)
        assert "compile without free_weights" in str(ei.value)
        with pytest.raises(RuntimeError, match="lowbit freed"):
            model.model.layers[0].mlp.down_proj(torch.ones(1, 64))
        model.model.embed_tokens(ids)  # not replaced: still works


def test_other_recipe_on_released_weights_raises(model_and_data):
    model, calibration, ids, _ = model_and_data
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(
            model, backend="lowbit", options=options("w8a8", calibration, free_weights=True)
        )(ids)
        for other in ({"recipe": "w4a16-g32"}, {"recipe": "w8a8", "overrides": {"lm_head": "fp"}}):
            torch._dynamo.reset()
            with pytest.raises(Exception, match="was released") as ei:
                torch.compile(model, backend="lowbit", options={"handoff": "eager", **other})(ids)
            inner = getattr(ei.value, "inner_exception", ei.value)  # BackendCompilerFailed
            assert isinstance(inner, ValueError)
        torch._dynamo.reset()  # the same recipe needs no calibration
        torch.compile(model, backend="lowbit", options={"recipe": "w8a8", "handoff": "eager"})(ids)


@pytest.mark.parametrize(("recipe", "table_freed"), [("w8a8", True), ("w6a6-rtn", False)])
def test_tied_embedding_is_freed_only_where_lookups_read_the_codes(recipe, table_freed):
    """w8a8: the embedding looks rows up in lm_head's int8 codes (quantize_embedding), so
    the tied table goes; a low-bit lm_head (W6A6) has no lookup in its codes: kept."""
    spec = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=True)
    model = build_model(spec)
    ids = input_ids(spec, batch=1, seq=8)
    calibration = qcompile.calibrate(model, [ids])
    opts = options(recipe, calibration)
    (ref,) = reference_logits(model, opts, ids)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="lowbit", options={**opts, "free_weights": True})
    with torch.no_grad():
        outs = [fast(ids).logits for _ in range(2)]
    assert all(torch.equal(o, ref) for o in outs)
    assert artifacts.is_freed(model.lm_head.weight) == table_freed
    assert artifacts.is_freed(model.model.layers[0].mlp.up_proj.weight)


def test_without_free_weights_the_model_is_untouched(model_and_data):
    model, calibration, ids, short = model_and_data
    params = {k: (p, p.detach().clone(), p.data_ptr()) for k, p in model.named_parameters()}
    before, ref = resident_bytes(model), eager_logits(model, ids)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="lowbit", options=options("w4a16-g32", calibration))
    with torch.no_grad():
        for x in (ids, ids, short):
            fast(x)
    assert qcompile.compiled_reports()[-1].memory["freed_bytes"] == 0
    assert "free_weights" in qcompile.compiled_reports()[-1].summary()
    assert resident_bytes(model) == before
    for k, p in model.named_parameters():
        obj, value, ptr = params[k]
        assert p is obj and p.data_ptr() == ptr and torch.equal(p, value), k
    assert torch.equal(eager_logits(model, ids), ref)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4-duquant"])
def test_generate_with_free_weights(recipe):
    """prefill and decode graphs: both reuse the products after the release."""
    spec = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=False)
    model = build_model(spec)
    prompt = input_ids(spec, batch=1, seq=6)
    calibration = qcompile.calibrate(model, [input_ids(spec, batch=2, seq=16)], sample_rows=32)
    opts = options(recipe, calibration)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch._dynamo.reset()
        twin.compile(backend="lowbit", options=opts)
        expected = twin.generate(prompt, max_new_tokens=4, do_sample=False)
        torch._dynamo.reset()
        model.compile(backend="lowbit", options={**opts, "free_weights": True})
        tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, expected)
    assert artifacts.is_freed(model.lm_head.weight)


def test_free_weights_must_be_a_bool():
    with pytest.raises(ValueError, match="free_weights"):
        qcompile.Options.parse({"free_weights": "yes"})


# the DuQuant family's stored products ------------------------------------------------


@pytest.fixture
def count_builds(monkeypatch):
    """Calls of what the transform and low-bit passes compute, by name."""
    calls = {"build_plan": 0, "smooth_scales": 0, "search_clip_ratios": 0}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    for mod, name in (
        (rotate_mod, "build_plan"),
        (smooth_mod, "smooth_scales"),
        (quantize_lowbit_mod, "search_clip_ratios"),
    ):
        monkeypatch.setattr(mod, name, counting(name, getattr(mod, name)))

    def take() -> dict:
        out = dict(calls)
        calls.update(dict.fromkeys(calls, 0))
        return out

    return take


def compiled(model, opts, ids) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="lowbit", options=opts)(ids).logits


def test_duquant_products_are_reused_and_recomputed_when_their_inputs_change(
    model_and_data, count_builds
):
    model, calibration, ids, _ = model_and_data
    opts = options("w4a4-duquant", calibration)
    first = compiled(model, opts, ids)
    built = count_builds()
    assert built["build_plan"] == 5 and built["search_clip_ratios"] == 8  # 5 inputs, 8 linears
    assert torch.equal(compiled(model, opts, ids), first)  # same calibration: all reused
    assert count_builds() == dict.fromkeys(built, 0)
    row = qcompile.compiled_reports()[-1].sites[0]
    assert "R1" in row.transforms and row.act_absmax_after < row.act_absmax_before

    compiled(model, {**opts, "duquant": {"block_size": 16, "alpha": 0.6}}, ids)
    assert count_builds()["build_plan"] == 5  # a duquant setting is part of the key
    compiled(model, {**opts, "verify": True}, ids)
    assert count_builds()["build_plan"] == 5  # verify checks the passes: they run
    again = qcompile.calibrate(model, [input_ids(SPEC, batch=2, seq=16, seed=2)], sample_rows=32)
    opts["calibration"] = again
    assert torch.equal(compiled(model, opts, ids), first)
    assert count_builds()["build_plan"] == 5  # another calibration object: rebuilt, same plans

    with torch.no_grad():  # down_proj changes: its input's plan and its producers' products
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    changed = compiled(model, opts, ids)
    assert count_builds() == {"build_plan": 2, "smooth_scales": 2, "search_clip_ratios": 3}
    assert torch.equal(changed, compiled(copy.deepcopy(model), opts, ids))  # as if fresh


def test_duquant_after_free_weights_needs_no_calibration_and_checks_options(
    model_and_data, count_builds
):
    model, calibration, ids, _ = model_and_data
    opts = options("w4a4-duquant", calibration)
    (ref,) = reference_logits(model, opts, ids)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={**opts, "free_weights": True})(ids)
    count_builds()
    assert artifacts.is_freed(model.model.layers[0].self_attn.q_proj.weight)
    no_calibration = {k: v for k, v in opts.items() if k != "calibration"}
    assert torch.equal(compiled(model, no_calibration, ids), ref)
    assert count_builds() == {"build_plan": 0, "smooth_scales": 0, "search_clip_ratios": 0}
    for other in ({"duquant": {"block_size": 8}}, {"recipe": "w4a4-hadamard"}):
        with pytest.raises(Exception, match="was released") as ei:
            compiled(model, {**no_calibration, **other}, ids)
        assert isinstance(getattr(ei.value, "inner_exception", ei.value), ValueError)


@pytest.mark.parametrize("bits,kernels", [(4, "packed"), (2, "packed"), (4, "int4"), (8, "int4")])
def test_weight_only_products_compacted_to_the_cpu_layout_and_still_saved(
    tmp_path, bits, kernels, monkeypatch
):
    """Released weight-only weights keep one copy of their codes and group parameters:
    the packed kernels read the stored codes themselves and fp16 / uint8 copies of the
    scales and zero points (the fp32 ones are dropped and rebuilt exactly when saved);
    oneDNN's int4 layout (where the packed kernels cannot run) replaces the generic
    codes, which are rebuilt when a graph or qcompile.save needs them."""
    if kernels == "int4":
        monkeypatch.setattr(cpu_packed, "prepack", lambda *args: None)
    spec = TinySpec(hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=128, tied=False)
    model = build_model(spec)
    ids = input_ids(spec, batch=1, seq=8)
    calibration = qcompile.calibrate(model, [ids])
    recipe = f"w{bits}a16-g32"
    opts = {"recipe": recipe, "calibration": calibration, "handoff": "eager"}
    (ref,) = reference_logits(model, opts, ids)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="lowbit", options={**opts, "free_weights": True})
    with torch.no_grad():
        outs = [fast(ids).logits for _ in range(2)]  # the second call recompiles
    assert all(torch.equal(o, ref) for o in outs)
    up = model.model.layers[0].mlp.up_proj.weight
    (art,) = artifacts.artifacts_of(up)
    cpu_layout = next(v for k, v in derived.layouts(art).items() if k[0] == "cpu")
    probe = (torch.arange(64 * 64) % 16).to(torch.uint8).reshape(64, 64)
    if kernels == "packed":
        assert set(cpu_layout) == {"packed", "scales16", "zeros8"}
        stored = art.tensors["packed"].untyped_storage().data_ptr()
        assert cpu_layout["packed"].untyped_storage().data_ptr() == stored  # read as stored
        assert derived.is_compacted(art) and set(art.tensors) == {"packed"}
        rebuilt = derived.products(art)
        assert rebuilt["scales"].dtype == torch.float32 and rebuilt["zeros"].dtype == torch.float32
    elif cpu_weight_only._pack_int4_checked(probe)[1]:
        layout = {"w4", "sz"} if bits == 4 else {"w4_hi", "w4_lo", "sz_hi", "sz_lo", "zs"}
        assert derived.is_compacted(art) and "packed" not in art.tensors
        assert set(cpu_layout) == layout
        rebuilt = derived.products(art)["packed"]
        assert rebuilt.dtype == torch.int32 and rebuilt.shape[0] == up.shape[0]
    else:  # this CPU's int4 layout is not the one lowbit reads back (AVX2): codes kept
        layout = {"w4", "sz"} if bits == 4 else {"w4_hi", "w4_lo", "sz_hi", "sz_lo", "zs"}
        assert set(cpu_layout) == layout | {"codes"}
        assert not derived.is_compacted(art) and "packed" in art.tensors

    path = tmp_path / "w4.safetensors"
    qcompile.save(model, path)
    twin = qcompile.load(path, build_model(TinySpec(**{**spec.__dict__, "seed": 5})))
    torch._dynamo.reset()
    with torch.no_grad():
        again = torch.compile(twin, backend="lowbit", options={**opts, "calibration": None})(ids)
    assert torch.equal(again.logits, ref), (again.logits - ref).abs().max()
