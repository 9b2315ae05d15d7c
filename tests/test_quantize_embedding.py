"""quantize_embedding: a tied embedding reads the quantized lm_head weight.

The lookup returns rows of the very weight lm_head multiplies with (dequantized),
the graph stops reading the fp table, and free_weights then releases it (eager
calls of the embedding raise). An untied embedding is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinySpec, build_model, input_ids

import qcompile
from qcompile import artifacts
from qcompile.kernels.packing import pack, unpack
from qcompile.kernels.weight_only_reference import (
    dequant_embedding,
    dequantize_groupwise,
    quantize_groupwise,
)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SPEC = TinySpec(hidden=64, heads=4, kv_heads=2, intermediate=64, vocab=96, tied=True)
# lm_head (and so the tied table) is the only quantized weight, at the recipe's 4 bits
ONLY_HEAD = {"model.*": "fp", "lm_head": "w4a16-g32"}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_lookup_equals_rows_of_the_dequantized_table(bits):
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(bits))
    q, s, z = quantize_groupwise(w, bits, 32)
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 2]])
    rows = dequant_embedding(ids, pack(q, bits), s, z, bits, 32, torch.float32)
    table = dequantize_groupwise(unpack(pack(q, bits), bits, 64), s, z, 32, dtype=torch.float32)
    assert torch.equal(rows, table[ids])


def dequantized_twin(model, bits=4, group=32):
    """The model with its tied weight replaced by the dequantized RTN weight."""
    twin = copy.deepcopy(model)
    w = twin.lm_head.weight
    q, s, z = quantize_groupwise(w.detach(), bits, group)
    with torch.no_grad():
        w.copy_(dequantize_groupwise(q, s, z, group, dtype=w.dtype))
    return twin


def compile_head_only(model, calibration, **extra):
    opts = {"recipe": "w4a16-g32", "overrides": ONLY_HEAD, "calibration": calibration,
            "handoff": "eager", **extra}  # fmt: skip
    return torch.compile(model, backend="lowbit", options=opts)


def test_tied_lookup_reads_the_quantized_weight():
    model = build_model(SPEC)
    ids = input_ids(SPEC, batch=2, seq=9)
    calibration = qcompile.calibrate(model, [ids])
    with torch.no_grad():
        got = compile_head_only(model, calibration)(ids).logits
        want = dequantized_twin(model)(ids).logits
        fp = model(ids).logits
    report = qcompile.compiled_reports()[-1]
    assert report.embeddings == [
        "model.embed_tokens.weight lookups read lm_head.weight's w4a16-g32 codes (tied)"
    ]  # the override names lm_head: no 8-bit rule
    assert "embedding: model.embed_tokens.weight lookups read" in report.summary()
    # the CPU lm_head runs bf16 activations: compare at that precision
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale
    assert (got - fp).abs().max() > 10 * (got - want).abs().max()  # it is really quantized


def test_free_weights_releases_the_tied_table():
    model = build_model(SPEC)
    ids = input_ids(SPEC, batch=1, seq=8)
    calibration = qcompile.calibrate(model, [ids])
    with torch.no_grad():
        ref = compile_head_only(copy.deepcopy(model), calibration)(ids).logits
        torch._dynamo.reset()
        fast = compile_head_only(model, calibration, free_weights=True)
        first = fast(ids).logits
        second = fast(ids).logits  # recompiles onto the released placeholders
    assert artifacts.is_freed(model.model.embed_tokens.weight)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    with pytest.raises(RuntimeError, match="lowbit freed"):
        model.model.embed_tokens(ids)


def test_untied_embedding_is_left_alone():
    spec = TinySpec(hidden=64, heads=4, kv_heads=2, intermediate=64, vocab=96, tied=False)
    model = build_model(spec)
    ids = input_ids(spec, batch=1, seq=6)
    calibration = qcompile.calibrate(model, [ids])
    with torch.no_grad():
        compile_head_only(model, calibration)(ids)
    report = qcompile.compiled_reports()[-1]
    assert report.embeddings == []
    assert report.pass_rewrites.get("quantize_embedding") == 0


@pytest.mark.parametrize(
    ("recipe", "overrides", "head"),
    [
        ("w4a16-g32", {}, "w8a16-g32"),
        ("w3a16-g32-gptq", {}, "w8a16-g32-gptq"),
        ("w4a16-g32", {"lm_head": "w4a16-g32"}, "w4a16-g32"),
        ("w8a16-g32", {}, "w8a16-g32"),
        ("w8a8", {}, "w8a8"),
    ],
)
def test_tied_weight_rule_keeps_a_low_bit_lm_head_at_8_bits(recipe, overrides, head):
    model = build_model(SPEC)
    ids = input_ids(SPEC, batch=1, seq=6)
    calibration = qcompile.calibrate(model, [ids], hessian=True)
    opts = {"recipe": recipe, "overrides": overrides, "calibration": calibration}
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={**opts, "handoff": "eager"})(ids)
    report = qcompile.compiled_reports()[-1]
    row = next(r for r in report.sites if r.fqn == "lm_head.weight")
    assert row.scheme == head
    assert all(r.scheme == recipe for r in report.sites if r.fqn != "lm_head.weight")
    noted = any("is tied to an embedding" in line for line in report.embeddings)
    assert noted == (head != recipe)


def test_reference_int8_lookup_equals_rows_of_the_dequantized_weight():
    from qcompile.kernels.reference import (
        int8_embedding,
        outlier_expansion,
        quantize_weight_per_channel,
    )

    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    w_q, w_scale = quantize_weight_per_channel(w)
    copies = torch.ones(64)
    copies[[3, 40]] = torch.tensor([3.0, 2.0])
    src, _ = outlier_expansion(copies)
    expanded = w_q.index_select(1, src)  # int8-mixed's codes: K + 3 columns
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 2]])
    table = w_q.double() * w_scale.double()[:, None]
    for codes in (w_q, expanded):
        rows = int8_embedding(ids, codes, w_scale, 64, torch.float32)
        assert torch.equal(rows, table.float()[ids])


@pytest.mark.parametrize("recipe", ["w8a8", "int8-mixed"])
@pytest.mark.parametrize("handoff", ["eager", "inductor"])
def test_tied_int8_lookup_reads_the_codes_and_frees_the_table(recipe, handoff):
    """A tied lm_head at an int8 recipe: the embedding reads its codes. The logits equal
    those of an untied twin whose table holds the dequantized rows, and free_weights
    releases the table."""
    model = build_model(SPEC)
    ids = input_ids(SPEC, batch=2, seq=9)
    calibration = qcompile.calibrate(model, [ids])
    twin = copy.deepcopy(model)
    twin.model.embed_tokens.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    # a low ratio gives lm_head outlier columns, so int8-mixed's codes carry copies
    opts = {"recipe": recipe, "overrides": {"model.*": "fp"}, "calibration": calibration,
            "handoff": handoff, "outlier_ratio": 1.5}  # fmt: skip
    with torch.no_grad():
        torch.compile(twin, backend="lowbit", options=opts)(ids)  # quantizes twin's lm_head
        w_q, w_scale = lm_head_codes(twin)
        twin.model.embed_tokens.weight.copy_(w_q[:, :64].double() * w_scale.double()[:, None])
        torch._dynamo.reset()
        want = torch.compile(twin, backend="lowbit", options=opts)(ids).logits
        torch._dynamo.reset()
        fast = torch.compile(model, backend="lowbit", options={**opts, "free_weights": True})
        got = fast(ids).logits
        report = qcompile.compiled_reports()[-1]
        again = fast(ids).logits
    assert report.embeddings == [
        f"model.embed_tokens.weight lookups read lm_head.weight's {recipe} codes (tied)"
    ]
    if recipe == "int8-mixed":
        assert w_q.shape[1] > 64  # the lookup skips the outlier copies
    assert torch.equal(got, want) and torch.equal(again, want)
    assert artifacts.is_freed(model.model.embed_tokens.weight)


def lm_head_codes(model):
    """The int8 codes and scales stored for ``model.lm_head.weight``."""
    from qcompile.products import Int8Site

    (art,) = [a for a in artifacts.artifacts_of(model.lm_head.weight) if a.kind == "site"]
    stored = Int8Site.from_tensors(art.tensors)
    return stored.w_q, stored.w_scale
