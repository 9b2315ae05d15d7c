"""Releasing quantized weights (``free_weights``; ``qcompile.load`` guards the same way)
and the memory figures of a compiled graph.

Invariant: ``free_weight`` releases a parameter's storage in place (same ``Parameter``
object, data swapped for ``torch.zeros((), dtype).expand(shape)``), marks its stored
products pinned and released (``qcompile.artifacts``: reused from then on without
calibration) and installs a forward pre-hook on its modules that raises when they are
called eagerly; its callers hand it only weights no graph or other module still reads.
"""

from __future__ import annotations

import torch

from qcompile.lowering import derived

from .artifacts import REGISTRY, artifacts_of, is_freed, nbytes, placeholder
from .matmul_modules import is_expert_tensor, is_matmul_module
from .recipes import get_recipe

FREED_MESSAGE = (
    "lowbit freed this layer's full-precision weight ({what}): run the compiled model, "
    "or compile without free_weights / load the full-precision weights again"
)


# memory -------------------------------------------------------------------------------


def replaced_weights(gm, ctx) -> list[tuple[torch.nn.Parameter, str, list[str]]]:
    """``(parameter, placeholder source name, site module FQNs)`` of every quantized
    site's weight that the graph no longer reads (its placeholder has no users)."""
    by_param: dict[int, tuple] = {}
    for site in ctx.sites:
        if site.skip_reason or not get_recipe(site.scheme).quantize:
            continue
        by_param.setdefault(id(site.param), (site.param, []))[1].append(site.module_fqn)
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None)
        if example is None or id(example) not in by_param or node.users:
            continue
        param, modules = by_param.pop(id(example))
        out.append((param, grapharg.source.name, modules))
    for param, _ in by_param.values():  # the graph still reads these fp weights
        for art in artifacts_of(param):
            art.fp_needed = True
    return out


def memory_of(gm, replaced) -> dict[str, int]:
    """Bytes of the fp weights the graph replaced, of its quantized constants, and of
    the replaced weights already released."""
    quantized = sum(nbytes(b) for name, b in gm.named_buffers() if name.startswith("lowbit_"))
    return {
        "fp_bytes_replaced": sum(nbytes(p) for p, _, _ in replaced),
        "quantized_bytes": quantized,
        "freed_bytes": sum(nbytes(p) for p, _, _ in replaced if is_freed(p)),
    }


# releasing weights -----------------------------------------------------------------------


def linear_owners(root: torch.nn.Module, param: torch.Tensor, embedding_ok: bool = False):
    """``(owners, all_linear)``: ``(name, module)`` of every module holding ``param``,
    and whether each is a matmul module (``nn.Linear``, GPT-2's ``Conv1D``:
    ``qcompile.matmul_modules``) holding it as its ``weight`` (or, with ``embedding_ok``,
    an ``nn.Embedding`` whose lookups the graph reads from the quantized copy:
    ``passes.quantize_embedding``)."""
    owners, all_linear = [], True
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            if p is param:
                owners.append((mod_name, mod))
                kind_ok = is_matmul_module(mod) or (
                    embedding_ok and isinstance(mod, torch.nn.Embedding)
                )
                expert_ok = is_expert_tensor(param, mod) and covers_experts(param)
                all_linear &= kind_ok and name == "weight" or expert_ok
    return owners, all_linear and bool(owners)


def covers_experts(param: torch.Tensor) -> bool:
    """Whether products are stored for every expert of the 3-D ``param``."""
    have = {a.key.get("expert") for a in artifacts_of(param) if a.kind == "site"}
    return have.issuperset(range(param.shape[0]))


class _RaiseIfFreed:
    """Forward pre-hook: an eager call of a linear whose weight lowbit released raises."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: torch.nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return
        for attr, weight in module._parameters.items():
            if weight is None or not (attr == "weight" or is_expert_tensor(weight, module)):
                continue
            # a placeholder, or one materialized as zeros (model.to(...) after the release)
            if is_freed(weight) or not bool(weight.detach().any()):
                what = f"{self.name or type(module).__name__}.{attr}, {tuple(weight.shape)}"
                raise RuntimeError(FREED_MESSAGE.format(what=what))


def guard_eager_calls(module: torch.nn.Module, name: str = "") -> None:
    """Make an eager call of ``module`` raise while its weight is released."""
    if getattr(module, "_lowbit_freed_hook", None) is None:
        module._lowbit_freed_hook = module.register_forward_pre_hook(_RaiseIfFreed(name))


def free_weight(param: torch.nn.Parameter, owners) -> int:
    """Release ``param``'s storage in place and guard its ``(name, nn.Linear)`` owners;
    returns the bytes released (0 if it was already). Its stored products that the
    target's layout holds exactly are compacted (``qcompile.lowering.derived.compact``)."""
    if is_freed(param):
        return 0
    size = nbytes(param)
    embedding = any(isinstance(mod, torch.nn.Embedding) for _, mod in owners)
    for art in (REGISTRY.get(param) or {}).values():
        art.pinned = art.released = True  # reused from now on without calibration
        if not embedding:  # an embedding's lookups read the generic packed codes
            derived.compact(art)
    param.data = placeholder(param.shape, param.dtype, param.device)
    for name, mod in owners:
        guard_eager_calls(mod, name)
    return size
