"""collect_stats: attach activation statistics to every linear site.

Precondition: ``bind`` ran (``ctx.sites`` is filled).
Postcondition (analysis only): ``ctx.stats[site.fqn]`` holds the site's input
statistics, taken from ``options["calibration"]`` when it has the site (under
the site FQN or the tied parameter's FQN), otherwise recorded by running this
graph once on the example inputs dynamo passed to the backend (weak: a single
batch, possibly a single decode token), which is logged as a warning when a missing
site's recipe calibrates (``Recipe.calibrated``).
A site whose products are stored and must be reused (``qcompile.artifacts``: its
weight was released, or they were loaded by ``qcompile.load``) gets
``site.artifact`` and no statistics; a released weight with no matching products
is a ``ValueError``. Once weights of the graph were released, the example inputs are
not run: a missing site whose recipe calibrates is a ``ValueError``, and the others
(round-to-nearest, whose statistics only feed the report) get none; with
``free_weights`` those get none either (the run would read every fp weight into memory).
Returns the number of sites whose statistics came from the example inputs.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import fx

from qcompile import artifacts
from qcompile.calibration import SiteStats
from qcompile.context import PassContext
from qcompile.graph_inputs import runnable_inputs
from qcompile.recipes import get_recipe, statistics_free_recipe

log = logging.getLogger("qcompile")


def collect_stats(gm: fx.GraphModule, ctx: PassContext, example_inputs) -> int:
    calibration = ctx.options.calibration
    missing = []
    needs_hessian = {s.fqn for s in ctx.sites if get_recipe(s.scheme).gptq}
    for site in ctx.sites:
        # stored products (released weight, or loaded by qcompile.load) need no statistics;
        # a released weight with none that match raises here
        site.artifact = _stored_without_statistics(site, ctx) or artifacts.pinned_for(site, ctx)
        if site.skip_reason or site.artifact is not None:
            continue
        stats = None
        if calibration is not None:
            stats = calibration.get(site.fqn) or calibration.get(site.param_fqn)
        if stats is not None and stats.absmax.numel() != site.in_features:
            raise ValueError(
                f"lowbit: the calibration for {site.fqn} has {stats.absmax.numel()} input "
                f"channels but the layer has {site.in_features}; was it recorded on another model?"
            )
        if stats is not None and site.fqn in needs_hessian and stats.hessian is None:
            raise ValueError(
                f"lowbit: recipe {site.scheme!r} of {site.fqn} needs the inputs' Hessian (X^T X); "
                "calibrate with qcompile.calibrate(model, batches, hessian=True)"
            )
        if site.expert is not None and (stats is None or stats.rows == 0):
            if calibration is not None or stats is not None:
                _uncalibrated_expert(site, ctx)
                continue
        if stats is None:
            missing.append(site)
        else:
            ctx.stats[site.fqn] = stats
    if not missing:
        return 0
    report_only = not any(get_recipe(s.scheme).calibrated for s in missing)
    if report_only and ctx.options.free_weights:
        return 0  # statistics for the report alone: not worth reading every fp weight
    if any(artifacts.is_freed(s.weight) for s in ctx.sites):
        if report_only:
            return 0  # the statistics would only feed the report; the run would read zeros
        raise ValueError(
            f"lowbit: cannot calibrate {missing[0].fqn} on this graph's example inputs: other "
            "full-precision weights of the graph were released (free_weights or qcompile.load), "
            "so its recorded inputs would be wrong; pass options={'calibration': ...} recorded "
            "on the full model"
        )
    # recipes that do not calibrate (w8a8, round-to-nearest) are recorded for the report
    # only: no warning for them
    calibrated = [s for s in missing if get_recipe(s.scheme).calibrated]
    if calibrated:
        where = (
            "no calibration was given"
            if calibration is None
            else f"the calibration has no entry for {len(calibrated)} site(s), e.g. "
            f"{calibrated[0].fqn}"
        )
        log.warning(
            "lowbit: %s; calibrating on this graph's example inputs (%s). This is weak: "
            "pass options={'calibration': qcompile.calibrate(model, batches)} for reliable "
            "statistics (%s uses them).",
            where,
            _describe(example_inputs),
            calibrated[0].scheme,
        )
    recorded = record_site_inputs(
        gm, example_inputs, missing, ctx.options.threshold, hessian_for=needs_hessian
    )
    ctx.stats.update(recorded)
    for site in missing:  # experts the example inputs did not reach
        stats = ctx.stats.get(site.fqn)
        if site.expert is not None and (stats is None or stats.rows == 0):
            _uncalibrated_expert(site, ctx)
    return len(recorded)


def _stored_without_statistics(site, ctx: PassContext):
    """The pinned products of a MoE expert quantized without statistics (it saw no
    calibration token, ``_uncalibrated_expert``), if those are what is stored."""
    if site.expert is None or site.skip_reason:
        return None
    fallback = statistics_free_recipe(site.scheme)
    if fallback == site.scheme:
        return None
    art = artifacts.find(site.param, artifacts.site_key(replace(site, scheme=fallback), ctx))
    if art is None or not (art.pinned or artifacts.is_freed(site.param)):
        return None
    _uncalibrated_expert(site, ctx)
    art.touch(site.fqn)
    return art


def _uncalibrated_expert(site, ctx: PassContext) -> None:
    """A MoE expert no calibration token reached: its recipe without statistics, or full
    precision (``options["uncalibrated_experts"]``); noted in the report."""
    if ctx.options.uncalibrated_experts == "fp":
        site.skip_reason = (
            "MoE expert no calibration token was routed to (uncalibrated_experts='fp')"
        )
        return
    fallback = statistics_free_recipe(site.scheme)
    if fallback != site.scheme and get_recipe(site.scheme).quantize:
        ctx.notes.append(
            f"{site.fqn}: no calibration token was routed to this expert: {fallback} instead "
            f"of {site.scheme} (uncalibrated_experts='fp' keeps it in full precision)"
        )
        site.scheme = fallback


def record_site_inputs(
    gm, example_inputs, sites, threshold: float, hessian_for=frozenset()
) -> dict[str, SiteStats]:
    """Run ``gm`` on ``example_inputs`` and record the inputs of ``sites``' linears."""
    wanted = {site.node: site for site in sites}
    stats: dict[str, SiteStats] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n in wanted:
                x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
                site = wanted[n]
                if site.fqn not in stats:
                    stats[site.fqn] = SiteStats.empty(
                        site.in_features, threshold, hessian=site.fqn in hessian_for
                    )
                s = stats[site.fqn]
                s.update(x)
            return super().run_node(n)

    with torch.no_grad():
        Recorder(gm).run(*runnable_inputs(gm, example_inputs))
    return stats


def _describe(example_inputs) -> str:
    shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
    non_param = [s for t, s in zip(example_inputs, shapes) if not isinstance(t, torch.nn.Parameter)]
    return f"input shapes {non_param[:3]}"
