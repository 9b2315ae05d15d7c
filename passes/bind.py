"""bind: name what the graph computes with.

Precondition: a dynamo FX graph whose parameters are lifted to placeholders
(``node.meta["grapharg"]`` holds the source and the real tensor).
Postcondition (analysis only; the one edit is canonicalizing every linear call to
positional ``(input, weight, bias)`` arguments, which does not change what it computes):
  * ``ctx.param_fqns`` maps every parameter placeholder to its FQN (a tied
    weight has one placeholder and one FQN);
  * ``ctx.sites`` lists every ``F.linear`` call; a site whose weight is not a
    bound floating-point parameter is recorded with a ``skip_reason``;
  * a site whose weight is also an embedding table (tied lm_head) takes
    ``recipes.tied_embedding_recipe`` of the model-wide recipe unless an override
    names it (weight-only below 8 bits: 8 bits), noted in ``ctx.embeddings``;
  * each linear node carries ``meta["lowbit.site"]`` = the site FQN (the weight
    as the calling module names it: ``lm_head.weight`` even when tied);
  * ``ctx.dataflow`` is a networkx DiGraph over node names (edges producer ->
    user) with node attributes ``op``, ``target`` and, for sites, ``site``.
Returns the number of linear sites found.
"""

from __future__ import annotations

import fnmatch

import networkx as nx
import torch
from torch import fx

from qcompile.context import LinearSite, PassContext, fqn_from_source, module_fqn_from_stack
from qcompile.recipes import tied_embedding_recipe

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


def bind(gm: fx.GraphModule, ctx: PassContext) -> int:
    ctx.param_fqns = {}
    tensors: dict[str, torch.Tensor] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        if grapharg is None or not isinstance(grapharg.example, torch.nn.Parameter):
            continue
        fqn = fqn_from_source(grapharg.source.name)
        if fqn is not None:
            ctx.param_fqns[node.name] = fqn
            tensors[node.name] = grapharg.example

    ctx.sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, weight_node, bias_node = _linear_args(node)
        node.args, node.kwargs = (x, weight_node, bias_node), {}  # canonical positional form
        param_fqn = ctx.param_fqns.get(getattr(weight_node, "name", None))
        if param_fqn is None:
            ctx.unsupported.append((node.name, "weight is not a model parameter"))
            continue
        fqn = _site_fqn(node, param_fqn)
        bias = tensors.get(bias_node.name) if isinstance(bias_node, fx.Node) else None
        site = LinearSite(
            node=node,
            fqn=fqn,
            param_fqn=param_fqn,
            weight=tensors[weight_node.name],
            bias=bias,
            scheme=scheme_for(fqn, ctx.options),
        )
        tied = tied_embedding_recipe(ctx.options.recipe)
        if tied and site.scheme == ctx.options.recipe and _feeds_embedding(weight_node):
            if not _overridden(fqn, ctx.options):
                site.scheme = tied
                ctx.embeddings.append(
                    f"{fqn} is tied to an embedding: {tied} (the {ctx.options.recipe!r} rule "
                    f"for tied weights; an override naming {site.module_fqn!r} changes it)"
                )
        if bias_node is not None and bias is None:
            site.skip_reason = "bias is computed, not a parameter"
        elif not site.weight.is_floating_point() or site.weight.dim() != 2:
            site.skip_reason = f"weight is {site.weight.dtype} with {site.weight.dim()} dims"
        node.meta["lowbit.site"] = fqn
        ctx.sites.append(site)

    ctx.dataflow = dataflow_graph(gm, ctx)
    return len(ctx.sites)


def _linear_args(node: fx.Node):
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def _site_fqn(node: fx.Node, param_fqn: str) -> str:
    """The weight FQN as the calling ``nn.Linear`` names it, else the placeholder's FQN."""
    mod = module_fqn_from_stack(node)
    if mod is not None:
        path, cls = mod
        if isinstance(cls, type) and issubclass(cls, torch.nn.Linear) and path:
            return f"{path}.weight"
    return param_fqn


def _feeds_embedding(weight_node) -> bool:
    return any(
        u.op == "call_function" and u.target is torch.nn.functional.embedding
        for u in getattr(weight_node, "users", ())
    )


def _overridden(fqn: str, options) -> bool:
    module = fqn.rsplit(".", 1)[0]
    return any(
        fnmatch.fnmatchcase(fqn, p) or fnmatch.fnmatchcase(module, p) for p in options.overrides
    )


def scheme_for(fqn: str, options) -> str:
    """The recipe for a site: the last matching override (glob on weight or module FQN)."""
    module = fqn.rsplit(".", 1)[0]
    scheme = options.recipe
    for pattern, recipe in options.overrides.items():
        if fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(module, pattern):
            scheme = recipe
    return scheme


def dataflow_graph(gm: fx.GraphModule, ctx: PassContext) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        attrs = {"op": node.op, "target": str(node.target)}
        if node.name in ctx.param_fqns:
            attrs["param"] = ctx.param_fqns[node.name]
        if "lowbit.site" in node.meta:
            attrs["site"] = node.meta["lowbit.site"]
        g.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g
