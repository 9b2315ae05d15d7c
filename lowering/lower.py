"""lower: replace the target-neutral ``lowbit::`` ops with the target's kernels.

Precondition: the quantizing passes ran (the graph holds ``lowbit::`` ops only where
sites were quantized). Postcondition: no target-neutral op is left that the target
has a kernel for; each is replaced by its ``lowering_table`` entry, by a fusion of the
low-bit sites (``fuse_cpu``, ``fuse_triton``), by the one-call int8 decode kernel
(``int8_decode_cpu``), or by a prepacked weight-only call (``lower_dequant_linear_cpu``);
on the CPU the linears of one input share one call (``siblings``).
Numerical contract: integer GEMM results identical to the reference kernels, float
epilogues within float32 rounding, fused transforms as their kernel modules state.
Returns the number of nodes lowered.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.context import PassContext
from qcompile.kernels import cpu_int8, lowbit_act, reference

from .derived import lower_dequant_linear_cpu
from .fuse_cpu import fuse_lowbit_cpu, lower_block_rotate_cpu
from .fuse_triton import fuse_lowbit_triton
from .int8_decode_cpu import lower_int8_decode_cpu
from .siblings import group_weight_only_cpu


def lowering_table(target: str) -> dict:
    lowbit = torch.ops.lowbit
    if target == "cpu":
        return {
            lowbit.quantize_rows.default: cpu_int8.quantize_rows,
            lowbit.quantize_rows_copies.default: cpu_int8.quantize_rows_copies,
            lowbit.int8_linear.default: cpu_int8.int8_linear,
            lowbit.quantize_rows_bits.default: lowbit_act.quantize_rows_bits,  # W4A4, W6A6, ...
        }
    if target == "triton":
        from qcompile.kernels import triton_int8

        ok, why = triton_int8.triton_available()
        if not ok:
            raise RuntimeError(f"lowbit target 'triton' cannot run here: {why}")
        from qcompile.kernels import triton_dequant_gemm, triton_lowbit  # noqa: F401  (ops)

        return {
            lowbit.quantize_rows.default: lowbit.quantize_rows_triton.default,
            # aten ops: inductor writes the Triton kernel (a gather after the row's absmax)
            lowbit.quantize_rows_copies.default: reference.quantize_rows_copies,
            lowbit.int8_linear.default: lowbit.int8_linear_triton.default,
            lowbit.dequant_linear.default: lowbit.dequant_linear_triton.default,
            # left by fuse_lowbit_triton (blocks too large, or another reader)
            lowbit.block_rotate.default: lowbit_act.block_rotate,
        }
    raise ValueError(f"unknown lowbit target {target!r}")


def lower(gm: fx.GraphModule, ctx: PassContext) -> int:
    table = lowering_table(ctx.target)
    fuse = fuse_lowbit_triton if ctx.target == "triton" else fuse_lowbit_cpu
    lowered = fuse(gm, ctx)
    if ctx.target == "cpu":
        lowered += lower_int8_decode_cpu(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.lowbit.dequant_linear.default and ctx.target == "cpu":
            lower_dequant_linear_cpu(gm, node, ctx)
            lowered += 1
        elif node.target is torch.ops.lowbit.block_rotate.default and ctx.target == "cpu":
            lower_block_rotate_cpu(gm, node, ctx)
            lowered += 1
        elif node.target in table:
            node.target = table[node.target]
            lowered += 1
    if ctx.target == "cpu":
        group_weight_only_cpu(gm)  # q/k/v, gate/up: one call at decode
    gm.recompile()
    return lowered
