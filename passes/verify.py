"""verify: the equivalence gate after each exact pass (``options["verify"]``).

Precondition: ``fusion_analysis`` recorded ``ctx.verify_reference`` (the example
inputs and the graph's outputs before any exact rewrite); without ``verify`` (or
without transformed sites) there is none and this pass does nothing.
Check (no rewrite): run the graph on the same inputs and compare every floating
output with the reference; on a mismatch raise :class:`LowbitVerifyError` naming the
pass that ran last (``after``), the output and the error. ``release``: this is the
last check; the reference is dropped.
Tolerance, relative to the output's scale (``max |ref|``, at least 1): float64
``1e-9``, float32 ``1e-3`` (the folds round the weights once; the online matmul and
the reordered sums round too), 16-bit floats ``5e-2``.
Returns 0 (it never rewrites).
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.context import PassContext
from qcompile.graph_inputs import runnable_inputs

RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}
RTOL_16BIT = 5e-2


class LowbitVerifyError(RuntimeError):
    """An exact pass changed what the graph computes."""


def verify(gm: fx.GraphModule, ctx: PassContext, after: str, release: bool = False) -> int:
    if ctx.verify_reference is None:
        return 0
    inputs, reference = ctx.verify_reference
    if release:  # the last check: free the reference outputs (logits can be large)
        ctx.verify_reference = None
    with torch.no_grad():
        outputs = gm(*runnable_inputs(gm, inputs))
    ref_list = _flatten(reference)
    out_list = _flatten(outputs)
    if len(ref_list) != len(out_list):
        raise LowbitVerifyError(
            f"lowbit verify: after pass {after!r} the graph returns {len(out_list)} outputs, "
            f"it returned {len(ref_list)} before the exact passes"
        )
    for i, (ref, out) in enumerate(zip(ref_list, out_list)):
        if not (isinstance(ref, torch.Tensor) and ref.is_floating_point()):
            continue
        if out.shape != ref.shape or out.dtype != ref.dtype:
            raise LowbitVerifyError(
                f"lowbit verify: after pass {after!r} output {i} is {out.dtype} "
                f"{tuple(out.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        err = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
        tol = RTOL.get(ref.dtype, RTOL_16BIT) * scale
        if not err <= tol:  # also catches NaN
            raise LowbitVerifyError(
                f"lowbit verify: pass {after!r} changed the graph's output {i} "
                f"(shape {tuple(ref.shape)}, {ref.dtype}): max |error| {err:.3g} > "
                f"tolerance {tol:.3g} (scale {scale:.3g}); it should be exact in real arithmetic"
            )
    return 0


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [y for x in out for y in _flatten(x)]
    return [out]
