"""Layouts the lowering derives from stored products (the CPU prepack of weight-only
sites), cached per registry entry (``qcompile.artifacts.Artifact``).

Invariant: an entry's ``tensors`` plus what ``restore`` recreates are always its full
products (``products``); the layouts here live as long as their entry (weakly keyed),
are shared by every graph of the weight and are never saved; ``compact`` drops from
``tensors`` only what a cached layout holds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from qcompile import artifacts
from qcompile.context import PassContext
from qcompile.graph_utils import SITE, add_constant, drop_constant
from qcompile.kernels import cpu_weight_only
from qcompile.kernels.cpu_weight_only import prepack_cpu
from qcompile.kernels.packing import pack, unpack


@dataclass
class Derived:
    """What the lowering derived from one entry's products."""

    # (target, bits, group, activation dtype) -> {name: tensor} (and helper tables)
    layouts: dict = field(default_factory=dict)
    # the layout that holds some generic products exactly: (recreate, its arguments)
    exact: tuple | None = None
    compacted: bool = False  # the entry's ``tensors`` lacks what ``restore`` returns


_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # Artifact -> Derived


def of(art: artifacts.Artifact) -> Derived:
    d = _CACHE.get(art)
    if d is None:
        d = _CACHE[art] = Derived()
    return d


def layouts(art: artifacts.Artifact) -> dict:
    """The layouts derived from ``art`` (``{}`` when none)."""
    d = _CACHE.get(art)
    return d.layouts if d is not None else {}


def is_compacted(art: artifacts.Artifact) -> bool:
    d = _CACHE.get(art)
    return d is not None and d.compacted


def forget(art: artifacts.Artifact) -> None:
    """Drop what was derived from ``art`` (its ``tensors`` must be complete again)."""
    _CACHE.pop(art, None)


def restore(art: artifacts.Artifact) -> dict[str, torch.Tensor]:
    """The generic products the cached exact layout of ``art`` holds, recreated ({} when
    there is none)."""
    d = _CACHE.get(art)
    if d is None or d.exact is None:
        return {}
    fn, args = d.exact
    return fn(*args)


def products(art: artifacts.Artifact) -> dict[str, torch.Tensor]:
    """Every product of ``art``; those ``compact`` dropped are recreated (a transient
    copy)."""
    return {**art.tensors, **restore(art)} if is_compacted(art) else art.tensors


def compact(art: artifacts.Artifact) -> int:
    """Drop the products ``restore`` can recreate (the generic packed codes, once the CPU
    int4 layout holds them); returns the bytes dropped."""
    d = _CACHE.get(art)
    if d is None or d.exact is None or d.compacted:
        return 0
    dropped = restore(art).keys()
    size = sum(artifacts.nbytes(art.tensors[k]) for k in dropped if k in art.tensors)
    for k in dropped:
        art.tensors.pop(k, None)
    d.compacted = True
    return size


# the CPU weight-only prepack ------------------------------------------------------------


def _packed_from_cpu(w4, shift, bits: int, group: int) -> dict[str, torch.Tensor]:
    return {"packed": pack(cpu_weight_only.restore_codes(w4, shift, group), bits)}


def _packed_from_cpu8(w4_hi, w4_lo, n: int, k: int) -> dict[str, torch.Tensor]:
    return {"packed": pack(cpu_weight_only.restore_codes8(w4_hi, w4_lo, n, k), 8)}


def _group_params(scales16, zeros8, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"scales": scales16.to(dtype), "zeros": zeros8.to(dtype)}


def lower_dequant_linear_cpu(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    """Prepack a weight-only site for ``cpu_weight_only.dequant_linear_cpu``.

    Once per weight (cached for its stored products here, so every graph of the model
    shares one copy): the packed codes themselves with fp16 scales and uint8 zero points
    (``cpu_packed``), or, where those kernels cannot take the weight, the codes re-laid
    out for oneDNN's int4 kernel. What the CPU layout holds exactly may be dropped from
    the stored products when the fp weight is released (``compact``); the generic
    constants leave the graph when nothing else reads them.
    """
    x, packed, scales, zeros, bias, bits, group = node.args
    tensors = {n: getattr(gm, n.target) for n in (packed, scales, zeros)}
    k = x.meta["example_value"].shape[-1] if "example_value" in x.meta else None
    n_out = tensors[scales].shape[0]
    k = k or tensors[scales].shape[1] * group
    out_val = node.meta.get("example_value")
    act_dtype = out_val.dtype if out_val is not None else tensors[scales].dtype
    site = ctx.site_of(node)
    art = artifacts.holding(site.weight, tensors[scales]) if site is not None else None
    cache_key = ("cpu", bits, group, str(act_dtype))
    prepacked = layouts(art).get(cache_key) if art is not None else None
    if prepacked is None:  # once per weight: prefill and decode graphs share the layout
        codes = unpack(tensors[packed], bits, k)
        prepacked = prepack_cpu(
            codes, tensors[scales], tensors[zeros], bits, group, act_dtype, packed=tensors[packed]
        )
        if art is not None:
            d = of(art)
            d.layouts[cache_key] = prepacked
            if "packed" in prepacked and d.exact is None:
                s16, z8 = prepacked["scales16"], prepacked["zeros8"]
                s, z = art.tensors.get("scales"), art.tensors.get("zeros")
                if s is not None and z is not None and torch.equal(s16.to(s.dtype), s):
                    if torch.equal(z8.to(z.dtype), z) and s.dtype == z.dtype:
                        d.exact = (_group_params, (s16, z8, s.dtype))
            elif "w4" in prepacked and "codes" not in prepacked and d.exact is None:
                # the layout holds the codes exactly: the generic packed copy can be
                # dropped when the fp weight is released (compact)
                shift = cpu_weight_only.group_shift(prepacked["w4"], codes, group)
                d.layouts[("cpu-shift", *cache_key)] = {"shift": shift}
                d.exact = (_packed_from_cpu, (prepacked["w4"], shift, bits, group))
            elif "w4_hi" in prepacked and "codes" not in prepacked and d.exact is None:
                hi, lo = prepacked["w4_hi"], prepacked["w4_lo"]
                d.exact = (_packed_from_cpu8, (hi, lo, n_out, k))
    site = node.meta.get(SITE, f"site{n_out}")
    args = {
        name: add_constant(gm, f"lowbit_{site}_cpu_{name}", t, node)
        for name, t in prepacked.items()
    }
    node.target = cpu_weight_only.dequant_linear_cpu
    node.args = (x, args, bits, group, bias)
    for old in (packed, scales, zeros):
        if not old.users:
            drop_constant(gm, old)
