"""qcompile.qat: the trainable fake quantizer and prepare_qat.

The forward equals the packed kernels' reference quantizer at initialisation; the
gradients equal the STE / LSQ formulas written out element by element (hypothesis over
shapes, bit widths and group sizes); training the quantization parameters lowers a
layer's output error below its round-to-nearest start.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM

from qcompile.kernels.weight_only_reference import dequantize_groupwise, quantize_groupwise
from qcompile.qat import GroupwiseFakeQuant, fake_quantize, prepare_qat

shapes = st.tuples(
    st.integers(1, 6),  # rows
    st.integers(1, 4),  # groups
    st.sampled_from([4, 8, 16]),  # group size
    st.sampled_from([2, 3, 4, 8]),  # bits
    st.integers(0, 2**16),  # seed
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_initial_fake_quant_weight_is_the_rtn_weight(shape):
    n, groups, g, bits, seed = shape
    w = torch.randn(n, groups * g, generator=torch.Generator().manual_seed(seed)).double()
    fq = GroupwiseFakeQuant(w, bits, g)
    q, s, z = quantize_groupwise(w, bits, g, scale_dtype=torch.float64)
    assert torch.equal(fq(w), dequantize_groupwise(q, s, z, g, dtype=torch.float64))


def lsq_reference(w, scale, zero, bits, g, grad_out):
    """dL/dw, dL/ds, dL/dz of the quantizer written out per element (float64)."""
    qmax = 2**bits - 1
    s = scale.repeat_interleave(g, dim=1)
    z = torch.clamp(torch.round(zero), 0, qmax).repeat_interleave(g, dim=1)
    pre = torch.round(w / s) + z
    inside = (pre >= 0) & (pre <= qmax)
    q = torch.clamp(pre, 0, qmax)
    dw = torch.where(inside, grad_out, 0.0)
    ds_elem = torch.where(inside, (q - z) - w / s, q - z) * grad_out
    # round(z) is straight-through but clamped: d/dz of (q - z) * s is -s where the code
    # is clipped (q is constant) and 0 inside (q moves with z), for z inside [0, qmax]
    z_inside = ((torch.round(zero) >= 0) & (torch.round(zero) <= qmax)).repeat_interleave(g, 1)
    dz_elem = torch.where(inside | ~z_inside, 0.0, -s) * grad_out
    n = w.shape[0]
    return dw, ds_elem.view(n, -1, g).sum(-1), dz_elem.view(n, -1, g).sum(-1)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_gradients_are_ste_and_lsq(shape):
    n, groups, g, bits, seed = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * g, generator=gen, dtype=torch.float64)
    fq = GroupwiseFakeQuant(w, bits, g)
    with torch.no_grad():  # move off the RTN fit: some codes clip, zero points move
        fq.scale.mul_(0.6 + 0.8 * torch.rand(fq.scale.shape, generator=gen, dtype=torch.float64))
        fq.zero.add_(torch.randn(fq.zero.shape, generator=gen, dtype=torch.float64))
    w = w.requires_grad_()
    grad_out = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    fake_quantize(w, fq.scale, fq.zero, bits, g).backward(grad_out)
    dw, ds, dz = lsq_reference(w.detach(), fq.scale.detach(), fq.zero.detach(), bits, g, grad_out)
    torch.testing.assert_close(w.grad, dw)
    torch.testing.assert_close(fq.scale.grad, ds)
    torch.testing.assert_close(fq.zero.grad, dz)


def test_training_the_quantizer_lowers_the_output_error_below_rtn():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64) * torch.linspace(0.2, 3.0, 64)  # uneven channels, as in LLMs
    target = layer(x).detach()
    plan = prepare_qat(layer, "w2a16-g32")
    assert plan.prepared == [""]

    def mse():
        return torch.nn.functional.mse_loss(layer(x), target)

    start = mse().item()
    fq = layer.parametrizations.weight[0]
    opt = torch.optim.Adam(  # EfficientQAT's split: small steps for weights, larger for s, z
        [
            {"params": [layer.parametrizations.weight.original], "lr": 1e-5},
            {"params": [fq.scale, fq.zero], "lr": 1e-3},
        ]
    )
    for _ in range(200):
        opt.zero_grad()
        loss = mse()
        loss.backward()
        opt.step()
    assert mse().item() < 0.92 * start  # 0.86 measured


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_prepare_qat_on_a_causal_lm_trains_every_untied_linear():
    model = tiny_llama()
    plan = prepare_qat(model, "w4a16-g32")
    assert len(plan.prepared) == 2 * 7
    assert plan.left_in_fp == {"lm_head": "its weight is shared with another module (tied)"}
    assert "tied" in str(plan)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert parametrize.is_parametrized(q_proj, "weight")
    ids = torch.randint(0, 128, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    fq = q_proj.parametrizations.weight[0]
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    assert q_proj.parametrizations.weight.original.grad is not None
    trainable = {id(p) for p in model.parameters()}
    assert id(fq.scale) in trainable and id(fq.zero) in trainable


def test_prepare_qat_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="weight-only"):
        prepare_qat(tiny_llama(), "w8a8")
    with pytest.raises(ValueError, match="in_features divisible by 128.*skip="):
        prepare_qat(tiny_llama(), "w4a16-g128")
    plan = prepare_qat(tiny_llama(), "w4a16-g64", skip={"model.layers.0.mlp.down_proj"})
    assert plan.left_in_fp["model.layers.0.mlp.down_proj"] == "skipped by the caller"
