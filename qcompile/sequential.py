"""Quantize a model larger than memory, one decoder block at a time, from its checkpoint.

``quantize_sequential(model, checkpoint, batches, out, options=...)``: ``model`` is built
without weights (accelerate's ``init_empty_weights``); the parameters outside the
repeated blocks are read first, the calibration batches run up to the first block, and
then each block in turn is read from the checkpoint, calibrated on the full-precision
model's hidden states at its input (the same pass gives the next block's inputs, as the
whole-model path sees them; with ``calibrate_on="quantized"``, on the outputs of the
already quantized blocks before it, as GPTQModel and llm-compressor do), and compiled
with ``backend="lowbit"`` (``free_weights``: its full-precision weights are released
after the first call). The linears outside the blocks (the head) come last: with every
block replaced by a stand-in that returns the last block's stored outputs, they are
calibrated on those and compiled alone; the result is written with ``qcompile.save`` and
loads and compiles like any saved model.

Invariant: at most one block's full-precision weights are in memory at a time; the
blocks' hidden states (one file per calibration call) and the stored products of the
blocks already quantized (one file per block, mapped back for ``save``) live in a
temporary folder, so memory holds the block, one call's input and output, and the
parameters outside the blocks, which stay mapped from the checkpoint (``save`` streams
them and every product to the file, giving the pages back as it goes).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import artifacts, folder, memory
from .blocks import BlockCall, capture_block_inputs, find_blocks
from .calibration import Calibration, ModelCall, as_call, calibrate, statistics_for
from .checkpoint import materialize, meta_parameters, open_streamed
from .lowering import derived
from .matmul_modules import is_matmul_module
from .options import Options
from .recipes import get_recipe

CALIBRATE_ON = ("fp", "quantized")  # quantize_sequential's choice of calibration inputs
HEAD_SLICE_TOKENS = 64  # tokens per head calibration call (logits: 64 x vocabulary)


@dataclass
class SequentialResult:
    """What ``quantize_sequential`` did: blocks, calls, seconds per block, the path."""

    out: str
    calls: int
    block_seconds: list[float] = field(default_factory=list)
    head_seconds: float = 0.0
    left_in_fp: dict[str, str] = field(default_factory=dict)  # linear FQN -> why

    @property
    def seconds(self) -> float:
        return sum(self.block_seconds) + self.head_seconds

    def __str__(self) -> str:
        fp = f", {len(self.left_in_fp)} linear(s) left in full precision" * bool(self.left_in_fp)
        return (
            f"quantized {len(self.block_seconds)} blocks one at a time on {self.calls} "
            f"calibration calls in {self.seconds:.1f} s{fp}; saved to {self.out}"
        )


class _HiddenStore:
    """One hidden-state tensor per calibration call, in files of a folder."""

    def __init__(self, root: str, name: str) -> None:
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)

    def put(self, k: int, t: torch.Tensor) -> None:
        torch.save(t.detach().cpu().contiguous(), os.path.join(self.dir, f"{k}.pt"))

    def get(self, k: int) -> torch.Tensor:
        return torch.load(os.path.join(self.dir, f"{k}.pt"), weights_only=True)


class _Calls:
    """The calibration calls of a block with their inputs read from ``store`` one at a
    time (a sized iterable of ``ModelCall`` for ``qcompile.calibrate``)."""

    def __init__(self, calls: list[BlockCall], store: _HiddenStore) -> None:
        self.calls, self.store = calls, store

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        for k, c in enumerate(self.calls):
            yield ModelCall((self.store.get(k), *c.args), c.kwargs)


def quantize_sequential(
    model: nn.Module,
    checkpoint: str | os.PathLike,
    batches,
    out: str | os.PathLike,
    *,
    options: dict,
    tokenizer=None,
    offload_dir: str | os.PathLike | None = None,
    calibrate_on: str = "fp",
) -> SequentialResult:
    """Quantize ``model`` block by block from ``checkpoint`` and save it to ``out``.

    ``model``: built under ``accelerate.init_empty_weights()`` (parameters on the meta
    device, buffers real), e.g. ``AutoModelForCausalLM.from_config(config)``.
    ``checkpoint``: its ``.safetensors`` file or folder. ``batches``: calibration input
    ids (or dicts / tuples of model arguments). ``out``: a folder or a file path, as
    ``qcompile.save`` takes. ``options``: the compile options (``recipe`` and the rest;
    not ``calibration``, which is computed per block). ``offload_dir``: where the hidden
    states go (default: a temporary folder). ``calibrate_on``: ``"fp"`` (each block's
    statistics from the full-precision blocks' outputs, which its calibration pass also
    stores as the next block's inputs: the products are the whole-model path's) or
    ``"quantized"`` (from the quantized blocks' outputs before it; on SmolLM2
    ``w4a16-g64-gptq`` this measured 0.7% worse perplexity on average over four kinds of
    text, docs/results.md). Weight-only, int8 and DuQuant recipes work; every transform
    DuQuant folds stays inside a block or the head.
    """
    if calibrate_on not in CALIBRATE_ON:
        raise ValueError(
            f"quantize_sequential: calibrate_on={calibrate_on!r}; use 'quantized' (the "
            "quantized blocks' outputs) or 'fp' (the full-precision model's hidden states)"
        )
    for key in ("calibration", "free_weights", "handoff"):
        if key in options:
            raise ValueError(
                f"quantize_sequential: drop the option {key!r}; each block is calibrated on "
                "the outputs of the blocks before it, released after it is quantized, and "
                "compiled without inductor"
            )
    opts = Options.parse(dict(options))
    compile_options = {**options, "free_weights": True, "handoff": "eager"}
    recipes = [get_recipe(r) for r in (opts.recipe, *opts.overrides.values())]
    wanted = {"threshold": opts.threshold, **statistics_for(options)}
    blocks_name, blocks = find_blocks(model)
    streamed = open_streamed(model, checkpoint, "quantize_sequential")
    if streamed is None:
        raise ValueError(
            "quantize_sequential: build the model under accelerate.init_empty_weights() so "
            "its weights are read block by block from the checkpoint; a model already in "
            "memory is quantized by torch.compile(model, backend='lowbit', ...)"
        )
    batches = list(batches)
    if not batches:
        raise ValueError("quantize_sequential: no calibration batches were given")
    if hasattr(model, "tie_weights"):  # HF: a meta-built model is not tied yet
        model.tie_weights()
    materialize(model, streamed, meta_parameters(model, exclude=blocks_name))
    calls = capture_block_inputs(model, blocks[0], batches)
    for p in model.parameters():  # the embedding rows the capture read
        memory.drop_file_pages(p)
    result = SequentialResult(os.fspath(out), len(calls))
    with (
        tempfile.TemporaryDirectory(dir=offload_dir, prefix="lowbit-sequential-") as tmp,
        memory.keep_file_mappings(),  # the checkpoint stays mapped; pages are given back
    ):
        inputs = _HiddenStore(tmp, "a")
        for k, c in enumerate(calls):
            inputs.put(k, c.hidden)
            c.hidden = None  # the store holds it
        outputs = _HiddenStore(tmp, "b")
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            name = f"{blocks_name}.{i}"
            materialize(model, streamed, meta_parameters(model, prefix=f"{name}."))
            at_path = _AtPath(name, block)  # the block's linears keep the model's FQNs
            if calibrate_on == "fp":  # one fp pass: the statistics and the next inputs
                with _outputs_to(block, outputs) as returned:
                    stats = calibrate(at_path, _Calls(calls, inputs), **wanted)
                _quantize_block(at_path, calls[:1], inputs, None, stats, compile_options)
                shape = returned["shape"]
            else:
                stats = calibrate(at_path, _Calls(calls, inputs), **wanted)
                shape = _quantize_block(at_path, calls, inputs, outputs, stats, compile_options)
            _check_quantized(block, name, result)
            _offload_products(block, os.path.join(tmp, f"products-{i}.pt"))
            inputs, outputs = outputs, inputs
            result.block_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _quantize_head(model, blocks, inputs, batches, shape, recipes, wanted, compile_options)
        result.head_seconds = time.perf_counter() - t0
        for name, mod in model.named_modules():
            if is_matmul_module(mod) and not name.startswith(blocks_name + "."):
                if not artifacts.is_freed(mod.weight) and not artifacts.artifacts_of(mod.weight):
                    result.left_in_fp[name] = "outside the blocks, not quantized by the recipe"
        folder.save(model, out, tokenizer=tokenizer, options=dict(options))  # reads the files
    return result


def _hidden_states(out) -> tuple[torch.Tensor, str]:
    """A block's output as ``(hidden states, "tuple" or "tensor")``: how it returns them."""
    return (out[0], "tuple") if isinstance(out, tuple) else (out, "tensor")


@contextmanager
def _outputs_to(block: nn.Module, store: _HiddenStore):
    """While inside, each call of ``block`` stores its hidden states in ``store`` (call
    k under k); yields a dict whose ``"shape"`` says how the block returns them."""
    seen = {"calls": 0, "shape": "tensor"}

    def hook(module, args, out):
        hidden, seen["shape"] = _hidden_states(out)
        store.put(seen["calls"], hidden)
        seen["calls"] += 1

    handle = block.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _quantize_block(block, calls, inputs, outputs, stats: Calibration, compile_options) -> str:
    """Compile ``block`` with lowbit on ``stats`` and run it on every call's input (the
    first call quantizes it and releases its fp weights), storing the outputs in
    ``outputs`` (when given); returns how the block returns them (``_hidden_states``)."""
    compiled = torch.compile(
        block, backend="lowbit", options={**compile_options, "calibration": stats}
    )
    shape = "tensor"
    try:
        with torch.no_grad():
            for k, c in enumerate(calls):
                hidden, shape = _hidden_states(compiled(inputs.get(k), *c.args, **c.kwargs))
                if outputs is not None:
                    outputs.put(k, hidden)
        return shape
    finally:
        del compiled
        torch._dynamo.reset()  # the block's graphs go; its stored products stay
        memory.release_free_pages()


def _offload_products(block: nn.Module, path: str) -> None:
    """Move the stored products of ``block``'s parameters to the file ``path`` and map
    them back (``save`` reads them from there); the layouts the lowering derived from
    them for the block's kernels go, as those kernels did."""
    arts = [a for p in block.parameters() for a in artifacts.artifacts_of(p)]
    tensors = {
        f"{i}/{role}": t for i, a in enumerate(arts) for role, t in derived.products(a).items()
    }
    torch.save(tensors, path)
    del tensors
    mapped = torch.load(path, mmap=True, weights_only=True)
    for a in arts:
        a.tensors = {}
        derived.forget(a)
    for key, t in mapped.items():
        i, _, role = key.partition("/")
        arts[int(i)].tensors[role] = t
    memory.release_free_pages()


def _check_quantized(block: nn.Module, name: str, result: SequentialResult) -> None:
    """Every linear of the block is quantized (its weight released) or reported."""
    for sub, mod in block.named_modules():
        if is_matmul_module(mod) and not artifacts.is_freed(mod.weight):
            result.left_in_fp[f"{name}.{sub}"] = "left in full precision by the recipe"


class _AtPath(nn.Module):
    """Calls ``block`` from a root where it sits at ``name`` (e.g. ``model.layers.3``),
    so calibration, products and transform plans name its linears as the whole model
    does."""

    def __init__(self, name: str, block: nn.Module) -> None:
        super().__init__()
        self.path = tuple(name.split("."))
        holder: nn.Module = self
        for part in self.path[:-1]:
            child = nn.Module()
            holder.add_module(part, child)
            holder = child
        holder.add_module(self.path[-1], block)

    def forward(self, *args, **kwargs):
        block = self
        for part in self.path:  # by attribute, so dynamo names the parameters from here
            block = getattr(block, part)
        return block(*args, **kwargs)


class _Replay(nn.Module):
    """Stands in for a block while the head is calibrated: returns the last block's
    stored output for the current call (attributes the model reads, e.g. a layer's
    attention type, come from the block it replaces)."""

    def __init__(self, block: nn.Module, source: dict, shape: str) -> None:
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: calibration does not see it
        self.source, self.shape = source, shape

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        out = self.source["hidden"]
        return (out,) if self.shape == "tuple" else out


def _quantize_head(model, blocks, inputs, batches, shape, recipes, wanted, compile_options):
    """Quantize the linears outside the blocks (the head; a tied embedding with it) with
    the blocks replaced by ``_Replay``: calibrated on the last block's stored outputs
    (where a recipe calibrates), then compiled and run once, so the graph holds the head
    alone and the blocks' stored products are not touched."""
    source: dict = {}

    def replayed():  # input ids in slices: the head is per token, its logits stay small
        for k, batch in enumerate(batches):
            hidden = inputs.get(k)
            if not isinstance(batch, torch.Tensor) or hidden.dim() != 3:
                source["hidden"] = hidden
                yield batch
                continue
            for t in range(0, batch.shape[1], HEAD_SLICE_TOKENS):
                source["hidden"] = hidden[:, t : t + HEAD_SLICE_TOKENS]
                yield batch[:, t : t + HEAD_SLICE_TOKENS]

    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Replay(block, source, shape)
    try:
        stats = Calibration({}, source="the head's recipes use no statistics")
        head = any(is_matmul_module(m) for m in model.modules())  # blocks are hidden now
        if head and any(r.calibrated for r in recipes):
            stats = calibrate(model, replayed(), **wanted)
        for p in model.parameters():  # the pages the head read are re-read when needed
            memory.drop_file_pages(p)
        compiled = torch.compile(
            model, backend="lowbit", options={**compile_options, "calibration": stats}
        )
        first, hidden = batches[0], inputs.get(0)
        if isinstance(first, torch.Tensor) and hidden.dim() == 3:
            first, hidden = first[:, :1], hidden[:, :1]  # one token: no prefill temporaries
        source["hidden"] = hidden
        args, kwargs = as_call(first)
        with torch.no_grad():
            compiled(*args, **{"use_cache": False, **kwargs})
        del compiled
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        source.clear()
        torch._dynamo.reset()
