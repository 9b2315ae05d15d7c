"""lowbit weight-only benchmark on SmolLM2-135M: one process, two tables.

Quality table, one row per recipe ``w{bits}a16-g{group}`` with RTN and GPTQ:
perplexity (2048 dev tokens, context 512), bits per weight of the quantized
linears (scales and zero points included), resident weight memory and the
lowbit passes' time (GPTQ included). Each row compiles a fresh copy of the model
with ``free_weights=True`` and measures what the compiled model keeps: the
storages of the model's parameters and buffers (released weights are one
element), of the compiled graphs' constants and of lowbit's stored products
(``qcompile.artifacts``, CPU prepacked layouts included), each storage counted
once, against the fp32 model's parameters.

Latency table (``--latency``): prefill (1 x 512) and decode (1 token after a
256-token cache) with the inductor handoff, side by side with fp32 eager and,
when torchao is installed (``pip install -e .[bench]``), torchao's int8
weight-only quantization compiled with inductor.

SmolLM2's hidden size is 576, which 128 does not divide: "g128" rows use 128
where it divides (down_proj, in_features 1536) and 64 elsewhere, via per-site
overrides, and are marked ``g128*``. Its weights come from a Q4_1 GGUF (4-bit
blocks of 32), so g32 at 4 bits matches the source grid and flatters 4-bit: those
rows are marked ``(Q4_1 grid)``. Every linear is quantized: lm_head's weight is
tied to the embedding, so recipes below 8 bits keep it at 8 bits
(``recipes.tied_embedding_recipe``) and the embedding lookups read its codes.

    .venv/bin/python benchmarks/bench_weight_only.py [--bits 4 3] [--groups 64] \\
        [--methods rtn gptq] [--latency w4a16-g64 w8a16-g64] [--calib-batches 64] \\
        [--calibration cal64.lowbit] [--no-latency]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import time

import torch
from bench_int8 import measure  # noqa: E402  (same folder)

import qcompile
from qcompile import artifacts
from qcompile.backend import lowbit_backend
from qcompile.perplexity import calibration_batches, dev_tokens, perplexity
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


def parse_recipe(recipe: str) -> tuple[int, int, bool]:
    head, _, rest = recipe.partition("a16-g")
    return int(head[1:]), int(rest.split("-")[0]), recipe.endswith("-gptq")


def label(bits, group, gptq) -> str:
    g = "g128*" if group == 128 else f"g{group}"
    mark = " (Q4_1 grid)" if group == 32 and bits == 4 else ""
    return f"w{bits}a16-{g} {'gptq' if gptq else 'rtn'}{mark}"


def resident_bytes(model, graphs=()) -> int:
    """Bytes of every storage the (compiled) model keeps, each counted once."""
    storages = {}

    def add(t: torch.Tensor) -> None:
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
            for layout in art.derived.values():
                for t in layout.values():
                    add(t)
    return sum(storages.values())


def quality_row(model, options, tokens, calibration) -> dict:
    """Compile a copy with free_weights, measure perplexity, memory and pass time."""
    twin = copy.deepcopy(model)
    graphs = []
    opts = {**options, "calibration": calibration, "handoff": "eager", "free_weights": True}

    def backend(gm, example_inputs):
        compiled = lowbit_backend(gm, example_inputs, options=opts)
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    n0 = len(qcompile.compiled_reports())
    ppl = perplexity(torch.compile(twin, backend=backend), tokens, batch_size=4)
    reports = qcompile.compiled_reports()[n0:]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="*", default=[8, 4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--latency", nargs="*", default=["w4a16-g64", "w8a16-g64"])
    ap.add_argument("--no-latency", action="store_true", help="skip the latency table")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calib-batches", type=int, default=64)
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
            calibration_batches(tok, n_batches=args.calib_batches, seq_len=512),
            hessian="gptq" in args.methods,
        )
        source = f"{args.calib_batches} x 512 tokens"
        if args.calibration:
            calibration.save(args.calibration)
    print(f"calibration ({source}): {time.perf_counter() - t0:.1f} s; "
          f"threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    fp_ppl = perplexity(model, tokens, batch_size=4)
    rows = []
    for bits, group, method in itertools.product(args.bits, args.groups, args.methods):
        gptq = method == "gptq"
        row = quality_row(model, recipe_options(bits, group, gptq, model), tokens, calibration)
        gc.collect()
        row["name"] = label(bits, group, gptq)
        rows.append(row)
        print(f"  {row['name']}: ppl {row['ppl']:.3f}", flush=True)

    head = (f"{'recipe':<26} {'ppl':>9} {'Δppl':>8} {'bits/w':>7} {'resident MB':>12} "
            f"{'x fp32':>7} {'passes s':>9} {'gptq sites':>11}")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    print(f"{'fp32':<26} {fp_ppl:>9.3f} {'':>8} {32.0:>7.2f} {fp_bytes / 1e6:>12.1f} "
          f"{'100%':>7} {'':>9} {'':>11}")  # fmt: skip
    for r in rows:
        gptq = f"{r['gptq']}/{r['sites']}" if "gptq" in r["name"] else ""
        print(f"{r['name']:<26} {r['ppl']:>9.3f} {(r['ppl'] / fp_ppl - 1) * 100:>+7.1f}% "
              f"{r['bpw']:>7.2f} {r['resident'] / 1e6:>12.1f} {r['resident'] / fp_bytes:>7.1%} "
              f"{r['pass_s']:>9.1f} {gptq:>11}")  # fmt: skip
    print("resident: storages the compiled model keeps after free_weights (see the module "
          "docstring); gptq sites: sites where GPTQ beat RTN on the calibration error.")  # fmt: skip

    if not args.no_latency:
        prompt512 = tokens[:, :512]
        lat = [measure("fp32 eager", model, model, tokens, prompt512, args.repeats)]
        ao = torchao_int8_weight_only(model)
        if ao is not None:
            torch._dynamo.reset()
            lat.append(measure("torchao int8 w-only", ao, torch.compile(ao), tokens, prompt512,
                               args.repeats))  # fmt: skip
            del ao
        else:
            print("torchao is not installed (pip install -e .[bench]): no torchao row")
        for recipe in args.latency:
            torch._dynamo.reset()
            bits, group, gptq = parse_recipe(recipe)
            options = recipe_options(bits, group, gptq, model)
            compiled = torch.compile(
                model, backend="lowbit", options={**options, "calibration": calibration}
            )
            lat.append(
                measure(f"lowbit {recipe}", model, compiled, tokens, prompt512, args.repeats)
            )
        base = lat[0]
        print(f"\n{'variant':<22} {'prefill ms':>10} {'x fp':>6} {'decode ms':>10} {'x fp':>6} "
              f"{'ppl':>8}")  # fmt: skip
        for r in lat:
            print(f"{r['name']:<22} {r['prefill_ms']:>10.1f} "
                  f"{base['prefill_ms'] / r['prefill_ms']:>6.2f} {r['decode_ms']:>10.2f} "
                  f"{base['decode_ms'] / r['decode_ms']:>6.2f} {r['ppl']:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
