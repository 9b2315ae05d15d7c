"""The low-bit activation ops and their CPU lowering: ``lowbit::quantize_rows_bits`` and
``lowbit::block_rotate``.

:func:`quantize_rows_bits` (per-row symmetric ``bits``-bit quantization, aten ops) is the
op's reference and its CPU lowering; :func:`block_rotate` (``X @ T``, ``T = B1 @ P @ B2``
with block-diagonal ``B1``, ``B2``) is the online part of the DuQuant / Hadamard
transforms, inserted by the ``rotate`` pass as one node so ``lower`` can match
"block_rotate -> quantize_rows_bits" (fused on the CPU by ``cpu_lowbit``); a transform
that cannot be fused lowers to :func:`block_rotate_cpu`. Invariant: every function here
computes the same values as :func:`block_rotate` / :func:`quantize_rows_bits` (float
rounding of the summation order aside). The weight side and the fused kernels'
references are in ``lowbit_reference``.
"""

from __future__ import annotations

import torch

from .reference import EPS, empty_quantized_rows

__all__ = [
    "block_rotate",
    "block_rotate_cpu",
    "prepare_block_rotate_cpu",
    "qmax_for",
    "quantize_rows_bits",
    "split_blocks",
]


def qmax_for(bits: int) -> int:
    """Largest quantized magnitude of a symmetric ``bits``-bit grid held in int8."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"lowbit: bit width must be an int in [2, 8], got {bits!r}")
    return 2 ** (bits - 1) - 1


def quantize_rows_bits(x: torch.Tensor, bits: int):
    """Per-row symmetric ``bits``-bit quantization of ``x[..., K]``.

    Returns ``(q int8 [..., K] in [-qmax, qmax], scale float32 [..., 1])``; aten ops
    only, so it is both the reference and the CPU kernel.
    """
    qmax = qmax_for(bits)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    q = torch.round(xf * (qmax / absmax)).clamp_(-qmax, qmax).to(torch.int8)
    return q, absmax / qmax


def _block_matmul(x: torch.Tensor, blocks: torch.Tensor | None, tail: torch.Tensor | None):
    """``x @ diag(blocks[0], ..., blocks[nb-1], tail)`` over the last dimension."""
    parts = []
    lead = x.shape[:-1]
    done = 0
    if blocks is not None:
        nb, b, _ = blocks.shape
        done = nb * b
        xb = x[..., :done].reshape(-1, nb, b).transpose(0, 1)  # [nb, M, b]
        yb = torch.bmm(xb, blocks).transpose(0, 1)  # [M, nb, b]
        parts.append(yb.reshape(*lead, done))
    if tail is not None:
        parts.append(torch.matmul(x[..., done:], tail))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def block_rotate(
    x: torch.Tensor,
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None = None,
    blocks2: torch.Tensor | None = None,
    tail2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``X @ T`` for ``T = B1 @ P @ B2`` with block-diagonal ``B1``, ``B2``.

    ``blocks [nb, b, b]`` are ``B1``'s full blocks (channels ``[i b, (i+1) b)``) and
    ``tail [r, r]`` its remainder block (``K = nb b + r``), either may be None; ``perm
    [K]`` (optional) gathers channels (``Y[:, i] = Y[:, perm[i]]``); ``blocks2`` /
    ``tail2`` (optional) are ``B2``. A full (non-block) matrix is one block. The
    matrices are in ``x``'s dtype; computing ``X @ T`` in that dtype is exact up to
    its rounding.
    """
    y = _block_matmul(x, blocks, tail)
    if perm is not None:
        y = y.index_select(-1, perm)
    if blocks2 is not None or tail2 is not None:
        y = _block_matmul(y, blocks2, tail2)
    return y


def _block_matmul_channels_major(
    xt: torch.Tensor, blocks_t: torch.Tensor | None, tail_t: torch.Tensor | None
) -> torch.Tensor:
    """``(X @ diag(blocks..., tail))^T [K, M]`` from ``xt = X^T [K, M]`` (contiguous).

    ``blocks_t [nb, b, b]`` / ``tail_t`` hold each block TRANSPOSED and contiguous, so
    block ``i`` is the plain product ``blocks_t[i] @ xt[i b : (i + 1) b]``.
    """
    parts = []
    done = 0
    if blocks_t is not None:
        nb, b, _ = blocks_t.shape
        done = nb * b
        yb = torch.bmm(blocks_t, xt[:done].reshape(nb, b, xt.shape[1]))
        parts.append(yb.reshape(done, xt.shape[1]))
    if tail_t is not None:
        parts.append(tail_t @ xt[done:])
    if not parts:  # no matrix: the identity
        return xt
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def prepare_block_rotate_cpu(
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    blocks2: torch.Tensor | None,
    tail2: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, ...]:
    """:func:`block_rotate`'s matrices as :func:`block_rotate_cpu` takes them: each
    block transposed, contiguous, in ``dtype``."""

    def t(m):
        return None if m is None else m.transpose(-1, -2).contiguous().to(dtype)

    return t(blocks), t(tail), t(blocks2), t(tail2)


def block_rotate_cpu(
    x: torch.Tensor,
    blocks_t: torch.Tensor | None,
    tail_t: torch.Tensor | None,
    perm: torch.Tensor | None = None,
    blocks2_t: torch.Tensor | None = None,
    tail2_t: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`block_rotate` computed channels-major: the CPU lowering of a ``lowbit::block_rotate``
    the fused kernel (``cpu_lowbit``) does not take (blocks over its limit, e.g. the
    Hadamard recipe's ``K x K`` block, or a reader that does not quantize).

    The matrices come from :func:`prepare_block_rotate_cpu` (transposed blocks). Same
    products and sums as :func:`block_rotate` (equal up to the float rounding of the
    BLAS kernels' summation order) when ``compute_dtype`` is None or ``x``'s dtype;
    the result is in ``x``'s dtype. The intermediate is ``Y^T [K, M]``, contiguous:
    ``X^T`` is copied once (under inductor one kernel, with the cast to
    ``compute_dtype`` fused in), each block product is ``B_i^T @ X_i^T`` (a GEMM over
    the M tokens on contiguous operands), and the permutation ``P`` gathers whole rows
    of ``Y^T`` (one index per channel) instead of single elements scattered over a
    ``[nb, M, b]`` batched-matmul output, which inductor generates as a scalar gather
    per element. The result is a transposed view (``[..., K]`` with unit stride over
    tokens); its consumer (the per-token quantization) reads it in place.

    ``compute_dtype=torch.bfloat16`` runs the block products on bf16 operands (fp32
    accumulation in oneDNN; AMX where the CPU has it): the transformed activations are
    then within about 2^-8 relative of the fp32 ones, well inside a 4- or 6-bit
    quantization step; ``lower`` chooses it (``options["cpu_transform_dtype"]``).
    Measured (SmolLM2 shapes, M = 512, blocks of 64, 1 thread, one block product):
    K = 576 0.52 ms with the untransposed blocks read through a view, 0.25 ms
    contiguous fp32, 0.10 ms bf16; K = 1536 1.57, 0.68 and 0.39 ms.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    xt = x.reshape(-1, k).t()
    if compute_dtype is not None and compute_dtype != x.dtype:
        xt = xt.to(compute_dtype)
    y = _block_matmul_channels_major(xt.contiguous(), blocks_t, tail_t)
    if perm is not None:
        y = y.index_select(0, perm)
    if blocks2_t is not None or tail2_t is not None:
        y = _block_matmul_channels_major(y.contiguous(), blocks2_t, tail2_t)
    return y.t().reshape(*lead, k).to(x.dtype)


def split_blocks(
    t: torch.Tensor, block_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(blocks [nb, b, b], tail [r, r])`` of a block-diagonal ``t [K, K]`` (None if absent).

    The off-diagonal blocks must be zero; this is checked.
    """
    k = t.shape[0]
    b = min(block_size, k)
    nb, r = divmod(k, b)
    blocks = torch.stack([t[i * b : (i + 1) * b, i * b : (i + 1) * b] for i in range(nb)])
    tail = t[nb * b :, nb * b :].clone() if r else None
    rebuilt = torch.block_diag(*blocks, *([tail] if tail is not None else []))
    if not torch.equal(rebuilt, t):
        raise ValueError(f"matrix is not block-diagonal with blocks of {block_size}")
    return blocks.contiguous(), tail


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("lowbit::quantize_rows_bits", mutates_args=())
def _quantize_rows_bits_op(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric ``bits``-bit quantization; see :func:`quantize_rows_bits`."""
    return quantize_rows_bits(x, bits)


@_quantize_rows_bits_op.register_fake
def _(x, bits):
    qmax_for(bits)
    return empty_quantized_rows(x)


@torch.library.custom_op("lowbit::block_rotate", mutates_args=())
def _block_rotate_op(
    x: torch.Tensor,
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None,
    blocks2: torch.Tensor | None,
    tail2: torch.Tensor | None,
) -> torch.Tensor:
    """The online ``X @ T`` of the rotate pass; see :func:`block_rotate`."""
    return block_rotate(x, blocks, tail, perm, blocks2, tail2)


@_block_rotate_op.register_fake
def _block_rotate_fake(x, blocks, tail, perm, blocks2, tail2):
    return torch.empty_like(x)
