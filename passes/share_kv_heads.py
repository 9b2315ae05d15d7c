"""share_kv_heads: attention reads the shared key / value heads instead of their copies.

Grouped-query attention models (Llama, Qwen2, Mistral, SmolLM2, ...) repeat each key and
value head for the query heads that share it (``repeat_kv``: ``x[:, :, None]`` ->
``expand`` -> ``reshape``, or ``repeat_interleave(x, n, dim=1)``) before
``scaled_dot_product_attention``. Transformers keeps those copies whenever an attention
mask is given, as with a static KV cache, so every decode step copies the whole cache
``n`` times. On the CPU target this pass feeds the unrepeated heads to the attention
call with ``enable_gqa=True``, which computes the same thing: query head ``h`` reads key
and value head ``h // n`` (torch's CPU flash attention supports it, masked or not).
Precondition: none. Postcondition: no attention call reads a repeated key or value
whose repetition this pass recognises. Exact: the same kernel reads the same numbers.
Returns the number of attention calls rewritten.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompile.context import PassContext
from qcompile.graph_utils import is_call

SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_ALL = slice(None, None, None)


def share_kv_heads(gm: fx.GraphModule, ctx: PassContext) -> int:
    if ctx.target != "cpu":  # CUDA's fused kernels do not take a mask with enable_gqa
        return 0
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA:
            continue
        args = _sdpa_args(node)
        if args is None or args.get("enable_gqa", False) is not False:
            continue
        key, key_rep = _unrepeated(args["key"])
        value, value_rep = _unrepeated(args["value"])
        if key_rep is None or key_rep != value_rep:
            continue
        repeats = (args["key"], args["value"])
        args.update(key=key, value=value, enable_gqa=True)
        node.args, node.kwargs = (), args
        for repeated in repeats:
            _erase_unread(gm.graph, repeated, stop=(key, value))
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def _erase_unread(graph: fx.Graph, node: fx.Node, stop) -> None:
    """Erase the repetition's nodes nothing reads any more (not a graph-wide dead-code
    elimination: that would also drop in-place writes whose result is unused)."""
    while isinstance(node, fx.Node) and node not in stop and not node.users:
        source = node.args[0]
        graph.erase_node(node)
        node = source


def _sdpa_args(node: fx.Node) -> dict | None:
    """The call's arguments by name (query, key, value and the keywords given)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    if len(node.args) > len(names):
        return None
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args if all(k in args for k in names[:3]) else None


def _unrepeated(x) -> tuple[fx.Node | None, int | None]:
    """(the heads before the repetition, how often each is repeated) for a repeated
    ``[batch, heads * n, seq, dim]`` tensor; (None, None) for anything else."""
    if is_call(x, ("repeat_interleave", torch.repeat_interleave)):
        return _from_repeat_interleave(x)
    if not (is_call(x, ("reshape", torch.reshape)) and is_call(x.args[0], ("expand",))):
        return None, None
    expanded = x.args[0]
    unsqueezed = expanded.args[0]
    source = _unsqueezed_at_2(unsqueezed)
    shapes = [_shape(n) for n in (source, expanded, x)]
    if source is None or any(s is None for s in shapes):
        return None, None
    src, exp, out = shapes
    n = exp[2] if len(exp) == 5 else None
    same = len(src) == 4 and len(out) == 4 and isinstance(n, int) and n > 1
    same = same and all(
        statically_known_true(a == b) for a, b in zip(exp, src[:2] + (n,) + src[2:])
    )
    same = same and all(
        statically_known_true(a == b) for a, b in zip(out, (src[0], src[1] * n) + src[2:])
    )
    return (source, n) if same else (None, None)


def _from_repeat_interleave(x: fx.Node) -> tuple[fx.Node | None, int | None]:
    names = ("input", "repeats", "dim")
    args = dict(zip(names, x.args))
    args.update(x.kwargs)
    source, n, dim = args.get("input"), args.get("repeats"), args.get("dim")
    src = _shape(source) if isinstance(source, fx.Node) else None
    if src is None or len(src) != 4 or not isinstance(n, int) or n < 2 or dim not in (1, -3):
        return None, None
    return source, n


def _unsqueezed_at_2(node) -> fx.Node | None:
    """``x`` for ``x[:, :, None]`` / ``x[:, :, None, :, :]`` / ``x.unsqueeze(2)``."""
    if is_call(node, (operator.getitem,)):
        index = node.args[1]
        ok = index in ((_ALL, _ALL, None), (_ALL, _ALL, None, _ALL, _ALL))
        return node.args[0] if ok else None
    if is_call(node, ("unsqueeze", torch.unsqueeze)):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] if dim == 2 else None
    return None


def _shape(node) -> tuple | None:
    val = (
        node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    )
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
