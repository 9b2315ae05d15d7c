"""GGUF export on SmolLM2-135M: llama.cpp running lowbit's exported model, one table.

For each recipe (``w4a16-g32-gptq`` and ``w4a16-g32`` by default: the two that export
to llama.cpp's ``Q4_1``), the model is compiled with lowbit (eager hand-off; GPTQ
calibrated on ``--hessian-batches`` x 512 tokens of ``qcompile.corpus``, read from the
end of its texts), its perplexity measured, then saved as a model folder whose
``source`` is the shipped GGUF (so the export copies that file's tokenizer) and exported
with ``qcompile.export(folder, out, format="gguf")``; llama.cpp (``llama-cpp-python``)
then runs the exported file on the same token ids. Next to them: fp32 (transformers)
and llama.cpp's own ``Q4_1`` and ``Q4_0`` made from the shipped GGUF with
``llama_model_quantize`` (``bench_cross_kind.llama_cpp_ratios``).

Two diagnostic rows per recipe separate the export from the engines' arithmetic:
"exact" is the fp32 transformers model with lowbit's dequantized weights (what both
engines approximate: lowbit's CPU kernels compute in bf16, llama.cpp's Q4_1 dot
products quantize activations to 8 bits per block, Q8_1), and "llama.cpp, F32" runs a
GGUF of the same dequantized weights in F32 (written by the exporter, every tensor full
precision): equal to "exact", it shows the layout, rotary order, hyperparameters and
tokenizer are llama.cpp's.

Cells are perplexity on the first ``--tokens`` tokens of each kind (context 512, the
windows and loss of ``qcompile.perplexity``); the last column is the largest relative
difference over the kinds to lowbit's own run (target for the exported GGUF: 0.5%) and
to "exact". Every linear is quantized; the tied lm_head / embedding table is kept at 8
bits by lowbit (``recipes.tied_embedding_recipe``), which no GGUF type holds exactly, so
it is exported as its dequantized values in F16. ``--keep DIR`` keeps the folders and
GGUF files, and a later run with the same ``DIR`` loads the saved folders
(``qcompile.from_pretrained``, bit-exact) instead of calibrating and quantizing again.

    .venv/bin/python benchmarks/bench_export.py [--recipes w4a16-g32-gptq] [--tokens 2048]
        [--hessian-batches 16] [--keep out_dir]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_cross_kind import llama_cpp_ratios  # noqa: E402  (same folder)
from timing import add_calibration_kinds  # noqa: E402

import qcompile
from qcompile import corpus, serialize
from qcompile.export import export, read_saved
from qcompile.export_gguf import write_gguf
from qcompile.folder import write_folder_config
from qcompile.perplexity import perplexity
from qcompile.smollm2 import gguf_path, load_smollm2

RECIPES = ("w4a16-g32-gptq", "w4a16-g32")  # the weight-only recipes Q4_1 holds exactly
TARGET = 0.005


def gguf_perplexity(path: Path, texts: dict, threads: int) -> dict[str, float]:
    """Perplexity of llama.cpp running ``path`` on each text (same windows and loss)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=threads,
        verbose=False,
    )  # fmt: skip

    def logits(ids):  # [1, L] -> [1, L, V]
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))[None]

    return {kind: perplexity(logits, tokens) for kind, tokens in texts.items()}


def exact_model(model, folder: Path):
    """A copy of ``model`` with lowbit's dequantized weights (float32, eager)."""
    exact = copy.deepcopy(model)
    params = dict(exact.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for w in read_saved(folder).weights:
            if w.quant is not None:
                for alias in w.aliases:
                    params[alias].copy_(w.quant.dequantized_param())
    return exact


def write_dequantized_gguf(folder: Path, out: Path) -> None:
    """lowbit's weights dequantized, every tensor F32 (a diagnostic, not an export)."""
    saved = read_saved(folder)
    for w in saved.weights:
        if w.quant is not None:
            w.fp, w.quant, w.sites = w.quant.dequantized_param(), None, []
    write_gguf(saved, out, fp_type="f32")


def worst(ppl: dict, ref: dict) -> float:
    return max(abs(ppl[k] / ref[k] - 1) for k in ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hessian-batches", type=int, default=16)
    ap.add_argument("--keep", metavar="DIR", help="keep (and reuse) the folders and GGUF files")
    add_calibration_kinds(ap)
    args = ap.parse_args()
    threads = torch.get_num_threads()

    model, tok = load_smollm2()
    texts = {kind: corpus.eval_tokens(tok, kind, args.tokens) for kind in corpus.KINDS}

    def ppl(fwd) -> dict[str, float]:
        with torch.no_grad():
            return {k: perplexity(fwd, t, batch_size=4) for k, t in texts.items()}

    rows: list[tuple[str, dict, str]] = [("fp32 (transformers)", ppl(model), "")]
    t0 = time.perf_counter()
    print(f"threads {threads}, torch {torch.__version__}", flush=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    hessian = []

    def calibration():
        if not hessian:
            kinds = tuple(args.calibration_kinds)
            batches = corpus.calibration_batches(tok, args.hessian_batches, 512, kinds)
            hessian.append(qcompile.calibrate(model, batches, hessian=True))
        return hessian[0]

    for recipe in args.recipes:
        torch._dynamo.reset()
        folder, out = work / recipe, work / f"smollm2-{recipe}.gguf"
        loaded = (folder / serialize.WEIGHTS_NAME).is_file()  # kept by an earlier run
        if loaded:
            compiled = qcompile.from_pretrained(folder, options={"handoff": "eager"})
        else:
            options = {"recipe": recipe, "handoff": "eager"}
            if recipe.endswith("-gptq"):
                options["calibration"] = calibration()
            compiled = torch.compile(model, backend="lowbit", options=options)
        own = ppl(compiled)
        if not loaded:
            qcompile.save(compiled, folder, tokenizer=tok)
            write_folder_config(folder, source=str(gguf_path()))  # its tokenizer for the GGUF
        how = "(loaded)" if loaded else ""
        del compiled
        gc.collect()
        torch._dynamo.reset()
        exact = ppl(exact_model(model, folder))
        export(folder, out, format="gguf")
        theirs = gguf_perplexity(out, texts, threads)
        f32 = work / f"smollm2-{recipe}-dequantized-f32.gguf"
        write_dequantized_gguf(folder, f32)
        theirs_f32 = gguf_perplexity(f32, texts, threads)
        off = worst(theirs, own)
        mib = os.path.getsize(out) / 2**20
        rows += [
            (f"lowbit {recipe} {how}", own, f"exact {worst(own, exact):.2%}"),
            ("  exact: its weights, fp32 eager", exact, ""),
            (f"  llama.cpp, exported GGUF ({mib:.0f} MiB)", theirs,
             f"lowbit {off:.2%}{'' if off <= TARGET else ' (>0.5%)'}, "
             f"exact {worst(theirs, exact):.2%}"),
            ("  llama.cpp, its weights in F32", theirs_f32, f"exact {worst(theirs_f32, exact):.2%}"),
        ]  # fmt: skip
        print(f"  {recipe}: {time.perf_counter() - t0:.0f} s", flush=True)
    ones = dict.fromkeys(texts, 1.0)  # llama_cpp_ratios divides by fp: keep perplexities
    for name, values in llama_cpp_ratios(texts, ones, ("Q4_1", "Q4_0"), threads).items():
        rows.append((f"{name} (from the shipped GGUF)", values, ""))
    print_table(rows, list(texts), args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows, kinds, args) -> None:
    head = f"{'model':<42}" + "".join(f" {k:>10}" for k in kinds) + "  largest difference to"
    print("\n" + head + "\n" + "-" * len(head))
    for name, ppl, note in rows:
        print(f"{name:<42}" + "".join(f" {ppl[k]:>10.3f}" for k in kinds) + f"  {note}")
    print(
        f"\nperplexity on the first {args.tokens} tokens of each kind (context 512); GPTQ "
        f"calibrated on {args.hessian_batches} x 512 tokens ({', '.join(args.calibration_kinds)}); "
        "last column: largest |row / reference - 1| over the kinds (target for the exported "
        "GGUF against lowbit's run: 0.5%)."
    )


if __name__ == "__main__":
    main()
