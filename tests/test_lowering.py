"""Lowering: the same quantized graph on the cpu and triton targets, and generation."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile


def tiny_llama(seed=0, layers=1, hidden=40, tied=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=72,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def lowered_ops(report_index=-1):
    return qcompile.compiled_reports()[report_index]


@pytest.mark.usefixtures("fresh_dynamo")
def test_triton_target_matches_cpu_target_under_interpreter():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        cal = qcompile.calibrate(model, [ids])
        outs = {}
        for target in ("cpu", "triton"):
            torch._dynamo.reset()
            opts = {"calibration": cal, "target": target, "handoff": "eager", "threshold": 0.3}
            outs[target] = torch.compile(model, backend="lowbit", options=opts)(ids).logits
            report = qcompile.compiled_reports()[-1]
            assert report.target == target
            # one int8_linear per site, one quantize_rows per input (q/k/v and gate/up
            # share theirs): inputs of q/k/v, o_proj, gate/up, down_proj, lm_head
            assert report.pass_rewrites["lower"] == len(report.quantized) + 5
            assert len(report.quantized) == 8
            assert any(r.outlier_channels for r in report.sites)
    # integer GEMMs are exact on both targets; only the float epilogue's rounding may differ
    torch.testing.assert_close(outs["triton"], outs["cpu"], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_generate_matches_eager_and_compiles_prefill_and_decode():
    model = tiny_llama(seed=1, layers=2)
    prompt = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
        cal = qcompile.calibrate(model, [torch.randint(0, 96, (1, 32))])
        earlier = {id(r) for r in qcompile.compiled_reports()}  # the list keeps the last 256
        model.compile(backend="lowbit", options={"calibration": cal, "handoff": "eager"})
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    reports = [r for r in qcompile.compiled_reports() if id(r) not in earlier]
    assert len(reports) >= 2, "expected a prefill graph and at least one decode graph"
    assert all(len(r.quantized) == 2 * 7 + 1 for r in reports)
    assert torch.equal(out, ref)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("recipe", ["w8a8", "int8-mixed", "w4a4-duquant", "w4a16-g32", "w8a16-g32"])
def test_one_token_decode_under_inductor_matches_eager_handoff(recipe):
    """A one-token decode step (M = 1) compiled by inductor equals the same lowered graph
    run eagerly. Regression: inductor gives a one-row operand a row stride of 0, for
    which oneDNN's ``_int_mm`` returned uninitialised memory (garbage logits)."""
    from transformers import DynamicCache

    model = tiny_llama(seed=3, layers=1, hidden=64)
    prompt = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        cal = qcompile.calibrate(model, [torch.randint(0, 96, (2, 24))], sample_rows=32)
        logits = {}
        for handoff in ("eager", "inductor"):
            torch._dynamo.reset()
            options = {"recipe": recipe, "calibration": cal, "handoff": handoff}
            if recipe.endswith("-g32"):  # intermediate size 72: no group of 32 divides it
                options["overrides"] = {"*.down_proj": "fp"}
            fast = torch.compile(model, backend="lowbit", options=options)
            cache = DynamicCache(config=model.config)
            model(prompt[:, :-1], past_key_values=cache, use_cache=True)
            logits[handoff] = fast(prompt[:, -1:], past_key_values=cache, use_cache=True).logits
    assert logits["eager"].shape == (1, 1, 96)
    torch.testing.assert_close(logits["inductor"], logits["eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("fresh_dynamo")
def test_recompile_limit_is_reported_loudly(caplog):
    model = tiny_llama(seed=2)
    compiled = torch.compile(model, backend="lowbit", options={"handoff": "eager"}, dynamic=False)
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        warnings.catch_warnings(record=True) as caught,
        torch.no_grad(),
    ):
        warnings.simplefilter("always")
        caplog.set_level(logging.ERROR, logger="qcompile")
        compiled(torch.randint(0, 96, (1, 8)))
        compiled(torch.randint(0, 96, (1, 9)))  # new static shape: over the limit
    loud = [w for w in caught if issubclass(w.category, qcompile.LowbitRecompileWarning)]
    assert loud and "ORIGINAL full-precision weights" in str(loud[0].message)
    assert any("recompile limit" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("fresh_dynamo")
def test_one_copy_gets_more_graphs_than_dynamos_default_limit():
    """generate() plus perplexity compile about ten graphs per copy: under dynamo's default
    limit (8) lowbit allows GRAPHS_PER_COPY (16), so the eleventh shape still runs quantized."""
    from qcompile.backend import _DYNAMO_DEFAULT_LIMIT, GRAPHS_PER_COPY

    model = tiny_llama(seed=3)
    ids = torch.randint(0, 96, (1, 16))
    options = {
        "recipe": "w8a8",
        "handoff": "eager",
        "calibration": qcompile.calibrate(model, [ids]),
    }
    fast = torch.compile(model, backend="lowbit", options=options, dynamic=False)
    with (
        torch._dynamo.config.patch(recompile_limit=_DYNAMO_DEFAULT_LIMIT),  # as users have it
        warnings.catch_warnings(record=True) as caught,
        torch.no_grad(),
    ):
        warnings.simplefilter("always")
        for n in range(16, 16 - 11, -1):
            fp, q = model(ids[:, :n]).logits, fast(ids[:, :n]).logits
            assert 0 < (q - fp).abs().max() < 0.5  # quantized, not the fp model
        assert torch._dynamo.config.recompile_limit >= GRAPHS_PER_COPY
    assert not [w for w in caught if issubclass(w.category, qcompile.LowbitRecompileWarning)]


@pytest.mark.usefixtures("fresh_dynamo")
def test_several_model_copies_in_one_process_all_run_quantized():
    """Each copy gets its own graphs (identity guards); three shapes x five copies pass
    dynamo's per-function limit (8), which lowbit raises per live copy."""
    ids = torch.randint(0, 96, (1, 12))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for seed in range(5):
            model = tiny_llama(seed=seed)
            calibration = qcompile.calibrate(model, [ids])
            options = {"recipe": "w8a8", "handoff": "eager", "calibration": calibration}
            fast = torch.compile(model, backend="lowbit", options=options)
            for n in (12, 7, 5):
                fp, q = model(ids[:, :n]).logits, fast(ids[:, :n]).logits
                assert 0 < (q - fp).abs().max() < 0.5  # quantized, not the fp model
    assert not [w for w in caught if issubclass(w.category, qcompile.LowbitRecompileWarning)]


@pytest.mark.usefixtures("fresh_dynamo")
def test_cpu_weight_only_prepack_is_shared_by_every_graph_of_a_weight():
    """Prefill and decode graphs (here: two static shapes) hold one prepacked copy: the
    stored packed codes themselves, and one fp16 copy of the scales."""
    from qcompile.backend import lowbit_backend

    model = tiny_llama(hidden=64)
    calibration = qcompile.calibrate(model, [torch.randint(0, 96, (1, 16))])
    graphs = []

    def backend(gm, example_inputs):
        overrides = {"*.down_proj": "fp", "lm_head": "w4a16-g32"}  # down: in_features 72
        opts = {"recipe": "w4a16-g32", "calibration": calibration, "overrides": overrides}
        opts["handoff"] = "eager"
        compiled = lowbit_backend(gm, example_inputs, options=opts)
        graphs.append(gm)
        return compiled

    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        fast(torch.randint(0, 96, (1, 7)))
        fast(torch.randint(0, 96, (1, 3)))

    def prepacked(gm):
        return sorted(
            b.untyped_storage().data_ptr()
            for name, b in gm.named_buffers()
            if "_cpu_packed" in name or "_cpu_scales16" in name
        )

    assert len(graphs) == 2
    first, second = prepacked(graphs[0]), prepacked(graphs[1])
    assert len(set(first)) == 2 * 7  # q, k, v, o, gate, up, lm_head
    assert first == second


@pytest.mark.parametrize("k,block,lead", [(70, 32, (2, 3)), (64, 64, (5,)), (96, 32, (1, 1))])
def test_block_rotate_cpu_lowering_matches_reference(k, block, lead):
    """The CPU kernel of ``lowbit::block_rotate`` (channels-major, transposed blocks)
    computes the same ``X @ R1 @ P @ R2`` as the reference, eagerly (float64) and under
    inductor (float32: the per-token 4-bit codes agree; bf16 operands: within one code)."""
    from qcompile.kernels import lowbit_act
    from qcompile.transforms import random_orthogonal

    g = torch.Generator().manual_seed(k)
    sizes = [min(block, k - i) for i in range(0, k, block)]
    r1 = torch.block_diag(*[random_orthogonal(b, seed=i) for i, b in enumerate(sizes)])
    r2 = torch.block_diag(*[random_orthogonal(b, seed=9 + i) for i, b in enumerate(sizes)])
    b1, t1 = lowbit_act.split_blocks(r1, block)
    b2, t2 = lowbit_act.split_blocks(r2, block)
    perm = torch.randperm(k, generator=g)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)

    def cpu_args(b1, t1, perm=None, b2=None, t2=None, dtype=torch.float64):
        m1, mt1, m2, mt2 = lowbit_act.prepare_block_rotate_cpu(b1, t1, b2, t2, dtype)
        return m1, mt1, perm, m2, mt2

    for args in ((b1, t1), (b1, t1, perm), (b1, t1, perm, b2, t2), (None, r1, perm)):
        out = lowbit_act.block_rotate_cpu(x, *cpu_args(*args))
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, lowbit_act.block_rotate(x, *args), rtol=0, atol=1e-12)

    def rotate_quantize(fn, x, *args):
        return lowbit_act.quantize_rows_bits(fn(x, *args), 4)

    x32 = (x * 3).float()
    q_ref, s_ref = rotate_quantize(lowbit_act.block_rotate, x32.double(), b1, t1, perm, b2, t2)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        args = (*cpu_args(b1, t1, perm, b2, t2, dtype=dtype), dtype)
        torch._dynamo.reset()
        q, s = torch.compile(rotate_quantize)(lowbit_act.block_rotate_cpu, x32, *args)
        torch._dynamo.reset()
        torch.testing.assert_close(s, s_ref.float(), rtol=tol, atol=0)
        assert (q.int() - q_ref.int()).abs().max() <= 1
        assert (q != q_ref).float().mean() < (0.01 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("k", [1, 24])
def test_int8_linear_channels_major_equals_int8_linear(k):
    """The channels-major int8 linear is the same function (a transposed view)."""
    from qcompile.kernels import cpu_int8

    g = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (2, 5, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (7, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(2, 5, 1, generator=g), torch.rand(7, generator=g)
    bias, addend = torch.randn(7, generator=g), torch.randn(2, 5, 7, generator=g)
    for b, a in ((None, None), (bias, addend)):
        expect = cpu_int8.int8_linear(q, xs, w, ws, b, a, torch.float32)
        out = cpu_int8.int8_linear_channels_major(q, xs, w, ws, b, a, torch.float32)
        assert out.shape == expect.shape == (2, 5, 7)
        torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
