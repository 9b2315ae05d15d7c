"""Hugging Face-style model folders: ``qcompile.save`` / ``load`` / ``from_pretrained``.

A folder written by ``save(model, folder, tokenizer=tok)`` holds::

    config.json             the model's config (``save_pretrained``), untouched
    generation_config.json  when the model has one
    tokenizer files         when a tokenizer is given
    lowbit.safetensors      the quantized model (``qcompile.serialize``: plan, checksum)
    lowbit_config.json      {"format", "version", "weights", "options", ["source"]}

Invariant: ``from_pretrained(folder)`` builds the saved class on the meta device, loads
the file (every check of ``serialize.load``) and compiles it with the recorded options,
so it computes what the saved model computed without calibrating and without ever
materialising full-precision weights of the quantized layers. ``options`` are those the
caller gives to ``save``, else derived from the file's products (recipe, per-site
overrides, the product-shaping options) and the linear layers it keeps in full
precision. A path with a suffix (``model.safetensors``) keeps the one-file form.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

import torch

from . import serialize
from .matmul_modules import is_matmul_module

FOLDER_FORMAT = "lowbit.folder"
FOLDER_VERSION = 1
# the options a site's products depend on (artifacts.site_key / weight_only_key)
PRODUCT_OPTIONS = ("outlier_mode", "threshold", "outlier_ratio", "gptq", "duquant")
# options that hold objects or name this process's files: never written to a folder
NOT_RECORDED = ("calibration", "debug_dir", "free_weights")


def is_folder(path: str | os.PathLike) -> bool:
    """A folder path: an existing directory, or a path without a file suffix."""
    p = Path(path)
    return p.is_dir() or (not p.exists() and not p.suffix)


def save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    options: dict | None = None,
) -> None:
    """Write ``model`` (compiled with ``backend="lowbit"`` and run once) to ``path``.

    ``path``: a folder (created; see the module docstring) or a file with a suffix (the
    lowbit file alone). ``tokenizer``: saved into the folder. ``options``: the compile
    options ``from_pretrained`` uses (default: derived from what was quantized).
    """
    if not is_folder(path):
        if tokenizer is not None or options is not None:
            raise ValueError(
                f"lowbit.save: {os.fspath(path)!r} is a file path, which holds the weights "
                "only; give a folder path (no suffix) to save a tokenizer and options too"
            )
        serialize.save(model, path)
        return
    folder = Path(path)
    root = serialize.unwrap(model)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / serialize.WEIGHTS_NAME
    serialize.save(root, weights)
    plan = serialize.read_plan(weights)
    recorded = _recordable(options) if options is not None else derived_options(plan, root)
    config = getattr(root, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)
    generation = getattr(root, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_folder_config(folder, options=recorded)


def write_folder_config(folder: str | os.PathLike, **fields) -> None:
    """Write (or update) the folder's ``lowbit_config.json`` with ``fields``."""
    path = Path(folder) / serialize.FOLDER_CONFIG
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(
        format=FOLDER_FORMAT, version=FOLDER_VERSION, weights=serialize.WEIGHTS_NAME, **fields
    )
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def folder_config(folder: str | os.PathLike) -> dict:
    """The folder's ``lowbit_config.json``; ``ValueError`` when it is not a lowbit folder."""
    path = Path(folder) / serialize.FOLDER_CONFIG
    if not path.is_file():
        raise ValueError(
            f"lowbit: {os.fspath(folder)!r} is not a lowbit model folder (no "
            f"{serialize.FOLDER_CONFIG}); write one with qcompile.save(model, folder) or "
            "`lowbit quantize`"
        )
    config = json.loads(path.read_text())
    if config.get("format") != FOLDER_FORMAT or config.get("version") != FOLDER_VERSION:
        raise ValueError(
            f"lowbit: {path} is format {config.get('format')!r} version "
            f"{config.get('version')!r}; this lowbit reads {FOLDER_FORMAT!r} version "
            f"{FOLDER_VERSION}"
        )
    return config


def load(path: str | os.PathLike, model: torch.nn.Module, *, device=None) -> torch.nn.Module:
    """``serialize.load`` of a lowbit file or of a model folder's file."""
    return serialize.load(serialize.weights_file(path), model, device=device)


def from_pretrained(
    folder: str | os.PathLike,
    *,
    options: dict | None = None,
    device=None,
    compile: bool = True,
) -> torch.nn.Module:
    """The model saved in ``folder``, built on the meta device and loaded.

    ``compile``: compile it in place with ``backend="lowbit"`` and the recorded options
    updated by ``options`` (e.g. ``{"handoff": "eager"}``), so that calling it or its
    ``generate`` runs the quantized kernels. The tokenizer: ``AutoTokenizer.from_pretrained
    (folder)``.
    """
    import transformers

    recorded = folder_config(folder)["options"]
    plan = serialize.read_plan(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, plan["model_class"], None)
    if cls is None:
        raise ValueError(
            f"lowbit: the saved model class {plan['model_class']!r} is not in transformers "
            f"{transformers.__version__}; build the model yourself on the meta device and "
            "call qcompile.load(folder, model)"
        )
    with torch.device("meta"):
        model = cls(config).to(_saved_dtype(plan)).eval()
    load(folder, model, device=device)
    generation = Path(folder) / "generation_config.json"
    if generation.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    if compile:
        model.compile(backend="lowbit", options={**recorded, **(options or {})})
    return model


def _saved_dtype(plan: dict) -> torch.dtype:
    """The dtype of the saved model's floating-point parameters (the most common)."""
    entries = [*plan["fp"].values(), *plan["quantized"].values()]
    counts = Counter(
        e["dtype"] for e in entries if e["kind"] == "parameter" and "float" in e["dtype"]
    )
    name = counts.most_common(1)[0][0] if counts else "float32"
    return getattr(torch, name)


def _recordable(options: dict) -> dict:
    out = {k: v for k, v in dict(options).items() if k not in NOT_RECORDED}
    try:
        json.dumps(out)
    except TypeError as e:
        raise ValueError(f"lowbit.save: options must be JSON values to be recorded: {e}") from e
    return out


def derived_options(plan: dict, model: torch.nn.Module) -> dict:
    """Options that make ``torch.compile`` of a loaded copy reuse every stored product:
    the most common recipe, an override per site quantized otherwise, ``"fp"`` for each
    linear layer the file keeps in full precision, and the options the products' keys
    name (outlier rule, GPTQ and DuQuant settings)."""
    per_site: dict[str, str] = {}
    options: dict = {}
    for entry in plan["quantized"].values():
        for art in entry["artifacts"]:
            key = art["key"]
            if key.get("kind", "site") != "site":
                continue
            for site in art["sites"]:
                per_site[site] = key["scheme"]
            options.update({k: key[k] for k in PRODUCT_OPTIONS if k in key})
    if not per_site:
        return options
    recipe = Counter(per_site.values()).most_common(1)[0][0]
    overrides = {glob.escape(s): r for s, r in sorted(per_site.items()) if r != recipe}
    modules = dict(model.named_modules())
    for name in plan["fp"]:
        module_name, _, attr = name.rpartition(".")
        if attr == "weight" and is_matmul_module(modules.get(module_name)):
            overrides[glob.escape(module_name)] = "fp"
    return {"recipe": recipe, **({"overrides": overrides} if overrides else {}), **options}
