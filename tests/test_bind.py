"""bind: placeholders -> parameter FQNs, linear sites, dataflow graph.

The FQN mapping must agree with ``model.named_parameters(remove_duplicate=False)``
on real dynamo graphs of random tiny Llama models. ``node.meta["grapharg"]`` is
cleared once the backend returns, so every check runs inside a wrapper backend.
"""

import copy

import pytest
import torch
from helpers import TinySpec, build_model, input_ids, run_with_backend, tiny_specs
from hypothesis import given, settings
from torch import fx

from qcompile import Options
from qcompile.context import PassContext
from qcompile.passes.bind import bind

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def bind_backend(options=None, checks=None):
    """A dynamo backend that runs ``bind`` and hands ``(gm, ctx, examples)`` to ``checks``.

    ``examples`` maps each placeholder name to ``grapharg.example`` (the real tensor).
    """
    seen = {}

    def backend(gm: fx.GraphModule, example_inputs):
        ctx = PassContext(Options.parse(options or {}), graph_index=0)
        n = bind(gm, ctx)
        examples = {
            node.name: node.meta["grapharg"].example
            for node in gm.graph.find_nodes(op="placeholder")
        }
        assert n == len(ctx.sites)
        if checks is not None:
            checks(gm, ctx, examples)
        seen.setdefault("ctx", []).append(ctx)
        return gm.forward

    return backend, seen


def check_bind_matches_model(model):
    named = dict(model.named_parameters(remove_duplicate=False))
    linears = {
        name: mod
        for name, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, torch.nn.Linear)
    }

    def checks(gm, ctx, examples):
        # every bound placeholder names a parameter, and it is that very tensor
        assert ctx.param_fqns, "no parameter placeholder was bound"
        for ph, fqn in ctx.param_fqns.items():
            assert fqn in named, f"{ph} bound to {fqn!r}, not a parameter name"
            assert named[fqn] is examples[ph], f"{ph} -> {fqn} is a different tensor"
        # every parameter placeholder is bound
        param_phs = {k for k, v in examples.items() if isinstance(v, torch.nn.Parameter)}
        assert set(ctx.param_fqns) == param_phs
        # the bound objects are exactly the model's parameters (tied ones once)
        bound = {id(examples[ph]) for ph in ctx.param_fqns}
        assert bound == {id(p) for p in model.parameters()}
        assert len(ctx.param_fqns) == len(list(model.parameters()))

        # one site per nn.Linear, named as the module names its weight
        assert ctx.unsupported == []
        by_fqn = {s.fqn: s for s in ctx.sites}
        assert len(by_fqn) == len(ctx.sites)
        assert set(by_fqn) == {f"{name}.weight" for name in linears}
        for name, mod in linears.items():
            site = by_fqn[f"{name}.weight"]
            assert site.skip_reason is None
            assert site.weight is mod.weight
            assert named[site.param_fqn] is mod.weight
            assert site.node.meta["lowbit.site"] == site.fqn
            if mod.bias is None:
                assert site.bias is None
            else:
                assert site.bias is mod.bias, f"bias of {name} not bound"
            assert (site.in_features, site.out_features) == (mod.in_features, mod.out_features)
            assert site.module_fqn == name

        # dataflow: producer of the input -> site node, weight placeholder -> site node
        g = ctx.dataflow
        assert set(g.nodes) == {n.name for n in gm.graph.nodes}
        for site in ctx.sites:
            x, w = site.node.args[0], site.node.args[1]
            assert g.has_edge(x.name, site.node.name), site.fqn
            assert g.has_edge(w.name, site.node.name), site.fqn
            assert g.nodes[site.node.name]["site"] == site.fqn
            assert g.nodes[w.name]["param"] == site.param_fqn
        for node in gm.graph.nodes:
            for user in node.users:
                assert g.has_edge(node.name, user.name)

    return checks


@settings(max_examples=8, deadline=None)
@given(spec=tiny_specs())
def test_fqns_equal_named_parameters(spec):
    model = build_model(spec)
    backend, seen = bind_backend(checks=check_bind_matches_model(model))
    run_with_backend(model, input_ids(spec, batch=1, seq=5), backend)
    assert len(seen["ctx"]) == 1


def test_deep_copied_model_binds_every_parameter():
    # dynamo names a deep-copied HF model's parameters from L['args'][0], not L['self']
    spec = TinySpec(tied=False)
    model = copy.deepcopy(build_model(spec))
    backend, seen = bind_backend(checks=check_bind_matches_model(model))
    run_with_backend(model, input_ids(spec), backend)
    (ctx,) = seen["ctx"]
    assert not ctx.unsupported
    assert {s.fqn for s in ctx.sites} == {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_site_named_lm_head_even_when_tied(tied):
    spec = TinySpec(tied=tied, attention_bias=True)
    model = build_model(spec)
    backend, seen = bind_backend(checks=check_bind_matches_model(model))
    run_with_backend(model, input_ids(spec), backend)
    (ctx,) = seen["ctx"]
    head = next(s for s in ctx.sites if s.fqn == "lm_head.weight")
    assert head.param_fqn == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert head.weight is model.lm_head.weight


def test_overrides_pick_the_scheme():
    spec = TinySpec(layers=2, tied=True)
    model = build_model(spec)
    overrides = {"lm_head": "fp", "model.layers.0.*": "fp"}
    backend, seen = bind_backend({"overrides": overrides})
    run_with_backend(model, input_ids(spec), backend)
    (ctx,) = seen["ctx"]
    schemes = {s.fqn: s.scheme for s in ctx.sites}
    assert schemes["lm_head.weight"] == "fp"
    for fqn, scheme in schemes.items():
        expected = "fp" if fqn == "lm_head.weight" or fqn.startswith("model.layers.0.") else None
        assert scheme == (expected or "int8-mixed"), fqn
    assert sum(s == "fp" for s in schemes.values()) == 1 + 7


def test_overrides_last_match_wins_and_globs_weight_names():
    spec = TinySpec(layers=2)
    model = build_model(spec)
    overrides = {
        "model.layers.*": "w8a8",
        "model.layers.1.mlp.*": "fp",
        "*.q_proj.weight": "fp",
    }
    backend, seen = bind_backend({"recipe": "int8-mixed", "overrides": overrides})
    run_with_backend(model, input_ids(spec), backend)
    (ctx,) = seen["ctx"]
    schemes = {s.fqn: s.scheme for s in ctx.sites}
    assert schemes["lm_head.weight"] == "int8-mixed"
    assert schemes["model.layers.0.mlp.up_proj.weight"] == "w8a8"
    assert schemes["model.layers.1.mlp.up_proj.weight"] == "fp"
    assert schemes["model.layers.0.self_attn.q_proj.weight"] == "fp"
    assert schemes["model.layers.1.self_attn.k_proj.weight"] == "w8a8"


class Wrapper(torch.nn.Module):
    """The Llama model one level down: FQNs gain a ``inner.`` prefix."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


def test_nested_model_fqns():
    spec = TinySpec(tied=True, mlp_bias=True)
    model = Wrapper(build_model(spec)).eval()
    backend, seen = bind_backend(checks=check_bind_matches_model(model))
    run_with_backend(model, input_ids(spec), backend)
    (ctx,) = seen["ctx"]
    assert "inner.lm_head.weight" in {s.fqn for s in ctx.sites}


class Renamed(torch.nn.Module):
    """A module whose forward does not call its receiver ``self``."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)
        self.out = torch.nn.Linear(8, 4, bias=False)

    def forward(this, x):  # noqa: N805
        return this.out(torch.relu(this.proj(x)))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: torch.nn.Sequential(
                torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)
            ),
            id="sequential",
        ),
        pytest.param(Renamed, id="forward-receiver-not-named-self"),
    ],
)
def test_plain_modules_bind_every_linear(make):
    """bind must not depend on how dynamo names the root module's frame local.

    For an ``nn.Sequential`` dynamo's sources read ``L['fn']._modules['0']...``
    and for ``def forward(this, x)`` they read ``L['this']...``; both are the
    root module, and every linear must still be bound.
    """
    torch.manual_seed(0)
    model = make().eval()

    def checks(gm, ctx, examples):
        check_bind_matches_model(model)(gm, ctx, examples)

    backend, seen = bind_backend(checks=checks)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randn(3, 16))
    assert seen["ctx"]
