"""Pure math of the equivalence transforms: smoothing, Hadamard, DuQuant, folding.

No FX graphs here: these functions build the matrices that the graph passes fold
into weights (offline) or apply to activations (online). Everything is computed
in float64 by default; the exactness contract is checked in float64.

Conventions (one for the whole module):

* activations are ``X [rows, K]``, weights ``W [N, K]``, the linear is
  ``Y = X @ W.T``;
* a transform ``T [K, K]`` on the input channels acts on the right:
  ``X' = X @ T`` and ``W' = W @ T``. For an orthogonal ``T`` this is exact,
  ``X' @ W'.T = X @ T @ T.T @ W.T = X @ W.T``;
* a permutation ``perm [K]`` means ``X' = X[:, perm]`` (position ``i`` of the
  result holds original channel ``perm[i]``); ``permutation_matrix(perm)`` is the
  ``P`` with ``X @ P == X[:, perm]``;
* smoothing scales ``s [K]`` act as ``X' = X / s`` and ``W' = W * s``.

Methods (see the design notes, DESIGN.md section 2):

* SmoothQuant: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` moves activation
  range into the weights.
* QuaRot: an orthonormal Hadamard matrix spreads every channel over all others
  (``qcompile.hadamard``, re-exported here; a seeded random orthogonal fallback).
* DuQuant: a block-diagonal rotation ``R1`` built greedily from a calibration
  sample (spread the largest outlier of each block over the block, keep a step
  only if it lowers the block's max), a zigzag permutation ``P`` that evens the
  block maxima out, and a second block rotation ``R2``: ``T = R1 @ P @ R2``
  (the ``P @ R2`` stage is kept only if it lowers the sample's per-token low-bit
  error; see ``duquant_transform``).
"""

from __future__ import annotations

import math

import torch

from .hadamard import (
    hadamard,
    hadamard_factors,
    hadamard_or_random,
    is_hadamard_order,
    random_orthogonal,
)

__all__ = [
    "apply_to_activation",
    "block_diagonal_rotation",
    "duquant_transform",
    "fold_into_weight",
    "greedy_block_rotation",
    "hadamard",
    "hadamard_factors",
    "hadamard_or_random",
    "is_hadamard_order",
    "per_token_quant_mse",
    "permutation_matrix",
    "random_orthogonal",
    "smooth_activation",
    "smooth_scales",
    "smooth_weight",
    "uniform_first_row_matrix",
    "zigzag_permutation",
]

DTYPE = torch.float64


# --------------------------------------------------------------------------- smoothing


def smooth_scales(
    act_absmax: torch.Tensor,
    weight: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
    alpha: float = 0.5,
    eps: float = 1e-5,
) -> torch.Tensor:
    """SmoothQuant per-input-channel scales ``s [K]`` (float64, finite, > 0).

    ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` where ``max|W_j|`` is taken over
    the output rows of ``weight [N, K]``, or of all weights in a list (linears that
    share the input, e.g. q/k/v). Both maxima are clamped at ``eps``; a channel
    that is zero on either side (nothing to balance) gets ``s_j = 1``.

    Exact in float: ``(X / s) @ (W * s).T == X @ W.T``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if not weights:
        raise ValueError("smooth_scales needs at least one weight")
    a = act_absmax.detach().to(DTYPE).abs().flatten()
    k = a.numel()
    w_max = torch.zeros(k, dtype=DTYPE)
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not have K={k} columns")
        w_max = torch.maximum(w_max, w.detach().to(DTYPE).abs().amax(dim=0))
    s = a.clamp_min(eps).pow(alpha) / w_max.clamp_min(eps).pow(1.0 - alpha)
    degenerate = (a == 0) | (w_max == 0) | ~torch.isfinite(s) | (s <= 0)
    return torch.where(degenerate, torch.ones_like(s), s)


def smooth_activation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``X / s`` (computed in float64, cast back to ``x.dtype``)."""
    return (x.to(DTYPE) / s.to(DTYPE)).to(x.dtype)


def smooth_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W * s`` over input channels (computed in float64, cast back to ``w.dtype``)."""
    return (w.to(DTYPE) * s.to(DTYPE)).to(w.dtype)


# --------------------------------------------------------------------------- DuQuant


def uniform_first_row_matrix(b: int) -> torch.Tensor:
    """Orthogonal ``[b, b]`` whose first row is ``1/sqrt(b)`` everywhere.

    ``x @ M`` spreads channel 0 of ``x`` evenly over all ``b`` channels. This is
    ``hadamard(b)`` when available, else the Householder reflection that maps
    ``e_0`` to the uniform unit vector (symmetric, so its first row is uniform too).
    """
    if is_hadamard_order(b):
        return hadamard(b)
    u = torch.full((b,), 1.0 / math.sqrt(b), dtype=DTYPE)
    v = -u
    v[0] += 1.0
    vv = float(v @ v)
    eye = torch.eye(b, dtype=DTYPE)
    if vv == 0.0:  # b == 1
        return eye
    return eye - (2.0 / vv) * torch.outer(v, v)


def _as_sample(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 1:  # per-channel absmax: a one-row, same-sign proxy of the sample
        return x.detach().to(DTYPE).abs()[None, :]
    if x.dim() != 2:
        raise ValueError(f"expected [B] absmax or [rows, B] sample, got shape {tuple(x.shape)}")
    return x.detach().to(DTYPE)


def greedy_block_rotation(
    x: torch.Tensor,
    steps: int = 8,
    *,
    seed: int = 0,
    candidates: int = 4,
    rtol: float = 1e-9,
) -> torch.Tensor:
    """DuQuant's greedy rotation ``R [B, B]`` (orthogonal, float64) of one channel block.

    ``x`` is a calibration sample ``[rows, B]`` of the block's inputs, or the
    block's per-channel absmax ``[B]`` (used as a one-row sample of magnitudes: a
    weaker proxy, since signs and co-occurrence are lost).

    Each step, on the current sample ``Y = X @ R``: take the channel ``d`` holding
    the largest ``|y|``, swap it to position 0 (``E_d``), mix the other channels
    with an orthogonal ``diag(1, Q')`` (``Q' = I`` for the first candidate, a
    seeded random signed permutation for the others: cheap, and it breaks the
    symmetry that would let a Hadamard step undo the previous one) and apply
    ``uniform_first_row_matrix(B)`` which spreads channel 0 evenly over the block:
    ``G = E_d @ diag(1, Q') @ M``. The candidate with the smallest ``max|Y @ G|`` is
    kept only if it lowers the block max by more than ``rtol`` (relative);
    otherwise the step is skipped. ``R`` is the product of the kept ``G``.

    Guarantee: ``max|X @ R| <= max|X|`` on the sample (if rounding ever broke it,
    the identity is returned).
    """
    xs = _as_sample(x)
    b = xs.shape[1]
    eye = torch.eye(b, dtype=DTYPE)
    if b <= 1 or steps <= 0 or xs.numel() == 0:
        return eye
    m = uniform_first_row_matrix(b)
    gen = torch.Generator().manual_seed(int(seed))
    r = eye.clone()
    y = xs
    cur = float(y.abs().max())
    for _ in range(steps):
        if cur == 0.0:
            break
        d = int(y.abs().amax(dim=0).argmax())
        order = list(range(b))
        order[0], order[d] = d, 0
        best: tuple[float, torch.Tensor] | None = None
        for c in range(max(1, candidates)):
            if c == 0:
                mixer = m
            else:  # diag(1, Q') @ M with Q' a random signed permutation of channels 1..B-1
                src = torch.cat(
                    [torch.zeros(1, dtype=torch.int64), 1 + torch.randperm(b - 1, generator=gen)]
                )
                sign = torch.randint(0, 2, (b,), generator=gen).to(DTYPE) * 2.0 - 1.0
                sign[0] = 1.0
                mixer = sign[:, None] * m[src]
            # E_d @ mixer: row i of the product is row order[i] of mixer (E_d swaps 0 and d).
            g = mixer[order]
            val = float((y @ g).abs().max())
            if val < cur * (1.0 - rtol) and (best is None or val < best[0]):
                best = (val, g)
        if best is None:
            continue
        cur, g = best
        r = r @ g
        y = xs @ r
    if float((xs @ r).abs().max()) > float(xs.abs().max()):
        return eye
    return r


def block_diagonal_rotation(
    x_sample: torch.Tensor,
    block_size: int = 128,
    steps: int = 8,
    *,
    seed: int = 0,
    candidates: int = 4,
) -> tuple[torch.Tensor, str | None]:
    """Block-diagonal DuQuant rotation ``R [K, K]`` and a note (or None).

    Block ``i`` covers channels ``[i * block_size, (i + 1) * block_size)`` and gets
    ``greedy_block_rotation`` of ``x_sample[:, block]`` (seed ``seed + i``). When
    ``block_size`` does not divide ``K`` the remainder forms a smaller last block,
    and the note says so. Each block's max on the sample never increases, so
    neither does the sample's max. ``x_sample`` may also be an absmax ``[K]``.
    """
    xs = _as_sample(x_sample)
    k = xs.shape[1]
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    r = torch.zeros(k, k, dtype=DTYPE)
    for i, start in enumerate(range(0, k, block_size)):
        sl = slice(start, min(start + block_size, k))
        r[sl, sl] = greedy_block_rotation(xs[:, sl], steps, seed=seed + i, candidates=candidates)
    note = None
    if k % block_size:
        note = (
            f"K={k} is not a multiple of block_size={block_size}: "
            f"{k // block_size} full block(s) and a last block of {k % block_size} channels"
        )
    return r, note


def zigzag_permutation(channel_absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """DuQuant's zigzag channel permutation ``perm [K]`` (int64): ``X' = X[:, perm]``.

    Channels are sorted by magnitude (descending) and dealt to the
    ``ceil(K / block_size)`` blocks in zigzag order ``0, 1, ..., nb-1, nb-1, ..., 0,
    0, 1, ...``; a block that is full (the smaller last block when ``block_size``
    does not divide ``K``) is skipped. The ``nb`` largest channels land in distinct
    blocks, so the per-block maxima even out. Ties keep the original order.
    """
    a = channel_absmax.detach().to(DTYPE).abs().flatten()
    k = a.numel()
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    nb = max(1, -(-k // block_size))
    capacity = [min(block_size, k - i * block_size) for i in range(nb)]
    order = torch.sort(a, descending=True, stable=True).indices.tolist()
    blocks: list[list[int]] = [[] for _ in range(nb)]
    sweep = list(range(nb)) + list(range(nb - 1, -1, -1))
    pos = 0
    for ch in order:
        while len(blocks[sweep[pos % len(sweep)]]) >= capacity[sweep[pos % len(sweep)]]:
            pos += 1
        blocks[sweep[pos % len(sweep)]].append(ch)
        pos += 1
    return torch.tensor([c for blk in blocks for c in blk], dtype=torch.int64)


def per_token_quant_mse(x: torch.Tensor, bits: int = 4) -> float:
    """MSE of symmetric per-row (per-token) absmax round-to-nearest fake quantization
    of ``x [rows, K]`` to ``bits`` bits (levels ``-(2^(b-1)-1) .. 2^(b-1)-1``)."""
    xd = x.to(DTYPE)
    qmax = 2 ** (bits - 1) - 1
    scale = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300) / qmax
    q = (xd / scale).round().clamp(-qmax, qmax) * scale
    return float(((q - xd) ** 2).mean())


def permutation_matrix(perm: torch.Tensor, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """``P [K, K]`` with ``X @ P == X[:, perm]`` (``P[perm[i], i] = 1``)."""
    k = perm.numel()
    p = torch.zeros(k, k, dtype=dtype)
    p[perm, torch.arange(k)] = 1.0
    return p


def _times_block_diagonal(a: torch.Tensor, r: torch.Tensor, block_size: int) -> torch.Tensor:
    """``a @ r`` for a block-diagonal ``r`` (blocks of ``block_size``, ragged last)."""
    out = torch.empty(a.shape[0], r.shape[1], dtype=DTYPE)
    for start in range(0, r.shape[0], block_size):
        sl = slice(start, min(start + block_size, r.shape[0]))
        out[:, sl] = a[:, sl] @ r[sl, sl]
    return out


def duquant_transform(
    x_sample: torch.Tensor,
    block_size: int = 128,
    steps: int = 8,
    permute: bool = True,
    second_rotation: bool = True,
    *,
    seed: int = 0,
    candidates: int = 4,
    gate_bits: int | None = 4,
) -> tuple[torch.Tensor, dict]:
    """DuQuant's input transform ``T = R1 @ P @ R2`` (orthogonal ``[K, K]``, float64).

    ``R1 = block_diagonal_rotation(X)``; ``P`` is the zigzag permutation of the
    channel maxima of ``X @ R1`` (identity when ``permute=False``);
    ``R2 = block_diagonal_rotation(X @ R1 @ P)`` (identity when
    ``second_rotation=False``). Apply as ``X' = X @ T``, ``W' = W @ T``: exact in
    float because ``T`` is orthogonal. On the sample, ``max|X @ T| <= max|X|``.

    Second-stage gate: when ``second_rotation`` is on and ``gate_bits`` is set, the
    stage ``P @ R2`` is kept only if it lowers the sample's per-token symmetric
    ``gate_bits`` fake-quant MSE (``per_token_quant_mse``) below that of
    ``X @ R1``; otherwise ``T = R1`` (``perm`` None, ``R2`` identity).
    ``gate_bits=None`` keeps the stage always (the paper's pipeline). Reason: once
    R1 has spread a massive single-token outlier over its block, the zigzag deals
    that token's big channels into every block and R2 (one block wide) lowers the
    max only a little; the token then has large entries everywhere and its
    per-token error grows (seen on K=576 samples: int4 MSE 1.2-1.4x that of no
    transform with the stage, 0.3-0.6x without it). ``P`` without ``R2`` never
    changes anything per token and is kept as requested.

    ``info``: ``absmax_before`` / ``absmax_after`` ([K] per-channel max of
    ``|X|`` and ``|X @ T|``), ``max_before`` / ``max_after`` (floats),
    ``max_after_r1``, ``R1``, ``perm`` (LongTensor or None), ``R2``,
    ``second_stage`` (``"kept"``, ``"rejected"`` or ``"off"``) and ``block_note``
    (ragged last block or None). ``T == R1 @ permutation_matrix(perm) @ R2``.
    """
    xs = _as_sample(x_sample)
    k = xs.shape[1]
    eye = torch.eye(k, dtype=DTYPE)
    r1, note = block_diagonal_rotation(xs, block_size, steps, seed=seed, candidates=candidates)
    x1 = _times_block_diagonal(xs, r1, block_size)
    max_r1 = float(x1.abs().max())
    perm = None
    if permute:
        perm = zigzag_permutation(x1.abs().amax(dim=0), block_size)
    x2 = x1 if perm is None else x1[:, perm]
    r2 = eye
    stage = "off"
    if second_rotation:
        r2, _ = block_diagonal_rotation(
            x2, block_size, steps, seed=seed + 7919, candidates=candidates
        )
        stage = "kept"
        if gate_bits is not None and per_token_quant_mse(
            _times_block_diagonal(x2, r2, block_size), gate_bits
        ) >= per_token_quant_mse(x1, gate_bits):
            perm, r2, stage = None, eye, "rejected"
    # T = R1 @ P @ R2, using R1 @ P == R1[:, perm] and R2's block structure.
    t = _times_block_diagonal(r1 if perm is None else r1[:, perm], r2, block_size)
    after = (xs @ t).abs().amax(dim=0)
    before = xs.abs().amax(dim=0)
    info = {
        "absmax_before": before,
        "absmax_after": after,
        "max_before": float(before.max()),
        "max_after": float(after.max()),
        "max_after_r1": max_r1,
        "R1": r1,
        "perm": perm,
        "R2": r2,
        "second_stage": stage,
        "block_note": note,
    }
    return t, info


# --------------------------------------------------------------------------- folding


def fold_into_weight(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``W @ T`` for ``W [N, K]``: computed in float64 on copies, cast back to ``w.dtype``."""
    return (w.detach().to(DTYPE) @ t.to(DTYPE)).to(w.dtype)


def apply_to_activation(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``X @ T`` over the last dimension: computed in float64, cast back to ``x.dtype``."""
    return (x.to(DTYPE) @ t.to(DTYPE)).to(x.dtype)
