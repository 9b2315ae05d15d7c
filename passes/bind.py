"""bind: name what the graph computes with.

Precondition: a dynamo FX graph whose parameters are lifted to placeholders
(``node.meta["grapharg"]`` holds the source and the real tensor).
Postcondition (analysis only; the one edit is canonicalizing every linear call to
positional ``(input, weight, bias)`` arguments, which does not change what it computes):
  * ``ctx.param_fqns`` maps every parameter placeholder to its FQN (a tied
    weight has one placeholder and one FQN);
  * every matrix product by a 2-D parameter (``addmm`` / ``mm`` / ``matmul`` / ``@``,
    the parameter ``[in, out]`` or transposed) is an ``F.linear`` call
    (``passes/_matmul_sites.py``), and every MoE ``grouped_mm`` by a 3-D expert tensor is
    one ``F.linear`` per expert (``passes/_expert_sites.py``; the site ``<FQN>[e]``,
    ``site.expert``); products by a parameter in other forms are in
    ``ctx.unsupported`` and ``ctx.unread_params``;
  * a linear whose output decides an MoE routing (the router) gets a ``skip_reason``
    unless an override names it;
  * ``ctx.sites`` lists every ``F.linear`` call; a site whose weight is not a
    bound floating-point parameter is recorded with a ``skip_reason``; ``site.weight``
    is ``[out, in]`` (a transposed view of a parameter stored ``[in, out]``:
    ``site.layout``);
  * a site whose weight is also an embedding table (tied lm_head) takes
    ``recipes.tied_embedding_recipe`` of the model-wide recipe unless an override
    names it (weight-only below 8 bits: 8 bits), noted in ``ctx.embeddings``;
  * each linear node carries ``meta[SITE]`` = the site FQN (the weight
    as the calling module names it: ``lm_head.weight`` even when tied);
  * ``ctx.dataflow`` is a networkx DiGraph over node names (edges producer ->
    user) with node attributes ``op``, ``target`` and, for sites, ``site``.
Returns the number of linear sites found.
"""

from __future__ import annotations

import difflib
import fnmatch
import re

import networkx as nx
import torch
from torch import fx

from qcompile.context import (
    LinearSite,
    PassContext,
    fqn_from_source,
    frame_is_resume,
    frame_root,
    module_fqn_from_stack,
)
from qcompile.graph_utils import EXPERT, SITE, WEIGHT_VIEW
from qcompile.matmul_modules import IN_OUT, OUT_IN
from qcompile.passes._expert_sites import routers, split_grouped_products
from qcompile.passes._matmul_sites import canonicalize_products
from qcompile.recipes import tied_embedding_recipe

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
ROUTER_REASON = "MoE router (full precision unless an override names it)"


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

    ctx.param_tensors = list(tensors.values())
    first_param = next(
        (n for n in gm.graph.find_nodes(op="placeholder") if n.name in tensors), None
    )
    check_overrides(ctx.options, first_param)
    # MoE grouped products by 3-D expert tensors -> one F.linear per expert
    routing = split_grouped_products(gm, tensors)
    # addmm / mm / matmul / @ by a parameter (GPT-2 Conv1D, Falcon's x @ W.T) -> F.linear
    for name, placeholder, reason in canonicalize_products(gm, tensors):
        fqn = ctx.param_fqns[placeholder.name]
        ctx.unsupported.append((f"{fqn} ({name})", reason))
        ctx.unread_params.append((tensors[placeholder.name], fqn, reason))

    ctx.sites = []
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]
    router_nodes = routers(routing, set(linears))
    for node in linears:
        x, weight_node, bias_node = _linear_args(node)
        node.args, node.kwargs = (x, weight_node, bias_node), {}  # canonical positional form
        # the views bind added: torch.t(parameter [in, out]), an expert's W[e] (and its .t())
        views = []
        while isinstance(weight_node, fx.Node) and WEIGHT_VIEW in weight_node.meta:
            views.append(weight_node)
            weight_node = weight_node.args[0]
        expert = next((v.meta[EXPERT] for v in views if EXPERT in v.meta), None)
        transposed = any(v.meta[WEIGHT_VIEW] == "t" for v in views)
        param_fqn = ctx.param_fqns.get(getattr(weight_node, "name", None))
        if param_fqn is None:
            ctx.unsupported.append((node.name, "weight is not a model parameter"))
            continue
        if expert is None:
            fqn = _site_fqn(node, param_fqn)
        else:  # each expert's statistics and products are its own
            fqn = param_fqn = f"{param_fqn}[{expert}]"
        bias = tensors.get(bias_node.name) if isinstance(bias_node, fx.Node) else None
        param = tensors[weight_node.name]
        with torch.no_grad():
            weight = param[expert] if expert is not None else param
            weight = weight.t() if transposed else weight
        site = LinearSite(
            node=node,
            fqn=fqn,
            param_fqn=param_fqn,
            weight=weight,
            bias=bias,
            scheme=scheme_for(fqn, ctx.options),
            param=param,
            layout=IN_OUT if transposed else OUT_IN,
            expert=expert,
        )
        tied = tied_embedding_recipe(ctx.options.recipe)
        if tied and site.scheme == ctx.options.recipe and _feeds_embedding(weight_node):
            if not _overridden(fqn, ctx.options):
                site.scheme = tied
                ctx.embeddings.append(
                    f"{fqn} is tied to an embedding: {tied} (the {ctx.options.recipe!r} rule "
                    f"for tied weights; an override naming {site.module_fqn!r} changes it)"
                )
        if node in router_nodes and not _overridden(fqn, ctx.options):
            site.skip_reason = ROUTER_REASON
        elif bias_node is not None and bias is None:
            site.skip_reason = "bias is computed, not a parameter"
        elif not site.weight.is_floating_point() or site.weight.dim() != 2:
            site.skip_reason = f"weight is {site.weight.dtype} with {site.weight.dim()} dims"
        node.meta[SITE] = fqn
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


def check_overrides(options, first_placeholder) -> None:
    """Every override glob names a weight or module of the model (the frame's root
    module), else a ``ValueError`` with the closest names: a typo must not silently keep
    a model quantized that the user meant in full precision, or the reverse. Not checked
    when the root is unknown or the frame resumes after a graph break."""
    if not options.overrides or frame_is_resume():
        return
    grapharg = first_placeholder.meta.get("grapharg") if first_placeholder is not None else None
    source = getattr(getattr(grapharg, "source", None), "name", None)
    root = frame_root(source if source and source.startswith("L[") else None)
    if root is None:
        return
    names = [n for n, _ in root.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    for pattern in options.overrides:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            continue
        close = difflib.get_close_matches(pattern, _glob_forms(names), n=3, cutoff=0.5)
        raise ValueError(
            f"lowbit: the override {pattern!r} matches no weight or module of "
            f"{type(root).__name__}; "
            + (f"closest names: {', '.join(close)}" if close else f"e.g. {', '.join(names[:3])}")
            + " (globs match full names: use '*' for the rest, e.g. '*.mlp.*')"
        )


def _glob_forms(names: list[str]) -> list[str]:
    """What an override might have meant: each name with its layer indices as ``*``
    (``model.layers.*.mlp``), and every dotted suffix of those as ``*.suffix`` and
    ``*.suffix.*``."""
    forms = {re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names}
    for name in list(forms):
        parts = name.split(".")
        for i in range(1, len(parts)):
            forms.update({"*." + ".".join(parts[i:]), "*." + ".".join(parts[i:]) + ".*"})
    return sorted(forms)


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
        if SITE in node.meta:
            attrs["site"] = node.meta[SITE]
        g.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g
