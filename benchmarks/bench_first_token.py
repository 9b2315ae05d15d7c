"""Time to the first quantized token on SmolLM2-135M: a first run and the runs after it.

Per recipe, three fresh processes share one empty inductor cache folder (a temporary
one; ``--cache-dir`` keeps it):

1. "compile from fp": load the fp model, calibrate where the recipe needs it
   (``timing.recipe_calibration``), ``torch.compile(backend="lowbit",
   free_weights=True)``, then the timed calls, then ``qcompile.save``;
2. "load folder, 1st": ``qcompile.from_pretrained`` of that folder, the same calls;
3. "load folder, 2nd": the same again (every cache as a user's machine keeps it).

The timed calls, as a chat turn makes them: a 256-token prompt into an empty
``DynamicCache`` (its logits give the first token: "first token s", counted from the
start of the compile or of the folder's load), then two one-token decode steps (the
static and the dynamic-length decode graphs: "decode ready s", counted from the same
start). "process s" adds the imports and the fp model's load. "cached graphs" counts
the graphs AOTAutograd's cache served out of those compiled. Every run's last logits
are compared with the first run's.

    .venv/bin/python benchmarks/bench_first_token.py [--recipes w4a16-g64 int8-mixed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = ("compile from fp", "load folder, 1st", "load folder, 2nd")


def child(recipe: str, folder: str, first: bool, out: str) -> None:
    """One process: the timed calls, their times as JSON in ``out``."""
    t_process = time.perf_counter()
    import torch
    from timing import recipe_calibration  # same folder
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    import qcompile
    from qcompile import corpus
    from qcompile.smollm2 import load_smollm2

    torch.set_num_threads(int(os.environ.get("LOWBIT_BENCH_THREADS", "2")))
    model, tok = load_smollm2()
    prompt = corpus.eval_tokens(tok, "reference", 258)
    with torch.no_grad():
        if first:
            options = {"recipe": recipe, "free_weights": True}
            calibration = recipe_calibration(recipe, model, tok)
            if calibration is not None:
                options["calibration"] = calibration
            t0 = time.perf_counter()
            fast = torch.compile(model, backend="lowbit", options=options)
        else:
            del model
            t0 = time.perf_counter()
            fast = model = qcompile.from_pretrained(folder)
        cache = DynamicCache(config=model.config)
        out_logits = fast(prompt[:, :256], past_key_values=cache, use_cache=True).logits
        t_first = time.perf_counter()
        for i in (256, 257):
            out_logits = fast(prompt[:, i : i + 1], past_key_values=cache, use_cache=True).logits
        t_ready = time.perf_counter()
    if first:
        qcompile.save(fast, folder, tokenizer=tok)
        torch.save(out_logits, f"{folder}.logits.pt")
    same = torch.equal(out_logits, torch.load(f"{folder}.logits.pt"))
    aot = counters["aot_autograd"]
    Path(out).write_text(
        json.dumps(
            {
                "first_s": t_first - t0,
                "ready_s": t_ready - t0,
                "process_s": t_ready - t_process,
                "hits": aot.get("autograd_cache_hit", 0),
                "graphs": aot.get("total", 0),
                "same_logits": same,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["w4a16-g64", "int8-mixed"])
    ap.add_argument("--cache-dir", help="inductor cache folder (default: a fresh temporary one)")
    ap.add_argument("--child", nargs=4, metavar=("RECIPE", "FOLDER", "FIRST", "OUT"),
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args()
    if args.child:
        recipe, folder, first, out = args.child
        child(recipe, folder, first == "1", out)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit_ttft_") as tmp:
        for recipe in args.recipes:
            env = dict(os.environ, LOWBIT_QUIET="1")
            env["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or str(Path(tmp, f"inductor_{recipe}"))
            folder, out = str(Path(tmp, recipe)), str(Path(tmp, "out.json"))
            for i, run in enumerate(RUNS):
                cmd = [sys.executable, __file__, "--child", recipe, folder, str(int(i == 0)), out]
                subprocess.run(cmd, env=env, check=True)
                rows.append({"recipe": recipe, "run": run, **json.loads(Path(out).read_text())})
                r = rows[-1]
                print(f"  {recipe}, {run}: first token {r['first_s']:.1f} s", flush=True)
    print("\n| recipe | run | first token s | decode ready s | process s | cached graphs "
          "| logits as the first run |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| `{r['recipe']}` | {r['run']} | {r['first_s']:.1f} | {r['ready_s']:.1f} "
              f"| {r['process_s']:.1f} | {r['hits']} / {r['graphs']} "
              f"| {'yes' if r['same_logits'] else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    main()
