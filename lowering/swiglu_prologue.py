"""swiglu_prologue: the fused CPU transform kernel computes ``silu(gate) * up`` itself.

Invariant: a fused site whose input is ``silu(int8_linear(q, s, Wg, sg)) *
int8_linear(q, s, Wu, su)`` (the SwiGLU of Llama-style MLPs: the two linears read the
same codes, have no bias or addend and return float32, and nothing else reads them or
their product) becomes ``cpu_lowbit.swiglu_rotate_quantize_rows_bits_cpu``: the two
int32 GEMMs stay oneDNN's, and the kernel dequantizes their accumulators and applies
SiLU and the product per tile of rows, in float32 and in the reference's order, so the
product is never written to memory and read back. The same codes up to the rounding
of ``exp`` (the kernel's is at::vec's, as inductor's).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from qcompile.graph_utils import SILU_TARGETS, gated_product


@dataclass
class SwigluInput:
    """The operands of a site's SwiGLU: ``int8_linear``'s ``(q, x_scale, w_q, w_scale)``
    of the gate and the up projection, and the nodes it replaces."""

    q: fx.Node
    x_scale: fx.Node
    w_gate: fx.Node
    gate_scale: fx.Node
    w_up: fx.Node
    up_scale: fx.Node
    chain: list[fx.Node]  # the product first, then SiLU, the two linears, up's inputs

    def operands(self) -> tuple[fx.Node, ...]:
        """``cpu_lowbit.swiglu_rotate_quantize_rows_bits_cpu``'s first six arguments."""
        return self.q, self.x_scale, self.w_gate, self.gate_scale, self.w_up, self.up_scale


def match(x: fx.Node) -> SwigluInput | None:
    """The SwiGLU producing ``x``, or None."""
    factors = gated_product(x, _is_silu) if len(x.users) == 1 else None
    if factors is None or factors[0][1] is None and factors[1][1] is None:
        return None
    (gate, act), up = (factors[0], x.args[1]) if factors[0][1] else (factors[1], x.args[0])
    if not (_plain_linear(gate) and _plain_linear(up)):
        return None
    if not all(_same_value(a, b) for a, b in zip(gate.args[:2], up.args[:2])):
        return None  # the two linears quantize their inputs differently
    q, x_scale = gate.args[:2]
    chain = [x, act, gate, up, *(a for a in up.args[:2] if a not in gate.args[:2])]
    return SwigluInput(q, x_scale, gate.args[2], gate.args[3], up.args[2], up.args[3], chain)


def _same_value(a, b) -> bool:
    """The same node, or the same item of one node (each linear reads its own getitem
    of the merged quantization)."""
    return a is b or (
        isinstance(a, fx.Node)
        and isinstance(b, fx.Node)
        and a.target is operator.getitem
        and b.target is operator.getitem
        and a.args == b.args
    )


def _single_use_call(n, targets) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_function"
        and n.target in targets
        and len(n.users) == 1
    )


def _is_silu(n) -> bool:
    return (
        _single_use_call(n, SILU_TARGETS)
        and len(n.args) == 1
        and not n.kwargs.get("inplace", False)
        and set(n.kwargs) <= {"inplace"}
    )


def _plain_linear(n) -> bool:
    """``int8_linear(q, x_scale, w_q, w_scale, None, None, float32)`` read once."""
    return (
        _single_use_call(n, (torch.ops.lowbit.int8_linear.default,))
        and not n.kwargs
        and len(n.args) == 7
        and n.args[4] is None
        and n.args[5] is None
        and n.args[6] == torch.float32
    )
