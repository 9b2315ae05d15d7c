"""GPTQ checkpoint export (``qcompile.export(..., format="gptq")``).

Writes a folder GPTQ engines load (GPTQModel, transformers + optimum, vLLM's ``gptq``):
``config.json`` (the model's config with ``quantization_config``, also written alone as
``quantize_config.json`` for AutoGPTQ-era loaders), ``model.safetensors`` and the
tokenizer / generation files of the saved folder. Every weight-only recipe exports
(``w{8,4,3,2}a16-g{G}``, round-to-nearest or GPTQ); any other recipe is a ``ValueError``.

Invariant: per exported linear ``<m>`` (weight ``[N, K]``, ``b`` bits, groups of ``G``),
unpacking ``<m>.qweight`` and ``<m>.qzeros`` gives lowbit's codes and zero points bit for
bit, ``<m>.scales`` are lowbit's scales rounded to fp16, and
``W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]`` is lowbit's dequantized
weight up to that rounding.

Layout (AutoGPTQ / GPTQModel, ``checkpoint_format`` ``gptq_v2``):

* ``qweight`` int32 ``[K * b / 32, N]``: column ``n`` holds row ``n``'s codes along K as
  one little-endian bit stream (code ``k`` at stream bits ``[k*b, (k+1)*b)``, stream bit
  ``32*j`` in the least significant bit of word ``j``). For 2, 4 and 8 bits no code
  straddles a word; for 3 bits every 32 input rows fill exactly 3 words and codes 10 and
  21 of each run straddle. This is ``qcompile.kernels.packing``'s row layout, so
  ``qweight`` is lowbit's ``packed`` transposed (``K`` is a multiple of 32 since ``G``
  is);
* ``qzeros`` int32 ``[K / G, N * b / 32]``: per group, the zero points of the N outputs
  packed the same way along N. ``gptq_v2`` stores ``z`` itself (``gptq`` v1 stores
  ``z - 1``, which cannot hold the asymmetric zero point 0);
* ``scales`` fp16 ``[K / G, N]``, ``g_idx`` int32 ``[K]`` (``k // G``: lowbit keeps
  groups contiguous in the original channel order, so ``desc_act`` is false), ``bias``
  when the layer has one. Every other parameter (and persistent buffer) is written in
  fp16.

``quantization_config``: ``quant_method`` "gptq", ``bits`` / ``group_size`` of the most
common recipe, ``sym`` false, ``desc_act`` false, ``lm_head`` whether the output layer is
quantized. Layers quantized with other bits or group size (``overrides``) get a
GPTQModel ``dynamic`` rule ``"+:^<module>$": {"bits", "group_size"}``, and linear layers
left in full precision a ``"-:^<module>$": {}`` rule (GPTQModel and vLLM read these).

Tied embeddings: a table the embedding reads through lowbit's codes (a tied ``lm_head``
lowbit quantized, by default at 8 bits) is written once, as its dequantized values in
fp16, and stays tied (the output layer is not a GPTQ layer). A tied weight lowbit kept in
full precision for the embedding but quantized for ``lm_head`` is untied: the embedding
in fp16, ``lm_head`` a GPTQ layer, ``tie_word_embeddings`` false.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from fnmatch import fnmatch
from math import gcd
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import serialize
from .export import Quantized, Saved, has_tokenizer, module_of
from .kernels.packing import pack
from .recipes import RECIPES

NOT_COPIED = {
    serialize.WEIGHTS_NAME,
    serialize.FOLDER_CONFIG,
    "config.json",
    "quantize_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# what is taken from the original model's folder when the saved one has no tokenizer
TOKENIZER_PATTERNS = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "chat_template*", "*.tiktoken")  # fmt: skip


def write_gptq(saved: Saved, out: Path, *, tokenizer=None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Quantized] = {}  # module -> products
    untie = False
    tied = bool(saved.config.get("tie_word_embeddings", False))
    for w in saved.weights:
        if w.kind == "buffer" and not w.persistent:
            continue
        if w.quant is None:
            for alias in _written_aliases(w.aliases, tied):
                tensors[alias] = _fp16(alias, w.fp)
        elif w.embedding_reads_codes:
            table = w.quant.dequantized_param()
            for alias in _written_aliases([a for a in w.aliases if a not in w.sites], tied):
                tensors[alias] = _fp16(alias, table)
        else:
            for site in w.sites:
                layers[module_of(site)] = w.quant
            plain = [a for a in w.aliases if a not in w.sites]
            if plain and w.fp is not None:
                untie = True  # the embedding reads the fp table, lm_head the codes
                for alias in plain:
                    tensors[alias] = _fp16(alias, w.fp)
    not_weight_only = sorted({q.scheme for q in layers.values() if not q.recipe.weight_only})
    if not_weight_only:
        exportable = ", ".join(n for n, r in RECIPES.items() if r.weight_only)
        raise ValueError(
            f"lowbit.export: format='gptq' holds weight-only recipes only ({exportable}); this "
            f"model has {', '.join(not_weight_only)}"
        )
    if not layers:
        raise ValueError("lowbit.export: the saved model has no quantized linear layer to export")
    for module, q in layers.items():
        tensors.update(gptq_tensors(module, q))

    config = dict(saved.config)
    config["quantization_config"] = quantization_config(saved, layers)
    if not config.get("architectures"):
        config["architectures"] = [saved.model_class]
    if untie:
        config["tie_word_embeddings"] = False
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"

    side = saved.folder
    if tokenizer is not None:
        side = Path(tokenizer)
        if not side.is_dir() or not has_tokenizer(side):
            raise ValueError(
                f"lowbit.export: tokenizer={os.fspath(tokenizer)!r} is not a folder with "
                "tokenizer files (format='gptq' copies them)"
            )
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(side, out)
    if tokenizer is None and saved.folder is not None and not has_tokenizer(saved.folder):
        source = saved.tokenizer_folder()
        if source is not None:  # the original model's tokenizer (lowbit_config.json source)
            _copy_side_files(source, out, only=TOKENIZER_PATTERNS)
    tmp = out / f"model.safetensors.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
    finally:
        if tmp.exists():
            tmp.unlink()
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "quantize_config.json").write_text(
        json.dumps(config["quantization_config"], indent=2, sort_keys=True) + "\n"
    )


def gptq_tensors(module: str, q: Quantized) -> dict[str, torch.Tensor]:
    """``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` of one weight-only layer."""
    n, k = q.shape
    bits, group = q.bits, q.group_size
    if (n * bits) % 32:
        raise ValueError(
            f"lowbit.export: {module} has {n} outputs; GPTQ packs {bits}-bit zero points along "
            f"the outputs into whole int32 words, which needs a multiple of "
            f"{32 // gcd(32, bits)}"
        )
    packed = q.products["packed"]
    if packed.shape != (n, k * bits // 32):  # pragma: no cover - serialize checks the shapes
        raise ValueError(f"lowbit.export: the packed codes of {module} are {tuple(packed.shape)}")
    zeros = q.products["zeros"].double()
    z = zeros.round()
    if not torch.equal(z, zeros) or bool(((z < 0) | (z >= 1 << bits)).any()):
        raise ValueError(f"lowbit.export: the zero points of {module} are not {bits}-bit integers")
    return {
        f"{module}.qweight": packed.t().contiguous(),
        f"{module}.qzeros": pack(z.t().to(torch.uint8).contiguous(), bits),
        f"{module}.scales": _fp16(f"{module}.scales", q.products["scales"].t()),
        f"{module}.g_idx": torch.arange(k, dtype=torch.int32) // group,
    }


def quantization_config(saved: Saved, layers: dict[str, Quantized]) -> dict:
    shapes = Counter((q.bits, q.group_size) for q in layers.values())
    bits, group = shapes.most_common(1)[0][0]
    dynamic = {
        f"+:^{re.escape(m)}$": {"bits": q.bits, "group_size": q.group_size}
        for m, q in sorted(layers.items())
        if (q.bits, q.group_size) != (bits, group)
    }
    lm_head = any(m.rpartition(".")[2] == "lm_head" for m in layers)
    for m in sorted(_linear_modules(saved) - set(layers)):
        if m.rpartition(".")[2] != "lm_head":
            dynamic[f"-:^{re.escape(m)}$"] = {}
    methods = Counter(str(q.meta.get("method")) for q in layers.values())
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2",
        "bits": bits,
        "group_size": group,
        "desc_act": False,
        "sym": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": lm_head,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"lowbit:{_version()}"],
            "lowbit_recipes": sorted({q.scheme for q in layers.values()}),
            "lowbit_methods": dict(sorted(methods.items())),
        },
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def _linear_modules(saved: Saved) -> set[str]:
    """Names of the model's linear modules (built on the meta device from its config)."""
    import transformers

    from .matmul_modules import is_matmul_module

    cls = getattr(transformers, saved.model_class, None)
    if cls is None or "model_type" not in saved.config:
        raise ValueError(
            f"lowbit.export: {saved.model_class} is not a transformers class (GPTQ engines "
            "build the model from its config)"
        )
    cfg = {k: v for k, v in saved.config.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = cls(config)
    return {name for name, mod in model.named_modules() if is_matmul_module(mod)}


def _written_aliases(aliases: list[str], tied: bool) -> list[str]:
    """A tied table once (under its first name, the embedding's); otherwise every name."""
    return aliases[:1] if tied and len(aliases) > 1 else aliases


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t.contiguous()
    h = t.detach().to(torch.float16).contiguous()
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"lowbit.export: {name} does not fit in fp16 (values beyond 65504)")
    return h


def _copy_side_files(src: Path | None, out: Path, only: tuple[str, ...] = ("*",)) -> None:
    """The tokenizer, generation config and other non-weight files of ``src``."""
    if src is None or not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and f.name not in NOT_COPIED
            and not f.name.endswith(WEIGHT_SUFFIXES)
            and any(fnmatch(f.name, p) for p in only)
        ):
            shutil.copyfile(f, out / f.name)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "unknown"
