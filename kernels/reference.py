"""Plain-PyTorch references for every lowbit kernel.

These define the numerics. Every target-specific kernel (Triton, CPU) is tested
against them: integer results bit-exact, float results to a per-dtype tolerance.

Conventions shared by all int8 kernels:
  * activations are quantized per row (token), symmetric, to [-127, 127]:
        absmax = max(|x[r, inlier columns]|), clamped below by ``EPS``
        scale  = absmax / 127                   (float32, shape [..., 1])
        q      = clamp(round_half_even(x * (127 / absmax)), -127, 127)
    columns outside ``inlier_mask`` (the dynamic outlier columns of LLM.int8()) are
    excluded from the absmax and quantize to 0;
  * with ``copies`` (``int8-mixed``'s static outlier columns, :func:`quantize_rows_copies`)
    column ``c`` counts ``copies[c]`` times 127 steps: the absmax is over
    ``|x[r, c]| / copies[c]`` and the code of column ``c`` is spread over ``copies[c]``
    int8 columns whose sum it is, so outliers neither coarsen the row's step nor clip;
  * weights are quantized per output row (column of W^T), symmetric, to [-127, 127];
  * the GEMM accumulates in int32 and dequantizes with the outer product of the
    row scales and the weight scales, then adds bias and an optional addend
    (the dynamic mode's full-precision outlier partial product).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8  # smallest absmax; an all-zero row quantizes to zeros with this scale
QMAX = 127


def quantize_rows(x: torch.Tensor, inlier_mask: torch.Tensor | None = None):
    """Per-row symmetric int8 quantization of ``x[..., K]``.

    Returns ``(q int8 [..., K], scale float32 [..., 1])``.
    """
    xf = x.float()
    if inlier_mask is not None:
        xf = xf.masked_fill(~inlier_mask, 0.0)
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    q = torch.round(xf * (QMAX / absmax)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, absmax / QMAX


def outlier_expansion(copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 columns that ``copies`` (float32 ``[K]``, whole numbers >= 1) spread the K
    input columns over: ``(src int64 [K + E], piece float32 [K + E])``. The first K are the
    columns themselves (piece 0); then piece 1 of every column with copies, in column
    order, then piece 2 of those with 3 or more, and so on. So columns ``K .. K + n`` repeat
    the n outlier columns once each (what the decode kernel reads). A weight's expanded
    form is ``w_q[:, src]``."""
    k = copies.numel()
    counts = copies.long().cpu()
    src, piece = [torch.arange(k)], [torch.zeros(k)]
    for p in range(1, int(counts.max()) if k else 1):
        cols = (counts > p).nonzero().flatten()
        src.append(cols)
        piece.append(torch.full((cols.numel(),), float(p)))
    return torch.cat(src).to(copies.device), torch.cat(piece).to(copies.device)


def quantize_rows_copies(
    x: torch.Tensor, copies: torch.Tensor, src: torch.Tensor, piece: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization of ``x[..., K]`` with outlier columns spread over copies.

    ``v = round_half_even(x * (127 / absmax))`` with ``absmax = max(|x| / copies)``, so
    ``|v[c]| <= 127 copies[c]``; output column ``t`` holds
    ``sign(v[src[t]]) * clamp(|v[src[t]]| - 127 piece[t], 0, 127)``, and the pieces of a
    column sum to its ``v``. Returns ``(q int8 [..., K + E], scale float32 [..., 1])``;
    ``src`` / ``piece`` are :func:`outlier_expansion`'s.
    """
    # written for inductor: the K columns as quantize_rows (one vectorized pass), the E
    # pieces from a gather of their columns, then one concatenation (3x faster on the CPU
    # than gathering all K + E columns, measured at 512 x 576)
    k = copies.numel()
    xf = x.float()
    absmax = (xf.abs() / copies).amax(dim=-1, keepdim=True).clamp_min(EPS)
    inv = QMAX / absmax
    first = torch.round(xf * inv).clamp(-QMAX, QMAX)
    src_e = src[k:]
    lim = (QMAX * copies).index_select(0, src_e)
    v = torch.round(xf.index_select(-1, src_e) * inv)
    v = torch.minimum(torch.maximum(v, -lim), lim)
    pieces = torch.sign(v) * (v.abs() - QMAX * piece[k:]).clamp(0, QMAX)
    return torch.cat([first, pieces], -1).to(torch.int8), absmax / QMAX


def quantize_weight_per_channel(w: torch.Tensor):
    """Per-output-channel symmetric int8 quantization of a ``[N, K]`` weight.

    Returns ``(w_q int8 [N, K], w_scale float32 [N])``. Rounding is done in
    float64 so the result does not depend on the weight's storage dtype.
    """
    wd = w.detach().double()
    absmax = wd.abs().amax(dim=1, keepdim=True).clamp_min(EPS)
    q = torch.round(wd * (QMAX / absmax)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, (absmax / QMAX).squeeze(1).float()


def int8_embedding(
    ids: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    columns: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows ``ids`` of the dequantized int8 weight ``w_q[:, :columns] * w_scale[:, None]``,
    ``[*ids.shape, columns]`` in ``dtype``: an embedding table tied to an int8 site
    (``int8-mixed``'s codes carry outlier copies past ``columns``). The rows are gathered
    first, so a lookup touches only the rows it returns."""
    flat = ids.reshape(-1)
    codes = w_q.index_select(0, flat)[:, :columns]
    rows = codes.double() * w_scale.index_select(0, flat).double()[:, None]  # exact
    return rows.to(dtype).reshape(*ids.shape, columns)


def epilogue_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the output is float64."""
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def int8_matmul_int32(q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of ``q[M, K] @ w_q[N, K]^T`` (reference, slow)."""
    return torch.mm(q.to(torch.int32), w_q.to(torch.int32).t())


def int8_linear(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    addend: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(q @ w_q^T) * x_scale * w_scale + bias + addend`` with int32 accumulation.

    ``q [..., K]`` int8, ``x_scale [..., 1]`` float32, ``w_q [N, K]`` int8,
    ``w_scale [N]`` float32, ``bias [N]`` or None, ``addend [..., N]`` or None.
    The epilogue runs in float32 (float64 for a float64 output, so an exact
    full-precision addend stays exact) and the result is cast to ``out_dtype``.
    """
    lead = q.shape[:-1]
    acc = int8_matmul_int32(q.reshape(-1, q.shape[-1]), w_q)
    wide = epilogue_dtype(out_dtype)
    out = acc.to(wide) * x_scale.reshape(-1, 1).to(wide) * w_scale.to(wide)
    if bias is not None:
        out = out + bias.to(wide)
    if addend is not None:
        out = out + addend.reshape(-1, w_q.shape[0]).to(wide)
    return out.to(out_dtype).reshape(*lead, w_q.shape[0])


def empty_quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(q, scale)`` with :func:`quantize_rows`' shapes and dtypes (the fake kernel of
    every per-token quantization op)."""
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )


def empty_quantized_copies(x: torch.Tensor, src: torch.Tensor):
    """Empty ``(q, scale)`` with :func:`quantize_rows_copies`' shapes and dtypes."""
    return (
        torch.empty((*x.shape[:-1], src.numel()), dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )


def empty_linear_out(q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Empty output of :func:`int8_linear` (the fake kernel of the int8 GEMM ops)."""
    return torch.empty((*q.shape[:-1], w_q.shape[0]), dtype=out_dtype, device=q.device)


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of summed squares (inf for an exact copy)."""
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` (float64)."""
    ref = reference.detach().double()
    noise = (ref - approx.double()).pow(2).sum().item()
    return sqnr_db_from_sums(ref.pow(2).sum().item(), noise)
