"""Per-expert input statistics of Mixture-of-Experts blocks, recorded during ``calibrate``.

A Hugging Face MoE block multiplies the tokens routed to expert ``e`` by ``W[e]`` of a
3-D parameter ``W`` (``[E, out, in]``, or ``[E, in, out]``), either in one grouped
product (``torch._grouped_mm(x, W or W.mT, offs=...)``: rows sorted by expert, ``offs`` the
running row count) or per expert (``F.linear(x_e, W[e])``). A torch-function mode sees
both forms as they run and records each expert's rows under ``<W's FQN>[e]``: the
statistics of the tokens routed to that expert. Every expert of a parameter seen gets an
entry; one no calibration token reached has ``rows == 0``.

The same mode records ``F.linear`` calls by a 2-D parameter no hooked module owns (a
router module that calls ``F.linear`` with its own weight) under the parameter's name.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .calibration import SiteStats


class ExpertInputs(TorchFunctionMode):
    """Record the inputs of every expert of the 3-D parameters ``names`` (id -> FQN)."""

    def __init__(
        self,
        model: torch.nn.Module,
        threshold: float,
        hessian: bool,
        sample_rows: int,
        hooked: set[int] = frozenset(),
    ):
        super().__init__()
        self.names = {
            id(p): name
            for name, p in model.named_parameters()
            if p.dim() == 3 and p.is_floating_point()
        }
        self.params = {id(p): p for p in model.parameters() if id(p) in self.names}
        # 2-D weights no hook records (id -> name)
        self.plain = {
            id(p): name
            for name, p in model.named_parameters()
            if p.dim() == 2 and p.is_floating_point() and id(p) not in hooked
        }
        self.new = lambda k: SiteStats.empty(k, threshold, hessian, sample_rows)
        self.stats: dict[str, SiteStats] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.names and "grouped_mm" in name and len(args) >= 2:
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            self._grouped(args[0], args[1], offs)
        elif func is torch.nn.functional.linear and len(args) >= 2:
            if id(args[1]) in self.plain:
                x = args[0].detach()
                fqn = self.plain[id(args[1])]
                self.stats.setdefault(fqn, self.new(x.shape[-1])).update(x)
            elif self.names:
                self._one(args[0], args[1])
        return func(*args, **kwargs)

    def _param_of(self, w):
        base = w if id(w) in self.params else getattr(w, "_base", None)
        return self.params.get(id(base)) if base is not None else None

    def _entries(self, param, in_features: int) -> list[SiteStats]:
        fqn = self.names[id(param)]
        return [
            self.stats.setdefault(f"{fqn}[{e}]", self.new(in_features))
            for e in range(param.shape[0])
        ]

    def _grouped(self, x, w, offs) -> None:
        param = self._param_of(w) if isinstance(w, torch.Tensor) else None
        if param is None or offs is None or w.dim() != 3 or x.dim() != 2:
            return
        entries = self._entries(param, x.shape[-1])
        start = 0
        for e, end in enumerate(offs.tolist()[: len(entries)]):
            if end > start:
                entries[e].update(x[start:end])
            start = end

    def _one(self, x, w) -> None:
        param = self._param_of(w) if isinstance(w, torch.Tensor) else None
        if param is None or w.dim() != 2 or w._base is None:
            return
        expert = (w.storage_offset() - param.storage_offset()) // param.stride(0)
        rows = x.detach().reshape(-1, x.shape[-1])
        entries = self._entries(param, x.shape[-1])
        if rows.shape[0] and 0 <= expert < len(entries):
            entries[expert].update(rows)
