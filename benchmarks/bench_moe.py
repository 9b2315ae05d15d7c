"""lowbit on Mixture-of-Experts blocks: the routed expert products against the fp experts.

One Mixtral sparse-MoE block (transformers' ``MixtralSparseMoeBlock``: router + experts
held as 3-D tensors, multiplied with ``grouped_mm``) at a width that fits the machine
(``--hidden 1024 --intermediate 2048 --experts 8 --top-k 2`` by default), random
weights drawn as the model's init does. Rows: fp32 eager (transformers' grouped_mm),
fp32 + inductor, and lowbit ``w8a8`` / ``w4a16-g32`` / ``int8-mixed`` (each expert a site
with its own kernels, the router in fp; inductor hand-off). Columns: latency medians for
1 (decode), 16 and 256 tokens, each as a ratio to fp32 eager measured in this run; the
block output's relative error against fp32 on held-out inputs; expert bytes.

    .venv/bin/python benchmarks/bench_moe.py [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_ms  # noqa: E402  (same folder)
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import qcompile

RECIPES = ("w8a8", "w4a16-g32", "int8-mixed")


def build_block(args) -> torch.nn.Module:
    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        experts_implementation="grouped_mm",  # what a whole model gets by default on CPU
    )
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, config.initializer_range)
    return block


def output(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def measure(name, fwd, inputs, held_out, reference, repeats) -> dict:
    row = {"name": name}
    for tokens, x in inputs.items():
        fwd(x)  # compiles (and warms) this shape
        row[tokens] = median_ms(lambda x=x: fwd(x), repeats)
    y = output(fwd(held_out))
    row["rel_err"] = float((y - reference).norm() / reference.norm())
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    block = build_block(args)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 256, args.hidden, generator=g) for _ in range(8)]
    inputs = {t: torch.randn(1, t, args.hidden, generator=g) for t in args.tokens}
    held_out = torch.randn(1, 128, args.hidden, generator=g)
    with torch.no_grad():
        reference = output(block(held_out))
    calibration = qcompile.calibrate(block, calib)
    expert_bytes = sum(p.numel() * 4 for p in block.parameters() if p.dim() == 3)

    rows = [measure("fp32 eager (grouped_mm)", block, inputs, held_out, reference, args.repeats)]
    torch._dynamo.reset()
    rows.append(
        measure("fp32 + inductor", torch.compile(block), inputs, held_out, reference, args.repeats)
    )
    for recipe in RECIPES:
        torch._dynamo.reset()
        options = {"recipe": recipe, "calibration": calibration}
        fwd = torch.compile(block, backend="lowbit", options=options)
        rows.append(measure(f"lowbit {recipe}", fwd, inputs, held_out, reference, args.repeats))
        report = qcompile.model_report(block, warn=False)
        rows[-1]["bytes"] = report.memory.get("quantized_bytes", 0)
        rows[-1]["coverage"] = report.coverage.lines()[0].removeprefix("lowbit: ")
    rows[0]["bytes"] = rows[1]["bytes"] = expert_bytes

    base = rows[0]
    print(
        f"\nMixtral MoE block: hidden {args.hidden}, expert width {args.intermediate}, "
        f"{args.experts} experts, top-{args.top_k}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; latency ms (speed-up over fp32 eager)\n"
    )
    head = [f"{t} tok" for t in args.tokens] + ["rel. err", "MiB"]
    print("| row | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for r in rows:
        cells = [f"{r[t]:.2f} ({base[t] / r[t]:.2f}x)" for t in args.tokens]
        cells += [f"{r['rel_err']:.4f}", f"{r['bytes'] / 2**20:.1f}"]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    for r in rows[2:]:
        print(f"{r['name']}: {r['coverage']}")


if __name__ == "__main__":
    main()
