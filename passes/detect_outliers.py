"""detect_outliers: mark LLM.int8() outlier feature columns per linear site.

Precondition: ``bind`` and ``collect_stats`` ran.
Postcondition (analysis only): for each site whose recipe splits mixed
precision (``int8-mixed``), ``site.outlier_channels``
and the linear node's ``meta["lowbit.outliers"]`` list the input channels whose
calibrated magnitude reached ``options["threshold"]`` (default 6.0), sorted.
Sites with other recipes get an empty list; a site reusing stored products
(``site.artifact``) gets their columns. Nothing numeric changes.
Returns the number of sites with at least one outlier channel.
"""

from __future__ import annotations

from torch import fx

from qcompile.context import PassContext
from qcompile.recipes import get_recipe


def detect_outliers(gm: fx.GraphModule, ctx: PassContext) -> int:
    marked = 0
    for site in ctx.sites:
        recipe = get_recipe(site.scheme)
        stats = ctx.stats.get(site.fqn)
        if site.artifact is not None:  # reused products (qcompile.artifacts) fix the columns
            site.outlier_channels = list(site.artifact.meta.get("outlier_channels", []))
        elif site.skip_reason or not recipe.mixed or stats is None:
            site.outlier_channels = []
        else:
            site.outlier_channels = stats.outlier_channels(ctx.options.threshold)
        site.node.meta["lowbit.outliers"] = list(site.outlier_channels)
        marked += bool(site.outlier_channels)
    return marked
