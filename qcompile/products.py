"""The layout of every product lowbit stores (``qcompile.artifacts``) and saves.

Invariant: each product kind is one frozen dataclass here. The passes build their
products through it, the registry stores ``tensors()`` (the roles in ``ROLES`` order,
absent optional ones left out: that dict, and so a saved file, is what it always was),
and ``qcompile.load`` checks a file's products with its ``validate`` (``ValueError``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .kernels.reference import outlier_expansion
from .recipes import LOW_BIT, WEIGHT_ONLY

Tensor = torch.Tensor
NO_GROUP = "-"  # a row_plans / folded key entry for "no input transform" (passes/_plans.py)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_finite(name: str, what: str, t: Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"the {what} of {name} holds non-finite values")


class _Layout:
    """``tensors()`` / ``from_tensors()``: the ``dict[str, Tensor]`` the registry holds."""

    ROLES: ClassVar[tuple[str, ...]] = ()

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for role in self.ROLES:
            t = getattr(self, role)
            if t is not None:
                out[role] = t
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]):
        names = {f.name for f in fields(cls)}
        return cls(**{r: tensors.get(r) for r in cls.ROLES if r in names})


def _check_w_q(name: str, shape: list[int], w_q, w_scale) -> None:
    if w_q is None or w_scale is None:
        raise ValueError(f"the quantized weight or scales of {name} are missing")
    if w_q.dtype != torch.int8 or list(w_q.shape) != shape:
        raise ValueError(
            f"the quantized weight of {name} is {dtype_name(w_q.dtype)}"
            f"{list(w_q.shape)}, expected int8{shape}"
        )
    if list(w_scale.shape) != shape[:1]:
        raise ValueError(f"the scales of {name} have shape {list(w_scale.shape)}")
    check_finite(name, "scales", w_scale)


@dataclass(frozen=True)
class Int8Site(_Layout):
    """A W8A8 site (``quantize_weights``): ``w_scale`` ``[out]`` per output row and ``w_q``
    int8 ``[out, in]``; with LLM.int8()'s outlier columns spread over int8 copies
    (``split_mixed_mm``) also ``copies`` float32 ``[in]`` (whole numbers in [1, 256]), and
    ``w_q`` has the columns of ``reference.outlier_expansion(copies)``'s ``src``
    (``in + sum(copies - 1)``)."""

    w_q: Tensor | None = None
    w_scale: Tensor | None = None
    copies: Tensor | None = None
    ROLES: ClassVar = ("copies", "w_q", "w_scale")
    # what files saved before 2026-12-07 hold for int8-mixed: full-precision outlier columns
    RETIRED_ROLES: ClassVar = ("outlier_idx", "inlier_mask", "w_outlier")

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]):
        retired = sorted(set(cls.RETIRED_ROLES) & set(tensors))
        if retired:
            raise ValueError(
                f"these int8-mixed products hold {', '.join(retired)}: full-precision outlier "
                "columns, as lowbit saved them before 2026-12-07. This version spreads outlier "
                "columns over int8 copies instead; compile the model again and save it again"
            )
        return super().from_tensors(tensors)

    def validate(self, name: str, shape: list[int]) -> None:
        width = shape[1]
        if self.copies is not None:
            c = self.copies
            if c.dtype != torch.float32 or list(c.shape) != shape[1:]:
                raise ValueError(f"the outlier copies of {name} are not float32{shape[1:]}")
            if not bool(((c >= 1) & (c <= 256) & (c == c.round())).all()):
                raise ValueError(f"the outlier copies of {name} are not whole numbers in [1, 256]")
            width = outlier_expansion(c)[0].numel()
        _check_w_q(name, [shape[0], width], self.w_q, self.w_scale)


@dataclass(frozen=True)
class WeightOnlySite(_Layout):
    """A weight-only site (``quantize_weight_only``, ``qcompile.qat_convert``): ``packed``
    int32 ``[out, packed_words(in, bits)]`` (``kernels.packing.pack`` of the uint8 codes),
    ``scales`` and ``zeros`` ``[out, in / group]`` in the scale dtype (the key's
    ``scale_dtype``): ``w = (code - zero) * scale`` per group of ``group`` inputs."""

    packed: Tensor | None = None
    scales: Tensor | None = None
    zeros: Tensor | None = None
    ROLES: ClassVar = ("packed", "scales", "zeros")

    def validate(self, name: str, shape: list[int]) -> None:
        if self.packed is None or self.scales is None or self.zeros is None:
            raise ValueError(f"the packed codes, scales or zero points of {name} are missing")
        if self.packed.dtype != torch.int32 or self.packed.dim() != 2:
            raise ValueError(f"the packed codes of {name} are not a 2-D int32 tensor")
        for what, t in (("scales", self.scales), ("zero points", self.zeros)):
            if t.dim() != 2 or list(t.shape[:1]) != shape[:1]:
                raise ValueError(f"the {what} of {name} have shape {list(t.shape)}")
            check_finite(name, what, t)


@dataclass(frozen=True)
class LowBitSite(_Layout):
    """A low-bit site of the DuQuant / Hadamard / RTN recipes (``quantize_lowbit``):
    ``w_q`` int8 ``[out, in]`` holding ``bits``-bit values, ``w_scale`` ``[out]``, and
    with the clip search ``clip_ratios`` float32 ``[out]`` in ``(0, 1]``. Its ``meta``
    names the transform plans the folded weight was built with (``plan``: its input's,
    ``row_plans``: those folded into its output rows)."""

    w_q: Tensor | None = None
    w_scale: Tensor | None = None
    clip_ratios: Tensor | None = None
    ROLES: ClassVar = ("w_q", "w_scale", "clip_ratios")

    def validate(self, name: str, shape: list[int], bits: int, meta: dict) -> None:
        _check_w_q(name, shape, self.w_q, self.w_scale)
        qmax = 2 ** (bits - 1) - 1
        if meta.get("bits") != bits or int(self.w_q.abs().max()) > qmax:
            raise ValueError(f"the quantized weight of {name} is not {bits}-bit")
        clip = self.clip_ratios
        if clip is not None and (
            list(clip.shape) != shape[:1] or not bool(((clip > 0) & (clip <= 1)).all())
        ):
            raise ValueError(f"the clip ratios of {name} are malformed")
        plan, rows = meta.get("plan"), meta.get("row_plans", [])
        if not (plan is None or isinstance(plan, str)) or not (
            isinstance(rows, list) and all(isinstance(r, str) for r in rows)
        ):
            raise ValueError(f"the transform plans named by {name}'s products are malformed")


#: block_rotate's operands, in argument order (``passes/_plans.py``)
ONLINE_ROLES = ("r1", "r1_tail", "perm", "r2", "r2_tail")


@dataclass(frozen=True)
class TransformPlan(_Layout):
    """One input group's transform (``passes/_plans.py``), as the graph uses it: the
    online ``block_rotate`` operands ``r1`` ``[n, b, b]`` / ``r1_tail`` ``[t, t]``,
    ``perm`` int64 ``[in]``, ``r2`` / ``r2_tail`` (in the activation dtype, an online
    smoothing merged in; the blocks cover the ``in`` channels), the smoothing scales
    ``smooth`` float64 ``[in]`` (> 0) and the permutation ``pre_perm`` int64 ``[in]``
    folded into producers' rows."""

    r1: Tensor | None = None
    r1_tail: Tensor | None = None
    perm: Tensor | None = None
    r2: Tensor | None = None
    r2_tail: Tensor | None = None
    pre_perm: Tensor | None = None
    smooth: Tensor | None = None
    ROLES: ClassVar = (*ONLINE_ROLES, "pre_perm", "smooth")

    @property
    def block_size(self) -> int | None:
        return int(self.r1.shape[1]) if self.r1 is not None else None

    def validate(self, name: str, shape: list[int], k: int, act_dtype: str) -> None:
        if shape[-1] != k:
            raise ValueError(
                f"the transform plan of {name} is for {k} input channels, not {shape[-1]}"
            )
        for stage in ("r1", "r2"):
            blocks, tail = getattr(self, stage), getattr(self, f"{stage}_tail")
            if stage == "r2" and blocks is None and tail is None:
                continue
            size = 0
            if blocks is not None:
                if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
                    raise ValueError(f"the {stage} blocks of {name}'s plan are not square")
                size += blocks.shape[0] * blocks.shape[1]
            if tail is not None:
                if tail.dim() != 2 or tail.shape[0] != tail.shape[1]:
                    raise ValueError(f"the {stage} remainder block of {name}'s plan is not square")
                size += tail.shape[0]
            if size != k:
                raise ValueError(
                    f"the {stage} blocks of {name}'s plan cover {size} of {k} channels"
                )
            for m in (blocks, tail):
                if m is not None and dtype_name(m.dtype) != act_dtype:
                    raise ValueError(f"the {stage} blocks of {name}'s plan are not {act_dtype}")
                if m is not None:
                    check_finite(name, f"{stage} blocks", m)
        for role in ("perm", "pre_perm"):
            p = getattr(self, role)
            if p is not None and (
                p.dtype != torch.int64
                or list(p.shape) != [k]
                or not torch.equal(p.sort().values, torch.arange(k))
            ):
                raise ValueError(
                    f"the {role} of {name}'s plan is not a permutation of {k} channels"
                )
        s = self.smooth
        if s is not None and (
            s.dtype != torch.float64
            or list(s.shape) != [k]
            or not bool(torch.isfinite(s).all())
            or not bool((s > 0).all())
        ):
            raise ValueError(f"the smoothing scales of {name}'s plan are malformed")


@dataclass(frozen=True)
class FoldedCopy:
    """The constant that replaces a parameter a transform plan folds into: ``value`` (an
    RMSNorm weight divided by the smoothing scales; key ``of``: ``"norm"``), or ``weight``
    (the folded weight of a linear that is not low-bit quantized; ``of``: ``"weight"``),
    of the product shape in the key's ``value_dtype``."""

    value: Tensor | None
    role: str = "value"  # "value" | "weight"

    def tensors(self) -> dict[str, Tensor]:
        return {self.role: self.value}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> FoldedCopy:
        if "value" in tensors:
            return cls(tensors["value"], "value")
        return cls(tensors.get("weight"), "weight")

    def validate(self, name: str, shape: list[int], value_dtype: str) -> None:
        v = self.value
        if v is None or list(v.shape) != shape or dtype_name(v.dtype) != value_dtype:
            raise ValueError(f"the folded copy of {name} does not match its shape or dtype")
        check_finite(name, "folded copy", v)


Product = Int8Site | WeightOnlySite | LowBitSite | TransformPlan | FoldedCopy


def site_layout(recipe) -> type:
    """The site product class of a recipe (``qcompile.recipes.Recipe``)."""
    return {WEIGHT_ONLY: WeightOnlySite, LOW_BIT: LowBitSite}.get(recipe.family, Int8Site)


def as_tensors(products) -> dict[str, Tensor]:
    """The registry's dict of ``products`` (a dataclass here, or already a dict)."""
    return products if isinstance(products, dict) else products.tensors()
