"""Triton weight-only dequantizing GEMM (prefill) and split-K GEMV (decode) for the
``w{8,4,3,2}a16-g{G}`` recipes: ``lowbit::dequant_linear_triton`` (fake implementation for
tracing beside it).

Invariant: the numerics of ``weight_only_reference.dequant_linear``. Both kernels unpack
the codes in-register (``packing.py``'s layout), dequantize ``(q - z) * s`` in float32,
round the weight tile to the activation dtype (what the reference feeds its GEMM) and
accumulate ``x * w`` in float32 (fp32 activations with ``input_precision="ieee"``, no
TF32), so the result differs from the reference only by summation order; bias is added in
float32 and the output rounded once to ``x.dtype``. Developed and tested only under the
Triton interpreter (``TRITON_INTERPRET=1``, see ``triton_int8``): the GPU compile path is
unexercised and the autotune configs are untuned guesses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import SUPPORTED_BITS, packed_words
from .triton_common import _interpret_env, gemm_configs, gemm_grid, grouped_tile
from .triton_int8 import _device_ctx, _require_triton, _round_to_bf16_grid

GEMV_MAX_M = 1  # "auto" uses the split-K GEMV for M <= this

# --------------------------------------------------------------------------- #
# Shared device helpers
# --------------------------------------------------------------------------- #


# Unpacking gathers each code's word(s) per element (a word is re-read 32/BITS times, from
# L1) and scales/zeros per element; a tuned kernel would load each word once and
# interleave with ``tl.join``/``tl.reshape`` — correctness first here.
@triton.jit
def _unpack_codes(row_ptrs, offs_k, ok, BITS: tl.constexpr):
    """Codes at K positions ``offs_k`` of the rows ``row_ptrs`` point to (int32 words).

    ``row_ptrs`` and ``offs_k`` broadcast to the tile shape; returns int32 codes
    (0 where ``ok`` is false).
    """
    bit = offs_k * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    lo = tl.load(row_ptrs + word, mask=ok, other=0).to(tl.uint32, bitcast=True)
    v = lo >> shift
    if (32 % BITS) != 0:  # dense 3-bit: the code may continue in the next word
        spill = ok & ((bit & 31) + BITS > 32)
        hi = tl.load(row_ptrs + word + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
        # (32 - shift) & 31 stays in range; where nothing spills hi is 0
        v = v | (hi << ((32 - shift) & 31))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(codes, s_ptrs, z_ptrs, ok, W_DTYPE: tl.constexpr):
    s = tl.load(s_ptrs, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptrs, mask=ok, other=0.0).to(tl.float32)
    w = (codes.to(tl.float32) - z) * s
    if W_DTYPE == tl.bfloat16:
        w = _round_to_bf16_grid(w)  # the interpreter's cast truncates
    return w.to(W_DTYPE)


# --------------------------------------------------------------------------- #
# GEMM (prefill and any M)
# --------------------------------------------------------------------------- #


def dequant_gemm_configs() -> list[triton.Config]:
    """Autotune configs for ``_dequant_gemm_kernel``; BLOCK_K is a power of two >= 16."""
    cfg = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)
        (128, 128, 64, 8, 3, 8),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
        (64, 64, 128, 8, 3, 4),
        (32, 64, 64, 8, 4, 4),
        (16, 64, 128, 8, 4, 4),  # small M
        (16, 128, 64, 8, 4, 4),
    ]
    return gemm_configs(cfg, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4})


# One template for all bit widths (``BITS`` and ``GROUP_SIZE`` are ``tl.constexpr``): tiles
# ``[BLOCK_M, BLOCK_N]`` of the output, K in ``BLOCK_K`` steps, grouped program order.
@triton.autotune(configs=dequant_gemm_configs(), key=["M", "N", "K", "BITS", "GROUP_SIZE"])
@triton.jit
def _dequant_gemm_kernel(
    # pointers
    x_ptr,
    p_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_pn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_on,
    # meta
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, offs_k, m_ok, n_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    n64 = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    p_rows = p_ptr + n64[None, :] * stride_pn  # [1, BLOCK_N]; K runs down the tile
    s_rows = s_ptr + n64[None, :] * stride_sn
    z_rows = z_ptr + n64[None, :] * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        codes = _unpack_codes(p_rows, ks[:, None], w_ok, BITS)  # [BLOCK_K, BLOCK_N]
        g = (ks // GROUP_SIZE)[:, None]
        w = _dequant_tile(codes, s_rows + g, z_rows + g, w_ok, x_ptr.dtype.element_ty)
        if DOT_FP32:  # exact upcast: bf16 products are exact in float32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = _round_to_bf16_grid(acc)
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------- #
# Split-K GEMV (decode, M == 1)
# --------------------------------------------------------------------------- #


def dequant_gemv_configs() -> list[triton.Config]:
    """Autotune configs for ``_dequant_gemv_kernel`` (BLOCK_K is any power of two >= 16)."""
    if _interpret_env():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)]
    cfg = [(32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (16, 256, 4), (128, 128, 8)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_stages=3, num_warps=w)
        for bn, bk, w in cfg
    ]


# Decode (M == 1): there is no row tile to feed ``tl.dot``; each program reduces a
# ``[BLOCK_N]`` slice of outputs over one of ``SPLIT_K`` K-ranges with elementwise products
# and ``tl.sum`` and writes a float32 partial; the wrapper sums the partials in a fixed
# order (deterministic, no atomics) and adds bias. The wrapper chooses ``SPLIT_K``
# (``_split_k``) so that there are enough programs to fill the GPU even when N is small;
# each K-range is a whole number of groups.
@triton.autotune(
    configs=dequant_gemv_configs(), key=["N", "K", "K_PER_SPLIT", "BITS", "GROUP_SIZE"]
)
@triton.jit
def _dequant_gemv_kernel(
    # pointers
    x_ptr,
    p_ptr,
    s_ptr,
    z_ptr,
    part_ptr,
    # sizes
    M,
    N,
    K,
    K_PER_SPLIT,
    # strides
    stride_xm,
    stride_xk,
    stride_pn,
    stride_sn,
    stride_zn,
    stride_ps,  # partials [SPLIT_K, M, N] (contiguous)
    stride_pm,
    # meta
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    n64 = offs_n.to(tl.int64)
    p_rows = p_ptr + n64[:, None] * stride_pn  # [BLOCK_N, 1]; K runs along the tile
    s_rows = s_ptr + n64[:, None] * stride_sn
    z_rows = z_ptr + n64[:, None] * stride_zn
    x_row = x_ptr + m * stride_xm

    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < k_end
        xv = tl.load(x_row + ks * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        w_ok = n_ok[:, None] & k_ok[None, :]
        codes = _unpack_codes(p_rows, ks[None, :], w_ok, BITS)  # [BLOCK_N, BLOCK_K]
        g = (ks // GROUP_SIZE)[None, :]
        w = _dequant_tile(codes, s_rows + g, z_rows + g, w_ok, x_ptr.dtype.element_ty)
        acc += w.to(tl.float32) * xv[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(part_ptr + split * stride_ps + m * stride_pm + offs_n, out, mask=n_ok)


def _split_k(n: int, k: int, group_size: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT_K, K_PER_SPLIT): K-ranges of whole groups, enough programs for the device."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, (2 * sms * 64) // max(n, 1))  # ~2 waves of 64-wide N blocks
    else:
        target = 2  # interpreter: exercise the split path, keep it cheap
    groups = k // group_size
    split = max(1, min(target, groups, 64))
    per = -(-groups // split) * group_size
    return -(-k // per), per


# --------------------------------------------------------------------------- #
# Wrapper and custom op
# --------------------------------------------------------------------------- #


def _check_args(x, packed, scales, zeros, bias, bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    k = x.shape[-1]
    n = packed.shape[0]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide K={k}")
    if packed.dtype != torch.int32 or packed.shape != (n, packed_words(k, bits)):
        raise ValueError(
            f"packed must be int32 [N, {packed_words(k, bits)}] for K={k}, {bits} bits; "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if scales.shape != (n, k // group_size) or zeros.shape != (n, k // group_size):
        raise ValueError(f"scales/zeros must be [{n}, {k // group_size}]")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} elements")


def dequant_linear_triton_impl(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    path: str = "auto",
) -> torch.Tensor:
    """Triton ``weight_only_reference.dequant_linear``.

    ``x [..., K]`` fp16 / bf16 / fp32; ``packed`` int32 ``[N, ceil(K*bits/32)]`` from
    ``packing.pack``; ``scales``, ``zeros`` ``[N, K // group_size]`` (any float dtype,
    read as float32); ``bias [N]`` or None. Returns ``[..., N]`` in ``x.dtype``. ``path``:
    ``"gemm"`` (tiled ``tl.dot``), ``"gemv"`` (split-K reduction, decode) or ``"auto"``
    (``"gemv"`` when M <= ``GEMV_MAX_M``).
    """
    _check_args(x, packed, scales, zeros, bias, bits, group_size)
    _require_triton(x.device)
    K = x.shape[-1]
    N = packed.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    p = packed.contiguous()
    s = scales.contiguous()
    z = zeros.contiguous()
    b = bias.reshape(N).contiguous() if bias is not None else None
    if path == "auto":
        path = "gemv" if M <= GEMV_MAX_M else "gemm"
    if path not in ("gemm", "gemv"):
        raise ValueError(f"path must be 'auto', 'gemm' or 'gemv', got {path!r}")
    if M == 0 or N == 0:
        return torch.zeros((*lead, N), dtype=x.dtype, device=x.device)

    with _device_ctx(x.device):
        if path == "gemm":
            # The interpreter's tl.dot multiplies bf16 operands as their raw uint16
            # bits (triton 3.9); there the bf16 tiles are upcast to float32 first.
            bf16_upcast = x.dtype == torch.bfloat16 and x.device.type == "cpu"
            out = torch.empty((M, N), dtype=x.dtype, device=x.device)
            _dequant_gemm_kernel[gemm_grid(M, N)](
                x2,
                p,
                s,
                z,
                b if b is not None else out,
                out,
                M,
                N,
                K,
                x2.stride(0),
                x2.stride(1),
                p.stride(0),
                s.stride(0),
                z.stride(0),
                out.stride(0),
                out.stride(1),
                BITS=bits,
                GROUP_SIZE=group_size,
                HAS_BIAS=b is not None,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 or bf16_upcast else "tf32",
                DOT_FP32=bf16_upcast,
            )
            return out.reshape(*lead, N)

        split, per = _split_k(N, K, group_size, x.device)
        part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)

        def grid_v(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), split, M)

        _dequant_gemv_kernel[grid_v](
            x2,
            p,
            s,
            z,
            part,
            M,
            N,
            K,
            per,
            x2.stride(0),
            x2.stride(1),
            p.stride(0),
            s.stride(0),
            z.stride(0),
            part.stride(0),
            part.stride(1),
            BITS=bits,
            GROUP_SIZE=group_size,
        )
    y = part.sum(0)
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype).reshape(*lead, N)


@torch.library.custom_op("lowbit::dequant_linear_triton", mutates_args=())
def dequant_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Weight-only low-bit linear (Triton); see ``weight_only_reference.dequant_linear``."""
    return dequant_linear_triton_impl(x, packed, scales, zeros, bias, bits, group_size)


@dequant_linear_triton.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


__all__ = [
    "GEMV_MAX_M",
    "dequant_gemm_configs",
    "dequant_gemv_configs",
    "dequant_linear_triton",
    "dequant_linear_triton_impl",
]
