"""Triton kernels for the low-bit weight-activation recipes (W4A4, W6A6, W4A8): the fused
online transform + per-token quantization (``lowbit::rotate_quantize_rows_bits_triton``)
and the W4A4 GEMM on packed int4 operands (``lowbit::int4_linear_triton``); fake
implementations for tracing are registered beside them.

Invariant: integer codes and GEMM results equal the references
(``lowbit_reference.rotate_quantize_rows_bits``, ``lowbit_reference.int4_linear``) bit
for bit where the transform's sums are exact, else within the float rounding stated at
each kernel. ``lowering/fuse_triton.py`` builds the operands once and rewrites the graph
on target "triton". Developed and tested only under the Triton interpreter (no GPU here):
the GPU compile path is unexercised and the configs are untuned guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import lowbit_act
from .packing import pack_int4
from .reference import EPS
from .triton_common import _interpret_env, gemm_configs, gemm_grid, grouped_tile
from .triton_int8 import _device_ctx, _require_triton, _round_half_even, _round_to_bf16_grid

#: largest block size (channels) the fused transform keeps on chip. Larger blocks (e.g. the
#: Hadamard recipe's one ``K x K`` block) are not fused: their ``[BP, BP]`` tile would not
#: fit on chip; the lowering then keeps ``block_rotate`` and quantizes its output with the
#: fused kernel without a transform.
MAX_FUSED_BLOCK = 128
#: rows per program of the fused kernel (``tl.dot`` needs at least 16)
ROWS_PER_PROGRAM = 16
#: chunk of channels of the fused kernel without a transform
_PLAIN_CHUNK = 128
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MID = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# --------------------------------------------------------------------------- #
# Transform operands
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class RotationOperands:
    """The fused kernel's form of ``T = B1 @ P @ B2`` (see the module docstring).

    ``w1 [K, BP]``: row ``c`` is the column of ``B1`` that output channel ``c`` reads
    (``perm[c]`` with a permutation), zero-padded; ``src [K]`` int32: the first channel
    of that column's ``B1`` block (None without a permutation); ``w2 [NBLK, BP, BP]``:
    ``B2``'s blocks zero-padded (None without a second stage); ``block``: ``b``.
    """

    w1: torch.Tensor
    src: torch.Tensor | None
    w2: torch.Tensor | None
    block: int


def _pad_blocks(blocks, tail, b: int, bp: int, dtype) -> torch.Tensor:
    nb = 0 if blocks is None else blocks.shape[0]
    r = 0 if tail is None else tail.shape[0]
    device = (blocks if blocks is not None else tail).device
    out = torch.zeros((nb + (1 if r else 0), bp, bp), dtype=dtype, device=device)
    if nb:
        out[:nb, :b, :b] = blocks.to(dtype)
    if r:
        out[nb, :r, :r] = tail.to(dtype)
    return out


def _partition(blocks, tail) -> tuple[int, int, int]:
    """``(block size b, full blocks nb, remainder r)`` of a block-diagonal stage."""
    if blocks is None and tail is None:
        raise ValueError("a block-diagonal stage needs blocks or a tail block")
    if blocks is not None and (blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]):
        raise ValueError(f"blocks must be [nb, b, b], got {tuple(blocks.shape)}")
    if tail is not None and (tail.dim() != 2 or tail.shape[0] != tail.shape[1]):
        raise ValueError(f"tail must be [r, r], got {tuple(tail.shape)}")
    if blocks is None:  # one block (the tail) covers every channel
        return tail.shape[0], 1, 0
    b, nb = blocks.shape[1], blocks.shape[0]
    r = 0 if tail is None else tail.shape[0]
    if r >= b:
        raise ValueError(f"the remainder block ({r}) must be smaller than the blocks ({b})")
    return b, nb, r


def fused_block_ok(blocks, tail) -> bool:
    """Whether the fused kernel can hold this transform's blocks on chip."""
    b = _partition(blocks, tail)[0]
    return b <= MAX_FUSED_BLOCK


def prepare_rotation(
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None = None,
    blocks2: torch.Tensor | None = None,
    tail2: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> RotationOperands:
    """The fused kernel's operands of ``block_rotate(., blocks, tail, perm, blocks2, tail2)``.

    ``dtype`` (default: the blocks') is the activation dtype the reference computes
    in. ``B2`` must use ``B1``'s partition. Built once, at lowering time.
    """
    b, nb, r = _partition(blocks, tail)
    if blocks is None:
        blocks, tail = tail[None], None  # the single block as a full one
    k = nb * b + r
    if b > MAX_FUSED_BLOCK:
        raise ValueError(
            f"block size {b} exceeds the fused kernel's limit {MAX_FUSED_BLOCK}; "
            "apply block_rotate and quantize its output instead"
        )
    dtype = dtype or blocks.dtype
    bp = max(16, triton.next_power_of_2(b))
    p1 = _pad_blocks(blocks, tail, b, bp, dtype)  # [NBLK, BP, BP]
    chan = torch.arange(k, device=p1.device)
    if perm is not None:
        if perm.shape != (k,):
            raise ValueError(f"perm must have K={k} entries, got {tuple(perm.shape)}")
        chan = perm.to(device=p1.device, dtype=torch.int64)
        if bool(((chan < 0) | (chan >= k)).any()):
            raise ValueError("perm entries must lie in [0, K)")
    w1 = p1[chan // b, :, chan % b].contiguous()  # [K, BP]: w1[c, t] = B1_{p//b}[t, p%b]
    src = None if perm is None else ((chan // b) * b).to(torch.int32).contiguous()
    w2 = None
    if blocks2 is not None or tail2 is not None:
        b2_blocks, b2_tail = (blocks2, tail2) if blocks2 is not None else (tail2[None], None)
        same = (
            b2_blocks.shape == blocks.shape
            and (b2_tail is None) == (tail is None)
            and (b2_tail is None or b2_tail.shape == tail.shape)
        )
        if not same:
            raise ValueError("the second stage must use the first stage's block partition")
        w2 = _pad_blocks(b2_blocks, b2_tail, b, bp, dtype).contiguous()
    return RotationOperands(w1=w1, src=src, w2=w2, block=b)


# --------------------------------------------------------------------------- #
# Fused transform + per-token quantization
# --------------------------------------------------------------------------- #


@triton.jit
def _round_mid(v, MID: tl.constexpr):
    # round float32 values to the activation dtype's grid (0: fp32, 1: fp16, 2: bf16)
    if MID == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif MID == 2:
        v = _round_to_bf16_grid(v)  # the interpreter's bf16 cast truncates
    return v


@triton.jit
def _transform_block(
    x_ptr,
    w1_ptr,
    src_ptr,
    w2_ptr,
    rows,
    row_ok,
    stride_xm,
    K,
    BLOCK,
    j,
    HAS_W1: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_W2: tl.constexpr,
    MID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BP: tl.constexpr,
    BT: tl.constexpr,
):
    """Output block ``j`` of ``Z`` for the rows ``rows``: ``[BLOCK_M, BP]`` float32 (0 off range)."""
    lanes = tl.arange(0, BP)
    c = j * BLOCK + lanes
    c_ok = (lanes < BLOCK) & (c < K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    if not HAS_W1:
        y = tl.load(x_rows + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        y = y.to(tl.float32)
    elif GATHER:
        src = tl.load(src_ptr + c, mask=c_ok, other=0)  # [BP]
        src_len = tl.minimum(K - src, BLOCK)  # size of the source block
        y = tl.zeros([BLOCK_M, BP], dtype=tl.float32)
        for t0 in range(0, BP, BT):
            t = t0 + tl.arange(0, BT)
            ok = c_ok[None, :] & (t[:, None] < src_len[None, :])  # [BT, BP]
            xg = tl.load(
                x_rows[:, :, None] + (src[None, :] + t[:, None])[None, :, :],
                mask=row_ok[:, None, None] & ok[None, :, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_M, BT, BP]
            w = tl.load(w1_ptr + c[None, :].to(tl.int64) * BP + t[:, None], mask=ok, other=0.0)
            y += tl.sum(xg * w.to(tl.float32)[None, :, :], axis=1)
        y = _round_mid(y, MID)
    else:
        xb = tl.load(x_rows + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        # W[t, i] = w1[j b + i, t] = B1_j[t, i]
        w = tl.load(
            w1_ptr + c[None, :].to(tl.int64) * BP + lanes[:, None], mask=c_ok[None, :], other=0.0
        )
        y = tl.dot(xb.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        y = _round_mid(y, MID)
    if HAS_W2:
        w2 = tl.load(w2_ptr + j * (BP * BP) + lanes[:, None] * BP + lanes[None, :])
        y = tl.dot(y, w2.to(tl.float32), input_precision="ieee")
        y = _round_mid(y, MID)
    return y


# ``_rotate_quantize_kernel`` — fused online transform + per-token quantization
# Computes, for a tile of ``BLOCK_M`` rows (tokens), ``Z = X @ B1 @ P @ B2`` (the
# contract of ``lowbit_act.block_rotate``: block-diagonal ``B1`` with an optional
# remainder block, an optional channel gather ``P``, an optional second
# block-diagonal stage ``B2`` on the same partition) and quantizes ``Z`` per row
# exactly as ``lowbit_act.quantize_rows_bits`` does: ``absmax = max|z|`` clamped
# by ``EPS``, ``q = clamp(round_half_even(z * (qmax / absmax)), -qmax, qmax)``,
# ``scale = absmax / qmax``. It writes int8 codes (for ``bits <= 4`` optionally
# packed two per byte, ``packing.pack_int4``'s layout) and the row scale; the
# float ``Z`` never reaches memory. The kernel walks the output blocks twice:
# sweep 1 computes each block of ``Z`` and keeps only the running row max, sweep 2
# recomputes the block and stores its codes. HBM traffic is one read of the ``X``
# tile (the second sweep re-reads it from cache), the small transform operands,
# and one write of the codes and scales — at the price of computing the
# transform twice (``4 K b`` multiply-adds per row for block size ``b``).
#
# Per output block ``j`` (channels ``[j b, j b + b)``):
#   * stage 1 without a permutation: ``x[:, block j] @ B1_j`` (``tl.dot``);
#   * stage 1 with a permutation: output channel ``c`` reads stage-1 channel
#     ``p = perm[c]``, i.e. ``sum_t x[:, src(c) + t] * B1_{p // b}[t, p % b]`` with
#     ``src(c) = (p // b) b``: a gathered multiply-reduce over ``[BLOCK_M, BT, BP]``
#     chunks (the channels of one output block come from many input blocks, so
#     there is no single tile to feed ``tl.dot``);
#   * stage 2: ``y_j @ B2_j`` (``tl.dot``).
# Both stages use :func:`prepare_rotation`'s operands (``w1 [K, BP]``: column
# ``perm[c]`` of its ``B1`` block for every output channel ``c``; ``src [K]``;
# ``w2 [NBLK, BP, BP]``: ``B2``'s blocks zero-padded to ``BP = next_pow2(b)``),
# built once at lowering time. Each stage's result is rounded to the activation
# dtype, as the reference computes each matmul in that dtype. Without a
# transform the kernel is plain per-token quantization (the ``-rtn`` recipes).
#
# Numerics: integer codes and scales are bit-exact against the reference
# (``block_rotate`` then ``quantize_rows_bits``) whenever the transform's sums are
# computed exactly (tested with small-integer data). Otherwise the kernel sums
# in its own order (and without FMA contraction), so ``Z`` may differ from the
# reference's in the last float bits: the scale then agrees to a few float32 ulps
# and a code may differ by 1 where the reference value lies within that rounding
# of a rounding boundary (``k + 1/2``) — tested with that tolerance.
# The transform is computed in float32 with ``input_precision="ieee"`` dots, also for
# fp16 / bf16 activations (a tuned kernel would run those on tensor cores).
@triton.jit
def _rotate_quantize_kernel(
    # pointers
    x_ptr,
    w1_ptr,
    src_ptr,
    w2_ptr,
    q_ptr,
    scale_ptr,
    # sizes
    M,
    K,
    BLOCK,
    NBLK,
    # strides
    stride_xm,
    stride_qm,
    # meta
    QMAX: tl.constexpr,
    EPS: tl.constexpr,
    HAS_W1: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_W2: tl.constexpr,
    PACK: tl.constexpr,
    MID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BP: tl.constexpr,
    BT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M

    # sweep 1: the row absmax of Z, block by block (Z is not stored)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(0, NBLK):
        y = _transform_block(
            x_ptr, w1_ptr, src_ptr, w2_ptr, rows, row_ok, stride_xm, K, BLOCK, j,
            HAS_W1, GATHER, HAS_W2, MID, BLOCK_M, BP, BT,
        )  # fmt: skip
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
    absmax = tl.maximum(amax, EPS)
    # the reference's qmax / absmax is torch's __rdiv__: reciprocal(absmax) * qmax,
    # each step rounded to float32 (and no FMA: the launch disables fp fusion)
    inv = tl.math.div_rn(1.0, absmax) * QMAX

    # sweep 2: recompute each block and store its codes
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    lanes = tl.arange(0, BP)
    for j in range(0, NBLK):
        y = _transform_block(
            x_ptr, w1_ptr, src_ptr, w2_ptr, rows, row_ok, stride_xm, K, BLOCK, j,
            HAS_W1, GATHER, HAS_W2, MID, BLOCK_M, BP, BT,
        )  # fmt: skip
        r = _round_half_even(y * inv[:, None])
        r = tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int32)  # 0 off range
        if PACK:
            lo, hi = tl.split(tl.reshape(r, [BLOCK_M, BP // 2, 2]))
            byte = (lo & 15) | (hi << 4)  # in [-128, 127]: the signed byte
            p = tl.arange(0, BP // 2)
            ok = (2 * p < BLOCK) & (j * BLOCK + 2 * p < K)
            dst = q_rows + (j * BLOCK // 2 + p)[None, :]  # BLOCK even, or one block
            tl.store(dst, byte.to(tl.int8), mask=row_ok[:, None] & ok[None, :])
        else:
            c = j * BLOCK + lanes
            ok = (lanes < BLOCK) & (c < K)
            tl.store(q_rows + c[None, :], r.to(tl.int8), mask=row_ok[:, None] & ok[None, :])

    tl.store(scale_ptr + rows, tl.math.div_rn(absmax, QMAX), mask=row_ok)


def _chunk_t(bp: int, block_m: int) -> int:
    """Reduction chunk of the gathered stage: one chunk under the interpreter (fewer
    steps), else about 8K elements per ``[BLOCK_M, BT, BP]`` tile."""
    if _interpret_env():
        return bp
    return max(1, min(bp, 8192 // (block_m * bp)))


def rotate_quantize_rows_bits_triton_impl(
    x: torch.Tensor,
    w1: torch.Tensor | None,
    src: torch.Tensor | None,
    w2: torch.Tensor | None,
    block: int,
    bits: int,
    pack: bool,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``lowbit_reference.rotate_quantize_rows_bits`` on :func:`prepare_rotation` operands.

    ``x [..., K]`` fp32 / fp16 / bf16; ``w1`` None means no transform (then ``src``,
    ``w2`` must be None and ``block`` is ignored). Returns ``(q, scale)``: ``q`` int8
    ``[..., K]``, or ``[..., ceil(K / 2)]`` packed with ``pack`` (``bits <= 4``);
    ``scale`` float32 ``[..., 1]``. ``block_t`` overrides the gathered stage's chunk.
    """
    qmax = lowbit_act.qmax_for(bits)
    if pack and bits > 4:
        raise ValueError(f"pack needs bits <= 4 (two values per byte), got {bits}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"activations must be fp32, fp16 or bf16, got {x.dtype}")
    _require_triton(x.device)
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if K and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if w1 is None:
        if src is not None or w2 is not None:
            raise ValueError("src / w2 without w1")
        block = max(16, min(triton.next_power_of_2(max(K, 1)), _PLAIN_CHUNK))
        bp = block
    else:
        bp = w1.shape[1]
        if w1.shape != (K, bp) or bp < block or bp & (bp - 1) or block <= 0:
            raise ValueError(
                f"w1 must be [K={K}, BP] with BP a power of two >= block={block}, "
                f"got {tuple(w1.shape)}"
            )
        if src is not None and (src.shape != (K,) or src.dtype != torch.int32):
            raise ValueError(f"src must be int32 [{K}], got {src.dtype} {tuple(src.shape)}")
    nblk = triton.cdiv(K, block) if K else 0
    if w2 is not None and (w1 is None or w2.shape != (nblk, bp, bp)):
        raise ValueError(f"w2 must be [{nblk}, {bp}, {bp}], got {tuple(w2.shape)}")
    in_kernel_pack = pack and (block % 2 == 0 or nblk <= 1)
    width = (K + 1) // 2 if in_kernel_pack else K
    q = torch.empty((M, width), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0:
        dummy = q
        block_m = ROWS_PER_PROGRAM
        with _device_ctx(x.device):
            _rotate_quantize_kernel[(triton.cdiv(M, block_m),)](
                x2,
                w1.contiguous() if w1 is not None else dummy,
                src.contiguous() if src is not None else dummy,
                w2.contiguous() if w2 is not None else dummy,
                q,
                scale,
                M,
                K,
                block,
                nblk,
                x2.stride(0),
                q.stride(0),
                QMAX=float(qmax),
                EPS=EPS,
                HAS_W1=w1 is not None,
                GATHER=src is not None,
                HAS_W2=w2 is not None,
                PACK=in_kernel_pack,
                MID=_MID[x.dtype] if w1 is not None else 0,
                BLOCK_M=block_m,
                BP=bp,
                BT=block_t or _chunk_t(bp, block_m),
                num_warps=4 if bp <= 64 else 8,
                enable_fp_fusion=False,
            )
    # pack with an odd block size and several blocks: a byte would straddle two blocks, so
    # the kernel wrote unpacked codes and they are packed here
    if pack and not in_kernel_pack:
        q = pack_int4(q)
    return q.reshape(*lead, q.shape[-1]), scale.reshape(*lead, 1)


def rotate_quantize_rows_bits_triton_from_blocks(
    x: torch.Tensor,
    blocks: torch.Tensor | None,
    tail: torch.Tensor | None,
    perm: torch.Tensor | None,
    blocks2: torch.Tensor | None,
    tail2: torch.Tensor | None,
    bits: int,
    pack: bool = False,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel with ``block_rotate``'s arguments (prepares the operands per call;
    for tests and one-off use — the lowering prepares them once)."""
    if all(t is None for t in (blocks, tail, perm, blocks2, tail2)):
        return rotate_quantize_rows_bits_triton_impl(x, None, None, None, 0, bits, pack, block_t)
    if blocks is None and tail is None:
        raise ValueError("a permutation or second stage needs the first stage's blocks")
    ops = prepare_rotation(blocks, tail, perm, blocks2, tail2, dtype=x.dtype)
    return rotate_quantize_rows_bits_triton_impl(
        x, ops.w1, ops.src, ops.w2, ops.block, bits, pack, block_t
    )


# --------------------------------------------------------------------------- #
# W4A4 GEMM on packed int4 operands
# --------------------------------------------------------------------------- #


def int4_gemm_configs() -> list[triton.Config]:
    """Autotune configs for ``_int4_gemm_kernel`` (BLOCK_K counts packed bytes: 2 values each)."""
    cfg = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps)
        (128, 256, 64, 8, 3, 8),
        (256, 128, 64, 8, 3, 8),
        (128, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
        (32, 64, 64, 8, 4, 4),
        (16, 64, 64, 8, 4, 4),  # decode (small M)
        (16, 128, 128, 8, 4, 4),
    ]
    return gemm_configs(cfg, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})


@triton.jit
def _unpack_nibbles(v):
    """Signed low and high nibbles of int8 bytes, as int8 tensors."""
    v = v.to(tl.int32)  # sign-extended byte
    return ((v << 28) >> 28).to(tl.int8), (v >> 4).to(tl.int8)


# ``_int4_gemm_kernel`` — W4A4 GEMM on packed int4 operands
# ``q[M, K] @ w[N, K]^T`` where both operands are ``pack_int4`` bytes ``[., W]``,
# ``W = ceil(K / 2)``. A ``[BLOCK_K]``-byte tile of each operand is unpacked in
# registers into its low nibbles (even ``k``) and high nibbles (odd ``k``); since
# both operands share the layout, ``acc += dot(a_lo, b_lo) + dot(a_hi, b_hi)``
# over int8 tiles with int32 accumulation, which is exact. The padding nibble of
# an odd ``K`` is 0 on both sides, so odd ``K`` needs no special case. Epilogue
# (``reference.int8_linear``'s order): ``acc * x_scale[m] * w_scale[n] (+ bias[n])``
# in float32 (float64 for a float64 output), cast to the output dtype; masked for
# ragged ``M``, ``N`` and ``W``. Grouped program order, autotuned tile sizes
# (:func:`int4_gemm_configs`; one small config under the interpreter).
@triton.autotune(configs=int4_gemm_configs(), key=["M", "N", "KP"])
@triton.jit
def _int4_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    c_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    # sizes (KP: packed bytes per row)
    M,
    N,
    KP,
    # strides
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    # meta
    DEQUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, offs_k, m_ok, n_ok = grouped_tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, KP, BLOCK_K):
        k_ok = (k0 + offs_k) < KP
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)  # [BM, BK] bytes
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BK, BN] bytes
        a_lo, a_hi = _unpack_nibbles(a)  # even / odd k of both operands
        b_lo, b_hi = _unpack_nibbles(b)
        acc = tl.dot(a_lo, b_lo, acc, out_dtype=tl.int32)
        acc = tl.dot(a_hi, b_hi, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if DEQUANT:
        # reference.int8_linear's order: acc * x_scale * w_scale (+ bias)
        xs = tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)
        ws = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
        if WIDE:
            out = acc.to(tl.float64) * xs.to(tl.float64)[:, None] * ws.to(tl.float64)[None, :]
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float64)[None, :]
        else:
            out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if c_ptr.dtype.element_ty == tl.bfloat16:
                out = _round_to_bf16_grid(out)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


def _check_packed(q_packed: torch.Tensor, w_packed: torch.Tensor) -> None:
    if q_packed.dtype != torch.int8 or w_packed.dtype != torch.int8:
        raise TypeError(
            f"packed int4 operands must be int8 bytes, got {q_packed.dtype} and {w_packed.dtype}"
        )
    if w_packed.dim() != 2 or q_packed.shape[-1] != w_packed.shape[1]:
        raise ValueError(
            f"packed widths differ: activations {tuple(q_packed.shape)}, weights "
            f"{tuple(w_packed.shape)} (both pack_int4 of the same K)"
        )


def _launch_int4_gemm(a, b, out, x_scale, w_scale, bias, dequant: bool) -> None:
    M, KP = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return
    dummy = out

    with _device_ctx(a.device):
        _int4_gemm_kernel[gemm_grid(M, N)](
            a,
            b,
            out,
            x_scale if x_scale is not None else dummy,
            w_scale if w_scale is not None else dummy,
            bias if bias is not None else dummy,
            M,
            N,
            KP,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            out.stride(0),
            out.stride(1),
            DEQUANT=dequant,
            HAS_BIAS=bias is not None,
            WIDE=out.dtype == torch.float64,
        )


def int4_matmul_int32_triton(q_packed: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``unpack(q) @ unpack(w)^T`` on packed operands (the GEMM without epilogue)."""
    _check_packed(q_packed, w_packed)
    _require_triton(q_packed.device)
    a = q_packed.reshape(-1, q_packed.shape[-1]).contiguous()
    b = w_packed.contiguous()
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    _launch_int4_gemm(a, b, out, None, None, None, dequant=False)
    return out.reshape(*q_packed.shape[:-1], b.shape[0])


def int4_linear_triton_impl(
    q_packed: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton ``lowbit_reference.int4_linear``."""
    _check_packed(q_packed, w_packed)
    _require_triton(q_packed.device)
    KP = q_packed.shape[-1]
    N = w_packed.shape[0]
    lead = q_packed.shape[:-1]
    a = q_packed.reshape(-1, KP).contiguous()
    M = a.shape[0]
    xs = x_scale.reshape(M).to(torch.float32).contiguous()
    ws = w_scale.reshape(N).to(torch.float32).contiguous()
    b = bias.reshape(N).contiguous() if bias is not None else None
    out = torch.empty((M, N), dtype=out_dtype, device=q_packed.device)
    _launch_int4_gemm(a, w_packed.contiguous(), out, xs, ws, b, dequant=True)
    return out.reshape(*lead, N)


# --------------------------------------------------------------------------- #
# Custom ops
# --------------------------------------------------------------------------- #


@torch.library.custom_op("lowbit::rotate_quantize_rows_bits_triton", mutates_args=())
def rotate_quantize_rows_bits_triton(
    x: torch.Tensor,
    w1: torch.Tensor | None,
    src: torch.Tensor | None,
    w2: torch.Tensor | None,
    block: int,
    bits: int,
    pack: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused online transform + per-token ``bits``-bit quantization (Triton); see
    :func:`rotate_quantize_rows_bits_triton_impl` and ``lowbit_reference.rotate_quantize_rows_bits``."""
    return rotate_quantize_rows_bits_triton_impl(x, w1, src, w2, block, bits, pack)


def _rotate_quantize_fake(x, w1, src, w2, block, bits, pack):
    lowbit_act.qmax_for(bits)
    width = (x.shape[-1] + 1) // 2 if pack else x.shape[-1]
    return (
        x.new_empty((*x.shape[:-1], width), dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


rotate_quantize_rows_bits_triton.register_fake(_rotate_quantize_fake)


@torch.library.custom_op("lowbit::int4_linear_triton", mutates_args=())
def int4_linear_triton(
    q_packed: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W4A4 GEMM on packed int4 operands (Triton); see ``lowbit_reference.int4_linear``."""
    return int4_linear_triton_impl(q_packed, x_scale, w_packed, w_scale, bias, out_dtype)


def _int4_linear_fake(q_packed, x_scale, w_packed, w_scale, bias, out_dtype):
    return q_packed.new_empty((*q_packed.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


int4_linear_triton.register_fake(_int4_linear_fake)


__all__ = [
    "MAX_FUSED_BLOCK",
    "RotationOperands",
    "fused_block_ok",
    "int4_gemm_configs",
    "int4_linear_triton",
    "int4_linear_triton_impl",
    "int4_matmul_int32_triton",
    "prepare_rotation",
    "rotate_quantize_rows_bits_triton",
    "rotate_quantize_rows_bits_triton_from_blocks",
    "rotate_quantize_rows_bits_triton_impl",
]
