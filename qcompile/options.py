"""The backend's options: one frozen, validated dataclass built from the user's dict.

``torch.compile(model, backend="lowbit", options={...})`` hands the dict to
``Options.parse``; unknown keys, recipe names or values raise ``ValueError``
naming the valid ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .calibration import Calibration
from .recipes import get_recipe

TARGETS = ("auto", "cpu", "triton")
OUTLIER_MODES = ("static", "dynamic")
HANDOFFS = ("inductor", "eager")
CPU_TRANSFORM_DTYPES = ("auto", "activation", "bfloat16")
UNCALIBRATED_EXPERTS = ("round", "fp")

OPTION_HELP = {
    "recipe": "recipe name for every linear site (default 'int8-mixed')",
    "calibration": "a qcompile.Calibration or a path saved by Calibration.save "
    "(default: calibrate on the example inputs, with a warning)",
    "target": "'auto' (by the weights' device), 'cpu' or 'triton'",
    "debug_dir": "folder for per-pass graph dumps and the explain report (or env LOWBIT_DEBUG_DIR)",
    "overrides": "dict from FQN glob to recipe name, e.g. {'lm_head': 'fp'}",
    "threshold": "LLM.int8() outlier threshold on |activation| (6.0); given without "
    "'outlier_ratio', it chooses the static columns (LLM.int8()'s absolute rule); the "
    "dynamic mode always uses it",
    "outlier_ratio": "static outlier columns: a channel whose calibrated max |x| reaches this "
    "multiple of the site's median channel max |x| (default 3.0; 0: the absolute "
    "'threshold' instead) is spread over int8 copies",
    "outlier_mode": "'static' (calibrated columns, default) or 'dynamic' (chosen per batch)",
    "handoff": "'inductor' (default) or 'eager' (keep the lowered graph in Python, for debugging)",
    "gptq": "GPTQ settings for '-gptq' recipes: {'act_order': True, 'damp': 0.1, "
    "'block_size': 128, 'clip_search': True}",
    "free_weights": "True: after the first compiled call, release the model's full-precision "
    "weights of the linear layers lowbit replaced (eager calls of them then raise; "
    "default False)",
    "duquant": "settings for '-duquant' recipes: {'block_size': 'auto', 'steps': 8, "
    "'permute': True, 'alpha': 0.5, 'clip_search': True}",
    "cpu_transform_dtype": "operand dtype of the online DuQuant / Hadamard transforms on the "
    "CPU target: 'auto' (default: bfloat16 where the CPU multiplies bf16 natively and every "
    "reader quantizes the result to <= 6 bits, else the activation dtype), 'activation' or "
    "'bfloat16'",
    "uncalibrated_experts": "a Mixture-of-Experts expert no calibration token was routed to: "
    "'round' (default: its recipe without statistics; int8-mixed -> w8a8, -gptq -> RTN, "
    "DuQuant -> weight-only RTN g32) or 'fp' (kept in full precision, reported)",
    "verify": "True: check that the exact passes (smooth, rotate) left the graph's outputs "
    "unchanged on the example inputs; raises naming the pass (default False)",
}
# clip_search: fit each group's range by a Hessian-weighted search over shrink factors
# (SmolLM2 W4 g64: +11.7% -> +8.4% perplexity at 8 x 512 calibration tokens; README).
# damp 0.1, not the paper's 0.01: chosen by perplexity on text calibration never saw
# (docs/results.md, cross-kind). On SmolLM2-135M, w4a16-g64 calibrated on the corpus mix,
# legal text: 1.180 (0.01), 1.132 (0.05), 1.115 (0.1), 1.124 (0.2) x fp; calibrated on
# reference prose, mean of the three unseen kinds: 1.119 (0.01), 1.103 (0.1).
GPTQ_DEFAULTS = {"act_order": True, "damp": 0.1, "block_size": 128, "clip_search": True}
# block_size: channels per rotation block (a remainder block is handled and reported);
# steps: greedy rotation steps per block; permute: zigzag permutation + second rotation;
# alpha: SmoothQuant migration strength (0 = no smoothing); clip_search: per-channel
# weight clipping ratio minimizing the calibration sample's output error.
# Defaults measured on SmolLM2-135M (README): W4A4 block 64 beat 32/96/128/192/576 at
# alpha 0.5-0.6, and alpha 0.5-0.6 beat 0.4 and 0.7; W6A6 block 128 beat 64 (+2.4% vs
# +3.3%) while W4A8 preferred 64 (18.50 vs 18.89): "auto" = duquant_block_size().
DUQUANT_DEFAULTS = {
    "block_size": "auto",
    "steps": 8,
    "permute": True,
    "alpha": 0.5,
    "clip_search": True,
}


@dataclass(frozen=True)
class Options:
    recipe: str = "int8-mixed"
    calibration: Calibration | None = None
    target: str = "auto"
    debug_dir: str | None = None
    overrides: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    threshold: float = 6.0
    # int8-mixed on SmolLM2-135M, perplexity / fp on the reference / docstrings / legal
    # texts (eager hand-off, docs/results.md): absolute threshold 6: 1.011 / 1.010 / 1.036
    # with 4803 fp columns; ratio 6: 1.014 / 1.018 / 1.032 (535); ratio 4: 1.006 / 1.013 /
    # 1.024 (1711); ratio 3: 1.005 / 1.003 / 1.011 (3578)
    outlier_ratio: float = 3.0
    outlier_mode: str = "static"
    handoff: str = "inductor"
    gptq: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType(dict(GPTQ_DEFAULTS)))
    duquant: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType(dict(DUQUANT_DEFAULTS))
    )
    verify: bool = False
    free_weights: bool = False
    cpu_transform_dtype: str = "auto"
    uncalibrated_experts: str = "round"

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> Options:
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown lowbit option(s) {unknown}; valid options: "
                + "; ".join(f"{k}: {OPTION_HELP[k]}" for k in valid)
            )
        get_recipe(options.get("recipe", cls.recipe))
        _check_choice("target", options.get("target", cls.target), TARGETS)
        _check_choice("outlier_mode", options.get("outlier_mode", cls.outlier_mode), OUTLIER_MODES)
        _check_choice("handoff", options.get("handoff", cls.handoff), HANDOFFS)
        _check_choice(
            "cpu_transform_dtype",
            options.get("cpu_transform_dtype", cls.cpu_transform_dtype),
            CPU_TRANSFORM_DTYPES,
        )

        _check_choice(
            "uncalibrated_experts",
            options.get("uncalibrated_experts", cls.uncalibrated_experts),
            UNCALIBRATED_EXPERTS,
        )

        overrides = options.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise ValueError(
                "lowbit option 'overrides' must be a dict from FQN glob to recipe name"
            )
        for glob, recipe in overrides.items():
            if not isinstance(glob, str):
                raise ValueError(f"lowbit override key {glob!r} must be a string FQN glob")
            get_recipe(recipe)
        options["overrides"] = MappingProxyType(dict(overrides))

        absolute_rule = "threshold" in options  # the user asked for LLM.int8()'s own rule
        threshold = options.get("threshold", cls.threshold)
        if not isinstance(threshold, (int, float)) or threshold != threshold or threshold < 0:
            raise ValueError(f"lowbit option 'threshold' must be a number >= 0, got {threshold!r}")
        options["threshold"] = float(threshold)
        ratio = options.get("outlier_ratio", 0.0 if absolute_rule else cls.outlier_ratio)
        if not isinstance(ratio, (int, float)) or ratio != ratio or ratio < 0:
            raise ValueError(
                f"lowbit option 'outlier_ratio' must be a number >= 0 (0: use the absolute "
                f"'threshold'), got {ratio!r}"
            )
        options["outlier_ratio"] = float(ratio)

        calibration = options.get("calibration")
        if calibration is not None and not isinstance(calibration, Calibration):
            if isinstance(calibration, (str, os.PathLike)):
                options["calibration"] = Calibration.load(calibration)
            else:
                raise ValueError(
                    "lowbit option 'calibration' must be a qcompile.Calibration or the path "
                    f"of one saved with Calibration.save, got {type(calibration).__name__}"
                )
        options["gptq"] = MappingProxyType(_parse_gptq(options.get("gptq")))
        options["duquant"] = MappingProxyType(_parse_duquant(options.get("duquant")))
        if not isinstance(options.get("verify", False), bool):
            raise ValueError(
                f"lowbit option 'verify' must be True or False, got {options['verify']!r}"
            )
        if not isinstance(options.get("free_weights", False), bool):
            raise ValueError(
                "lowbit option 'free_weights' must be True or False, "
                f"got {options['free_weights']!r}"
            )
        debug_dir = options.get("debug_dir") or os.environ.get("LOWBIT_DEBUG_DIR") or None
        options["debug_dir"] = os.fspath(debug_dir) if debug_dir else None
        return cls(**options)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"lowbit option {key!r} must be one of {list(choices)}, got {value!r}")


def _parse_gptq(value: Any) -> dict:
    value = dict(value or {})
    unknown = sorted(set(value) - set(GPTQ_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown lowbit gptq option(s) {unknown}; valid: {sorted(GPTQ_DEFAULTS)}")
    out = {**GPTQ_DEFAULTS, **value}
    for flag in ("act_order", "clip_search"):
        if not isinstance(out[flag], bool):
            raise ValueError(f"lowbit gptq option {flag!r} must be True or False")
    if not (isinstance(out["damp"], (int, float)) and 0 < out["damp"] < 1):
        raise ValueError(f"lowbit gptq option 'damp' must be in (0, 1), got {out['damp']!r}")
    if not (isinstance(out["block_size"], int) and out["block_size"] > 0):
        raise ValueError("lowbit gptq option 'block_size' must be a positive int")
    return out


def _parse_duquant(value: Any) -> dict:
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"lowbit option 'duquant' must be a dict, got {type(value).__name__}")
    value = dict(value or {})
    unknown = sorted(set(value) - set(DUQUANT_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown lowbit duquant option(s) {unknown}; valid: {sorted(DUQUANT_DEFAULTS)}"
        )
    out = {**DUQUANT_DEFAULTS, **value}
    for key in ("block_size", "steps"):
        v = out[key]
        if key == "block_size" and v == "auto":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "block_size" else 0):
            raise ValueError(
                f"lowbit duquant option {key!r} must be an int >= "
                f"{1 if key == 'block_size' else 0}"
                + (" or 'auto'" if key == "block_size" else "")
                + f", got {v!r}"
            )
    for key in ("permute", "clip_search"):
        if not isinstance(out[key], bool):
            raise ValueError(f"lowbit duquant option {key!r} must be True or False")
    alpha = out["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"lowbit duquant option 'alpha' must be in [0, 1], got {alpha!r}")
    out["alpha"] = float(alpha)
    return out


def duquant_block_size(opts: Mapping[str, Any], weight_bits: int) -> int:
    """The rotation block size of ``options["duquant"]`` for a group whose narrowest
    weights have ``weight_bits``: the int given, or for ``"auto"`` the best measured on
    SmolLM2-135M (128 for 6-bit weights and wider, 64 for 4-bit)."""
    block = opts["block_size"]
    if block == "auto":
        return 128 if weight_bits >= 6 else 64
    return block
