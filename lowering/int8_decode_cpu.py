"""int8_decode_cpu: the int8 recipes' linears at decode become one CPU call each.

Invariant: a ``lowbit::int8_linear`` whose rows are known at trace time to be at most
``cpu_int8_gemv.GEMV_MAX_M`` (a decode step), whose codes come from a
``lowbit::quantize_rows`` (without inlier mask) or ``lowbit::quantize_rows_copies`` of
``x``, becomes ``cpu_int8_gemv.int8_linear_gemv`` on ``x``: the same codes, integer sums
and float epilogue; the linears of one input and copies (q/k/v, gate/up) become one
``int8_linear_gemv_group`` call, each output the same bit for bit. An addend is added
after the call, in float32, as the epilogue adds it. Quantization nodes left unread are
erased.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.graph_utils import add_constant
from qcompile.kernels import cpu_int8_gemv

from .low_bit_sites import erase_unread
from .siblings import grouped_call

_FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16)


def lower_int8_decode_cpu(gm: fx.GraphModule) -> int:
    """Rewrite the decode-sized int8 linears of ``gm``; returns how many (0 where the
    kernel cannot be built here: the int8 GEMM path stays)."""
    graph = gm.graph
    sites = [n for n in graph.nodes if _is_decode_int8_linear(gm, n)]
    if not sites or not cpu_int8_gemv.available():
        return 0
    by_input = {}  # (x, copies) -> the linears quantizing x with those copies, graph order
    for node in sites:
        quantize = node.args[0].args[0]
        plain = quantize.target is torch.ops.lowbit.quantize_rows.default
        key = (quantize.args[0], None if plain else quantize.args[1])
        by_input.setdefault(key, []).append(node)
    quantizations = [node.args[0].args[0] for node in sites]
    for (x, copies), nodes in by_input.items():
        _lower_group(gm, x, copies, nodes)
    erase_unread(gm, list(dict.fromkeys(u for q in quantizations for u in q.users)))
    erase_unread(gm, list(dict.fromkeys(quantizations)))
    gm.recompile()
    return len(sites)


def _lower_group(gm: fx.GraphModule, x: fx.Node, copies, nodes: list[fx.Node]) -> None:
    """One kernel call for the linears ``nodes`` of input ``x`` (several: q/k/v, gate/up;
    ``siblings.grouped_call``); each output then takes its own addend and dtype."""
    graph, first = gm.graph, nodes[0]
    w_qs, w_scales = [n.args[2] for n in nodes], [n.args[3] for n in nodes]
    with graph.inserting_before(first):
        biases = [None if n.args[4] is None else _float32_constant(gm, n.args[4], first)
                  for n in nodes]  # fmt: skip
    wides = [n.args[6] if n.args[5] is None else torch.float32 for n in nodes]
    if len(nodes) == 1:
        with graph.inserting_before(first):
            args = (x, w_qs[0], w_scales[0], biases[0], copies, wides[0])
            outs = [graph.call_function(cpu_int8_gemv.int8_linear_gemv, args)]
    else:
        args = (x, w_qs, w_scales, biases, copies, wides)
        outs = grouped_call(graph, nodes, cpu_int8_gemv.int8_linear_gemv_group, args)
    for node, new in zip(nodes, outs, strict=True):
        addend, out_dtype = node.args[5], node.args[6]
        if addend is not None:  # the epilogue's last add, where the addend is computed
            with graph.inserting_before(node):
                new = graph.call_function(operator.add, (new, addend))
                new = graph.call_method("to", (new, out_dtype))
        for key in ("nn_module_stack", "example_value"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _is_decode_int8_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.ops.lowbit.int8_linear.default:
        return False
    q_item, s_item, w_q, w_scale, bias, _addend, out_dtype = node.args
    quantize = _quantize_of(q_item)
    if quantize is None or _quantize_of(s_item) is not quantize or q_item.args[1] != 0:
        return False
    constants = (w_q, w_scale) if bias is None else (w_q, w_scale, bias)
    if out_dtype not in _FLOAT_OUT or not all(
        isinstance(n, fx.Node) and n.op == "get_attr" for n in constants
    ):
        return False
    w, s = getattr(gm, w_q.target), getattr(gm, w_scale.target)
    if not (w.dtype == torch.int8 and w.dim() == 2 and w.is_contiguous()):
        return False  # the kernel's weight layout: [N, K] int8, row-major
    if not (s.dtype == torch.float32 and s.is_contiguous() and s.numel() == w.shape[0]):
        return False
    val = quantize.args[0].meta.get("example_value", quantize.args[0].meta.get("val"))
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    rows = 1
    for d in val.shape[:-1]:
        if not isinstance(d, int):
            return False  # a length known only at run time (prefill, a MoE expert's rows)
        rows *= d
    return rows <= cpu_int8_gemv.GEMV_MAX_M


def _quantize_of(item) -> fx.Node | None:
    """The quantization node ``item`` indexes into, if it is one the kernel computes."""
    if not (isinstance(item, fx.Node) and item.target is operator.getitem):
        return None
    src = item.args[0]
    if not isinstance(src, fx.Node):
        return None
    if src.target is torch.ops.lowbit.quantize_rows_copies.default:
        return src
    plain = src.target is torch.ops.lowbit.quantize_rows.default
    return src if plain and _arg(src, 1, "inlier_mask") is None else None


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _float32_constant(gm, node: fx.Node, anchor: fx.Node) -> fx.Node:
    """The bias constant ``node`` (a get_attr) as contiguous float32 (the kernel reads
    float32)."""
    t = getattr(gm, node.target)
    if t.dtype == torch.float32 and t.is_contiguous():
        return node
    return add_constant(gm, f"{node.target}_f32", t.detach().float().contiguous(), anchor)
