"""``qcompile.explain``: what the backend would do to a model, as a report."""

from __future__ import annotations

import torch

from .coverage import coverage
from .options import Options
from .pipeline import run_pipeline
from .report import Report


def explain(model: torch.nn.Module, *example_args, options=None, **example_kwargs) -> Report:
    """Trace ``model`` on the example inputs, run the analysis and quantizing passes
    (not the lowering), and return the merged report of every graph, with the model's
    coverage (``Report.coverage``: which matmul weights are quantized, left in full
    precision and why, or never seen).

    The model's weights are not changed and no compiled code is kept: dynamo's
    cache for the model's forward is cleared before and after (a model compiled
    earlier recompiles on its next call).
    """
    opts = Options.parse(options)
    reports: list[Report] = []

    def recorder(gm, example_inputs, **_):
        reports.append(run_pipeline(gm, example_inputs, opts, lower_to_target=False))
        return gm.forward

    from torch._dynamo.eval_frame import remove_from_cache

    remove_from_cache(model)
    try:
        with torch.no_grad():
            torch.compile(model, backend=recorder)(*example_args, **example_kwargs)
    finally:
        remove_from_cache(model)
    if not reports:
        raise RuntimeError("qcompile.explain: dynamo produced no graph for this model and input")
    merged = Report.merge(reports)
    merged.coverage = coverage(model)
    return merged
