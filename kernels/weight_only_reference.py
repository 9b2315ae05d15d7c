"""Reference numerics of weight-only low-bit quantization (recipes ``w{8,4,3,2}a16-g{G}``).

Every weight-only kernel (``triton_dequant_gemm``, ``cpu_weight_only``) is
tested against the functions here.

Convention: asymmetric, group-wise along K (input channels), round to nearest
------------------------------------------------------------------------------
For a weight ``w[N, K]`` and group size ``G`` (``K % G == 0``), group
``g = k // G`` of row ``n`` has a scale ``s[n, g] > 0`` and an integer zero
point ``z[n, g]`` in ``[0, 2**bits - 1]``; codes ``q`` are unsigned and

    w[n, k]  ~=  (q[n, k] - z[n, k // G]) * s[n, k // G]

Parameters (``compute_qparams``), in float64, with ``qmax = 2**bits - 1``:

    lo = min(min(w_group), 0); hi = max(max(w_group), 0)   # the grid contains 0
    s  = (hi - lo) / qmax (2^-14, fp16's smallest normal, for an all-zero group: any scale holds
         it exactly, and a small one keeps offset-based kernels' cancellation small),
         clamped below by finfo(scale_dtype).tiny, then rounded to ``scale_dtype`` *upwards* (never smaller than the
         float64 value, so the stored grid still spans [lo, hi]); a float32
         scale is rounded upwards to fp16's grid where fp16 holds it (normal
         range), so kernels and exports that store fp16 scales hold it exactly
    z  = clamp(round(-lo / s), 0, qmax)             (s: the stored scale)

Codes (``quantize_with_qparams``): ``q = clamp(round(w / s) + z, 0, qmax)``
in float64 with the stored ``s``. Including 0 in the range (as GPTQ's
quantizer does) keeps ``z`` on the grid without clamping, so every element
satisfies ``|w - (q - z) * s| <= s / 2`` exactly in real arithmetic; with
float64 arithmetic and a float32 dequantization, the bound holds up to
``1e-6 * |w|``. ``s`` and ``z`` are stored in ``scale_dtype`` — the activation
dtype (fp16 / bf16 / fp32); zero points 0..255 are exact in all three.

API
---
``compute_qparams(w, bits, group_size, scale_dtype=torch.float32) -> (scales, zeros)``
    ``w [N, K]`` float -> ``scales, zeros [N, K // G]`` in ``scale_dtype``.
``quantize_with_qparams(w, scales, zeros, bits, group_size) -> q uint8 [N, K]``
    Codes for given parameters (GPTQ quantizes column slices with it: pass a
    ``[N, c]`` slice of ``w``, the matching ``[N, c // G]`` parameter columns, or
    ``group_size=c`` with one parameter column).
``quantize_groupwise(w, bits, group_size, scale_dtype=torch.float32) -> (q, scales, zeros)``
    RTN: ``compute_qparams`` then ``quantize_with_qparams``.
``dequantize_groupwise(q, scales, zeros, group_size, dtype=None) -> w_hat [N, K]``
    ``(q - z) * s`` computed in float32 (float64 when ``dtype`` is float64),
    returned in ``dtype`` (default ``scales.dtype``).
``dequant_embedding(ids, packed, scales, zeros, bits, group_size, dtype) -> rows``
    The rows ``ids`` of the dequantized table (a tied embedding reading the
    quantized lm_head weight), gathered before unpacking.
``dequant_linear(x, packed, scales, zeros, bits, group_size, bias=None) -> y [..., N]``
    The reference low-bit linear: unpack, ``W = dequantize_groupwise(...,
    dtype=x.dtype)`` (the weight a dequantizing kernel feeds its GEMM), then
    ``y = (x.float() @ W.float().T + bias.float()).to(x.dtype)`` — float32
    accumulation, one rounding at the end.
``dequant_linear_backward(grad, x, packed, scales, zeros, bits, group_size)``
    Its gradients w.r.t. ``x``, ``scales`` and ``bias`` (E2E-QP trains the scales with
    the codes frozen; the op's autograd formula in ``kernels/ops.py``).
"""

from __future__ import annotations

import torch

from .packing import SUPPORTED_BITS, unpack

ROW_CHUNK_ELEMENTS = 1 << 18  # per-row quantization works this many elements at a time


def _check(bits: int, group_size: int, k: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group_size {group_size} must be positive and divide K={k}")


def _round_up_to(s64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float64 ``s64`` to ``dtype`` rounding toward +inf."""
    s = s64.to(dtype)
    low = s.double() < s64
    if bool(low.any()):
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def _in_fp16_normal_range(s: torch.Tensor) -> torch.Tensor:
    f16 = torch.finfo(torch.float16)
    return (s.abs() >= f16.tiny) & (s.abs() <= f16.max)


def on_fp16_grid(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` rounded to the nearest fp16 value where fp16's normal range holds them
    (the rest unchanged), in their dtype: what the CPU kernels store exactly in fp16."""
    fits = _in_fp16_normal_range(scales)
    return torch.where(fits, scales.to(torch.float16).to(scales.dtype), scales)


def compute_qparams(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max parameters per group; see the module docstring."""
    n, k = w.shape
    _check(bits, group_size, k)
    qmax = (1 << bits) - 1
    wg = w.detach().double().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    s64 = (hi - lo) / qmax
    s64 = torch.where(s64 == 0, torch.full_like(s64, 2.0**-14), s64)
    s64 = s64.clamp(min=torch.finfo(scale_dtype).tiny)
    scales = _round_up_to(s64, scale_dtype)
    if scale_dtype == torch.float32:  # fp16's grid where it reaches: stored exactly in fp16
        fits = _in_fp16_normal_range(s64)
        scales = torch.where(fits, _round_up_to(s64, torch.float16).float(), scales)
    zeros = torch.round(-lo / scales.double()).clamp(0, qmax)
    return scales, zeros.to(scale_dtype)


def quantize_with_qparams(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``q = clamp(round(w / s) + z, 0, 2**bits - 1)`` in float64, as uint8 ``[N, K]``."""
    n, k = w.shape
    _check(bits, group_size, k)
    qmax = (1 << bits) - 1
    wg = w.detach().double().view(n, k // group_size, group_size)
    q = torch.round(wg / scales.double().unsqueeze(-1)) + zeros.double().unsqueeze(-1)
    return q.clamp_(0, qmax).to(torch.uint8).view(n, k)


def quantize_groupwise(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float32,
    *,
    drop_pages: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN group-wise quantization: ``(q uint8 [N, K], scales [N, K//G], zeros [N, K//G])``,
    computed ``ROW_CHUNK_ELEMENTS`` at a time (every step is per row: the same result,
    with float64 temporaries the size of a chunk instead of the weight). ``drop_pages``:
    a weight mapped from a checkpoint gives back each chunk's pages once read
    (``memory.drop_file_pages``), so it is never resident whole."""
    from qcompile.memory import drop_file_pages

    if w.shape[0] == 0:
        s, z = compute_qparams(w, bits, group_size, scale_dtype)
        return quantize_with_qparams(w, s, z, bits, group_size), s, z
    q = scales = zeros = None
    n = chunk_rows(w.shape[1])
    for r0 in range(0, w.shape[0], n):
        c = w[r0 : r0 + n]
        s, z = compute_qparams(c, bits, group_size, scale_dtype)
        qc = quantize_with_qparams(c, s, z, bits, group_size)
        if q is None:  # filled chunk by chunk: no second copy at the end
            q = qc.new_empty((w.shape[0], *qc.shape[1:]))
            scales = s.new_empty((w.shape[0], *s.shape[1:]))
            zeros = z.new_empty((w.shape[0], *z.shape[1:]))
        q[r0 : r0 + n], scales[r0 : r0 + n], zeros[r0 : r0 + n] = qc, s, z
        if drop_pages:
            drop_file_pages(c)
    return q, scales, zeros


def chunk_rows(k: int) -> int:
    """Rows of a ``[N, k]`` weight that per-row work takes at a time (at least one)."""
    return max(1, ROW_CHUNK_ELEMENTS // max(1, k))


def dequantize_groupwise(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(q - z) * s`` in float32 (float64 if ``dtype`` is float64), returned in ``dtype``
    (default: the scales' dtype)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n, k = q.shape
    qg = q.to(work).view(n, k // group_size, group_size)
    s, z = scales.to(work).unsqueeze(-1), zeros.to(work).unsqueeze(-1)
    return ((qg - z) * s).view(n, k).to(dtype or scales.dtype)


def dequant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference weight-only linear ``x[..., K] @ W^T + bias -> [..., N]`` in x's dtype."""
    k = x.shape[-1]
    _check(bits, group_size, k)
    q = unpack(packed, bits, k)
    w = dequantize_groupwise(q, scales, zeros, group_size, dtype=x.dtype)
    y = x.reshape(-1, k).float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


def dequant_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple:
    """Gradients of :func:`dequant_linear` w.r.t. ``x``, ``scales`` and ``bias`` (the codes
    and zero points are constants): ``dx = dy @ W``, ``db = sum dy`` and, with
    ``dW = dy^T x``, ``ds[n, g] = sum over the group of dW * (q - z)``. ``None`` where
    ``needs`` is False; float32 accumulation, results in the inputs' dtypes."""
    k = x.shape[-1]
    n = packed.shape[0]
    q = unpack(packed, bits, k)
    g2 = grad.reshape(-1, n).float()
    dx = ds = db = None
    if needs[0]:  # the weight the forward multiplied with
        w = dequantize_groupwise(q, scales, zeros, group_size, dtype=x.dtype).float()
        dx = (g2 @ w).to(x.dtype).reshape(x.shape)
    if needs[1]:
        codes = q.float().view(n, k // group_size, group_size) - zeros.float().unsqueeze(-1)
        dw = (g2.t() @ x.reshape(-1, k).float()).view(n, k // group_size, group_size)
        ds = (dw * codes).sum(-1).to(scales.dtype)
    if needs[2]:
        db = g2.sum(0)
    return dx, ds, db


def dequant_embedding(
    ids: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference lookup ``W[ids] -> [*ids.shape, K]`` in ``dtype`` from a packed table.

    Rows are gathered before unpacking, so a lookup touches only the rows it returns;
    each row equals the row of ``dequantize_groupwise(unpack(packed), ...)``.
    """
    k = scales.shape[1] * group_size
    flat = ids.reshape(-1)
    q = unpack(packed.index_select(0, flat), bits, k)
    w = dequantize_groupwise(
        q, scales.index_select(0, flat), zeros.index_select(0, flat), group_size, dtype=dtype
    )
    return w.reshape(*ids.shape, k)


__all__ = [
    "compute_qparams",
    "quantize_with_qparams",
    "quantize_groupwise",
    "dequantize_groupwise",
    "dequant_linear",
    "dequant_linear_backward",
    "dequant_embedding",
]
