"""lower: replace the target-neutral ``lowbit::`` ops with the target's kernels.

Precondition: quantizing passes ran; the graph holds ``lowbit::quantize_rows``,
``lowbit::int8_linear`` and possibly ``lowbit::int8_mixed_linear_dynamic``.
Postcondition:
  * target ``cpu``: the first two become the aten-level functions of
    ``qcompile.kernels.cpu_int8`` (oneDNN ``_int_mm``; inductor fuses the rest);
    the dynamic op stays a custom op (data-dependent columns) that runs ``_int_mm``;
  * target ``triton``: they become ``lowbit::quantize_rows_triton`` and
    ``lowbit::int8_linear_triton``; the dynamic op keeps its reference kernel
    (reported).
Numerical contract: integer results identical to the reference; float epilogue
within float32 rounding.
Returns the number of nodes lowered.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.context import PassContext
from qcompile.kernels import cpu_int8


def lowering_table(target: str) -> dict:
    lowbit = torch.ops.lowbit
    if target == "cpu":
        return {
            lowbit.quantize_rows.default: cpu_int8.quantize_rows,
            lowbit.int8_linear.default: cpu_int8.int8_linear,
        }
    if target == "triton":
        from qcompile.kernels import triton_int8

        ok, why = triton_int8.triton_available()
        if not ok:
            raise RuntimeError(f"lowbit target 'triton' cannot run here: {why}")
        return {
            lowbit.quantize_rows.default: lowbit.quantize_rows_triton.default,
            lowbit.int8_linear.default: lowbit.int8_linear_triton.default,
        }
    raise ValueError(f"unknown lowbit target {target!r}")


def lower(gm: fx.GraphModule, ctx: PassContext) -> int:
    table = lowering_table(ctx.target)
    lowered = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
            lowered += 1
    gm.recompile()
    return lowered
