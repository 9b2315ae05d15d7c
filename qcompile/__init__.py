"""lowbit: a torch.compile backend that quantizes LLMs by graph passes.

    fast = torch.compile(model, backend="lowbit", options={"recipe": "int8-mixed"})

The package is ``qcompile``; its sub-packages ``qcompile.passes``,
``qcompile.lowering`` and ``qcompile.kernels`` live in the repository's
``passes/``, ``lowering/`` and ``kernels/`` folders.
"""

from __future__ import annotations

from .backend import LowbitRecompileWarning, lowbit_backend
from .block_ap import TrainingDivergedError, block_ap
from .calibration import Calibration, SiteStats, calibrate
from .coverage import LowbitCoverageWarning, model_report
from .e2e_qp import e2e_qp, finish_e2e_qp, prepare_e2e_qp
from .explain import explain
from .export import export
from .folder import from_pretrained, load, save
from .memory import memory_report
from .options import Options
from .pipeline import REPORTS
from .qat import prepare_qat
from .recipes import RECIPES
from .report import Report, SiteRow
from .sequential import quantize_sequential

__all__ = [
    "Calibration",
    "LowbitCoverageWarning",
    "LowbitRecompileWarning",
    "Options",
    "RECIPES",
    "Report",
    "SiteRow",
    "SiteStats",
    "TrainingDivergedError",
    "block_ap",
    "calibrate",
    "compiled_reports",
    "e2e_qp",
    "explain",
    "export",
    "finish_e2e_qp",
    "from_pretrained",
    "load",
    "memory_report",
    "lowbit_backend",
    "model_report",
    "prepare_e2e_qp",
    "prepare_qat",
    "quantize_sequential",
    "save",
]


def compiled_reports() -> list[Report]:
    """Reports of the graphs lowbit compiled in this process, oldest first."""
    return list(REPORTS)


def _register_if_not_installed() -> None:
    """Register "lowbit" with dynamo only when no installed entry point provides it
    (e.g. running from a source tree); registering twice raises in torch."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "lowbit" in registry._COMPILER_FNS:
        return
    if any(ep.name == "lowbit" for ep in entry_points(group="torch_dynamo_backends")):
        return
    registry.register_backend(lowbit_backend, name="lowbit")


_register_if_not_installed()
