"""A tiny Hugging Face model folder (config, weights, a real byte-level BPE tokenizer)
for tests that drive lowbit as a user does: the CLI, model folders, exports.

Import as ``from model_folder import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
TEXT = "def area(r):\n    return 3.14159 * r * r  # the area of a circle"  # the `ids` fixture
VOCAB = 320  # 256 byte symbols, the special token and 63 merges


@functools.cache
def _tokenizer_json() -> str:
    """A byte-level BPE trained on the start of ``pydoc_data.topics`` (deterministic)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n".join(topics[k] for k in sorted(topics))[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    obj = Tokenizer.from_str(_tokenizer_json())
    return PreTrainedTokenizerFast(tokenizer_object=obj, bos_token=EOS, eos_token=EOS)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random Llama whose widths take every weight-only group size up to 64."""
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def write_model_folder(path: Path, seed: int = 0) -> Path:
    """``save_pretrained`` of ``tiny_llama`` and ``tiny_tokenizer`` into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
