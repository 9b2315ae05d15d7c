"""quantize_embedding: a tied embedding looks its rows up in the quantized lm_head weight.

Precondition: ``quantize_weights`` and ``quantize_weight_only`` ran. When the weight of
a weight-only or int8 site is also the table of an ``F.embedding`` call in the graph
(tied input and output embeddings: Llama's ``embed_tokens`` / ``lm_head``), the lookup
is rewritten to read the site's constants:

    embedding(ids, W)  ->  lowbit.dequant_embedding(ids, packed, scales, zeros, bits, G, dtype)
                           lowbit.int8_embedding(ids, W_q, w_scale, K, dtype)   (int8 sites)

so one quantized copy of the tied weight serves both uses and the graph no longer
reads the full-precision table (``free_weights`` can then release it: without this
the tied fp32 table alone is a fifth of SmolLM2-135M). A tied parameter is one
weight: quantizing it quantizes both of its uses, and the report says so
(``Report.embeddings``); ``overrides={"lm_head": "fp"}`` keeps both in full precision.
Numerical contract: each looked-up row equals the corresponding row of the
dequantized weight (``weight_only_reference.dequantize_groupwise``; int8:
``W_q * w_scale`` over the K input columns, without ``int8-mixed``'s outlier copies)
in the table's dtype. An embedding call with ``max_norm`` (it renormalizes the table
in place) is left alone. An embedding whose table was already released but that this
graph cannot rewrite raises instead of reading the placeholder.
Returns the number of lookups rewritten.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import PassContext
from qcompile.graph_utils import QUANTIZED_TABLES
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.recipes import INT8, INT8_MIXED, WEIGHT_ONLY

EMBEDDING_TARGETS = (torch.nn.functional.embedding,)


def quantize_embedding(gm: fx.GraphModule, ctx: PassContext) -> int:
    quantized = {}  # weight placeholder name -> (its site, the lookup's op and constants)
    for site in ctx.sites_of(WEIGHT_ONLY, INT8, INT8_MIXED):
        lookup = _table_lookup(site)
        if lookup is not None:
            quantized[_weight_placeholder(ctx, site)] = (site, *lookup)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in EMBEDDING_TARGETS:
            continue
        ids, table = node.args[0], node.args[1]
        site, op, constants, args = quantized.get(getattr(table, "name", None), (None,) * 4)
        if site is None:
            _check_not_released(table, node)
            continue
        if _arg(node, 3, "max_norm") is not None:
            ctx.unsupported.append((node.name, "embedding with max_norm reads the fp table"))
            continue
        top = next(n for n in gm.graph.nodes if n.op != "placeholder")
        for const in constants:  # defined next to lm_head: hoist to the top
            if const is not top:
                top.prepend(const)
        out = node.meta.get("example_value")
        dtype = out.dtype if out is not None else site.weight.dtype
        with gm.graph.inserting_before(node):
            lookup = gm.graph.call_function(op, (ids, *constants, *args, dtype))
        lookup.meta.update(node.meta)
        node.replace_all_uses_with(lookup)
        gm.graph.erase_node(node)
        tables = gm.meta.setdefault(QUANTIZED_TABLES, set())
        tables.add(id(table.meta["grapharg"].example))
        ctx.embeddings.append(
            f"{ctx.param_fqns[table.name]} lookups read {site.fqn}'s {site.scheme} codes (tied)"
        )
        rewrites += 1
    gm.recompile()
    return rewrites


def _table_lookup(site) -> tuple | None:
    """``(op, constant nodes, other args)`` of a lookup in ``site``'s quantized weight;
    None where its node keeps no whole table (a weight-only site in another form)."""
    node = site.node
    if node.target is torch.ops.lowbit.dequant_linear.default:
        _, packed, scales, zeros, _, bits, group = node.args
        return torch.ops.lowbit.dequant_embedding.default, (packed, scales, zeros), (bits, group)
    if node.target is torch.ops.lowbit.int8_linear.default:
        w_q, w_scale = node.args[2], node.args[3]
    elif node.target is torch.ops.lowbit.int8_mixed_linear_dynamic.default:
        w_q, w_scale = node.args[1], node.args[2]
    else:
        return None
    return torch.ops.lowbit.int8_embedding.default, (w_q, w_scale), (site.in_features,)


def _weight_placeholder(ctx: PassContext, site) -> str | None:
    return next((name for name, fqn in ctx.param_fqns.items() if fqn == site.param_fqn), None)


def _arg(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _check_not_released(table, node: fx.Node) -> None:
    grapharg = getattr(table, "meta", {}).get("grapharg")
    param = getattr(grapharg, "example", None)
    if isinstance(param, torch.Tensor) and artifacts.is_freed(param):
        raise RuntimeError(
            f"lowbit: the embedding table read by {node.name} was released (free_weights or "
            "qcompile.load) but this graph does not quantize the linear it is tied to, so it "
            "cannot look rows up in the quantized copy; compile the embedding and its tied "
            "lm_head in one graph, or load the full-precision weights again"
        )
