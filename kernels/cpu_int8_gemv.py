"""The int8 recipes' linear for few rows (decode) as one CPU call (``cpu_int8_gemv.cpp``).

Invariant: ``int8_linear_gemv`` computes ``reference.quantize_rows`` (or, with
``int8-mixed``'s outlier copies, ``reference.quantize_rows_copies``) followed by
``reference.int8_linear``: the same codes, int32 sums and float epilogue, in the same
order, so the same result bit for bit; with copies it reads only the first K + n_outl
columns of each weight row (the K columns, then each outlier column's first copy: its
copies all repeat its weight column), ``w8a8``'s bytes plus one per outlier column and
output row. At decode that replaces, per linear, the row
quantization, ``_int_mm`` and the epilogue: a one-token step of ``int8-mixed`` or
``w8a8`` makes one call per linear instead of an extern call and fused kernels, and
``int8_linear_gemv_group`` one call per input for the linears that share it.

The C++ is built on first use by inductor's C++ builder (cached on disk across processes).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import cpp_build

__all__ = ["GEMV_MAX_M", "available", "int8_linear_gemv", "int8_linear_gemv_group", "library"]

_SOURCE = Path(__file__).with_name("cpu_int8_gemv.cpp")
#: rows up to which the one-call kernel replaces ``_int_mm`` (decode; a few beams)
GEMV_MAX_M = 4

torch.library.define(
    "lowbit::int8_gemv_cpu",
    "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, Tensor? copies) -> Tensor",
)


@torch.library.register_fake("lowbit::int8_gemv_cpu")
def _(x, w_q, w_scale, bias, copies):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


torch.library.define(
    "lowbit::int8_gemv_cpu_group",
    "(Tensor x, Tensor[] w_q, Tensor[] w_scale, Tensor?[] bias, Tensor? copies) -> Tensor[]",
)


@torch.library.register_fake("lowbit::int8_gemv_cpu_group")
def _(x, w_q, w_scale, bias, copies):
    return [x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.float32) for w in w_q]


@functools.cache
def library() -> ctypes.CDLL:
    """Build (first call on a machine) and load the op (``cpp_build.load``)."""
    return cpp_build.load(_SOURCE, "lowbit_int8_gemv_built_with_avx2")


@functools.cache
def available() -> bool:
    """Whether the op builds and loads here (else the int8 GEMM path stays)."""
    return cpp_build.builds(library)


def int8_linear_gemv(x, w_q, w_scale, bias, copies, out_dtype):
    """``x [..., K]`` through the int8 linear -> ``[..., N]`` in ``out_dtype``; the
    operands as ``lowbit::int8_gemv_cpu`` takes them (``copies``: ``quantize_rows_copies``'
    constant, or None)."""
    y = torch.ops.lowbit.int8_gemv_cpu(x, w_q, w_scale, bias, copies)
    return y.to(out_dtype)


def int8_linear_gemv_group(x, w_qs, w_scales, biases, copies, out_dtypes):
    """:func:`int8_linear_gemv` for several linears of one input (q/k/v, gate/up) in one
    call: the row quantized once, one parallel pass over all their weight rows; a list
    of outputs, each the single call's bit for bit."""
    ys = torch.ops.lowbit.int8_gemv_cpu_group(x, w_qs, w_scales, biases, copies)
    return [y.to(dtype) for y, dtype in zip(ys, out_dtypes, strict=True)]
