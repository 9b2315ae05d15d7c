"""The repeated blocks of a model, found generically, and the inputs they are called with.

A decoder-only LM is an embedding, a stack of identical blocks (an ``nn.ModuleList`` of
one class holding linears) and a head. :func:`find_blocks` picks the largest such list,
so no per-model code is needed; :func:`capture_block_inputs` runs the model up to the
first block and keeps each call's hidden states and the other arguments the model passes
every block (attention mask, position embeddings, ...), so the blocks can be run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcompile.calibration import as_call


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` of two or more modules of one class
    containing ``nn.Linear`` layers that holds the most parameters."""
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        candidates.append((sum(p.numel() for p in mod.parameters()), name, mod))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of two or more "
            "modules of one class holding nn.Linear layers); block-wise training needs them"
        )
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, blocks


@dataclass
class BlockCall:
    """One call of a block: its hidden states and the other arguments, as the model
    passed them (the hidden states are replaced block by block)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class _Reached(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> list[BlockCall]:
    """Run ``model`` on each batch (input ids, a dict of kwargs or a tuple of args) up to
    ``block`` and return its calls, hidden states detached and on the CPU."""
    calls: list[BlockCall] = []

    def stop(mod, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, args = args[0], tuple(args[1:])
        else:
            hidden = kwargs.pop("hidden_states")
        calls.append(BlockCall(hidden.detach().cpu(), args, kwargs))
        raise _Reached

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = as_call(batch)
                kwargs.setdefault("use_cache", False)
                try:
                    model(*args, **kwargs)
                except _Reached:
                    continue
                raise ValueError(f"the model returned without calling {type(block).__name__}")
    finally:
        handle.remove()
    return calls
