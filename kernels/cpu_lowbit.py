"""CPU kernel of the fused online transform + per-token low-bit activation quantization.

``lowbit::rotate_quantize_rows_bits_cpu`` computes
``quantize_rows_bits(block_rotate(x, blocks, tail, perm, blocks2, tail2), bits)`` (the
reference: ``lowbit_reference.rotate_quantize_rows_bits``) in one pass over the activations:
per tile of 32 tokens the transformed rows stay in per-thread buffers, and only the
int8 codes and the scales are written (``cpu_rotate_quantize.cpp``). It replaces, per
site, the unfused CPU lowering (``lowbit_act.block_rotate_cpu`` + ``quantize_rows_bits``:
a transposed copy, batched matmuls, a gather and a quantization pass, each through
memory), and makes a W4A4 decode step's transform one call instead of a dozen ops.

``lowbit::swiglu_rotate_quantize_rows_bits_cpu`` is the same kernel on ``silu(gate) *
up`` formed per tile from the int32 accumulators of the gate and up linears (see
:func:`swiglu_rotate_quantize_rows_bits_cpu`). Activations of any float dtype are
read; on the AMX path bf16 ones (a bf16 model's) go to the first stage as they are,
other dtypes are widened to fp32 first.

Invariant: the codes and scales of the reference for the operands' dtype: fp32 operands
sum the reference's products in another order, bf16 ones (:func:`prepare`) have the
numerics of ``block_rotate_cpu`` on bf16 operands.

The ops' schemas and fakes are defined here; their CPU implementation is C++ registered
with the dispatcher, built and loaded by :func:`library`.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpp_build
from .lowbit_act import qmax_for
from .reference import empty_quantized_rows

__all__ = [
    "CpuRotation",
    "amx_available",
    "library",
    "prepare",
    "rotate_quantize_rows_bits_cpu",
    "swiglu_rotate_quantize_rows_bits_cpu",
]

_SOURCE = Path(__file__).with_name("cpu_rotate_quantize.cpp")
#: block sizes the fused kernel multiplies with vector FMAs or AMX (larger: not fused)
MAX_FUSED_BLOCK = 256

torch.library.define(
    "lowbit::rotate_quantize_rows_bits_cpu",
    "(Tensor x, Tensor? blocks, Tensor? tail, Tensor? perm, Tensor? blocks2, Tensor? tail2, "
    "int bits, bool amx) -> (Tensor, Tensor)",
)


@torch.library.register_fake("lowbit::rotate_quantize_rows_bits_cpu")
def _(x, blocks, tail, perm, blocks2, tail2, bits, amx):
    qmax_for(bits)
    return empty_quantized_rows(x)


torch.library.define(
    "lowbit::swiglu_rotate_quantize_rows_bits_cpu",
    "(Tensor gate, Tensor up, Tensor act_scale, Tensor gate_scale, Tensor up_scale, "
    "Tensor? blocks, Tensor? tail, Tensor? perm, Tensor? blocks2, Tensor? tail2, "
    "int bits, bool amx) -> (Tensor, Tensor)",
)


@torch.library.register_fake("lowbit::swiglu_rotate_quantize_rows_bits_cpu")
def _(gate, up, act_scale, gate_scale, up_scale, blocks, tail, perm, blocks2, tail2, bits, amx):
    qmax_for(bits)
    return (
        torch.empty(gate.shape, dtype=torch.int8, device=gate.device),
        torch.empty((gate.shape[0], 1), dtype=torch.float32, device=gate.device),
    )


@functools.cache
def library() -> ctypes.CDLL:
    """Build (first call on a machine) and load the C++ implementation, registering it
    for ``lowbit::rotate_quantize_rows_bits_cpu``; raises inductor's CppCompileError
    where it cannot be built.

    Registered with the dispatcher, a call costs no Python (a decode step makes one per
    input node). Built by ``cpp_build.load``; the lowering calls this before it inserts
    the op."""
    return cpp_build.load(_SOURCE, "lowbit_built_with_amx")


@functools.cache
def amx_available() -> bool:
    """Whether the kernel was built with AMX-BF16 and the OS lets this process use it."""
    return bool(library().lowbit_built_with_amx()) and bool(torch.cpu._init_amx())


@dataclass(frozen=True)
class CpuRotation:
    """A transform's operands as the kernel takes them (see :func:`prepare`)."""

    blocks: torch.Tensor | None
    tail: torch.Tensor | None
    perm: torch.Tensor | None
    blocks2: torch.Tensor | None
    tail2: torch.Tensor | None
    amx: bool


def fusable(blocks: torch.Tensor | None, blocks2: torch.Tensor | None) -> bool:
    """Whether the kernel takes these blocks (at most :data:`MAX_FUSED_BLOCK` wide)."""
    return all(b is None or b.shape[-1] <= MAX_FUSED_BLOCK for b in (blocks, blocks2))


def prepare(blocks, tail, perm, blocks2, tail2, dtype: torch.dtype) -> CpuRotation:
    """Operands for ``dtype`` (float32 or bfloat16): fp32 contiguous matrices, ``perm``
    as int32; for bf16 (where :func:`amx_available` and every block is a multiple of 32
    wide, else fp32 operands) the blocks as bf16 pairs ``[nb, b / 2, b, 2]`` with
    ``[i, j, :] = (B[2i, j], B[2i + 1, j])``.

    ``"float32"`` multiplies with fp32 FMAs (the products and sums of the reference, in
    another order); ``"bfloat16"`` rounds the activations and the block matrices to bf16
    and multiplies them with AMX tiles accumulating in fp32 (the same numerics as
    ``block_rotate_cpu`` on bf16 operands). bf16 needs a CPU with AMX-BF16
    (``amx_available``) and blocks of a multiple of 32 channels; remainder blocks are
    fp32."""
    full = [b for b in (blocks, blocks2) if b is not None]
    amx = (
        dtype == torch.bfloat16
        and bool(full)
        and all(b.shape[-1] % 32 == 0 for b in full)
        and amx_available()
    )

    def block_operand(b):
        if b is None:
            return None
        if not amx:
            return b.detach().float().contiguous()
        nb, n, _ = b.shape
        pairs = b.detach().to(torch.bfloat16).reshape(nb, n // 2, 2, n).transpose(-1, -2)
        return pairs.contiguous()

    def fp32(t):
        return None if t is None else t.detach().float().contiguous()

    return CpuRotation(
        block_operand(blocks),
        fp32(tail),
        None if perm is None else perm.detach().to(torch.int32).contiguous(),
        block_operand(blocks2),
        fp32(tail2),
        amx,
    )


def swiglu_rotate_quantize_rows_bits_cpu(
    q, x_scale, w_gate, gate_scale, w_up, up_scale, blocks, tail, perm, blocks2, tail2, bits, amx
):
    """The fused kernel on ``silu(gate) * up`` for ``gate = int8_linear(q, x_scale, w_gate,
    gate_scale)`` and ``up`` likewise (no bias, float32; ``lowering/swiglu_prologue.py``):
    the two int32 GEMMs are oneDNN's, the kernel dequantizes their accumulators and forms
    the product per tile of rows. Operands as :func:`prepare` makes them; returns
    ``(q int8 [..., N], scale float32 [..., 1])`` with ``q``'s leading dimensions."""
    from .cpu_int8 import int8_matmul_int32

    lead = q.shape[:-1]
    rows = q.reshape(-1, q.shape[-1])
    codes, scale = torch.ops.lowbit.swiglu_rotate_quantize_rows_bits_cpu(
        int8_matmul_int32(rows, w_gate),
        int8_matmul_int32(rows, w_up),
        x_scale.reshape(-1).float().contiguous(),
        gate_scale.float().contiguous(),
        up_scale.float().contiguous(),
        blocks, tail, perm, blocks2, tail2, bits, amx,
    )  # fmt: skip
    return codes.reshape(*lead, codes.shape[-1]), scale.reshape(*lead, 1)


def rotate_quantize_rows_bits_cpu(x: torch.Tensor, ops: CpuRotation, bits: int):
    """``(q int8 [..., K], scale float32 [..., 1])`` of ``x`` under the transform ``ops``
    (from :func:`prepare`), through the op (building it if needed)."""
    library()
    return torch.ops.lowbit.rotate_quantize_rows_bits_cpu(
        x, ops.blocks, ops.tail, ops.perm, ops.blocks2, ops.tail2, bits, ops.amx
    )
