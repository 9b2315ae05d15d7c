"""CPU weight-only linear that reads the packed codes as stored (``cpu_packed_linear.cpp``).

Invariant: the weight stays in ``packing.pack``'s dense layout (8, 4, 3 or 2 bits per
code) beside fp16 group scales and uint8 zero points, so resident memory is the recipe's
bits plus 3 bytes per group; ``packed_linear`` computes ``x @ (s * (q - z)).T + bias``.

* Few rows (``m <= GEMV_MAX_M``: decode): ``lowbit::packed_linear_cpu``, integer dot
  products of each weight block with the activation row quantized to int8 per block of 32
  channels (llama.cpp's q8 activations). Its numerics are :func:`reference_linear`'s.
* More rows (prefill): ``lowbit::dequant_packed_cpu`` writes the dense weight (bf16 where
  the CPU multiplies bf16 natively, else fp32) and the float GEMM runs on it.

The C++ is built on first use by inductor's C++ builder (cached on disk across processes).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cpp_build

__all__ = [
    "GEMV_MAX_M",
    "available",
    "library",
    "packed_linear",
    "packed_linear_group",
    "prepack",
    "reference_linear",
    "supports",
]

_SOURCE = Path(__file__).with_name("cpu_packed_linear.cpp")
BLOCK = 32  # channels per activation block and per unpacked code block
GEMV_MAX_M = 4  # rows up to which the integer GEMV beats dequantize + GEMM (--sweep)

torch.library.define(
    "lowbit::packed_linear_cpu",
    "(Tensor x, Tensor packed, Tensor scales, Tensor zeros, Tensor? bias, int bits, int group) "
    "-> Tensor",
)
torch.library.define(
    "lowbit::dequant_packed_cpu",
    "(Tensor packed, Tensor scales, Tensor zeros, int bits, int group, int k, ScalarType dtype) "
    "-> Tensor",
)


torch.library.define(
    "lowbit::packed_linear_cpu_group",
    "(Tensor x, Tensor[] packed, Tensor[] scales, Tensor[] zeros, Tensor?[] bias, int bits, "
    "int group) -> Tensor[]",
)


@torch.library.register_fake("lowbit::packed_linear_cpu_group")
def _(x, packed, scales, zeros, bias, bits, group):
    return [x.new_empty((*x.shape[:-1], p.shape[0]), dtype=torch.float32) for p in packed]


@torch.library.register_fake("lowbit::packed_linear_cpu")
def _(x, packed, scales, zeros, bias, bits, group):
    return x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=torch.float32)


@torch.library.register_fake("lowbit::dequant_packed_cpu")
def _(packed, scales, zeros, bits, group, k, dtype):
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


@functools.cache
def library() -> ctypes.CDLL:
    """Build (first call on a machine) and load the C++ ops (``cpp_build.load``)."""
    return cpp_build.load(_SOURCE, "lowbit_packed_built_with_avx2")


@functools.cache
def available() -> bool:
    """Whether the ops build and load here (else the caller keeps another path)."""
    return cpp_build.builds(library)


# the prefill GEMM's dtype: bf16 where oneDNN multiplies bf16 natively (AVX512-BF16 / AMX)
PREFILL_DTYPE = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def supports(k: int, group_size: int, bits: int) -> bool:
    """Whether the kernels take a ``[N, k]`` weight of these bits and group size."""
    return bits in (2, 3, 4, 8) and group_size % BLOCK == 0 and k % group_size == 0


def prepack(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict[str, torch.Tensor] | None:
    """The kernels' group parameters: ``scales16`` (fp16) and ``zeros8`` (uint8), or
    ``None`` where fp16 cannot hold the scales to 2^-10 relative (outside its normal range)
    or a zero point is not an integer in ``[0, 2**bits)``, or the ops do not build here.
    Loads the ops (so a graph that calls them can run)."""
    if not available():
        return None
    s = scales.detach().float()
    s16 = s.to(torch.float16)
    rel = ((s16.float() - s).abs() / s.abs().clamp_min(1e-30)).amax() if s.numel() else 0.0
    z = zeros.detach().float()
    z_ok = bool(((z == z.round()) & (z >= 0) & (z < 2**bits)).all())
    if not z_ok or not torch.isfinite(s16).all() or float(rel) > 2.0**-10:
        return None
    return {"scales16": s16.contiguous(), "zeros8": z.to(torch.uint8).contiguous()}


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales16: torch.Tensor,
    zeros8: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K]`` times the packed weight ``[N, words]`` -> ``[..., N]`` in ``x.dtype``."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if m <= GEMV_MAX_M:
        y = torch.ops.lowbit.packed_linear_cpu(x, packed, scales16, zeros8, bias, bits, group_size)
        return y.to(x.dtype)
    dtype = PREFILL_DTYPE
    w = torch.ops.lowbit.dequant_packed_cpu(packed, scales16, zeros8, bits, group_size, k, dtype)
    y = F.linear(x.to(dtype), w)
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype)


def packed_linear_group(x, packed, scales16, zeros8, bits: int, group_size: int, biases):
    """:func:`packed_linear` at few rows for several weights of one input (q/k/v,
    gate/up; the same bits and group size) in one call: ``x`` quantized once, one parallel
    pass over all their rows. Each output is the single call's bit for bit."""
    ys = torch.ops.lowbit.packed_linear_cpu_group(
        x, packed, scales16, zeros8, biases, bits, group_size
    )
    return [y.to(x.dtype) for y in ys]


def reference_linear(x, codes, scales16, zeros8, bits: int, group_size: int, bias=None):
    """What ``lowbit::packed_linear_cpu`` computes, in float64 from the unpacked ``codes``
    (uint8 ``[N, K]``): each row of x quantized to int8 per block of 32 channels."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    blocks = x2.reshape(x2.shape[0], k // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv)  # float32, as the kernel: round half to even
    xhat = (xq.double() * (amax / 127.0).double()).reshape(x2.shape)
    ng = k // group_size
    w = codes.double().reshape(codes.shape[0], ng, group_size) - zeros8.double().unsqueeze(-1)
    w = (w * scales16.double().unsqueeze(-1)).reshape(codes.shape[0], k)
    y = xhat @ w.T
    if bias is not None:
        y = y + bias.double()
    y = torch.where(torch.isfinite(amax).all(1), y, torch.full_like(y, float("nan")))
    return y.reshape(*x.shape[:-1], codes.shape[0])
