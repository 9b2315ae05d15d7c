"""E2E-QP (EfficientQAT): train only the step sizes, end to end, over frozen packed codes.

:func:`prepare_e2e_qp` swaps every linear trained by ``qcompile.block_ap`` for a
:class:`FrozenCodesLinear`: it reads the packed codes and zero points (buffers) through
``lowbit::dequant_linear`` and trains the per-group step sizes (an ``nn.Parameter``);
the linear's full-precision weight is released meanwhile, so training holds the low-bit
model, not the fp one. Every other parameter stops requiring grad, so a user's own loop
over the parameters that require grad trains exactly the step sizes.
:func:`finish_e2e_qp` puts the linears back with the trained step sizes committed
(``qcompile.qat_convert``, method ``block-ap+e2e-qp``) and restores ``requires_grad``.
:func:`e2e_qp` is both around a causal-LM cross-entropy loop with AdamW.
Invariant: the model after :func:`finish_e2e_qp` computes exactly what the prepared
model computed with the final step sizes rounded onto fp16's grid (the CPU kernels'
format; at most 2^-11 relative), and that is what lowbit compiles.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qcompile import artifacts
from qcompile.block_ap import TrainingDivergedError, check_finite
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.kernels.packing import unpack
from qcompile.lowering import derived
from qcompile.qat import mark_quantizer_parameter
from qcompile.qat_convert import QAT_META, store_trained, trained_artifact

E2E_QP_DEFAULTS = {"epochs": 1, "lr": 2e-5}
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> grad flags


class FrozenCodesLinear(nn.Module):
    """A linear over frozen packed codes with trainable step sizes (see module doc)."""

    def __init__(self, linear: nn.Linear, art: artifacts.Artifact) -> None:
        super().__init__()
        tensors = derived.products(art)
        self.bits, self.group_size = art.meta["bits"], art.meta["group_size"]
        self.recipe = art.meta[QAT_META]["recipe"]
        self.method = art.meta["method"]
        self.register_buffer("packed", tensors["packed"])
        self.register_buffer("zeros", tensors["zeros"])
        self.scales = mark_quantizer_parameter(nn.Parameter(tensors["scales"].clone()))
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.original = (linear,)  # not a submodule: its fp weight is not a parameter here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowbit.dequant_linear(
            x, self.packed, self.scales, self.zeros, self.bias, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        n, k = self.packed.shape[0], self.scales.shape[1] * self.group_size
        return f"in_features={k}, out_features={n}, bits={self.bits}, group={self.group_size}"


def prepare_e2e_qp(model: nn.Module) -> list[nn.Parameter]:
    """Swap the Block-AP-trained linears for :class:`FrozenCodesLinear` and return their
    step sizes (the only parameters left requiring grad)."""
    if model in _PREPARED:
        raise ValueError("prepare_e2e_qp: the model is already prepared; finish_e2e_qp it first")
    found = [(n, m, trained_artifact(m)) for n, m in model.named_modules()]
    found = [(n, m, a) for n, m, a in found if a is not None and isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            "prepare_e2e_qp: no linear of this model was trained by qcompile.block_ap; "
            "run block_ap(model, batches, recipe=...) first"
        )
    _PREPARED[model] = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scales = []
    for name, linear, art in found:
        frozen = FrozenCodesLinear(linear, art)
        _set_submodule(model, name, frozen)
        linear.weight.data = artifacts.placeholder(linear.weight.shape, linear.weight.dtype)
        scales.append(frozen.scales)
    return scales


def finish_e2e_qp(model: nn.Module, method: str = "block-ap+e2e-qp") -> int:
    """Commit the trained step sizes and put the linears back; returns how many."""
    flags = _PREPARED.pop(model, None)
    if flags is None:
        raise ValueError("finish_e2e_qp: the model was not prepared by prepare_e2e_qp")
    done = 0
    for name, frozen in list(model.named_modules()):
        if not isinstance(frozen, FrozenCodesLinear):
            continue
        (linear,) = frozen.original
        k = frozen.scales.shape[1] * frozen.group_size
        q = unpack(frozen.packed, frozen.bits, k)
        scales = frozen.scales.detach().clone()
        store_trained(linear, name, frozen.recipe, method, q, scales, frozen.zeros)
        _set_submodule(model, name, linear)
        done += 1
    for p, flag in flags.items():
        p.requires_grad_(flag)
    return done


@dataclass
class E2EQPResult:
    steps: int
    tokens: int  # per epoch
    loss_first: float  # mean causal-LM loss over the first epoch's first tenth of steps
    loss_last: float  # ... over the last tenth of steps
    seconds: float

    def __str__(self) -> str:
        return (
            f"E2E-QP: {self.steps} steps ({self.tokens} tokens per epoch), loss "
            f"{self.loss_first:.4f} -> {self.loss_last:.4f}, {self.seconds:.1f} s"
        )


def e2e_qp(
    model: nn.Module,
    batches,
    *,
    epochs: int = E2E_QP_DEFAULTS["epochs"],
    lr: float = E2E_QP_DEFAULTS["lr"],
    seed: int = 0,
    progress: bool = True,
) -> E2EQPResult:
    """Train the step sizes of a Block-AP model on ``batches`` (input ids ``[B, T]``)
    with the causal-LM cross-entropy and AdamW, in an order drawn from ``seed``; then
    commit them. A non-finite loss or gradient restores the step sizes and raises
    :class:`TrainingDivergedError`.

    Under ``torch.distributed`` (initialised, more than one process) the model runs in
    ``DistributedDataParallel``: each process passes its own share of the batches (the
    same number on every process), and the step sizes stay equal on all of them."""
    batches = [_input_ids(b) for b in batches]
    if not batches:
        raise ValueError("e2e_qp needs at least one batch of training tokens; got none")
    if not isinstance(epochs, int) or epochs < 1 or not lr > 0:
        raise ValueError(f"e2e_qp: need epochs >= 1 and lr > 0, got {epochs!r} and {lr!r}")
    started = time.perf_counter()
    scales = prepare_e2e_qp(model)
    initial = [s.detach().clone() for s in scales]
    runner = _data_parallel(model)
    opt = torch.optim.AdamW(scales, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    losses = []
    try:
        show = progress and _rank() == 0
        with tqdm(total=epochs * len(batches), desc="E2E-QP", disable=not show) as bar:
            for _ in range(epochs):
                for i in torch.randperm(len(batches), generator=order).tolist():
                    loss = causal_lm_loss(runner, batches[i])
                    check_finite(loss, "the E2E-QP loss", len(losses) + 1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for s in scales:
                        check_finite(s.grad, "a step-size gradient", len(losses) + 1)
                    opt.step()
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
    except (TrainingDivergedError, KeyboardInterrupt):
        with torch.no_grad():
            for s, s0 in zip(scales, initial):
                s.copy_(s0)
        finish_e2e_qp(model, method=_method_before(model))
        raise
    finish_e2e_qp(model)
    tenth = max(1, len(losses) // 10)
    return E2EQPResult(
        len(losses),
        sum(b.numel() for b in batches),
        sum(losses[:tenth]) / tenth,
        sum(losses[-tenth:]) / tenth,
        time.perf_counter() - started,
    )


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _data_parallel(model: nn.Module) -> nn.Module:
    """``model`` in DDP when several processes train together, else ``model``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return nn.parallel.DistributedDataParallel(model)
    return model


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``ids [B, T]`` (float32)."""
    out = model(ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _input_ids(batch) -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(
            "e2e_qp: each batch must be input ids [B, T] with T >= 2 (or a dict with "
            f"'input_ids'); got {type(batch).__name__}"
        )
    return ids


def _method_before(model: nn.Module) -> str:
    return next(m.method for m in model.modules() if isinstance(m, FrozenCodesLinear))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
