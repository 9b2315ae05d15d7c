"""Inputs the passes can run a graph on without side effects.

Some passes run the graph on dynamo's example inputs (calibration on them, DuQuant's
samples, ``verify``). Those are the user's own tensors, and a graph may write some of
them in place: a static KV cache, its position counter. Running it would then advance
the user's cache before the first real call. ``runnable_inputs`` gives each run copies of
the tensors the graph writes (and the traced value of each symbolic size), so the user's
tensors keep their values and every run starts from the same state.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw


def runnable_inputs(gm: fx.GraphModule, example_inputs) -> list:
    written = written_placeholders(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for node, value in zip(placeholders, example_inputs, strict=False):
        if isinstance(value, torch.SymInt):
            value = guarding_hint_or_throw(value)
        elif isinstance(value, torch.Tensor) and node in written:
            value = value.detach().clone()
        out.append(value)
    return out + list(example_inputs[len(out) :])


def written_placeholders(gm: fx.GraphModule) -> set[fx.Node]:
    """Placeholders an in-place op may write: each in-place op's first argument is
    followed back through its first arguments (views alias them) to a placeholder.
    Conservative: a placeholder only read through such a chain is copied too."""
    written = set()
    for node in gm.graph.nodes:
        if not _writes_in_place(node):
            continue
        source = node.args[0] if node.args else None
        while isinstance(source, fx.Node) and source.op != "placeholder":
            source = source.args[0] if source.args else None
        if isinstance(source, fx.Node):
            written.add(source)
    return written


def _writes_in_place(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return getattr(node.target, "__name__", "").endswith("_")
