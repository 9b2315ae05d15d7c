"""fuse_triton: the Triton target's low-bit sites, an online transform and its
quantization in one kernel (``kernels.triton_lowbit``).

Invariant: the graph computes what it did before, up to the kernels' stated rounding:
identical ``quantize_rows_bits`` nodes are merged and each becomes
``lowbit::rotate_quantize_rows_bits_triton`` (applying the ``block_rotate`` feeding it
where its blocks fit ``triton_lowbit.MAX_FUSED_BLOCK``); W4A4 linears whose readers all
take packed int4 become ``lowbit::int4_linear_triton`` with their weights packed here.
Activations that are not fp32 / fp16 / bf16 keep the reference kernels.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.context import PassContext
from qcompile.graph_utils import ROTATE, add_constant, drop_constant
from qcompile.kernels.packing import pack_int4

from .low_bit_sites import activation_dtype, erase_unread, is_block_rotate, merge_quantizations


def fuse_lowbit_triton(gm: fx.GraphModule, ctx: PassContext | None = None) -> int:
    """Triton target: ``block_rotate -> quantize_rows_bits (-> int8_linear)`` into the
    fused kernels of ``kernels.triton_lowbit`` (see the module docstring). A site whose
    weights get packed has its ``bits_per_weight`` updated. Returns the number of nodes
    rewritten or merged."""
    from qcompile.kernels import triton_lowbit

    graph = gm.graph
    lowbit = torch.ops.lowbit
    quantize, rewrites = merge_quantizations(graph)

    operands: dict[fx.Node, tuple | None] = {}  # block_rotate -> fused operands
    packed: dict[fx.Node, fx.Node] = {}  # int8 weight constant -> its packed int4 copy
    sites = {s.node: s for s in ctx.sites} if ctx is not None else {}
    rotations = set()
    for (x, bits), qn in quantize.items():
        dtype = activation_dtype(x, qn)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue  # the reference kernel stays
        transform = (None, None, None, 0)
        if is_block_rotate(x):
            rotations.add(x)
            if x not in operands:
                operands[x] = _rotation_constants(gm, x, dtype, triton_lowbit)
            if operands[x] is not None:
                transform = operands[x]
                qn.replace_input_with(x, x.args[0])
        linears = _w4a4_consumers(gm, qn) if bits <= 4 else []
        qn.target = lowbit.rotate_quantize_rows_bits_triton.default
        qn.args = (qn.args[0], *transform, bits, bool(linears))
        rewrites += 1
        for lin in linears:
            _to_int4_linear(gm, lin, packed)
            rewrites += 1
            site = sites.get(lin)
            if site is not None:  # 4-bit codes plus a float32 scale per output row
                site.bits_per_weight = 4 + 32 / site.in_features
    erase_unread(gm, rotations)  # the block_rotate nodes the kernels replaced
    gm.recompile()
    return rewrites


def _rotation_constants(gm: fx.GraphModule, rot: fx.Node, dtype, triton_lowbit) -> tuple | None:
    """get_attr nodes ``(w1, src, w2, block)`` of the fused kernel for ``rot``, or None
    when its blocks are too large to fuse."""
    tensors = [None if a is None else getattr(gm, a.target) for a in rot.args[1:]]
    blocks, tail = tensors[0], tensors[1]
    if not triton_lowbit.fused_block_ok(blocks, tail):
        return None
    ops = triton_lowbit.prepare_rotation(*tensors, dtype=dtype)
    tag = f"lowbit_rotate_{rot.meta.get(ROTATE, rot.name)}_triton"
    nodes = [
        None if t is None else add_constant(gm, f"{tag}_{name}", t, rot)
        for name, t in (("w1", ops.w1), ("src", ops.src), ("w2", ops.w2))
    ]
    return (*nodes, ops.block)


def _w4a4_consumers(gm: fx.GraphModule, qn: fx.Node) -> list[fx.Node]:
    """The ``int8_linear`` nodes reading ``qn``'s codes when every reader is one that the
    packed int4 GEMM can run (weights in [-8, 7], no addend); else []."""
    linears = []
    for use in qn.users:
        if use.target is not operator.getitem:
            return []
        if use.args[1] == 1:
            continue  # the scales: read as they are
        for lin in use.users:
            ok = (
                lin.target is torch.ops.lowbit.int8_linear.default
                and lin.args[0] is use
                and lin.args[5] is None
                and isinstance(lin.args[2], fx.Node)
                and lin.args[2].op == "get_attr"
            )
            if not ok:
                return []
            w = getattr(gm, lin.args[2].target)
            if w.dtype != torch.int8 or bool(((w < -8) | (w > 7)).any()):
                return []
            linears.append(lin)
    return linears


def _to_int4_linear(gm: fx.GraphModule, lin: fx.Node, packed: dict) -> None:
    q, s, w_node, w_scale, bias, _, out_dtype = lin.args
    p_node = packed.get(w_node)
    if p_node is None:
        w = pack_int4(getattr(gm, w_node.target))
        p_node = packed[w_node] = add_constant(gm, f"{w_node.target}_int4packed", w, w_node)
    lin.target = torch.ops.lowbit.int4_linear_triton.default
    lin.args = (q, s, p_node, w_scale, bias, out_dtype)
    if not w_node.users:
        drop_constant(gm, w_node)
