"""Block-AP (EfficientQAT): train each block's weights with their quantizer, block by block.

For each repeated block (``qcompile.blocks``), in order: the full-precision block's
outputs on the full-precision inputs are the targets; every linear of the block is
fake-quantized (``qcompile.qat``, initialised from round-to-nearest or GPTQ); its weights,
step sizes and zero points are trained with AdamW to minimise the mean squared error
between the quantized block, fed the outputs of the already-quantized blocks before it,
and the targets. The block is then committed (``qcompile.qat_convert``: weights become
their quantized values, packed products stored for the compile) and its quantized outputs
feed the next block; a block whose trained error is not below its starting error keeps
its start (as GPTQ keeps RTN where it does not help). Invariant: after :func:`block_ap`, every trained linear computes
exactly what ``torch.compile(..., backend="lowbit", options={"recipe": recipe})`` will
compute for it. Block inputs are kept on the CPU between blocks; the training memory is
one block and its inputs. A non-finite loss or gradient restores the block it happened in
and raises :class:`TrainingDivergedError`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from qcompile import release
from qcompile.blocks import BlockCall, capture_block_inputs, find_blocks
from qcompile.calibration import gram
from qcompile.checkpoint import materialize, meta_parameters, open_streamed
from qcompile.gptq import gptq_quantize
from qcompile.qat import prepare_qat
from qcompile.qat_convert import commit_linear, snap_scales
from qcompile.recipes import get_recipe

# defaults measured on SmolLM2-135M (docs/results.md, "Training mode")
BLOCK_AP_DEFAULTS = {"init": "gptq", "epochs": 2, "lr_weights": 1e-4, "lr_qparams": 1e-5}


class TrainingDivergedError(FloatingPointError):
    """A loss or gradient became NaN or infinite during lowbit's training mode."""


@dataclass
class BlockStat:
    name: str
    mse_init: float  # mean squared error of the initialised block (RTN or GPTQ)
    mse_final: float  # after training, on the same samples
    seconds: float
    kept_start: bool = False  # training did not lower the error: the start was kept


@dataclass
class BlockAPResult:
    recipe: str
    init: str
    samples: int
    tokens: int  # tokens per epoch
    epochs: int
    blocks: list[BlockStat] = field(default_factory=list)
    left_in_fp: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"Block-AP {self.recipe} (init {self.init}): {len(self.blocks)} blocks, "
            f"{self.samples} samples x {self.epochs} epochs ({self.tokens} tokens each), "
            f"{self.seconds:.1f} s",
            f"{'block':<24} {'mse init':>12} {'mse trained':>12} {'s':>7}",
        ]
        lines += [
            f"{b.name:<24} {b.mse_init:>12.4g} {b.mse_final:>12.4g} {b.seconds:>7.1f}"
            + ("  (kept its start: training did not lower the error)" if b.kept_start else "")
            for b in self.blocks
        ]
        lines += [f"left in full precision: {n} ({why})" for n, why in self.left_in_fp.items()]
        return "\n".join(lines)


def block_ap(
    model: nn.Module,
    batches,
    recipe: str = "w2a16-g64",
    *,
    init: str = BLOCK_AP_DEFAULTS["init"],
    epochs: int = BLOCK_AP_DEFAULTS["epochs"],
    lr_weights: float = BLOCK_AP_DEFAULTS["lr_weights"],
    lr_qparams: float = BLOCK_AP_DEFAULTS["lr_qparams"],
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> BlockAPResult:
    """Quantize ``model``'s repeated blocks to ``recipe`` (``w{b}a16-g{G}``) by Block-AP,
    in place; then ``torch.compile(model, backend="lowbit", options={"recipe": recipe})``
    runs the trained weights in the packed kernels.

    ``batches``: input ids ``[B, T]`` (or dicts / tuples of model arguments), e.g.
    ``qcompile.corpus.calibration_batches``; each is one optimizer step per epoch. More
    samples generalise better (SmolLM2 ``w4a16-g64``, with E2E-QP: 96 x 512 tokens
    instead of 32 took a kind of text never trained on from 1.073 to 1.013 of fp
    perplexity; docs/results.md); the time grows with them.
    ``init``: ``"gptq"`` (GPTQ on each block's quantized inputs, damping 0.1, clip
    search; training starts from the weight GPTQ rounded) or ``"rtn"``. Linears outside
    the blocks stay as they are (listed in the result).
    ``checkpoint``: for a model built on the meta device, its ``.safetensors`` file (or
    folder): the parameters outside the blocks are read first, each block's when it is
    trained, and each trained linear's full-precision weight is released once the next
    block's inputs are computed (``qcompile.checkpoint``), so memory holds one block in
    full precision at a time.
    """
    r = get_recipe(recipe)
    _check_arguments(recipe, r, init, epochs, lr_weights, lr_qparams)
    batches = list(batches)
    if not batches:
        raise ValueError("block_ap needs at least one batch of training tokens; got none")
    started = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    for name, mod in blocks.named_modules():
        if isinstance(mod, nn.Linear) and mod.in_features % r.group_size:
            raise ValueError(
                f"block_ap: {recipe!r} needs in_features divisible by {r.group_size}, but "
                f"{blocks_name}.{name} has {mod.in_features}; choose another group size"
            )
    streamed = open_streamed(model, checkpoint, "block_ap")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        if streamed is not None:  # what runs before and after the blocks
            if hasattr(model, "tie_weights"):  # HF: a meta-built model is not tied yet
                model.tie_weights()
            materialize(model, streamed, meta_parameters(model, exclude=blocks_name))
        calls = capture_block_inputs(model, blocks[0], batches)
        result = BlockAPResult(
            recipe,
            init,
            len(calls),
            sum(c.hidden.shape[0] * c.hidden.shape[1] for c in calls),
            epochs,
        )
        in_blocks = {m for m in blocks.modules() if isinstance(m, nn.Linear)}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod not in in_blocks:
                result.left_in_fp[name] = f"outside the repeated blocks ({blocks_name})"
        fp_inputs = [c.hidden for c in calls]
        q_inputs = fp_inputs
        bar = tqdm(total=len(blocks) * epochs * len(calls), desc="Block-AP", disable=not progress)
        with bar:
            for i, block in enumerate(blocks):
                name = f"{blocks_name}.{i}"
                t0 = time.perf_counter()
                if streamed is not None:
                    materialize(model, streamed, meta_parameters(model, prefix=f"{name}."))
                targets = _run(block, calls, fp_inputs)
                stat, q_outputs = _train_block(
                    block,
                    name,
                    calls,
                    q_inputs,
                    targets,
                    r,
                    init,
                    epochs,
                    lr_weights,
                    lr_qparams,
                    bar,
                )
                stat.seconds = time.perf_counter() - t0
                result.blocks.append(stat)
                q_inputs, fp_inputs = q_outputs, targets
                if streamed is not None:  # the packed products stay; the compile uses them
                    for n, m in _linears(block):
                        release.free_weight(m.weight, [(f"{name}.{n}", m)])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    result.seconds = time.perf_counter() - started
    return result


def _check_arguments(recipe, r, init, epochs, lr_weights, lr_qparams) -> None:
    if not r.weight_only or r.gptq:
        raise ValueError(
            f"block_ap trains weight-only round-to-nearest recipes (w{{2,3,4,8}}a16-g{{32,64,128}}); "
            f"got {recipe!r}" + ("; for a GPTQ start pass init='gptq'" if r.gptq else "")
        )
    if init not in ("rtn", "gptq"):
        raise ValueError(f"block_ap: init must be 'rtn' or 'gptq', got {init!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"block_ap: epochs must be a positive int, got {epochs!r}")
    if not lr_weights >= 0 or not lr_qparams > 0:
        raise ValueError(
            f"block_ap: need lr_weights >= 0 and lr_qparams > 0, got {lr_weights!r} and "
            f"{lr_qparams!r}"
        )


def _device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def _run(block: nn.Module, calls: list[BlockCall], inputs: list[torch.Tensor]) -> list:
    dev = _device(block)
    with torch.no_grad():
        return [c.run(block, x.to(dev)).cpu() for c, x in zip(calls, inputs)]


def _errors(block, calls, inputs, targets) -> tuple[float, list]:
    """The block's mean squared error to ``targets`` and its outputs."""
    outs = _run(block, calls, inputs)
    mse = sum(float((o.float() - t.float()).pow(2).mean()) for o, t in zip(outs, targets))
    return mse / len(outs), outs


def _train_block(block, name, calls, inputs, targets, r, init, epochs, lr_w, lr_qp, bar):
    snapshot = {k: v.detach().clone() for k, v in block.state_dict().items()}
    originals = {n: m.weight.detach().clone() for n, m in _linears(block)}
    kept_start = False
    try:
        for x, t in zip(inputs, targets):
            check_finite(x, f"an input of {name}", 0)
            check_finite(t, f"a full-precision output of {name}", 0)
        weights, qparams = _prepare_block(block, calls, inputs, r, init)
        start = [p.detach().clone() for p in weights + qparams]
        for w in weights:
            w.requires_grad_(lr_w > 0)
        mse_init, _ = _errors(block, calls, inputs, targets)
        opt = torch.optim.AdamW(
            [{"params": weights, "lr": lr_w}, {"params": qparams, "lr": lr_qp}], weight_decay=0.0
        )
        dev = _device(block)
        order = torch.Generator().manual_seed(0)  # the same sample order for every block
        step = 0
        for _ in range(epochs):
            for j in torch.randperm(len(calls), generator=order).tolist():
                step += 1
                out = calls[j].run(block, inputs[j].to(dev))
                loss = torch.nn.functional.mse_loss(out.float(), targets[j].to(dev).float())
                check_finite(loss, f"the loss of {name}", step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p in weights + qparams:
                    if p.grad is not None:
                        check_finite(p.grad, f"a gradient in {name}", step)
                opt.step()
                bar.update(1)
                bar.set_postfix(block=name, loss=f"{loss.item():.4g}")
        snap_scales(block)  # what the commit stores: the outputs below stay exact
        mse_final, outputs = _errors(block, calls, inputs, targets)
        if not mse_final < mse_init:  # training did not help this block: keep its start
            with torch.no_grad():
                for p, p0 in zip(weights + qparams, start):
                    p.copy_(p0)
            mse_final, outputs = mse_init, _run(block, calls, inputs)
            kept_start = True
    except BaseException:
        _restore(block, snapshot)
        raise
    for n, m in _linears(block):
        commit_linear(m, f"{name}.{n}", r.name, "block-ap", reference=originals[n])
        m.weight.requires_grad_(False)
    # committing changes no output (tests): these are the next block's quantized inputs
    return BlockStat(name, mse_init, mse_final, 0.0, kept_start), outputs


def _prepare_block(block, calls, inputs, r, init) -> tuple[list, list]:
    """Fake-quantize the block's linears from ``init``; ``(weights, step sizes and zero
    points)`` to train."""
    grids = _gptq_init(block, calls, inputs, r) if init == "gptq" else {}
    prepare_qat(block, r.name)
    quantizers = {n: m.parametrizations.weight[0] for n, m in _linears(block)}
    with torch.no_grad():
        for n, (scales, zeros) in grids.items():
            quantizers[n].scale.copy_(scales)
            quantizers[n].zero.copy_(zeros)
    weights = [m.parametrizations.weight.original for _, m in _linears(block)]
    qparams = [p for fq in quantizers.values() for p in (fq.scale, fq.zero)]
    return weights, qparams


def _linears(block: nn.Module):
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def _gptq_init(block, calls, inputs, r) -> dict:
    """Replace each linear's weight by the weight GPTQ rounded (after its error
    compensation; Hessians from the block's current inputs), which rounds to GPTQ's codes;
    returns each linear's GPTQ ``(scales, zeros)``."""
    hessians: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, args):
        x2 = args[0].detach().reshape(-1, args[0].shape[-1])
        hessians[mod] = hessians.get(mod, 0) + gram(x2)

    handles = [m.register_forward_pre_hook(hook) for _, m in _linears(block)]
    try:
        _run(block, calls, inputs)
    finally:
        for h in handles:
            h.remove()
    grids = {}
    for n, m in _linears(block):
        w = m.weight.detach()
        res = gptq_quantize(
            w,
            hessians[m],
            r.weight_bits,
            r.group_size,
            damp=0.1,
            clip_search=True,
            scale_dtype=w.dtype,
        )
        with torch.no_grad():  # the compensated weight GPTQ rounded: it rounds to res.q
            m.weight.copy_(res.latent)
        grids[n] = (res.scales, res.zeros)
    return grids


def _restore(block: nn.Module, snapshot: dict) -> None:
    for _, m in _linears(block):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    block.load_state_dict(snapshot)


def check_finite(t: torch.Tensor, what: str, step: int) -> None:
    """Raise :class:`TrainingDivergedError` naming ``what`` and ``step`` unless ``t`` is
    finite everywhere."""
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise TrainingDivergedError(
            f"{what} is {bad} at step {step}; nothing was committed (the weights and step "
            "sizes being trained keep their values from before this phase). Lower the "
            "learning rates or check the batches for empty or extreme inputs"
        )
