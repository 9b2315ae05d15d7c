"""dev text, dev tokens, perplexity and calibration batches; the real SmolLM2 (slow)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qcompile.perplexity import (
    PERPLEXITY_RESERVE,
    calibration_batches,
    dev_text,
    dev_tokens,
    perplexity,
)
from qcompile.smollm2 import load_smollm2

VOCAB = 64


class ByteTokenizer:
    """Stand-in tokenizer: one token per UTF-8 byte, folded into VOCAB ids."""

    def encode(self, text: str, **kwargs) -> list[int]:
        return [b % VOCAB for b in text.encode("utf-8")]


class MinimalTokenizer:
    """A tokenizer with ``encode(text)`` only (no keyword arguments)."""

    def encode(self, text):
        return [b % VOCAB for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def reference_perplexity(model, tokens: torch.Tensor, context: int) -> float:
    ids = tokens.reshape(-1)
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), context):
        window = ids[start : start + context]
        if window.numel() < 2:
            continue
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        nll += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(nll / count)


def test_dev_text_is_deterministic_sorted_join():
    from pydoc_data.topics import topics

    text = dev_text()
    assert isinstance(text, str)
    assert text == dev_text()
    assert len(text) > 100_000
    first = sorted(topics)[0]
    assert text.startswith(topics[first])
    assert text == "\n\n".join(topics[k] for k in sorted(topics))


def test_dev_tokens_shape_and_prefix():
    tok = ByteTokenizer()
    small, large = dev_tokens(tok, 100), dev_tokens(tok, 300)
    assert small.shape == (1, 100) and small.dtype == torch.long
    assert torch.equal(large[:, :100], small)
    expected = tok.encode(dev_text())[:100]
    assert small[0].tolist() == expected
    assert torch.equal(dev_tokens(MinimalTokenizer(), 100), small)


def test_dev_tokens_too_many_raises():
    with pytest.raises(ValueError, match="requested"):
        dev_tokens(ByteTokenizer(), 10**8)


def test_uniform_logits_give_vocab_size():
    vocab = 97
    tokens = torch.randint(0, vocab, (1, 300))

    def uniform(ids):
        return torch.zeros(*ids.shape, vocab)

    assert perplexity(uniform, tokens, context=64) == pytest.approx(vocab, rel=1e-6)
    # an object with .logits, batching, a tail window and a 1-D input all work
    wrapped = lambda ids: SimpleNamespace(logits=uniform(ids))  # noqa: E731
    assert perplexity(wrapped, tokens[0], context=50, batch_size=4) == pytest.approx(
        vocab, rel=1e-6
    )


def test_perplexity_runs_without_grad():
    seen = []

    def model(ids):
        seen.append(torch.is_grad_enabled())
        return torch.zeros(*ids.shape, 8)

    perplexity(model, torch.zeros(1, 32, dtype=torch.long), context=16)
    assert seen == [False, False]


def test_perplexity_matches_reference_on_tiny_llama(tiny_llama):
    tokens = dev_tokens(ByteTokenizer(), 200)
    ref = reference_perplexity(tiny_llama, tokens, context=64)  # 3 full windows + tail of 8
    assert perplexity(tiny_llama, tokens, context=64) == pytest.approx(ref, rel=1e-5)
    batched = perplexity(tiny_llama, tokens, context=64, batch_size=2)
    assert batched == pytest.approx(ref, rel=1e-5)
    # an untrained model over 64 symbols: close to uniform
    assert 0.5 * VOCAB < ref < 2 * VOCAB


def test_perplexity_predicts_next_token():
    # A "model" that puts all mass on the true next token has perplexity ~1.
    tokens = torch.arange(40).remainder(10)[None]

    def oracle(ids):
        logits = torch.full((*ids.shape, 10), -1e4)
        nxt = (ids + 1).remainder(10)
        return logits.scatter(-1, nxt[..., None], 0.0)

    assert perplexity(oracle, tokens, context=8) == pytest.approx(1.0, abs=1e-6)


def test_calibration_batches_come_from_the_end():
    tok = ByteTokenizer()
    all_ids = torch.tensor(tok.encode(dev_text()))
    batches = calibration_batches(tok, 3, 128)
    assert len(batches) == 3
    assert all(b.shape == (1, 128) and b.dtype == torch.long for b in batches)
    assert torch.equal(torch.cat(batches, dim=1)[0], all_ids[-3 * 128 :])
    shifted = calibration_batches(tok, 3, 128, offset=3 * 128)
    assert torch.equal(torch.cat(shifted, dim=1)[0], all_ids[-6 * 128 : -3 * 128])


def test_calibration_batches_never_reach_perplexity_tokens():
    tok = ByteTokenizer()
    n = len(tok.encode(dev_text()))
    fit = (n - PERPLEXITY_RESERVE) // 1000
    assert len(calibration_batches(tok, fit, 1000)) == fit
    with pytest.raises(ValueError, match="reserved for perplexity"):
        calibration_batches(tok, fit + 1, 1000)


@pytest.mark.slow
def test_real_smollm2_fp_perplexity():
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    loaded = time.perf_counter() - start
    assert not model.training
    tokens = dev_tokens(tokenizer, 2048)
    ppl = perplexity(model, tokens, context=512, batch_size=4)
    print(f"SmolLM2 fp perplexity on 2048 dev tokens (context 512): {ppl:.3f}; load {loaded:.1f}s")
    assert math.isfinite(ppl)
    assert 5 < ppl < 40
