"""Process-wide registry of what lowbit computed for each weight, and its reuse rules.

Invariant: an entry (:class:`Artifact`) lives exactly as long as the ``nn.Parameter``
it is keyed by (weakly), holds its products as the ``dict[str, Tensor]`` of one
``qcompile.products`` layout, and is reused only under the rules of ``lookup`` below.
Releasing weights and the memory figures: ``qcompile.release``; layouts a lowering
derives from an entry: ``qcompile.lowering.derived``.

The quantizing passes (``split_mixed_mm``, ``quantize_weights``,
``quantize_weight_only``, ``quantize_lowbit``) and the transform passes
(``fusion_analysis``, ``smooth``, ``rotate``; ``passes/_plans.py``) store their
products here. Each :class:`Artifact` has a kind (``key["kind"]``), whose tensors
``qcompile.products`` lays out:

* ``"site"`` (the default; under a linear's weight): what replaces the weight in the
  graph (``Int8Site``, ``WeightOnlySite`` or ``LowBitSite``, by recipe);
* ``"plan"`` (under the weight of every quantized linear of one input group): the
  group's transform (``TransformPlan``); ``meta``: its id (a digest), members, fusion
  decisions, block size, notes;
* ``"folded"`` (under any other parameter a plan folds into): the constant that
  replaces it in the graph (``FoldedCopy``); ``key["plans"]`` names the plans it was
  folded with.

``key``: what the products depend on besides the parameter (``site_key``); ``meta``:
how they were made (outlier channels, bits, group size, method, SQNR, transforms). The
graphs' buffers share the tensors' storage, so prefill and decode graphs hold one copy.
"""

from __future__ import annotations

import itertools
import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import products as _products
from .matmul_modules import IN_OUT, OUT_IN
from .products import dtype_name
from .recipes import LOW_BIT, get_recipe

# Parameter -> {canonical key json -> Artifact}
REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
MAX_UNPINNED_PER_WEIGHT = 8  # older unpinned products of a weight are dropped
_clock = itertools.count(1)


@dataclass
class Artifact:
    key: dict
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    deps: Any = None  # calibration-dependent inputs (outlier list, or a weakref to SiteStats)
    fingerprint: tuple | None = None  # of the weight the products were computed from
    pinned: bool = False
    sites: dict[str, int] = field(default_factory=dict)  # site fqn -> last use (clock)
    released: bool = False  # its weight was replaced by a placeholder (free_weights, load)
    fp_needed: bool = False  # a graph still reads the fp weight besides the quantized site
    # layouts a lowering derives from ``tensors``: ``qcompile.lowering.derived`` (weakly
    # keyed by the Artifact, never saved)

    @property
    def kind(self) -> str:
        """``"site"`` (replaces a linear's weight), ``"plan"`` or ``"folded"``."""
        return self.key.get("kind", "site")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def touch(self, fqn: str) -> None:
        self.sites[fqn] = next(_clock)


# placeholders -------------------------------------------------------------------


def placeholder(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A tensor of ``shape`` that holds one element of memory (all strides 0)."""
    return torch.zeros((), dtype=dtype, device=device).expand(tuple(shape))


def is_freed(t: torch.Tensor) -> bool:
    """True when ``t`` (e.g. a parameter) holds less memory than its elements need."""
    if t.device.type == "meta" or t.numel() <= 1:
        return False
    return t.untyped_storage().nbytes() < t.numel() * t.element_size()


def fingerprint(t: torch.Tensor) -> tuple:
    return (
        t.data_ptr(),
        t._version,
        tuple(t.shape),
        tuple(t.stride()),
        str(t.dtype),
        str(t.device),
    )


# keys ---------------------------------------------------------------------------


def act_dtype(site) -> torch.dtype:
    out = site.node.meta.get("example_value")
    return out.dtype if isinstance(out, torch.Tensor) else site.weight.dtype


def site_key(site, ctx) -> dict:
    """What a site's products depend on besides the weight and the calibration: the
    recipe, the weight's shape and dtype, and per family the options that matter
    (outlier mode and threshold; scale dtype and GPTQ settings; the ``duquant``
    settings and the activation dtype)."""
    recipe = get_recipe(site.scheme)
    param = site.param if site.param is not None else site.weight
    layout, expert = getattr(site, "layout", OUT_IN), getattr(site, "expert", None)
    if recipe.weight_only:
        return weight_only_key(
            site.scheme, param, act_dtype(site), ctx.options.gptq, layout, expert
        )
    key: dict[str, Any] = {
        "scheme": site.scheme,
        "weight_shape": list(param.shape),
        "weight_dtype": dtype_name(param.dtype),
    }
    if recipe.mixed:
        key["outlier_mode"] = ctx.options.outlier_mode
        key["threshold"] = ctx.options.threshold
        key["outlier_ratio"] = ctx.options.outlier_ratio
    elif recipe.family == LOW_BIT and recipe.transform is not None:
        key["act_dtype"] = dtype_name(act_dtype(site))
        if recipe.transform == "duquant":
            key["duquant"] = dict(sorted(ctx.options.duquant.items()))
    return with_layout(key, layout, expert)


def with_layout(key: dict, layout: str, expert: int | None = None) -> dict:
    """``key`` naming the weight's layout when the parameter is stored ``[in, out]`` (its
    products are those of the ``[out, in]`` transpose), and the expert when the parameter
    holds one matrix per expert (``[E, ...]``); ``weight_shape`` stays the parameter's."""
    if layout != OUT_IN:
        key["layout"] = layout
    if expert is not None:
        key["expert"] = expert
    return key


def product_shape(key: dict) -> list[int]:
    """The ``[out, in]`` shape a site's products are built for."""
    shape = list(key["weight_shape"])
    if "expert" in key:
        shape = shape[1:]
    return shape[::-1] if key.get("layout") == IN_OUT else shape


def weight_only_key(
    scheme: str,
    param,
    scale_dtype: torch.dtype,
    gptq_options=None,
    layout: str = OUT_IN,
    expert: int | None = None,
) -> dict:
    """``site_key`` of a weight-only site (also built without a site: ``qcompile.qat``
    stores trained products under it)."""
    key: dict[str, Any] = {
        "scheme": scheme,
        "weight_shape": list(param.shape),
        "weight_dtype": dtype_name(param.dtype),
        "scale_dtype": dtype_name(scale_dtype),
    }
    if get_recipe(scheme).gptq:
        key["gptq"] = dict(sorted(gptq_options.items()))
    return with_layout(key, layout, expert)


def key_str(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


# lookup / store ---------------------------------------------------------------------


def _same_deps(stored, wanted) -> bool:
    """``stored`` (weak references to objects) describes ``wanted`` (the objects)."""
    if isinstance(stored, weakref.ref):
        return stored() is not None and stored() is wanted
    if isinstance(stored, tuple) and isinstance(wanted, tuple):
        return len(stored) == len(wanted) and all(map(_same_deps, stored, wanted))
    return stored == wanted


def freeze_deps(deps):
    """``deps`` as stored: ``SiteStats`` (and other objects) held by weak reference."""
    from .calibration import SiteStats

    if isinstance(deps, SiteStats):
        return weakref.ref(deps)
    if isinstance(deps, tuple):
        return tuple(freeze_deps(d) for d in deps)
    return deps


def tracked(site) -> bool:
    """Whether ``site``'s products are kept here: its weight is a model parameter, and
    either the products do not depend on a transform folded into it (the weight the
    passes quantize is the parameter itself) or ``quantize_lowbit`` records the plans
    they were built with (``passes/_plans.py``)."""
    param = site.param if getattr(site, "param", None) is not None else site.weight
    if not isinstance(param, torch.nn.Parameter):
        return False
    if get_recipe(site.scheme).family == LOW_BIT:
        return True
    unfolded = site.unfolded if hasattr(site, "unfolded") else site.weight is param
    return unfolded and not getattr(site, "transforms", None)


def lookup(site, ctx, deps: Any = None) -> Artifact | None:
    """The stored products for ``site`` under the current options, if they may be reused
    (the transform plans apply these rules per input group: ``passes/_plans.py``):

    * the weight was released (``free_weights`` or ``qcompile.load``: a zero-memory
      placeholder, see ``placeholder``): the products whose key matches are used, and
      nothing is computed from the placeholder; no match is a ``ValueError``;
    * the products are *pinned* (loaded from a file, or their weight is shared with a
      module that keeps it, e.g. a tied embedding) and the weight is unchanged since:
      they are used as they are (no calibration needed);
    * otherwise they are reused only while the weight is unchanged (same storage and
      version counter) and the calibration-dependent inputs match (the same outlier
      channels; for GPTQ the same ``SiteStats`` object; for a transform plan the same
      ``SiteStats`` and every member weight unchanged). Else the pass recomputes and
      replaces them.

    ``deps``: the calibration-dependent inputs the caller would compute from
    (ignored for released weights and pinned products). Raises ``ValueError`` when
    the site's weight was released and nothing stored matches.
    """
    w = site.param
    key = site_key(site, ctx)
    if not tracked(site):
        if is_freed(w):
            raise ValueError(missing_message(site, key))
        return None
    art = (REGISTRY.get(w) or {}).get(key_str(key))
    if is_freed(w):
        if art is None:
            raise ValueError(missing_message(site, key))
        art.touch(site.fqn)
        return art
    if art is None or art.fingerprint != fingerprint(w):
        return None
    if not art.pinned and not _same_deps(art.deps, deps):
        return None
    art.touch(site.fqn)
    return art


def pinned_for(site, ctx) -> Artifact | None:
    """Products ``site`` must use without calibrating (released weight, or loaded ones).

    Raises ``ValueError`` when the weight was released and no products match the
    site's recipe and options (including sites that would stay in full precision).
    """
    w = site.param
    if (
        not is_freed(w)
        and w.device.type != "meta"
        and any(a.released for a in artifacts_of(w))
        and not bool(w.detach().any())
    ):
        raise ValueError(
            f"lowbit: the released weight of {site.fqn} now holds zeros: it was materialized "
            "(e.g. by model.to(...) or .half()) after lowbit released it; move or cast the model "
            "before compiling, or qcompile.load(path, model, device=...)"
        )
    quantizes = site.skip_reason is None and get_recipe(site.scheme).quantize
    if not quantizes:
        if is_freed(w):
            raise ValueError(
                f"lowbit: the full-precision weight of {site.fqn} was released (free_weights or "
                f"qcompile.load), but this compile keeps the site in full precision "
                f"({site.skip_reason or 'recipe ' + repr(site.scheme)}); compile with the recipe "
                "it was quantized with, or load the full-precision weights again"
            )
        return None
    art = lookup(site, ctx, deps=_NO_DEPS)
    if art is not None and (art.pinned or is_freed(w)):
        return art
    return None


_NO_DEPS = object()  # never equal to stored deps: only pinned / freed products match


def missing_message(site, key: dict) -> str:
    stored = [a.key for a in (REGISTRY.get(site.param) or {}).values() if a.kind == "site"]
    return (
        f"lowbit: the full-precision weight of {site.fqn} was released (free_weights or "
        f"qcompile.load) and no stored quantization matches this compile ({key}); stored: "
        f"{stored or 'none'}. Compile with the recipe and options it was quantized with, or "
        "load the full-precision weights again"
    )


def store(site, ctx, tensors, meta: dict, deps: Any = None) -> Artifact | None:
    """Record ``site``'s freshly computed products (replacing stale ones for its key):
    ``tensors``, a ``qcompile.products`` layout (or its dict)."""
    if not tracked(site):
        return None
    return store_for(site.param, site_key(site, ctx), site.fqn, tensors, meta, deps)


def find(param: torch.Tensor, key: dict) -> Artifact | None:
    """The products stored under ``param`` for exactly ``key`` (no reuse rule applied)."""
    return (REGISTRY.get(param) or {}).get(key_str(key))


def store_for(
    param: torch.Tensor, key: dict, fqn: str, tensors, meta: dict, deps: Any = None
) -> Artifact:
    """Record products under ``param`` (any kind), used by ``fqn``: ``tensors``, a
    ``qcompile.products`` layout (or its dict)."""
    art = Artifact(
        key=dict(key),
        tensors={k: v.detach() for k, v in _products.as_tensors(tensors).items()},
        meta=dict(meta),
        deps=freeze_deps(deps),
        fingerprint=fingerprint(param),
    )
    art.touch(fqn)
    register(param, art)
    return art


def register(param: torch.Tensor, art: Artifact) -> None:
    arts = REGISTRY.get(param)
    if arts is None:
        arts = REGISTRY[param] = {}
    arts[key_str(art.key)] = art
    unpinned = sorted(
        (a for a in arts.values() if not a.pinned and a.key.get("expert") == art.key.get("expert")),
        key=lambda a: max(a.sites.values(), default=0),
    )  # per expert of a parameter that holds several
    for old in unpinned[:-MAX_UNPINNED_PER_WEIGHT]:
        del arts[key_str(old.key)]


def holding(param: torch.Tensor, tensor: torch.Tensor) -> Artifact | None:
    """The artifact of ``param`` one of whose tensors shares ``tensor``'s storage."""
    ptr = tensor.untyped_storage().data_ptr()
    for art in artifacts_of(param):
        if any(t.untyped_storage().data_ptr() == ptr for t in art.tensors.values()):
            return art
    return None


def artifacts_of(param: torch.Tensor) -> list[Artifact]:
    return list((REGISTRY.get(param) or {}).values())


def clear() -> None:
    """Forget every stored product (released weights can then not be compiled again)."""
    REGISTRY.clear()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
