"""Modules that multiply their input by their own ``weight``, and the weight's layout.

``nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``) store ``[out, in]``;
transformers' ``Conv1D`` (GPT-2 and its descendants) stores ``[in, out]`` and computes
``addmm(bias, x, weight)``. Calibration hooks them, ``free_weights`` releases their
weights and ``qcompile.save`` stores their weights quantized.
"""

from __future__ import annotations

import torch

OUT_IN = "out_in"  # the F.linear layout
IN_OUT = "in_out"  # transposed: y = x @ W (GPT-2 Conv1D)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def weight_layout(module: torch.nn.Module) -> str | None:
    """The layout of ``module.weight`` when the module is a matmul by it, else None."""
    if isinstance(module, torch.nn.Linear):
        return OUT_IN
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return IN_OUT
    return None


def is_matmul_module(module: torch.nn.Module) -> bool:
    return weight_layout(module) is not None


NOT_MATMUL_OWNERS = (torch.nn.Embedding, torch.nn.EmbeddingBag, torch.nn.modules.conv._ConvNd)


def is_expert_tensor(param: torch.Tensor, owner: torch.nn.Module) -> bool:
    """Whether ``param`` may hold one matrix per Mixture-of-Experts expert (``[E, out,
    in]`` or ``[E, in, out]``, multiplied per expert: passes/_expert_sites.py)."""
    return (
        param.dim() == 3 and param.is_floating_point() and not isinstance(owner, NOT_MATMUL_OWNERS)
    )
