"""lowbit DuQuant benchmark on SmolLM2-135M: one process, one table.

Rows: fp32 eager; ``w8a8`` (the int8 baseline of the prefill comparison); the low-bit
weight-activation recipes ``w6a6-rtn``, ``w6a6-duquant``, ``w4a8-duquant``,
``w4a4-rtn``, ``w4a4-hadamard``, ``w4a4-duquant``; and ablations of ``w4a4-duquant``
through its options:

* ``fp32 online transforms``: ``cpu_transform_dtype="activation"``, the online block
  products in fp32 instead of the default bf16 operands (the cost and the accuracy
  of that default);
* ``permute=False``: no zigzag permutations (neither ``P0`` nor ``P``). The second
  rotation ``R2`` only exists after ``P`` (``passes/rotate.py``), so this row is also
  "one rotation only": ``T = R1`` (smoothing kept);
* ``alpha=0``: no SmoothQuant smoothing (``T = P0 R1 P R2`` only);
* ``steps=1``: ``P0 R1 P R2`` kept, each block rotation built from ONE greedy step
  (one spread of the block's largest channel) instead of 8.

Columns: perplexity on the first 2048 tokens of ``pydoc_data.topics`` (context 512,
as ``tests/test_e2e_duquant_smollm2.py``: windows in one batch of 4, handoff eager),
prefill latency (1 x 512 tokens) and decode latency (1 token after a 256-token
``DynamicCache``) with the default inductor handoff, latencies as a ratio to
``w8a8`` measured in this run, and the lowbit passes' time (``report.pass_seconds``)
of the first compile of the row, the one that builds the transforms and low-bit
weights from the calibration (the latency compiles reuse them). One calibration (8 x
512 tokens, ``sample_rows=512``) serves every row; every linear is quantized, lm_head
included. Latencies are medians; each row's compiled graphs are dropped
(``torch._dynamo.reset()``) before the next row compiles.

The machine is shared, so the table's latencies of two rows are measured minutes
apart. ``--ab-rounds N`` (default 10) then compiles ``w8a8`` and ``w4a4-duquant``
side by side (two backends, one model) and alternates their prefill calls: the
median of the N paired ratios is the W4A4 / W8A8 prefill figure least affected by
other load.

    .venv/bin/python benchmarks/bench_duquant.py [--rows fp32 w8a8 w4a4-duquant ...] \\
        [--no-latency] [--ab-rounds 10] [--repeats 5] [--calibration-cache cal.safetensors]

Smoke test: ``--rows w4a4-duquant --no-latency --ab-rounds 0 --tokens 512
--calib-batches 2 --sample-rows 64``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import time

import torch
from timing import add_calibration_kinds, latency  # noqa: E402  (same folder)

import qcompile
from qcompile import artifacts, corpus
from qcompile.backend import lowbit_backend
from qcompile.perplexity import dev_tokens, perplexity
from qcompile.smollm2 import load_smollm2

#: row id -> (label, recipe or None for the fp32 model, backend options besides the
#: recipe; "duquant" holds the ablations' sub-options)
ROWS = {
    "fp32": ("fp32 eager", None, {}),
    "w8a8": ("w8a8", "w8a8", {}),
    "w6a6-rtn": ("w6a6-rtn", "w6a6-rtn", {}),
    "w6a6-duquant": ("w6a6-duquant", "w6a6-duquant", {}),
    "w4a8-duquant": ("w4a8-duquant", "w4a8-duquant", {}),
    "w4a4-rtn": ("w4a4-rtn", "w4a4-rtn", {}),
    "w4a4-hadamard": ("w4a4-hadamard", "w4a4-hadamard", {}),
    "w4a4-duquant": ("w4a4-duquant", "w4a4-duquant", {}),
    "fp32-transforms": (
        "  fp32 online transforms",
        "w4a4-duquant",
        {"cpu_transform_dtype": "activation"},
    ),
    "no-permute": ("  permute=False (R1 only)", "w4a4-duquant", {"duquant": {"permute": False}}),
    "no-smooth": ("  alpha=0 (no smoothing)", "w4a4-duquant", {"duquant": {"alpha": 0.0}}),
    "steps1": ("  steps=1", "w4a4-duquant", {"duquant": {"steps": 1}}),
}


def options_of(recipe: str, extra: dict, calibration, handoff: str) -> dict:
    return {"recipe": recipe, "calibration": calibration, "handoff": handoff, **extra}


def measure_row(key, model, tokens, calibration, args) -> dict:
    label, recipe, extra = ROWS[key]
    row = {"key": key, "name": label, "recipe": recipe}
    if recipe is None:
        row["ppl"] = perplexity(model, tokens, batch_size=4)
        if not args.no_latency:
            row.update(latency(model, model, tokens[:, :512], args.repeats))
        return row
    torch._dynamo.reset()
    n0 = {id(r) for r in qcompile.compiled_reports()}  # the list keeps the last 256
    opts = options_of(recipe, extra, calibration, "eager")
    row["ppl"] = perplexity(
        torch.compile(model, backend="lowbit", options=opts), tokens, batch_size=4
    )
    reports = [r for r in qcompile.compiled_reports() if id(r) not in n0]
    row["pass_s"] = sum(r.pass_seconds for r in reports)
    quantized = len(reports[0].quantized)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    if quantized != linears:
        print(f"  note: {label}: {quantized} of {linears} linears quantized", flush=True)
    if not args.no_latency:
        torch._dynamo.reset()
        opts = options_of(recipe, extra, calibration, "inductor")
        compiled = torch.compile(model, backend="lowbit", options=opts)
        row.update(latency(model, compiled, tokens[:, :512], args.repeats))
        del compiled
    torch._dynamo.reset()
    artifacts.clear()  # this row's stored products: later rows build their own
    return row


@torch.no_grad()
def interleaved_prefill(model, prompt512, calibration, recipes, rounds: int) -> dict:
    """Compile ``recipes`` side by side (one backend each, one model) and alternate
    their prefill calls; returns per recipe the median ms and the median of the
    per-round ratios to ``recipes[0]``."""
    torch._dynamo.reset()
    fns = {}
    for recipe in recipes:
        backend = functools.partial(
            lowbit_backend, options=options_of(recipe, {}, calibration, "inductor")
        )
        fns[recipe] = torch.compile(model, backend=backend)  # distinct backends: two graphs
        fns[recipe](prompt512)
        fns[recipe](prompt512)
    times = {r: [] for r in recipes}
    for i in range(rounds):
        for recipe in recipes if i % 2 == 0 else recipes[::-1]:
            t0 = time.perf_counter()
            fns[recipe](prompt512)
            times[recipe].append(time.perf_counter() - t0)
    torch._dynamo.reset()
    base = times[recipes[0]]
    return {
        r: (
            statistics.median(ts) * 1e3,
            statistics.median(t / b for t, b in zip(ts, base)),
        )
        for r, ts in times.items()
    }


def calibration_for(model, tok, args):
    path = args.calibration_cache
    if path and os.path.isfile(path):
        print(f"calibration loaded from {path}", flush=True)
        return qcompile.Calibration.load(path)
    t0 = time.perf_counter()
    batches = corpus.calibration_batches(
        tok, args.calib_batches, 512, tuple(args.calibration_kinds)
    )
    calibration = qcompile.calibrate(model, batches, sample_rows=args.sample_rows)
    print(
        f"calibration ({args.calib_batches} x 512 tokens of {', '.join(args.calibration_kinds)}, "
        f"sample_rows={args.sample_rows}): "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if path:
        calibration.save(path)
    return calibration


def print_table(rows, args) -> None:
    fp = next((r for r in rows if r["recipe"] is None), None)
    base = next((r for r in rows if r["key"] == "w8a8" and "prefill_ms" in r), None)
    head = (
        f"{'variant':<27} {'ppl':>9} {'Δppl':>9} {'prefill ms':>10} {'x w8a8':>7} "
        f"{'decode ms':>10} {'x w8a8':>7} {'passes s':>9}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        dppl = f"{(r['ppl'] / fp['ppl'] - 1) * 100:+.1f}%" if fp and r is not fp else ""
        cells = [f"{r['name']:<27} {r['ppl']:>9.2f} {dppl:>9}"]
        for col in ("prefill_ms", "decode_ms"):
            if col in r:
                ratio = f"{r[col] / base[col]:.2f}" if base else ""
                cells.append(f"{r[col]:>10.1f} {ratio:>7}")
            else:
                cells.append(f"{'':>10} {'':>7}")
        cells.append(f"{r['pass_s']:>9.1f}" if "pass_s" in r else f"{'':>9}")
        print(" ".join(cells))
    print(
        f"\nppl: {args.tokens} dev tokens, context 512, handoff eager; prefill: 1 x 512 tokens; "
        "decode: 1 token after a 256-token cache (inductor handoff; medians); x w8a8: time "
        "relative to w8a8 in this run (> 1 is slower); passes s: lowbit passes of the row's "
        "first compile (transforms and low-bit weights built from the calibration). "
        "permute=False drops P0, P and with them R2 (one rotation R1 only); steps=1 keeps "
        "P0 R1 P R2 with one greedy step per block rotation; fp32 online transforms: "
        "options['cpu_transform_dtype'] = 'activation' (the default runs the online block "
        "products of <= 6-bit activations on bf16 operands)."
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--no-latency", action="store_true", help="perplexity and pass time only")
    ap.add_argument("--ab-rounds", type=int, default=10, help="0: no interleaved prefill A/B")
    ap.add_argument(
        "--ab-recipes",
        nargs="+",
        default=["w8a8", "w4a4-rtn", "w4a4-duquant"],
        help="recipes of the interleaved prefill A/B, the first one the baseline "
        "(w4a4-rtn: the same int8 GEMMs without DuQuant's online transforms)",
    )
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calib-batches", type=int, default=8)
    add_calibration_kinds(ap)
    ap.add_argument("--sample-rows", type=int, default=512)
    ap.add_argument("--calibration-cache", help="load the calibration from / save it to here")
    args = ap.parse_args()

    started = datetime.datetime.now()
    model, tok = load_smollm2()
    tokens = dev_tokens(tok, args.tokens)
    calibration = calibration_for(model, tok, args)
    print(
        f"{started:%Y-%m-%d %H:%M}; threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []
    for key in args.rows:
        t0 = time.perf_counter()
        rows.append(measure_row(key, model, tokens, calibration, args))
        print(f"  measured {ROWS[key][0].strip()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(rows, args)

    if args.ab_rounds > 0:
        recipes, base = args.ab_recipes, args.ab_recipes[0]
        ab = interleaved_prefill(model, tokens[:, :512], calibration, recipes, args.ab_rounds)
        print(f"\nprefill 1 x 512, {', '.join(recipes)} alternated ({args.ab_rounds} rounds):")
        for recipe, (ms, ratio) in ab.items():
            print(
                f"  {recipe:<14} median {ms:7.1f} ms   x {base} (median of paired ratios) "
                f"{ratio:.3f}"
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
