"""FX graph helpers the passes and the lowering share: constants held as graph buffers,
the lifted parameter behind a placeholder, the op sets and patterns both sides match,
and the ``lowbit.*`` node-meta keys (declared once, here).

Invariant: nothing here changes what a graph computes. A constant added is a buffer
registered as a constant source (inductor folds it); one dropped leaves no buffer.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

import torch
from torch import fx

# node.meta keys (gm.meta for the last two) ------------------------------------------
SITE = "lowbit.site"  # a linear site's FQN (bind; kept on the nodes that replace it)
WEIGHT_VIEW = "lowbit.weight_view"  # "t" / "expert": a view bind made of a weight
EXPERT = "lowbit.expert"  # the expert index a W[e] view reads
INPUT_GROUP = "lowbit.input_group"  # fusion_analysis: the site's InputGroup
FUSION = "lowbit.fusion"  # fusion_analysis: the group input's fusion decision
OUTLIERS = "lowbit.outliers"  # detect_outliers: the site's outlier input channels
WEIGHT_F64 = "lowbit.weight_f64"  # passes/_folding: the folded weight's float64 master
BIAS_F64 = "lowbit.bias_f64"  # ... and its bias's
WEIGHT_NODE = "lowbit.weight_node"  # the get_attr constant a folded / split site reads
# split_mixed_mm: the constant nodes (copies, src, piece) of the outlier columns' int8 copies
OUTLIER_COPIES = "lowbit.outlier_copies"
DYNAMIC_THRESHOLD = "lowbit.dynamic_threshold"  # int8-mixed, dynamic outlier mode
ROTATE = "lowbit.rotate"  # rotate: the input group index of a block_rotate node
ONLINE_SMOOTH = "lowbit.online_smooth"  # smooth: an online x / s node
REPLACED_WEIGHTS = "lowbit.replaced_weights"  # gm.meta: fp weights the graph stopped reading
QUANTIZED_TABLES = "lowbit.quantized_tables"  # gm.meta: embeddings read from codes
META_PREFIX = "lowbit."

# op sets ---------------------------------------------------------------------------
MUL_TARGETS = (operator.mul, torch.mul, "mul")
SILU_TARGETS = (torch.nn.functional.silu,)
ACTIVATIONS = (
    torch.nn.functional.silu,
    torch.nn.functional.gelu,
    torch.nn.functional.relu,
    torch.sigmoid,
    torch.tanh,
    torch.relu,
    "silu",
    "sigmoid",
    "tanh",
    "relu",
    "gelu",
)


def is_call(n, targets) -> bool:
    """``n`` is a function or method call node with a target in ``targets``."""
    return (
        isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and n.target in targets
    )


def is_mul(n) -> bool:
    """``n`` is a two-operand product (``a * b``, ``torch.mul``, ``Tensor.mul``)."""
    return is_call(n, MUL_TARGETS) and len(n.args) == 2 and not n.kwargs


def vector_factor(
    n, channels: int, value_of: Callable[[fx.Node], torch.Tensor | None]
) -> tuple[int, torch.Tensor] | None:
    """``(index, gamma)`` when ``n`` is ``gamma * y`` with ``gamma`` a 1-D constant of
    ``channels`` elements (``value_of`` gives a node's constant, or None) and ``y`` a
    node that is not one: the weight of an RMSNorm, as fusion_analysis folds into and
    the CPU norm prologue reads past."""
    if not is_mul(n):
        return None
    for i, a in enumerate(n.args):
        t = value_of(a) if isinstance(a, fx.Node) else None
        if t is not None and t.dim() == 1 and t.numel() == channels:
            other = n.args[1 - i]
            if isinstance(other, fx.Node) and value_of(other) is None:
                return i, t
    return None


def gated_product(
    n, is_activation: Callable[[fx.Node], bool]
) -> list[tuple[fx.Node, fx.Node | None]] | None:
    """Per operand of a two-operand product ``n`` (``act(a) * b``: the gated MLPs,
    SwiGLU's ``silu(gate) * up``, as fusion_analysis folds into and the CPU SwiGLU
    prologue computes): ``(inner, act)``, with ``act`` the operand when
    ``is_activation`` accepts it (a call on one node, ``inner`` its input), else
    ``(operand, None)``. None when ``n`` is no product of two nodes."""
    if not is_mul(n) or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    factors = []
    for a in n.args:
        if is_activation(a) and isinstance(a.args[0], fx.Node):
            factors.append((a.args[0], a))
        else:
            factors.append((a, None))
    return factors


# constants -------------------------------------------------------------------------
def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Store ``value`` as a new buffer of ``gm`` and return a get_attr node for it.

    The buffer is registered in ``gm._param_name_to_source`` so inductor treats it
    as a constant of the compiled graph (DESIGN.md §4).
    """
    from torch._dynamo.source import ConstantSource

    base = re.sub(r"\W", "_", name)
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_buffer(name, value.detach())
    if getattr(gm, "_param_name_to_source", None) is None:
        gm._param_name_to_source = {}
    gm._param_name_to_source[name] = ConstantSource(name)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    return node


def drop_constant(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove an unused ``get_attr`` constant node and its buffer."""
    name = node.target
    gm.graph.erase_node(node)
    if hasattr(gm, name):
        delattr(gm, name)
    if getattr(gm, "_param_name_to_source", None):
        gm._param_name_to_source.pop(name, None)


def constant_of(gm: fx.GraphModule) -> Callable[[fx.Node], torch.Tensor | None]:
    """``node -> tensor`` for ``gm``'s ``get_attr`` constants (None for other nodes)."""

    def value(node: fx.Node) -> torch.Tensor | None:
        t = getattr(gm, node.target, None) if node.op == "get_attr" else None
        return t if isinstance(t, torch.Tensor) else None

    return value


def param_tensor(node: fx.Node) -> torch.Tensor | None:
    """The real tensor behind a lifted-parameter placeholder (``meta['grapharg']``)."""
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    example = getattr(grapharg, "example", None)
    return example if isinstance(example, torch.Tensor) else None
