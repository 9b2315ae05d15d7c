"""int8_decode_cpu: the int8 recipes' linears at decode become one CPU call each.

Invariant: a ``lowbit::int8_linear`` whose rows are known at trace time to be at most
``cpu_int8_gemv.GEMV_MAX_M`` (a decode step), whose codes come from a
``lowbit::quantize_rows`` of ``x``, becomes ``cpu_int8_gemv.int8_linear_gemv`` on ``x``:
the same integer sums and float epilogue. Its outlier partial (``split_mixed_mm``'s
``linear(index_select(x, -1, O), W_O)``, or a ``narrow`` of the group's stacked one) is
computed in the same call from the outlier index and the site's rows of ``W_O``; any
other addend is added after the call, in float32, as the epilogue adds it. Nodes left
unread (the quantization, the gather, the float GEMM) are erased.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from qcompile.graph_utils import add_constant
from qcompile.kernels import cpu_int8_gemv

from .low_bit_sites import erase_unread

_FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16)


def lower_int8_decode_cpu(gm: fx.GraphModule) -> int:
    """Rewrite the decode-sized int8 linears of ``gm``; returns how many (0 where the
    kernel cannot be built here: the int8 GEMM path stays)."""
    graph = gm.graph
    sites = [n for n in graph.nodes if _is_decode_int8_linear(gm, n)]
    if not sites or not cpu_int8_gemv.available():
        return 0
    # read by the rewritten nodes only: erased after them, readers before what they read
    stages: tuple[list, ...] = ([], [], [], [], [])
    for node in sites:
        q_item, _, w_q, w_scale, bias, addend, out_dtype = node.args
        quantize = q_item.args[0]
        x, mask = quantize.args[0], _arg(quantize, 1, "inlier_mask")
        outliers = _outlier_operands(gm, addend, x)
        idx, w_out = outliers.operands if outliers else (None, None)
        with graph.inserting_before(node):
            bias = None if bias is None else _float32_constant(gm, bias, node)
            wide = out_dtype if addend is None or outliers else torch.float32
            new = graph.call_function(
                cpu_int8_gemv.int8_linear_gemv, (x, mask, w_q, w_scale, bias, idx, w_out, wide)
            )
            if addend is not None and outliers is None:  # the epilogue's last add
                new = graph.call_function(operator.add, (new, addend))
                new = graph.call_method("to", (new, out_dtype))
        for key in ("nn_module_stack", "example_value"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if outliers:
            for stage, n in zip(stages, outliers.chain):
                if n is not None:
                    stage.append(n)
        stages[3].extend(quantize.users)
        stages[4].append(quantize)
    for stage in stages:
        erase_unread(gm, list(dict.fromkeys(stage)))
    gm.recompile()
    return len(sites)


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
    """The ``lowbit::quantize_rows`` node ``item`` indexes into, if it is one."""
    if not (isinstance(item, fx.Node) and item.target is operator.getitem):
        return None
    src = item.args[0]
    ok = isinstance(src, fx.Node) and src.target is torch.ops.lowbit.quantize_rows.default
    return src if ok else None


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


@dataclass
class _Outliers:
    operands: tuple[fx.Node, fx.Node]  # outlier_idx, the site's rows of W_O in float32
    chain: tuple  # the narrow (None without one), the float GEMM, the gather


def _outlier_operands(gm, addend, x) -> _Outliers | None:
    """The kernel's operands for a ``split_mixed_mm`` partial read from ``x``; None for
    another addend."""
    if not isinstance(addend, fx.Node):
        return None
    rows = None
    partial = addend
    if addend.target is torch.narrow:
        partial, dim, start, length = addend.args
        if dim != -1 or not isinstance(start, int) or not isinstance(length, int):
            return None
        rows = (start, length)
    if not (isinstance(partial, fx.Node) and partial.target is torch._C._nn.linear):
        return None
    gather, w_node = partial.args[:2]
    if len(partial.args) > 2 and partial.args[2] is not None:
        return None
    ok = isinstance(gather, fx.Node) and gather.target is torch.index_select
    if not ok or gather.args[0] is not x or gather.args[1] != -1 or w_node.op != "get_attr":
        return None
    idx_node = gather.args[2]
    if idx_node.op != "get_attr" or getattr(gm, idx_node.target).dtype != torch.int64:
        return None
    w = getattr(gm, w_node.target)
    if rows is not None:
        w = w[rows[0] : rows[0] + rows[1]]
    w = w.detach().to(torch.float32).contiguous()
    w_site = add_constant(gm, f"{w_node.target}_rows_{rows[0] if rows else 0}_f32", w, addend)
    chain = (addend if rows is not None else None, partial, gather)
    return _Outliers((idx_node, w_site), chain)


def _float32_constant(gm, node: fx.Node, anchor: fx.Node) -> fx.Node:
    """The bias constant ``node`` (a get_attr) as contiguous float32 (the kernel reads
    float32)."""
    t = getattr(gm, node.target)
    if t.dtype == torch.float32 and t.is_contiguous():
        return node
    return add_constant(gm, f"{node.target}_f32", t.detach().float().contiguous(), anchor)
