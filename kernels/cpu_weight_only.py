"""CPU lowering of the weight-only low-bit linear (``w{8,4,3,2}a16-g{G}``).

``prepack_cpu`` turns a weight's codes and group parameters into buffers once, at
lowering time; ``dequant_linear_cpu`` (aten ops, inlined by AOT tracing so inductor fuses
around it) computes ``weight_only_reference.dequant_linear`` from them. Invariant: the
prepacked keys select the path (``cpu_path``), every path computes the reference within
the tolerance stated at ``dequant_linear_cpu``, and the codes stay recoverable from the
buffers (``packed`` words, ``restore_codes`` / ``restore_codes8``, or a ``codes`` copy).
Timings that chose the paths: docs/results.md ("CPU weight-only kernels",
``benchmarks/bench_cpu_kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_packed
from .cpu_int8 import known_at_run_time
from .packing import SUPPORTED_BITS, pack

# aten._weight_int4pack_mm_for_cpu (the torch.* binding skips ~1 us of op-packet dispatch)
_int4mm = torch._weight_int4pack_mm_for_cpu
DECODE_MAX_M = 32  # M <= this takes the int4 GEMV kernels (docs/results.md: the M sweep)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts


# --------------------------------------------------------------------------- #
# torch's CPU int4 layout
# --------------------------------------------------------------------------- #


def _int4pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in 0..15 -> torch's CPU int4 weight (uint8 [N, K/2])."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def _find_int4_block_rows() -> int:
    """Rows per block of torch's CPU int4 layout on this CPU (torch 2.13: 64 with
    AVX-512, 32 with AVX2), found by packing a probe; 0 when neither decodes it."""
    n, k = 128, 64
    probe = (torch.arange(n * k) * 7 % 16).to(torch.uint8).reshape(n, k)
    w4 = _int4pack(probe)
    for rows in (64, 32):
        if w4.shape == (n, k // 2) and torch.equal(_unblock(w4, n, k, rows), probe):
            return rows
    return 0


def _unblock(w4: torch.Tensor, n: int, k: int, rows: int) -> torch.Tensor:
    b = w4.reshape(n // rows, k, rows // 2)
    c = torch.stack((b & 15, b >> 4), dim=1)  # [N/rows, 2, K, rows/2]
    return c.transpose(2, 3).reshape(n, k)


def _int4unpack(w4: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``_int4pack`` for N a multiple of ``int4_block_rows()`` (aten ops;
    inductor fuses it).

    The layout (torch 2.13): blocks of B rows (64 with AVX-512, 32 with AVX2); within a
    block, byte ``k * B/2 + j`` holds row ``j`` (low nibble) and row ``j + B/2`` (high
    nibble) of column ``k`` (``INT4_BLOCK_ROWS``). ``prepack_cpu`` checks this on every weight it packs and
    keeps a plain copy of the codes when it does not hold.
    """
    return _unblock(w4, n, k, INT4_BLOCK_ROWS)


INT4_BLOCK_ROWS = _find_int4_block_rows()  # at import: traced code reads a constant


def _int4_ok(n: int, k: int, group_size: int) -> bool:
    return n % 16 == 0 and group_size in INT4_GROUP_SIZES and k % group_size == 0 and k % 2 == 0


def _pack_int4_checked(codes: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(w4, whether ``_int4unpack`` recovers ``codes`` from it)."""
    n, k = codes.shape
    w4 = _int4pack(codes)
    rows = INT4_BLOCK_ROWS
    ok = rows > 0 and n % rows == 0 and w4.shape == (n, k // 2) and w4.dtype == torch.uint8
    ok = ok and torch.equal(_int4unpack(w4, n, k), codes)
    return w4, ok


def group_shift(w4: torch.Tensor, codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """The per-group shift ``c`` (int8 ``[N, K/G]``) ``prepack_cpu`` added to ``codes``
    to make its ``w4`` (a verified layout: no ``codes`` key in its output)."""
    n, k = codes.shape
    d = _int4unpack(w4, n, k).to(torch.int16) - codes.to(torch.int16)
    d = d.reshape(n, k // group_size, group_size)
    shift = d[..., 0]
    if not torch.equal(d, shift.unsqueeze(-1).expand_as(d)):
        raise ValueError("w4 does not hold these codes shifted by a constant per group")
    return shift.to(torch.int8)


def restore_codes(w4: torch.Tensor, shift: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of the prepack for a verified layout: the original codes (uint8 ``[N, K]``)
    from ``w4`` and ``group_shift``'s result."""
    n, ng = shift.shape
    k = ng * group_size
    q = _int4unpack(w4, n, k).to(torch.int16).reshape(n, ng, group_size)
    return (q - shift.to(torch.int16).unsqueeze(-1)).reshape(n, k).to(torch.uint8)


def restore_codes8(w4_hi: torch.Tensor, w4_lo: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The 8-bit codes ``16 h + l`` from the two verified int4 layouts of ``prepack_cpu``."""
    return (_int4unpack(w4_hi, n, k) << 4) | _int4unpack(w4_lo, n, k)


def _scale_zero(s: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
    """[N, K/G] scale and offset -> torch's ``qScaleAndZeros`` bf16 [K/G, N, 2]."""
    return torch.stack((s.t(), zf.t()), dim=-1).to(torch.bfloat16).contiguous()


# --------------------------------------------------------------------------- #
# Prepacking
# --------------------------------------------------------------------------- #


def prepack_cpu(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    act_dtype: torch.dtype,
    *,
    exact: bool = False,
    packed: torch.Tensor | None = None,
    packed_kernels: bool = True,
) -> dict[str, torch.Tensor]:
    """Prepack codes ``q [N, K]`` and ``scales``/``zeros [N, K/G]`` for ``dequant_linear_cpu``.

    ``q``: uint8 codes (unpack the dense format with ``packing.unpack`` first);
    ``scales``/``zeros`` as ``weight_only_reference`` produces them. ``packed``: the
    same codes in ``packing.pack``'s layout where the caller holds them (the
    ``packed`` path then reuses that tensor); ``packed_kernels=False`` keeps oneDNN's
    int4 layout (the earlier default, for comparison). ``act_dtype`` is the activation
    dtype the layer will see; the fast paths compute in bf16 whatever it is (see
    ``dequant_linear_cpu`` for tolerances). Returns the tensors to register as buffers;
    which keys are present selects the path (the comment above ``cpu_path``).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide K={k}")
    if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"scales/zeros must be [{n}, {k // group_size}]")
    if act_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"act_dtype must be fp32, bf16 or fp16, got {act_dtype}")
    codes = q.to(torch.uint8).contiguous()
    if packed_kernels and not exact and cpu_packed.supports(k, group_size, bits):
        params = cpu_packed.prepack(scales, zeros, bits)
        if params is not None:
            words = pack(codes, bits) if packed is None else packed.contiguous()
            return {"packed": words, **params}
    if exact or not _int4_ok(n, k, group_size):
        return {"codes": codes, "scales": scales.float(), "zeros": zeros.float()}

    # bf16 scale first; offsets are computed from it in float64 and rounded once
    s_b = scales.to(torch.bfloat16)
    s64 = s_b.double()
    z64 = zeros.double()
    if bits <= 4:
        # Shift each group's codes by an integer c (keeping them in 0..15) so that
        # the offset zf = (8 - z - c) s is as small as possible: for 2 and 3 bits
        # c = 8 - z always fits and zf is exactly 0; for 4 bits usually c = 0.
        ng = k // group_size
        qg = codes.reshape(n, ng, group_size).to(torch.int32)
        c = torch.clamp(8 - zeros.to(torch.int32), min=-qg.amin(-1), max=15 - qg.amax(-1))
        codes = (qg + c.unsqueeze(-1)).to(torch.uint8).reshape(n, k)
        w4, layout_ok = _pack_int4_checked(codes)
        out = {"w4": w4, "sz": _scale_zero(s64, (8 - z64 - c.double()) * s64)}
        if not layout_ok:
            out["codes"] = codes
        return out
    # 8 bits: q = 16 h + l, (q - z) s = 16 s (h - 8) + s (l - 8) - (z - 136) s.
    # The two int4 calls get zero offsets (nothing to round) and stay centred
    # like W, so their bf16 outputs carry errors on the scale of |x| |W|; the
    # offset is a per-group float32 correction (exact: 9 x 8 bits).
    hi, lo = codes >> 4, codes & 15
    w4_hi, ok_hi = _pack_int4_checked(hi)
    w4_lo, ok_lo = _pack_int4_checked(lo)
    out = {
        "w4_hi": w4_hi,
        "w4_lo": w4_lo,
        "sz_hi": _scale_zero(16 * s64, torch.zeros_like(s64)),  # 16 s: exact in bf16
        "sz_lo": _scale_zero(s64, torch.zeros_like(s64)),
        "zs": ((z64 - 136) * s64).float().t().contiguous(),  # [K/G, N]
    }
    if not (ok_hi and ok_lo):
        out["codes"] = codes
    return out


# Paths (the fastest correct one per bit width and M; timings in docs/results.md):
# * ``packed_gemv`` / ``packed_dequant`` (the default wherever ``cpu_packed.supports``
#   the shape — G a multiple of 32 — and the group parameters fit fp16 scales and uint8
#   zero points): ``kernels.cpu_packed``, which reads the codes at their stored width
#   (2, 3, 4 or 8 bits: resident memory is the recipe's size) with int8 activations per
#   block of 32 at M <= ``cpu_packed.GEMV_MAX_M`` (decode), and dequantizes them for the
#   float GEMM above it. Prepacked: ``packed`` (int32, ``packing.pack``'s layout),
#   ``scales16``, ``zeros8``. Tolerance: its own (``cpu_packed.reference_linear``);
#   against the reference, the int8 rounding of x: ``|y - y_ref| <=
#   (d_blocks / 2) @ |W|^T`` plus float32 rounding, ``d = max|x_block| / 127``.
#   The paths below are the fallbacks (other group sizes, ``exact=True``, no C++
#   compiler).
# * ``int4pack`` (bits 2, 3, 4; M <= DECODE_MAX_M): ``aten._weight_int4pack_mm_for_cpu``
#   with bf16 activations. 2- and 3-bit codes are valid 4-bit codes, so all
#   three use the same kernel (at 4 bits of memory per weight at run time; the
#   stored checkpoint format stays dense). torch's CPU int4 convention is
#   ``w = (q - 8) * s + zf`` with a float offset; ours ``(q - z) * s`` maps to it
#   exactly in real arithmetic with ``zf = (8 - z) * s``. To keep ``zf`` small
#   (it is rounded to bf16), prepack shifts each group's codes by an integer
#   ``c`` that keeps them in 0..15 — ``q' = q + c``, ``zf = (8 - z - c) s`` —
#   with ``c = 8 - z`` whenever that fits, which is always the case at 2 and 3
#   bits (``zf`` is then exactly 0). Prepacked: ``w4`` (uint8 ``[N, K/2]``,
#   torch's blocked layout) and ``sz`` (bf16 ``[K/G, N, 2]``: scale, zf).
# * ``int4pack_x2`` (bits 8; M <= DECODE_MAX_M): an 8-bit code is ``16*h + l``
#   with two 4-bit halves, so ``(q - z) s = (h - 8) 16s + (l - 8) s - (z - 136) s``:
#   two int4 GEMVs with zero offsets (16s is exact in bf16) and a per-group
#   correction ``sum_{k in g} x_k * (z - 136) s`` done as a ``[M, K/G] @ [K/G, N]``
#   float32 matmul. Prepacked: ``w4_hi``, ``w4_lo``, ``sz_hi``, ``sz_lo``, ``zs``.
#   (No per-group offset trick works inside one int4 call at 8 bits: an offset
#   ``(8 - z) s`` needs 12+ significant bits and bf16 has 8, an error of up to
#   s/4 — half the 8-bit rounding error — hence the separate correction.)
# * ``dequant`` (prefill, M > DECODE_MAX_M, all bit widths): unpack the codes
#   (from torch's blocked int4 layout, which prepack verifies, else from a
#   ``codes`` uint8 copy), dequantize to bf16 with the same bf16 scales and
#   offsets as the decode path, and run oneDNN's bf16 GEMM (2x the fp32 GEMM on
#   this AVX512-BF16 CPU); under inductor the dequantization is one fused loop.
# * ``exact`` (``prepack_cpu(..., exact=True)``, and the fallback when the int4
#   kernels cannot take the weight: N % 16 != 0 or G not in 32/64/128/256):
#   ``codes`` + ``scales``/``zeros`` (float32), dequantized in float32 and
#   rounded to ``x.dtype`` per call, then a float32 GEMM: the reference
#   numerics. Slow at decode (the whole weight is dequantized per token).
def cpu_path(prepacked: dict[str, torch.Tensor], m: int) -> str:
    """Which path ``dequant_linear_cpu`` takes for ``m`` rows."""
    if "packed" in prepacked:
        return "packed_gemv" if m <= cpu_packed.GEMV_MAX_M else "packed_dequant"
    if "w4" in prepacked:
        return "int4pack" if m <= DECODE_MAX_M else "dequant"
    if "w4_hi" in prepacked:
        return "int4pack_x2" if m <= DECODE_MAX_M else "dequant"
    return "exact"


# --------------------------------------------------------------------------- #
# The lowered linear
# --------------------------------------------------------------------------- #


def _codes(p: dict[str, torch.Tensor], key: str, n: int, k: int) -> torch.Tensor:
    if "codes" in p:
        return p["codes"]
    return _int4unpack(p[key], n, k)


def _dequant_bf16(p: dict[str, torch.Tensor], bits: int, group_size: int, n: int, k: int):
    """The bf16 weight the decode kernels use implicitly, as a dense [N, K] tensor."""
    ng = k // group_size
    if bits <= 4:
        s = p["sz"][..., 0].t().float().unsqueeze(-1)
        zf = p["sz"][..., 1].t().float().unsqueeze(-1)
        # in place: one float32 temporary in eager mode (inductor fuses it anyway)
        w = _codes(p, "w4", n, k).reshape(n, ng, group_size).float()
        w = w.sub_(8.0).mul_(s).add_(zf)
    else:
        if "codes" in p:
            c = p["codes"]
        else:
            c = _int4unpack(p["w4_hi"], n, k) * 16 + _int4unpack(p["w4_lo"], n, k)
        s = p["sz_lo"][..., 0].t().float().unsqueeze(-1)
        w = c.reshape(n, ng, group_size).float()
        w = w.sub_(136.0).mul_(s).sub_(p["zs"].t().unsqueeze(-1))  # (q - z) s, exact
    return w.reshape(n, k).to(torch.bfloat16)


def dequant_linear_cpu(
    x: torch.Tensor,
    prepacked: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only low-bit linear on the CPU; same contract as
    ``weight_only_reference.dequant_linear`` within the tolerances below.

    ``x [..., K]`` (fp32 / bf16 / fp16) -> ``[..., N]`` in ``x.dtype``. A plain function
    of aten ops, not a custom op: AOT tracing inlines it, so inductor sees
    ``aten._weight_int4pack_mm_for_cpu`` (it has a lowering for it) and fuses the
    unpack/dequantize pointwise work and the dtype casts of the prefill path into single
    kernels. The decode/prefill choice is a Python branch on M, i.e. a guard: prefill and
    decode graphs differ anyway.

    Tolerance against ``weight_only_reference.dequant_linear``: ``exact``: float32 summation order only (fp32: ~1e-6 relative; bf16/fp16
    output: one rounding of the result). The bf16 paths (``int4pack``,
    ``int4pack_x2``, ``dequant``) round x (if fp32/fp16) and the scales (if fp32/
    fp16) to bf16 (2^-9 relative each), round the output (or, for w8, the two
    partial outputs) to bf16, and at 4 bits round the offset ``zf`` to bf16
    (<= 8 s 2^-9 = s/64 per group, 3% of the half-step RTN bound; 0 at 2 and 3
    bits). The ``dequant`` path also rounds the dequantized weight to bf16, as
    the reference does for bf16 activations. Tested bound, every path and
    activation dtype: ``|y - y_ref| <= 8e-3 * (|x| @ |W|^T + |bias|)``; the worst
    case seen (all-positive activations, so no cancellation) is 4e-3. For w8
    with fp32 activations this is comparable to the 8-bit quantization error
    itself (bf16 cannot hold a 255-level code times a scale exactly); use
    ``exact=True`` where that matters.
    """
    p = prepacked
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    if known_at_run_time(m):  # a MoE expert's rows: the path is chosen when they are known
        names = sorted(p)
        return torch.ops.lowbit.dequant_linear_cpu_rows(
            x, [p[name] for name in names], ",".join(names), bits, group_size, bias
        )
    path = cpu_path(p, m)
    if path.startswith("packed"):
        n = p["packed"].shape[0]
        y = cpu_packed.packed_linear(
            x2, p["packed"], p["scales16"], p["zeros8"], bits, group_size, bias
        )
        return y if x.dim() == 2 else y.reshape(*lead, n)
    if path == "exact":
        n = p["codes"].shape[0]
        ng = k // group_size
        c = p["codes"].reshape(n, ng, group_size).float()
        w = (c - p["zeros"].unsqueeze(-1)) * p["scales"].unsqueeze(-1)
        w = w.reshape(n, k).to(x.dtype).float()
        y = F.linear(x2.float(), w, None if bias is None else bias.float())
        return y.to(x.dtype).reshape(*lead, n)

    n = (p["w4"] if bits <= 4 else p["w4_hi"]).shape[0]
    y = _packed_mm(x2.to(torch.bfloat16), p, path, bits, group_size)
    if bias is not None:
        y = y.float() + bias.float()
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*lead, n)


def dequant_linear_cpu_group(
    x: torch.Tensor,
    prepacked: list[dict[str, torch.Tensor]],
    bits: int,
    group_size: int,
    biases: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """:func:`dequant_linear_cpu` of several packed weights of one input (q/k/v, gate/up),
    each output the same: at decode one ``packed_linear_group`` call for all of them (the
    row quantized once, one parallel pass), else each weight's own path."""
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    if known_at_run_time(m) or not all(cpu_path(p, m) == "packed_gemv" for p in prepacked):
        return [dequant_linear_cpu(x, p, bits, group_size, b) for p, b in zip(prepacked, biases)]
    ys = cpu_packed.packed_linear_group(
        x2,
        [p["packed"] for p in prepacked],
        [p["scales16"] for p in prepacked],
        [p["zeros8"] for p in prepacked],
        bits,
        group_size,
        biases,
    )
    return ys if x.dim() == 2 else [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def _packed_mm(xb, p, path: str, bits: int, group_size: int) -> torch.Tensor:
    """``xb [M, K]`` (bf16) times the packed weight by ``path``, in float32 (the bf16
    results widened, so that every path returns one dtype)."""
    m, k = xb.shape
    if path == "int4pack":
        return _int4mm(xb, p["w4"], group_size, p["sz"]).float()
    if path == "int4pack_x2":
        y = _int4mm(xb, p["w4_hi"], group_size, p["sz_hi"]).float()
        y = y + _int4mm(xb, p["w4_lo"], group_size, p["sz_lo"])
        xg = xb.float().reshape(m, k // group_size, group_size).sum(-1)
        return y - xg @ p["zs"]
    n = (p["w4"] if bits <= 4 else p["w4_hi"]).shape[0]  # dequant (prefill)
    return F.linear(xb, _dequant_bf16(p, bits, group_size, n, k)).float()


@torch.library.custom_op("lowbit::dequant_linear_cpu_rows", mutates_args=())
def dequant_linear_cpu_rows(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    names: str,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``dequant_linear_cpu`` as one op, for inputs whose row count is known only at run
    time (its path depends on it); ``names``: the prepacked keys of ``packed``, joined by
    commas. Computes exactly what the function does."""
    return dequant_linear_cpu(x, dict(zip(names.split(","), packed)), bits, group_size, bias)


@dequant_linear_cpu_rows.register_fake
def _(x, packed, names, bits, group_size, bias):
    p = dict(zip(names.split(","), packed))
    n = next(p[key] for key in ("packed", "codes", "w4", "w4_hi") if key in p).shape[0]
    return x.new_empty((*x.shape[:-1], n))
