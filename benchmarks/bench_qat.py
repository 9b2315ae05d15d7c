"""Training mode on SmolLM2-135M: RTN vs GPTQ vs Block-AP vs Block-AP + E2E-QP, one run.

For each bit width (group size 64): the round-to-nearest recipe; GPTQ (Hessian from
``--batches`` x 512 tokens of the calibration mix); Block-AP (``qcompile.block_ap``,
``--init``) and then E2E-QP (``qcompile.e2e_qp``) trained on the same batches. Training
and calibration read ``qcompile.corpus.calibration_batches`` (reference, docstrings, code,
never their first ``PERPLEXITY_RESERVE`` tokens); perplexity is measured on the first
``--tokens`` tokens of every kind, ``legal`` being a kind training never read. Each
variant is compiled with the eager hand-off (perplexity) and ``free_weights``, then with
the inductor hand-off (decode: 1 token after a 256-token cache, median). Per variant: its
phases' wall time, the tokens it trained on, the process's peak RSS during its phases
(``VmHWM``, reset before each variant) and the bytes the compiled model keeps resident.

    .venv/bin/python benchmarks/bench_qat.py [--bits 2 3 4] [--batches 96] [--epochs 2]
        [--e2e-epochs 1] [--init gptq] [--tokens 2048] [--no-latency] [--latency-all]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import torch
from bench_weight_only import resident_bytes
from timing import latency

import qcompile
from qcompile import corpus
from qcompile.backend import lowbit_backend
from qcompile.block_ap import BLOCK_AP_DEFAULTS
from qcompile.e2e_qp import E2E_QP_DEFAULTS
from qcompile.perplexity import perplexity
from qcompile.qat_convert import copy_trained
from qcompile.smollm2 import load_smollm2

SEQ = 512


def reset_peak() -> None:
    """Restart the process's peak-RSS counter (Linux ``clear_refs``; else it only grows)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model, recipe, evals, fp_model, prompt, args, calibration=None, timed=False) -> dict:
    """Perplexity per kind (eager hand-off, free_weights), resident bytes, decode ms."""
    graphs = []
    opts = {"recipe": recipe, "handoff": "eager", "free_weights": True}
    if calibration is not None:
        opts["calibration"] = calibration

    def backend(gm, example_inputs):
        compiled = lowbit_backend(gm, example_inputs, options=opts)
        graphs.append(gm)
        return compiled

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        row = {k: perplexity(compiled, t, batch_size=4) for k, t in evals.items()}
    row["resident"] = resident_bytes(model, graphs)
    row["method"] = ",".join(sorted({r.method for r in qcompile.compiled_reports()[-1].quantized}))
    if (timed or args.latency_all) and not args.no_latency:
        torch._dynamo.reset()
        fast = torch.compile(model, backend="lowbit", options={**opts, "handoff": "inductor"})
        row["decode_ms"] = latency(fp_model, fast, prompt, 5)["decode_ms"]
    torch._dynamo.reset()
    return row


def variants(bits: int, args, train, evals, fp_model, prompt, hessians):
    """The four rows of one bit width, each measured as soon as it exists."""
    rtn, gptq = f"w{bits}a16-g64", f"w{bits}a16-g64-gptq"
    model, _ = load_smollm2()
    yield f"{rtn} rtn", {"tokens": 0, **measure(model, rtn, evals, fp_model, prompt, args)}
    model, _ = load_smollm2()
    yield f"{rtn} gptq", {"tokens": len(train) * SEQ,
                          **measure(model, gptq, evals, fp_model, prompt, args, hessians)}  # fmt: skip
    model, _ = load_smollm2()
    t0 = time.perf_counter()
    bap = qcompile.block_ap(model, train, rtn, init=args.init, epochs=args.epochs)
    row = {"block_ap_s": time.perf_counter() - t0, "tokens": bap.tokens * args.epochs}
    print(bap, flush=True)
    measured = copy_trained(model)  # measuring releases its weights; E2E-QP goes on here
    yield f"{rtn} block-ap", {**row, **measure(measured, rtn, evals, fp_model, prompt, args)}
    del measured
    t0 = time.perf_counter()
    e2e = qcompile.e2e_qp(model, train, epochs=args.e2e_epochs)
    print(e2e, flush=True)
    row["e2e_s"] = time.perf_counter() - t0
    row["tokens"] += e2e.tokens * args.e2e_epochs
    yield (
        f"{rtn} block-ap+e2e-qp",
        {**row, **measure(model, rtn, evals, fp_model, prompt, args, timed=True)},
    )


def print_table(rows: dict, fp: dict, args) -> None:
    kinds = list(corpus.KINDS)
    head = (f"{'variant':<28} {'tokens':>7} {'block-ap s':>10} {'e2e s':>6} "
            + " ".join(f"{k:>10}" for k in kinds)
            + f" {'peak MiB':>8} {'resident MB':>11} {'decode ms':>9}  method")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    print(f"{'fp32':<28} {'':>7} {'':>10} {'':>6} " + " ".join(f"{fp[k]:>10.3f}" for k in kinds)
          + f" {'':>8} {fp['resident'] / 1e6:>11.1f} {fp.get('decode_ms', 0):>9.2f}")  # fmt: skip
    for name, r in rows.items():
        cells = " ".join(f"{r[k] / fp[k]:>10.4f}" for k in kinds)
        bap = f"{r['block_ap_s']:.0f}" if "block_ap_s" in r else ""
        e2e = f"{r['e2e_s']:.0f}" if "e2e_s" in r else ""
        print(f"{name:<28} {r['tokens']:>7} {bap:>10} {e2e:>6} {cells} {r['peak_mib']:>8.0f} "
              f"{r['resident'] / 1e6:>11.1f} {r.get('decode_ms', 0):>9.2f}  {r['method']}")  # fmt: skip
    print(f"\nfp32 row: perplexity on the first {args.tokens} tokens of each kind; other rows: "
          "ratio to it. Training and calibration: the calibration mix (reference, docstrings, "
          "code), never those tokens; legal is never read. The Block-AP + E2E-QP row continues "
          "from the Block-AP row's model (its block-ap time is that row's). Peak MiB: "
          "the process's peak RSS during the variant (the fp reference model included).")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--batches", type=int, default=96, help="training / calibration batches")
    ap.add_argument("--epochs", type=int, default=BLOCK_AP_DEFAULTS["epochs"])
    ap.add_argument("--e2e-epochs", type=int, default=E2E_QP_DEFAULTS["epochs"])
    ap.add_argument("--init", default=BLOCK_AP_DEFAULTS["init"], choices=["rtn", "gptq"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--latency-all", action="store_true",
                    help="decode latency of every row (default: fp and the trained rows; the "
                    "others run the same kernels)")  # fmt: skip
    args = ap.parse_args()
    torch.manual_seed(0)
    fp_model, tok = load_smollm2()
    prompt = corpus.eval_tokens(tok, "reference", SEQ)  # decode: its first 256 as the cache
    evals = {k: corpus.eval_tokens(tok, k, args.tokens) for k in corpus.KINDS}
    train = corpus.calibration_batches(tok, args.batches, SEQ)
    with torch.no_grad():
        fp = {k: perplexity(fp_model, t, batch_size=4) for k, t in evals.items()}
    fp["resident"] = resident_bytes(fp_model)
    if not args.no_latency:
        fp["decode_ms"] = latency(fp_model, fp_model, prompt, 5)["decode_ms"]
    t0 = time.perf_counter()
    hessians = qcompile.calibrate(fp_model, train, hessian=True)
    print(f"GPTQ calibration: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    for bits in args.bits:
        reset_peak()
        for name, row in variants(bits, args, train, evals, fp_model, prompt, hessians):
            rows[name] = {**row, "peak_mib": peak_mib()}
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                  flush=True)  # fmt: skip
            gc.collect()
            reset_peak()
    print_table(rows, fp, args)


if __name__ == "__main__":
    main()
