"""Triton kernels for the int8 path: per-token activation quantization
(``lowbit::quantize_rows_triton``) and an int8 x int8 -> int32 GEMM with a fused
dequantization epilogue (``lowbit::int8_linear_triton``), custom ops with the signatures
of the generic ops in ``ops.py``; also the availability checks of every Triton module.

Invariant: the quantization is bit-exact against ``reference.quantize_rows``; the GEMM's
int32 accumulator is exact and its epilogue runs ``reference.int8_linear``'s float32
operations in the same order.
Without a GPU the kernels run only under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` (and this module) is imported;
``triton_available`` reports whether they can run.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import reference as ref
from .triton_common import _interpret_env, gemm_configs, gemm_grid, grouped_tile

# --------------------------------------------------------------------------- #
# Availability
# --------------------------------------------------------------------------- #


def _kernels_interpreted() -> bool:
    # triton.jit picks the interpreter at decoration time, i.e. when this module
    # was imported; setting the variable later has no effect on these kernels.
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_quantize_rows_kernel, InterpretedFunction)


_HINT = (
    "set TRITON_INTERPRET=1 in the environment before importing triton (to run the "
    "Triton kernels on CPU tensors with the interpreter), or use target='cpu'"
)


def triton_available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and if not, why.

    True when CUDA is available, or when ``TRITON_INTERPRET=1`` (the Triton
    interpreter runs the kernels on CPU tensors).
    """
    if torch.cuda.is_available():
        return True, "CUDA is available"
    if _interpret_env():
        if not _kernels_interpreted():
            return False, (
                "TRITON_INTERPRET=1 was set after qcompile.kernels.triton_int8 was "
                "imported, so its kernels were compiled for a GPU; " + _HINT
            )
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors in the Triton interpreter"
    return False, "no CUDA device and TRITON_INTERPRET is not '1'; " + _HINT


def _require_triton(device: torch.device) -> None:
    """Raise a clear RuntimeError when the kernels cannot run on ``device``."""
    if device.type == "cuda" and torch.cuda.is_available():
        return
    if device.type == "cpu":
        if _interpret_env() and _kernels_interpreted():
            return
        ok, reason = triton_available()
        if ok:  # CUDA is there, but the tensors are on the CPU
            reason = "tensors are on the CPU and TRITON_INTERPRET is not '1'; " + _HINT
        raise RuntimeError(f"lowbit Triton kernels cannot run: {reason}")
    raise RuntimeError(
        f"lowbit Triton kernels cannot run on device {device}: " + triton_available()[1]
    )


def _device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- #
# Per-token quantization
# --------------------------------------------------------------------------- #


@triton.jit
def _round_half_even(y):
    # floor + explicit tie handling (libdevice rint is unavailable in the
    # interpreter). y - floor(y) is exact in float32 except for tiny negative y,
    # where rounding up to 1.0 still yields the right integer (0).
    r = tl.floor(y)
    d = y - r
    half = r * 0.5
    odd = tl.floor(half) != half
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


# ``_quantize_rows_kernel``
# One program per row. Pass 1 walks the row in ``BLOCK_K`` chunks and
# reduces ``max |x|`` over the inlier columns; pass 2 walks it again and
# writes ``q = clamp(round_half_even(x * inv), -127, 127)`` (0 on outlier
# columns) plus ``scale = absmax / 127``. Bit-exact against
# ``reference.quantize_rows``; see the comments in the kernel for how.
@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr,
    mask_ptr,
    q_ptr,
    scale_ptr,
    # sizes
    K,
    # strides
    stride_xm,
    stride_qm,
    # meta
    EPS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)

    # pass 1: absmax over inlier columns
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        inb = cols < K
        x = tl.load(x_row + cols, mask=inb, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + cols, mask=inb, other=0) != 0
            x = tl.where(keep, x, 0.0)
        amax = tl.maximum(amax, tl.abs(x))
    absmax = tl.maximum(tl.max(amax, axis=0), EPS)

    # The reference computes 127 / absmax as torch's __rdiv__ does:
    # reciprocal(absmax) * 127, each step rounded to float32. Match it exactly.
    inv = tl.math.div_rn(1.0, absmax) * 127.0

    # pass 2: quantize
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        inb = cols < K
        x = tl.load(x_row + cols, mask=inb, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + cols, mask=inb, other=0) != 0
            x = tl.where(keep, x, 0.0)
        r = _round_half_even(x * inv)
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_row + cols, r.to(tl.int8), mask=inb)

    tl.store(scale_ptr + row, tl.math.div_rn(absmax, 127.0))


def _quantize_block_k(K: int) -> int:
    return max(16, min(triton.next_power_of_2(max(K, 1)), 1024))


def quantize_rows_triton_impl(
    x: torch.Tensor, inlier_mask: torch.Tensor | None = None, block_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.quantize_rows``; ``block_k`` overrides the chunk size (tests)."""
    _require_triton(x.device)
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        if inlier_mask is not None:
            mask = inlier_mask.reshape(K).to(device=x.device, dtype=torch.uint8).contiguous()
        else:
            mask = q  # unused placeholder pointer
        with _device_ctx(x.device):
            _quantize_rows_kernel[(M,)](
                x2,
                mask,
                q,
                scale,
                K,
                x2.stride(0),
                q.stride(0),
                EPS=ref.EPS,
                HAS_MASK=inlier_mask is not None,
                BLOCK_K=block_k or _quantize_block_k(K),
                num_warps=4,
                # keep x * inv rounded to float32 before the rounding step
                # (no FMA contraction), as in the reference
                enable_fp_fusion=False,
            )
    return q.reshape(*lead, K), scale.reshape(*lead, 1)


# --------------------------------------------------------------------------- #
# int8 GEMM with fused dequantization
# --------------------------------------------------------------------------- #


def int8_gemm_configs() -> list[triton.Config]:
    """Autotune configs for ``_int8_gemm_kernel`` (one small config under the interpreter)."""
    cfg = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)
        (128, 256, 128, 8, 3, 8),
        (256, 128, 128, 8, 3, 8),
        (128, 128, 128, 8, 4, 4),
        (128, 64, 128, 8, 4, 4),
        (64, 128, 128, 8, 4, 4),
        (64, 64, 128, 8, 4, 4),
        (32, 64, 128, 8, 4, 4),
        (16, 64, 128, 8, 4, 4),  # decode (small M)
        (16, 128, 128, 8, 4, 4),
    ]
    return gemm_configs(cfg, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})


@triton.jit
def _round_to_bf16_grid(x):
    # Round float32 to the nearest bfloat16 value (ties to even) in integer
    # arithmetic, so the final cast is exact. The GPU cast already rounds to
    # nearest-even; the interpreter's cast truncates, hence this step.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


# ``_int8_gemm_kernel``
# Tiled ``q[M, K] @ w_q[N, K]^T`` with ``tl.dot`` accumulating in int32,
# grouped program order for L2 reuse, masked loads/stores for ragged shapes.
# The epilogue computes, in float32 and in the reference's order,
# ``acc * x_scale[m] * w_scale[n] (+ bias[n]) (+ addend[m, n])`` and casts to
# the output dtype. With ``DEQUANT=False`` it stores the raw int32
# accumulator instead (used by ``int8_matmul_int32_triton`` and the tests).
@triton.autotune(configs=int8_gemm_configs(), key=["M", "N", "K"])
@triton.jit
def _int8_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    c_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    addend_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_dm,
    stride_dn,
    # meta
    DEQUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, offs_k, m_ok, n_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    # A tile [BLOCK_M, BLOCK_K]; B tile [BLOCK_K, BLOCK_N] read from w_q[N, K]
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if DEQUANT:
        # same float32 operation order as reference.int8_linear
        xs = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
        ws = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_ADDEND:
            d_ptrs = (
                addend_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :] * stride_dn
            )
            out += tl.load(d_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        if c_ptr.dtype.element_ty == tl.bfloat16:
            out = _round_to_bf16_grid(out)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


def _launch_gemm(q2, w_q, out, x_scale, w_scale, bias, addend, dequant: bool) -> None:
    M, K = q2.shape
    N = w_q.shape[0]
    if M == 0 or N == 0:
        return
    dummy = out
    d = addend if addend is not None else dummy

    with _device_ctx(q2.device):
        _int8_gemm_kernel[gemm_grid(M, N)](
            q2,
            w_q,
            out,
            x_scale if x_scale is not None else dummy,
            w_scale if w_scale is not None else dummy,
            bias if bias is not None else dummy,
            d,
            M,
            N,
            K,
            q2.stride(0),
            q2.stride(1),
            w_q.stride(0),
            w_q.stride(1),
            out.stride(0),
            out.stride(1),
            d.stride(0),
            d.stride(1),
            DEQUANT=dequant,
            HAS_BIAS=bias is not None,
            HAS_ADDEND=addend is not None,
        )


def int8_matmul_int32_triton(q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``q[M, K] @ w_q[N, K]^T`` (the GEMM without its epilogue)."""
    _require_triton(q.device)
    q2 = q.reshape(-1, q.shape[-1]).contiguous()
    w = w_q.contiguous()
    out = torch.empty((q2.shape[0], w.shape[0]), dtype=torch.int32, device=q.device)
    _launch_gemm(q2, w, out, None, None, None, None, dequant=False)
    return out.reshape(*q.shape[:-1], w.shape[0])


def int8_linear_triton_impl(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    addend: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton ``reference.int8_linear``."""
    _require_triton(q.device)
    K = q.shape[-1]
    N = w_q.shape[0]
    lead = q.shape[:-1]
    q2 = q.reshape(-1, K).contiguous()
    M = q2.shape[0]
    xs = x_scale.reshape(M).to(torch.float32).contiguous()
    ws = w_scale.reshape(N).to(torch.float32).contiguous()
    b = bias.reshape(N).contiguous() if bias is not None else None
    d = addend.reshape(M, N).contiguous() if addend is not None else None
    out = torch.empty((M, N), dtype=out_dtype, device=q.device)
    _launch_gemm(q2, w_q.contiguous(), out, xs, ws, b, d, dequant=True)
    return out.reshape(*lead, N)


# --------------------------------------------------------------------------- #
# Custom ops (same signatures as the generic ops in ops.py)
# --------------------------------------------------------------------------- #


@torch.library.custom_op("lowbit::quantize_rows_triton", mutates_args=())
def quantize_rows_triton(
    x: torch.Tensor, inlier_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token int8 quantization; see ``reference.quantize_rows``."""
    return quantize_rows_triton_impl(x, inlier_mask)


@quantize_rows_triton.register_fake
def _(x, inlier_mask):
    return ref.empty_quantized_rows(x)


@torch.library.custom_op("lowbit::int8_linear_triton", mutates_args=())
def int8_linear_triton(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    addend: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton int8 GEMM with fused dequantization; see ``reference.int8_linear``."""
    return int8_linear_triton_impl(q, x_scale, w_q, w_scale, bias, addend, out_dtype)


@int8_linear_triton.register_fake
def _(q, x_scale, w_q, w_scale, bias, addend, out_dtype):
    return ref.empty_linear_out(q, w_q, out_dtype)
