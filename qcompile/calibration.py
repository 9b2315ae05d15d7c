"""Activation statistics per linear site, keyed by the weight's FQN.

``calibrate(model, batches)`` runs the model eagerly with forward pre-hooks on
every ``nn.Linear`` (and GPT-2's ``Conv1D``: ``qcompile.matmul_modules``; the experts of
MoE blocks per expert: ``qcompile.expert_calibration``) and records, per input channel,
what the passes need:
the absolute maximum (LLM.int8() outlier detection, smoothing), how many rows
reach the outlier threshold, optionally ``X^T X`` (GPTQ) and optionally a sample
of input rows (``sample_rows``: what DuQuant's rotations are built from). A linear reachable
under several names (tied embeddings: ``lm_head.weight`` and
``model.embed_tokens.weight``) is stored under each of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


@dataclass
class SiteStats:
    """Statistics of one linear site's input ``X [rows, K]``."""

    absmax: torch.Tensor  # [K] float32, max |x| per input channel
    over_threshold: torch.Tensor  # [K] int64, rows with |x| >= threshold per channel
    rows: int
    threshold: float
    hessian: torch.Tensor | None = None  # [K, K] float64, sum of x^T x (GPTQ)
    # Up to ``sample_rows`` input rows [n, K] float32: the quarter of them with the
    # largest |x| (massive-outlier tokens are rare and must be kept) and a uniform
    # random subset of the others (bottom-k of random keys, ``sample_keys``).
    sample: torch.Tensor | None = None
    sample_keys: torch.Tensor | None = None  # [n] float64 random keys of the sampled rows
    sample_rows: int = 0

    @classmethod
    def empty(
        cls, in_features: int, threshold: float, hessian: bool, sample_rows: int = 0
    ) -> SiteStats:
        return cls(
            absmax=torch.zeros(in_features),
            over_threshold=torch.zeros(in_features, dtype=torch.int64),
            rows=0,
            threshold=threshold,
            hessian=torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None,
            sample_rows=sample_rows,
        )

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        xtx: torch.Tensor | None = None,
        summary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add the rows of ``x [..., K]``; ``xtx``: their ``X^T X`` and ``summary``: their
        :func:`summarize` (same threshold), if already computed (sites that read the same
        input, e.g. q/k/v, share them)."""
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:  # e.g. a MoE expert no token was routed to in this batch
            return
        absmax, over = summary if summary is not None else summarize(x2, self.threshold)
        self.absmax = torch.maximum(self.absmax, absmax)
        self.over_threshold += over
        if self.hessian is not None:
            self.hessian += gram(x2) if xtx is None else xtx
        if self.sample_rows > 0:
            self._update_sample(x2.float().cpu())
        self.rows += x2.shape[0]

    def _update_sample(self, x2: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(1_000_003 + self.rows)
        keys = torch.rand(x2.shape[0], generator=gen, dtype=torch.float64)
        if self.sample is not None:
            x2 = torch.cat([self.sample, x2])
            keys = torch.cat([self.sample_keys, keys])
        if x2.shape[0] > self.sample_rows:
            n_top = self.sample_rows // 4
            top = x2.abs().amax(dim=1).topk(n_top).indices if n_top else keys[:0].long()
            rest_keys = keys.clone()
            rest_keys[top] = float("inf")
            rest = rest_keys.topk(self.sample_rows - n_top, largest=False).indices
            keep = torch.cat([top, rest]).sort().values
            x2, keys = x2[keep], keys[keep]
        self.sample, self.sample_keys = x2.contiguous(), keys

    def outlier_channels(self, threshold: float) -> list[int]:
        """Channels whose magnitude ever reached ``threshold`` (LLM.int8()'s rule with 6.0,
        or a :meth:`ratio_limit`)."""
        return (self.absmax >= threshold).nonzero().flatten().tolist()

    def ratio_limit(self, ratio: float) -> float:
        """``ratio`` times the median over channels of their max |x|: a scale-free outlier
        limit (LLM.int8()'s 6.0 presumes activations of magnitude about 1)."""
        return ratio * self.absmax.median().item()


class Calibration:
    """Per-site activation statistics; ``stats[fqn]`` for a weight FQN."""

    def __init__(self, stats: Mapping[str, SiteStats] | None = None, *, source: str = "") -> None:
        self.stats: dict[str, SiteStats] = dict(stats or {})
        self.source = source

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.stats

    def __getitem__(self, fqn: str) -> SiteStats:
        return self.stats[fqn]

    def get(self, fqn: str) -> SiteStats | None:
        return self.stats.get(fqn)

    def __len__(self) -> int:
        return len(self.stats)

    def __repr__(self) -> str:
        rows = max((s.rows for s in self.stats.values()), default=0)
        return f"Calibration({len(self.stats)} sites, {rows} rows, source={self.source!r})"

    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, dict] = {}
        for fqn, s in self.stats.items():
            tensors[f"{fqn}::absmax"] = s.absmax.contiguous().clone()
            tensors[f"{fqn}::over_threshold"] = s.over_threshold.contiguous().clone()
            if s.hessian is not None:
                tensors[f"{fqn}::hessian"] = s.hessian.contiguous().clone()
            if s.sample is not None:
                tensors[f"{fqn}::sample"] = s.sample.contiguous().clone()
                tensors[f"{fqn}::sample_keys"] = s.sample_keys.contiguous().clone()
            meta[fqn] = {"rows": s.rows, "threshold": s.threshold}
            if s.sample_rows:
                meta[fqn]["sample_rows"] = s.sample_rows
        header = {"format": "lowbit.calibration", "version": FORMAT_VERSION, "source": self.source}
        save_file(
            tensors, os.fspath(path), metadata={"lowbit": json.dumps({**header, "sites": meta})}
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"lowbit calibration file {path!r} does not exist")
        try:
            tensors = load_file(path)
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                header = json.loads((f.metadata() or {})["lowbit"])
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
            raise ValueError(
                f"{path!r} is not a lowbit calibration file (expected one written by "
                f"Calibration.save): {e}"
            ) from None
        if not isinstance(header, dict) or not isinstance(header.get("sites"), dict):
            raise ValueError(f"{path!r}: not a lowbit calibration file (bad metadata)")
        if header.get("format") != "lowbit.calibration" or header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path!r}: unsupported calibration format {header.get('format')!r}")
        stats = {}
        for fqn, m in header["sites"].items():
            try:
                stats[fqn] = SiteStats(
                    absmax=tensors[f"{fqn}::absmax"],
                    over_threshold=tensors[f"{fqn}::over_threshold"],
                    rows=int(m["rows"]),
                    threshold=float(m["threshold"]),
                    hessian=tensors.get(f"{fqn}::hessian"),
                    sample=tensors.get(f"{fqn}::sample"),
                    sample_keys=tensors.get(f"{fqn}::sample_keys"),
                    sample_rows=int(m.get("sample_rows", 0)),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path!r}: calibration file is incomplete, missing {e}") from None
        return cls(stats, source=header.get("source", ""))


@dataclass(frozen=True)
class ModelCall:
    """One call's positional and keyword arguments (a batch for a module that needs both,
    e.g. a decoder block: ``ModelCall((hidden, *args), kwargs)``)."""

    args: tuple
    kwargs: dict


def statistics_for(options: Mapping) -> dict:
    """``calibrate``'s ``hessian`` / ``sample_rows`` for the recipes a compile-options dict
    names (its recipe and overrides): Hessians for GPTQ, input samples for transforms."""
    from .recipes import get_recipe

    names = (options.get("recipe", "int8-mixed"), *(options.get("overrides") or {}).values())
    recipes = [get_recipe(r) for r in names]
    return {
        "hessian": any(r.gptq for r in recipes),
        "sample_rows": 512 if any(r.transform for r in recipes) else 0,
    }


def as_call(batch):
    if isinstance(batch, ModelCall):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise ValueError(
        "qcompile.calibrate: each batch must be a tensor of input ids, a dict of model keyword "
        f"arguments, or a tuple of positional arguments; got {type(batch).__name__}"
    )


GRAM_CHUNK_ROWS = 1024


def summarize(x2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of the rows ``x2 [R, K]``: max |x| (float32) and how many rows reach
    ``threshold`` (int64), on the CPU."""
    mag = x2.abs().float()
    return mag.amax(dim=0).cpu(), torch.count_nonzero(mag >= threshold, dim=0).cpu()


def gram(x2: torch.Tensor) -> torch.Tensor:
    """``X^T X [K, K]`` in float64 of the rows ``x2 [R, K]``: float32 products per chunk of
    ``GRAM_CHUNK_ROWS`` rows (4x faster than float64 here; relative error ~1e-7 per
    chunk, far below what GPTQ's damping tolerates), accumulated in float64."""
    out = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)
    for r0 in range(0, x2.shape[0], GRAM_CHUNK_ROWS):
        xc = x2[r0 : r0 + GRAM_CHUNK_ROWS].float().cpu()
        out += (xc.t() @ xc).double()
    return out


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    threshold: float = 6.0,
    hessian: bool = False,
    sample_rows: int = 0,
) -> Calibration:
    """Run ``model`` on ``batches`` and record per-linear-site input statistics.

    ``batches``: an iterable of input-id tensors, dicts of model kwargs, or tuples
    of positional args. ``threshold``: the LLM.int8() outlier threshold counted in
    ``SiteStats.over_threshold``. ``hessian``: also accumulate ``X^T X`` (GPTQ).
    ``sample_rows``: also keep up to that many input rows per site (``SiteStats.sample``;
    the DuQuant recipes build their rotations from it; e.g. 512).
    The model is run as it is (its train/eval mode and weights are not changed).
    """
    if not isinstance(sample_rows, int) or isinstance(sample_rows, bool) or sample_rows < 0:
        raise ValueError(
            f"qcompile.calibrate: sample_rows must be an int >= 0, got {sample_rows!r}"
        )
    from .matmul_modules import is_matmul_module

    names_by_module: dict[torch.nn.Module, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if is_matmul_module(mod):
            names_by_module.setdefault(mod, []).append(f"{name}.weight" if name else "weight")
    if not names_by_module and not any(p.dim() >= 2 for p in model.parameters()):
        raise ValueError(
            "qcompile.calibrate: the model has no nn.Linear, Conv1D or other matrix-shaped "
            "parameters to calibrate"
        )

    per_module: dict[torch.nn.Module, SiteStats] = {}

    # the last input's summary (and X^T X), reused by the next linear reading the same x
    last: dict = {}

    def hook(mod, args):
        x = args[0]
        if mod not in per_module:
            per_module[mod] = SiteStats.empty(x.shape[-1], threshold, hessian, sample_rows)
        if last.get("x") is not x or last["version"] != x._version:
            x2 = x.detach().reshape(-1, x.shape[-1])
            xtx = gram(x2) if hessian else None
            last.update(x=x, version=x._version, summary=summarize(x2, threshold), xtx=xtx)
        per_module[mod].update(x, last["xtx"], last["summary"])

    from . import progress
    from .expert_calibration import ExpertInputs

    handles = [m.register_forward_pre_hook(hook) for m in names_by_module]
    hooked = {id(m.weight) for m in names_by_module}
    experts = ExpertInputs(model, threshold, hessian, sample_rows, hooked)  # MoE: per expert
    n = 0
    try:
        with experts:
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in progress.bar(batches, total=total, desc="lowbit calibrate"):
                args, kwargs = as_call(batch)
                model(*args, **kwargs)
                n += 1
    finally:
        last.clear()
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("qcompile.calibrate: no batches were given")
    # a weight shared with other modules (tied embeddings) is stored under all its names
    param_names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(name)
    stats = {}
    for mod, s in per_module.items():
        for name in names_by_module[mod] + param_names.get(id(mod.weight), []):
            stats[name] = s
    stats.update(experts.stats)
    return Calibration(stats, source=f"calibrate({n} batches)")
