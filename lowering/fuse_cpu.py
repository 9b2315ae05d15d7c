"""fuse_cpu: the CPU target's low-bit sites, an online transform and its quantization
in one kernel (``kernels.cpu_lowbit``).

Invariant: the graph computes what it did before, up to the kernels' stated rounding:
identical ``quantize_rows_bits`` nodes are merged, each one reading a ``block_rotate``
whose blocks fit ``cpu_lowbit.MAX_FUSED_BLOCK`` becomes
``lowbit::rotate_quantize_rows_bits_cpu``, which may also compute the site's producer
(an RMSNorm: ``rms_norm_prologue``; ``silu(gate) * up``: ``swiglu_prologue``); a larger
``block_rotate`` becomes ``lowbit_act.block_rotate_cpu`` (channels-major).
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import fx

from qcompile.context import PassContext
from qcompile.graph_utils import ROTATE, add_constant, drop_constant
from qcompile.kernels import cpu_int8, lowbit_act

from . import rms_norm_prologue, swiglu_prologue
from .low_bit_sites import activation_dtype, erase_unread, is_block_rotate, merge_quantizations


def fuse_lowbit_cpu(gm: fx.GraphModule, ctx: PassContext) -> int:
    """CPU target: identical ``quantize_rows_bits`` nodes merged, and each one reading a
    ``block_rotate`` (blocks up to ``cpu_lowbit.MAX_FUSED_BLOCK``) becomes
    ``lowbit::rotate_quantize_rows_bits_cpu`` with the transform's operands prepared here
    in the operand dtype of :func:`cpu_transform_dtype`. Where the kernel cannot be built
    (no C++ compiler) nothing is fused and a warning says so. Returns the number of nodes
    rewritten or merged."""
    from qcompile.kernels import cpu_lowbit

    graph = gm.graph
    quantize, rewrites = merge_quantizations(graph)
    sites = [(x, bits, qn) for (x, bits), qn in quantize.items() if is_block_rotate(x)]
    if not sites:
        return rewrites
    try:
        cpu_lowbit.library()
    except Exception as exc:  # noqa: BLE001  (any build failure: keep the unfused kernels)
        warnings.warn(
            f"lowbit: the fused CPU transform kernel could not be built ({type(exc).__name__}); "
            "the online transforms run unfused (same results, slower). Install a C++ compiler "
            "(the one torch.compile uses) to fuse them.",
            stacklevel=2,
        )
        return rewrites
    operands: dict[fx.Node, tuple | None] = {}  # block_rotate -> kernel operands
    rotations = set()
    chains = []  # producer nodes folded into a kernel, each chain's head first
    for x, bits, qn in sites:
        dtype = activation_dtype(x, qn)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        rotations.add(x)
        # the kernel computes the producer only where nothing else reads the transformed input
        sole_reader = len(x.users) == 1
        first_stage = x.args[1] is not None or x.args[2] is not None
        norm = None
        if NORM_PROLOGUE and first_stage and sole_reader:
            norm = rms_norm_prologue.match(x.args[0], gm)
        if x not in operands:
            operands[x] = _cpu_rotation_constants(gm, x, ctx, cpu_lowbit, norm)
        if operands[x] is None:
            continue
        *consts, amx = operands[x]
        swiglu = swiglu_prologue.match(x.args[0]) if SWIGLU_PROLOGUE and sole_reader else None
        if swiglu is not None:
            qn.target = cpu_lowbit.swiglu_rotate_quantize_rows_bits_cpu
            qn.args = (*swiglu.operands(), *consts, bits, amx)
            chains.append(swiglu.chain)
        else:
            qn.target = torch.ops.lowbit.rotate_quantize_rows_bits_cpu.default
            qn.args = (norm.z if norm else x.args[0], *consts, bits, amx)
        rewrites += 1
        if norm is not None:
            rms_norm_prologue.rescale(gm, qn, norm)
            chains.append(norm.chain)
    erase_unread(gm, rotations)  # the block_rotate nodes the kernels replaced
    for chain in chains:  # the producers the kernels now compute (read by nothing else)
        erase_unread(gm, chain)
    gm.recompile()
    return rewrites


def _cpu_rotation_constants(gm: fx.GraphModule, rot: fx.Node, ctx, cpu_lowbit, norm=None):
    """get_attr nodes ``(blocks, tail, perm, blocks2, tail2)`` and the ``amx`` flag of the
    fused CPU kernel for ``rot`` (its first stage's rows scaled by the RMSNorm weight of
    ``norm``, a ``rms_norm_prologue.NormInput``, if given); None when its blocks are too
    large to fuse."""
    mats = [None if a is None else getattr(gm, a.target) for a in rot.args[1:]]
    if not cpu_lowbit.fusable(mats[0], mats[3]):
        return None
    if norm is not None:
        mats[0], mats[1] = rms_norm_prologue.fold_gamma(mats[0], mats[1], norm.gamma)
    ops = cpu_lowbit.prepare(*mats, dtype=cpu_transform_dtype(rot, ctx))
    tag = f"lowbit_rotate_{rot.meta.get(ROTATE, rot.name)}_cpu"
    names = ("r1", "r1_tail", "perm", "r2", "r2_tail")
    tensors = (ops.blocks, ops.tail, ops.perm, ops.blocks2, ops.tail2)
    nodes = [
        None if t is None else add_constant(gm, f"{tag}_{name}", t, rot)
        for name, t in zip(names, tensors)
    ]
    return (*nodes, ops.amx)


#: activation bit widths whose quantization step dwarfs bf16's rounding (2^-8 relative)
BF16_TRANSFORM_MAX_ACT_BITS = 6


def cpu_transform_dtype(node: fx.Node, ctx: PassContext) -> torch.dtype:
    """Operand dtype of a ``block_rotate`` on the CPU target (``options["cpu_transform_dtype"]``).

    ``auto``: bfloat16 when the CPU multiplies bf16 natively (oneDNN; AMX or avx512_bf16)
    and every reader of the transformed activations quantizes them per token to at most
    ``BF16_TRANSFORM_MAX_ACT_BITS`` bits (W4A4, W6A6; not W4A8, whose 8-bit step is
    near bf16's rounding); otherwise the activation dtype. The fused kernel runs bf16
    on AMX only (``cpu_lowbit.prepare``: elsewhere its operands stay fp32).
    """
    val = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
    act = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    choice = ctx.options.cpu_transform_dtype
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "activation" or act not in (torch.float32, torch.bfloat16):
        return act
    low_bit_readers = node.users and all(
        u.target is torch.ops.lowbit.quantize_rows_bits.default
        and u.args[1] <= BF16_TRANSFORM_MAX_ACT_BITS
        for u in node.users
    )
    return torch.bfloat16 if low_bit_readers and _cpu_has_native_bf16() else act


def _cpu_has_native_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


#: fused sites fed by an RMSNorm read its input (``rms_norm_prologue``)
NORM_PROLOGUE = True
#: fused sites fed by ``silu(gate) * up`` compute it from the int32 GEMMs (``swiglu_prologue``)
SWIGLU_PROLOGUE = True

#: the block path copies its input channels-major: int8 linears producing that input
#: (through elementwise ops only) compute their output channels-major
CHANNELS_MAJOR_PRODUCERS = True
_ELEMENTWISE = (operator.mul, torch.mul, torch.nn.functional.silu, torch.sigmoid, operator.add)


def _channels_major_producers(x) -> list[fx.Node]:
    """The ``cpu_int8.int8_linear`` nodes whose outputs reach ``x`` through elementwise
    ops only, every one of them read by nothing else (e.g. gate_proj and up_proj for
    ``silu(gate) * up``); [] when anything else is on the way."""
    linears, stack, seen = [], [x], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node):
            continue  # a scalar operand
        if node in seen:
            return []
        seen.add(node)
        if node is not x and len(node.users) != 1:
            return []
        if node.op == "call_function" and node.target is cpu_int8.int8_linear:
            linears.append(node)
        elif node.op == "call_function" and node.target in _ELEMENTWISE and not node.kwargs:
            stack.extend(node.args)
        else:
            return []
    return linears


def lower_block_rotate_cpu(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    """``block_rotate`` -> ``lowbit_act.block_rotate_cpu`` with its matrices transposed,
    contiguous and in the operand dtype of ``cpu_transform_dtype``, as new constants;
    the int8 linears producing its input through elementwise ops become channels-major."""
    x, blocks, tail, perm, blocks2, tail2 = node.args
    dtype = cpu_transform_dtype(node, ctx)
    mats = [None if a is None else getattr(gm, a.target) for a in (blocks, tail, blocks2, tail2)]
    if CHANNELS_MAJOR_PRODUCERS:
        for lin in _channels_major_producers(x):
            lin.target = cpu_int8.int8_linear_channels_major
    prepared = lowbit_act.prepare_block_rotate_cpu(*mats, dtype=dtype)
    tag = f"lowbit_rotate_{node.meta.get(ROTATE, node.name)}_cpu"
    consts = [
        None if t is None else add_constant(gm, f"{tag}_{name}", t, node)
        for name, t in zip(("r1", "r1_tail", "r2", "r2_tail"), prepared)
    ]
    node.target = lowbit_act.block_rotate_cpu
    node.args = (x, consts[0], consts[1], perm, consts[2], consts[3], dtype)
    for old in (blocks, tail, blocks2, tail2):
        if old is not None and not old.users:
            drop_constant(gm, old)
