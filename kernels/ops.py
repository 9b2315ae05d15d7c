"""The ``lowbit::`` custom ops that quantizing passes insert into graphs.

Each op is target-neutral: its implementation is the plain-PyTorch reference in
``reference.py`` and it has a fake (meta) implementation so dynamo/inductor can
trace it. ``qcompile.lowering`` later replaces these ops with the kernels of the
chosen target (``cpu_int8`` functions that inductor fuses, or Triton ops).
"""

from __future__ import annotations

import torch

from . import cpu_int8, lowbit_act  # noqa: F401  (lowbit_act registers quantize_rows_bits)
from . import reference as ref
from . import weight_only_reference as wo_ref


@torch.library.custom_op("lowbit::quantize_rows", mutates_args=())
def quantize_rows(
    x: torch.Tensor, inlier_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization; see ``reference.quantize_rows``."""
    return ref.quantize_rows(x, inlier_mask)


@quantize_rows.register_fake
def _(x, inlier_mask):
    return ref.empty_quantized_rows(x)


@torch.library.custom_op("lowbit::quantize_rows_copies", mutates_args=())
def quantize_rows_copies(
    x: torch.Tensor, copies: torch.Tensor, src: torch.Tensor, piece: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization with outlier columns spread over int8 copies; see
    ``reference.quantize_rows_copies``."""
    return ref.quantize_rows_copies(x, copies, src, piece)


@quantize_rows_copies.register_fake
def _(x, copies, src, piece):
    return ref.empty_quantized_copies(x, src)


@torch.library.custom_op("lowbit::int8_linear", mutates_args=())
def int8_linear(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    addend: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8 x int8 -> int32 GEMM with fused dequantization; see ``reference.int8_linear``."""
    return ref.int8_linear(q, x_scale, w_q, w_scale, bias, addend, out_dtype)


@int8_linear.register_fake
def _(q, x_scale, w_q, w_scale, bias, addend, out_dtype):
    return ref.empty_linear_out(q, w_q, out_dtype)


@torch.library.custom_op("lowbit::int8_mixed_linear_dynamic", mutates_args=())
def int8_mixed_linear_dynamic(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """LLM.int8() with outlier columns chosen per batch at run time (bitsandbytes' rule).

    A column is an outlier when any of its entries reaches ``threshold`` in this
    batch. Those columns are multiplied in full precision with the weight
    columns dequantized from int8 (as bitsandbytes does without fp16 weights);
    the rest go through the int8 path. Data-dependent, so it is opaque to
    compilers; the static (calibrated) split is the default.
    """
    x2 = x.reshape(-1, x.shape[-1])
    outlier = (x2.abs() >= threshold).any(dim=0)
    q, s = ref.quantize_rows(x2, ~outlier)
    addend = None
    if bool(outlier.any()):
        cols = outlier.nonzero().squeeze(1)
        w_cols = w_q.index_select(1, cols).float() * w_scale.float().unsqueeze(1)
        addend = x2.index_select(1, cols).float() @ w_cols.t()
    linear = cpu_int8.int8_linear if x.device.type == "cpu" else ref.int8_linear
    out = linear(q, s, w_q, w_scale, bias, addend, x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@int8_mixed_linear_dynamic.register_fake
def _(x, w_q, w_scale, bias, threshold):
    return torch.empty((*x.shape[:-1], w_q.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("lowbit::dequant_linear", mutates_args=())
def dequant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Weight-only low-bit linear; see ``weight_only_reference.dequant_linear``."""
    return wo_ref.dequant_linear(x, packed, scales, zeros, bits, group_size, bias)


@dequant_linear.register_fake
def _(x, packed, scales, zeros, bias, bits, group_size):
    return torch.empty((*x.shape[:-1], scales.shape[0]), dtype=x.dtype, device=x.device)


def _dequant_linear_setup(ctx, inputs, output):
    x, packed, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(x, packed, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dequant_linear_backward(ctx, grad):
    x, packed, scales, zeros = ctx.saved_tensors
    wanted = ctx.needs_input_grad
    needs = (wanted[0], wanted[2], wanted[4] and ctx.bias_dtype is not None)
    dx, ds, db = wo_ref.dequant_linear_backward(
        grad, x, packed, scales, zeros, ctx.bits, ctx.group_size, needs
    )
    db = None if db is None else db.to(ctx.bias_dtype)
    return dx, None, ds, None, db, None, None


# differentiable in x, scales and bias: E2E-QP trains the scales of frozen codes
dequant_linear.register_autograd(_dequant_linear_backward, setup_context=_dequant_linear_setup)


@torch.library.custom_op("lowbit::dequant_embedding", mutates_args=())
def dequant_embedding(
    ids: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Embedding lookup from a packed low-bit table; see
    ``weight_only_reference.dequant_embedding`` (the same op on every target)."""
    return wo_ref.dequant_embedding(ids, packed, scales, zeros, bits, group_size, dtype)


@dequant_embedding.register_fake
def _(ids, packed, scales, zeros, bits, group_size, dtype):
    return torch.empty((*ids.shape, scales.shape[1] * group_size), dtype=dtype, device=ids.device)


@torch.library.custom_op("lowbit::int8_embedding", mutates_args=())
def int8_embedding(
    ids: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, columns: int, dtype: torch.dtype
) -> torch.Tensor:
    """Embedding lookup from an int8 site's codes; see ``reference.int8_embedding``
    (the same op on every target)."""
    return ref.int8_embedding(ids, w_q, w_scale, columns, dtype)


@int8_embedding.register_fake
def _(ids, w_q, w_scale, columns, dtype):
    return torch.empty((*ids.shape, columns), dtype=dtype, device=ids.device)


# Mixture-of-Experts routing (passes/_expert_sites.py): the rows of a grouped product that
# one expert multiplies, and the per-expert products put back in the grouped order.


@torch.library.custom_op("lowbit::expert_rows", mutates_args=())
def expert_rows(x: torch.Tensor, offsets: torch.Tensor, expert: int) -> torch.Tensor:
    """Rows ``offsets[expert - 1]:offsets[expert]`` of ``x`` (rows sorted by expert;
    ``offsets`` the running count of rows per expert, as ``grouped_mm`` takes it)."""
    bounds = offsets.tolist()
    start = bounds[expert - 1] if expert > 0 else 0
    return x[start : bounds[expert]].clone()


@expert_rows.register_fake
def _(x, offsets, expert):
    rows = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((rows, *x.shape[1:]))


@torch.library.custom_op("lowbit::expert_concat", mutates_args=())
def expert_concat(parts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The experts' products in order, as one ``[rows of x, out]`` tensor; rows past the
    last expert's (none unless the routing drops tokens) are zero."""
    out = torch.cat(parts)
    if out.shape[0] < x.shape[0]:
        out = torch.cat([out, out.new_zeros((x.shape[0] - out.shape[0], *out.shape[1:]))])
    return out


@expert_concat.register_fake
def _(parts, x):
    return parts[0].new_empty((x.shape[0], *parts[0].shape[1:]))
