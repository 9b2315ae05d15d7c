"""Training mode: Block-AP, E2E-QP and their conversion to lowbit's inference products.

On a tiny random Llama: Block-AP lowers every block's output error below its RTN and its
GPTQ start; E2E-QP lowers the causal-LM loss while training only step sizes over frozen
packed codes; the trained model compiles (no calibration) to what it computes eagerly,
the report names the method, save / load and free_weights keep the outputs; the frozen
linear's gradients match a float64 reference; compiled with the lowbit backend, both
phases train with the eager gradients; bad input and divergence are errors that leave the
model as it was.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile
from qcompile import artifacts
from qcompile.blocks import find_blocks
from qcompile.e2e_qp import FrozenCodesLinear, causal_lm_loss
from qcompile.kernels.packing import pack, unpack
from qcompile.kernels.weight_only_reference import dequantize_groupwise, on_fp16_grid
from qcompile.qat import is_quantizer_parameter, prepare_qat
from qcompile.qat_convert import commit_linear, copy_trained, snap_scales, trained_artifact

RECIPE = "w2a16-g32"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def batches(n: int = 6, seq: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (1, seq), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama after Block-AP and E2E-QP, and its results."""
    model, data = tiny_llama(), batches()
    bap = qcompile.block_ap(model, data, RECIPE, epochs=4, progress=False)
    with torch.no_grad():
        loss_before = sum(float(causal_lm_loss(model, b)) for b in data)
    e2e = qcompile.e2e_qp(model, data, epochs=4, lr=1e-3, progress=False)
    with torch.no_grad():
        loss_after = sum(float(causal_lm_loss(model, b)) for b in data)
    return model, data, bap, (loss_before, loss_after, e2e)


def test_blocks_are_found_generically():
    name, blocks = find_blocks(tiny_llama())
    assert name == "model.layers" and len(blocks) == 2
    with pytest.raises(ValueError, match="no repeated blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_block_ap_lowers_every_block_error_below_its_start(init):
    result = qcompile.block_ap(tiny_llama(), batches(), RECIPE, init=init, epochs=4, progress=False)
    assert [b.name for b in result.blocks] == ["model.layers.0", "model.layers.1"]
    for b in result.blocks:
        assert b.mse_final < b.mse_init, str(result)
    assert result.left_in_fp == {"lm_head": "outside the repeated blocks (model.layers)"}


def test_e2e_qp_lowers_the_loss_training_only_step_sizes(trained):
    model, _, _, (before, after, e2e) = trained
    assert after < before, e2e
    assert e2e.steps == 4 * 6


def test_prepare_e2e_qp_trains_step_sizes_over_frozen_codes():
    model, data = tiny_llama(), batches()
    qcompile.block_ap(model, data, RECIPE, epochs=1, progress=False)
    linear = model.model.layers[0].mlp.up_proj
    scales = qcompile.prepare_e2e_qp(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(s) for s in scales} and len(scales) == 14
    assert isinstance(model.model.layers[0].mlp.up_proj, FrozenCodesLinear)
    assert artifacts.is_freed(linear.weight)  # the fp weight is not held while training
    causal_lm_loss(model, data[0]).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)
    assert qcompile.finish_e2e_qp(model) == 14
    assert model.model.layers[0].mlp.up_proj is linear and not artifacts.is_freed(linear.weight)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("handoff", ["eager", "inductor"])
def test_trained_model_compiles_to_what_it_computes(trained, handoff):
    model, data, _, _ = trained
    with torch.no_grad():
        eager = model(data[0]).logits
        opts = {"recipe": RECIPE, "overrides": {"lm_head": "fp"}, "handoff": handoff}
        out = torch.compile(model, backend="lowbit", options=opts)(data[0]).logits
    torch._dynamo.reset()
    # the CPU kernels round activations and step sizes to bf16 (kernels/cpu_weight_only.py)
    assert torch.allclose(out, eager, atol=2e-2, rtol=2e-2), (out - eager).abs().max()
    methods = {r.method for r in qcompile.compiled_reports()[-1].sites if r.fp_reason is None}
    assert methods == {"block-ap+e2e-qp"}


def test_trained_model_saves_loads_and_releases_weights(trained, tmp_path):
    model, data, _, _ = trained
    opts = {"recipe": RECIPE, "overrides": {"lm_head": "fp"}, "handoff": "eager"}
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options=opts)
        expected = compiled(data[1]).logits
        qcompile.save(compiled, tmp_path / "m.lowbit")
        with torch.device("meta"):
            fresh = LlamaForCausalLM(model.config)
        qcompile.load(tmp_path / "m.lowbit", fresh)
        loaded = torch.compile(fresh.eval(), backend="lowbit", options=opts)(data[1]).logits
        freeing = copy_trained(model)
        fast = torch.compile(freeing, backend="lowbit", options={**opts, "free_weights": True})
        first, second = fast(data[1]).logits, fast(data[1]).logits
    torch._dynamo.reset()
    assert torch.equal(loaded, expected)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert artifacts.is_freed(freeing.model.layers[0].mlp.up_proj.weight)


grad_cases = st.tuples(
    st.integers(1, 5),  # rows of x
    st.integers(1, 6),  # output features
    st.integers(1, 3),  # groups
    st.sampled_from([4, 8]),  # group size
    st.sampled_from([2, 3, 4, 8]),  # bits
    st.integers(0, 2**16),
)


@settings(max_examples=25, deadline=None)
@given(grad_cases)
def test_frozen_codes_linear_gradients_match_a_float64_reference(case):
    m, n, groups, g, bits, seed = case
    gen = torch.Generator().manual_seed(seed)
    k = groups * g
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    z = torch.randint(0, 2**bits, (n, groups), generator=gen).float()
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    s = (torch.rand(n, groups, generator=gen) + 0.1).requires_grad_()
    b = torch.randn(n, generator=gen, requires_grad=True)
    dy = torch.randn(m, n, generator=gen)
    y = torch.ops.lowbit.dequant_linear(x, pack(q, bits), s, z, b, bits, g)
    got = torch.autograd.grad(y, (x, s, b), dy)
    x64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, s, b))
    w = (q.double() - z.double().repeat_interleave(g, 1)) * s64.repeat_interleave(g, 1)
    want = torch.autograd.grad(x64 @ w.T + b64, (x64, s64, b64), dy.double())
    # float32 rounding is relative to the summed terms' magnitudes, not to the sum (8-bit
    # codes minus zero points cancel): the same gradients of every term's absolute value
    xa, sa, ba = (t.detach().double().abs().requires_grad_() for t in (x, s, b))
    wa = (q.double() - z.double().repeat_interleave(g, 1)).abs() * sa.repeat_interleave(g, 1)
    bound = torch.autograd.grad(xa @ wa.T + ba, (xa, sa, ba), dy.double().abs())
    for a, r, c in zip(got, want, bound, strict=True):
        assert ((a.double() - r).abs() <= 1e-5 * c + 1e-7).all()


def test_bad_arguments_say_what_to_change():
    model, data = tiny_llama(), batches(2)
    with pytest.raises(ValueError, match="at least one batch"):
        qcompile.block_ap(model, [], RECIPE)
    with pytest.raises(ValueError, match="init='gptq'"):
        qcompile.block_ap(model, data, "w2a16-g32-gptq")
    with pytest.raises(ValueError, match="weight-only"):
        qcompile.block_ap(model, data, "w8a8")
    with pytest.raises(ValueError, match="epochs"):
        qcompile.block_ap(model, data, RECIPE, epochs=0)
    with pytest.raises(ValueError, match="lr_qparams"):
        qcompile.block_ap(model, data, RECIPE, lr_qparams=0.0)
    with pytest.raises(ValueError, match="divisible by 128"):
        qcompile.block_ap(model, data, "w2a16-g128", progress=False)
    with pytest.raises(ValueError, match="block_ap"):
        qcompile.prepare_e2e_qp(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_divergence_names_block_and_step_and_restores_the_block():
    model, data = tiny_llama(), batches(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # NaN in training forwards of block 1 only (targets and errors are computed without grad)
    up = model.model.layers[1].mlp.up_proj
    up.register_forward_hook(
        lambda m, a, out: out * float("nan") if torch.is_grad_enabled() else out
    )
    with pytest.raises(qcompile.TrainingDivergedError, match="model.layers.1 is nan at step 1"):
        qcompile.block_ap(model, data, RECIPE, progress=False)
    # block 0 was committed before block 1 failed; block 1 is as it was
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".layers.1." in k)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"],
                           after["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_non_finite_inputs_are_named_before_any_training():
    model, data = tiny_llama(), batches(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan = model.model.embed_tokens.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(qcompile.TrainingDivergedError, match="an input of model.layers.0 is nan"):
        qcompile.block_ap(model, data, RECIPE, progress=False)
    nan.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_committed_products_are_exactly_the_trained_weights(trained):
    """What the kernels read (packed codes, step sizes, zero points) dequantizes to the
    weight the trained model computes with, bit for bit; and committing a fake-quantized
    block changes none of its outputs."""
    model, data, _, _ = trained
    checked = 0
    for _, mod in model.named_modules():
        art = trained_artifact(mod)
        if art is None:
            continue
        t = art.tensors
        q = unpack(t["packed"], art.meta["bits"], mod.in_features)
        w = dequantize_groupwise(q, t["scales"], t["zeros"], art.meta["group_size"])
        assert torch.equal(w, mod.weight.detach())
        # on the grid the CPU kernels hold exactly: fp16 scales (where fp16's normal
        # range reaches: this training drives a few below it), integer zero points
        assert torch.equal(on_fp16_grid(t["scales"]), t["scales"])
        assert torch.equal(t["zeros"].round(), t["zeros"])
        checked += 1
    assert checked == 14

    block = tiny_llama().model.layers[0]
    prepare_qat(block, RECIPE)
    x = torch.randn(1, 5, 64)
    pos = tuple(t[:, :5] for t in tiny_llama().model.rotary_emb(x, torch.arange(5)[None]))
    with torch.no_grad():
        for m in block.modules():  # trained step sizes fall between fp16's values
            if parametrize.is_parametrized(m, "weight"):
                m.parametrizations.weight[0].scale.mul_(1.0 + 2.0**-13)
        snap_scales(block)
        before = block(x, position_embeddings=pos)
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                commit_linear(m, name, RECIPE, "block-ap")
        after = block(x, position_embeddings=pos)
    assert torch.equal(before, after)


@pytest.mark.parametrize("handoff", ["eager", "inductor"])
@pytest.mark.parametrize("phase", ["block-ap", "e2e-qp"])
def test_training_through_the_backend_gives_the_eager_gradients(phase, handoff):
    """Compiled with backend="lowbit", a model whose quantizers train is a training graph:
    forward and backward (inductor: generated kernels) give the eager gradients."""
    model, ids = tiny_llama(), batches(1, seq=16)[0]
    if phase == "block-ap":  # fake-quantized weights, trainable step sizes and zero points
        qcompile.prepare_qat(model, RECIPE)
        trained = [p for p in model.parameters() if is_quantizer_parameter(p)]
    else:  # frozen packed codes, trainable step sizes
        qcompile.block_ap(model, batches(), RECIPE, epochs=1, progress=False)
        trained = qcompile.prepare_e2e_qp(model)
    causal_lm_loss(model, ids).backward()
    expected = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowbit", options={"handoff": handoff})
    causal_lm_loss(compiled, ids).backward()
    torch._dynamo.reset()
    assert len(trained) in (14, 28)
    for p, want in zip(trained, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_block_ap_streams_a_meta_model_from_its_checkpoint(tmp_path):
    """Built without weights, the model reads each block from the safetensors checkpoint
    when it is trained and releases it after: the same products as in memory."""
    from accelerate import init_empty_weights

    source, data = tiny_llama(), batches()
    source.save_pretrained(tmp_path)
    qcompile.block_ap(source, data, RECIPE, epochs=1, progress=False)
    with init_empty_weights():
        model = LlamaForCausalLM(source.config)
    with pytest.raises(ValueError, match="checkpoint="):
        qcompile.block_ap(model, data, RECIPE)
    qcompile.block_ap(model.eval(), data, RECIPE, epochs=1, checkpoint=tmp_path, progress=False)
    pairs = zip(source.named_modules(), model.named_modules())
    linears = [(a, b) for (_, a), (_, b) in pairs if isinstance(a, torch.nn.Linear)]
    for a, b in linears[:-1]:  # the blocks' linears (lm_head is outside them)
        assert artifacts.is_freed(b.weight)
        want, got = trained_artifact(a).tensors, trained_artifact(b).tensors
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, read once
    with torch.no_grad():
        opts = {"recipe": RECIPE, "handoff": "eager"}
        want = torch.compile(source, backend="lowbit", options=opts)(data[0]).logits
        got = torch.compile(model, backend="lowbit", options=opts)(data[0]).logits
    torch._dynamo.reset()
    assert torch.equal(got, want)
