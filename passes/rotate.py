"""rotate: DuQuant block rotations / zigzag permutation (or a Hadamard) per linear input.

Precondition: ``fusion_analysis`` ran (and ``smooth``, whose scaling the group's
sample already reflects).
Rewrite, per input group, with ``T`` orthogonal ``[K, K]`` (:func:`build_plan`):

    linear(x, W_i)  ->  linear(block_rotate(x, ...), W_i @ T)     for every linear i

``W_i @ T`` is folded offline in float64 into copies of the weights; ``x @ T`` runs
online once per input node (one ``lowbit::block_rotate``, which ``lower`` fuses with
the quantization where it can). A stored plan (``passes/_plans.py``) is applied as
stored; a plan built here is stored after it is applied.
Numerical contract: exact in real arithmetic (float rounding of the folded weights and
of the online matmul; checked by ``verify`` and in float64 by the tests).
Returns the number of input groups rotated.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile import progress
from qcompile.context import PassContext
from qcompile.graph_utils import ROTATE, add_constant, drop_constant
from qcompile.kernels.lowbit_act import block_rotate  # also registers lowbit::block_rotate
from qcompile.options import duquant_block_size
from qcompile.recipes import get_recipe
from qcompile.transforms import (
    greedy_block_rotation,
    hadamard_or_random,
    per_token_quant_mse,
    zigzag_permutation,
)

from ._folding import fold_output_rows, set_weight, weight_f64
from ._plan_store import finish_rotate, remember, stored_plan
from .fusion_analysis import InputGroup, input_groups

DTYPE = torch.float64
BUILD_ROWS = 64  # sample rows (largest block norms) each block's rotation is built from


Blocks = tuple  # (blocks [nb, b, b] | None, tail [r, r] | None): a block-diagonal matrix


@dataclass
class Plan:
    """``T = P0 @ R1 @ P @ R2`` for one input group (float64; ``R1``, ``R2`` as blocks)."""

    r1: Blocks  # block-diagonal R1 (a full matrix is one block)
    pre_perm: torch.Tensor | None = None  # P0, folded into producers' output rows
    perm: torch.Tensor | None = None  # P (online gather)
    r2: Blocks | None = None  # block-diagonal R2, or None
    notes: list[str] = field(default_factory=list)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` for ``x [rows, K]`` (float64), block by block."""
        y = x if self.pre_perm is None else x[:, self.pre_perm]
        y = block_rotate(y, *self.r1)
        if self.perm is not None:
            y = y[:, self.perm]
        return y if self.r2 is None else block_rotate(y, *self.r2)

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """``W @ T`` for ``W [N, K]`` (T acts on the input channels)."""
        return self.apply(w)


def rotate(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    groups = input_groups(ctx)
    for g in progress.bar(groups, desc="lowbit rotations", show=bool(groups)):
        plan = stored_plan(g, Plan)  # stored products (passes/_plans.py), else built
        if plan is None:
            with _one_thread():  # many tiny matmuls: extra OpenMP threads only contend
                plan = build_plan(g, ctx.options.duquant)
        _apply_plan(gm, g, plan)
        remember(gm, ctx, g, plan)
        rewrites += 1
    finish_rotate(gm, ctx)
    gm.recompile()
    return rewrites


def build_plan(g: InputGroup, opts) -> Plan:
    """The transform of one group, from its (smoothed) sample. Tests may replace it.

    * ``"duquant"``: ``T = P0 @ R1 @ P @ R2``: ``R1``, ``R2`` block-diagonal greedy
      rotations (``options["duquant"]["block_size"]``, ``"auto"``:
      ``options.duquant_block_size`` of the group's weight bits; a remainder block when
      it does not divide K, reported), ``P`` the zigzag permutation, the stage
      ``P @ R2`` kept only when it lowers the sample's per-token error at the recipe's
      activation bits. ``P0`` (only where ``fusion_analysis`` found a SwiGLU producer,
      with ``permute``): a zigzag permutation of the raw channels, dealing the
      massive-outlier channels to different blocks before ``R1``; folded into the
      gate/up projections' output rows, it costs nothing at run time.
    * ``"hadamard"``: ``T = transforms.hadamard_or_random(K)`` (QuaRot-style; a seeded
      random orthogonal matrix when no Hadamard order-K construction exists; the report
      says which), applied as one K x K block.

    DuQuant's composition is ``qcompile.transforms.duquant_transform``'s (same greedy
    block rotations and seeds, zigzag permutation from the channel maxima after R1,
    second stage gated on the per-token error at the group's activation bits), built
    block by block (no dense K x K matrices) with each block's rotation built from
    the sample rows with the largest norms in that block (``_build_rows``); the gate
    uses the whole sample.
    """
    k = g.in_features
    # seeded by the group's first linear: the same plan whether the model is compiled
    # whole, in pieces (graph breaks) or block by block (qcompile.quantize_sequential)
    seed = zlib.crc32(g.sites[0].fqn.encode())
    if g.transform == "hadamard":
        h, kind = hadamard_or_random(k, seed=seed)
        return Plan(r1=(h[None], None), notes=[f"{kind} {k}x{k} (online)"])
    w_bits = min(get_recipe(s.scheme).weight_bits or 16 for s in g.sites)
    block = min(duquant_block_size(opts, w_bits), k)
    steps, permute = opts["steps"], opts["permute"]
    x = g.sample if g.sample is not None else g.absmax[None, :]
    notes = []
    pre = None
    if permute and g.perm_into and k > block:
        pre = zigzag_permutation(x.abs().amax(dim=0), block)
        x = x[:, pre]
        notes.append("zigzag P0 (fused into " + ", ".join(s.fqn for s in g.perm_into) + " rows)")
    r1 = _greedy_blocks(x, block, steps, seed)
    nb, rem = divmod(k, block)
    notes.append(f"R1 {nb}x{block}" + (f"+{rem} (remainder block)" if rem else "") + " (online)")
    perm = r2 = None
    if permute and k > block:
        x1 = block_rotate(x, *r1)
        perm = zigzag_permutation(x1.abs().amax(dim=0), block)
        r2 = _greedy_blocks(x1[:, perm], block, steps, seed + 7919)
        x2 = block_rotate(x1[:, perm], *r2)
        bits = min(g.act_bits, 8)
        if per_token_quant_mse(x2, bits) < per_token_quant_mse(x1, bits):
            notes.append("zigzag P + R2 (online)")
        else:  # DuQuant's second-stage gate (see transforms.duquant_transform)
            perm = r2 = None
            notes.append(f"P + R2 rejected (no A{bits} error gain)")
    return Plan(r1=r1, pre_perm=pre, perm=perm, r2=r2, notes=notes)


def _greedy_blocks(x: torch.Tensor, block: int, steps: int, seed: int) -> Blocks:
    """``transforms.greedy_block_rotation`` of each block of channels (seed + block index)."""
    k = x.shape[1]
    rots = [
        greedy_block_rotation(_build_rows(x[:, start : start + block]), steps, seed=seed + i)
        for i, start in enumerate(range(0, k, block))
    ]
    full = [r for r in rots if r.shape[0] == block]
    tail = rots[-1] if rots[-1].shape[0] != block else None
    return (torch.stack(full) if full else None), tail


def _build_rows(xb: torch.Tensor) -> torch.Tensor:
    """The sample rows with the largest norms in this block.

    ``max|x_b @ R| <= ||x_b||`` for an orthogonal ``R``, so a row whose block norm is
    below the block max reached cannot decide the greedy rotation's objective; the
    top rows are what it optimizes, at a fraction of the cost.
    """
    if xb.shape[0] <= BUILD_ROWS:
        return xb
    return xb[xb.norm(dim=1).topk(BUILD_ROWS).indices.sort().values]


def _apply_plan(gm: fx.GraphModule, g: InputGroup, plan: Plan) -> None:
    """Fold ``T`` into the group's weights (not those it keeps: their products are
    stored) and insert the online ``block_rotate`` (``kernels.lowbit_act``: a batched
    matmul over the blocks of ``R1``, and of ``R2`` with the gather ``P`` between). An
    online smoothing ``x / s`` left by ``smooth`` is merged into ``R1``
    (``diag(1/s) @ R1`` is still block-diagonal) and its ``div`` removed."""
    graph = gm.graph
    if plan.pre_perm is not None:  # P0 upstream: the producers' output rows
        for site in g.perm_into:
            fold_output_rows(gm, site, perm=plan.pre_perm, weight=not site.keep_weight)
    for site in g.sites:
        if not site.keep_weight:  # else its products are stored
            set_weight(gm, site, plan.fold(weight_f64(site)))

    x = g.input
    r1 = plan.r1
    if g.online_scale is not None:  # merge an online x / s into R1 and drop the div
        s = g.online_scale if plan.pre_perm is None else g.online_scale[plan.pre_perm]
        r1 = _scale_rows(r1, 1.0 / s)
        div, x = x, x.args[0]
        s_node = div.args[1]
        for site in g.sites:
            site.node.replace_input_with(div, x)
        if not div.users:
            graph.erase_node(div)
            if not s_node.users:
                drop_constant(gm, s_node)
        for site in g.sites:
            site.transforms = [
                t.replace("(online)", "(online, merged into R1)") if t.startswith("smooth") else t
                for t in site.transforms
            ]

    g.input = x  # the div's input, when an online x / s was merged into R1
    val = x.meta.get("example_value")
    dtype = val.dtype if val is not None else g.sites[0].weight.dtype
    first = g.first_reader(gm)
    tag = f"lowbit_rotate_{g.index}"
    consts = [None] * 5
    consts[0] = _const(gm, f"{tag}_r1", r1[0], dtype, first)
    consts[1] = _const(gm, f"{tag}_r1_tail", r1[1], dtype, first)
    if plan.perm is not None:
        consts[2] = add_constant(gm, f"{tag}_perm", plan.perm.to(torch.int64), first)
    if plan.r2 is not None:
        consts[3] = _const(gm, f"{tag}_r2", plan.r2[0], dtype, first)
        consts[4] = _const(gm, f"{tag}_r2_tail", plan.r2[1], dtype, first)
    g.route_through(gm, first, torch.ops.lowbit.block_rotate.default, tuple(consts), ROTATE)

    x_before = g.sample
    if g.sample is not None:
        g.sample = plan.apply(g.sample)
    after = float(g.sample.abs().max()) if g.sample is not None else None
    g.notes += plan.notes
    for site in g.sites:
        site.transforms += plan.notes
        site.act_absmax_after = after
        if site.act_absmax_before is None and x_before is not None:
            site.act_absmax_before = float(x_before.abs().max())


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _scale_rows(r: Blocks, d: torch.Tensor) -> Blocks:
    """``diag(d) @ R`` for a block-diagonal ``R`` (still block-diagonal)."""
    blocks, tail = r
    done = 0
    if blocks is not None:
        done = blocks.shape[0] * blocks.shape[1]
        blocks = blocks * d[:done].reshape(blocks.shape[0], blocks.shape[1], 1)
    if tail is not None:
        tail = tail * d[done:, None]
    return blocks, tail


def _const(gm, name, value, dtype, before):
    return None if value is None else add_constant(gm, name, value.to(dtype), before)
