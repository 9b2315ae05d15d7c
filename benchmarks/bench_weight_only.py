"""lowbit weight-only benchmark on SmolLM2-135M: one process, one table.

Rows: fp32 eager; torchao's int8 weight-only quantization compiled with inductor
(when torchao is installed: ``pip install -e .[bench]``); one row per recipe
``w{bits}a16-g{group}`` with RTN and GPTQ. Columns: perplexity (2048 dev tokens,
context 512), bits per weight of the quantized linears (scales and zero points
included), resident weight memory, prefill (1 x 512) and decode (1 token after a
256-token cache) latency with ratios to fp32 eager, and the lowbit passes' time
(GPTQ included).

Each lowbit row compiles a fresh copy of the model with ``free_weights=True``
(eager handoff) for the perplexity and measures what the compiled model keeps: the
storages of the model's parameters and buffers (released weights are one
element), of the compiled graphs' constants and of lowbit's stored products
(``qcompile.artifacts``, CPU prepacked layouts included), each storage counted
once, against the fp32 model's parameters. The same copy is then compiled again
with the inductor handoff, onto its released weights, for the latencies.

SmolLM2's hidden size is 576, which 128 does not divide: "g128" rows use 128
where it divides (down_proj, in_features 1536) and 64 elsewhere, via per-site
overrides, and are marked ``g128*``. Its weights come from a Q4_1 GGUF (4-bit
blocks of 32), so g32 at 4 bits matches the source grid and flatters 4-bit: those
rows are marked ``(Q4_1 grid)``. Every linear is quantized: lm_head's weight is
tied to the embedding, so recipes below 8 bits keep it at 8 bits
(``recipes.tied_embedding_recipe``) and the embedding lookups read its codes.

    .venv/bin/python benchmarks/bench_weight_only.py [--bits 4 3] [--groups 64] \\
        [--methods rtn gptq] [--calib-batches 64] [--calibration cal64.lowbit] \\
        [--no-latency] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import time

import torch
from timing import add_calibration_kinds, latency  # noqa: E402  (same folder)

import qcompile
from qcompile import artifacts, corpus
from qcompile.backend import lowbit_backend
from qcompile.lowering import derived
from qcompile.perplexity import dev_tokens, perplexity
from qcompile.smollm2 import load_smollm2


def recipe_options(bits: int, group: int, gptq: bool, model) -> dict:
    suffix = "-gptq" if gptq else ""
    recipe = f"w{bits}a16-g{group}{suffix}"
    overrides = {}
    if group == 128:  # 576 is not a multiple of 128: fall back to 64 per site
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % 128:
                overrides[name] = f"w{bits}a16-g64{suffix}"
    return {"recipe": recipe, "overrides": overrides}


def label(bits, group, gptq) -> str:
    g = "g128*" if group == 128 else f"g{group}"
    mark = " (Q4_1 grid)" if group == 32 and bits == 4 else ""
    return f"w{bits}a16-{g} {'gptq' if gptq else 'rtn'}{mark}"


def resident_bytes(model, graphs=()) -> int:
    """Bytes of every storage the (compiled) model keeps, each counted once."""
    storages = {}

    def add(t: torch.Tensor) -> None:
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao): its inner tensors
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()

    for t in itertools.chain(model.parameters(), model.buffers()):
        add(t)
    for gm in graphs:
        for _, b in gm.named_buffers():
            add(b)
    for p in model.parameters():
        for art in artifacts.artifacts_of(p):
            for t in art.tensors.values():
                add(t)
            for layout in derived.layouts(art).values():
                for t in layout.values():
                    add(t)
    return sum(storages.values())


def measure_row(model, options, tokens, calibration, args) -> dict:
    """Compile a copy with free_weights: perplexity, memory, pass time, then latency.

    The copy is compiled twice: with the eager handoff for the perplexity (batch 4)
    and the memory count, then, onto its released weights (the stored products are
    reused, GPTQ does not run again), with the inductor handoff for the latencies.
    """
    twin = copy.deepcopy(model)
    graphs = []
    opts = {**options, "calibration": calibration, "handoff": "eager", "free_weights": True}

    def backend(gm, example_inputs):
        compiled = lowbit_backend(gm, example_inputs, options=opts)
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    n0 = {id(r) for r in qcompile.compiled_reports()}  # the list keeps the last 256
    ppl = perplexity(torch.compile(twin, backend=backend), tokens, batch_size=4)
    reports = [r for r in qcompile.compiled_reports() if id(r) not in n0]
    report = reports[0]  # the full-batch graph (holds every site)
    q = report.quantized
    bpw = sum(r.bits_per_weight * r.in_features * r.out_features for r in q) / sum(
        r.in_features * r.out_features for r in q
    )
    row = {
        "ppl": ppl,
        "bpw": bpw,
        "resident": resident_bytes(twin, graphs),
        "pass_s": sum(r.pass_seconds for r in reports),
        "gptq": sum(r.method == "gptq" for r in q),
        "sites": len(q),
    }
    if not args.no_latency:
        torch._dynamo.reset()
        compiled = torch.compile(twin, backend="lowbit", options={**opts, "handoff": "inductor"})
        row.update(latency(model, compiled, tokens[:, :512], args.repeats))
        del compiled
    torch._dynamo.reset()  # the copy and its graphs go when this returns
    return row


def torchao_int8_weight_only(model):
    """A copy of ``model`` with torchao's int8 weight-only linears, or None."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    twin = copy.deepcopy(model)
    quantize_(twin, Int8WeightOnlyConfig())
    return twin


def baseline_rows(model, tokens, fp_bytes, args) -> list[dict]:
    """fp32 eager and (when installed) torchao int8 weight-only + inductor."""
    rows = [{"name": "fp32 eager", "ppl": perplexity(model, tokens, batch_size=4),
             "bpw": 32.0, "resident": fp_bytes}]  # fmt: skip
    if not args.no_latency:
        rows[0].update(latency(model, model, tokens[:, :512], args.repeats))
    ao = torchao_int8_weight_only(model)
    if ao is None:
        print("torchao is not installed (pip install -e .[bench]): no torchao row")
        return rows
    torch._dynamo.reset()
    compiled = torch.compile(ao)
    row = {"name": "torchao int8 w-only", "ppl": perplexity(compiled, tokens, batch_size=4),
           "resident": resident_bytes(ao)}  # fmt: skip
    if not args.no_latency:
        row.update(latency(model, compiled, tokens[:, :512], args.repeats))
    rows.append(row)
    torch._dynamo.reset()
    return rows


def print_table(rows, fp_bytes, args) -> None:
    base = rows[0]
    head = (f"{'variant':<27} {'ppl':>10} {'Δppl':>8} {'bits/w':>6} {'resident MB':>11} "
            f"{'x fp32':>6} {'prefill ms':>10} {'x fp':>5} {'decode ms':>9} {'x fp':>5} "
            f"{'passes s':>8} {'gptq sites':>10}")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        delta = "" if r is base else f"{(r['ppl'] / base['ppl'] - 1) * 100:+.1f}%"
        bpw = f"{r['bpw']:.2f}" if "bpw" in r else ""
        if "prefill_ms" in r:
            lat = (f"{r['prefill_ms']:>10.1f} {base['prefill_ms'] / r['prefill_ms']:>5.2f} "
                   f"{r['decode_ms']:>9.2f} {base['decode_ms'] / r['decode_ms']:>5.2f}")  # fmt: skip
        else:
            lat = f"{'':>10} {'':>5} {'':>9} {'':>5}"
        passes = f"{r['pass_s']:.1f}" if "pass_s" in r else ""
        gptq = f"{r['gptq']}/{r['sites']}" if "gptq" in r["name"] else ""
        print(f"{r['name']:<27} {r['ppl']:>10.3f} {delta:>8} {bpw:>6} "
              f"{r['resident'] / 1e6:>11.1f} {r['resident'] / fp_bytes:>6.1%} {lat} "
              f"{passes:>8} {gptq:>10}")  # fmt: skip
    print(f"\nperplexity: {args.tokens} tokens of pydoc_data.topics, context 512; resident: "
          "storages the compiled model keeps after free_weights (see the module docstring); "
          "prefill: 1 x 512 tokens, decode: 1 token after a 256-token cache, medians, inductor "
          "handoff, ratios to fp32 eager in this run; passes: the lowbit passes of the first "
          "compile (GPTQ included); gptq sites: sites where GPTQ beat RTN on the calibration "
          "error.")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--no-latency", action="store_true", help="perplexity, memory, pass time")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calib-batches", type=int, default=64)
    add_calibration_kinds(ap)
    ap.add_argument("--calibration", help="calibration file: loaded if it exists, else "
                    "computed and saved there (reuse across runs)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model, tok = load_smollm2()
    tokens = dev_tokens(tok, args.tokens)
    fp_bytes = resident_bytes(model)
    t0 = time.perf_counter()
    if args.calibration and os.path.exists(args.calibration):
        calibration = qcompile.Calibration.load(args.calibration)
        source = args.calibration
    else:
        calibration = qcompile.calibrate(
            model,
            corpus.calibration_batches(tok, args.calib_batches, 512, tuple(args.calibration_kinds)),
            hessian="gptq" in args.methods,
        )
        source = f"{args.calib_batches} x 512 tokens of {', '.join(args.calibration_kinds)}"
        if args.calibration:
            calibration.save(args.calibration)
    print(f"calibration ({source}): {time.perf_counter() - t0:.1f} s; "
          f"threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    rows = baseline_rows(model, tokens, fp_bytes, args)
    for bits, group, method in itertools.product(args.bits, args.groups, args.methods):
        gptq = method == "gptq"
        t0 = time.perf_counter()
        row = measure_row(model, recipe_options(bits, group, gptq, model), tokens, calibration,
                          args)  # fmt: skip
        gc.collect()
        row["name"] = label(bits, group, gptq)
        rows.append(row)
        print(f"  {row['name']}: ppl {row['ppl']:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
    print_table(rows, fp_bytes, args)


if __name__ == "__main__":
    main()
