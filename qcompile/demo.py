"""The lowbit demo on SmolLM2-135M: calibrate, explain, compile, generate, compare perplexity.

Calibration is the default mix of ``qcompile.corpus`` (reference prose, docstrings and
code, 8 x 512 tokens); perplexity is measured on every kind of the corpus, legal text
included, from tokens calibration never read.

scripts/dev.sh demo            # or: .venv/bin/python -m qcompile.demo [--handoff eager]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import qcompile
from qcompile import corpus
from qcompile.perplexity import perplexity
from qcompile.smollm2 import load_smollm2

PROMPT = "The Python language reference says that a function definition"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", default="int8-mixed", choices=sorted(qcompile.RECIPES))
    ap.add_argument("--handoff", default="inductor", choices=["inductor", "eager"])
    ap.add_argument("--tokens", type=int, default=2048, help="perplexity tokens (default 2048)")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--debug-dir", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    calibration = qcompile.calibrate(
        model, corpus.calibration_batches(tok, n_batches=8, seq_len=512)
    )
    kinds = ", ".join(corpus.CALIBRATION_KINDS)
    print(f"calibrated on 8 x 512 tokens of {kinds} in {time.perf_counter() - t0:.1f} s")
    options = {
        "recipe": args.recipe,
        "calibration": calibration,
        "handoff": args.handoff,
        "debug_dir": args.debug_dir,
    }

    prompt = tok(PROMPT, return_tensors="pt").input_ids
    print("\n== what lowbit will do (qcompile.explain) ==")
    print(qcompile.explain(model, prompt, options=options))

    texts = {kind: corpus.eval_tokens(tok, kind, args.tokens) for kind in corpus.KINDS}
    with torch.no_grad():
        fp_ppl = {kind: perplexity(model, tokens) for kind, tokens in texts.items()}
        fp_gen = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)

    print(f"\n== compiling with backend='lowbit', recipe {args.recipe!r} ({args.handoff}) ==")
    model.compile(backend="lowbit", options=options)  # in place: generate() uses it
    with torch.no_grad():
        t0 = time.perf_counter()
        q_ppl = {kind: perplexity(model, tokens) for kind, tokens in texts.items()}
        print(f"quantized perplexity (incl. compile) took {time.perf_counter() - t0:.1f} s")
        q_gen = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)

    text = tok.decode(q_gen[0, prompt.shape[1] :], skip_special_tokens=True)
    same = torch.equal(fp_gen, q_gen)
    print(f"\n== greedy completion ({args.recipe}) ==\n{PROMPT}{text}")
    print(f"(same tokens as the fp model: {same})")
    print(f"\n== perplexity on the first {args.tokens} tokens of each kind (context 512) ==")
    print(f"{'kind':<12} {'fp32 eager':>10} {args.recipe:>14}")
    for kind in texts:
        change = (q_ppl[kind] / fp_ppl[kind] - 1) * 100
        print(f"{kind:<12} {fp_ppl[kind]:10.3f} {q_ppl[kind]:14.3f}  ({change:+.2f}%)")


if __name__ == "__main__":
    main()
