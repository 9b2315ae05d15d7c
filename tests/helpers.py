"""Tiny random Llama models and compile helpers shared by the backend tests.

Import as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import fx
from transformers import LlamaConfig, LlamaForCausalLM

from qcompile.options import Options
from qcompile.pipeline import run_pipeline

# (hidden_size, num_attention_heads, num_key_value_heads): hidden sizes that are
# not powers of two, and grouped-query attention (fewer KV heads than heads).
SHAPES = [(24, 4, 2), (40, 4, 1), (40, 4, 2), (48, 6, 2), (48, 6, 3)]


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 24
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 32
    layers: int = 1
    vocab: int = 64
    tied: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    seed: int = 0


def llama_config(spec: TinySpec) -> LlamaConfig:
    """The ``LlamaConfig`` of ``spec``."""
    return LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=spec.tied,
        attention_bias=spec.attention_bias,
        mlp_bias=spec.mlp_bias,
    )


def build_model(spec: TinySpec = TinySpec(), dtype: torch.dtype = torch.float32):
    """A random ``LlamaForCausalLM`` in eval mode (deterministic in ``spec.seed``)."""
    cfg = llama_config(spec)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # random (not init-default) norms and biases
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == spec.tied
    return model


def input_ids(spec: TinySpec, batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab, (batch, seq), generator=g)


@st.composite
def tiny_specs(draw, max_layers: int = 2) -> TinySpec:
    hidden, heads, kv = draw(st.sampled_from(SHAPES))
    return TinySpec(
        hidden=hidden,
        heads=heads,
        kv_heads=kv,
        intermediate=draw(st.sampled_from([32, 56, 72])),
        layers=draw(st.integers(1, max_layers)),
        vocab=draw(st.sampled_from([64, 80, 97, 128])),
        tied=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def compile_lowbit(model, options=None):
    """``torch.compile(model, backend="lowbit")`` after a dynamo reset.

    The reset matters: dynamo's recompile limit would otherwise make later
    compiles of the same model class silently run eagerly with fp weights.
    """
    torch._dynamo.reset()
    return torch.compile(model, backend="lowbit", options=dict(options or {}))


def run_lowbit(model, ids, options=None) -> torch.Tensor:
    """Logits of ``model`` compiled by lowbit (eager handoff unless told otherwise)."""
    opts = {"handoff": "eager", **(options or {})}
    with torch.no_grad():
        return compile_lowbit(model, opts)(ids).logits


def run_with_backend(model, ids, backend) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(ids).logits


def eager_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def used_linear_names(model) -> list[str]:
    """Names of every ``nn.Linear`` reachable in ``model`` (duplicates included)."""
    return [
        name
        for name, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, torch.nn.Linear)
    ]


class Traced:
    """One dynamo graph of ``model(ids)``, re-run through lowbit under several option sets.

    Dynamo's trace is the slow part of a compile here (1-3 s); the passes take
    well under a second. ``run(options)`` calls the ``lowbit`` backend function on a
    fresh copy of the captured graph with the captured example inputs, exactly as
    ``torch.compile`` would, and returns the logits.
    """

    def __init__(self, model, ids) -> None:
        captured = {}

        def capture(gm, example_inputs):
            # node meta (grapharg) is cleared after the backend returns: copy it now
            captured.update(gm=gm, graph=copy.deepcopy(gm.graph), inputs=list(example_inputs))
            return gm.forward

        self.eager = eager_logits(model, ids)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=capture)(ids)
        torch._dynamo.reset()
        self.root, self.graph, self.inputs = captured["gm"], captured["graph"], captured["inputs"]
        outs = self.fresh()(*self.inputs)
        matches = [i for i, o in enumerate(outs) if o.shape == self.eager.shape]
        assert len(matches) == 1, [o.shape for o in outs]
        self.logits_index = matches[0]

    def fresh(self) -> fx.GraphModule:
        """An unmodified copy of the captured graph (node meta shared shallowly)."""
        return fx.GraphModule(self.root, copy.deepcopy(self.graph))

    def call(self, fn) -> torch.Tensor:
        with torch.no_grad():
            return fn(*self.inputs)[self.logits_index]

    def run(self, options=None) -> torch.Tensor:
        from qcompile.backend import lowbit_backend

        opts = {"handoff": "eager", **(options or {})}
        return self.call(lowbit_backend(self.fresh(), self.inputs, options=opts))


def lowered_graph(model, ids, options):
    """The graph lowbit lowers for ``model(ids)`` (the pipeline, no hand-off) and the
    inputs dynamo passes it."""
    captured = {}

    def backend(gm, example_inputs):
        run_pipeline(gm, example_inputs, Options.parse(options))
        captured.update(gm=gm, inputs=list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    torch._dynamo.reset()
    return captured["gm"], captured["inputs"]


def site_kernels_program(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Every quantized site of a lowered graph as one program of its own, fed the inputs
    the site reads: ``(program, inputs)``, where ``inputs`` are ``gm``'s nodes whose
    values the program's placeholders take, in order, and the program returns each
    site's output.

    A site's slice is its output node and, recursively, what it reads among the graph's
    constants and the nodes lowbit inserted (:func:`_inserted_by_lowbit`: the
    quantization with its outlier copies, getitems); the activations it reads
    from the rest of the model are the inputs. Running the program
    eagerly and compiled by inductor on the same inputs compares the site kernels
    themselves, apart from the float rounding of the model around them, which the
    quantization of the next site can amplify into a different code (a chaotic effect
    that grows with depth; docs/results.md).
    """
    outputs = [
        n for n in gm.graph.nodes
        if n.op == "call_function" and "lowbit.site" in n.meta and n.users
    ]  # fmt: skip
    inside: set[fx.Node] = set()
    inputs: list[fx.Node] = []

    def visit(node: fx.Node) -> None:
        if node in inside:
            return
        inside.add(node)
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" or _inserted_by_lowbit(arg):
                visit(arg)
            elif arg not in inputs:
                inputs.append(arg)

    for out in outputs:
        visit(out)
    graph = fx.Graph()
    env = {node: graph.placeholder(f"in_{i}") for i, node in enumerate(inputs)}
    for node in gm.graph.nodes:
        if node in inside and node not in env:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, graph), inputs


def _inserted_by_lowbit(node: fx.Node) -> bool:
    """A node a lowbit pass put into the graph for a site (not the model's own)."""
    if node.op != "call_function":
        return False
    if any(k.startswith("lowbit.") for k in node.meta):
        return True
    module = getattr(node.target, "__module__", None) or ""
    if module.startswith("qcompile") or "lowbit" in str(node.target):
        return True
    # dynamo lifts the model's parameters to placeholders: a constant is lowbit's
    if any(a.op == "get_attr" for a in node.all_input_nodes):
        return True
    return node.target is operator.getitem and _inserted_by_lowbit(node.args[0])


def node_values(gm: fx.GraphModule, args, nodes: list[fx.Node]) -> list:
    """The values ``nodes`` of ``gm`` take when it runs on ``args`` (``fx.Interpreter``)."""
    wanted, values = set(nodes), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                values[n] = value
            return value

    with torch.no_grad():
        Recorder(gm).run(*args)
    return [values[n] for n in nodes]
