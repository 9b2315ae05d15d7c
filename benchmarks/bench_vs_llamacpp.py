"""lowbit against llama.cpp on the same CPU, SmolLM2-135M: one process, one table.

Rows: fp32 eager (PyTorch); llama.cpp F32 / Q8_0 / Q4_0 / Q4_1 made from the shipped GGUF
with ``llama_model_quantize`` (``llama-cpp-python``, the ``bench`` extra; Q4_1 is marked:
the GGUF's own weights are Q4_1, so that grid flatters it); lowbit's ``int8-mixed``,
``w8a8``, ``w4a16-g64``, ``w4a16-g64-gptq``, ``w3a16-g64-gptq``, ``w2a16-g64-gptq`` and
``w4a4-duquant``, each compiled on a fresh copy of the model with ``free_weights=True``.
Optional rows of the same compiled models: decode into a ``StaticCache`` written in place
(``--static-cache``; the default is transformers' ``DynamicCache``, which concatenates the
whole cache every step) and under ``skip_guard_eval_unsafe`` (``--skip-guard-eval``).

Columns:
* ppl: perplexity of 2048 dev tokens (windows of 512, ``qcompile.perplexity``; llama.cpp
  through its logits of the same token ids).
* dec-ppl: the perplexity of the first 256 of those tokens fed one at a time through the
  KV cache (the decode kernels), over the same tokens' perplexity in one 256-token call.
* prefill ms (1 x 512 tokens) and decode ms / token (32 greedy steps after a 256-token
  prompt, the cache growing), medians of interleaved rounds (every row once per round).
* MB: resident weight bytes (lowbit: every storage the compiled model keeps, each once:
  parameters, graph constants, stored products; llama.cpp: the GGUF's size), bits per
  weight over the model's parameters, the weight-only sites' measured bits per weight
  (their CPU layouts' bytes over their weights), and the decode roofline: the bytes a decode step
  reads (lowbit: the decode graph's constants and the parameters it still holds;
  llama.cpp: the file) over the measured read bandwidth, and the fraction of it reached.
* first s: the first prefill and decode calls (compilation), per row.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py [--threads 2] [--rounds 5] \\
        [--recipes w8a8 w4a16-g64] [--llama-cpp F32 Q8_0 Q4_0 Q4_1] [--before w4a16-g64] [--handoff inductor] [--speed-only] \\
        [--skip-guard-eval] [--static-cache]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_weight_only import resident_bytes  # noqa: E402  (same folder)
from transformers import DynamicCache, StaticCache

import qcompile
from qcompile import corpus
from qcompile.backend import lowbit_backend
from qcompile.perplexity import dev_tokens, perplexity
from qcompile.smollm2 import gguf_path, load_smollm2

RECIPES = ("int8-mixed", "w8a8", "w4a16-g64", "w4a16-g64-gptq", "w3a16-g64-gptq",
           "w2a16-g64-gptq", "w4a4-duquant")  # fmt: skip
LLAMA_TYPES = ("F32", "Q8_0", "Q4_0", "Q4_1")
PROMPT, STEPS = 256, 32


# --------------------------------------------------------------------------- #
# The machine
# --------------------------------------------------------------------------- #


def bandwidth_gbs(mib: int = 512, repeats: int = 7) -> dict[str, float]:
    """The best of ``repeats`` passes over ``mib`` MiB (far above the caches), GB/s:
    ``copy`` counts the bytes read and written, ``read`` a reduction's bytes read."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    best = {"copy": 0.0, "read": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best["copy"] = max(best["copy"], 2 * a.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        a.sum()
        best["read"] = max(best["read"], a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


# --------------------------------------------------------------------------- #
# One engine behind a common interface: logits of ids, a timed prefill, a timed decode
# --------------------------------------------------------------------------- #


class TorchEngine:
    """A (compiled) Hugging Face model; ``model`` keeps the architecture's config.
    ``skip_guards``: prefill and decode run under ``torch.compiler.set_stance(
    skip_guard_eval_unsafe=True)`` (dynamo checks only the guards that tell its graphs
    apart; safe here because every graph these calls need was compiled before).
    ``static_cache``: decode writes a ``StaticCache`` of ``PROMPT + STEPS`` positions in
    place instead of concatenating a ``DynamicCache`` every step."""

    def __init__(self, fwd, model, skip_guards: bool = False, static_cache: bool = False):
        self.fwd, self.model, self.skip_guards = fwd, model, skip_guards
        self.static_cache = static_cache

    def _cache(self, positions: int):
        if not self.static_cache:
            return DynamicCache(config=self.model.config)
        if positions > PROMPT + STEPS:
            raise ValueError(f"the static cache holds {PROMPT + STEPS} positions, not {positions}")
        return StaticCache(config=self.model.config, max_cache_len=PROMPT + STEPS)

    def _stance(self):
        if self.skip_guards:
            return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fwd(ids).logits

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        with self._stance():
            self.fwd(ids)

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int, teacher: torch.Tensor | None = None):
        """``steps`` greedy tokens after ``prompt``, or the ``teacher`` tokens fed instead;
        returns (seconds of the steps, log-probabilities of each teacher token)."""
        cache = self._cache(prompt.shape[1] + steps)
        self.last_tokens = []
        with self._stance():
            out = self.fwd(prompt, past_key_values=cache, use_cache=True)
            logps = []
            t0 = time.perf_counter()
            for i in range(steps):
                row = out.logits[0, -1].float()
                if teacher is None:
                    tok = row.argmax().view(1, 1)
                else:
                    tok = teacher[:, i : i + 1]
                    logps.append(row.log_softmax(-1)[tok[0, 0]])
                out = self.fwd(tok, past_key_values=cache, use_cache=True)
                self.last_tokens.append(int(tok))
            return time.perf_counter() - t0, logps


class LlamaCppEngine:
    def __init__(self, path: Path, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512,
                                   logits_all=True, n_threads=threads, verbose=False)  # fmt: skip

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        scores = np.array(self.llm.scores[: ids.shape[1]], dtype=np.float32)
        return torch.from_numpy(scores).unsqueeze(0)

    def prefill(self, ids: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())

    def decode(self, prompt: torch.Tensor, steps: int, teacher: torch.Tensor | None = None):
        self.llm.reset()
        self.llm.eval(prompt[0].tolist())
        n = prompt.shape[1]
        logps = []
        t0 = time.perf_counter()
        for i in range(steps):
            row = torch.from_numpy(self.llm.scores[n + i - 1].copy()).float()
            if teacher is None:
                tok = int(row.argmax())
            else:
                tok = int(teacher[0, i])
                logps.append(row.log_softmax(-1)[tok])
            self.llm.eval([tok])
        return time.perf_counter() - t0, logps


def decode_path_ratio(engine, ids: torch.Tensor) -> float:
    """Perplexity of ``ids[1:]`` fed one token at a time over that of one call."""
    _, logps = engine.decode(ids[:, :1], ids.shape[1] - 1, teacher=ids[:, 1:])
    one_at_a_time = torch.exp(-torch.stack(logps).mean())
    logits = engine.logits(ids)[0, :-1].float()
    whole = torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
    return float(one_at_a_time / whole)


# --------------------------------------------------------------------------- #
# Rows
# --------------------------------------------------------------------------- #


def lowbit_row(recipe, calibration, handoff, tokens, before: bool = False) -> dict:
    """A fresh model compiled with ``recipe`` and ``free_weights``: engine, memory.
    ``before``: the weight-only kernels of the previous release (oneDNN's int4 layout)."""
    from qcompile.kernels import cpu_packed

    model, _ = load_smollm2()
    prepack = cpu_packed.prepack
    if before:
        cpu_packed.prepack = lambda *args: None  # the lowering falls back to the int4 layout
    graphs = []
    opts = {"recipe": recipe, "calibration": calibration, "handoff": handoff,
            "free_weights": True}  # fmt: skip

    def backend(gm, example_inputs):
        compiled = lowbit_backend(gm, example_inputs, options=opts)
        graphs.append(gm)
        return compiled

    engine = TorchEngine(torch.compile(model, backend=backend), model)
    t0 = time.perf_counter()
    engine.prefill(tokens[:, :512])
    engine.decode(tokens[:, :PROMPT], 3)  # static, then dynamic-length decode graphs
    first_s = time.perf_counter() - t0
    cpu_packed.prepack = prepack
    decode_graph = graphs[-1]  # the dynamic-length decode graph, compiled last
    return {
        "name": f"lowbit {recipe}" + (" [before: int4 layout]" if before else ""),
        "engine": engine,
        "first_s": first_s,
        "resident": resident_bytes(model, graphs),
        "per_token": bytes_read_per_token(model, decode_graph),
        "linear_bits": packed_bits_per_weight(model),
    }


def skip_guard_row(row: dict) -> dict:
    """``row``'s compiled model timed under ``skip_guard_eval_unsafe`` (its graphs are all
    compiled: ``lowbit_row`` ran the prefill, the prompt and both decode graphs)."""
    engine = row["engine"]
    skipping = TorchEngine(engine.fwd, engine.model, True, engine.static_cache)
    prompt = torch.arange(1, PROMPT + 1).view(1, -1)
    engine.decode(prompt, 8)
    skipping.decode(prompt, 8)
    if skipping.last_tokens != engine.last_tokens:
        raise RuntimeError(f"{row['name']}: skip_guard_eval_unsafe changed the greedy tokens")
    return {**row, "name": row["name"] + ", skip guard eval", "engine": skipping, "first_s": None,
            "same_model_as": row}  # fmt: skip


def static_cache_row(row: dict) -> dict:
    """``row``'s compiled model decoding into a ``StaticCache`` (two more graphs: the prompt
    and the one-token step, compiled here). Its greedy tokens are not compared with
    ``row``'s: the attention reads the cache through a mask, which rounds differently, and
    per-token int8 activations can turn that into a different token (tests check the
    static cache against the dynamic one on tiny models)."""
    engine = row["engine"]
    static = TorchEngine(engine.fwd, engine.model, engine.skip_guards, static_cache=True)
    t0 = time.perf_counter()
    static.decode(torch.arange(1, PROMPT + 1).view(1, -1), STEPS)
    return {**row, "name": row["name"] + ", static cache", "engine": static,
            "first_s": time.perf_counter() - t0, "same_model_as": row,
            "own_decode_path": True}  # fmt: skip


def packed_bits_per_weight(model) -> float | None:
    """Measured bits per weight of the weight-only sites' CPU layouts (codes, scales and
    zero points as held), over their weights; None without such sites."""
    from qcompile import artifacts
    from qcompile.lowering import derived

    held, weights = 0, 0
    for p in model.parameters():
        for art in artifacts.artifacts_of(p):
            layout = next((v for k, v in derived.layouts(art).items() if k[0] == "cpu"), None)
            if layout is not None and "packed" in layout:
                held += sum(t.untyped_storage().nbytes() for t in layout.values())
                weights += p.numel()
    return 8 * held / weights if weights else None


def bytes_read_per_token(model, decode_graph) -> int:
    """What a decode step reads: the decode graph's constants and the parameters the model
    still holds, each storage once; an ``int8-mixed`` weight without the outlier copies its
    decode kernel skips (``unread_copy_bytes``). The input embedding table only where the
    output layer reads it in full: tied to an output layer that is not a lowbit site (a
    site reads its quantized copy, a graph constant); a lookup reads one row."""
    from qcompile import artifacts

    storages = {}
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    output_quantized = any(a.kind == "site" for a in artifacts.artifacts_of(output))
    for p in model.parameters():
        if p is not embedding or (p is output and not output_quantized):
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    for _, b in decode_graph.named_buffers():
        storages[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    for ptr, unread in unread_copy_bytes(decode_graph).items():
        storages[ptr] -= unread
    return sum(storages.values())


def unread_copy_bytes(decode_graph) -> dict[int, int]:
    """Per weight storage, the bytes of ``int8-mixed``'s outlier copies that
    ``lowbit::int8_gemv_cpu`` skips: all but the first copy of each outlier column,
    ``N x (E - n_outl)`` of an ``[N, K + E]`` weight."""
    from qcompile.kernels import cpu_int8_gemv

    unread = {}
    for node in decode_graph.graph.nodes:
        if node.target is not cpu_int8_gemv.int8_linear_gemv or node.args[4] is None:
            continue
        w_q = getattr(decode_graph, node.args[1].target)
        copies = getattr(decode_graph, node.args[4].target)
        read = copies.numel() + int((copies > 1).sum())  # K + n_outl columns per row
        unread[w_q.untyped_storage().data_ptr()] = w_q.shape[0] * (w_q.shape[1] - read)
    return unread


def llama_cpp_rows(types, threads, folder: Path) -> list[dict]:
    import llama_cpp

    rows = []
    for name in types:
        out = folder / f"smollm2-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(
            llama_cpp, f"LLAMA_FTYPE_{'ALL' if name == 'F32' else 'MOSTLY'}_{name}"
        )
        params.allow_requantize = True
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(gguf_path()).encode(), str(out).encode(), params):
            raise RuntimeError(f"llama_model_quantize failed for {name}")
        size = out.stat().st_size
        mark = " (source grid)" if name == "Q4_1" else ""
        rows.append({"name": f"llama.cpp {name}{mark}", "engine": LlamaCppEngine(out, threads),
                     "resident": size, "per_token": size, "first_s": None})  # fmt: skip
    return rows


# --------------------------------------------------------------------------- #


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--llama-cpp", nargs="*", default=list(LLAMA_TYPES),
                    help="llama.cpp types (F32, Q8_0, Q4_0, Q4_1, Q3_K_S, Q2_K, ...)")  # fmt: skip
    ap.add_argument("--before", nargs="*", default=["w4a16-g64"],
                    help="recipes also run with the previous weight-only kernels")  # fmt: skip
    ap.add_argument("--handoff", default="inductor", choices=("eager", "inductor"))
    ap.add_argument("--speed-only", action="store_true",
                    help="no perplexity columns (fewer graphs to compile with inductor)")  # fmt: skip
    ap.add_argument("--calib-batches", type=int, default=16, help="x 512 tokens, the mix")
    ap.add_argument("--skip-guard-eval", action="store_true",
                    help="also time each lowbit row under torch.compiler.set_stance("
                    "skip_guard_eval_unsafe=True), as a row of its own (same compiled model)")  # fmt: skip
    ap.add_argument("--static-cache", action="store_true",
                    help="also time each lowbit row decoding into a StaticCache written in "
                    "place, as a row of its own (same compiled model)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    params = sum(p.numel() for p in model.parameters())
    tokens = dev_tokens(tok, args.tokens)
    bw = bandwidth_gbs()
    print(f"torch {torch.__version__}, {args.threads} threads, handoff {args.handoff}; "
          f"bandwidth: copy {bw['copy']:.1f} GB/s (read + write), read {bw['read']:.1f} GB/s",
          flush=True)  # fmt: skip
    rows = [{"name": "fp32 eager (PyTorch)", "engine": TorchEngine(model, model),
             "resident": resident_bytes(model), "first_s": None}]  # fmt: skip
    rows[0]["per_token"] = bytes_read_per_token(model, torch.fx.GraphModule({}, torch.fx.Graph()))
    t0 = time.perf_counter()
    if args.recipes or args.before:
        batches = corpus.calibration_batches(tok, args.calib_batches, 512)
        calibration = qcompile.calibrate(model, batches, hessian=True, sample_rows=512)
        print(f"  calibration: {time.perf_counter() - t0:.0f} s", flush=True)
    for recipe, before in [(r, False) for r in args.recipes] + [(r, True) for r in args.before]:
        rows.append(lowbit_row(recipe, calibration, args.handoff, tokens, before))
        print(f"  {rows[-1]['name']}: compiled, {time.perf_counter() - t0:.0f} s", flush=True)
        base = rows[-1]
        if args.skip_guard_eval:
            rows.append(skip_guard_row(base))
        if args.static_cache:
            rows.append(static_cache_row(base))
            if args.skip_guard_eval:
                rows.append(skip_guard_row(rows[-1]))
    with tempfile.TemporaryDirectory() as folder:
        if args.llama_cpp:
            rows += llama_cpp_rows(args.llama_cpp, args.threads, Path(folder))
        measure(rows, tokens, args)
    print_table(rows, params, max(bw.values()), args)


def measure(rows, tokens, args) -> None:
    for row in [] if args.speed_only else rows:
        eng, same = row["engine"], row.get("same_model_as")
        if same is not None:  # the same compiled model: the same logits
            row["ppl"] = same["ppl"]
            row["dec_ratio"] = (decode_path_ratio(eng, tokens[:, :PROMPT])
                                if row.get("own_decode_path") else same["dec_ratio"])  # fmt: skip
            continue
        row["ppl"] = perplexity(eng.logits, tokens, batch_size=1)
        row["dec_ratio"] = decode_path_ratio(eng, tokens[:, :PROMPT])
        print(f"  {row['name']}: ppl {row['ppl']:.3f}, decode path x{row['dec_ratio']:.4f}",
              flush=True)  # fmt: skip
    prompt512, prompt = tokens[:, :512], tokens[:, :PROMPT]
    for row in rows:
        row["prefill"], row["decode"] = [], []
        row["engine"].prefill(prompt512)  # warm
    for _ in range(args.rounds):  # interleaved: every row once per round
        for row in rows:
            t0 = time.perf_counter()
            row["engine"].prefill(prompt512)
            row["prefill"].append(time.perf_counter() - t0)
            seconds, _ = row["engine"].decode(prompt, STEPS)
            row["decode"].append(seconds / STEPS)


def print_table(rows, params, gbs, args) -> None:
    fp = rows[0]
    head = ("| variant | ppl | dec-ppl | prefill ms | x fp | decode ms | x fp | MB | bits/w "
            "| packed bits/w | roofline ms | of roofline | first s |")  # fmt: skip
    print("\n" + head + "\n" + "|---" * 13 + "|")
    pre0, dec0 = statistics.median(fp["prefill"]), statistics.median(fp["decode"])
    for r in rows:
        pre, dec = statistics.median(r["prefill"]), statistics.median(r["decode"])
        roof = r["per_token"] / (gbs * 1e9)
        first = "" if r["first_s"] is None else f"{r['first_s']:.0f}"
        linear = "" if r.get("linear_bits") is None else f"{r['linear_bits']:.2f}"
        ppl = "-" if args.speed_only else f"{r['ppl']:.3f}"
        dec_ratio = "-" if args.speed_only else f"x{r['dec_ratio']:.4f}"
        print(f"| {r['name']} | {ppl} | {dec_ratio} | {pre * 1e3:.0f} "
              f"| {pre0 / pre:.2f} | {dec * 1e3:.2f} | {dec0 / dec:.2f} "
              f"| {r['resident'] / 1e6:.1f} | {8 * r['resident'] / params:.2f} "
              f"| {linear} | {roof * 1e3:.2f} | {roof / dec:.0%} | {first} |")  # fmt: skip
    print(f"\n{args.tokens} dev tokens; {args.rounds} interleaved rounds, medians; decode: "
          f"{STEPS} greedy steps after {PROMPT} tokens; roofline at {gbs:.1f} GB/s; "
          f"threads {args.threads}; {os.cpu_count()} CPUs")  # fmt: skip


if __name__ == "__main__":
    main()
