"""Reference numerics of the low-bit weight-activation recipes (W4A4, W6A6, W4A8).

Generalizes the int8 conventions of ``reference.py`` to a bit width ``b`` (2..8), with
``qmax = 2^(b-1) - 1``: activations per row (``lowbit_act.quantize_rows_bits``, which is
also the op's CPU lowering) and weights per output channel (optionally clipped per
channel), symmetric, to ``[-qmax, qmax]`` held in int8; the GEMM is the int8 one, exact in
int32. For ``b = 8`` these equal ``reference.quantize_rows`` /
``reference.quantize_weight_per_channel`` bit for bit. The fused transform + quantization
kernels (``cpu_lowbit``, ``triton_lowbit``) and the packed W4A4 GEMM are tested against
:func:`rotate_quantize_rows_bits` and :func:`int4_linear`.
"""

from __future__ import annotations

import torch

from . import reference as ref
from .lowbit_act import block_rotate, qmax_for, quantize_rows_bits
from .packing import pack_int4, unpack_int4
from .reference import EPS

__all__ = ["int4_linear", "quantize_weight_per_channel_bits", "rotate_quantize_rows_bits"]


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
