"""lower: replace the target-neutral ``lowbit::`` ops with the target's kernels.

Precondition: quantizing passes ran; the graph holds ``lowbit::quantize_rows``,
``lowbit::int8_linear`` and possibly ``lowbit::int8_mixed_linear_dynamic``,
``lowbit::dequant_linear`` (weight-only), and for the low-bit weight-activation
recipes ``lowbit::quantize_rows_bits`` and the rotate pass's ``lowbit::block_rotate``.
Postcondition:
  * target ``cpu``: ``quantize_rows`` / ``int8_linear`` become the aten-level functions
    of ``qcompile.kernels.cpu_int8`` (oneDNN ``_int_mm``; inductor fuses the rest);
    low-bit sites (:func:`fuse_lowbit_cpu`): identical ``quantize_rows_bits`` nodes
    merged, and each one reading a ``block_rotate`` becomes
    ``lowbit::rotate_quantize_rows_bits_cpu`` (``kernels.cpu_lowbit``: transform and
    quantization in one pass, operands in the dtype of :func:`cpu_transform_dtype`:
    bf16 on AMX for <= 6-bit activations where the CPU has it, by default, else fp32),
    which also computes the site's producer where it is an RMSNorm (it reads the norm's
    input: ``rms_norm_prologue``) or ``silu(gate) * up`` of two int8 linears (it reads
    their int32 GEMMs: ``swiglu_prologue``);
    the rest keep their aten functions in ``qcompile.kernels.lowbit_act``
    (``quantize_rows_bits`` without a transform; a ``block_rotate`` over
    ``cpu_lowbit.MAX_FUSED_BLOCK`` channels or read by something else becomes
    ``block_rotate_cpu``: channels-major, so inductor runs the permutation as a row
    gather, matrices transposed and in the same operand dtype; the int8 linears that
    produce its input through elementwise ops then compute it channels-major,
    ``cpu_int8.int8_linear_channels_major``); the dynamic op stays a custom op
    (data-dependent columns) that runs ``_int_mm``; ``dequant_linear`` (weight-only) becomes
    ``cpu_weight_only.dequant_linear_cpu`` reading the packed codes as stored
    (``kernels.cpu_packed``; oneDNN's int4 layout where that cannot take the weight);
  * target ``triton``: ``quantize_rows``, ``int8_linear`` and ``dequant_linear`` become
    ``lowbit::quantize_rows_triton``, ``lowbit::int8_linear_triton`` and
    ``lowbit::dequant_linear_triton``. Low-bit sites (:func:`fuse_lowbit_triton`):
    identical ``quantize_rows_bits`` nodes (q/k/v read one input) are merged; each
    becomes ``lowbit::rotate_quantize_rows_bits_triton``, which also applies the
    ``block_rotate`` feeding it (operands prepared here; the float transformed
    activation is never stored); where the activations are 4-bit and every consumer
    is an ``int8_linear`` with 4-bit weights (W4A4), the kernel writes packed int4 and
    those linears become ``lowbit::int4_linear_triton`` with their weights packed here.
    Not fused (reference kernels stay, on any device): a ``block_rotate`` whose blocks
    exceed ``triton_lowbit.MAX_FUSED_BLOCK`` (the Hadamard recipe's ``K x K`` block;
    its output is then quantized by the fused kernel without a transform), a
    ``block_rotate`` read by something else too (it keeps its aten function for that
    reader), and activations that are not fp32 / fp16 / bf16. W4A8 and W6A6 sites use
    ``int8_linear_triton`` on unpacked codes. The dynamic op keeps its reference kernel.
Numerical contract: integer GEMM results identical to the reference; float epilogue
within float32 rounding; the fused transform's codes as ``triton_lowbit`` states
(identical where its sums are exact, else a code may move by 1 at a rounding tie).
Returns the number of nodes lowered (merged duplicates included).
"""

from __future__ import annotations

import operator
import warnings
from functools import partial

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import PassContext, add_constant
from qcompile.kernels import cpu_int8, cpu_weight_only, lowbit_act
from qcompile.kernels.cpu_weight_only import prepack_cpu
from qcompile.kernels.packing import pack, unpack
from qcompile.passes._folding import drop_constant

from . import rms_norm_prologue, swiglu_prologue


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
        from qcompile.kernels import triton_dequant_gemm, triton_lowbit  # noqa: F401  (ops)

        return {
            lowbit.quantize_rows.default: lowbit.quantize_rows_triton.default,
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
    gm.recompile()
    return lowered


def fuse_lowbit_triton(gm: fx.GraphModule, ctx: PassContext | None = None) -> int:
    """Triton target: ``block_rotate -> quantize_rows_bits (-> int8_linear)`` into the
    fused kernels of ``kernels.triton_lowbit`` (see the module docstring). A site whose
    weights get packed has its ``bits_per_weight`` updated. Returns the number of nodes
    rewritten or merged."""
    from qcompile.kernels import triton_lowbit

    graph = gm.graph
    lowbit = torch.ops.lowbit
    quantize, rewrites = _merge_quantizations(graph)

    operands: dict[fx.Node, tuple | None] = {}  # block_rotate -> fused operands
    packed: dict[fx.Node, fx.Node] = {}  # int8 weight constant -> its packed int4 copy
    sites = {s.node: s for s in ctx.sites} if ctx is not None else {}
    rotations = set()
    for (x, bits), qn in quantize.items():
        dtype = _activation_dtype(x, qn)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue  # the reference kernel stays
        transform = (None, None, None, 0)
        if _is_block_rotate(x):
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
    _erase_unread(gm, rotations)  # the block_rotate nodes the kernels replaced
    gm.recompile()
    return rewrites


def fuse_lowbit_cpu(gm: fx.GraphModule, ctx: PassContext) -> int:
    """CPU target: identical ``quantize_rows_bits`` nodes merged, and each one reading a
    ``block_rotate`` (blocks up to ``cpu_lowbit.MAX_FUSED_BLOCK``) becomes
    ``lowbit::rotate_quantize_rows_bits_cpu`` with the transform's operands prepared here
    in the operand dtype of :func:`cpu_transform_dtype`. Where the kernel cannot be built
    (no C++ compiler) nothing is fused and a warning says so. Returns the number of nodes
    rewritten or merged."""
    from qcompile.kernels import cpu_lowbit

    graph = gm.graph
    quantize, rewrites = _merge_quantizations(graph)
    sites = [(x, bits, qn) for (x, bits), qn in quantize.items() if _is_block_rotate(x)]
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
        dtype = _activation_dtype(x, qn)
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
    _erase_unread(gm, rotations)  # the block_rotate nodes the kernels replaced
    for chain in chains:  # the producers the kernels now compute (read by nothing else)
        _erase_unread(gm, chain)
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
    tag = f"lowbit_rotate_{rot.meta.get('lowbit.rotate', rot.name)}_cpu"
    names = ("r1", "r1_tail", "perm", "r2", "r2_tail")
    tensors = (ops.blocks, ops.tail, ops.perm, ops.blocks2, ops.tail2)
    nodes = [
        None if t is None else add_constant(gm, f"{tag}_{name}", t, rot)
        for name, t in zip(names, tensors)
    ]
    return (*nodes, ops.amx)


def _erase_unread(gm: fx.GraphModule, nodes) -> None:
    """Erase the ``nodes`` (in order) that nothing reads, and the constants they alone
    read."""
    for node in nodes:
        if node.users:
            continue
        consts = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        gm.graph.erase_node(node)
        for c in consts:
            if not c.users:
                drop_constant(gm, c)


def _merge_quantizations(graph: fx.Graph) -> tuple[dict[tuple, fx.Node], int]:
    """Merge ``quantize_rows_bits`` nodes with the same input and bits (q/k/v read one
    input): ``({(input, bits): node}, number merged)``."""
    quantize: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if (
            node.op == "call_function"
            and node.target is torch.ops.lowbit.quantize_rows_bits.default
        ):
            key = (node.args[0], node.args[1])
            if key in quantize:  # same input, same bits: the same codes
                node.replace_all_uses_with(quantize[key])
                graph.erase_node(node)
                merged += 1
            else:
                quantize[key] = node
    return quantize, merged


def _is_block_rotate(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is torch.ops.lowbit.block_rotate.default
    )


def _activation_dtype(x: fx.Node, qn: fx.Node) -> torch.dtype | None:
    val = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return val.dtype
    for use in qn.users:  # int8_linear's out_dtype is the activation dtype
        for lin in use.users:
            if lin.target is torch.ops.lowbit.int8_linear.default:
                return lin.args[6]
    return None


def _rotation_constants(gm: fx.GraphModule, rot: fx.Node, dtype, triton_lowbit) -> tuple | None:
    """get_attr nodes ``(w1, src, w2, block)`` of the fused kernel for ``rot``, or None
    when its blocks are too large to fuse."""
    tensors = [None if a is None else getattr(gm, a.target) for a in rot.args[1:]]
    blocks, tail = tensors[0], tensors[1]
    if not triton_lowbit.fused_block_ok(blocks, tail):
        return None
    ops = triton_lowbit.prepare_rotation(*tensors, dtype=dtype)
    tag = f"lowbit_rotate_{rot.meta.get('lowbit.rotate', rot.name)}_triton"
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
        w = lowbit_act.pack_int4(getattr(gm, w_node.target))
        p_node = packed[w_node] = add_constant(gm, f"{w_node.target}_int4packed", w, w_node)
    lin.target = torch.ops.lowbit.int4_linear_triton.default
    lin.args = (q, s, p_node, w_scale, bias, out_dtype)
    if not w_node.users:
        drop_constant(gm, w_node)


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
    tag = f"lowbit_rotate_{node.meta.get('lowbit.rotate', node.name)}_cpu"
    consts = [
        None if t is None else add_constant(gm, f"{tag}_{name}", t, node)
        for name, t in zip(("r1", "r1_tail", "r2", "r2_tail"), prepared)
    ]
    node.target = lowbit_act.block_rotate_cpu
    node.args = (x, consts[0], consts[1], perm, consts[2], consts[3], dtype)
    for old in (blocks, tail, blocks2, tail2):
        if old is not None and not old.users:
            drop_constant(gm, old)


def _packed_from_cpu(w4, shift, bits: int, group: int) -> dict[str, torch.Tensor]:
    return {"packed": pack(cpu_weight_only.restore_codes(w4, shift, group), bits)}


def _packed_from_cpu8(w4_hi, w4_lo, n: int, k: int) -> dict[str, torch.Tensor]:
    return {"packed": pack(cpu_weight_only.restore_codes8(w4_hi, w4_lo, n, k), 8)}


def _group_params(scales16, zeros8, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"scales": scales16.to(dtype), "zeros": zeros8.to(dtype)}


def lower_dequant_linear_cpu(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    """Prepack a weight-only site for ``cpu_weight_only.dequant_linear_cpu``.

    Once per weight (kept beside its stored products, ``Artifact.derived``, so every
    graph of the model shares one copy): the packed codes themselves with fp16 scales
    and uint8 zero points (``cpu_packed``), or, where those kernels cannot take the
    weight, the codes re-laid out for oneDNN's int4 kernel. What the CPU layout holds
    exactly may be dropped from the stored products when the fp weight is released
    (``artifacts.compact``); the generic constants leave the graph when nothing else
    reads them.
    """
    x, packed, scales, zeros, bias, bits, group = node.args
    tensors = {n: getattr(gm, n.target) for n in (packed, scales, zeros)}
    k = x.meta["example_value"].shape[-1] if "example_value" in x.meta else None
    n_out = tensors[scales].shape[0]
    k = k or tensors[scales].shape[1] * group
    out_val = node.meta.get("example_value")
    act_dtype = out_val.dtype if out_val is not None else tensors[scales].dtype
    site = ctx.site_of(node)
    art = artifacts.holding(site.weight, tensors[scales]) if site is not None else None
    cache_key = ("cpu", bits, group, str(act_dtype))
    prepacked = art.derived.get(cache_key) if art is not None else None
    if prepacked is None:  # once per weight: prefill and decode graphs share the layout
        codes = unpack(tensors[packed], bits, k)
        prepacked = prepack_cpu(
            codes, tensors[scales], tensors[zeros], bits, group, act_dtype, packed=tensors[packed]
        )
        if art is not None:
            art.derived[cache_key] = prepacked
            if "packed" in prepacked and art.rebuild is None:
                s16, z8 = prepacked["scales16"], prepacked["zeros8"]
                s, z = art.tensors.get("scales"), art.tensors.get("zeros")
                if s is not None and z is not None and torch.equal(s16.to(s.dtype), s):
                    if torch.equal(z8.to(z.dtype), z) and s.dtype == z.dtype:
                        art.rebuild = partial(_group_params, s16, z8, s.dtype)
            elif "w4" in prepacked and "codes" not in prepacked and art.rebuild is None:
                # the layout holds the codes exactly: the generic packed copy can be
                # dropped when the fp weight is released (artifacts.compact)
                shift = cpu_weight_only.group_shift(prepacked["w4"], codes, group)
                art.derived[("cpu-shift", *cache_key)] = {"shift": shift}
                art.rebuild = partial(_packed_from_cpu, prepacked["w4"], shift, bits, group)
            elif "w4_hi" in prepacked and "codes" not in prepacked and art.rebuild is None:
                hi, lo = prepacked["w4_hi"], prepacked["w4_lo"]
                art.rebuild = partial(_packed_from_cpu8, hi, lo, n_out, k)
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
