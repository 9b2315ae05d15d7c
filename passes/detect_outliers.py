"""detect_outliers: mark LLM.int8() outlier feature columns per linear site.

Precondition: ``bind`` and ``collect_stats`` ran.
Postcondition (analysis only): for each site whose recipe splits mixed
precision (``int8-mixed``), ``site.outlier_channels``
and the linear node's ``meta[OUTLIERS]`` list the input channels whose
calibrated max |x| reached ``options["outlier_ratio"]`` times the site's median channel
max |x| (or, with a ratio of 0, the absolute ``options["threshold"]``), sorted, and
``site.outlier_rule`` says which limit chose them (the report shows it).
Sites with other recipes get an empty list; a site reusing stored products
(``site.artifact``) gets their columns. Nothing numeric changes.
Returns the number of sites with at least one outlier channel.
"""

from __future__ import annotations

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
        elif site.skip_reason or recipe.family != INT8_MIXED or stats is None:
            site.outlier_channels = []
        else:
            site.outlier_channels, site.outlier_rule = _choose(stats, ctx.options)
        site.node.meta[OUTLIERS] = list(site.outlier_channels)
        marked += bool(site.outlier_channels)
    return marked


def _choose(stats, options) -> tuple[list[int], str]:
    """The static outlier columns of one site and the rule that chose them, in words."""
    if options.outlier_mode == "dynamic":
        return [], f"per batch: |x| >= {options.threshold:g}"
    if options.outlier_ratio > 0:
        limit = stats.ratio_limit(options.outlier_ratio)
        rule = f"max|x| >= {options.outlier_ratio:g} x median {limit / options.outlier_ratio:.3g}"
        return stats.outlier_channels(limit), rule
    return stats.outlier_channels(options.threshold), f"max|x| >= {options.threshold:g}"
