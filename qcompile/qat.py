"""Quantization-aware training, first slice: trainable group-wise fake quantization.

EfficientQAT trains a weight-only model through the quantizer the packed kernels
implement (``kernels/weight_only_reference.py``: asymmetric, groups of ``G`` input
channels, ``w ~= (q - z) * s``). Here that quantizer is a parametrization of each
linear's weight, so the model trains with an ordinary PyTorch loop and any optimizer:

    w_hat = (clamp(round(w / s) + round(z), 0, qmax) - round(z)) * s

with ``round(z)`` clamped to ``[0, qmax]``. Rounding passes gradients straight through
(STE); the clamps do not. So ``w`` gets ``dL/dw_hat`` where its code is not clipped,
and the step size ``s`` gets LSQ's gradient ``(q - z) - w / s`` (inside the range) or
``q - z`` (clipped), the zero point ``-s`` where clipped and 0 elsewhere.

:func:`prepare_qat` registers the parametrization on every ``nn.Linear`` of a model for
a weight-only recipe (``w{bits}a16-g{G}``), initialised from round-to-nearest (the
fake-quantized weight then equals the RTN weight), and returns what it prepared and what
it left in full precision and why. Still to come (issue 16): Block-AP, E2E-QP, lowering
the training graphs to fused kernels, and converting a trained model to the packed
inference products.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from qcompile.kernels.weight_only_reference import compute_qparams
from qcompile.recipes import get_recipe
from qcompile.release import linear_owners


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``w [N, K]`` through the group-wise quantizer with ``scale, zero [N, K // G]``,
    differentiable in all three (module docstring); in ``w``'s dtype."""
    q, s, z = _on_grid(w, scale, zero, bits, group_size, round_ste)
    return ((q - z) * s).reshape(w.shape)


def _on_grid(w, scale, zero, bits: int, group_size: int, rnd):
    """Codes ``q [N, K // G, G]`` and the step sizes and zero points ``[N, K // G, 1]``
    they use, rounding with ``rnd`` (straight-through in training, plain to commit)."""
    n, k = w.shape
    qmax = 2**bits - 1
    s = positive(scale).unsqueeze(-1)
    z = torch.clamp(rnd(zero), 0, qmax).unsqueeze(-1)
    q = torch.clamp(rnd(w.reshape(n, k // group_size, group_size) / s) + z, 0, qmax)
    return q, s, z


def positive(scale: torch.Tensor) -> torch.Tensor:
    """Step sizes as the quantizer uses them: clamped to the dtype's smallest normal
    (an optimizer step may push one to 0 or below; RTN's are never that small)."""
    return scale.clamp(min=torch.finfo(scale.dtype).tiny)


def trained_codes(w, scale, zero, bits: int, group_size: int):
    """``(q uint8 [N, K], scales, zeros)`` as :func:`fake_quantize` rounds them (the same
    operations), so ``dequantize_groupwise(q, scales, zeros)`` is its forward."""
    with torch.no_grad():
        q, s, z = _on_grid(w, scale, zero, bits, group_size, torch.round)
        return q.reshape(w.shape).to(torch.uint8), s.squeeze(-1).clone(), z.squeeze(-1)


def mark_quantizer_parameter(p: nn.Parameter) -> nn.Parameter:
    """Tag a trainable step size / zero point: a graph the lowbit backend receives with
    one of them requiring grad is a training graph (``qcompile.backend``)."""
    p._lowbit_quantizer = True
    return p


def is_quantizer_parameter(t) -> bool:
    return isinstance(t, nn.Parameter) and getattr(t, "_lowbit_quantizer", False)


class GroupwiseFakeQuant(nn.Module):
    """Parametrization of a linear weight: :func:`fake_quantize` with trainable
    ``scale`` and ``zero`` (``nn.Parameter`` s, ``[N, K // G]``, the weight's dtype)."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        with torch.no_grad():
            scale, zero = compute_qparams(weight.detach(), bits, group_size, weight.dtype)
        self.scale = mark_quantizer_parameter(nn.Parameter(scale))
        self.zero = mark_quantizer_parameter(nn.Parameter(zero))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale, self.zero, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"


@dataclass
class QATPlan:
    """What :func:`prepare_qat` did: the prepared linears and the ones left alone."""

    recipe: str
    prepared: list[str] = field(default_factory=list)
    left_in_fp: dict[str, str] = field(default_factory=dict)  # module name -> why

    def __str__(self) -> str:
        lines = [f"QAT {self.recipe}: {len(self.prepared)} linear(s) fake-quantized"]
        lines += [f"  left in full precision: {n} ({why})" for n, why in self.left_in_fp.items()]
        return "\n".join(lines)


def prepare_qat(model: nn.Module, recipe: str = "w4a16-g64", *, skip=()) -> QATPlan:
    """Fake-quantize every ``nn.Linear`` weight of ``model`` in place for ``recipe``
    (weight-only, e.g. ``"w2a16-g64"``), initialised from round-to-nearest.

    The weight stays trainable (``module.parametrizations.weight.original``) next to
    each group's ``scale`` and ``zero`` (``module.parametrizations.weight[0]``); hand
    ``model.parameters()`` to any optimizer. Left in full precision and listed in the
    returned plan: modules named in ``skip`` and linears whose weight is shared with
    another module (a tied lm_head: fake-quantizing it would untie the embedding).
    Raises ``ValueError`` for a recipe that is not weight-only and for a group size
    that does not divide a prepared linear's ``in_features`` (naming it).
    """
    r = get_recipe(recipe)
    if not r.weight_only:
        weight_only = "w{8,4,3,2}a16-g{32,64,128}"
        raise ValueError(
            f"prepare_qat trains weight-only recipes ({weight_only}); {recipe!r} is not one"
        )
    plan = QATPlan(recipe)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, mod in linears:
        if name in skip:
            plan.left_in_fp[name] = "skipped by the caller"
        elif parametrize.is_parametrized(mod, "weight"):
            plan.left_in_fp[name] = "its weight is already parametrized"
        elif len(linear_owners(model, mod.weight)[0]) > 1:
            plan.left_in_fp[name] = "its weight is shared with another module (tied)"
        elif mod.in_features % r.group_size:
            raise ValueError(
                f"prepare_qat: {recipe!r} needs in_features divisible by {r.group_size}, but "
                f"{name} has {mod.in_features}; choose another group size or skip={{{name!r}}}"
            )
    for name, mod in linears:
        if name in plan.left_in_fp:
            continue
        fq = GroupwiseFakeQuant(mod.weight, r.weight_bits, r.group_size)
        parametrize.register_parametrization(mod, "weight", fq)
        plan.prepared.append(name)
    return plan
