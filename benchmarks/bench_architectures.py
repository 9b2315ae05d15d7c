"""Quality and coverage of every recipe on the tiny architectures of the test suite.

For each architecture of ``tests/architectures.py`` (25 transformers model classes,
random weights, hidden 32) and each recipe: a fresh model, calibrated on 4 x 16 random
tokens (``hessian=True`` for GPTQ, ``sample_rows=64`` for DuQuant), compiled with the
eager hand-off; the relative error ``||y - y_fp|| / ||y_fp||`` of the logits of 12
held-out tokens, and the coverage of the last recipe (``qcompile.model_report``).

    .venv/bin/python benchmarks/bench_architectures.py [ARCH ...] [--recipes ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from architectures import ARCHITECTURES, batches, build  # noqa: E402

import qcompile  # noqa: E402

RECIPES = ["int8-mixed", "w8a8", "w4a16-g32", "w4a16-g32-gptq", "w4a4-duquant"]


def relative_error(name: str, recipe: str, held_out: torch.Tensor) -> tuple[float, str]:
    torch._dynamo.reset()
    model = build(name)
    calibration = qcompile.calibrate(
        model,
        batches(4),
        hessian=recipe.endswith("gptq"),
        sample_rows=64 if "duquant" in recipe else 0,
    )
    options = {"recipe": recipe, "calibration": calibration, "handoff": "eager"}
    with torch.no_grad():
        ref = model(held_out).logits
        y = torch.compile(model, backend="lowbit", options=options)(held_out).logits
    cov = qcompile.model_report(model, warn=False).coverage
    coverage = f"{len(cov.quantized)}/{cov.total}, {100 * cov.quantized_share:.1f}%"
    return float((y - ref).norm() / ref.norm()), coverage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("archs", nargs="*", default=sorted(ARCHITECTURES))
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    held_out = batches(1, seq=12, seed=9)[0]
    print("| architecture | " + " | ".join(args.recipes) + " | coverage |")
    print("|---" * (len(args.recipes) + 2) + "|")
    for name in args.archs:
        cells, coverage = [], ""
        for recipe in args.recipes:
            err, coverage = relative_error(name, recipe, held_out)
            cells.append(f"{err:.4f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {coverage} |", flush=True)


if __name__ == "__main__":
    main()
