"""GGUF loader: tiny GGUF files written here with ``gguf.GGUFWriter`` (random weights, several
quantization types, llama.cpp's q/k row permutation applied by an independent transcription), checked
against the original float weights and against transformers' own GGUF loader; plus the real SmolLM2
file (slow)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from jgptq.models.gguf import GGUFError, load_gguf, unpermute_qk

D, F, H, KV, HD, V, L = 64, 128, 4, 2, 16, 96, 2

# per-tensor quantization types: a mix of every type gguf.quants can write
TYPES = {
    "token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q5_0, "attn_v": Q.F16,
    "attn_output": Q.Q4_0, "ffn_gate": Q.BF16, "ffn_up": Q.Q8_0, "ffn_down": Q.Q5_1,
    "output": Q.F32,
}
# bound on |dequantized - original| relative to the tensor's max |value|, per type: half a step,
# except Q4_0/Q5_0 whose symmetric grid clips the far end of each block by a whole step
REL_ERR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 200, Q.Q4_0: 1 / 7.9,
           Q.Q4_1: 1 / 12, Q.Q5_0: 1 / 15.9, Q.Q5_1: 1 / 24}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to HF q/k rows (written from its description: the
    two RoPE halves of each head become interleaved pairs)."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(hd // 2):
            for s in range(2):
                out[h * hd + 2 * j + s] = w[h * hd + s * hd // 2 + j]
    return out


def hf_weights(seed: int, arch: str = "llama", tied: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout ``[out, in]``, keyed by GGUF tensor name."""
    rng = np.random.default_rng(seed)
    w = {"token_embd.weight": rng.standard_normal((V, D)),
         "output_norm.weight": 1 + 0.1 * rng.standard_normal(D)}
    if not tied:
        w["output.weight"] = 0.1 * rng.standard_normal((V, D))
    for i in range(L):
        b = f"blk.{i}."
        w[b + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(D)
        w[b + "ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(D)
        w[b + "attn_q.weight"] = 0.1 * rng.standard_normal((H * HD, D))
        w[b + "attn_k.weight"] = 0.1 * rng.standard_normal((KV * HD, D))
        w[b + "attn_v.weight"] = 0.1 * rng.standard_normal((KV * HD, D))
        w[b + "attn_output.weight"] = 0.1 * rng.standard_normal((D, H * HD))
        w[b + "ffn_gate.weight"] = 0.1 * rng.standard_normal((F, D))
        w[b + "ffn_up.weight"] = 0.1 * rng.standard_normal((F, D))
        w[b + "ffn_down.weight"] = 0.1 * rng.standard_normal((D, F))
        if arch == "qwen2":
            w[b + "attn_q.bias"] = 0.1 * rng.standard_normal(H * HD)
            w[b + "attn_k.bias"] = 0.1 * rng.standard_normal(KV * HD)
            w[b + "attn_v.bias"] = 0.1 * rng.standard_normal(KV * HD)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama",
               types: dict[str, Q] | None = None, shapes: dict[str, tuple] | None = None) -> Path:
    """Write ``weights`` (HF layout) as a GGUF of ``arch``, permuting q/k rows like llama.cpp for
    ``llama``. ``shapes`` overrides the header shape of named tensors (to build broken files)."""
    types = TYPES if types is None else types
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5e4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(V)
    for name, arr in weights.items():
        base = name.split(".")[-2]
        if arch == "llama" and base in ("attn_q", "attn_k"):
            arr = llama_cpp_permute(arr, H if base == "attn_q" else KV)
        if shapes and name in shapes:
            arr = arr.reshape(shapes[name])
        qtype = types.get(base, Q.F32) if arr.ndim == 2 else Q.F32
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def ours_by_gguf_name(params: dict, name: str) -> np.ndarray:
    """Our tensor for a GGUF name, back in HF ``[out, in]`` layout."""
    table = {"attn_norm": ("input_layernorm", "scale"), "ffn_norm": ("post_attention_layernorm", "scale"),
             "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
             "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
             "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
             "ffn_down": ("mlp", "down_proj")}
    if name == "token_embd.weight":
        return np.asarray(params["embed_tokens"]["embedding"])
    if name == "output_norm.weight":
        return np.asarray(params["norm"]["scale"])
    if name == "output.weight":
        return np.asarray(params["lm_head"]["kernel"]).T
    _, i, base, kind = name.split(".")
    node = params["layers"][int(i)]
    where = table[base]
    if where[1] == "scale":
        return np.asarray(node[where[0]]["scale"])
    lin = node[where[0]][where[1]]
    return np.asarray(lin["bias"]) if kind == "bias" else np.asarray(lin["kernel"]).T


def hf_name(name: str) -> str:
    table = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, i, base, kind = name.split(".")
    return f"model.layers.{i}.{table[base]}.{kind}"


def transformers_state(path: Path) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(1)
    for heads, hd, cols in ((9, 64, 5), (3, 8, 1), (2, 4, 7)):
        w = rng.standard_normal((heads * hd, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)
        b = rng.standard_normal(heads * hd).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b[:, None], heads)[:, 0], heads), b)
    with pytest.raises(GGUFError, match="rows"):
        unpermute_qk(np.zeros((10, 3), np.float32), 4)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_tiny_gguf_matches_originals_and_transformers(tmp_path, arch, tied):
    weights = hf_weights(seed={"llama": 2, "qwen2": 3}[arch] + tied, arch=arch, tied=tied)
    path = write_gguf(tmp_path / "tiny.gguf", weights, arch=arch)
    config, params, tok = load_gguf(path)
    assert tok is None  # no tokenizer in the file
    assert (config.model_type, config.num_layers, config.hidden_size, config.intermediate_size,
            config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        arch, L, D, F, H, KV, HD, V)
    assert config.rope_theta == 5e4 and config.rms_norm_eps == pytest.approx(1e-5)
    assert config.tie_word_embeddings == tied and ("lm_head" in params) == (not tied)
    assert config.qkv_bias == (arch == "qwen2")
    assert len(params["layers"]) == L

    # 1) against the float weights we wrote (independent of gguf's dequantizer), q/k unpermuted
    for name, ref in weights.items():
        ours = ours_by_gguf_name(params, name)
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        qtype = TYPES.get(name.split(".")[-2], Q.F32) if ref.ndim == 2 else Q.F32
        tol = REL_ERR[qtype] * np.abs(ref).max()
        assert np.abs(ours - ref).max() <= tol, (name, qtype.name)
    # kernels are [in, out]
    assert params["layers"][0]["self_attn"]["q_proj"]["kernel"].shape == (D, H * HD)
    assert params["layers"][0]["mlp"]["down_proj"]["kernel"].shape == (F, D)

    # 2) bit-exact against transformers' GGUF loader (same dequantizer, its own unpermute)
    state = transformers_state(path)
    expected = {hf_name(n) for n in weights} | ({"lm_head.weight"} if tied else set())
    assert set(state) == expected
    for name in weights:
        np.testing.assert_array_equal(ours_by_gguf_name(params, name), state[hf_name(name)], err_msg=name)
    if tied:
        np.testing.assert_array_equal(params["embed_tokens"]["embedding"], state["lm_head.weight"])


def test_dtype_bfloat16(tmp_path):
    import ml_dtypes

    weights = hf_weights(seed=5)
    path = write_gguf(tmp_path / "tiny.gguf", weights)
    _, p32, _ = load_gguf(path)
    _, p16, _ = load_gguf(path, dtype="bfloat16")
    k32 = p32["layers"][1]["mlp"]["up_proj"]["kernel"]
    k16 = p16["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert k16.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(k16, k32.astype(ml_dtypes.bfloat16))


def test_missing_tensor_is_named(tmp_path):
    weights = hf_weights(seed=6)
    del weights["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", weights)
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_up\.weight' is missing"):
        load_gguf(path)


def test_wrong_shape_is_named(tmp_path):
    weights = hf_weights(seed=7)
    weights["blk.0.attn_v.weight"] = weights["blk.0.attn_v.weight"][:, : D // 2].copy()
    path = write_gguf(tmp_path / "shape.gguf", weights)
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_v\.weight' has shape \(32, 32\), expected \(32, 64\)"):
        load_gguf(path)


def test_unknown_tensor_refused(tmp_path):
    weights = hf_weights(seed=8)
    weights["blk.0.attn_q_norm.weight"] = np.ones(HD, np.float32)
    path = write_gguf(tmp_path / "extra.gguf", weights)
    with pytest.raises(GGUFError, match="attn_q_norm"):
        load_gguf(path)


def test_unsupported_architecture_refused(tmp_path):
    path = write_gguf(tmp_path / "gemma.gguf", hf_weights(seed=9), arch="gemma3")
    with pytest.raises(GGUFError, match=r"architecture='gemma3' is not supported"):
        load_gguf(path)


def test_nan_weights_refused(tmp_path):
    weights = hf_weights(seed=10)
    weights["blk.1.ffn_norm.weight"][3] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", weights)
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_norm\.weight'.*NaN/Inf"):
        load_gguf(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf("/nonexistent/model.gguf")


@pytest.mark.slow
def test_real_smollm2_matches_transformers(smollm2_gguf_path, smollm2):
    """Every tensor of the real SmolLM2 Q4_1/Q8_0 file equals transformers' dequantized state dict."""
    config, params = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 1e5 and "lm_head" not in params
    n_params = sum(int(np.prod(x.shape)) for x in _leaves(params))
    assert n_params == 134_515_008
    state = transformers_state(Path(smollm2_gguf_path))
    for i in range(config.num_layers):
        for base in ("attn_norm", "ffn_norm"):
            name = f"blk.{i}.{base}.weight"
            np.testing.assert_array_equal(ours_by_gguf_name(params, name), state[hf_name(name)])
        for base in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            name = f"blk.{i}.{base}.weight"
            np.testing.assert_array_equal(ours_by_gguf_name(params, name), state[hf_name(name)],
                                          err_msg=name)
    for name in ("token_embd.weight", "output_norm.weight"):
        np.testing.assert_array_equal(ours_by_gguf_name(params, name), state[hf_name(name)])
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], state["lm_head.weight"])


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree
