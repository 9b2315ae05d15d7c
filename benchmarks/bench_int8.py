"""lowbit int8 benchmark on SmolLM2-135M: one process, one table.

Rows: fp32 eager, fp32 + inductor (to separate inductor's share), lowbit "w8a8",
"int8-mixed" (default options) and "int8-mixed" with LLM.int8()'s absolute threshold 6
(the rule before the ratio; ``--no-threshold-row`` drops it), all with the inductor
hand-off. Columns: prefill latency (1 x 512 tokens), decode latency (1 token after a
256-token cache), perplexity / fp on each kind of text of ``qcompile.corpus`` (2048
tokens each; calibration: 8 x 512 tokens from the end of the dev text, as the README
shows, so every kind but ``reference`` is text calibration never saw), the lowbit passes'
time and the first calls' compile time. Latencies are medians; ratios are against fp32
eager measured in this run.

    .venv/bin/python benchmarks/bench_int8.py [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from timing import add_calibration_kinds, latency  # noqa: E402  (same folder)

import qcompile
from qcompile import corpus
from qcompile.perplexity import perplexity
from qcompile.smollm2 import load_smollm2


@torch.no_grad()
def measure(name, model, fwd, texts, prompt512, repeats):
    reports_before = {id(r) for r in qcompile.compiled_reports()}  # the list keeps the last 256
    row = latency(model, fwd, prompt512, repeats)
    ppl = {kind: perplexity(fwd, tokens) for kind, tokens in texts.items()}
    reports = [r for r in qcompile.compiled_reports() if id(r) not in reports_before]
    passes = sum(r.pass_seconds for r in reports)
    sites = reports[0].sites if reports else []
    columns = sum(len(s.outlier_channels) for s in sites)
    extra = sum(sum(s.outlier_copies) - len(s.outlier_copies) for s in sites)
    return {
        "name": name,
        "prefill_ms": row["prefill_ms"],
        "decode_ms": row["decode_ms"],
        "ppl": ppl,
        "outlier_columns": columns,
        "extra_columns": extra,
        "pass_s": passes if reports else None,
        "first_call_s": row["compile_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", nargs="+", default=list(corpus.KINDS))
    ap.add_argument("--skip-inductor-fp", action="store_true")
    ap.add_argument("--no-threshold-row", action="store_true")
    add_calibration_kinds(ap)
    args = ap.parse_args()

    model, tok = load_smollm2()
    texts = {kind: corpus.eval_tokens(tok, kind, args.tokens) for kind in args.kinds}
    prompt512 = corpus.eval_tokens(tok, "reference", 512)
    batches = corpus.calibration_batches(tok, 8, 512, tuple(args.calibration_kinds))
    calibration = qcompile.calibrate(model, batches)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")

    rows = [measure("fp32 eager", model, model, texts, prompt512, args.repeats)]
    variants = [] if args.skip_inductor_fp else [("fp32 + inductor", "inductor", None)]
    variants += [
        (f"lowbit {r}", "lowbit", {"recipe": r, "calibration": calibration})
        for r in ("w8a8", "int8-mixed")
    ]
    if not args.no_threshold_row:
        options = {"recipe": "int8-mixed", "calibration": calibration, "threshold": 6.0}
        variants.append(("int8-mixed thr 6", "lowbit", options))
    for name, backend, options in variants:
        torch._dynamo.reset()  # each variant starts with an empty dynamo cache
        kwargs = {"options": options} if options else {}
        compiled = torch.compile(model, backend=backend, **kwargs)
        rows.append(measure(name, model, compiled, texts, prompt512, args.repeats))
        print(f"  measured {name}", flush=True)

    base = rows[0]
    kinds = "".join(f" {k[:10]:>10}" for k in args.kinds)
    head = (
        f"{'variant':<18} {'prefill ms':>10} {'x fp':>5} {'decode ms':>9} {'x fp':>5}{kinds} "
        f"{'outl cols':>9} {'+int8 cols':>10} {'passes s':>8} {'1st call s':>10}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        passes = "" if r["pass_s"] is None else f"{r['pass_s']:.2f}"
        cells = "".join(
            f" {r['ppl'][k]:>10.3f}" if r is base else f" {r['ppl'][k] / base['ppl'][k]:>10.4f}"
            for k in args.kinds
        )
        print(
            f"{r['name']:<18} {r['prefill_ms']:>10.1f} {base['prefill_ms'] / r['prefill_ms']:>5.2f} "
            f"{r['decode_ms']:>9.2f} {base['decode_ms'] / r['decode_ms']:>5.2f}{cells} "
            f"{r['outlier_columns']:>9} {r['extra_columns']:>10} {passes:>8} "
            f"{r['first_call_s']:>10.1f}"
        )
    print(
        f"\nprefill: 1 x 512 tokens; decode: 1 token after a 256-token DynamicCache; "
        f"perplexity: the first {args.tokens} tokens of each kind (qcompile.corpus), context "
        "512; the fp32 eager row gives perplexities, the others their ratio to it; 'outl cols': "
        "outlier input columns over all sites (prefill graph), '+int8 cols' the int8 columns "
        "their copies add (the dynamic mode: none static); 'passes s': "
        "lowbit passes summed over the graphs; '1st call s': first prefill + first decode "
        "calls (compile included)."
    )


if __name__ == "__main__":
    main()
