"""lower: replace the target-neutral ``lowbit::`` ops with the target's kernels.

Precondition: quantizing passes ran; the graph holds ``lowbit::quantize_rows``,
``lowbit::int8_linear`` and possibly ``lowbit::int8_mixed_linear_dynamic`` and
``lowbit::quantize_rows_bits`` (low-bit recipes).
Postcondition:
  * target ``cpu``: the first two become the aten-level functions of
    ``qcompile.kernels.cpu_int8`` (oneDNN ``_int_mm``; inductor fuses the rest), and
    ``quantize_rows_bits`` its aten function in ``qcompile.kernels.lowbit_act``;
    the dynamic op stays a custom op (data-dependent columns) that runs ``_int_mm``;
    ``dequant_linear`` (weight-only) becomes ``cpu_weight_only.dequant_linear_cpu``
    with its weight prepacked for oneDNN's int4 kernel (bf16 activations inside);
  * target ``triton``: they become ``lowbit::quantize_rows_triton``,
    ``lowbit::int8_linear_triton`` and ``lowbit::dequant_linear_triton``; the dynamic op and ``quantize_rows_bits`` keep
    their reference kernels (reported).
Numerical contract: integer results identical to the reference; float epilogue
within float32 rounding.
Returns the number of nodes lowered.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.context import PassContext, add_constant
from qcompile.kernels import cpu_int8, cpu_weight_only, lowbit_act
from qcompile.kernels.cpu_weight_only import prepack_cpu
from qcompile.kernels.packing import unpack


def lowering_table(target: str) -> dict:
    lowbit = torch.ops.lowbit
    if target == "cpu":
        return {
            lowbit.quantize_rows.default: cpu_int8.quantize_rows,
            lowbit.int8_linear.default: cpu_int8.int8_linear,
            lowbit.quantize_rows_bits.default: lowbit_act.quantize_rows_bits,  # W4A4, W6A6, ...
        }
    if target == "triton":
        from qcompile.kernels import triton_int8

        ok, why = triton_int8.triton_available()
        if not ok:
            raise RuntimeError(f"lowbit target 'triton' cannot run here: {why}")
        from qcompile.kernels import triton_dequant_gemm  # noqa: F401  (registers the op)

        return {
            lowbit.quantize_rows.default: lowbit.quantize_rows_triton.default,
            lowbit.int8_linear.default: lowbit.int8_linear_triton.default,
            lowbit.dequant_linear.default: lowbit.dequant_linear_triton.default,
        }
    raise ValueError(f"unknown lowbit target {target!r}")


def lower(gm: fx.GraphModule, ctx: PassContext) -> int:
    table = lowering_table(ctx.target)
    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.lowbit.dequant_linear.default and ctx.target == "cpu":
            lower_dequant_linear_cpu(gm, node)
            lowered += 1
        elif node.target in table:
            node.target = table[node.target]
            lowered += 1
    gm.recompile()
    return lowered


def lower_dequant_linear_cpu(gm: fx.GraphModule, node: fx.Node) -> None:
    """Prepack a weight-only site for ``cpu_weight_only.dequant_linear_cpu``.

    The packed codes are unpacked once here and re-laid out for oneDNN's int4
    kernel (decode) and the dequantize + bf16 GEMM path (prefill); the generic
    packed constants are dropped when nothing else reads them.
    """
    x, packed, scales, zeros, bias, bits, group = node.args
    tensors = {n: getattr(gm, n.target) for n in (packed, scales, zeros)}
    k = x.meta["example_value"].shape[-1] if "example_value" in x.meta else None
    n_out = tensors[scales].shape[0]
    k = k or tensors[scales].shape[1] * group
    codes = unpack(tensors[packed], bits, k)
    out_val = node.meta.get("example_value")
    act_dtype = out_val.dtype if out_val is not None else tensors[scales].dtype
    prepacked = prepack_cpu(codes, tensors[scales], tensors[zeros], bits, group, act_dtype)
    site = node.meta.get("lowbit.site", f"site{n_out}")
    args = {
        name: add_constant(gm, f"lowbit_{site}_cpu_{name}", t, node)
        for name, t in prepacked.items()
    }
    node.target = cpu_weight_only.dequant_linear_cpu
    node.args = (x, args, bits, group, bias)
    for old in (packed, scales, zeros):
        if not old.users:
            gm.graph.erase_node(old)
            delattr(gm, old.target)
            gm._param_name_to_source.pop(old.target, None)
