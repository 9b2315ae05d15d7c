"""Tiny random configs of transformers' causal-LM architectures (tests/test_architectures.py).

Each entry: ``name -> (config class name, config kwargs)``. Every model has hidden size 32,
MLP width 64 (each expert's too), 2 layers and a vocabulary of 128, so that every weight's
input width divides the weight-only group size 32. Import as ``from architectures import``.
"""

from __future__ import annotations

import torch
import transformers

H, MLP, V, LAYERS, HEADS = 32, 64, 128, 2, 4

_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
_LLAMA_LIKE = dict(_COMMON, intermediate_size=MLP, num_key_value_heads=2)

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=MLP)),
    "gptj": (
        "GPTJConfig",
        dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_inner=MLP),
    ),  # fmt: skip
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, intermediate_size=MLP)),
    "opt": ("OPTConfig", dict(_COMMON, ffn_dim=MLP, word_embed_proj_dim=H)),
    "bloom": ("BloomConfig", dict(vocab_size=V, hidden_size=H, n_layer=LAYERS, n_head=HEADS)),
    "falcon": ("FalconConfig", dict(_COMMON, new_decoder_architecture=False, multi_query=True)),
    "phi": ("PhiConfig", dict(_COMMON, intermediate_size=MLP)),
    "phi3": ("Phi3Config", dict(_LLAMA_LIKE)),
    "gemma2": ("Gemma2Config", dict(_LLAMA_LIKE, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", dict(_LLAMA_LIKE, head_dim=8)),
    "qwen2": ("Qwen2Config", dict(_LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", dict(_LLAMA_LIKE, head_dim=8)),
    "mixtral": (
        "MixtralConfig",
        dict(
            _COMMON,
            intermediate_size=MLP // 2,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),  # fmt: skip
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            _LLAMA_LIKE,
            head_dim=8,
            moe_intermediate_size=MLP,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
        ),
    ),  # fmt: skip
    "olmo2": ("Olmo2Config", dict(_LLAMA_LIKE)),
    "llama": ("LlamaConfig", dict(_LLAMA_LIKE)),
    "llama_tied": ("LlamaConfig", dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_LLAMA_LIKE)),
    "stablelm": ("StableLmConfig", dict(_LLAMA_LIKE)),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_inner=MLP),
    ),  # fmt: skip
    "codegen": (
        "CodeGenConfig",
        dict(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_inner=MLP),
    ),  # fmt: skip
    "starcoder2": ("Starcoder2Config", dict(_LLAMA_LIKE)),
    "granite": ("GraniteConfig", dict(_LLAMA_LIKE)),
    "cohere": ("CohereConfig", dict(_LLAMA_LIKE)),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            _COMMON,
            num_layers=LAYERS,
            num_heads=HEADS,
            attention_types=[[["global", "local"], 1]],
            intermediate_size=MLP,
        ),
    ),  # fmt: skip
}
MOE = ("mixtral", "qwen3_moe")
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the vocabulary


def config(name: str):
    config_cls, kwargs = ARCHITECTURES[name]
    return getattr(transformers, config_cls)(**kwargs, **TOKEN_IDS)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A random model of architecture ``name`` in eval mode, fp32, norms and biases random."""
    cfg = config(name)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random (not init-default) norms, biases and expert weights
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln" in pname.split(".")[-2:][0]:
                p.add_(0.2 * torch.randn_like(p))  # around the init: 1, or 0 where 1 + w scales
            elif pname.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif p.dim() == 3:  # expert tensors: drawn as the dense weights are
                p.normal_(0.0, cfg.initializer_range)
    return model


def batches(n: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1, seq), generator=g) for _ in range(n)]
