"""GPTQ (Frantar et al. 2022): quantize a weight column by column, compensating each
column's rounding error on the columns not yet quantized, using the Hessian
``H = X^T X`` of the layer's calibration inputs.

Same asymmetric group-wise convention as round-to-nearest
(``qcompile.kernels.weight_only_reference``: ``w ≈ (q - zero) * scale`` with the
group's range widened to contain 0 and the scale stored in ``scale_dtype``), so
GPTQ and RTN weights pack and run through the same kernels. Without
``act_order`` a group's parameters are fitted when its first column is reached,
on the already error-compensated weights (as the paper does). With
``act_order`` columns are processed by decreasing ``diag(H)`` and the group
parameters are fixed up front from the original weight ("static groups"), so
the packed layout keeps contiguous groups in the original column order.
The Hessian and its Cholesky factor are computed in float64; the column loop
(the error compensation) runs in float32, as the reference implementation does,
which halves its cost on large layers (lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.kernels.weight_only_reference import compute_qparams, dequantize_groupwise


@dataclass(frozen=True)
class GPTQResult:
    q: torch.Tensor  # uint8 [N, K], integers in [0, 2^bits)
    scales: torch.Tensor  # [N, K // group_size] in scale_dtype
    zeros: torch.Tensor  # [N, K // group_size] in scale_dtype (integers)
    error: float  # ||X W^T - X Wq^T||^2 estimated with H: trace((W-Wq) H (W-Wq)^T)
    # float32 [N, K]: each column as it was rounded (the weight after the error
    # compensation of the columns before it); rounding it with scales / zeros gives q.
    # Block-AP starts from it: it is off the grid, so the step sizes get useful gradients
    latent: torch.Tensor | None = None


def quantize_column(w, scale, zero, bits):
    """Codes and dequantized values of one column ``w [N]``."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q, (q - zero) * scale


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - Ŵ) H (W - Ŵ)^T)`` = ``||X W^T - X Ŵ^T||_F^2`` for ``H = X^T X``."""
    d = w.double() - w_hat.double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> GPTQResult:
    """GPTQ-quantize ``weight [N, K]`` given ``hessian = X^T X [K, K]``.

    ``damp``: fraction of the mean diagonal added to ``H`` (numerical stability).
    ``clip_search``: fit each group's range by a Hessian-diagonal-weighted error
    search over shrink factors (``_fit``) instead of min/max.
    Raises ``ValueError`` when ``group_size`` does not divide ``K``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    n_groups = k // group_size
    scales = torch.zeros(n, n_groups, dtype=torch.float64)
    zeros = torch.zeros(n, n_groups, dtype=torch.float64)
    diag = torch.diag(h)

    def importance(cols):
        return diag[cols] if clip_search else None

    if act_order:  # static groups from the original weight
        for g in range(n_groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            scales[:, g], zeros[:, g] = _fit(w[:, cols], bits, scale_dtype, importance(cols))
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k)
    inv_perm = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]

    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv, w = hinv.float(), w.float()
    scales, zeros = scales.float(), zeros.float()

    q_out = torch.zeros(n, k, dtype=torch.float32)
    latent = torch.zeros(n, k, dtype=torch.float32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:  # group starts: fit on updated weights
                # columns of this group in the (unpermuted) order are i1+i .. i1+i+G-1
                span = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size]
                cols = slice(col, col + group_size)
                scales[:, g], zeros[:, g] = _fit(span, bits, scale_dtype, importance(cols))
            q, w_hat = quantize_column(w1[:, i], scales[:, g], zeros[:, g], bits)
            q_out[:, i1 + i] = q
            latent[:, i1 + i] = w1[:, i]
            e = (w1[:, i] - w_hat) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    q_final = q_out[:, inv_perm].to(torch.uint8)
    scales, zeros = scales.to(scale_dtype), zeros.to(scale_dtype)
    deq = dequantize_groupwise(q_final, scales, zeros, group_size, dtype=torch.float64)
    return GPTQResult(
        q=q_final,
        scales=scales,
        zeros=zeros,
        error=reconstruction_error(weight, deq, hessian),
        latent=latent[:, inv_perm],
    )


#: range shrink factors tried per group by the ``clip_search`` fit (1.0: min/max)
SHRINK_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _fit(w: torch.Tensor, bits: int, scale_dtype: torch.dtype, importance=None):
    """One group's (scale, zero) per row, as stored (``scale_dtype``), in float32.

    Without ``importance``: min/max (``compute_qparams``). With ``importance [G]``
    (the group's Hessian diagonal): per row, the range ``[lo, hi] * p`` for ``p`` in
    ``SHRINK_GRID`` whose rounding error ``sum_k importance_k (w_k - ŵ_k)^2`` is
    smallest (``p = 1`` is a candidate, so it never loses to min/max on that error).
    """
    s, z = compute_qparams(w, bits, w.shape[1], scale_dtype)
    s, z = s.double().squeeze(1), z.double().squeeze(1)
    if importance is None:
        return s.float(), z.float()
    wd, qmax = w.double(), (1 << bits) - 1
    imp = importance.double().clamp_min(0).unsqueeze(0)
    lo0, hi0 = wd.amin(dim=1).clamp(max=0.0), wd.amax(dim=1).clamp(min=0.0)
    best = torch.full_like(s, float("inf"))
    for p in SHRINK_GRID:
        lo, hi = lo0 * p, hi0 * p
        sp, zp = compute_qparams(torch.stack([lo, hi], 1), bits, 2, scale_dtype)
        sp, zp = sp.double().squeeze(1), zp.double().squeeze(1)
        q = torch.clamp(torch.round(wd / sp[:, None]) + zp[:, None], 0, qmax)
        err = (imp * ((q - zp[:, None]) * sp[:, None] - wd).pow(2)).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        s, z = torch.where(better, sp, s), torch.where(better, zp, z)
    return s.float(), z.float()
