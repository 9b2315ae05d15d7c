"""CPU int8 kernels: oneDNN's int8 GEMM (``torch._int_mm``) with the rest in aten ops.

These are plain Python functions, not custom ops, on purpose: the lowering pass
puts them into the graph as ``call_function`` nodes, and when the graph goes to
inductor, AOT tracing turns them into aten ops so inductor fuses the activation
quantization into its producer and the dequantization epilogue into one
pointwise kernel. Extern calls: the GEMM (``torch._int_mm``, or on a CPU without int8
dot products (no VNNI / AMX) an exact float32 product of the codes, ``int8_matmul_int32``)
and ``int8-mixed``'s quantization with outlier copies (one C++ op for every site,
``cpu_quantize_copies``).

Invariant: every function computes ``reference``'s numerics exactly (int32 products, the
same float epilogue).
"""

from __future__ import annotations

import functools

import torch

from . import cpu_quantize_copies, reference
from .reference import epilogue_dtype, quantize_rows  # aten-only: what inductor should fuse

__all__ = [
    "quantize_rows",
    "quantize_rows_copies",
    "int8_linear",
    "int8_linear_channels_major",
    "int8_matmul_int32",
]


# Rows from which a CPU without int8 dot-product instructions multiplies the codes as
# float32. Measured on a 2-core AVX2 EPYC (2026-12-04), _int_mm / float32 ms: N x K =
# 4096 x 1024: M=1 1.56 / 1.71, M=2 2.96 / 1.47, M=16 22.6 / 3.4, M=64 91.6 / 6.2;
# 1536 x 576: M=1 0.29 / 0.20, M=16 4.63 / 0.59 (docs/results.md).
FLOAT_CODES_MIN_M = 2
# Every partial sum of a chunk of this many int8 x int8 products (|p| <= 128 * 128) is an
# integer below 2**24, so float32 holds it exactly in any summation order.
EXACT_FLOAT_CHUNK = 1024


@functools.cache
def has_int8_dot() -> bool:
    """Whether the CPU multiplies int8 natively (VNNI / AMX): oneDNN's ``_int_mm`` is
    fast there; without them it runs at about 3 GOP/s."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # not Linux: trust oneDNN
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)) or not flags


# Measured on a 2-core AMX Xeon (2 threads, K=576, N=1536): fp32 linear 5.9 ms at M=512 and
# 0.07 ms at M=1; ``_int_mm(q, w_q.t())`` 1.2 ms and 0.065 ms (2026-11-28; an earlier
# 0.015 ms at M=1 was the stride-0 bug handled here: no product computed). The weight is kept
# in nn.Linear layout ``[N, K]`` and passed transposed: that view is as fast as a
# contiguous ``[K, N]`` copy for M=512 and much faster for M=1 (1 ms: oneDNN reorders).
def int8_matmul_int32(q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``q[M, K] @ w_q[N, K]^T`` accumulated in int32 by oneDNN.

    oneDNN's ``_int_mm`` returns uninitialised memory for ``K == 1``, and for ``M == 1``
    when the row stride is 0 (which ``is_contiguous`` accepts for a size-1 dimension and
    inductor emits for one-token decode): the operand is viewed with its row stride set
    to ``K`` (the same elements; tests/test_lowering.py checks one-token decode).
    On a CPU without int8 dot products, from ``FLOAT_CODES_MIN_M`` rows the codes are
    multiplied in float32, in chunks of K whose sums are exact: the same int32 result,
    up to 15x faster there. A row count known only at run time (a MoE expert's) goes
    through one op that chooses then.
    """
    if q.shape[-1] == 1:
        return q.to(torch.int32) * w_q.to(torch.int32).t()
    m, k = q.shape
    if known_at_run_time(m):  # a MoE expert's rows: the path is chosen when they are known
        return torch.ops.lowbit.int8_matmul_int32_rows(q, w_q)
    if not has_int8_dot() and m >= FLOAT_CODES_MIN_M:
        return _int8_matmul_as_float(q, w_q)
    q, w_q = q.contiguous(), w_q.contiguous()
    n = w_q.shape[0]
    return torch._int_mm(q.as_strided((m, k), (k, 1)), w_q.as_strided((k, n), (1, k)))


def known_at_run_time(m) -> bool:
    """A row count the trace does not know (``lowbit::expert_rows``' output)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return isinstance(m, torch.SymInt) and bool(free_unbacked_symbols(m))


@torch.library.custom_op("lowbit::int8_matmul_int32_rows", mutates_args=())
def int8_matmul_int32_rows(q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """:func:`int8_matmul_int32` as one op, for a row count known only at run time."""
    return int8_matmul_int32(q, w_q)


@int8_matmul_int32_rows.register_fake
def _(q, w_q):
    return q.new_empty((q.shape[0], w_q.shape[0]), dtype=torch.int32)


def _int8_matmul_as_float(q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    k = q.shape[1]
    acc = None
    for k0 in range(0, k, EXACT_FLOAT_CHUNK):
        part = (
            q[:, k0 : k0 + EXACT_FLOAT_CHUNK].float()
            @ w_q[:, k0 : k0 + EXACT_FLOAT_CHUNK].float().t()
        )
        part = part.to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def quantize_rows_copies(x, copies, src, piece):
    """``reference.quantize_rows_copies``: the shared C++ op where it builds (as aten ops,
    inductor compiles one kernel per site, each of its own width K + E), else the aten
    reference."""
    if x.device.type == "cpu" and cpu_quantize_copies.available():
        return torch.ops.lowbit.quantize_rows_copies_cpu(x, copies, src, piece)
    return reference.quantize_rows_copies(x, copies, src, piece)


def int8_linear(q, x_scale, w_q, w_scale, bias, addend, out_dtype):
    """Same contract as ``reference.int8_linear``, with the fast int8 GEMM."""
    lead = q.shape[:-1]
    n = w_q.shape[0]
    acc = int8_matmul_int32(q.reshape(-1, q.shape[-1]), w_q)
    wide = epilogue_dtype(out_dtype)
    out = acc.to(wide) * x_scale.reshape(-1, 1) * w_scale
    if bias is not None:
        out = out + bias.to(wide)
    if addend is not None:
        out = out + addend.reshape(-1, n).to(wide)
    return out.to(out_dtype).reshape(*lead, n)


def int8_linear_channels_major(q, x_scale, w_q, w_scale, bias, addend, out_dtype):
    """:func:`int8_linear` computed as ``(W_q Q^T)^T``: the result is a transposed view
    of a contiguous ``[N, M]`` (channels-major) buffer.

    For a linear whose output feeds a channels-major consumer (``lowbit_act.block_rotate_cpu``
    copies its input to ``[K, M]``): the epilogue and the elementwise ops between
    (``silu(gate) * up``) then run in that layout, and inductor writes the consumer's
    copy without a transposition. Same integer products; the float epilogue multiplies
    in the same order.
    """
    lead = q.shape[:-1]
    n = w_q.shape[0]
    acc_t = int8_matmul_int32(w_q, q.reshape(-1, q.shape[-1]))  # W_q Q^T: [N, M]
    wide = epilogue_dtype(out_dtype)
    out = acc_t.to(wide) * x_scale.reshape(1, -1) * w_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.to(wide).reshape(-1, 1)
    if addend is not None:
        out = out + addend.reshape(-1, n).t().to(wide)
    return out.to(out_dtype).t().reshape(*lead, n)
