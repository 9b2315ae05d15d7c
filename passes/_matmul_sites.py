"""Matrix products by a model parameter, rewritten to ``F.linear`` (``bind``'s first step).

A product ``x @ W`` whose right operand is a 2-D parameter, directly (stored ``[in, out]``,
GPT-2's ``Conv1D``: ``addmm(b, x, W)``) or transposed (stored ``[out, in]``, Falcon's
``x @ W.T``), in any of ``addmm`` / ``mm`` / ``matmul`` / ``@`` / ``Tensor.matmul``,
becomes ``linear(x, weight, bias)``: ``weight`` is the parameter's placeholder itself
(``[out, in]``) or a ``torch.t`` view of it (``meta[WEIGHT_VIEW]``; the pipeline
drops the view once the site is quantized). A bias that is not a 1-D parameter stays an
add after the linear. The rewrite computes exactly what the product did.

Products that read a parameter in a form not rewritten (the parameter as the left
operand, a 3-D parameter in ``bmm`` / ``grouped_mm`` / ``einsum``) are returned as
``(node name, parameter placeholder, reason)`` for the report.
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch import fx

from qcompile.graph_utils import WEIGHT_VIEW

PRODUCTS_FN = (torch.addmm, torch.mm, torch.matmul, operator.matmul)
PRODUCTS_METHOD = ("matmul", "mm", "__matmul__")
# products lowbit does not rewrite; a parameter reaching one is reported
OTHER_PRODUCTS = ("bmm", "baddbmm", "grouped_mm", "einsum", "addbmm", "_grouped_mm")
# ops through which an operand is still "the parameter" (views, casts)
_VIEW_METHODS = ("transpose", "t", "permute", "view", "reshape", "contiguous", "to", "__getitem__")
_VIEW_FNS = (torch.t, torch.transpose, torch.permute, operator.getitem, builtins.getattr)


def canonicalize_products(gm: fx.GraphModule, params: dict[str, torch.Tensor]) -> list[tuple]:
    """Rewrite every product by a 2-D parameter to ``F.linear``; return the ones left."""
    left: list[tuple] = []
    for node in list(gm.graph.nodes):
        operands = _product_operands(node)
        if operands is None:
            if _is_other_product(node):
                p = next(
                    filter(None, (_reaches_param(a, params) for a in node.all_input_nodes)), None
                )
                if p is not None:
                    left.append(
                        (
                            node.name,
                            p,
                            f"{target_name(node)} with a "
                            f"{params[p.name].dim()}-D parameter operand (not rewritten)",
                        )
                    )
            continue
        bias, x, w, scaled = operands
        source = _param_operand(w, params)
        if source is None:
            p = _reaches_param(w, params)
            if p is not None:
                left.append((node.name, p, "matmul by a slice or view of a parameter"))
            elif _reaches_param(x, params) is not None:
                p = _reaches_param(x, params)
                left.append((node.name, p, "parameter as the left operand of a matmul"))
            continue
        placeholder, transposed = source
        if params[placeholder.name].dim() != 2 or scaled:
            why = "addmm with alpha/beta" if scaled else f"{params[placeholder.name].dim()}-D"
            left.append((node.name, placeholder, f"matmul by a parameter: {why}"))
            continue
        _rewrite(gm, node, x, w, placeholder, transposed, bias, params)
    return left


def _product_operands(node: fx.Node):
    """``(bias, x, w, scaled)`` of a 2-operand product node, else None."""
    if node.op == "call_function" and node.target in PRODUCTS_FN:
        if node.target is torch.addmm:
            if len(node.args) < 3:
                return None
            scaled = any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta"))
            return node.args[0], node.args[1], node.args[2], scaled
        if len(node.args) != 2 or node.kwargs:
            return None
        return None, node.args[0], node.args[1], False
    if node.op == "call_method" and node.target in PRODUCTS_METHOD and len(node.args) == 2:
        return None, node.args[0], node.args[1], False
    return None


def _is_transpose(node: fx.Node) -> bool:
    """A transpose of a 2-D tensor (``W.T``, ``W.t()``, ``transpose(W, 0, 1)``, ...)."""
    t, args = node.target, node.args
    if node.op == "call_function" and t is builtins.getattr:
        return len(args) == 2 and args[1] in ("T", "mT")
    if node.op == "call_function" and t is torch.t or node.op == "call_method" and t == "t":
        return True
    if t is torch.transpose or node.op == "call_method" and t == "transpose":
        return len(args) == 3 and {args[1] % 2, args[2] % 2} == {0, 1}
    if t is torch.permute or node.op == "call_method" and t == "permute":
        dims = args[1] if len(args) == 2 else args[1:]
        return tuple(d % 2 for d in dims) == (1, 0)
    return False


def _param_operand(w, params) -> tuple[fx.Node, bool] | None:
    """``(parameter placeholder, transposed)`` when ``w`` is a parameter or its transpose."""
    if not isinstance(w, fx.Node):
        return None
    if w.name in params:
        return w, False
    if w.op in ("call_function", "call_method") and _is_transpose(w):
        src = w.args[0]
        if isinstance(src, fx.Node) and src.name in params:
            return src, True
    return None


def _reaches_param(node, params, depth: int = 4) -> fx.Node | None:
    """The parameter placeholder ``node`` is a view / slice / cast of, if any."""
    while isinstance(node, fx.Node) and depth >= 0:
        if node.name in params:
            return node
        viewing = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
            node.op == "call_function" and node.target in _VIEW_FNS
        )
        if not viewing or not node.args:
            return None
        node, depth = node.args[0], depth - 1
    return None


def _is_other_product(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and any(
        name in target_name(node).rsplit(".", 1)[-1] for name in OTHER_PRODUCTS
    )


def target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", None) or str(t)


def _rewrite(gm, node, x, w, placeholder, transposed, bias, params) -> None:
    graph = gm.graph
    bias_is_param = (
        isinstance(bias, fx.Node) and bias.name in params and params[bias.name].dim() == 1
    )
    with graph.inserting_before(node):
        if transposed:  # x @ W.T with W [out, in]: the parameter is the linear's weight
            weight = placeholder
        else:  # x @ W with W [in, out]: a view in the linear layout
            weight = graph.call_function(torch.t, (placeholder,))
            weight.meta[WEIGHT_VIEW] = "t"
        linear = graph.call_function(
            torch.nn.functional.linear, (x, weight, bias if bias_is_param else None)
        )
        linear.meta.update(node.meta)
        out = linear
        if bias is not None and not bias_is_param:
            out = graph.call_function(operator.add, (linear, bias))
            out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    if w is not placeholder and isinstance(w, fx.Node) and not w.users:
        graph.erase_node(w)


def drop_dead_weight_views(gm: fx.GraphModule) -> int:
    """Erase the weight views bind added (``torch.t``, an expert's ``W[e]``) whose
    linear was replaced."""
    dead = 0
    for n in reversed(gm.graph.nodes):  # a view's view first
        if WEIGHT_VIEW in n.meta and not n.users:
            gm.graph.erase_node(n)
            dead += 1
    return dead
