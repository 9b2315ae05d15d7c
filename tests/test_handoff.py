"""The inductor hand-off computes what the eager hand-off computes, for every recipe family.

Two checks per recipe on one lowered graph: the whole graph compiled by inductor against
the same graph run eagerly (a tiny model, where float rounding has little depth to
grow through), and every quantized site's kernels alone, fed the same inputs under both
(``helpers.site_kernels_program``), which must agree to float rounding at any depth.
The recipes cover every CPU kernel path: int8 with and without the outlier split,
DuQuant / RTN / Hadamard weight-activation at each width, and weight-only at each bit
width (the group size only changes a constant of the same kernels) and with GPTQ.
"""

from __future__ import annotations

import pytest
import torch
from helpers import lowered_graph, node_values, rel_err, site_kernels_program
from torch._inductor.compile_fx import compile_fx
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile

RECIPE_FAMILIES = [
    "int8-mixed", "w8a8", "fp", "w4a4-duquant", "w6a6-duquant", "w4a8-duquant",
    "w4a4-rtn", "w6a6-rtn", "w4a4-hadamard", "w8a16-g32", "w4a16-g64", "w3a16-g32",
    "w2a16-g64", "w4a16-g32-gptq",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outlier channels in the residual stream: int8-mixed splits
        model.model.layers[0].input_layernorm.weight[[3, 40]] *= 25
    batches = [torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(s))
               for s in range(2)]  # fmt: skip
    cal = qcompile.calibrate(model, batches, hessian=True, sample_rows=32)
    return model, cal, torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(9))


def assert_sites_agree(gm, inputs) -> set[str]:
    """Each site's kernels, eager and under inductor, on the same inputs: float rounding
    only. Returns the names of the constants the compared kernels read (a site whose
    GEMM a fused kernel runs, as gate / up under DuQuant's SwiGLU prologue, is compared
    through that kernel)."""
    program, reads = site_kernels_program(gm)
    values = node_values(gm, inputs, reads)
    with torch.no_grad():
        eager = program(*values)
        compiled = compile_fx(program, values)(*values)
    for node, e, c in zip(program.graph.find_nodes(op="output")[0].args[0], eager, compiled):
        scale = e.abs().max().item() + 1e-30
        assert (e - c).abs().max().item() <= 1e-5 * scale, f"site {node.meta['lowbit.site']}"
    return {n.target for n in program.graph.nodes if n.op == "get_attr"}


@pytest.mark.parametrize("recipe", RECIPE_FAMILIES)
def test_inductor_handoff_matches_eager_handoff_for_every_recipe(tiny, recipe):
    model, cal, ids = tiny
    gm, inputs = lowered_graph(model, ids, {"recipe": recipe, "calibration": cal})
    with torch.no_grad():
        eager = gm(*inputs)
        compiled = compile_fx(gm, inputs)(*inputs)
    logits = [i for i, o in enumerate(eager) if o.shape[-1] == 96 and o.dim() == 3]
    assert len(logits) == 1
    i = logits[0]
    assert rel_err(compiled[i], eager[i]) < 1e-4, recipe
    report = qcompile.compiled_reports()[-1]
    if recipe == "int8-mixed":
        assert any(r.outlier_channels for r in report.sites), "nothing was split"
    if recipe != "fp":
        constants = assert_sites_agree(gm, inputs)
        for row in report.quantized:  # every quantized site's constants were compared
            prefix = "lowbit_" + row.fqn.replace(".", "_") + "_"
            assert any(c.startswith(prefix) for c in constants), row.fqn


@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_cache_serves_another_models_graph_with_its_own_weights():
    """lowbit's kernel functions are marked cacheable (AOTAutograd's cache: a second process
    skips re-tracing, issue 18): a second model with the same graph but other weights is
    served from the cache and still computes with its own weights."""
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 96, (1, 12))
    opts = {"recipe": "w8a8"}  # int8 kernels in Python functions; no data-dependent split
    hits = counters["aot_autograd"]["autograd_cache_hit"]
    for seed in (5, 6):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(cfg).eval()
        cal = qcompile.calibrate(model, [ids])
        out = {}
        for handoff in ("inductor", "eager"):
            torch._dynamo.reset()
            options = {**opts, "calibration": cal, "handoff": handoff}
            with torch.no_grad():
                out[handoff] = torch.compile(model, backend="lowbit", options=options)(ids).logits
        torch.testing.assert_close(out["inductor"], out["eager"], rtol=1e-4, atol=1e-4)
    assert counters["aot_autograd"]["autograd_cache_hit"] > hits
