"""Load a Llama-family GGUF file (llama.cpp's format) into ``(LlamaConfig, params, tokenizer)``.

Reads the file with the ``gguf`` package, dequantizes every tensor to float32 in NumPy
(``gguf.quants.dequantize`` handles F32/F16/BF16, Q4_0 … Q8_0, the K-quants and the IQ types),
undoes llama.cpp's row permutation of ``attn_q``/``attn_k``, and produces the params pytree of
DESIGN.md (kernels ``[in, out]``, the transpose of GGUF's ``[out, in]`` rows).

GGUF stores a weight of shape ``[out, in]`` (NumPy order) with ``tensor.shape == [in, out]`` (ggml
order, fastest dimension first). For ``llama`` files, ``convert_hf_to_gguf.py`` reorders the rows of
``attn_q``/``attn_k`` within each head from Hugging Face's "rotate-half" RoPE layout (first half,
second half) to ggml's interleaved pairs: HF row ``s * hd/2 + j`` (``s`` in {0, 1}) is stored at
row ``2 * j + s``. :func:`unpermute_qk` inverts that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jgptq.models.config import ConfigError, LlamaConfig

__all__ = ["GGUFError", "SUPPORTED_GGUF_ARCHITECTURES", "gguf_to_hf_config", "load_gguf",
           "read_gguf_metadata", "unpermute_qk"]

# GGUF general.architecture -> Hugging Face model_type. Only "llama" files have permuted q/k rows.
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# GGUF per-block tensor name -> (our module path, kind)
_BLOCK_TENSORS = {
    "attn_norm.weight": (("input_layernorm", "scale"), "norm"),
    "ffn_norm.weight": (("post_attention_layernorm", "scale"), "norm"),
    "attn_q.weight": (("self_attn", "q_proj", "kernel"), "linear"),
    "attn_k.weight": (("self_attn", "k_proj", "kernel"), "linear"),
    "attn_v.weight": (("self_attn", "v_proj", "kernel"), "linear"),
    "attn_output.weight": (("self_attn", "o_proj", "kernel"), "linear"),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), "linear"),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), "linear"),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), "linear"),
    "attn_q.bias": (("self_attn", "q_proj", "bias"), "bias"),
    "attn_k.bias": (("self_attn", "k_proj", "bias"), "bias"),
    "attn_v.bias": (("self_attn", "v_proj", "bias"), "bias"),
    "attn_output.bias": (("self_attn", "o_proj", "bias"), "bias"),
    "ffn_gate.bias": (("mlp", "gate_proj", "bias"), "bias"),
    "ffn_up.bias": (("mlp", "up_proj", "bias"), "bias"),
    "ffn_down.bias": (("mlp", "down_proj", "bias"), "bias"),
}


class GGUFError(ValueError):
    """A GGUF file that this loader cannot turn into a correct model."""


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order of a q/k weight ``[n_heads*hd, in]`` or bias
    ``[n_heads*hd]``: returns the Hugging Face (rotate-half) row order, same shape."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"q/k tensor with {rows} rows cannot hold {n_heads} heads of even width")
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    """A GGUF metadata field as a Python scalar, string or list (strings decoded as UTF-8)."""
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    from gguf import GGUFValueType

    values = [field.parts[i] for i in field.data]
    if field.types[-1] == GGUFValueType.STRING:
        values = [bytes(v).decode("utf-8") for v in values]
    else:
        values = [v.tolist()[0] for v in values]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """Scalar/string metadata of an open ``gguf.GGUFReader`` (arrays longer than 64 items are
    skipped: the tokenizer vocabulary and merges)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(field.data) > 64:
            continue
        out[key] = _field_value(field)
    return out


def gguf_to_hf_config(meta: dict[str, Any], tensor_names: set[str],
                      embed_shape: tuple[int, ...]) -> dict[str, Any]:
    """Hugging Face ``config.json`` dict from GGUF metadata (``llama.*`` / ``qwen2.*`` keys).

    ``tensor_names`` decides tied embeddings (no ``output.weight``) and biases; ``embed_shape`` is
    the ``[V, D]`` NumPy shape of ``token_embd.weight`` (the vocabulary size when metadata lacks it).
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(
            f"GGUF general.architecture={arch!r} is not supported: this loader reads "
            f"{sorted(SUPPORTED_GGUF_ARCHITECTURES)} (Llama, SmolLM2, Mistral, Qwen2 files). "
            f"Other architectures need their own model code.")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise GGUFError(f"GGUF metadata lacks the required key {full!r}")
            return default
        return meta[full]

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{arch}.attention.value_length={get('attention.value_length')} differs "
                        f"from key_length={head_dim}; not supported")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{arch}.rope.dimension_count={rope_dims} < head_dim={head_dim} (partial "
                        f"rotary embeddings) is not supported")
    for key in ("expert_count", "attention.sliding_window"):
        if get(key):
            raise GGUFError(f"GGUF {arch}.{key}={get(key)!r} (mixture of experts / sliding window) "
                            f"is not supported by jgptq.models")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError("GGUF has a rope_freqs.weight tensor (Llama 3.1-style per-frequency RoPE "
                        "factors); loading those from GGUF is not supported. Load the Hugging Face "
                        "checkpoint instead.")
    hf: dict[str, Any] = {
        "model_type": SUPPORTED_GGUF_ARCHITECTURES[arch],
        "vocab_size": int(get("vocab_size", embed_shape[0])),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported "
                            f"(only 'linear')")
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        hf["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if key in meta:
            hf[ours] = int(meta[key])
    if hf["vocab_size"] != embed_shape[0]:
        raise GGUFError(f"{arch}.vocab_size={hf['vocab_size']} but token_embd.weight has "
                        f"{embed_shape[0]} rows")
    return hf


def _dequantized(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 in NumPy order ``reversed(tensor.shape)``, finite-checked."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        w = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
                        f"the gguf package cannot dequantize: {e}") from e
    w = np.asarray(w, dtype=np.float32)
    if w.size != int(np.prod(shape)):
        raise GGUFError(f"GGUF tensor {tensor.name!r}: {w.size} values after dequantizing, but its "
                        f"header shape {shape} needs {int(np.prod(shape))}")
    w = w.reshape(shape)
    if not np.isfinite(w).all():
        raise GGUFError(f"GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}) holds "
                        f"{int((~np.isfinite(w)).sum())} NaN/Inf values; the file is corrupt")
    return w


def load_gguf(
    path: str | os.PathLike,
    dtype: Any = None,
    tokenizer: bool = True,
) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """Load a ``llama`` (or ``qwen2``) GGUF file as ``(LlamaConfig, params, tokenizer_or_None)``.

    Args:
      path: the ``.gguf`` file.
      dtype: dtype of the returned host (NumPy) arrays: ``"float32"`` (default), ``"bfloat16"``
        (``ml_dtypes.bfloat16``), ``"float16"`` or a dtype. Dequantization itself is fp32.
      tokenizer: build the Hugging Face tokenizer stored in the file
        (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``; a few seconds). ``None`` is
        returned when False or when the file holds no tokenizer.

    Returns:
      ``params`` as in DESIGN.md, host NumPy arrays: ``embed_tokens.embedding [V, D]``, a list of ``layers`` with
      kernels ``[in, out]``, ``norm.scale [D]``, and ``lm_head.kernel [D, V]`` unless the
      embeddings are tied (no ``output.weight`` in the file).

    Raises:
      GGUFError: unsupported architecture, a missing / unexpected / wrongly shaped tensor, or
        NaN/Inf weights; ``FileNotFoundError`` for a missing file.
    """
    from gguf import GGUFReader

    from jgptq.models.hf import resolve_dtype

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    dtype = resolve_dtype("float32" if dtype is None else dtype)
    reader = GGUFReader(path)
    meta = read_gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path.name}: tensor 'token_embd.weight' is missing")
    embed_shape = tuple(int(d) for d in reversed(tensors["token_embd.weight"].shape))
    hf = gguf_to_hf_config(meta, set(tensors), embed_shape)
    try:
        config = LlamaConfig.from_hf(hf)
    except ConfigError as e:
        raise GGUFError(f"{path.name}: the model described by its metadata is not supported: "
                        f"{e}") from e
    permute = meta["general.architecture"] == "llama"

    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    out_in = {  # expected NumPy [out, in] shape of each block linear
        "attn_q": (config.q_size, D), "attn_k": (config.kv_size, D), "attn_v": (config.kv_size, D),
        "attn_output": (D, config.q_size), "ffn_gate": (F, D), "ffn_up": (F, D),
        "ffn_down": (D, F),
    }
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise GGUFError(f"{path.name}: tensor {name!r} is missing (expected shape {shape})")
        seen = tuple(int(d) for d in reversed(tensors[name].shape))
        if seen != shape:
            raise GGUFError(f"{path.name}: tensor {name!r} has shape {seen}, expected {shape} "
                            f"from the metadata")
        used.add(name)
        return _dequantized(tensors[name])

    def put(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=dtype)

    params: dict[str, Any] = {"embed_tokens": {"embedding": put(take("token_embd.weight", (V, D)))}}
    layers = []
    for i in range(config.num_layers):
        layer: dict[str, Any] = {}
        for suffix, (where, kind) in _BLOCK_TENSORS.items():
            name = f"blk.{i}.{suffix}"
            base = suffix.split(".")[0]
            if kind == "norm":
                w = take(name, (D,))
            elif kind == "linear":
                w = take(name, out_in[base])
            else:  # bias: optional, but all or nothing per config
                want = {"attn_q": config.qkv_bias, "attn_k": config.qkv_bias,
                        "attn_v": config.qkv_bias, "attn_output": config.o_bias}.get(
                            base, config.mlp_bias)
                if not want:
                    continue
                w = take(name, (out_in[base][0],))
            if permute and base in ("attn_q", "attn_k"):
                w = unpermute_qk(w, config.num_heads if base == "attn_q" else config.num_kv_heads)
            if kind == "linear":
                w = w.T
            node = layer
            for key in where[:-1]:
                node = node.setdefault(key, {})
            node[where[-1]] = put(w)
        layers.append(layer)
    params["layers"] = layers
    params["norm"] = {"scale": put(take("output_norm.weight", (D,)))}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": put(take("output.weight", (V, D)).T)}
    unused = sorted(set(tensors) - used)
    if unused:
        raise GGUFError(f"{path.name}: tensors this loader does not understand: {unused[:8]}"
                        f"{' ...' if len(unused) > 8 else ''}; refusing rather than dropping them")

    tok = None
    if tokenizer and "tokenizer.ggml.model" in reader.fields:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return config, params, tok
