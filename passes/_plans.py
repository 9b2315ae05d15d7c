"""Stored transform plans (not a pass): what smooth / rotate / quantize_lowbit reuse.

The DuQuant-family recipes (``artifacts.low_bit``) fold exact transforms into
weights, so a site's products depend on more than its own weight. What depends on
what, per input group ``g`` (``fusion_analysis.InputGroup``) and the groups ``h``
that fold into a producer's output rows (``rows``: ``1 / s`` on up_proj; ``P0`` on
gate/up_proj):

* the plan of ``g`` (smoothing scales ``s_g``, the online ``block_rotate`` operands,
  ``P0``): the calibration (its absmax and sample), every member's weight (``s_g``),
  the options, the group's structure;
* a member's folded weight, hence its low-bit products: its weight, the plan of ``g``
  and the plans of every ``h``; a folded RMSNorm weight: the norm and the plan of ``g``.

Everything is stored in ``qcompile.artifacts`` (``"plan"`` under every low-bit
member's weight, ``"site"`` with ``meta["plan"]`` / ``meta["row_plans"]`` naming the
plans by id, ``"folded"`` for norms and for linears that share a transformed input
without being low-bit quantized). :func:`resolve` decides in ``fusion_analysis``,
before anything is computed, per group (consumers first):

* *must* reuse: a member's weight was released, or its products are pinned (loaded):
  the stored plan is used and every member's stored products must match it (their
  ``plan`` and ``row_plans`` ids); else ``ValueError`` (nothing is computed from a
  released weight, and no calibration is needed);
* *may* reuse (all weights present, ``verify`` off): the stored plan of every low-bit
  member, built from the same ``SiteStats`` (with a sample) and the same member
  weights, with every member's products matching it; else everything in the group is
  recomputed (deterministically: the same inputs give the same plan).

A reused group's members keep their weights (``site.keep_weight``: smooth / rotate
fold nothing into them) and ``quantize_lowbit`` takes their stored ``w_q``/``w_scale``.
A producer whose products do not match any more is recomputed: output-row folds need
only the stored ``s`` and ``P0`` (float64 / int64), which the plan keeps. Biases folded
into output rows are recomputed from the bias parameter (never released; saved in
full precision) with the same float64 operations. A linear of another recipe (int8,
weight-only, fp) that a plan folds into stores its folded weight (``"folded"``), and
its own pass quantizes that again (so it needs statistics where its recipe does).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import LinearSite, PassContext, add_constant
from qcompile.matmul_modules import OUT_IN
from qcompile.recipes import get_recipe

log = logging.getLogger("qcompile")

ONLINE_ROLES = ("r1", "r1_tail", "perm", "r2", "r2_tail")  # block_rotate's operands, in order
NO_GROUP = "-"  # row_plans / folded keys: the site reads an untransformed input


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
        and artifacts.low_bit(get_recipe(site.scheme))
        and isinstance(site.param, torch.nn.Parameter)
    )


def involved(ctx: PassContext, site: LinearSite) -> bool:
    """Whether a transform folds into ``site``'s weight (input group member or producer)."""
    state = ctx.plans
    if state is None:
        return False
    return id(site) in state.consumers or site.node.meta.get("lowbit.input_group") is not None


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


def _own_plan_id(site: LinearSite):
    g = site.node.meta.get("lowbit.input_group")
    return NO_GROUP if g is None else g.plan_id


# resolve (fusion_analysis) ------------------------------------------------------------


def resolve(ctx: PassContext, groups: list) -> PlanState:
    """Decide, per group, whether its stored plan and products are used (see module doc)."""
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


def stored_smooth(g) -> torch.Tensor | None:
    return g.stored.tensors.get("smooth") if g.stored is not None else None


def folded_norm(g, param: torch.Tensor, fqn: str, s: torch.Tensor):
    """The norm weight ``param / s`` of a stored plan: stored, or recomputed from the norm
    (never released) and the stored float64 ``s``; None for a plan computed now."""
    if g.stored is None:
        return None
    key = folded_key(param, "norm", [g.plan_id], param.dtype)
    art = artifacts.find(param, key)
    if art is not None and art.fingerprint == artifacts.fingerprint(param):
        art.touch(fqn)
        return art.tensors["value"]
    value = (param.detach().to(torch.float64) / s).to(param.dtype)
    artifacts.store_for(param, key, fqn, {"value": value}, {"plan": g.plan_id})
    return value


# rotate -------------------------------------------------------------------------------


def stored_plan(g, plan_cls):
    """The stored plan of ``g`` as a ``rotate.Plan`` whose operands are the graph's (in the
    activation dtype, an online smoothing merged in), or None."""
    if g.stored is None:
        return None
    t = g.stored.tensors
    r2 = (t.get("r2"), t.get("r2_tail"))
    return plan_cls(
        r1=(t.get("r1"), t.get("r1_tail")),
        pre_perm=t.get("pre_perm"),
        perm=t.get("perm"),
        r2=r2 if any(x is not None for x in r2) else None,
        notes=list(g.stored.meta.get("notes", [])),
    )


def remember(gm: fx.GraphModule, ctx: PassContext, g, plan) -> None:
    """After rotate applied ``plan`` to ``g``: store a plan computed now (under every
    low-bit member's weight), or restore a stored one's report fields."""
    if g.stored is not None:
        meta = g.stored.meta
        for site in g.sites:
            site.transforms = list(meta.get("transforms", site.transforms))
            site.act_absmax_before = meta.get("act_absmax_before")
            site.act_absmax_after = meta.get("act_absmax_after")
        return
    holders = [s for s in g.sites if holds_plan(s)]
    if not holders:
        return
    tensors = {}
    for role, arg in zip(ONLINE_ROLES, g.input.args[1:]):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            tensors[role] = getattr(gm, arg.target)
    if plan.pre_perm is not None:
        tensors["pre_perm"] = plan.pre_perm.to(torch.int64)
    if g.smooth_scale is not None:
        tensors["smooth"] = g.smooth_scale.to(torch.float64)
    first = g.sites[0]
    meta = {
        "transform": g.transform,
        "members": [s.fqn for s in g.sites],
        "in_features": g.in_features,
        "block_size": _block_size(tensors),
        "notes": list(plan.notes),
        "transforms": list(first.transforms),
        "smooth_into": _describe_into(g, ctx),
        "perm_into": [s.fqn for s in g.perm_into or []],
        "online_reason": g.online_reason,
        "act_absmax_before": first.act_absmax_before,
        "act_absmax_after": first.act_absmax_after,
    }
    meta["id"] = plan_id(tensors, meta)
    g.plan_id = meta["id"]
    deps = plan_deps(g, ctx)
    for s in holders:
        artifacts.store_for(s.param, plan_key(g, ctx, s), s.fqn, tensors, meta, deps)
    if g.norm_fold is not None:  # the norm weight divided by s, as the graph reads it
        param, fqn, const = g.norm_fold
        key = folded_key(param, "norm", [g.plan_id], param.dtype)
        value = getattr(gm, const.target)
        artifacts.store_for(param, key, fqn, {"value": value}, {"plan": g.plan_id})


def _block_size(tensors: dict) -> int | None:
    r1 = tensors.get("r1")
    return int(r1.shape[1]) if r1 is not None else None


def _describe_into(g, ctx: PassContext) -> str:
    if g.scale_into is None:
        return "online"
    if g.scale_into[0] == "norm":
        if g.norm_fold is not None:
            return "norm:" + g.norm_fold[1]
        mul, i = g.scale_into[1], g.scale_into[2]
        return "norm:" + ctx.param_fqns.get(mul.args[i].name, mul.args[i].name)
    return "rows:" + g.scale_into[1].fqn


def plan_id(tensors: dict, meta: dict) -> str:
    """A digest of a plan's tensors and description (equal plans, equal ids)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for role in sorted(tensors):
        t = tensors[role].detach().cpu().contiguous()
        h.update(f"\0{role}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def finish_rotate(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Folded weights of the linears that are not low-bit quantized (an fp or int8 layer
    sharing a transformed input, a producer): install the stored ones, store new ones."""
    state = ctx.plans
    if state is None:
        return
    for site in ctx.sites:
        if holds_plan(site) or not involved(ctx, site) or site.skip_reason:
            continue
        art = state.folded.get(id(site))
        if art is not None:
            node = site.node
            value = art.tensors["weight"]
            const = add_constant(gm, f"lowbit_{site.fqn}_folded", value, node)
            node.args = (node.args[0], const, *node.args[2:])
            node.meta["lowbit.weight_node"] = const
            site.weight = getattr(gm, const.target)
            art.touch(site.fqn)
            continue
        if site.unfolded or not isinstance(site.param, torch.nn.Parameter):
            continue
        rows, own = row_plan_ids(ctx, site), _own_plan_id(site)
        if rows is None or own is None:
            continue
        key = folded_key(
            site.param, "weight", [own, *rows], site.weight.dtype, site.layout, site.expert
        )
        artifacts.store_for(site.param, key, site.fqn, {"weight": site.weight}, {})


# quantize_lowbit ------------------------------------------------------------------------


def site_products(site: LinearSite, ctx: PassContext):
    """The stored products ``quantize_lowbit`` uses for ``site``, or None (compute)."""
    if site.artifact is not None and involved(ctx, site):
        return site.artifact  # matched its plans in resolve
    if involved(ctx, site):
        return None
    art = site.artifact or artifacts.lookup(site, ctx)
    if art is not None and (
        art.meta.get("plan") not in (None, NO_GROUP) or art.meta.get("row_plans")
    ):
        if artifacts.is_freed(site.param) or site.artifact is not None:
            raise ValueError(
                f"lowbit: the stored products of {site.fqn} were built with transforms folded "
                "into it that this compile does not apply (other recipes for the layers "
                "around it); compile with the recipes and options it was quantized with"
            )
        return None
    return art


def store_site(site: LinearSite, ctx: PassContext, tensors: dict, meta: dict) -> None:
    if not artifacts.tracked(site):
        return
    rows = row_plan_ids(ctx, site)
    own = _own_plan_id(site)
    if rows is None or own is None:
        return  # a plan it depends on was not stored
    meta = {**meta, "plan": None if own == NO_GROUP else own, "row_plans": rows}
    artifacts.store_for(site.param, artifacts.site_key(site, ctx), site.fqn, tensors, meta)
