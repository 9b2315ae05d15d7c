"""CPU lowering of the weight-only low-bit linear (``w{8,4,3,2}a16-g{G}``).

API
---
``prepack_cpu(q, scales, zeros, bits, group_size, act_dtype, *, exact=False, packed=None, packed_kernels=True)``
    Once per weight, at lowering time. ``q`` uint8 codes ``[N, K]`` (unpack the
    dense format with ``packing.unpack`` first), ``scales``/``zeros``
    ``[N, K // G]`` as produced by ``weight_only_reference``; ``packed``: the same
    codes in ``packing.pack``'s layout where the caller holds them (the ``packed``
    path then reuses that tensor); ``packed_kernels=False`` keeps oneDNN's int4 layout
    (the earlier default, for comparison). Returns the tensors to register as buffers (a
    ``dict[str, Tensor]``); which keys are present selects the path.
``dequant_linear_cpu(x, prepacked, bits, group_size, bias=None) -> Tensor``
    ``x [..., K]`` (fp32 / bf16 / fp16) -> ``[..., N]`` in ``x.dtype``.
    A plain function of aten ops, not a custom op: AOT tracing inlines it, so
    inductor sees ``aten._weight_int4pack_mm_for_cpu`` (it has a lowering for
    it) and fuses the unpack/dequantize pointwise work and the dtype casts of
    the prefill path into single kernels. The decode/prefill choice is a
    Python branch on M, i.e. a guard: prefill and decode graphs differ anyway.
``cpu_path(prepacked, m) -> str``
    The path ``dequant_linear_cpu`` takes for M rows (for tests and reports).

Paths (the fastest correct one per bit width and M, from the measurements below)
----------------------------------------------------------------------------------
* ``packed_gemv`` / ``packed_dequant`` (the default wherever ``cpu_packed.supports``
  the shape — G a multiple of 32 — and the group parameters fit fp16 scales and uint8
  zero points): ``kernels.cpu_packed``, which reads the codes at their stored width
  (2, 3, 4 or 8 bits: resident memory is the recipe's size) with int8 activations per
  block of 32 at M <= ``cpu_packed.GEMV_MAX_M`` (decode), and dequantizes them for the
  float GEMM above it. Prepacked: ``packed`` (int32, ``packing.pack``'s layout),
  ``scales16``, ``zeros8``. Tolerance: its own (``cpu_packed.reference_linear``);
  against the reference, the int8 rounding of x: ``|y - y_ref| <=
  (d_blocks / 2) @ |W|^T`` plus float32 rounding, ``d = max|x_block| / 127``.
  The paths below are the fallbacks (other group sizes, ``exact=True``, no C++
  compiler) and the measurements that chose them.
* ``int4pack`` (bits 2, 3, 4; M <= DECODE_MAX_M): ``aten._weight_int4pack_mm_for_cpu``
  with bf16 activations. 2- and 3-bit codes are valid 4-bit codes, so all
  three use the same kernel (at 4 bits of memory per weight at run time; the
  stored checkpoint format stays dense). torch's CPU int4 convention is
  ``w = (q - 8) * s + zf`` with a float offset; ours ``(q - z) * s`` maps to it
  exactly in real arithmetic with ``zf = (8 - z) * s``. To keep ``zf`` small
  (it is rounded to bf16), prepack shifts each group's codes by an integer
  ``c`` that keeps them in 0..15 — ``q' = q + c``, ``zf = (8 - z - c) s`` —
  with ``c = 8 - z`` whenever that fits, which is always the case at 2 and 3
  bits (``zf`` is then exactly 0). Prepacked: ``w4`` (uint8 ``[N, K/2]``,
  torch's blocked layout) and ``sz`` (bf16 ``[K/G, N, 2]``: scale, zf).
* ``int4pack_x2`` (bits 8; M <= DECODE_MAX_M): an 8-bit code is ``16*h + l``
  with two 4-bit halves, so ``(q - z) s = (h - 8) 16s + (l - 8) s - (z - 136) s``:
  two int4 GEMVs with zero offsets (16s is exact in bf16) and a per-group
  correction ``sum_{k in g} x_k * (z - 136) s`` done as a ``[M, K/G] @ [K/G, N]``
  float32 matmul. Prepacked: ``w4_hi``, ``w4_lo``, ``sz_hi``, ``sz_lo``, ``zs``.
  (No per-group offset trick works inside one int4 call at 8 bits: an offset
  ``(8 - z) s`` needs 12+ significant bits and bf16 has 8, an error of up to
  s/4 — half the 8-bit rounding error — hence the separate correction.)
* ``dequant`` (prefill, M > DECODE_MAX_M, all bit widths): unpack the codes
  (from torch's blocked int4 layout, which prepack verifies, else from a
  ``codes`` uint8 copy), dequantize to bf16 with the same bf16 scales and
  offsets as the decode path, and run oneDNN's bf16 GEMM (2x the fp32 GEMM on
  this AVX512-BF16 CPU); under inductor the dequantization is one fused loop.
* ``exact`` (``prepack_cpu(..., exact=True)``, and the fallback when the int4
  kernels cannot take the weight: N % 16 != 0 or G not in 32/64/128/256):
  ``codes`` + ``scales``/``zeros`` (float32), dequantized in float32 and
  rounded to ``x.dtype`` per call, then a float32 GEMM: the reference
  numerics. Slow at decode (the whole weight is dequantized per token).

Tolerance against ``weight_only_reference.dequant_linear``
----------------------------------------------------------
``exact``: float32 summation order only (fp32: ~1e-6 relative; bf16/fp16
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

Measurements
------------
Machine: 2-core AMD EPYC (Zen 4) VM, AVX512-BF16/VNNI, no AMX; torch 2.13 CPU
(OpenMP, oneDNN 3.12); G = 64; fp32 activations in and out for the ``lowbit``
columns (they include the fp32 <-> bf16 casts). Reproduce with
``python -m qcompile.kernels.cpu_weight_only [--threads T] [--layers | --inductor | --sweep]``.
Timings are the best of interleaved rounds (ms): other jobs kept one or both
cores busy throughout, and a 2-thread OpenMP region then waits a scheduler
slice (~6 ms) for its second thread, so single-call 2-thread numbers were
often unusable; the per-shape table is 1 thread, the layer figures have both.

Per shape, 1 thread, weights hot in cache::

    shape (N x K)        M   fp32    bf16   int4pack  int8pack  lowbit  lowbit  lowbit  int4pack
                             linear  linear kernel    per-chan  w4      w8      exact   fp32 act
    q/o   576 x 576      1   0.047   0.065  0.021     0.026     0.032   0.074   0.152   0.581
    k/v   192 x 576      1   0.012   0.033  0.009     0.008     0.019   0.041   0.065   0.199
    gate/up 1536 x 576   1   0.225   0.234  0.058     0.094     0.087   0.170   0.645   1.574
    down  576 x 1536     1   0.170   0.198  0.056     0.080     0.080   0.167   0.528   1.559
    lm_head 49152 x 576  1   10.38   6.67   1.55      3.93      1.64    3.36    188     -
    layer (q,k,v,o,g,u,d) 1  0.738   0.862  0.232     0.336     0.356   0.737   2.25    6.27
      speed-up vs fp32       1.00x   0.86x  3.18x     2.20x     2.07x   1.00x   0.33x   0.12x
    q/o                 512  3.72    1.97   4.49      4.69      2.77    2.74    4.01
    k/v                 512  1.20    0.64   1.38      1.52      1.04    0.90    1.35
    gate/up             512  10.90   5.07   12.32     13.50     6.74    6.88    10.93
    down                512  9.81    4.69   11.05     12.00     6.37    6.85    10.56
    lm_head             512  407.5   151.6  358.6     827.5     329.6   402.0   593.0
    layer               512  41.5    20.0   47.4      51.4      27.4    27.9    43.1
      speed-up vs fp32       1.00x   2.07x  0.87x     0.81x     1.51x   1.49x   0.96x

("int8pack per-chan" is ``_weight_int8pack_mm``: per-channel scales only, so
it cannot express group-wise w8; listed for reference. "int4pack fp32 act":
the int4 kernel with fp32 activations — 10x slower than fp32 F.linear.)

Decode through 8 distinct layers (115 MB of fp32 weights, streamed from
memory as in a real decode step; ``--layers``), ms per layer, M = 1::

                 fp32 linear   lowbit w2      w3             w4             w8
    1 thread     1.226         0.266 (4.6x)   0.269 (4.6x)   0.271 (4.5x)   0.612 (2.0x)
    2 threads    1.226         0.187 (6.5x)   0.192 (6.4x)   0.186 (6.6x)   0.465 (2.6x)

One layer with glue ops, ``torch.compile`` (inductor) vs eager, M = 1, ms
(``--inductor``; inductor fuses the casts and CSEs q/k/v's shared cast)::

                 fp32 eager   fp32 inductor   w4 eager      w4 inductor   w8 inductor
    1 thread     1.25         1.48            0.32 (3.9x)   0.36 (3.5x)   0.62 (2.0x)
    2 threads    1.09         4.04 (!)        0.23 (4.7x)   0.27 (4.0x)   0.44 (2.5x)

(!) seen in three runs (2.9-4.1 ms), not investigated: inductor's fp32 decode layer
at 2 threads; the lowbit rows do not depend on it.

M sweep (gate/up shape, 1 thread, ``--sweep``), ms: int4 kernel vs eager
dequant + bf16 GEMM: M=1 0.067 vs 1.10; M=8 0.19 vs 1.34; M=32 0.69 vs 1.52;
M=64 1.36 vs 1.87 (fp32 linear 1.43). Hence ``DECODE_MAX_M = 32``. Eager
dequantization of the 1536 x 576 weight to bf16 takes 0.9 ms (4 bits) /
1.35 ms (8 bits); under inductor it is one fused loop (~0.4-0.8 ms).

Verdict. Decode at 4 (and 2, 3) bits: the int4 kernel alone is 3.2x faster
than fp32 F.linear over a layer's shapes with weights hot in cache, and the
lowering is 4.5x (1 thread) / 6.6x (2 threads) faster when the weights stream
from memory as in real decoding, 3.5-4x under inductor; the one setting
below the 2.5x goal is eager mode with hot caches (2.07x), where the two
fp32 <-> bf16 casts (~5 us per call) weigh on the 9-60 us GEMVs. w8 decode:
2.0-2.6x streamed, ~1.0x hot (two int4 GEMVs plus a correction). Prefill:
dequantize + oneDNN bf16 GEMM is 1.5x fp32 in eager (the int4 kernel is
slower than fp32 at M = 512); dense bf16 F.linear would be 2.1x.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu_packed
from .cpu_int8 import known_at_run_time
from .packing import SUPPORTED_BITS, pack

# aten._weight_int4pack_mm_for_cpu (the torch.* binding skips ~1 us of op-packet dispatch)
_int4mm = torch._weight_int4pack_mm_for_cpu
DECODE_MAX_M = 32  # M <= this takes the int4 GEMV kernels (see the M sweep above)
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

    ``act_dtype`` is the activation dtype the layer will see; the fast paths
    compute in bf16 whatever it is (see the module docstring for tolerances).
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
    ``weight_only_reference.dequant_linear`` within the tolerances above."""
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


# --------------------------------------------------------------------------- #
# Benchmark (python -m qcompile.kernels.cpu_weight_only [--quick])
# --------------------------------------------------------------------------- #

SMOLLM2_SHAPES = {  # (N, K) of a SmolLM2-135M layer, plus the lm_head
    "q/o_proj": (576, 576),
    "k/v_proj": (192, 576),
    "gate/up_proj": (1536, 576),
    "down_proj": (576, 1536),
    "lm_head": (49152, 576),
}
LAYER = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}  # calls per layer


def _time(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Best-of-rounds milliseconds per call, rounds interleaved across ``fns``
    (the best round is the least disturbed by other jobs on a shared machine)."""
    import time

    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return {name: v * 1e3 for name, v in best.items()}


@functools.cache
def _bench_weight(n: int, k: int, bits: int, g: int):
    from .weight_only_reference import quantize_groupwise

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, s, z = quantize_groupwise(w, bits, g, torch.float32)
    return w, q, s, z


def _candidates(x, w, p4, p8, pe, group_size: int) -> dict:
    """The paths timed by ``benchmark`` for one (shape, M)."""
    xb, wb = x.bfloat16(), w.bfloat16()
    n = w.shape[0]
    w8 = torch.randint(-127, 127, w.shape, dtype=torch.int8)
    s8 = torch.rand(n).bfloat16()
    int4mm = _int4mm
    fns = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "int4pack kernel (bf16)": lambda: int4mm(xb, p4["w4"], group_size, p4["sz"]),
        "int8pack per-channel (bf16)": lambda: torch._weight_int8pack_mm(xb, w8, s8),
        "lowbit w4": lambda: dequant_linear_cpu(x, p4, 4, group_size),
        "lowbit w8": lambda: dequant_linear_cpu(x, p8, 8, group_size),
        "lowbit exact w4": lambda: dequant_linear_cpu(x, pe, 4, group_size),
    }
    if x.shape[0] == 1 and n * x.shape[1] < 1e7:  # fp32 activations into the int4 kernel
        sz32 = p4["sz"].float()
        fns["int4pack kernel (fp32)"] = lambda: int4mm(x, p4["w4"], group_size, sz32)
    return fns


def benchmark(ms=(1, 512), threads: int = 2, group_size: int = 64, quick: bool = False):
    """Per-shape timings (ms, fp32 activations in and out for the lowbit rows)."""
    torch.set_num_threads(threads)
    rows = []
    for name, (n, k) in SMOLLM2_SHAPES.items():
        w, q4, s4, z4 = _bench_weight(n, k, 4, group_size)
        _, q8, s8, z8 = _bench_weight(n, k, 8, group_size)
        p4 = prepack_cpu(q4, s4, z4, 4, group_size, torch.float32)
        p8 = prepack_cpu(q8, s8, z8, 8, group_size, torch.float32)
        pe = prepack_cpu(q4, s4, z4, 4, group_size, torch.float32, exact=True)
        for m in ms:
            fns = _candidates(torch.randn(m, k), w, p4, p8, pe, group_size)
            big = n * k * m > 1e8
            rounds, inner = (3, 1) if big else (6 if quick else 20, 2)
            res = _time(fns, rounds, inner)
            rows.append((name, m, res))
            print(
                f"{name:13s} N={n:5d} K={k:4d} M={m:3d}  "
                + "  ".join(f"{key}={v:.3f}" for key, v in res.items()),
                flush=True,
            )
    for m in ms:
        per = {r[0]: r[2] for r in rows if r[1] == m}
        tot = {key: sum(LAYER[s] * per[s][key] for s in LAYER) for key in per["q/o_proj"]}
        base = tot["fp32 F.linear"]
        print(
            f"layer sum M={m}: "
            + "  ".join(f"{key}={v:.3f} ({base / v:.2f}x)" for key, v in tot.items())
        )
    return rows


def sweep_m(ms=(1, 2, 4, 8, 16, 32, 64), threads: int = 2, group_size: int = 64):
    """int4 GEMV kernel vs dequant + bf16 GEMM as M grows (gate/up shape)."""
    torch.set_num_threads(threads)
    n, k = SMOLLM2_SHAPES["gate/up_proj"]
    w, q, s, z = _bench_weight(n, k, 4, group_size)
    p = prepack_cpu(q, s, z, 4, group_size, torch.float32)

    def fns(x):
        xb = x.bfloat16()
        return {
            "fp32 F.linear": lambda: F.linear(x, w),
            "int4pack": lambda: _int4mm(xb, p["w4"], group_size, p["sz"]),
            "dequant+bf16 GEMM": lambda: F.linear(xb, _dequant_bf16(p, 4, group_size, n, k)),
        }

    for m in ms:
        res = _time(fns(torch.randn(m, k)), 10, 3)
        print(f"M={m:3d} " + "  ".join(f"{key}={v:.3f}" for key, v in res.items()), flush=True)


def benchmark_layers(
    n_layers: int = 8,
    m: int = 1,
    threads: int = 2,
    group_size: int = 64,
    bits_list=(2, 3, 4, 8),
    rounds: int = 15,
):
    """Decode through ``n_layers`` SmolLM2 layers' seven linears with distinct weights.

    Unlike the per-shape table, weights do not stay in cache between calls
    (8 layers are 115 MB in fp32), as in a real decode step. Each call is timed
    on its own and the best of ``rounds`` passes is kept per call (robust to
    other jobs on a shared machine). Prints ms per layer.
    """
    import time

    from .weight_only_reference import quantize_groupwise

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    names = ["q/o_proj", "k/v_proj", "k/v_proj", "q/o_proj", "gate/up_proj", "gate/up_proj"]
    names.append("down_proj")
    ws, packs = [], {b: [] for b in bits_list}
    for _ in range(n_layers):
        for s in names:
            w = torch.randn(*SMOLLM2_SHAPES[s], generator=gen) * 0.05
            ws.append(w)
            for bits in bits_list:
                q, sc, z = quantize_groupwise(w, bits, group_size, torch.float32)
                packs[bits].append(prepack_cpu(q, sc, z, bits, group_size, torch.float32))
    xs = [torch.randn(m, w.shape[1]) for w in ws]
    calls = {"fp32 F.linear": [lambda i=i: F.linear(xs[i], ws[i]) for i in range(len(ws))]}
    for b in bits_list:
        calls[f"lowbit w{b}"] = [
            lambda i=i, b=b: dequant_linear_cpu(xs[i], packs[b][i], b, group_size)
            for i in range(len(ws))
        ]
    res = {}
    with torch.no_grad():
        for name, fs in calls.items():
            best = [float("inf")] * len(fs)
            for f in fs:
                f()
            for _ in range(rounds):
                for i, f in enumerate(fs):
                    t0 = time.perf_counter()
                    f()
                    best[i] = min(best[i], time.perf_counter() - t0)
            res[name] = sum(best) * 1e3 / n_layers
    base = res["fp32 F.linear"]
    print(
        f"{n_layers} layers, M={m}, {threads} threads, ms per layer: "
        + "  ".join(f"{k}={v:.3f} ({base / v:.2f}x)" for k, v in res.items()),
        flush=True,
    )
    return res


def benchmark_inductor_layer(m: int = 1, threads: int = 2, group_size: int = 64, bits=(4, 8)):
    """One SmolLM2 layer's seven linears plus glue, eager and ``torch.compile``'d
    (inductor fuses the bf16 casts into the neighbouring pointwise kernels and
    CSEs the shared cast of q/k/v's input). Weights stay in cache here."""
    from .weight_only_reference import quantize_groupwise

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    names = ["q/o_proj", "k/v_proj", "k/v_proj", "q/o_proj", "gate/up_proj", "gate/up_proj"]
    names.append("down_proj")
    ws = [torch.randn(*SMOLLM2_SHAPES[s], generator=gen) * 0.05 for s in names]
    packs = {}
    for b in bits:
        packs[b] = []
        for w in ws:
            q, sc, z = quantize_groupwise(w, b, group_size, torch.float32)
            packs[b].append(prepack_cpu(q, sc, z, b, group_size, torch.float32))

    def layer(lin):
        def f(x):
            q, k, v = lin(0, x), lin(1, x), lin(2, x)
            h = x + lin(3, q)
            y = F.silu(lin(4, h)) * lin(5, h)
            return h + lin(6, y) + k.sum() + v.sum()

        return f

    fns = {"fp32 F.linear": layer(lambda j, a: F.linear(a, ws[j]))}
    for b in bits:
        fns[f"lowbit w{b}"] = layer(
            lambda j, a, b=b: dequant_linear_cpu(a, packs[b][j], b, group_size)
        )
    for name in list(fns):
        fns[name + " (inductor)"] = torch.compile(fns[name])
    x = torch.randn(m, 576)
    with torch.no_grad():
        res = _time({k: (lambda f=f: f(x)) for k, f in fns.items()}, 40, 3)
    base = res["fp32 F.linear"]
    print(
        f"one layer, M={m}, {threads} threads (ms): "
        + "  ".join(f"{k}={v:.3f} ({base / v:.2f}x)" for k, v in res.items()),
        flush=True,
    )
    return res


if __name__ == "__main__":  # pragma: no cover
    import sys

    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    if "--sweep" in sys.argv:
        sweep_m(threads=threads)
    elif "--inductor" in sys.argv:
        benchmark_inductor_layer(threads=threads)
    elif "--layers" in sys.argv:
        benchmark_layers(threads=threads)
    else:
        benchmark(threads=threads, quick="--quick" in sys.argv)
