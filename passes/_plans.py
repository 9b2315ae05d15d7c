"""Transform plans' reuse (not a pass): what smooth / rotate / quantize_lowbit may reuse.

The ``low-bit`` recipes with a transform fold exact transforms into weights, so a
site's products depend on more than its own weight. Per input group ``g``
(``fusion_analysis.InputGroup``) and the groups ``h`` folding into a producer's output
rows (``1 / s`` on up_proj; ``P0`` on gate/up_proj):

* the plan of ``g`` (smoothing scales, the online ``block_rotate`` operands, ``P0``)
  depends on the calibration, every member's weight, the options, the group's shape;
* a member's folded weight, hence its products, on its weight and the plans of ``g``
  and of every ``h``; a folded RMSNorm weight on the norm and the plan of ``g``.

Invariant: :func:`resolve` decides before anything is computed, and a group is reused
whole or recomputed whole (storing and applying: ``passes/_plan_store.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from qcompile import artifacts
from qcompile.context import LinearSite, PassContext
from qcompile.graph_utils import INPUT_GROUP
from qcompile.matmul_modules import OUT_IN
from qcompile.products import NO_GROUP
from qcompile.recipes import LOW_BIT, get_recipe

log = logging.getLogger("qcompile")

# ONLINE_ROLES: block_rotate's operands, in order; NO_GROUP: a row_plans / folded key entry
# for "the site reads an untransformed input" (both: qcompile.products)


@dataclass
class PlanState:
    """The transform passes' reuse decisions for one graph (``ctx.plans``)."""

    groups: list = field(default_factory=list)
    consumers: dict[int, list] = field(default_factory=dict)  # id(site) -> groups into its rows
    folded: dict[int, artifacts.Artifact] = field(default_factory=dict)  # id(site) -> stored
    reused: int = 0  # groups whose stored plan is used


def holds_plan(site: LinearSite) -> bool:
    """A low-bit quantized site whose products are tracked (it stores its group's plan)."""
    return (
        site.skip_reason is None
        and get_recipe(site.scheme).family == LOW_BIT
        and isinstance(site.param, torch.nn.Parameter)
    )


def involved(ctx: PassContext, site: LinearSite) -> bool:
    """Whether a transform folds into ``site``'s weight (input group member or producer)."""
    state = ctx.plans
    if state is None:
        return False
    return id(site) in state.consumers or site.node.meta.get(INPUT_GROUP) is not None


# keys ---------------------------------------------------------------------------------


def act_dtype(g) -> torch.dtype:
    val = g.input.meta.get("example_value")
    return val.dtype if isinstance(val, torch.Tensor) else g.sites[0].param.dtype


def _smooth_into(g) -> str:
    return g.scale_into[0] if g.scale_into is not None else "online"


def plan_key(g, ctx: PassContext, site: LinearSite) -> dict:
    """What the plan of ``g`` depends on besides the calibration and member weights."""
    key: dict[str, Any] = {
        "kind": "plan",
        "scheme": site.scheme,
        "weight_shape": list(site.param.shape),
        "weight_dtype": artifacts.dtype_name(site.param.dtype),
        "transform": g.transform,
        "act_dtype": artifacts.dtype_name(act_dtype(g)),
        "act_bits": g.act_bits,
        "in_features": g.in_features,
        "members": sorted(s.fqn for s in g.sites),
        "smooth_into": _smooth_into(g),
        "perm_into": sorted(s.fqn for s in g.perm_into or []),
    }
    if g.transform == "duquant":
        key["duquant"] = dict(sorted(ctx.options.duquant.items()))
    return artifacts.with_layout(key, site.layout, site.expert)


def folded_key(
    param: torch.Tensor,
    of: str,
    plans: list,
    dtype: torch.dtype,
    layout: str = OUT_IN,
    expert: int | None = None,
) -> dict:
    key = {
        "kind": "folded",
        "of": of,
        "plans": list(plans),
        "weight_shape": list(param.shape),
        "weight_dtype": artifacts.dtype_name(param.dtype),
        "value_dtype": artifacts.dtype_name(dtype),
    }
    return artifacts.with_layout(key, layout, expert)


def plan_deps(g, ctx: PassContext) -> tuple:
    """The calibration-dependent inputs of a plan: its ``SiteStats`` (with a sample) and
    every member weight; a sample recorded from example inputs never matches again."""
    stats = next((ctx.stats[s.fqn] for s in g.sites if s.fqn in ctx.stats), None)
    if stats is None or stats.sample is None or stats.sample.shape[0] == 0:
        return (object(),)
    return (stats, tuple(artifacts.fingerprint(s.param) for s in g.sites))


def row_plan_ids(ctx: PassContext, site: LinearSite) -> list | None:
    """Plan ids of the groups folding into ``site``'s output rows (None: one is not known)."""
    ids = [h.plan_id for h in ctx.plans.consumers.get(id(site), [])] if ctx.plans else []
    return None if any(i is None for i in ids) else ids


def own_plan_id(site: LinearSite):
    g = site.node.meta.get(INPUT_GROUP)
    return NO_GROUP if g is None else g.plan_id


# resolve (fusion_analysis) ------------------------------------------------------------


def resolve(ctx: PassContext, groups: list) -> PlanState:
    """Decide, per group (consumers first), whether its stored plan and products are used.

    * *must* reuse: a member's weight was released, or its products are pinned
      (loaded): the stored plan is used and every member's stored products must match
      it (their ``plan`` and ``row_plans`` ids); else ``ValueError`` (nothing is
      computed from a released weight, and no calibration is needed);
    * *may* reuse (all weights present, ``verify`` off): the stored plan of every
      low-bit member, built from the same ``SiteStats`` (with a sample) and the same
      member weights, with every member's products matching it; else everything in the
      group is recomputed (deterministically: the same inputs give the same plan).

    A reused group's members keep their weights (``site.keep_weight``: smooth / rotate
    fold nothing into them) and ``quantize_lowbit`` takes their stored products. A
    producer whose products no longer match is recomputed: output-row folds need only
    the stored ``s`` and ``P0`` (float64 / int64), which the plan keeps; biases folded
    into output rows are recomputed from the bias parameter (never released) with the
    same float64 operations. A linear of another recipe that a plan folds into stores
    its folded weight (``"folded"``), and its own pass quantizes that again.
    """
    state = PlanState(groups=list(groups))
    ctx.plans = state
    for h in groups:
        targets = list(h.perm_into or [])
        if h.scale_into is not None and h.scale_into[0] == "rows":
            targets.append(h.scale_into[1])
        for s in {id(t): t for t in targets}.values():
            state.consumers.setdefault(id(s), []).append(h)
    for g in reversed(groups):  # consumers (later in the graph) first
        _decide_group(g, ctx, state)
    members = {id(s) for g in groups for s in g.sites}
    for site in ctx.sites:
        if not holds_plan(site) and (id(site) in members or id(site) in state.consumers):
            site.artifact = None  # its products (int8, weight-only) depend on the folds
        if id(site) in state.consumers and id(site) not in members:
            _decide_producer(site, ctx, state)
    if state.reused:
        log.info("lowbit: reusing %d stored transform plan(s)", state.reused)
    return state


def _decide_group(g, ctx: PassContext, state: PlanState) -> None:
    holders = [s for s in g.sites if holds_plan(s)]
    must = any(artifacts.is_freed(s.param) for s in g.sites) or any(
        s.artifact is not None for s in holders
    )
    if not holders or (not must and ctx.options.verify):
        return  # computed (verify checks the passes themselves)
    found = [(s, artifacts.find(s.param, plan_key(g, ctx, s))) for s in holders]
    if must:
        pool = [
            a
            for s, a in found
            if a is not None and (a.pinned or artifacts.is_freed(s.param) or s.artifact is not None)
        ]
        if len({a.meta["id"] for a in pool}) != 1:
            raise ValueError(_plan_message(g, ctx, found, pool))
    else:
        pool = [a for _, a in found]
        if any(a is None for a in pool) or len({a.meta["id"] for a in pool}) != 1:
            return
        deps = plan_deps(g, ctx)
        if not all(artifacts._same_deps(a.deps, deps) for a in pool):
            return
    plan_id = pool[0].meta["id"]
    chosen, bad = {}, []
    for s in g.sites:
        art = _member_products(s, ctx, plan_id)
        if art is None:
            bad.append(s)
        else:
            chosen[id(s)] = art
    if bad:
        if must:
            raise ValueError(
                f"lowbit: the transform of the input of {_names(g.sites)} is stored (the "
                f"weights were released, or loaded by qcompile.load), but the stored products "
                f"of {_names(bad)} do not match it (other recipe, options or model structure) "
                "and cannot be recomputed without the full-precision weights and a "
                "calibration; compile with the recipe and options they were quantized with, "
                "or load the full-precision weights again"
            )
        return
    g.stored, g.plan_id = pool[0], plan_id
    for s, a in found:
        if a is not None and a.meta["id"] == plan_id:
            a.touch(s.fqn)
    for s in g.sites:
        _keep(s, chosen[id(s)], state)
    state.reused += 1


def _member_products(s: LinearSite, ctx: PassContext, plan_id: str):
    rows = row_plan_ids(ctx, s)
    if rows is None:
        return None
    if holds_plan(s):
        art = s.artifact or artifacts.find(s.param, artifacts.site_key(s, ctx))
        ok = (
            art is not None
            and (artifacts.is_freed(s.param) or art.fingerprint == artifacts.fingerprint(s.param))
            and art.meta.get("plan") == plan_id
            and art.meta.get("row_plans", []) == rows
        )
        return art if ok else None
    if artifacts.is_freed(s.param):
        return None
    art = artifacts.find(
        s.param, folded_key(s.param, "weight", [plan_id, *rows], s.param.dtype, s.layout, s.expert)
    )
    return art if art is not None and art.fingerprint == artifacts.fingerprint(s.param) else None


def _decide_producer(site: LinearSite, ctx: PassContext, state: PlanState) -> None:
    """A site outside every group whose output rows a group folds into."""
    rows = row_plan_ids(ctx, site)
    freed = artifacts.is_freed(site.param)
    if holds_plan(site):
        art = site.artifact or artifacts.find(site.param, artifacts.site_key(site, ctx))
        ok = (
            rows is not None
            and art is not None
            and (freed or art.fingerprint == artifacts.fingerprint(site.param))
            and art.meta.get("plan") in (None, NO_GROUP)
            and art.meta.get("row_plans", []) == rows
        )
        if ok:
            _keep(site, art, state)
        elif freed or site.artifact is not None:
            raise ValueError(
                f"lowbit: the stored products of {site.fqn} (its weight was released or "
                "loaded) were built with other transforms of the layers it feeds; compile "
                "with the recipe and options it was quantized with, or load the "
                "full-precision weights again"
            )
        else:
            site.artifact = None
        return
    if rows is None or freed:
        return
    art = artifacts.find(
        site.param,
        folded_key(
            site.param, "weight", [NO_GROUP, *rows], site.param.dtype, site.layout, site.expert
        ),
    )
    if art is not None and art.fingerprint == artifacts.fingerprint(site.param):
        _keep(site, art, state)


def _keep(site: LinearSite, art, state: PlanState) -> None:
    site.keep_weight = True
    art.touch(site.fqn)  # in use: qcompile.save writes the most recently used products
    if holds_plan(site):
        site.artifact = art
    else:
        state.folded[id(site)] = art


def _names(sites) -> str:
    names = [s.fqn for s in sites]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _plan_message(g, ctx, found, pool) -> str:
    if pool:
        return (
            f"lowbit: the stored transforms of the input of {_names(g.sites)} disagree "
            f"(plans {sorted({a.meta['id'] for a in pool})}); they were quantized by different "
            "compiles: load the full-precision weights again, or load one saved model"
        )
    site = next((s for s, _ in found if artifacts.is_freed(s.param)), found[0][0])
    stored = [a.key for a in artifacts.artifacts_of(site.param) if a.kind == "plan"]
    return (
        f"lowbit: the full-precision weight of {site.fqn} was released (free_weights or "
        f"qcompile.load) and no stored transform plan matches this compile "
        f"({plan_key(g, ctx, site)}); stored: {stored or 'none'}. Compile with the recipe "
        "and options it was quantized with, or load the full-precision weights again"
    )


# smooth -------------------------------------------------------------------------------
