"""split_mixed_mm: LLM.int8()'s outlier columns spread over int8 copies.

Precondition: ``detect_outliers`` ran.
Rewrite (static mode, per site with outlier columns O, column ``c`` given ``m[c]``
copies): none in the graph yet; the site's linear node gets ``meta[OUTLIER_COPIES]``, the
constant nodes ``(copies, src, piece)`` of ``reference.outlier_expansion``, for
``quantize_weights`` to emit

    y = linear(x, W, b)
 -> q, s = lowbit.quantize_rows_copies(x, copies, src, piece)      # [M, K + E] codes
    lowbit.int8_linear(q, s, W_q[:, src], w_scale, b)

Column ``c``'s activation code may reach ``127 m[c]`` and is spread over ``m[c]`` int8
columns that all multiply ``W_q[:, c]``: the outliers keep the row's quantization step
(LLM.int8()'s point) in one int8 GEMM over ``K + E`` columns, with no full-precision
partial product and no full-precision weight columns.
Sites that read one input with the same columns and copies (q/k/v, gate/up) share the
constants, so ``quantize_weights`` gives them one quantization.
Numerical contract: exact in real arithmetic for any codes (the copies of a column sum to
its code); the int8 rounding is ``quantize_weights``'.
When the site's products are stored (``qcompile.artifacts``), their copies are reused.
Dynamic mode: the site is marked ``meta[DYNAMIC_THRESHOLD]`` and ``quantize_weights``
emits the run-time split op (full-precision outliers, as bitsandbytes computes them).
Returns the number of sites split (or marked dynamic).
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import LinearSite, PassContext
from qcompile.graph_utils import DYNAMIC_THRESHOLD, OUTLIER_COPIES, add_constant
from qcompile.kernels.reference import outlier_expansion
from qcompile.products import Int8Site
from qcompile.recipes import INT8_MIXED


def split_mixed_mm(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    shared: dict[tuple, tuple[fx.Node, ...]] = {}  # (input, columns, copies) -> constants
    for site in ctx.sites_of(INT8_MIXED):
        if ctx.options.outlier_mode == "dynamic":
            site.node.meta[DYNAMIC_THRESHOLD] = ctx.options.threshold
            rewrites += 1
        elif site.outlier_channels:
            copies = _copies(site, ctx)
            key = (site.node.args[0], tuple(copies.tolist()))
            if key not in shared:
                shared[key] = _constants(gm, site, copies)
            site.node.meta[OUTLIER_COPIES] = shared[key]
            rewrites += 1
    gm.recompile()
    return rewrites


def _copies(site: LinearSite, ctx: PassContext) -> torch.Tensor:
    """Copies per input column (float32 ``[K]``, 1 for the inliers), stored ones if any."""
    art = site.artifact or artifacts.lookup(site, ctx, deps=outlier_deps(site))
    if art is not None:  # stored products: nothing is recomputed
        site.artifact = art
        return Int8Site.from_tensors(art.tensors).copies
    w = site.weight
    copies = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
    cols = torch.tensor(site.outlier_channels, dtype=torch.long, device=w.device)
    copies[cols] = torch.tensor(site.outlier_copies, dtype=torch.float32, device=w.device)
    site.products = {"copies": copies}
    return copies


def outlier_deps(site: LinearSite) -> list:
    """What the stored products depend on: the columns and their copies."""
    return [list(site.outlier_channels), list(site.outlier_copies)]


def _constants(gm: fx.GraphModule, site: LinearSite, copies: torch.Tensor) -> tuple:
    tag = f"lowbit_{site.fqn}"
    src, piece = outlier_expansion(copies)
    return tuple(
        add_constant(gm, f"{tag}_{name}", value, site.node)
        for name, value in (("copies", copies), ("src", src), ("piece", piece))
    )
