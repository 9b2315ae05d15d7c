"""Cross-kind quality on SmolLM2-135M: calibrate on one kind of text, measure on every kind.

A calibrated recipe is only as good as it is on text its calibration never saw. For
each calibration set (each kind of ``qcompile.corpus`` that is long enough, and their
mix, the default), every recipe that calibrates is compiled (eager hand-off) and its
perplexity measured on the first ``--tokens`` tokens of every kind; calibration reads
each kind from its end and never those tokens. Next to them: the calibration-free
recipes of the same bits (round-to-nearest: ``w8a8``, ``w4a16-g64``, ``w3a16-g64``,
``w6a6-rtn``, ``w4a4-rtn``) and llama.cpp's Q8_0 / Q4_0 / Q4_1 made from the shipped
GGUF with ``llama_model_quantize`` (when ``llama-cpp-python`` is installed:
``pip install -e .[bench]``; it is built from source, about 10 minutes on 2 cores).

Calibration: ``--batches`` x 512 tokens (activation statistics, ``sample_rows=512``)
and, for the GPTQ recipes, ``--hessian-batches`` x 512 tokens with ``hessian=True``.
Every linear is quantized (lm_head too; below 8 bits the tied lm_head keeps 8 bits).
Cells are perplexity / fp32 perplexity on that kind; ``*`` marks a kind the calibration
read (other tokens of it); 'unseen' is the mean over the other kinds.

    .venv/bin/python benchmarks/bench_cross_kind.py [--recipes int8-mixed w4a16-g64-gptq]
        [--calibrations reference mix] [--tokens 2048] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch

import qcompile
from qcompile import corpus
from qcompile.perplexity import perplexity
from qcompile.smollm2 import gguf_path, load_smollm2

CALIBRATED = (
    "int8-mixed",
    "w4a16-g64-gptq",
    "w3a16-g64-gptq",
    "w6a6-duquant",
    "w4a4-duquant",
)
#: the calibration-free recipe of the same bits, per calibrated recipe
ROUND_TO_NEAREST = {
    "int8-mixed": "w8a8",
    "w4a16-g64-gptq": "w4a16-g64",
    "w3a16-g64-gptq": "w3a16-g64",
    "w6a6-duquant": "w6a6-rtn",
    "w4a4-duquant": "w4a4-rtn",
}
LLAMA_CPP_TYPES = ("Q8_0", "Q4_0", "Q4_1")
MIX = "mix"


def calibration_kinds(name: str) -> tuple[str, ...]:
    return corpus.CALIBRATION_KINDS if name == MIX else (name,)


@torch.no_grad()
def lowbit_ratios(model, recipe, calibration, texts, fp) -> dict[str, float]:
    torch._dynamo.reset()
    options = {"recipe": recipe, "handoff": "eager"}
    if calibration is not None:
        options["calibration"] = calibration
    compiled = torch.compile(model, backend="lowbit", options=options)
    ratios = {k: perplexity(compiled, t, batch_size=4) / fp[k] for k, t in texts.items()}
    report = qcompile.compiled_reports()[-1]
    if report.left_in_fp:
        print(f"  note: {recipe}: {report.summary()}")
    return ratios


def llama_cpp_ratios(texts, fp, types, threads) -> dict[str, dict[str, float]]:
    """Perplexity / fp of llama.cpp's formats, each made from the shipped GGUF (same
    windows and loss as the lowbit rows: ``qcompile.perplexity``)."""
    import llama_cpp
    import numpy as np

    source = gguf_path()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in types:
            out = os.path.join(folder, f"smollm2-{name}.gguf")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.allow_requantize = True
            params.nthread = threads
            if llama_cpp.llama_model_quantize(str(source).encode(), out.encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize failed for {name}")
            llm = llama_cpp.Llama(
                model_path=out, n_ctx=512, n_batch=512, logits_all=True, n_threads=threads,
                verbose=False,
            )  # fmt: skip

            def logits(ids, llm=llm):  # [1, L] -> [1, L, V], as qcompile.perplexity expects
                llm.reset()
                llm.eval(ids[0].tolist())
                scores = np.array(llm.scores[: ids.shape[1]], dtype=np.float32)
                return torch.from_numpy(scores).unsqueeze(0)

            rows[f"llama.cpp {name}"] = {
                kind: perplexity(logits, tokens) / fp[kind] for kind, tokens in texts.items()
            }
            del llm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipes", nargs="+", default=list(CALIBRATED), choices=CALIBRATED)
    ap.add_argument(
        "--calibrations", nargs="+", default=[*corpus.CALIBRATION_KINDS, MIX],
        choices=[*corpus.CALIBRATION_KINDS, MIX],
    )  # fmt: skip
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--hessian-batches", type=int, default=64)
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()

    model, tok = load_smollm2()
    texts = {kind: corpus.eval_tokens(tok, kind, args.tokens) for kind in corpus.KINDS}
    with torch.no_grad():
        fp = {k: perplexity(model, t, batch_size=4) for k, t in texts.items()}
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; fp32 perplexity: "
          + ", ".join(f"{k} {v:.3f}" for k, v in fp.items()), flush=True)  # fmt: skip

    rows = []  # (recipe, calibrated on, ratios)
    t0 = time.perf_counter()
    for recipe in dict.fromkeys(ROUND_TO_NEAREST[r] for r in args.recipes):
        rows.append((recipe, "-", lowbit_ratios(model, recipe, None, texts, fp)))
        print(f"  {recipe}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_llama_cpp:
        try:
            for name, ratios in llama_cpp_ratios(
                texts, fp, LLAMA_CPP_TYPES, torch.get_num_threads()
            ).items():
                rows.append((name, "-", ratios))
        except ImportError:
            print(
                "  llama-cpp-python is not installed (pip install -e .[bench]): no llama.cpp rows"
            )
    for cal_name in args.calibrations:
        kinds = calibration_kinds(cal_name)
        stats = qcompile.calibrate(
            model, corpus.calibration_batches(tok, args.batches, 512, kinds), sample_rows=512
        )
        hessian = None
        if any(r.endswith("-gptq") for r in args.recipes):
            batches = corpus.calibration_batches(tok, args.hessian_batches, 512, kinds)
            hessian = qcompile.calibrate(model, batches, hessian=True)
        for recipe in args.recipes:
            calibration = hessian if recipe.endswith("-gptq") else stats
            rows.append((recipe, cal_name, lowbit_ratios(model, recipe, calibration, texts, fp)))
            print(f"  {recipe} calibrated on {cal_name}: {time.perf_counter() - t0:.0f} s",
                  flush=True)  # fmt: skip
        del stats, hessian
        gc.collect()

    print_table(rows, list(texts), args)


def print_table(rows, kinds, args) -> None:
    head = f"{'recipe':<18} {'calibrated on':<13}" + "".join(f" {k:>11}" for k in kinds)
    head += f" {'unseen':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for recipe, cal_name, ratios in rows:
        seen = calibration_kinds(cal_name) if cal_name != "-" else ()
        cells = "".join(f" {ratios[k]:>10.4f}{'*' if k in seen else ' '}" for k in kinds)
        unseen = [ratios[k] for k in kinds if k not in seen]
        print(f"{recipe:<18} {cal_name:<13}{cells} {sum(unseen) / len(unseen):>8.4f}")
    print(
        f"\nperplexity / fp32 on the first {args.tokens} tokens of each kind (context 512); "
        f"calibration {args.batches} x 512 tokens (GPTQ: {args.hessian_batches} x 512, "
        "hessian=True) from the end of the named kinds ('mix': "
        f"{', '.join(corpus.CALIBRATION_KINDS)} round-robin); * = a kind calibration read; "
        "'-': no calibration."
    )


if __name__ == "__main__":
    main()
