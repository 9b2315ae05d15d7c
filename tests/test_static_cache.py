"""Static KV caches through lowbit: the passes never advance the user's cache, and
``share_kv_heads`` feeds attention the shared key / value heads, exactly.

A static cache is written in place by the graph (``index_copy_`` into the cache, ``add_``
on its position counter). Passes that run the graph on dynamo's example inputs must run
it on copies, or the first real call starts from a cache the compiler already advanced.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from architectures import ARCHITECTURES, build
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import qcompile
from qcompile.graph_inputs import written_placeholders
from qcompile.passes.share_kv_heads import share_kv_heads

PROMPT, STEPS = [1, 2, 3, 5, 8], [4, 9, 11, 6]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def generate_logits(model, cache) -> torch.Tensor:
    """Logits of the prompt and of each teacher-forced decode step, in one tensor."""
    outs = []
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        for step in [None, *STEPS]:
            ids = ids if step is None else torch.tensor([[step]])
            outs.append(model(ids, past_key_values=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


def static_cache(model) -> StaticCache:
    return StaticCache(config=model.config, max_cache_len=16)


@pytest.mark.parametrize("recipe, handoff", [("fp", "eager"), ("w8a8", "eager"),
                                             ("w8a8", "inductor")])  # fmt: skip
def test_static_cache_decode_matches_dynamic_cache(tiny, recipe, handoff):
    """No calibration: collect_stats runs every graph on its example inputs (the cache)."""
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="lowbit", options={"recipe": recipe,
                                                              "handoff": handoff})  # fmt: skip
    static = generate_logits(compiled, static_cache(tiny))
    dynamic = generate_logits(compiled, DynamicCache(config=tiny.config))
    reference = generate_logits(tiny, static_cache(tiny))
    assert (static - dynamic).abs().max().item() < 1e-5
    if recipe == "fp":
        assert (static - reference).abs().max().item() < 1e-5


def test_share_kv_heads_rewrites_every_decode_attention(tiny):
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="lowbit", options={"recipe": "w8a8"})
    generate_logits(compiled, static_cache(tiny))
    decode = qcompile.compiled_reports()[-1]  # the masked decode graph
    assert decode.pass_rewrites["share_kv_heads"] == tiny.config.num_hidden_layers


def test_written_placeholders_are_the_cache_and_its_counter(tiny):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    generate_logits(torch.compile(tiny, backend=capture), static_cache(tiny))
    decode = graphs[-1]
    names = sorted(n.name for n in written_placeholders(decode))
    layers = tiny.config.num_hidden_layers
    assert len(names) == 3 * layers, names  # keys, values, cumulative_length per layer
    assert all("past_key_values" in n for n in names)


# grouped-query (and multi-query) attention in these: the decode graph is rewritten
SHARED_KV = ("llama", "qwen2", "mistral", "mixtral", "falcon", "gpt_bigcode")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_generate_with_a_static_cache_on_every_architecture(name):
    """``generate(cache_implementation="static")`` under lowbit (recipe ``fp``) gives the
    uncompiled model's tokens, on each of the 25 tiny architectures."""
    model = build(name).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        torch._dynamo.reset()
        model.compile(backend="lowbit", options={"recipe": "fp", "handoff": "eager"})
        tokens = model.generate(ids, **kwargs)
    assert torch.equal(tokens, expected)
    if name in SHARED_KV:
        assert qcompile.compiled_reports()[-1].pass_rewrites["share_kv_heads"] == 2  # layers


# property test: the rewrite on random grouped-query shapes -------------------------


class RepeatedKV(torch.nn.Module):
    def __init__(self, n_rep: int, style: str, mask: str):
        super().__init__()
        self.n_rep, self.style, self.mask = n_rep, style, mask

    def repeat(self, x):
        b, h, s, d = x.shape
        if self.style == "interleave":
            return torch.repeat_interleave(x, self.n_rep, dim=1)
        if self.style == "unsqueeze":
            return x.unsqueeze(2).expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)
        return x[:, :, None, :, :].expand(b, h, self.n_rep, s, d).reshape(b, h * self.n_rep, s, d)

    def forward(self, q, k, v, mask):
        k, v = self.repeat(k), self.repeat(v)
        if self.mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 3), n_rep=st.integers(2, 4),
    q_len=st.integers(1, 5), extra_kv=st.integers(0, 6), dim=st.sampled_from([8, 16]),
    style=st.sampled_from(["getitem", "unsqueeze", "interleave"]),
    mask=st.sampled_from(["bool", "float", "causal"]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_share_kv_heads_keeps_the_attention_output(
    batch, kv_heads, n_rep, q_len, extra_kv, dim, style, mask, seed
):
    g = torch.Generator().manual_seed(seed)
    kv_len = q_len + extra_kv
    q = torch.randn(batch, kv_heads * n_rep, q_len, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=torch.float64)
    allowed = torch.rand(batch, 1, q_len, kv_len, generator=g) < 0.7
    allowed[..., 0] = True  # every query row sees a position
    masks = {"bool": allowed, "float": torch.zeros(allowed.shape, dtype=torch.float64)
             .masked_fill(~allowed, float("-inf")), "causal": None}  # fmt: skip
    module = RepeatedKV(n_rep, style, mask)
    rewrites = []

    def backend(gm, example_inputs):
        rewrites.append(share_kv_heads(gm, types.SimpleNamespace(target="cpu")))
        return gm

    torch._dynamo.reset()
    args = (q, k, v, masks[mask])
    out = torch.compile(module, backend=backend, dynamic=False)(*args)
    assert rewrites == [1]
    torch.testing.assert_close(out, module(*args), rtol=1e-12, atol=1e-12)
