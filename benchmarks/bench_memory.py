"""lowbit's memory on SmolLM2-135M, phase by phase: live and peak RSS above the import baseline.

Each recipe runs in a fresh process: import torch, transformers, the model's modeling
module (about 40 MiB of code: the model's, not lowbit's) and qcompile (the baseline), load the model (``from_pretrained``: weights mapped from the checkpoint),
calibrate (only where the recipe needs it: 2 x 256 tokens of the corpus mix, 8 x 512 with
the Hessian for GPTQ), compile with ``free_weights=True`` and call it once (1 x 128
tokens), call it again (1 x 64: a second graph), save a model folder; a second fresh
process loads that folder (``qcompile.from_pretrained``; its tokenizer before the
baseline) and calls it once. The
``--sequential`` recipes run ``qcompile.quantize_sequential`` from the cached safetensors
checkpoint (tokenizer, 8 x 512 calibration tokens and the model built without weights come
first, inside the figures; then a 2-block model of the same class is quantized the same
way, to show what is loaded and kept for having run it at all, whatever the model's size),
and their folder is loaded the same way. A third row,
"fp floor", runs the fp32 model twice without lowbit and then drops every parameter: what
PyTorch and transformers keep for having run a model at all (the part of a steady state
that is not lowbit's). Per phase:
live RSS after ``gc.collect()`` and ``malloc_trim`` and the phase's peak (``VmHWM``, reset
at the phase's start), in MiB above the baseline; then the ratios the issue sets
targets for and ``qcompile.memory_report``'s breakdown of the steady state. Linux only.

    .venv/bin/python benchmarks/bench_memory.py [--recipes w4a16-g64 int8-mixed] \\
        [--handoff eager]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20
TARGETS = {  # (what, limit): the ratios issue 20 asks for
    "steady live / quantized bytes": 1.3,
    "compile peak / fp32 weight bytes": 1.5,
    "load peak / saved file bytes": 1.3,
}


class Phases:
    """Live and peak RSS per phase, above the baseline taken at construction."""

    def __init__(self) -> None:
        import torch
        import transformers  # noqa: F401  (as a user's script imports them)
        from transformers.models.llama import modeling_llama  # noqa: F401

        from qcompile import memory

        torch.set_num_threads(2)

        self.memory = memory
        self.base = memory.live_rss()
        self.rows: list[tuple[str, float, float]] = []
        memory.reset_peak()

    def mark(self, phase: str) -> None:
        live = self.memory.live_rss() - self.base
        peak = self.memory.peak_rss() - self.base
        self.rows.append((phase, live / MIB, peak / MIB))
        print(f"  {phase:<34} live {live / MIB:8.1f}  peak {peak / MIB:8.1f}", flush=True)
        self.memory.reset_peak()


def child_quantize(recipe: str, handoff: str, folder: str) -> dict:
    import torch
    from timing import recipe_calibration  # same folder

    import qcompile
    from qcompile import corpus
    from qcompile.smollm2 import load_smollm2

    phases = Phases()
    model, tok = load_smollm2()
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    phases.mark("load (mapped)")
    options = {"recipe": recipe, "free_weights": True, "handoff": handoff}
    calibration = recipe_calibration(recipe, model, tok)
    if calibration is not None:
        options["calibration"] = calibration
        phases.mark("calibrate")
    ids = corpus.eval_tokens(tok, "reference", 128)
    fast = torch.compile(model, backend="lowbit", options=options)
    with torch.no_grad():
        fast(ids)
        phases.mark("compile + first call (128 tokens)")
        fast(ids[:, :64])
    options.pop("calibration", None)  # the user's own reference, dropped
    phases.mark("second call (64 tokens)")
    reports = qcompile.compiled_reports()
    quantized = max(rep.memory.get("quantized_bytes", 0) for rep in reports)
    breakdown = qcompile.memory_report(model, baseline=phases.base).summary()
    qcompile.save(model, folder, tokenizer=tok)
    file_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    phases.mark("save")
    return {
        "rows": phases.rows,
        "fp_bytes": fp_bytes,
        "quantized_bytes": quantized,
        "file_bytes": file_bytes,
        "breakdown": breakdown,
    }


def child_load(folder: str) -> dict:
    import torch
    import transformers

    import qcompile
    from qcompile import corpus

    tok = transformers.AutoTokenizer.from_pretrained(folder)  # in the baseline: not the model
    phases = Phases()
    model = qcompile.from_pretrained(folder)
    phases.mark("load saved folder")
    with torch.no_grad():
        model(corpus.eval_tokens(tok, "reference", 128))
    phases.mark("first call of the loaded model")
    return {"rows": phases.rows}


def child_sequential(recipe: str, folder: str) -> dict:
    import transformers
    from accelerate import init_empty_weights

    from qcompile import corpus, quantize_sequential
    from qcompile.smollm2 import cached_checkpoint

    checkpoint = cached_checkpoint()  # before the baseline: written once, then reused
    phases = Phases()
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    batches = corpus.calibration_batches(tok, n_batches=8, seq_len=512)
    phases.mark("tokenizer, batches, meta model")
    _warm_up_sequential(config, recipe, batches[0][:, :16])
    phases.mark("a 2-block model first (fixed part)")
    result = quantize_sequential(
        model, checkpoint, batches, folder, options={"recipe": recipe}, tokenizer=tok
    )
    phases.mark(f"quantize_sequential ({result.seconds:.0f} s)")
    fp_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    return {"rows": phases.rows, "fp_bytes": fp_bytes}


def _warm_up_sequential(config, recipe: str, ids) -> None:
    """``quantize_sequential`` of a 2-block, 64-wide model of the same class: what is
    loaded and kept for having run it at all (code, compiler caches), whatever the model's
    size."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    from qcompile import quantize_sequential

    small = config.__class__(
        **{**config.to_dict(), "num_hidden_layers": 2, "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16},
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        transformers.AutoModelForCausalLM.from_config(small).save_pretrained(f"{tmp}/fp")
        with init_empty_weights():
            empty = transformers.AutoModelForCausalLM.from_config(small).eval()
        quantize_sequential(empty, f"{tmp}/fp", [ids], f"{tmp}/q", options={"recipe": recipe})
    torch._dynamo.reset()


def child_floor() -> dict:
    import torch

    from qcompile import corpus
    from qcompile.smollm2 import load_smollm2

    phases = Phases()
    model, tok = load_smollm2()
    ids = corpus.eval_tokens(tok, "reference", 128)
    with torch.no_grad():
        model(ids)
        model(ids[:, :64])
    phases.mark("fp32 model, two calls")
    for t in [*model.parameters(), *model.buffers()]:
        t.data = torch.empty(0, dtype=t.dtype)
    phases.mark("fp floor: every tensor dropped")
    return {"rows": phases.rows}


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LOWBIT_QUIET": "1"},
    )
    sys.stderr.write(out.stderr[-3000:] if out.returncode else "")
    if out.returncode:
        raise SystemExit(f"child {args} failed ({out.returncode})")
    print(out.stdout.split("@@")[0], end="")
    return json.loads(out.stdout.split("@@")[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipes", nargs="*", default=["w4a16-g64", "int8-mixed"])
    ap.add_argument("--handoff", default="inductor", choices=("eager", "inductor"))
    ap.add_argument(
        "--sequential", nargs="*", default=["w4a16-g64"], help="recipes for quantize_sequential"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        child = {
            "quantize": child_quantize,
            "sequential": child_sequential,
            "load": child_load,
            "floor": child_floor,
        }[kind]
        result = child(*rest)
        print("@@" + json.dumps(result))
        return
    table = ["| recipe | phase | live MiB | peak MiB |", "|---|---|---|---|"]
    ratios = ["| recipe | " + " | ".join(TARGETS) + " |", "|---|---|---|---|"]
    print("fp floor")
    floor = run_child("floor")
    table += [
        f"| fp32, no lowbit | {p} | {live:.1f} | {peak:.1f} |" for p, live, peak in floor["rows"]
    ]
    for recipe in args.recipes:
        print(f"{recipe} ({args.handoff} hand-off)")
        with tempfile.TemporaryDirectory() as folder:
            q = run_child("quantize", recipe, args.handoff, folder)
            loaded = run_child("load", folder)
        rows = q["rows"] + loaded["rows"]
        table += [f"| `{recipe}` | {p} | {live:.1f} | {peak:.1f} |" for p, live, peak in rows]
        by = {p: (live, peak) for p, live, peak in rows}
        compile_peak = max(peak for p, _, peak in q["rows"] if p != "load (mapped)")
        figures = (
            by["second call (64 tokens)"][0] * MIB / q["quantized_bytes"],
            compile_peak * MIB / q["fp_bytes"],
            by["load saved folder"][1] * MIB / q["file_bytes"],
        )
        cells = [f"{v:.2f} (target <= {t})" for v, t in zip(figures, TARGETS.values())]
        ratios.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
        print(q["breakdown"])
        print(
            f"fp32 weights {q['fp_bytes'] / MIB:.1f} MiB, quantized constants "
            f"{q['quantized_bytes'] / MIB:.1f} MiB, saved file {q['file_bytes'] / MIB:.1f} MiB\n"
        )
    seq = [
        "| sequential recipe | peak / fp32 weight bytes (target <= 0.3) | the same above the "
        "call's start | above the fixed part |",
        "|---|---|---|---|",
    ]
    for recipe in args.sequential:
        print(f"{recipe} (quantize_sequential)")
        with tempfile.TemporaryDirectory() as folder:
            q = run_child("sequential", recipe, folder)
            loaded = run_child("load", folder)
        rows = q["rows"] + loaded["rows"]
        table += [f"| `{recipe}` sequential | {p} | {lv:.1f} | {pk:.1f} |" for p, lv, pk in rows]
        (_, setup_live, _), (_, fixed_live, _), (_, _, peak) = q["rows"]
        fp = q["fp_bytes"] / MIB
        seq.append(
            f"| `{recipe}` | {peak / fp:.2f} | {(peak - setup_live) / fp:.2f} | "
            f"{(peak - fixed_live) / fp:.2f} |"
        )
    print("\n".join(table) + "\n\n" + "\n".join(ratios) + "\n\n" + "\n".join(seq))


if __name__ == "__main__":
    main()
