"""The ``lowbit`` dynamo backend: run the pass pipeline, then hand off to inductor.

Registered under the entry-point group ``torch_dynamo_backends`` (pyproject), so
``torch.compile(model, backend="lowbit")`` works without ``import qcompile``.
"""

from __future__ import annotations

import logging
import warnings

from torch import fx

from .options import Options
from .pipeline import run_pipeline

log = logging.getLogger("qcompile")


class LowbitRecompileWarning(UserWarning):
    """Dynamo hit its recompile limit: calls that follow run the fp model eagerly."""


def lowbit_backend(gm: fx.GraphModule, example_inputs, *, options=None, mode=None):
    if mode is not None:
        raise ValueError(
            f"lowbit does not take mode={mode!r}; pass settings as options={{...}} "
            f"(valid keys: {', '.join(Options.__dataclass_fields__)})"
        )
    opts = Options.parse(options)
    watch_recompile_limit()
    run_pipeline(gm, example_inputs, opts)
    if opts.handoff == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


class _RecompileLimitFilter(logging.Filter):
    """Turns dynamo's recompile-limit log line into a loud lowbit warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "hit config." in msg and "recompile_limit" in msg:
            text = (
                "lowbit: torch._dynamo hit its recompile limit; from now on the function below "
                "runs EAGERLY with the ORIGINAL full-precision weights (not quantized by lowbit). "
                "Raise torch._dynamo.config.recompile_limit, or mark dynamic dims "
                "(torch._dynamo.mark_dynamic), and recompile.\n" + msg
            )
            log.error(text)
            warnings.warn(text, LowbitRecompileWarning, stacklevel=2)
        return True


_filter = _RecompileLimitFilter()


def watch_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _filter not in logger.filters:
        logger.addFilter(_filter)
