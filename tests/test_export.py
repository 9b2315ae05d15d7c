"""qcompile.export: a lowbit model as a GPTQ checkpoint and as a GGUF file.

The exported codes are read back here with decoders written from the formats'
descriptions (not with lowbit's packing): GPTQ's little-endian bit streams bit by bit with
Python ints, GGUF's Q4_1 / Q8_0 blocks byte by byte, and llama.cpp's q/k row order from
its converter's reshape. Codes and zero points must equal lowbit's bit for bit, scales
(d, m) lowbit's to fp16 rounding; with llama-cpp-python installed, llama.cpp runs the
exported GGUF and computes lowbit's logits.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from architectures import build
from model_folder import TEXT, tiny_llama
from safetensors.torch import load_file
from transformers import AutoTokenizer

import qcompile
from qcompile import serialize
from qcompile.export import export
from qcompile.folder import write_folder_config
from qcompile.kernels.packing import unpack
from qcompile.kernels.weight_only_reference import dequantize_groupwise

try:
    import gguf  # the "model" extra
except ImportError:  # pragma: no cover - the GPTQ tests still run
    gguf = None

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package (.[model])")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# every bit width, round-to-nearest and GPTQ, groups 32 / 64 / 128, a layer left in fp
MIXED = {
    "recipe": "w4a16-g32",
    "overrides": {
        "model.layers.0.self_attn.q_proj": "w2a16-g32",
        "model.layers.0.self_attn.k_proj": "w2a16-g64-gptq",
        "model.layers.0.self_attn.v_proj": "w3a16-g32",
        "model.layers.0.self_attn.o_proj": "w3a16-g64-gptq",
        "model.layers.0.mlp.gate_proj": "w8a16-g32",
        "model.layers.0.mlp.up_proj": "w8a16-g64-gptq",
        "model.layers.0.mlp.down_proj": "w4a16-g128-gptq",
        "model.layers.1.self_attn.v_proj": "fp",
        "lm_head": "w3a16-g32-gptq",
    },
}


def saved(path, model, ids, options, tok=None):
    """``model`` compiled with ``options``, run once and saved to ``path``; its logits."""
    torch._dynamo.reset()
    calibration = qcompile.calibrate(model, [ids], hessian=True)
    fast = torch.compile(
        model, backend="lowbit", options={"handoff": "eager", "calibration": calibration, **options}
    )
    with torch.no_grad():
        logits = fast(ids).logits[0]
    qcompile.save(fast, path, **({"tokenizer": tok} if tok is not None else {}))
    torch._dynamo.reset()
    return path, logits


def tied_llama():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


def sharp_llama(seed: int = 0):
    """Attention far from uniform, so that a wrong q/k row order changes the logits."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tok, ids):
    return saved(tmp_path_factory.mktemp("mixed") / "m", tiny_llama(), ids, MIXED, tok)[0]


@pytest.fixture(scope="module")
def tied8(tmp_path_factory, tok, ids):
    """Tied embeddings under a 4-bit recipe: the table is the 8-bit lm_head's codes."""
    return saved(tmp_path_factory.mktemp("tied8") / "m", tied_llama(), ids, {"recipe": "w4a16-g32"}, tok)[0]  # fmt: skip


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory, tok, ids):
    """Q4_1 (GPTQ) with w8a8 (Q8_0) down projections; its folder and logits."""
    options = {"recipe": "w4a16-g32-gptq", "overrides": {"*.down_proj": "w8a8"}}
    return saved(tmp_path_factory.mktemp("q4") / "m", sharp_llama(), ids, options, tok)


# lowbit's own products ------------------------------------------------------------------


def products(folder, name):
    plan, tensors = serialize.read(folder)
    entry = plan["quantized"][name]
    (art,) = entry["artifacts"]
    t = {role: tensors[n] for role, n in art["tensors"].items()}
    return art["key"]["scheme"], art["meta"], t


def lowbit_weight_only(folder, name, dtype=torch.float64):
    """``(codes uint8 [N, K], scales, zeros, bits, group, dequantized)``: lowbit's
    dequantized weight in ``dtype`` (float32: the values lowbit's embedding reads)."""
    scheme, meta, t = products(folder, name)
    bits, group = meta["bits"], meta["group_size"]
    n, groups = t["scales"].shape
    codes = unpack(t["packed"], bits, groups * group)
    w = dequantize_groupwise(codes, t["scales"], t["zeros"], group, dtype)
    return codes.numpy(), t["scales"].numpy(), t["zeros"].numpy(), bits, group, w.numpy()


# GPTQ -----------------------------------------------------------------------------------


def stream_codes(words: torch.Tensor, bits: int, count: int) -> np.ndarray:
    """int32 ``[W, C]``: column ``c`` is one little-endian bit stream (word ``j`` holds
    stream bits ``32j..32j+31``, least significant first) of ``count`` codes -> ``[count, C]``."""
    w = words.numpy().astype("<i4").view("<u4")
    out = np.zeros((count, w.shape[1]), dtype=np.int64)
    mask = (1 << bits) - 1
    for c in range(w.shape[1]):
        stream = int.from_bytes(w[:, c].tobytes(), "little")
        for i in range(count):
            out[i, c] = (stream >> (i * bits)) & mask
    return out


def gptq_layer(t, module, bits, k, n):
    """Codes ``[K, N]``, zeros ``[K / G, N]``, scales, g_idx and ``W [N, K]`` (float64)."""
    qweight, qzeros = t[f"{module}.qweight"], t[f"{module}.qzeros"]
    scales, g_idx = t[f"{module}.scales"], t[f"{module}.g_idx"]
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32
    assert scales.dtype == torch.float16
    assert qweight.shape == (k * bits // 32, n) and qzeros.shape == (
        scales.shape[0],
        n * bits // 32,
    )
    q = stream_codes(qweight, bits, k)
    z = stream_codes(qzeros.t(), bits, n).T
    s = scales.double().numpy()
    g = g_idx.long().numpy()
    w = (q - z[g]) * s[g]  # [K, N]
    return q, z, s, g, w.T


def dynamic_rule(config, module):
    """The (bits, group_size) a GPTQModel / vLLM loader gives ``module`` (None: fp)."""
    for pattern, rule in config.get("dynamic", {}).items():
        if pattern.startswith("-:") and re.match(pattern[2:], module):
            return None
        if pattern.startswith("+:") and re.match(pattern[2:], module):
            return rule.get("bits", config["bits"]), rule.get("group_size", config["group_size"])
    return config["bits"], config["group_size"]


def check_gptq_layers(folder, out, modules):
    t = load_file(out / "model.safetensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for module in modules:
        codes, scales, zeros, bits, group, w = lowbit_weight_only(folder, f"{module}.weight")
        n, k = codes.shape
        q, z, s, g, w_gptq = gptq_layer(t, module, bits, k, n)
        assert dynamic_rule(qc, module) == (bits, group), module
        assert np.array_equal(q, codes.T.astype(np.int64)), module  # bit for bit
        assert np.array_equal(z, zeros.T.astype(np.int64)), module
        assert np.array_equal(s, scales.T.astype(np.float16).astype(np.float64)), module
        assert np.array_equal(g, np.arange(k) // group)
        # lowbit's weight up to the fp16 rounding of the scales
        bound = np.abs(codes.astype(np.float64) - np.repeat(zeros, group, 1)) * np.repeat(
            np.abs(scales) * 2.0**-11, group, 1
        )
        assert (np.abs(w_gptq - w) <= bound + 1e-12).all(), module
    return t, qc


def test_gptq_mixed_bits_rtn_and_gptq(mixed, tmp_path, tok):
    out = export(mixed, tmp_path / "gptq", format="gptq")
    modules = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in LINEARS[:4]]
    modules += [f"model.layers.{i}.mlp.{m}" for i in (0, 1) for m in LINEARS[4:]] + ["lm_head"]
    modules.remove("model.layers.1.self_attn.v_proj")
    t, qc = check_gptq_layers(mixed, out, modules)
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, False, False)
    assert qc["lm_head"] is True
    assert dynamic_rule(qc, "model.layers.1.self_attn.v_proj") is None  # left in fp
    assert t["model.layers.1.self_attn.v_proj.weight"].dtype == torch.float16
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert t["model.norm.weight"].dtype == torch.float16
    methods = qc["meta"]["lowbit_methods"]
    assert set(methods) <= {"gptq", "rtn"} and sum(methods.values()) == len(modules)
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == tok(TEXT).input_ids
    assert not (out / serialize.WEIGHTS_NAME).exists()


@pytest.mark.parametrize("recipe", ["w3a16-g32-gptq", "w2a16-g64"])
def test_gptq_one_recipe(recipe, tmp_path, tok, ids):
    folder, _ = saved(tmp_path / "m", tiny_llama(), ids, {"recipe": recipe}, tok)
    out = export(folder, tmp_path / "gptq", format="gptq")
    modules = [f"model.layers.{i}.{'self_attn' if m in LINEARS[:4] else 'mlp'}.{m}"
               for i in (0, 1) for m in LINEARS] + ["lm_head"]  # fmt: skip
    _, qc = check_gptq_layers(folder, out, modules)
    bits, group = int(recipe[1]), int(recipe.split("-g")[1].split("-")[0])
    assert (qc["bits"], qc["group_size"]) == (bits, group) and "dynamic" not in qc


def test_gptq_tied_embedding_is_the_dequantized_table(tied8, tmp_path):
    out = export(tied8, tmp_path / "gptq", format="gptq")
    t, qc = check_gptq_layers(tied8, out, ["model.layers.0.mlp.up_proj"])
    assert qc["lm_head"] is False and not any(k.startswith("lm_head") for k in t)
    *_, bits, _, table = lowbit_weight_only(tied8, "model.embed_tokens.weight", torch.float32)
    assert bits == 8  # lowbit keeps a tied table at 8 bits
    got = t["model.embed_tokens.weight"]
    assert got.dtype == torch.float16
    assert np.array_equal(got.numpy(), table.astype(np.float16))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_gptq_gpt2_conv1d_from_one_file(tmp_path):
    """GPT-2's Conv1D layers (stored [in, out]); the input is a one-file lowbit save."""
    model = build("gpt2")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    path, _ = saved(tmp_path / "gpt2.safetensors", model, ids, {"recipe": "w4a16-g32"})
    out = export(path, tmp_path / "gptq", format="gptq")
    modules = [f"transformer.h.{i}.{m}" for i in (0, 1)
               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    t, _ = check_gptq_layers(path, out, modules)
    assert t["transformer.h.0.attn.c_attn.bias"].dtype == torch.float16
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]


def test_gptq_refuses_other_recipes(tmp_path, q4_gguf):
    with pytest.raises(ValueError, match=r"weight-only recipes only .*w8a8"):
        export(q4_gguf[0], tmp_path / "gptq", format="gptq")
    with pytest.raises(ValueError, match="unknown format"):
        export(q4_gguf[0], tmp_path / "x", format="awq")


# GGUF -----------------------------------------------------------------------------------


def llama_cpp_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotate-half rows -> interleaved (per head)."""
    return (
        a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:])
        .swapaxes(1, 2)
        .reshape(a.shape)
    )


def q4_1_fields(t):
    """``d, m [N, K/32]`` and codes ``[N, K]`` from Q4_1 blocks (2 + 2 + 16 bytes)."""
    raw = np.asarray(t.data, dtype=np.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte j: elements j and j + 16
    return d, m, codes.reshape(n, -1)


def q8_0_fields(t):
    raw = np.asarray(t.data, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    return d, blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items()}


def check_q4_1(t, folder, name, rows=None):
    codes, scales, zeros, bits, group, w = lowbit_weight_only(folder, name)
    assert (bits, group) == (4, 32) and t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    if rows is not None:
        codes, scales, zeros, w = (llama_cpp_rows(a, rows) for a in (codes, scales, zeros, w))
    d, m, got = q4_1_fields(t)
    assert np.array_equal(got, codes), name
    s, z = scales.astype(np.float64), zeros.astype(np.float64)
    assert np.array_equal(d, scales.astype(np.float16)), name
    assert (np.abs(m - (-z * s)) <= np.abs(z * s) * 2.0**-11).all(), name
    deq = gguf.quants.dequantize(t.data, t.tensor_type)
    bound = np.repeat(32 * s * 2.0**-11, 32, axis=1)
    assert deq.shape == w.shape and (np.abs(deq - w) <= bound).all(), name


def check_q8_0(t, folder, name):
    _, _, p = products(folder, name)
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    d, got = q8_0_fields(t)
    assert np.array_equal(got, p["w_q"].numpy()), name
    assert np.array_equal(
        d, np.repeat(p["w_scale"].numpy().astype(np.float16)[:, None], d.shape[1], 1)
    )
    deq = gguf.quants.dequantize(t.data, t.tensor_type)
    w = p["w_q"].double().numpy() * p["w_scale"].double().numpy()[:, None]
    assert (np.abs(deq - w) <= 127 * p["w_scale"].double().numpy()[:, None] * 2.0**-11).all()


@needs_gguf
def test_gguf_q4_1_and_q8_0_codes_bit_for_bit(q4_gguf, tmp_path, tok):
    folder = q4_gguf[0]
    out = export(folder, tmp_path / "m.gguf", format="gguf")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in (0, 1):
        expected |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k",
                     "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    assert set(tensors) == expected
    for i in (0, 1):
        layer = f"model.layers.{i}"
        check_q4_1(tensors[f"blk.{i}.attn_q.weight"], folder, f"{layer}.self_attn.q_proj.weight", 4)
        check_q4_1(tensors[f"blk.{i}.attn_k.weight"], folder, f"{layer}.self_attn.k_proj.weight", 2)
        check_q4_1(tensors[f"blk.{i}.attn_v.weight"], folder, f"{layer}.self_attn.v_proj.weight")
        check_q4_1(tensors[f"blk.{i}.ffn_up.weight"], folder, f"{layer}.mlp.up_proj.weight")
        check_q8_0(tensors[f"blk.{i}.ffn_down.weight"], folder, f"{layer}.mlp.down_proj.weight")
        assert tensors[f"blk.{i}.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    check_q4_1(tensors["output.weight"], folder, "lm_head.weight")
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    meta = fields(reader)
    expect = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.context_length": 256,
        "llama.vocab_size": 320,
        "general.file_type": gguf.LlamaFileType.MOSTLY_Q4_1,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": 0,
    }
    assert {k: meta.get(k) for k in expect} == expect
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    vocab = tok.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert meta["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL  # <|endoftext|>
    assert len(meta["tokenizer.ggml.merges"]) == 320 - 257


@needs_gguf
@pytest.mark.parametrize("options", [{"recipe": "w4a16-g32", "overrides": {"lm_head": "w4a16-g32"}},
                                     {"recipe": "w8a8"}], ids=["q4_1-table", "q8_0-table"])  # fmt: skip
def test_gguf_tied_embeddings(options, tmp_path, tok, ids):
    """One table: the embedding and llama.cpp's output both read lm_head's codes."""
    folder, _ = saved(tmp_path / "m", tied_llama(), ids, options, tok)
    out = export(folder, tmp_path / "m.gguf", format="gguf", fp_type="f32")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in tensors
    check = check_q8_0 if options["recipe"] == "w8a8" else check_q4_1
    check(tensors["token_embd.weight"], folder, "model.embed_tokens.weight")


@needs_gguf
def test_gguf_tied_8_bit_table_is_dequantized(tied8, tmp_path):
    out = export(tied8, tmp_path / "m.gguf", format="gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in tensors
    table = tensors["token_embd.weight"]
    assert table.tensor_type == gguf.GGMLQuantizationType.F16
    w = lowbit_weight_only(tied8, "model.embed_tokens.weight", torch.float32)[-1]
    assert np.array_equal(np.asarray(table.data), w.astype(np.float16))


@needs_gguf
def test_gguf_tokenizer_copied_from_a_gguf_source(q4_gguf, tmp_path):
    first = export(q4_gguf[0], tmp_path / "a.gguf", format="gguf")
    folder = shutil.copytree(q4_gguf[0], tmp_path / "copy")
    (folder / "tokenizer.json").unlink()  # the source's vocabulary, not the folder's
    write_folder_config(folder, source=str(first))
    second = export(folder, tmp_path / "b.gguf", format="gguf")
    a, b = fields(gguf.GGUFReader(first)), fields(gguf.GGUFReader(second))
    tok_a = {k: v for k, v in a.items() if k.startswith("tokenizer.")}
    assert tok_a == {k: v for k, v in b.items() if k.startswith("tokenizer.")}
    assert len(tok_a) >= 6


@needs_gguf
def test_gguf_refuses_other_recipes_and_architectures(mixed, tmp_path, ids):
    with pytest.raises(
        ValueError,
        match=r"holds w2a16-g32 .*w3a16-g64-gptq .* exports w8a8, w4a16-g32, w4a16-g32-gptq",
    ):
        export(mixed, tmp_path / "m.gguf", format="gguf")
    qwen, _ = saved(tmp_path / "qwen", build("qwen2"), ids % 128, {"recipe": "w8a8"})
    with pytest.raises(ValueError, match="exports LlamaForCausalLM models, not Qwen2ForCausalLM"):
        export(qwen, tmp_path / "q.gguf", format="gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing left behind


@needs_gguf
def test_llama_cpp_runs_the_exported_gguf(q4_gguf, tmp_path, tok, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    folder, logits = q4_gguf
    out = export(folder, tmp_path / "m.gguf", format="gguf")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids[0].tolist()
    llm.eval(ids[0].tolist())
    got = torch.tensor(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))
    # llama.cpp quantizes activations to 8 bits per block; a wrong q/k order errs by ~0.6
    assert (got - logits).abs().max() < 0.1 * logits.abs().max()


@needs_gguf
def test_tokenizer_from_the_source_folder(tied8, tmp_path, tok):
    """A folder saved without its tokenizer: the original model's (``source``) is used."""
    source = tmp_path / "original"
    tok.save_pretrained(source)
    folder = shutil.copytree(tied8, tmp_path / "copy")
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match="GGUF needs a tokenizer"):
        export(folder, tmp_path / "none.gguf", format="gguf")
    write_folder_config(folder, source=str(source))
    out = export(folder, tmp_path / "m.gguf", format="gguf")
    vocab = tok.get_vocab()
    tokens = fields(gguf.GGUFReader(out))["tokenizer.ggml.tokens"]
    assert tokens == sorted(vocab, key=vocab.get)
    gptq = export(folder, tmp_path / "gptq", format="gptq")
    assert AutoTokenizer.from_pretrained(gptq)(TEXT).input_ids == tok(TEXT).input_ids
    with pytest.raises(ValueError, match="not a folder with tokenizer files"):
        export(folder, tmp_path / "gptq2", format="gptq", tokenizer=out)
