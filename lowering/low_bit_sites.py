"""What the CPU and Triton fusions of low-bit sites share: merging identical
quantizations, recognizing ``block_rotate`` nodes, the activation dtype, erasing what
the fused kernels replaced.

Invariant: merging and erasing never change what the graph computes (merged nodes
compute the same codes; only nodes nothing reads are erased).
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.graph_utils import drop_constant


def erase_unread(gm: fx.GraphModule, nodes) -> None:
    """Erase the ``nodes`` (in order) that nothing reads, and the constants they alone
    read."""
    for node in nodes:
        if node.users:
            continue
        consts = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        gm.graph.erase_node(node)
        for c in consts:
            if not c.users:
                drop_constant(gm, c)


def merge_quantizations(graph: fx.Graph) -> tuple[dict[tuple, fx.Node], int]:
    """Merge ``quantize_rows_bits`` nodes with the same input and bits (q/k/v read one
    input): ``({(input, bits): node}, number merged)``."""
    quantize: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if (
            node.op == "call_function"
            and node.target is torch.ops.lowbit.quantize_rows_bits.default
        ):
            key = (node.args[0], node.args[1])
            if key in quantize:  # same input, same bits: the same codes
                node.replace_all_uses_with(quantize[key])
                graph.erase_node(node)
                merged += 1
            else:
                quantize[key] = node
    return quantize, merged


def is_block_rotate(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is torch.ops.lowbit.block_rotate.default
    )


def activation_dtype(x: fx.Node, qn: fx.Node) -> torch.dtype | None:
    val = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return val.dtype
    for use in qn.users:  # int8_linear's out_dtype is the activation dtype
        for lin in use.users:
            if lin.target is torch.ops.lowbit.int8_linear.default:
                return lin.args[6]
    return None
