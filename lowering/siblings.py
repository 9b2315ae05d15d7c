"""siblings: the linears that read one input (q/k/v, gate/up) become one kernel call.

Invariant: the grouped call returns, per member, exactly what the member's own call
returns (the kernels quantize the shared input once and pass over all the members'
weight rows in one parallel loop; ``cpu_int8_gemv``, ``cpu_packed``). The call sits at
the first member; the members' constants (``get_attr`` nodes) move up to it; each
member's users then read its item of the call's list.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from torch import fx

from qcompile.kernels import cpu_weight_only


def grouped_call(graph: fx.Graph, nodes: list[fx.Node], fn: Callable, args: tuple) -> list[fx.Node]:
    """``fn(*args)`` (a list, one item per member) placed before the first of ``nodes``
    (in graph order), with every ``get_attr`` node the members read moved up to it;
    returns the items' nodes."""
    first = nodes[0]
    for node in nodes:
        for const in node.all_input_nodes:
            if const.op == "get_attr":
                first.prepend(const)
    with graph.inserting_before(first):
        call = graph.call_function(fn, args)
        return [graph.call_function(operator.getitem, (call, i)) for i in range(len(nodes))]


def group_weight_only_cpu(gm: fx.GraphModule) -> int:
    """Each set of ``dequant_linear_cpu`` calls on one input with the packed codes of the
    same bits and group size becomes one ``dequant_linear_cpu_group`` call; returns how
    many calls were merged away."""
    by_input = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is cpu_weight_only.dequant_linear_cpu:
            x, consts, bits, group, _ = node.args
            if "packed" in consts:
                by_input.setdefault((x, bits, group), []).append(node)
    merged = 0
    for (x, bits, group), nodes in by_input.items():
        if len(nodes) < 2:
            continue
        consts = [n.args[1] for n in nodes]
        biases = [n.args[4] for n in nodes]
        items = grouped_call(
            gm.graph,
            nodes,
            cpu_weight_only.dequant_linear_cpu_group,
            (x, consts, bits, group, biases),
        )
        for node, item in zip(nodes, items, strict=True):
            item.meta.update(node.meta)
            node.replace_all_uses_with(item)
            gm.graph.erase_node(node)
        merged += len(nodes) - 1
    gm.recompile()
    return merged
