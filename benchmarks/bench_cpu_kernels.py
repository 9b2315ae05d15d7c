"""CPU weight-only kernel timings (``kernels/cpu_weight_only.py``) on SmolLM2-135M shapes.

Default: per shape (a layer's linears and the lm_head) at M = 1 and 512, fp32 / bf16
F.linear against torch's int4 / int8 kernels and the lowbit paths, plus the sum over one
layer. ``--layers``: decode through 8 layers with distinct weights (streamed from memory);
``--inductor``: one layer with glue ops, eager and ``torch.compile``'d; ``--sweep``: the
int4 GEMV kernel against dequant + bf16 GEMM as M grows. Results: docs/results.md
("CPU weight-only kernels").

    .venv/bin/python benchmarks/bench_cpu_kernels.py [--threads T] [--quick | --layers | --inductor | --sweep]
"""

from __future__ import annotations

import functools
import sys
import time

import torch
import torch.nn.functional as F

from qcompile.kernels.cpu_weight_only import (
    _dequant_bf16,
    _int4mm,
    dequant_linear_cpu,
    prepack_cpu,
)
from qcompile.kernels.weight_only_reference import quantize_groupwise

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
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, s, z = quantize_groupwise(w, bits, g, torch.float32)
    return w, q, s, z


def _candidates(x, w, p4, p8, pe, pp, group_size: int) -> dict:
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
        "lowbit default w4": lambda: dequant_linear_cpu(x, pp, 4, group_size),
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
        # the oneDNN int4 layouts (``packed_kernels=False``), which the int4pack rows need
        p4 = prepack_cpu(q4, s4, z4, 4, group_size, torch.float32, packed_kernels=False)
        p8 = prepack_cpu(q8, s8, z8, 8, group_size, torch.float32, packed_kernels=False)
        pp = prepack_cpu(q4, s4, z4, 4, group_size, torch.float32)  # the default path
        pe = prepack_cpu(q4, s4, z4, 4, group_size, torch.float32, exact=True)
        for m in ms:
            fns = _candidates(torch.randn(m, k), w, p4, p8, pe, pp, group_size)
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
    p = prepack_cpu(q, s, z, 4, group_size, torch.float32, packed_kernels=False)

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


if __name__ == "__main__":
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    if "--sweep" in sys.argv:
        sweep_m(threads=threads)
    elif "--inductor" in sys.argv:
        benchmark_inductor_layer(threads=threads)
    elif "--layers" in sys.argv:
        benchmark_layers(threads=threads)
    else:
        benchmark(threads=threads, quick="--quick" in sys.argv)
