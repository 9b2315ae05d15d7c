"""Memory: ``free_weights`` closes the checkpoint mapping a ``from_pretrained`` model reads
from, ``memory_report`` counts every storage once under its first owner, and the chunked
quantization and packing give exactly what whole-matrix work gives."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import TinySpec, build_model, input_ids
from transformers import LlamaForCausalLM

import qcompile
from qcompile import memory
from qcompile.kernels import packing
from qcompile.kernels import weight_only_reference as ref

SPEC = TinySpec(hidden=32, heads=4, kv_heads=2, intermediate=64, vocab=64, tied=True)
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="file mappings are read from /proc/self/maps"
)


def mapped(path) -> bool:
    return any(p == str(path) for _, _, p in memory.file_mapped_ranges())


@linux_only
@pytest.mark.usefixtures("fresh_dynamo")
def test_free_weights_closes_the_checkpoint_mapping(tmp_path):
    build_model(SPEC).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    checkpoint = (tmp_path / "model.safetensors").resolve()
    norm_before = model.model.norm.weight.detach().clone()
    ranges = [r for r in memory.file_mapped_ranges() if r[2] == str(checkpoint)]
    assert any(memory.in_ranges(p, ranges) for p in model.parameters()), (
        "precondition: transformers maps the checkpoint's weights"
    )
    fast = torch.compile(
        model,
        backend="lowbit",
        options={"recipe": "w8a16-g32", "free_weights": True, "handoff": "eager"},
    )
    ids = input_ids(SPEC)
    with torch.no_grad():
        first = fast(ids).logits
        assert not mapped(checkpoint)  # released weights and copied norms: nothing reads it
        second = fast(ids).logits
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert torch.equal(model.model.norm.weight, norm_before)
    report = qcompile.memory_report(model)
    assert report.rows[memory.OWNERS[1]] == (0, 0)
    assert report.rows[memory.OWNERS[2]][0] > 0  # the stored products


@pytest.mark.usefixtures("fresh_dynamo")
def test_memory_report_counts_each_storage_once():
    model = build_model(SPEC)
    fast = torch.compile(
        model, backend="lowbit", options={"recipe": "w4a16-g32", "handoff": "eager"}
    )
    with torch.no_grad():
        fast(input_ids(SPEC))
    alias = model.lm_head.weight[:4]  # noqa: F841  (a view of a parameter: the model's)
    report = qcompile.memory_report(model, baseline=0)
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
              for p in [*model.parameters(), *model.buffers()]}  # fmt: skip
    own = report.rows[memory.OWNERS[0]][0] + report.rows[memory.OWNERS[1]][0]
    assert own == sum(params.values())
    assert report.rows[memory.OWNERS[2]][0] > 0
    assert report.counted == sum(b for b, _ in report.rows.values())
    if report.rss_above_baseline is not None:
        assert report.remainder == report.rss_above_baseline - report.counted
        assert "remainder" in report.summary()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_chunked_quantization_and_packing_are_exact(monkeypatch, bits):
    w = torch.randn(37, 128) * torch.rand(37, 1) * 3
    whole = ref.quantize_groupwise(w, bits, 32)
    packed_whole = packing.pack(whole[0], bits)
    monkeypatch.setattr(ref, "ROW_CHUNK_ELEMENTS", 5 * 128)  # 5 rows a chunk: 37 = 7 x 5 + 2
    monkeypatch.setattr(packing, "_CHUNK_ELEMS", 3 * 128)
    chunked = ref.quantize_groupwise(w, bits, 32)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    assert torch.equal(packing.pack(chunked[0], bits), packed_whole)
    assert torch.equal(packing.unpack(packed_whole, bits, 128), whole[0])
