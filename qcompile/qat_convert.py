"""Trained weights into lowbit's inference products.

A fake-quantized linear (``qcompile.qat``) is committed as a plain ``nn.Linear`` whose
weight is its fake-quantized value, with the packed codes, step sizes and zero points
stored in ``qcompile.artifacts``, pinned, under the key a ``w{b}a16-g{G}`` compile looks
up. Invariant: ``torch.compile(model, backend="lowbit", options={"recipe": R})`` then
uses exactly those products (no calibration, nothing recomputed), so the compiled model
computes what the trained model computes; ``save`` / ``load`` and ``free_weights`` treat
them as any stored product. Their ``meta["method"]`` (``block-ap``,
``block-ap+e2e-qp``) is what the report's method column shows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from qcompile import artifacts
from qcompile.kernels.packing import pack, packed_bits_per_weight
from qcompile.kernels.reference import sqnr_db
from qcompile.kernels.weight_only_reference import dequantize_groupwise, on_fp16_grid
from qcompile.lowering import derived
from qcompile.products import WeightOnlySite
from qcompile.qat import GroupwiseFakeQuant, trained_codes
from qcompile.recipes import get_recipe

QAT_META = "qat"  # meta entry marking products trained by lowbit's training mode


def commit_linear(
    mod: nn.Linear, name: str, recipe: str, method: str, *, reference: torch.Tensor | None = None
) -> artifacts.Artifact:
    """Replace ``mod``'s fake-quantization parametrization by its result: the weight (the
    same ``Parameter``) becomes the fake-quantized weight and the products are stored.
    ``reference``: the weight before training, for the report's SQNR."""
    fq = mod.parametrizations.weight[0]
    if not isinstance(fq, GroupwiseFakeQuant):
        raise TypeError(f"{name} is not fake-quantized by qcompile.qat")
    latent = mod.parametrizations.weight.original.detach()
    q, scales, zeros = trained_codes(latent, fq.scale, fq.zero, fq.bits, fq.group_size)
    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    return store_trained(mod, name, recipe, method, q, scales, zeros, reference=reference)


def snap_scales(block: nn.Module) -> None:
    """Round every fake-quantized linear's step sizes in ``block`` onto fp16's grid in
    place (as :func:`store_trained` will), so that committing then changes no output."""
    with torch.no_grad():
        for m in block.modules():
            if parametrize.is_parametrized(m, "weight"):
                fq = m.parametrizations.weight[0]
                if isinstance(fq, GroupwiseFakeQuant):
                    fq.scale.copy_(on_fp16_grid(fq.scale))


def store_trained(mod, name, recipe, method, q, scales, zeros, *, reference=None):
    """Set ``mod.weight`` to ``(q - zeros) * scales`` and pin the products under it. The
    scales are first rounded onto fp16's grid, where RTN's are: the CPU kernels then hold
    them exactly in fp16, and the fp32 copies are dropped with the fp weight."""
    r = get_recipe(recipe)
    scales = on_fp16_grid(scales)
    bits, group = r.weight_bits, r.group_size
    param = mod.weight
    with torch.no_grad():
        param.data = dequantize_groupwise(q, scales, zeros, group, dtype=scales.dtype)
    meta = {
        "bits": bits,
        "group_size": group,
        "method": method,
        "weight_sqnr_db": sqnr_db(reference, param.detach()) if reference is not None else None,
        "bits_per_weight": packed_bits_per_weight(bits, group, scales.element_size()),
        QAT_META: {"recipe": recipe},
    }
    key = artifacts.weight_only_key(recipe, param, scales.dtype)
    products = WeightOnlySite(pack(q, bits), scales.detach(), zeros.detach())
    art = artifacts.store_for(param, key, f"{name}.weight", products, meta)
    art.pinned = True
    return art


def trained_artifact(mod: nn.Module) -> artifacts.Artifact | None:
    """The products lowbit's training mode stored for ``mod``'s weight, if any."""
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return None
    found = [a for a in artifacts.artifacts_of(weight) if QAT_META in a.meta]
    return found[-1] if found else None


def copy_trained(model: nn.Module) -> nn.Module:
    """A deep copy of a trained model whose copied weights keep the trained products
    (``copy.deepcopy`` alone copies the weights but not what lowbit stored for them, so
    a compile of the copy would round the trained weights to nearest again)."""
    clone = copy.deepcopy(model)
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, param in clone.named_parameters(remove_duplicate=False):
        for art in artifacts.artifacts_of(originals[name]):
            if QAT_META not in art.meta:
                continue
            twin = artifacts.Artifact(
                dict(art.key),
                dict(derived.products(art)),
                dict(art.meta),
                fingerprint=artifacts.fingerprint(param),
                pinned=True,
            )
            artifacts.register(param, twin)
    return clone
