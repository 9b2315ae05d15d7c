"""rms_norm_prologue: the fused CPU transform kernel reads an RMSNorm's input, not its output.

Invariant: per-token quantization is invariant to a positive per-token factor (the
codes of ``r * y`` are those of ``y``, the scale is ``r`` times), and a per-channel
factor before a block transform is a scaling of the first stage's rows. So for a
fused site whose input is ``gamma * cast(z * rsqrt(...))`` (an RMSNorm, as in
Llama-style models, with the smoothing already folded into ``gamma``) and that
nothing else reads, the kernel takes ``z`` (the residual stream, already in memory)
and ``diag(gamma) @ B1`` as its first stage, and the scales it returns are multiplied
by the per-token ``rsqrt`` factor. The graph's result is the same up to rounding
(in bf16 operands: ``gamma`` rounded with the block instead of with the activation);
the normalized activations are no longer written and read back.

Matched on the FX graph (torch-level ops, any model): ``mul(gamma, y)`` with
``gamma`` a ``[K]`` constant, dtype casts, ``y = mul(z, r)`` with ``r`` an
``rsqrt`` of shape ``[..., 1]`` (positive); every node of that chain read only by the
next. Casts on ``z`` are skipped too (the kernel reads any float dtype).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from qcompile.graph_utils import constant_of, is_mul, vector_factor

_RSQRT = (torch.rsqrt,)


@dataclass
class NormInput:
    """A site's RMSNorm: read ``z``, scale rows by ``gamma``, scales by ``factor``."""

    z: fx.Node
    factor: fx.Node
    gamma: torch.Tensor
    chain: list[fx.Node]  # the nodes from the RMSNorm product to the site's input


def match(x: fx.Node, gm: fx.GraphModule) -> NormInput | None:
    """The RMSNorm producing ``x``, or None."""
    if not is_mul(x) or len(x.users) != 1:
        return None
    factor = vector_factor(x, _last_dim(x), constant_of(gm))
    if factor is None or not factor[1].is_floating_point():
        return None
    (i, gamma), k = factor, _last_dim(x)
    y = x.args[1 - i]
    chain = [x]
    while _is_cast(y) and len(y.users) == 1:
        chain.append(y)
        y = y.args[0]
    if not is_mul(y) or len(y.users) != 1:
        return None
    chain.append(y)
    a, b = y.args
    z, r = (a, b) if _is_rsqrt_column(b) else (b, a) if _is_rsqrt_column(a) else (None, None)
    if z is None or _last_dim(z) != k:
        return None
    while _is_cast(z) and _is_float(z.args[0]):
        z = z.args[0]
    return NormInput(z, r, gamma.detach(), chain)


def fold_gamma(blocks, tail, gamma: torch.Tensor):
    """``diag(gamma) @ B1``: the first stage's blocks ``[nb, b, b]`` and tail ``[r, r]``
    with their rows (input channels) scaled."""
    nb = 0 if blocks is None else blocks.shape[0] * blocks.shape[-1]
    g = gamma.to(torch.float64)
    if blocks is not None:
        blocks = (blocks.double() * g[:nb].view(blocks.shape[0], -1, 1)).to(blocks.dtype)
    if tail is not None:
        tail = (tail.double() * g[nb:, None]).to(tail.dtype)
    return blocks, tail


def rescale(gm: fx.GraphModule, qn: fx.Node, norm: NormInput) -> None:
    """After ``qn`` reads ``norm.z``: every reader of its scales reads them times the
    per-token factor, one product right after ``qn`` (the chain, now unread, is erased
    by the caller)."""
    graph = gm.graph
    items = [u for u in qn.users if u.target is operator.getitem and u.args[1] == 1]
    with graph.inserting_after(qn):
        scale = graph.call_function(operator.getitem, (qn, 1))
    with graph.inserting_after(scale):
        scaled = graph.call_function(operator.mul, (scale, norm.factor))
    for item in items:
        item.replace_all_uses_with(scaled)
        graph.erase_node(item)


def _is_cast(n) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_method"
        and n.target == "to"
        and len(n.args) == 2
        and isinstance(n.args[1], torch.dtype)
        and n.args[1].is_floating_point
        and not n.kwargs
    )


def _is_rsqrt_column(n) -> bool:
    rsqrt = isinstance(n, fx.Node) and (
        (n.op == "call_function" and n.target in _RSQRT)
        or (n.op == "call_method" and n.target == "rsqrt")
    )
    val = n.meta.get("example_value") if rsqrt else None
    return isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[-1] == 1


def _is_float(n) -> bool:
    val = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _last_dim(n) -> int | None:
    val = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else None
