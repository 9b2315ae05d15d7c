"""Helpers the exact passes share (not a pass): folded weights and biases as graph constants.

A site's folded weight lives in three places kept in step:

* ``node.meta[WEIGHT_F64]``: the float64 master every later fold starts from,
  so a weight folded several times (smoothing, a permutation of its output rows, a
  rotation of its input) is cast to its dtype once, from float64;
* a buffer of the graph module (``add_constant``) in the weight's dtype, which the
  linear node reads (its ``args[1]``) and ``node.meta[WEIGHT_NODE]`` names, as
  ``split_mixed_mm`` does (the quantizing passes read it and drop it once replaced);
* ``site.weight``: the same cast tensor, so the quantizing passes and the report see
  the weight the node computes with.

The user's parameters are never touched; a superseded buffer is removed. A site that
keeps its weight (``site.keep_weight``: its products are reused from
``qcompile.artifacts``) is never folded: its weight may be a released placeholder.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.context import LinearSite
from qcompile.graph_utils import BIAS_F64, WEIGHT_F64, WEIGHT_NODE, add_constant, drop_constant

DTYPE = torch.float64


def weight_f64(site: LinearSite) -> torch.Tensor:
    """The site's current weight ``[N, K]`` in float64 (folded or the parameter)."""
    if site.keep_weight:
        raise RuntimeError(
            f"lowbit internal error: {site.fqn} reuses stored products; nothing may be "
            "folded into its weight"
        )
    w = site.node.meta.get(WEIGHT_F64)
    return w if w is not None else site.weight.detach().to(DTYPE)


def set_weight(gm: fx.GraphModule, site: LinearSite, w: torch.Tensor) -> None:
    """Make ``w`` (float64 ``[N, K]``) the weight the site's linear node computes with."""
    node = site.node
    old = node.meta.get(WEIGHT_NODE)
    value = w.to(site.weight.dtype)
    const = add_constant(gm, f"lowbit_{site.fqn}_folded", value, node)
    node.args = (node.args[0], const, *node.args[2:])
    node.meta[WEIGHT_NODE] = const
    node.meta[WEIGHT_F64] = w
    site.weight = getattr(gm, const.target)
    if old is not None and not old.users:
        drop_constant(gm, old)


def bias_f64(site: LinearSite) -> torch.Tensor | None:
    b = site.node.meta.get(BIAS_F64)
    if b is not None:
        return b
    return None if site.bias is None else site.bias.detach().to(DTYPE)


def set_bias(gm: fx.GraphModule, site: LinearSite, b: torch.Tensor) -> None:
    """Make ``b`` (float64 ``[N]``) the bias of the site's linear node (it had one)."""
    node = site.node
    old = node.args[2] if len(node.args) > 2 else None
    value = b.to(site.bias.dtype)
    const = add_constant(gm, f"lowbit_{site.fqn}_bias_folded", value, node)
    node.args = (node.args[0], node.args[1], const)
    node.meta[BIAS_F64] = b
    site.bias = getattr(gm, const.target)
    if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
        drop_constant(gm, old)


def fold_output_rows(
    gm: fx.GraphModule,
    site: LinearSite,
    perm: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: bool = True,
) -> None:
    """Output row ``i`` of the site becomes ``scale[i] * row perm[i]`` (weight and bias).

    I.e. ``y' = (y[..., perm]) * scale``: exact for a permutation, one rounding for a scale.
    ``weight=False``: the bias only (the site's folded weight is stored).
    """
    b = bias_f64(site)
    w = weight_f64(site) if weight else None
    if perm is not None:
        w = None if w is None else w[perm]
        b = None if b is None else b[perm]
    if scale is not None:
        s = scale.to(DTYPE)
        w = None if w is None else w * s[:, None]
        b = None if b is None else b * s
    if w is not None:
        set_weight(gm, site, w)
    if b is not None:
        set_bias(gm, site, b)
