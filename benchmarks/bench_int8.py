"""lowbit int8 benchmark on SmolLM2-135M: one process, one table.

Rows: fp32 eager, fp32 + inductor (to separate inductor's share), lowbit
"w8a8" and "int8-mixed" (+ inductor). Columns: prefill latency (1 x 512
tokens), decode latency (1 token after a 256-token cache), perplexity on the
dev text, the lowbit passes' time and the total first-call compile time.
Latencies are medians; ratios are against fp32 eager measured in this run.

    .venv/bin/python benchmarks/bench_int8.py [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from timing import latency  # noqa: E402  (same folder)

import qcompile
from qcompile.perplexity import calibration_batches, dev_tokens, perplexity
from qcompile.smollm2 import load_smollm2


@torch.no_grad()
def measure(name, model, fwd, tokens, prompt512, repeats):
    reports_before = len(qcompile.compiled_reports())
    row = latency(model, fwd, prompt512, repeats)
    ppl = perplexity(fwd, tokens)
    reports = qcompile.compiled_reports()[reports_before:]
    passes = sum(r.pass_seconds for r in reports)
    return {
        "name": name,
        "prefill_ms": row["prefill_ms"],
        "decode_ms": row["decode_ms"],
        "ppl": ppl,
        "pass_s": passes if reports else None,
        "first_call_s": row["compile_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-inductor-fp", action="store_true")
    args = ap.parse_args()

    model, tok = load_smollm2()
    tokens = dev_tokens(tok, args.tokens)
    prompt512 = tokens[:, :512]
    calibration = qcompile.calibrate(model, calibration_batches(tok, n_batches=8, seq_len=512))
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")

    rows = [measure("fp32 eager", model, model, tokens, prompt512, args.repeats)]
    variants = [] if args.skip_inductor_fp else [("fp32 + inductor", "inductor", None)]
    variants += [
        (f"lowbit {r}", "lowbit", {"recipe": r, "calibration": calibration})
        for r in ("w8a8", "int8-mixed")
    ]
    for name, backend, options in variants:
        torch._dynamo.reset()  # each variant starts with an empty dynamo cache
        kwargs = {"options": options} if options else {}
        compiled = torch.compile(model, backend=backend, **kwargs)
        rows.append(measure(name, model, compiled, tokens, prompt512, args.repeats))
        print(f"  measured {name}", flush=True)

    base = rows[0]
    head = (
        f"{'variant':<18} {'prefill ms':>10} {'x fp':>6} {'decode ms':>10} {'x fp':>6} "
        f"{'ppl':>8} {'Δppl':>7} {'passes s':>9} {'1st call s':>10}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        passes = "" if r["pass_s"] is None else f"{r['pass_s']:.2f}"
        print(
            f"{r['name']:<18} {r['prefill_ms']:>10.1f} {base['prefill_ms'] / r['prefill_ms']:>6.2f} "
            f"{r['decode_ms']:>10.2f} {base['decode_ms'] / r['decode_ms']:>6.2f} "
            f"{r['ppl']:>8.3f} {(r['ppl'] / base['ppl'] - 1) * 100:>+6.2f}% {passes:>9} "
            f"{r['first_call_s']:>10.1f}"
        )
    print(
        f"\nprefill: 1 x 512 tokens; decode: 1 token after a 256-token DynamicCache; "
        f"perplexity: {args.tokens} tokens of pydoc_data.topics, context 512; "
        "'passes s': lowbit passes summed over the graphs; '1st call s': first prefill + "
        "first decode calls (compile included)."
    )


if __name__ == "__main__":
    main()
