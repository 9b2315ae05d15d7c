"""The ordered pass pipeline: one line per stage. Each quantizing pass acts on the sites
of its recipe families (``Recipe.family``, ``PassContext.sites_of``); passes/README.md
lists the invariants every pass keeps."""

from __future__ import annotations

import itertools
import logging
from collections import deque

from torch import fx

from qcompile.graph_utils import REPLACED_WEIGHTS
from qcompile.passes._matmul_sites import drop_dead_weight_views
from qcompile.passes.bind import bind
from qcompile.passes.collect_stats import collect_stats
from qcompile.passes.detect_outliers import detect_outliers
from qcompile.passes.fusion_analysis import fusion_analysis
from qcompile.passes.quantize_embedding import quantize_embedding
from qcompile.passes.quantize_lowbit import quantize_lowbit
from qcompile.passes.quantize_weight_only import quantize_weight_only
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.passes.rotate import rotate
from qcompile.passes.share_kv_heads import share_kv_heads
from qcompile.passes.smooth import smooth
from qcompile.passes.split_mixed_mm import split_mixed_mm
from qcompile.passes.verify import verify

from . import release
from .context import PassContext
from .coverage import record_graph
from .debug import PassRunner
from .options import Options
from .recipes import get_recipe
from .report import Report, SiteRow

log = logging.getLogger("qcompile")
_graph_counter = itertools.count()
# Reports of the graphs compiled in this process, newest last (qcompile.compiled_reports()).
REPORTS: deque[Report] = deque(maxlen=256)


def run_pipeline(
    gm: fx.GraphModule, example_inputs, options: Options, *, lower_to_target: bool = True
) -> Report:
    """Rewrite ``gm`` in place through every lowbit pass; return what was done."""
    ctx = PassContext(options, graph_index=next(_graph_counter))
    runner = PassRunner(options.debug_dir, ctx.graph_index)
    runner.run("bind", bind, gm, ctx)  # placeholders -> FQNs, linear sites, dataflow graph
    ctx.target = resolve_target(options.target, ctx)
    runner.run("collect_stats", collect_stats, gm, ctx, example_inputs)  # calibration per site
    runner.run("detect_outliers", detect_outliers, gm, ctx)  # LLM.int8() outlier columns
    runner.run("fusion_analysis", fusion_analysis, gm, ctx, example_inputs)  # what folds upstream
    runner.run("smooth", smooth, gm, ctx)  # SmoothQuant x / s: into the norm / up rows, or online
    runner.run("verify_smooth", verify, gm, ctx, "smooth")  # options["verify"]: outputs unchanged
    runner.run("rotate", rotate, gm, ctx)  # DuQuant R1 P R2 / Hadamard: W @ T offline, x @ T online
    runner.run("verify_rotate", verify, gm, ctx, "rotate", True)  # ... and frees the reference
    runner.run("split_mixed_mm", split_mixed_mm, gm, ctx)  # int8-mixed: outliers -> fp partial
    runner.run("quantize_weights", quantize_weights, gm, ctx)  # int8, int8-mixed families
    runner.run("quantize_lowbit", quantize_lowbit, gm, ctx)  # low-bit: W4A4 / W6A6 / W4A8
    runner.run("quantize_weight_only", quantize_weight_only, gm, ctx)  # weight-only: packed
    runner.run("quantize_embedding", quantize_embedding, gm, ctx)  # tied lookups read the codes
    drop_dead_weight_views(gm)  # the [in, out] weights' views bind added, once replaced
    if lower_to_target:
        from qcompile.lowering.lower import lower

        runner.run("share_kv_heads", share_kv_heads, gm, ctx)  # cpu: attention reads the KV heads
        runner.run("lower", lower, gm, ctx)  # lowbit ops -> cpu / triton kernels
    gm.graph.lint()

    # fp weights this graph no longer reads: the backend releases them with free_weights
    replaced = release.replaced_weights(gm, ctx)
    gm.meta[REPLACED_WEIGHTS] = replaced
    report = build_report(ctx, runner)
    record_graph(ctx, report)  # per parameter: quantized / full precision (qcompile.coverage)
    report.memory = release.memory_of(gm, replaced)
    runner.write_report(report)
    REPORTS.append(report)
    _log_summary(report)
    return report


def resolve_target(target: str, ctx: PassContext) -> str:
    if target != "auto":
        return target
    on_gpu = any(s.weight.device.type == "cuda" for s in ctx.sites)
    return "triton" if on_gpu else "cpu"


def build_report(ctx: PassContext, runner: PassRunner) -> Report:
    rows = []
    for s in ctx.sites:
        reason = s.skip_reason
        if reason is None and not get_recipe(s.scheme).quantize:
            reason = f"recipe {s.scheme!r}" + (
                " (override)" if s.scheme != ctx.options.recipe else ""
            )
        rows.append(
            SiteRow(
                fqn=s.fqn,
                in_features=s.in_features,
                out_features=s.out_features,
                scheme=s.scheme,
                outlier_channels=list(s.outlier_channels),
                outlier_rule=s.outlier_rule,
                outlier_copies=list(s.outlier_copies),
                weight_sqnr_db=s.weight_sqnr_db,
                fp_reason=reason,
                bits_per_weight=s.bits_per_weight,
                method=s.method,
                graph=ctx.graph_index,
                transforms="; ".join(s.transforms) or None,
                act_absmax_before=s.act_absmax_before,
                act_absmax_after=s.act_absmax_after,
            )
        )
    calib = ctx.options.calibration
    return Report(
        sites=rows,
        unsupported=list(ctx.unsupported),
        pass_times=dict(runner.times),
        pass_rewrites=dict(runner.rewrites),
        target=ctx.target,
        calibration=calib.source if calib is not None else "example inputs",
        embeddings=list(ctx.embeddings),
        notes=list(ctx.notes),
        graph_indices=[ctx.graph_index],
    )


def _log_summary(report: Report) -> None:
    unexpected = {k: v for k, v in report.left_in_fp.items() if not k.startswith("recipe ")}
    if unexpected:
        log.warning(report.summary())
    else:
        log.info(report.summary())


__all__ = ["run_pipeline", "REPORTS"]
