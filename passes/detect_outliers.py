"""detect_outliers: mark LLM.int8() outlier feature columns per linear site.

Precondition: ``bind`` and ``collect_stats`` ran.
Postcondition (analysis only): for each site whose recipe splits mixed
precision (``int8-mixed``), ``site.outlier_channels``
and the linear node's ``meta[OUTLIERS]`` list the input channels whose
calibrated max |x| reached ``options["outlier_ratio"]`` times the site's median channel
max |x| (or, with a ratio of 0, the absolute ``options["threshold"]``), sorted, and
``site.outlier_rule`` says which limit chose them (the report shows it).
``site.outlier_copies`` gives each column the number of int8 copies ``split_mixed_mm``
spreads it over: enough that each copy's calibrated max |x| stays within half the limit.
Sites with other recipes get an empty list; a site reusing stored products
(``site.artifact``) gets their columns. Nothing numeric changes.
Returns the number of sites with at least one outlier channel.
"""

from __future__ import annotations

import math

from torch import fx

from qcompile.context import PassContext
from qcompile.graph_utils import OUTLIERS
from qcompile.recipes import INT8_MIXED, get_recipe


def detect_outliers(gm: fx.GraphModule, ctx: PassContext) -> int:
    marked = 0
    for site in ctx.sites:
        recipe = get_recipe(site.scheme)
        stats = ctx.stats.get(site.fqn)
        if site.artifact is not None:  # reused products (qcompile.artifacts) fix the columns
            site.outlier_channels = list(site.artifact.meta.get("outlier_channels", []))
            site.outlier_rule = site.artifact.meta.get("outlier_rule", "stored products")
            site.outlier_copies = list(site.artifact.meta.get("outlier_copies", []))
        elif site.skip_reason or recipe.family != INT8_MIXED or stats is None:
            site.outlier_channels = []
        else:
            site.outlier_channels, site.outlier_rule, site.outlier_copies = _choose(
                stats, ctx.options
            )
        site.node.meta[OUTLIERS] = list(site.outlier_channels)
        marked += bool(site.outlier_channels)
    return marked


# Each copy of an outlier column reaches at most 1 / COPY_HEADROOM of the limit on the
# calibration text, so text that drives it further still rarely sets the row's step; a
# column too large for MAX_COPIES sets its rows' step itself (coarser, never clipped).
# On SmolLM2-135M (fake-quant, 2048 tokens of four kinds) a headroom of 1 gave 1.0068 of
# fp on average, 2 gave 1.0063 with a worst kind of 1.0078 against 1.0135 (docs/results.md).
COPY_HEADROOM = 2.0
MAX_COPIES = 64


def _choose(stats, options) -> tuple[list[int], str, list[int]]:
    """The static outlier columns of one site, the rule that chose them (in words) and
    each column's number of int8 copies."""
    if options.outlier_mode == "dynamic":
        return [], f"per batch: |x| >= {options.threshold:g}", []
    if options.outlier_ratio > 0:
        limit = stats.ratio_limit(options.outlier_ratio)
        rule = f"max|x| >= {options.outlier_ratio:g} x median {limit / options.outlier_ratio:.3g}"
    else:
        limit, rule = options.threshold, f"max|x| >= {options.threshold:g}"
    cols = stats.outlier_channels(limit)
    peaks = stats.absmax[cols].tolist()
    if limit <= 0:  # every column is an outlier: the finest grid the copies allow
        return cols, rule, [MAX_COPIES] * len(cols)
    copies = [min(MAX_COPIES, max(2, math.ceil(COPY_HEADROOM * p / limit))) for p in peaks]
    return cols, rule, copies
