"""``qcompile.export``: a lowbit-quantized model in formats other engines run.

``export(saved, out, format=...)`` reads what ``qcompile.save`` wrote (a model folder,
or a one-file lowbit ``.safetensors``) and writes

* ``format="gptq"``: a GPTQ checkpoint folder (``checkpoint_format`` ``gptq_v2``) for
  every weight-only recipe (``w{8,4,3,2}a16-g{G}[-gptq]``): ``qcompile.export_gptq``;
* ``format="gguf"``: one GGUF file for llama.cpp, Llama models quantized with ``w8a8``
  (``Q8_0``) or ``w4a16-g32[-gptq]`` (``Q4_1``): ``qcompile.export_gguf``.

Invariant: what is exported is lowbit's own quantization, never a requantization: every
code and zero point is copied bit for bit, scales are only rounded to the format's fp16.
A table lowbit reads as quantized codes but the format cannot hold exactly (a tied
embedding table that is also the 8-bit ``lm_head``) is written as its dequantized values
in full precision, i.e. the numbers lowbit computes with. A recipe the format cannot hold
exactly is a ``ValueError`` naming the recipes that export.

This module reads the saved model into :class:`Saved` (one :class:`Weight` per stored
parameter, with its quantized products as a :class:`Quantized`); the two writers only
lay those out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import serialize
from .artifacts import product_shape
from .kernels.packing import unpack
from .kernels.weight_only_reference import dequantize_groupwise
from .matmul_modules import IN_OUT
from .recipes import RECIPES, Recipe

FORMATS = ("gptq", "gguf")


def export(
    saved: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    tokenizer: str | os.PathLike | None = None,
    fp_type: str = "f16",
) -> Path:
    """Write the model ``qcompile.save`` wrote to ``saved`` in another engine's format.

    ``format``: ``"gptq"`` (``out`` is a folder: ``config.json`` with its
    ``quantization_config``, ``model.safetensors``, the tokenizer files) or ``"gguf"``
    (``out`` is a ``.gguf`` file). ``tokenizer``: where the tokenizer comes from instead
    of the saved folder (a folder with tokenizer files; for GGUF also a ``.gguf`` file
    whose ``tokenizer.*`` metadata is copied). ``fp_type`` (GGUF): ``"f16"`` or ``"f32"``
    for the full-precision matrices (norms and biases are F32). Returns ``out``.
    ``ValueError`` when the model's recipes, architecture or shapes do not map exactly
    onto the format (nothing is written then).
    """
    if format not in FORMATS:
        raise ValueError(f"lowbit.export: unknown format {format!r}; choose one of {FORMATS}")
    model = read_saved(saved)
    out = Path(out)
    if format == "gptq":
        from .export_gptq import write_gptq

        write_gptq(model, out, tokenizer=tokenizer)
    else:
        from .export_gguf import write_gguf

        write_gguf(model, out, tokenizer=tokenizer, fp_type=fp_type)
    return out


# the saved model ----------------------------------------------------------------------


@dataclass
class Quantized:
    """One linear weight's stored products (``qcompile.artifacts``), ``[out, in]``."""

    scheme: str
    recipe: Recipe
    shape: tuple[int, int]  # [out, in] (the products' orientation)
    products: dict[str, torch.Tensor]
    meta: dict
    layout: str | None = None  # IN_OUT: the parameter is stored transposed

    @property
    def bits(self) -> int:
        return self.recipe.weight_bits

    @property
    def group_size(self) -> int | None:
        return self.recipe.group_size

    def codes(self) -> torch.Tensor:
        """Weight-only: unsigned codes ``uint8 [out, in]``; ``w8a8``: ``int8 [out, in]``."""
        if self.recipe.weight_only:
            return unpack(self.products["packed"], self.bits, self.shape[1])
        return self.products["w_q"]

    def dequantized(self) -> torch.Tensor:
        """The weight lowbit computes with, float32 ``[out, in]``."""
        if self.recipe.weight_only:
            s, z = self.products["scales"], self.products["zeros"]
            return dequantize_groupwise(self.codes(), s, z, self.group_size, torch.float32)
        if self.recipe.mixed or self.recipe.transform is not None:  # outliers, transforms
            raise ValueError(f"lowbit.export: {self.scheme} weights are not a plain dequantization")
        return self.products["w_q"].float() * self.products["w_scale"].float().unsqueeze(1)

    def dequantized_param(self) -> torch.Tensor:
        """:meth:`dequantized` in the parameter's own orientation."""
        w = self.dequantized()
        return w.t().contiguous() if self.layout == IN_OUT else w


@dataclass
class Weight:
    """One stored parameter or buffer, under every name that holds it."""

    name: str
    aliases: list[str]
    kind: str  # "parameter" | "buffer"
    persistent: bool = True
    fp: torch.Tensor | None = None  # the full-precision value, when stored
    quant: Quantized | None = None
    sites: list[str] = field(default_factory=list)  # aliases that are quantized linear weights

    @property
    def embedding_reads_codes(self) -> bool:
        """A quantized table also read by a non-linear (a tied embedding) through its codes."""
        return self.quant is not None and self.fp is None and set(self.aliases) != set(self.sites)


@dataclass
class Saved:
    path: Path
    folder: Path | None  # the model folder (None: a one-file lowbit .safetensors)
    model_class: str
    config: dict  # the Hugging Face config (config.json, or the one the file records)
    lowbit_config: dict  # lowbit_config.json ({} without a folder)
    weights: list[Weight]

    @property
    def source(self) -> str | None:
        """The original model (``lowbit_config.json``): an HF folder, a ``.gguf``, an alias."""
        return self.lowbit_config.get("source")

    def tokenizer_folder(self) -> Path | None:
        """The saved folder when it holds tokenizer files, else a ``source`` folder that does."""
        for folder in (self.folder, Path(self.source) if self.source else None):
            if folder is not None and folder.is_dir() and has_tokenizer(folder):
                return folder
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def read_saved(path: str | os.PathLike) -> Saved:
    """The plan and tensors of a lowbit file or folder as :class:`Saved`."""
    path = Path(path)
    plan, tensors = serialize.read(path)
    folder = path if path.is_dir() else None
    config = plan.get("config") or {}
    lowbit_config: dict = {}
    if folder is not None:
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
        if (folder / serialize.FOLDER_CONFIG).is_file():
            lowbit_config = json.loads((folder / serialize.FOLDER_CONFIG).read_text())
    weights = [
        Weight(
            name,
            list(e["aliases"]),
            e["kind"],
            e.get("persistent", True),
            fp=tensors[e["tensor"]],
        )
        for name, e in plan["fp"].items()
    ]
    for name, e in plan["quantized"].items():
        w = Weight(name, list(e["aliases"]), e["kind"])
        if e.get("keep_fp"):
            w.fp = tensors[e["tensor"]]
        sites = [a for a in e["artifacts"] if a["key"].get("kind", "site") == "site"]
        others = [a["key"].get("kind") for a in e["artifacts"] if a not in sites]
        if others:
            raise ValueError(
                f"lowbit.export: {name} holds {sorted(set(others))} products (a DuQuant-family "
                f"transform); {_exportable()}"
            )
        if len(sites) != 1:
            raise ValueError(
                f"lowbit.export: {name} holds {len(sites)} quantized versions; save the model "
                "after compiling it with one recipe"
            )
        art = sites[0]
        key = art["key"]
        if "expert" in key:
            raise ValueError(
                f"lowbit.export: {name} holds MoE expert matrices; only dense linear layers export"
            )
        scheme = key["scheme"]
        out_in = product_shape(key)
        w.quant = Quantized(
            scheme,
            RECIPES[scheme],
            (out_in[0], out_in[1]),
            {role: tensors[t] for role, t in art["tensors"].items()},
            dict(art["meta"]),
            key.get("layout"),
        )
        w.sites = [s for s in art["sites"] if s in w.aliases]
        weights.append(w)
    return Saved(path, folder, plan["model_class"], config, lowbit_config, weights)


def _exportable() -> str:
    weight_only = [n for n, r in RECIPES.items() if r.weight_only]
    return (
        f"format='gptq' exports the weight-only recipes ({', '.join(weight_only)}); "
        "format='gguf' exports w8a8 (Q8_0), w4a16-g32 and w4a16-g32-gptq (Q4_1)"
    )


def module_of(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return weight_name.rpartition(".")[0]
