"""Offline choice of a weight clipping ratio per output channel (the ``quantize_lowbit`` pass).

Invariant: ratio 1.0 (plain absmax) is always a candidate, so the chosen error never
exceeds the unclipped one; the ratios feed ``lowbit_reference.quantize_weight_per_channel_bits``.
"""

from __future__ import annotations

import torch

from .lowbit_act import qmax_for
from .reference import EPS

__all__ = ["CLIP_RATIOS", "search_clip_ratios"]

#: weight clipping ratios tried per output channel by :func:`search_clip_ratios`
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def search_clip_ratios(
    w: torch.Tensor,
    bits: int,
    sample: torch.Tensor | None = None,
    ratios=CLIP_RATIOS,
    max_rows: int = 256,
) -> torch.Tensor:
    """Per output channel, the clipping ratio in ``ratios`` with the smallest error.

    The error of row ``n`` is the output MSE ``||X (w_n - deq(q_n))||^2`` on the
    calibration ``sample [rows, K]`` (its first ``max_rows`` rows; the caller passes
    the sample in the weight's input basis) or, without a sample, the weight MSE
    ``||w_n - deq(q_n)||^2``. Ratio 1.0 (plain absmax) is always a candidate, so the
    chosen error never exceeds the unclipped one (up to the float32 the errors are
    computed in). Returns ``[N]`` float64.
    """
    qmax = qmax_for(bits)
    wf = w.detach().float()
    n = wf.shape[0]
    absmax = wf.abs().amax(dim=1, keepdim=True)
    ratios = sorted({1.0, *(float(r) for r in ratios)}, reverse=True)
    x = None if sample is None else sample[:max_rows].float()
    best_err = torch.full((n,), float("inf"))
    best = torch.ones(n, dtype=torch.float64)
    for r in ratios:
        scale = (absmax * r).clamp_min(EPS) / qmax
        d = wf - torch.round(wf / scale).clamp_(-qmax, qmax) * scale
        err = d.pow(2).sum(dim=1) if x is None else (x @ d.t()).pow(2).sum(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = r
    return best
