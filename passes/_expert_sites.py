"""Mixture-of-Experts products, one ``F.linear`` per expert (``bind``'s first step).

Hugging Face MoE blocks hold each projection of all experts in one 3-D parameter
(``gate_up_proj [E, out, in]``, or ``[E, in, out]`` when the block is "transposed") and
multiply the tokens, sorted by expert, with ``grouped_mm(x, W, offs)`` (transformers'
``grouped_mm_fallback`` custom op, ``F.grouped_mm`` or ``torch._grouped_mm``); ``offs``
is the running count of rows per expert. Each such product becomes, per expert ``e``,

    rows_e = lowbit::expert_rows(x, offs, e)
    y_e = linear(rows_e, W[e])            (``W[e].t()`` for the [E, in, out] layout)
    y = lowbit::expert_concat([y_0, ...], x)

which computes exactly what the grouped product did (rows past ``offs[-1]`` are zero).
The ``W[e]`` nodes carry ``meta[EXPERT] = e`` and ``"lowbit.weight_view"``,
so ``bind`` makes each expert a site named ``<parameter FQN>[e]`` and the pipeline drops
the views once the sites are quantized. The router (the linear whose output decides
``offs``) is found from ``offs``: ``routers``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.graph_utils import EXPERT, WEIGHT_VIEW
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.passes._matmul_sites import target_name

GROUPED_PRODUCTS = ("grouped_mm",)  # grouped_mm_fallback, F.grouped_mm, torch._grouped_mm


def split_grouped_products(gm: fx.GraphModule, params: dict[str, torch.Tensor]) -> list[fx.Node]:
    """Rewrite each grouped product by a 3-D parameter into per-expert linears; return
    the ``offs`` nodes of the products rewritten (the routing decisions)."""
    routing = []
    for node in list(gm.graph.nodes):
        if not _is_grouped(node):
            continue
        args = list(node.args) + [None] * 3
        x, w = args[0], args[1]
        offs = node.kwargs.get("offs", args[2])
        source = _expert_weight(w, params)
        if source is None or not isinstance(offs, fx.Node) or set(node.kwargs) - {"offs"}:
            continue  # left for canonicalize_products to report
        placeholder, transposed = source
        with gm.graph.inserting_before(node):
            parts = []
            for e in range(params[placeholder.name].shape[0]):
                rows = gm.graph.call_function(torch.ops.lowbit.expert_rows.default, (x, offs, e))
                weight = gm.graph.call_function(operator.getitem, (placeholder, e))
                weight.meta[WEIGHT_VIEW] = "expert"
                weight.meta[EXPERT] = e
                if not transposed:  # [E, in, out]: the expert's [out, in] view
                    weight = gm.graph.call_function(torch.t, (weight,))
                    weight.meta[WEIGHT_VIEW] = "t"
                linear = gm.graph.call_function(torch.nn.functional.linear, (rows, weight, None))
                linear.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
                parts.append(linear)
            out = gm.graph.call_function(torch.ops.lowbit.expert_concat.default, (parts, x))
            out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        if w is not placeholder and not w.users:
            gm.graph.erase_node(w)
        routing.append(offs)
    return routing


def routers(routing: list[fx.Node], linear_nodes: set[fx.Node]) -> set[fx.Node]:
    """The linear nodes whose outputs decide the routing: reached going back from an
    ``offs`` node without passing another linear."""
    found, seen, todo = set(), set(), list(routing)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linear_nodes:
            found.add(node)
            continue
        todo.extend(node.all_input_nodes)
    return found


def _is_grouped(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    return any(g in target_name(node).rsplit(".", 1)[-1] for g in GROUPED_PRODUCTS)


def _expert_weight(w, params) -> tuple[fx.Node, bool] | None:
    """``(3-D parameter placeholder, transposed)`` when ``w`` is one or its last two
    dims swapped (each expert's weight is then ``[out, in]``: ``transposed``)."""
    if not isinstance(w, fx.Node):
        return None
    if w.name in params:
        return (w, False) if params[w.name].dim() == 3 else None
    src = w.args[0] if w.args else None
    if not (isinstance(src, fx.Node) and src.name in params and params[src.name].dim() == 3):
        return None
    t, args = w.target, w.args
    swapped = (
        (t is torch.transpose or w.op == "call_method" and t == "transpose")
        and len(args) == 3
        and {args[1] % 3, args[2] % 3} == {1, 2}
    ) or (w.op == "call_function" and t is getattr and args[1:] == ("mT",))
    return (src, True) if swapped else None
