"""CPU kernel of the fused online transform + per-token low-bit activation quantization.

``lowbit::rotate_quantize_rows_bits_cpu`` computes
``quantize_rows_bits(block_rotate(x, blocks, tail, perm, blocks2, tail2), bits)`` (the
reference: ``lowbit_act.rotate_quantize_rows_bits``) in one pass over the activations:
per tile of 16 tokens the transformed rows stay in a per-thread buffer, and only the
int8 codes and the scales are written (``cpu_rotate_quantize.cpp``). It replaces, per
site, the unfused CPU lowering (``lowbit_act.block_rotate_cpu`` + ``quantize_rows_bits``:
a transposed copy, batched matmuls, a gather and a quantization pass, each through
memory), and makes a W4A4 decode step's transform one call instead of a dozen ops.

Operand dtypes (:func:`prepare`): ``"float32"`` multiplies with fp32 FMAs (the products
and sums of the reference, in another order); ``"bfloat16"`` rounds the activations and
the block matrices to bf16 and multiplies them with AMX tiles accumulating in fp32 (the
same numerics as ``block_rotate_cpu`` on bf16 operands). bf16 needs a CPU with AMX-BF16
(``amx_available``) and blocks of a multiple of 32 channels; remainder blocks are fp32.

The C++ source is compiled on first use by inductor's C++ builder (its compiler flags for
this CPU; cached on disk across processes, like inductor's own kernels): a few seconds
once per machine.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .lowbit_act import qmax_for
from .reference import EPS

__all__ = ["CpuRotation", "amx_available", "library", "prepare", "rotate_quantize_rows_bits_cpu"]

_SOURCE = Path(__file__).with_name("cpu_rotate_quantize.cpp")
#: block sizes the fused kernel multiplies with vector FMAs or AMX (larger: not fused)
MAX_FUSED_BLOCK = 256
_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_long


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel (built on first call; raises inductor's CppCompileError)."""
    from torch._inductor.codecache import CppCodeCache

    lib = CppCodeCache.load(_SOURCE.read_text())
    fn = lib.lowbit_rotate_quantize_rows
    fn.argtypes = [_P, _L, _L, _P, _I, _I, _P, _I, _P, _P, _I, _I, _P, _I, _I, _I,
                   ctypes.c_float, _P, _P, _I]  # fmt: skip
    fn.restype = None
    lib.lowbit_built_with_amx.restype = _I
    return lib


@functools.cache
def amx_available() -> bool:
    """Whether the kernel was built with AMX-BF16 and the OS lets this process use it."""
    return bool(library().lowbit_built_with_amx()) and bool(torch.cpu._init_amx())


@dataclass(frozen=True)
class CpuRotation:
    """A transform's matrices as the kernel takes them (see :func:`prepare`)."""

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
    ``[i, j, :] = (B[2i, j], B[2i + 1, j])``."""
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


def _sizes(blocks, tail) -> tuple[int, int, int]:
    # [nb, b, b] fp32 or [nb, b / 2, b, 2] bf16 pairs: b is dimension 2 of both
    nb, bs = (0, 0) if blocks is None else (blocks.shape[0], blocks.shape[2])
    return nb, bs, 0 if tail is None else tail.shape[0]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rotate_quantize_rows_bits_cpu(
    x: torch.Tensor,
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None,
    blocks2: torch.Tensor | None,
    tail2: torch.Tensor | None,
    bits: int,
    amx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., K], scale float32 [..., 1])``; operands from :func:`prepare`."""
    qmax = qmax_for(bits)
    k = x.shape[-1]
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    m = xf.shape[0]
    nb1, bs1, r1 = _sizes(blocks, tail)
    nb2, bs2, r2 = _sizes(blocks2, tail2)
    for nb, bs, r in ((nb1, bs1, r1), (nb2, bs2, r2)):
        if (nb or r) and nb * bs + r != k:
            raise ValueError(f"blocks of {nb} x {bs} + {r} channels do not cover K = {k}")
    for b in (blocks, blocks2):
        if b is not None and b.dtype != (torch.bfloat16 if amx else torch.float32):
            raise ValueError("block operands do not match `amx` (see cpu_lowbit.prepare)")
    if perm is not None and (perm.dtype != torch.int32 or perm.numel() != k):
        raise ValueError("perm must be int32 with K entries (see cpu_lowbit.prepare)")
    q = torch.empty((m, k), dtype=torch.int8)
    scale = torch.empty((m, 1), dtype=torch.float32)
    if m:
        library().lowbit_rotate_quantize_rows(
            xf.data_ptr(), m, k, _ptr(blocks), nb1, bs1, _ptr(tail), r1, _ptr(perm),
            _ptr(blocks2), nb2, bs2, _ptr(tail2), r2, int(amx), qmax, EPS,
            q.data_ptr(), scale.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return q.reshape(*lead, k), scale.reshape(*lead, 1)


@torch.library.custom_op("lowbit::rotate_quantize_rows_bits_cpu", mutates_args=())
def _rotate_quantize_rows_bits_cpu_op(
    x: torch.Tensor,
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None,
    blocks2: torch.Tensor | None,
    tail2: torch.Tensor | None,
    bits: int,
    amx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU kernel as one graph node; see :func:`rotate_quantize_rows_bits_cpu`."""
    return rotate_quantize_rows_bits_cpu(x, blocks, tail, perm, blocks2, tail2, bits, amx)


@_rotate_quantize_rows_bits_cpu_op.register_fake
def _(x, blocks, tail, perm, blocks2, tail2, bits, amx):
    qmax_for(bits)
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )
