"""Low-bit weight-activation numerics (W4A4, W6A6, W4A8) and the online block transform.

Generalizes the int8 conventions of ``reference.py`` to a bit width ``b`` (2..8):

  * ``qmax = 2^(b-1) - 1`` (7 for 4 bits, 31 for 6, 127 for 8);
  * activations are quantized per row (token), symmetric, to ``[-qmax, qmax]``:
        absmax = max(|x[r, :]|) clamped below by ``EPS``,  scale = absmax / qmax,
        q = clamp(round_half_even(x * (qmax / absmax)), -qmax, qmax)   held in int8;
  * weights per output channel the same way, optionally with a clipping ratio per
    channel (``absmax * ratio``; values beyond it saturate at ``+-qmax``);
  * the GEMM is the int8 one (``lowbit::int8_linear``; oneDNN ``torch._int_mm`` on
    CPU): the values fit int8, so int32 accumulation is exact, and the dequantization
    epilogue (row scale x weight scale, + bias) is unchanged.

For ``b = 8`` these functions equal ``reference.quantize_rows`` /
``reference.quantize_weight_per_channel`` bit for bit.

``lowbit::quantize_rows_bits`` is the custom op the ``quantize_lowbit`` pass inserts;
its CPU lowering is :func:`quantize_rows_bits` itself (aten ops inductor fuses).
:func:`block_rotate` is the online part of the DuQuant / Hadamard transforms; the
``rotate`` pass inserts it as the custom op ``lowbit::block_rotate`` (one node, so the
``lower`` pass can match "block_rotate -> quantize_rows_bits"); on the CPU the pair
becomes the fused kernel of ``cpu_lowbit``, and a transform that cannot be fused
:func:`block_rotate_cpu`, the same aten computation laid out channels-major (batched
matmuls over the blocks, a gather of whole rows for the permutation; see there why).

Packed signed int4 (the W4A4 GEMM's operands, ``kernels.triton_lowbit``)
-------------------------------------------------------------------------
:func:`pack_int4` stores two signed 4-bit values (``[-8, 7]``, two's complement) per
int8 byte along the last dimension: byte ``j`` holds element ``2j`` in its low nibble
(bits 0-3) and element ``2j + 1`` in its high nibble (bits 4-7). An odd ``K`` is padded
with one zero element (the last byte's high nibble is 0), so ``[..., K]`` packs to
``[..., ceil(K / 2)]``. :func:`unpack_int4` is the exact inverse; since padding nibbles
are zero, a dot product over packed operands of equal width needs no ``K``.
References beside them: :func:`rotate_quantize_rows_bits` (the fused transform +
quantization kernel's numerics) and :func:`int4_linear` (the packed GEMM's).
"""

from __future__ import annotations

import torch

from . import reference as ref
from .reference import EPS

__all__ = [
    "CLIP_RATIOS",
    "block_rotate",
    "block_rotate_cpu",
    "prepare_block_rotate_cpu",
    "int4_linear",
    "pack_int4",
    "qmax_for",
    "quantize_rows_bits",
    "quantize_weight_per_channel_bits",
    "rotate_quantize_rows_bits",
    "search_clip_ratios",
    "unpack_int4",
]

#: weight clipping ratios tried per output channel by :func:`search_clip_ratios`
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


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


def quantize_weight_per_channel_bits(
    w: torch.Tensor, bits: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric ``bits``-bit quantization of ``w [N, K]``.

    ``clip [N]`` (ratios in (0, 1]) scales each row's absmax before quantizing.
    Returns ``(w_q int8 [N, K], w_scale float32 [N])``; rounding in float64.
    """
    qmax = qmax_for(bits)
    wd = w.detach().double()
    absmax = wd.abs().amax(dim=1, keepdim=True)
    if clip is not None:
        absmax = absmax * clip.detach().double().reshape(-1, 1)
    absmax = absmax.clamp_min(EPS)
    q = torch.round(wd * (qmax / absmax)).clamp_(-qmax, qmax).to(torch.int8)
    return q, (absmax / qmax).squeeze(1).float()


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
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )


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


# --------------------------------------------------------------------------- packed int4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed int4 values per int8 byte along the last dimension (layout above).

    ``q`` is an integer tensor ``[..., K]`` with values in ``[-8, 7]`` (checked);
    returns int8 ``[..., ceil(K / 2)]``.
    """
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"pack_int4 expects integer values, got {q.dtype}")
    if q.numel() and bool(((q < -8) | (q > 7)).any()):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    v = q.to(torch.int16)
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    lo, hi = v[..., 0::2], v[..., 1::2]
    return ((hi << 4) | (lo & 0xF)).to(torch.int8)  # in [-128, 127]: exact


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., W]`` -> int8 ``[..., k]`` in ``[-8, 7]``."""
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4 expects int8 bytes, got {packed.dtype}")
    w = packed.shape[-1]
    if k < 0 or (k + 1) // 2 != w:
        raise ValueError(f"{w} bytes per row do not hold k={k} int4 values")
    v = packed.to(torch.int16)
    lo = ((v & 0xF) ^ 8) - 8  # sign-extend the low nibble
    hi = v >> 4  # arithmetic shift: the signed high nibble
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * w)
    return out[..., :k].to(torch.int8)


def rotate_quantize_rows_bits(
    x: torch.Tensor,
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None,
    blocks2: torch.Tensor | None,
    tail2: torch.Tensor | None,
    bits: int,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the fused kernel: :func:`block_rotate` then :func:`quantize_rows_bits`.

    No transform when every matrix and ``perm`` are None. With ``pack`` (``bits <= 4``
    only) the codes are returned packed by :func:`pack_int4`.
    """
    if pack and bits > 4:
        raise ValueError(f"pack needs bits <= 4, got {bits}")
    if any(t is not None for t in (blocks, tail, perm, blocks2, tail2)):
        x = block_rotate(x, blocks, tail, perm, blocks2, tail2)
    q, s = quantize_rows_bits(x, bits)
    return (pack_int4(q) if pack else q), s


def int4_linear(
    q_packed: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of the packed W4A4 GEMM: ``reference.int8_linear`` on the unpacked values.

    ``q_packed [..., W]`` and ``w_packed [N, W]`` are :func:`pack_int4` bytes of equal
    width ``W``; zero padding nibbles contribute nothing, so ``K`` is not needed.
    """
    if q_packed.shape[-1] != w_packed.shape[-1]:
        raise ValueError(
            f"packed widths differ: activations {q_packed.shape[-1]}, weights {w_packed.shape[-1]}"
        )
    k = 2 * w_packed.shape[-1]
    return ref.int8_linear(
        unpack_int4(q_packed, k), x_scale, unpack_int4(w_packed, k), w_scale, bias, None, out_dtype
    )
