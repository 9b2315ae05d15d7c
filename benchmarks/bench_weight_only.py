"""lowbit weight-only benchmark on SmolLM2-135M: one process, one table.

Rows: fp32 eager, then every requested weight-only recipe
``w{bits}a16-g{group}[-gptq]``. Columns: perplexity (2048 dev tokens, context
512), bits per weight (linear weights, scales and zero points included),
resident weight memory (the packed constants of the quantized linears plus the
model's other parameters, e.g. the embedding, against all fp32 parameters),
the lowbit passes' time (GPTQ included) and, for the ``--latency`` recipes,
prefill (1 x 512) and decode (1 token after a 256-token cache) latency with the
default inductor handoff next to fp32 eager.

SmolLM2's hidden size is 576, which 128 does not divide: "g128" rows use 128
where it divides (down_proj, in_features 1536) and 64 elsewhere, via
per-site overrides, and are marked ``g128*``. Its weights come from a Q4_1 GGUF
(4-bit blocks of 32), so g32 at 4 bits matches the source grid and flatters
4-bit RTN: those rows are marked ``(Q4_1 grid)``.

    .venv/bin/python benchmarks/bench_weight_only.py [--bits 4 3] [--groups 64] \
        [--methods rtn gptq] [--latency w4a16-g64]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_int8 import measure  # noqa: E402  (same folder)

import qcompile
from qcompile.perplexity import calibration_batches, dev_tokens, perplexity
from qcompile.smollm2 import load_smollm2


def recipe_options(bits: int, group: int, gptq: bool, model) -> tuple[str, dict]:
    suffix = "-gptq" if gptq else ""
    recipe = f"w{bits}a16-g{group}{suffix}"
    overrides = {}
    if group == 128:  # 576 is not a multiple of 128: fall back to 64 per site
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % 128:
                overrides[name] = f"w{bits}a16-g64{suffix}"
    return recipe, {"recipe": recipe, "overrides": overrides}


def label(bits, group, gptq) -> str:
    g = "g128*" if group == 128 else f"g{group}"
    mark = " (Q4_1 grid)" if group == 32 and bits == 4 else ""
    return f"w{bits}a16-{g} {'gptq' if gptq else 'rtn'}{mark}"


def resident_bytes(model, report) -> tuple[int, int]:
    """(fp32 bytes of all parameters, bytes resident after quantization)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.numel() * 4
    quantized = {r.fqn for r in report.quantized}
    linear_fp = 0
    seen = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in quantized:
            ptr = mod.weight.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            tied = any(
                p is mod.weight for n, p in model.named_parameters() if not n.startswith(name)
            )
            if not tied:  # a tied weight (embedding) stays resident for the lookup
                linear_fp += mod.weight.numel() * 4
    return total, total - linear_fp + report.memory.get("quantized_bytes", 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--latency", nargs="*", default=["w4a16-g64"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model, tok = load_smollm2()
    tokens = dev_tokens(tok, args.tokens)
    prompt512 = tokens[:, :512]
    t0 = time.perf_counter()
    calibration = qcompile.calibrate(
        model, calibration_batches(tok, n_batches=8, seq_len=512), hessian="gptq" in args.methods
    )
    print(f"calibration: {time.perf_counter() - t0:.1f} s; threads {torch.get_num_threads()}")

    fp_ppl = perplexity(model, tokens, batch_size=4)
    rows = []
    for bits in args.bits:
        for group in args.groups:
            for method in args.methods:
                gptq = method == "gptq"
                recipe, options = recipe_options(bits, group, gptq, model)
                torch._dynamo.reset()
                n0 = len(qcompile.compiled_reports())
                compiled = torch.compile(
                    model, backend="lowbit",
                    options={**options, "calibration": calibration, "handoff": "eager"},
                )  # fmt: skip
                ppl = perplexity(compiled, tokens, batch_size=4)
                report = qcompile.Report.merge(qcompile.compiled_reports()[n0:])
                q = report.quantized
                bpw = sum(r.bits_per_weight * r.in_features * r.out_features for r in q) / sum(
                    r.in_features * r.out_features for r in q
                )
                fp_bytes, resident = resident_bytes(model, report)
                rows.append((label(bits, group, gptq), ppl, bpw, resident / fp_bytes,
                             report.pass_seconds))  # fmt: skip
                print(f"  {rows[-1][0]}: ppl {ppl:.3f}", flush=True)

    head = f"{'recipe':<26} {'ppl':>9} {'Δppl':>8} {'bits/w':>7} {'resident':>9} {'passes s':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    print(f"{'fp32':<26} {fp_ppl:>9.3f} {'':>8} {32.0:>7.2f} {'100%':>9} {'':>9}")
    for name, ppl, bpw, mem, secs in rows:
        print(f"{name:<26} {ppl:>9.3f} {(ppl / fp_ppl - 1) * 100:>+7.1f}% {bpw:>7.2f} "
              f"{mem * 100:>8.1f}% {secs:>9.1f}")  # fmt: skip
    print("resident: all parameters after quantization (packed linears + fp embedding and norms) "
          "relative to fp32; the tied embedding stays resident for the lookup.")  # fmt: skip

    if args.latency:
        lat = [measure("fp32 eager", model, model, tokens, prompt512, args.repeats)]
        for recipe in args.latency:
            torch._dynamo.reset()
            bits, group = int(recipe[1]), int(recipe.split("-g")[1].split("-")[0])
            _, options = recipe_options(bits, group, recipe.endswith("-gptq"), model)
            compiled = torch.compile(
                model, backend="lowbit", options={**options, "calibration": calibration}
            )
            lat.append(
                measure(f"lowbit {recipe}", model, compiled, tokens, prompt512, args.repeats)
            )
        base = lat[0]
        print(f"\n{'variant':<22} {'prefill ms':>10} {'x fp':>6} {'decode ms':>10} {'x fp':>6}")
        for r in lat:
            print(f"{r['name']:<22} {r['prefill_ms']:>10.1f} "
                  f"{base['prefill_ms'] / r['prefill_ms']:>6.2f} {r['decode_ms']:>10.2f} "
                  f"{base['decode_ms'] / r['decode_ms']:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
