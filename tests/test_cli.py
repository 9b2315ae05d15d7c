"""The ``lowbit`` command line, driven as a user drives it: through subprocesses, on a tiny
Hugging Face model folder (tests/model_folder.py). quantize writes a folder that generate,
eval and export read; errors are one line; every command's --help shows an example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_folder import write_model_folder
from safetensors.torch import load_file

from qcompile import cli
from qcompile.serialize import WEIGHTS_NAME

# The calibration and the evaluation texts are short: the tiny model's context is 256.
CALIBRATION = ["--calibration-tokens", "256", "--seq-len", "128"]


def lowbit(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m qcompile ARGS`` (the console script runs the same main) in ``cwd``."""
    env = {**os.environ, "LOWBIT_QUIET": "1", "PYTHONSAFEPATH": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "qcompile", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"lowbit {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    write_model_folder(work / "tiny")
    (work / "text.txt").write_text(
        "The quick brown fox jumps over the lazy dog. " * 20 + "def f(x):\n    return x\n" * 20
    )
    return work


@pytest.fixture(scope="module")
def quantized(work) -> Path:
    lowbit("quantize", "tiny", "--recipe", "w4a16-g32", *CALIBRATION, "--out", "tiny-w4", cwd=work)
    return work / "tiny-w4"


def test_quantize_writes_a_model_folder(quantized, work):
    config = json.loads((quantized / "lowbit_config.json").read_text())
    assert config["options"] == {"recipe": "w4a16-g32"}
    assert config["source"] == str((work / "tiny").resolve())
    assert (quantized / "tokenizer.json").is_file() and (quantized / "config.json").is_file()


def test_quantize_sequential_writes_the_same_model(quantized, work):
    """Block by block from the folder's .safetensors: round-to-nearest gives the same file
    contents as the whole-model path (whatever the calibration inputs)."""
    done = lowbit(
        "quantize", "tiny", "--recipe", "w4a16-g32", *CALIBRATION, "--sequential",
        "--calibrate-on", "quantized", "--out", "tiny-seq", cwd=work,
    )  # fmt: skip
    assert "one at a time" in done.stdout
    seq = work / "tiny-seq"
    config = json.loads((seq / "lowbit_config.json").read_text())
    assert config["options"] == {"recipe": "w4a16-g32"}
    assert config["source"] == str((work / "tiny").resolve())
    ours, whole = load_file(seq / WEIGHTS_NAME), load_file(quantized / WEIGHTS_NAME)
    assert ours.keys() == whole.keys()
    assert all(torch.equal(ours[k], whole[k]) for k in whole)


def test_generate_streams_the_completion(quantized, work):
    out = lowbit(
        "generate", "tiny-w4", "--prompt", "def f(x):", "--max-new-tokens", "6", cwd=work
    ).stdout
    assert out.startswith("def f(x):")
    assert len(out.strip()) > len("def f(x):")


def test_eval_compares_with_the_fp_original(quantized, work):
    out = lowbit("eval", "tiny-w4", "--text", "text.txt", "--tokens", "200", cwd=work).stdout
    header, row = out.strip().splitlines()[-2:]
    assert header.split() == ["text", "tokens", "fp", "lowbit", "change"]
    name, tokens, fp, q, change = row.split()
    assert name == "text.txt" and int(tokens) == 200
    assert float(fp) > 1 and float(q) > 1 and change.endswith("%")
    # 4-bit weights of a random model: close to, not equal to, the fp perplexity
    assert abs(float(q) / float(fp) - 1) < 0.05


def test_explain_prints_the_report_and_draws_plots(work):
    out = lowbit(
        "explain", "tiny", "--recipe", "int8-mixed", *CALIBRATION, "--plots", "plots", cwd=work
    ).stdout
    assert "model.layers.0.self_attn.q_proj" in out
    pngs = sorted((work / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)


@pytest.mark.parametrize("fmt, out", [("gptq", "tiny-gptq"), ("gguf", "tiny.gguf")])
def test_export(quantized, work, fmt, out):
    if fmt == "gguf":  # w4a16-g32 maps onto GGUF's Q4_1
        pytest.importorskip("gguf")
    lowbit("export", "tiny-w4", "--format", fmt, "--out", out, cwd=work)
    assert (work / out).exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["quantize", "nowhere", "--out", "x"], "is not a folder, a .gguf file"),
        (["eval", "tiny"], "is not a lowbit model folder"),
        (["quantize", "tiny", "--options", "{oops", "--out", "x"], "--options is not JSON"),
        (["quantize", "text.txt", "--sequential", "--out", "x"], "is not a folder"),
        (["quantize", ".", "--sequential", "--out", "x"], "safetensors files and . has none"),
        (["quantize", "tiny", "--options", '{"treshold": 4}', "--out", "x"], "unknown lowbit"),
    ],
)
def test_errors_are_one_line(work, args, words):
    done = lowbit(*args, cwd=work, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("lowbit: error: ")
    assert words in done.stderr
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback(work):
    done = lowbit("quantize", "nowhere", "--out", "x", "--debug", cwd=work, check=False)
    assert done.returncode != 0 and "Traceback" in done.stderr


@pytest.mark.parametrize("command", ["quantize", "explain", "eval", "generate", "export"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and f"lowbit {command} " in out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lowbit"
    assert script.is_file(), "reinstall the project (scripts/dev.sh) to get the lowbit script"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "lowbit quantize" in done.stdout
