"""The ``lowbit`` dynamo backend: run the pass pipeline, then hand off to inductor.

Registered under the entry-point group ``torch_dynamo_backends`` (pyproject), so
``torch.compile(model, backend="lowbit")`` works without ``import qcompile``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
import weakref

import torch
from torch import fx

from qcompile.graph_utils import QUANTIZED_TABLES, REPLACED_WEIGHTS

from . import artifacts, memory, progress
from .context import frame_root
from .options import Options
from .pipeline import run_pipeline
from .qat import is_quantizer_parameter
from .release import free_weight, linear_owners

log = logging.getLogger("qcompile")


class LowbitRecompileWarning(UserWarning):
    """Dynamo hit its recompile limit: calls that follow run the fp model eagerly."""


def lowbit_backend(gm: fx.GraphModule, example_inputs, *, options=None, mode=None):
    if mode is not None:
        raise ValueError(
            f"lowbit does not take mode={mode!r}; pass settings as options={{...}} "
            f"(valid keys: {', '.join(Options.__dataclass_fields__)})"
        )
    opts = Options.parse(options)
    watch_recompile_limit()
    guard_parameter_identity(gm)
    allow_graphs_per_model_copy(gm)
    trained = training_quantizers(example_inputs)
    if trained:  # qcompile.block_ap / e2e_qp form: the quantizers are being trained
        log.info(
            "lowbit: training graph (%d trainable step-size / zero-point tensors): no "
            "quantizing passes; forward and backward handed to %s",
            trained,
            opts.handoff,
        )
        return hand_off(gm, example_inputs, opts.handoff)
    report = run_pipeline(gm, example_inputs, opts)
    replaced = gm.meta.pop(REPLACED_WEIGHTS, [])
    tables = gm.meta.pop(QUANTIZED_TABLES, set())
    release = plan_release(replaced, tables) if opts.free_weights else []
    # the quantized graph is an inference graph: in grad mode inductor still compiles it
    # and it runs without recording autograd (its kernels have no derivatives; training
    # goes through qcompile.block_ap / qcompile.e2e_qp). The eager hand-off returns
    # gm.forward as it is (a backward through it fails at the first lowbit op)
    as_inference = (
        bool(report.quantized)
        and torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    )
    compiled = hand_off(gm, example_inputs, opts.handoff, inference=as_inference)
    memory.GRAPHS.add(gm)
    if not release:
        return compiled
    roots = {id(r): r for r in map(frame_root, (src for _, src, _ in replaced)) if r is not None}
    return release_after_first_call(compiled, release, report, roots.values())


def hand_off(gm: fx.GraphModule, example_inputs, handoff: str, inference: bool = False):
    """``gm.forward`` itself (eager), or inductor's compilation of ``gm``; ``inference``:
    compiled and run without autograd (the eager hand-off ignores it)."""
    if handoff == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    with (
        _dynamic_rows(gm),
        torch._inductor.config.patch(unsafe_marked_cacheable_functions=_cacheable_kernels(gm)),
        torch.set_grad_enabled(torch.is_grad_enabled() and not inference),
        progress.elapsed("compiling with inductor"),
    ):
        compiled = compile_fx(gm, example_inputs)
    return _without_grad(compiled) if inference else compiled


def _cacheable_kernels(gm: fx.GraphModule) -> dict[str, str]:
    """Inductor's cache markings plus lowbit's kernel functions called in ``gm``, keyed by
    the hash of lowbit's source (``unsafe_marked_cacheable_functions``: the value is part
    of the cache key). Without them AOTAutograd's cache refuses a graph that calls plain
    Python functions, and a second process re-traces every graph (issue 18: time to the
    first token)."""
    marked = dict(torch._inductor.config.unsafe_marked_cacheable_functions)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        module = getattr(node.target, "__module__", "") or ""
        if module.startswith("qcompile."):
            marked[f"{module}.{node.target.__name__}"] = _source_hash()
    return marked


@functools.cache
def _source_hash() -> str:
    """A digest of every source file of lowbit's packages (the kernels' code)."""
    import hashlib
    from pathlib import Path

    import qcompile.kernels
    import qcompile.lowering
    import qcompile.passes

    digest = hashlib.sha256()
    for package in (qcompile, qcompile.kernels, qcompile.lowering, qcompile.passes):
        for path in sorted(Path(package.__path__[0]).glob("*")):
            if path.suffix in (".py", ".cpp", ".h"):
                digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _dynamic_rows(gm: fx.GraphModule):
    """Let inductor trace the per-expert row counts of MoE sites (``lowbit::expert_rows``:
    a size known only at run time) while it compiles ``gm``."""
    shape_env = getattr(torch._guards.detect_fake_mode(), "shape_env", None)
    if shape_env is None or not gm.graph.find_nodes(
        op="call_function", target=torch.ops.lowbit.expert_rows.default
    ):
        yield
        return
    # what torch._dynamo.config.capture_dynamic_output_shape_ops sets for a whole compile,
    # here only for this graph's hand-off
    before = shape_env.settings
    shape_env.settings = dataclasses.replace(before, allow_dynamic_output_shape_ops=True)
    try:
        yield
    finally:
        shape_env.settings = before


def training_quantizers(example_inputs) -> int:
    """How many of the graph's inputs are quantizer parameters being trained (grad mode
    on, ``requires_grad``): such a graph is compiled for training, not quantized."""
    if not torch.is_grad_enabled():
        return 0
    return sum(is_quantizer_parameter(t) and t.requires_grad for t in example_inputs)


def guard_parameter_identity(gm: fx.GraphModule) -> None:
    """Make dynamo reuse this graph only for the very parameters it was built from.

    Dynamo lifts parameters to graph inputs and guards only their shapes and dtypes, so a
    second model of the same class would otherwise run through this graph, which holds
    the first model's quantized weights as constants. Identity guards make dynamo
    compile again for it."""
    from torch._dynamo.guards import GuardBuilder
    from torch._guards import TracingContext

    tracing = TracingContext.try_get()
    if tracing is None:  # called outside dynamo (tests calling the backend directly)
        return
    for grapharg in _parameter_args(gm):
        guard = grapharg.source.make_guard(GuardBuilder.ID_MATCH)
        tracing.guards_context.dynamo_guards.add(guard)


def _parameter_args(gm: fx.GraphModule) -> list:
    """Dynamo's record (``grapharg``: source, example) of each parameter ``gm`` takes."""
    return [
        node.meta["grapharg"]
        for node in gm.graph.find_nodes(op="placeholder")
        if isinstance(getattr(node.meta.get("grapharg"), "example", None), torch.nn.Parameter)
    ]


# Dynamo's recompile limit counts the graphs of one function across every model of the
# class (per ID_MATCH'd module only where the frame's own local is the module, which
# transformers' decorated forward is not). The identity guards above give each compiled
# copy its own graphs, so a process comparing recipes on copies of a model would reach
# the limit (8) at the third copy and run the rest in fp. Per live copy lowbit compiled
# since the user (or dynamo) last set the limit, lowbit allows that value again; other
# recompiles stay bounded by it.
# Dynamo's default (8) is also too few for one copy used as users do: a causal LM run for
# generate() and perplexity compiles about ten graphs (no cache / empty / filling cache /
# one-token decode, each static then dynamic-length). Where the limit is dynamo's
# default, lowbit allows GRAPHS_PER_COPY per copy instead; a limit the user set holds.
GRAPHS_PER_COPY = 16
_DYNAMO_DEFAULT_LIMIT = torch._dynamo.config.recompile_limit
_SEEN: dict[int, weakref.ref] = {}  # id(parameter) -> parameter, of every lowbit graph
_COPIES: list[weakref.ref] = []  # one parameter per model copy (its first graph's first)
_LIMIT = {"base": None, "seen": None}  # the limit lowbit last saw or set


def allow_graphs_per_model_copy(gm: fx.GraphModule) -> None:
    """Raise ``torch._dynamo.config.recompile_limit`` to its base value (the user's, or
    ``GRAPHS_PER_COPY``) times the live model copies when ``gm`` is the first graph of a
    copy (no parameter seen before)."""
    params = [grapharg.example for grapharg in _parameter_args(gm)]
    for key in [k for k, ref in _SEEN.items() if ref() is None]:
        del _SEEN[key]
    _COPIES[:] = [ref for ref in _COPIES if ref() is not None]
    if not params or any((ref := _SEEN.get(id(p))) is not None and ref() is p for p in params):
        return
    _SEEN.update({id(p): weakref.ref(p) for p in params})
    config = torch._dynamo.config
    if config.recompile_limit != _LIMIT["seen"]:  # the user's (or dynamo's default) value:
        base = config.recompile_limit  # it holds per copy compiled from now on
        _LIMIT["base"] = GRAPHS_PER_COPY if base == _DYNAMO_DEFAULT_LIMIT else base
        _COPIES.clear()
    _COPIES.append(weakref.ref(params[0]))
    wanted = _LIMIT["base"] * len(_COPIES)
    if wanted > config.recompile_limit:
        log.info("lowbit: %d compiled model copies: recompile_limit %d", len(_COPIES), wanted)
        config.recompile_limit = wanted
    _LIMIT["seen"] = config.recompile_limit


def _without_grad(compiled):
    def run(*args):
        with torch.no_grad():
            return compiled(*args)

    return run


# free_weights ---------------------------------------------------------------------------
# The fp weights are released after the compiled graph's first call, not here: dynamo
# checks its guards (parameter strides included) against the frame right after the
# backend returns. The next call then fails the stride guard and recompiles; that graph
# sees the zero-memory placeholders and reuses the stored products (qcompile.artifacts).


def plan_release(replaced, quantized_tables=frozenset()) -> list[tuple]:
    """``(parameter, owning modules)`` for each replaced weight that may be released:
    only held by matmul modules (``nn.Linear``, ``Conv1D``) as their ``weight`` (or by an ``nn.Embedding``
    whose lookups read the quantized copy: ids in ``quantized_tables``), with stored
    products."""
    plan = []
    for param, source, _ in replaced:
        if artifacts.is_freed(param) or not any(
            a.kind == "site" for a in artifacts.artifacts_of(param)
        ):
            continue  # nothing stored replaces it (e.g. only a folded copy of it is)
        root = frame_root(source)
        if root is None:
            log.warning(
                "lowbit: free_weights: cannot find the module that owns %s; its full-precision "
                "weight is kept",
                source,
            )
            continue
        owners, all_linear = linear_owners(root, param, id(param) in quantized_tables)
        if all_linear:
            plan.append((param, owners))
        else:
            log.info(
                "lowbit: free_weights keeps %s: a module other than nn.Linear / Conv1D uses it",
                source,
            )
    return plan


def release_after_first_call(compiled, plan, report, roots=()):
    """Wrap ``compiled`` so that its first successful call releases ``plan``'s weights,
    then moves what the ``roots`` modules still read from a mapped checkpoint file into
    their own memory (so the mapping, every page of which the first call may have read,
    closes: ``memory.release_file_mappings``)."""
    pending = [plan]

    def release():
        if not pending:
            return
        freed = sum(free_weight(p, owners) for p, owners in pending.pop())
        copied = sum(memory.release_file_mappings(root) for root in roots)
        if copied:
            log.info("lowbit: free_weights copied %d bytes out of a mapped checkpoint", copied)
        report.memory["freed_bytes"] = report.memory.get("freed_bytes", 0) + freed
        log.info("lowbit: free_weights released %d bytes of full-precision weights", freed)

    # dynamo calls what a backend returns with positional arguments (the inductor result
    # may carry a copied ``_boxed_call`` attribute that does not apply to it)
    def run(*args):
        out = compiled(*args)
        release()
        return out

    return run


class _RecompileLimitFilter(logging.Filter):
    """Turns dynamo's recompile-limit log line into a loud lowbit warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "hit config." in msg and "recompile_limit" in msg:
            text = (
                "lowbit: torch._dynamo hit its recompile limit; from now on the function below "
                "runs EAGERLY with the ORIGINAL full-precision weights (not quantized by lowbit). "
                "Raise torch._dynamo.config.recompile_limit, or mark dynamic dims "
                "(torch._dynamo.mark_dynamic), and recompile.\n" + msg
            )
            log.error(text)
            warnings.warn(text, LowbitRecompileWarning, stacklevel=2)
        return True


_filter = _RecompileLimitFilter()


def watch_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _filter not in logger.filters:
        logger.addFilter(_filter)
