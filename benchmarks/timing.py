"""Helpers shared by the benchmarks: latency medians of wall-clock times, the
``--calibration-kinds`` flag, and the calibration a recipe is given."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache

from qcompile import corpus


def add_calibration_kinds(ap) -> None:
    """``--calibration-kinds``: the ``qcompile.corpus`` kinds a benchmark calibrates on."""
    ap.add_argument("--calibration-kinds", nargs="+", default=list(corpus.CALIBRATION_KINDS),
                    choices=list(corpus.CALIBRATION_KINDS),
                    help="qcompile.corpus kinds to calibrate on (default: the mix; "
                    "'reference' alone is the README tables' calibration)")  # fmt: skip


def recipe_calibration(recipe: str, model, tok):
    """What the memory and first-token benchmarks calibrate a recipe on: nothing where it
    needs no calibration, else 2 x 256 tokens of the corpus mix (8 x 512 with the Hessian
    for GPTQ)."""
    import qcompile
    from qcompile.recipes import get_recipe

    r = get_recipe(recipe)
    if not r.calibrated:
        return None
    n, length = (8, 512) if r.gptq else (2, 256)
    batches = corpus.calibration_batches(tok, n_batches=n, seq_len=length)
    return qcompile.calibrate(model, batches, hessian=r.gptq)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def latency(model, fwd, prompt512, repeats: int) -> dict:
    """Prefill (1 x 512) and decode (1 token after a 256-token cache) medians, in ms.

    ``fwd`` is what is timed (the compiled model); ``model`` is an eager model of the
    same architecture that fills the decode cache: the cache's values do not change
    the decode cost, only its length, so no 256-token prefill graph is compiled (and
    ``fwd``'s own model may have released its weights).
    """
    t0 = time.perf_counter()
    fwd(prompt512)  # compiles the prefill graph
    first_call = time.perf_counter() - t0
    prefill = median_ms(lambda: fwd(prompt512), repeats)
    cache = DynamicCache(config=model.config)
    model(prompt512[:, :256], past_key_values=cache, use_cache=True)
    tok = prompt512[:, 256:257]
    t0 = time.perf_counter()
    for _ in range(3):  # static, then dynamic-length decode graphs
        fwd(tok, past_key_values=cache, use_cache=True)
    first_call += time.perf_counter() - t0
    decode = median_ms(lambda: fwd(tok, past_key_values=cache, use_cache=True), max(repeats, 10))
    return {"prefill_ms": prefill, "decode_ms": decode, "compile_s": first_call}
