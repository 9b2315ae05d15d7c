"""Quantization recipes: what a recipe name means for one linear site.

A recipe is data, not code: the passes read these fields. Recipe names are the
user-facing strings of ``options["recipe"]`` and of ``options["overrides"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Recipe families: which passes act on a site (PassContext.sites_of routes by them).
FP = "fp"  # nothing is quantized
INT8 = "int8"  # vector-wise int8 weights and activations (quantize_weights)
INT8_MIXED = "int8-mixed"  # ... with LLM.int8()'s outlier columns (+ split_mixed_mm)
WEIGHT_ONLY = "weight-only"  # group-wise packed weights (quantize_weight_only, _embedding)
LOW_BIT = "low-bit"  # W4A4 / W6A6 / W4A8, optionally transformed (quantize_lowbit)
FAMILIES = (FP, INT8, INT8_MIXED, WEIGHT_ONLY, LOW_BIT)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    family: str  # one of FAMILIES
    weight_bits: int | None = None
    act_bits: int | None = None
    group_size: int | None = None  # weight-only: input channels per scale / zero point
    gptq: bool = False  # weight-only: GPTQ error compensation instead of round-to-nearest
    # low-bit: equivalence transform on each linear input before quantizing
    # (None, "duquant": smoothing + block rotations, "hadamard": QuaRot-style)
    transform: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"recipe {self.name!r}: unknown family {self.family!r}")

    @property
    def quantize(self) -> bool:
        """False: the site keeps its full-precision linear."""
        return self.family != FP

    @property
    def mixed(self) -> bool:
        """LLM.int8() split: outlier columns stay in full precision."""
        return self.family == INT8_MIXED

    @property
    def weight_only(self) -> bool:
        return self.family == WEIGHT_ONLY

    @property
    def calibrated(self) -> bool:
        """Whether the quantized result depends on calibration statistics (outlier
        columns, the Hessian, DuQuant's smoothing and rotations)."""
        return self.mixed or self.gptq or self.transform == "duquant"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "int8-mixed",
            "LLM.int8(): vector-wise int8 (per-token activations, per-channel weights); "
            "outlier feature columns spread over int8 copies so they keep the row's step",
            INT8_MIXED,
            weight_bits=8,
            act_bits=8,
        ),
        Recipe(
            "w8a8",
            "vector-wise int8 (per-token activations, per-channel weights), no outlier split",
            INT8,
            weight_bits=8,
            act_bits=8,
        ),
        Recipe(
            "fp",
            "analysis only: every pass runs, nothing is quantized (output equals the eager model)",
            FP,
        ),
    )
}

# Weight-only, group-wise, asymmetric: "w{bits}a16-g{group}" (RTN) and "...-gptq".
for _bits in (8, 4, 3, 2):
    for _group in (32, 64, 128):
        for _gptq in (False, True):
            _name = f"w{_bits}a16-g{_group}" + ("-gptq" if _gptq else "")
            RECIPES[_name] = Recipe(
                _name,
                f"weight-only {_bits}-bit, asymmetric, groups of {_group} input channels, "
                + ("GPTQ (Hessian from calibration)" if _gptq else "round-to-nearest")
                + "; activations stay in their dtype",
                WEIGHT_ONLY,
                weight_bits=_bits,
                group_size=_group,
                gptq=_gptq,
            )


# Weight-activation low bit (DuQuant, issue 3): symmetric per-output-channel weights and
# per-token activations at the same widths, int values held in int8 (int32 accumulation).
for _name, _w, _a, _transform, _how in (
    ("w4a4-duquant", 4, 4, "duquant", "DuQuant"),
    ("w6a6-duquant", 6, 6, "duquant", "DuQuant"),
    ("w4a8-duquant", 4, 8, "duquant", "DuQuant"),
    ("w4a4-rtn", 4, 4, None, "round-to-nearest, no transform"),
    ("w6a6-rtn", 6, 6, None, "round-to-nearest, no transform"),
    ("w4a4-hadamard", 4, 4, "hadamard", "QuaRot-style Hadamard (random orthogonal if none)"),
):
    RECIPES[_name] = Recipe(
        _name,
        f"W{_w}A{_a}: symmetric per-output-channel {_w}-bit weights, per-token {_a}-bit "
        f"activations; {_how}"
        + (
            " (smoothing, block rotation, zigzag permutation, folded into the weights)"
            if _transform == "duquant"
            else ""
        ),
        LOW_BIT,
        weight_bits=_w,
        act_bits=_a,
        transform=_transform,
    )


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown lowbit recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}"
        ) from None


def tied_embedding_recipe(name: str) -> str | None:
    """The recipe for a linear whose weight is also an embedding table (a tied lm_head)
    when the model-wide recipe is ``name`` and no override names the site: weight-only
    recipes below 8 bits keep it at 8 bits with the same group size and method, since
    its codes then serve both the logits and every input embedding (as llama.cpp keeps
    the output matrix at higher precision). On SmolLM2-135M, ``w4a16-g64-gptq``:
    +5.2% perplexity with it at 8 bits, +7.0% with it at 4 bits. None: no change."""
    recipe = RECIPES.get(name)
    if recipe is None or not recipe.weight_only or recipe.weight_bits >= 8:
        return None
    return f"w8a16-g{recipe.group_size}" + ("-gptq" if recipe.gptq else "")


def statistics_free_recipe(name: str) -> str:
    """The recipe a site falls back to when it has no calibration statistics (a MoE
    expert no calibration token was routed to): ``name`` itself when it needs none;
    int8-mixed: w8a8 (no outlier columns); GPTQ: round-to-nearest; a DuQuant transform
    (built from the inputs): weight-only round-to-nearest at the weight width (8 bits for
    6), groups of 32."""
    recipe = get_recipe(name)
    if not recipe.calibrated:
        return name
    if recipe.mixed:
        return "w8a8"
    if recipe.gptq:
        return name.removesuffix("-gptq")
    bits = recipe.weight_bits if recipe.weight_bits in (2, 3, 4, 8) else 8
    return f"w{bits}a16-g32"
