"""smooth: SmoothQuant scaling of each DuQuant input, folded upstream where the graph allows.

Precondition: ``fusion_analysis`` ran (input groups with their fusion decisions).
Rewrite, per input group whose transform is ``"duquant"`` when
``options["duquant"]["alpha"] > 0``:

    s_j = max|X_j|^alpha / max_n |W_nj|^(1 - alpha)      (calibrated absmax; all the
                                                           group's weights: q/k/v jointly)
    linear(x, W_i)  ->  linear(x / s, W_i * s)            for every linear i of the group

``W_i * s`` is folded offline (float64, on copies: ``_folding.set_weight``); ``x / s``
costs nothing at run time where ``fusion_analysis`` found a producer to absorb it:
``"norm"`` divides the RMSNorm weight (a new constant in the multiply; the parameter
is left alone), ``"rows"`` divides the output rows (and bias) of SwiGLU's up
projection. Otherwise a ``div`` by a constant is inserted before the linears
(``rotate`` merges it into its online block matrices when it runs). The group's
sample and absmax are updated to the smoothed basis for ``rotate``.
A group whose plan is stored (``InputGroup.stored``, ``passes/_plans.py``) takes its
float64 ``s`` from it and folds nothing into members that keep their weights
(``site.keep_weight``: their products are stored); its norm weight is the stored fold
(or recomputed from the norm and ``s``), and an online ``x / s`` is not inserted: the
stored online operands already hold it.
Numerical contract: exact in real arithmetic (float rounding of the folded weights;
verified by ``verify`` in the pipeline and in float64 by the tests).
Returns the number of input groups smoothed.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.context import PassContext, fqn_from_source
from qcompile.graph_utils import ONLINE_SMOOTH, add_constant, param_tensor
from qcompile.transforms import smooth_scales

from ._folding import fold_output_rows, set_weight, weight_f64
from ._plan_store import folded_norm, stored_smooth
from .fusion_analysis import input_groups

DTYPE = torch.float64


def smooth(gm: fx.GraphModule, ctx: PassContext) -> int:
    alpha = ctx.options.duquant["alpha"]
    if alpha <= 0:
        return 0
    rewrites = 0
    for g in input_groups(ctx):
        if g.transform != "duquant":
            continue
        if g.stored is not None:  # a stored plan: its scales (float64)
            s = stored_smooth(g)
            if s is None:
                continue
        elif g.absmax is None:
            continue
        else:
            s = smooth_scales(g.absmax, [weight_f64(site) for site in g.sites], alpha=alpha)
        g.smooth_scale = s
        for site in g.sites:
            if not site.keep_weight:
                set_weight(gm, site, weight_f64(site) * s)
        where = _absorb(gm, g, s)
        if g.sample is not None:
            g.sample = g.sample / s
        if g.absmax is not None:
            g.absmax = g.absmax / s
        note = f"smooth a={alpha:g} ({where})"
        g.notes.append(note)
        for site in g.sites:
            site.transforms.append(note)
        rewrites += 1
    gm.recompile()
    return rewrites


def _absorb(gm: fx.GraphModule, g, s: torch.Tensor) -> str:
    """Apply ``x / s`` upstream (free) or online; return where, for the report."""
    if g.scale_into is not None and g.scale_into[0] == "norm":
        mul, i = g.scale_into[1], g.scale_into[2]
        weight_node = mul.args[i]
        param = param_tensor(weight_node)
        grapharg = weight_node.meta.get("grapharg")
        fqn = fqn_from_source(grapharg.source.name) if grapharg is not None else None
        fqn = fqn or weight_node.name
        folded = folded_norm(g, param, fqn, s)  # a stored plan's; None: computed now
        if folded is None:
            w = param.detach()
            folded = (w.to(DTYPE) / s).to(w.dtype)
        const = add_constant(gm, f"lowbit_{weight_node.name}_smoothed", folded, mul)
        args = list(mul.args)
        args[i] = const
        mul.args = tuple(args)
        g.norm_fold = (param, fqn, const)
        return "fused into the norm weight"
    if g.scale_into is not None and g.scale_into[0] == "rows":
        producer = g.scale_into[1]
        fold_output_rows(gm, producer, scale=1.0 / s, weight=not producer.keep_weight)
        return f"fused into {producer.fqn} rows"
    if g.stored is not None:  # the stored online operands hold diag(1 / s) already
        return "online, merged into R1"
    val = g.input.meta.get("example_value")
    dtype = val.dtype if val is not None else g.sites[0].weight.dtype
    first = g.first_reader(gm)
    s_node = add_constant(gm, f"lowbit_smooth_{g.index}", s.to(dtype), first)
    g.route_through(gm, first, operator.truediv, (s_node,), ONLINE_SMOOTH)
    g.online_scale = s
    return "online"
