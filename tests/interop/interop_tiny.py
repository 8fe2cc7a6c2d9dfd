"""A tiny random Llama, quantized by jgptq's GPTQ, for the interop tests (imports jgptq; main venv only)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Hugging Face config of the tiny model: every GPTQ packing constraint holds (in % 32, 3-bit out % 32),
# group 128 is a real grouping for every linear (in = 256 or 512), GQA (4 query / 2 KV heads).
TINY_HF: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "attention_bias": False, "mlp_bias": False,
}

# linear -> (input name, in, out) for TINY_HF
_LINEARS = {
    "self_attn.q_proj": ("attn", 256, 256), "self_attn.k_proj": ("attn", 256, 128),
    "self_attn.v_proj": ("attn", 256, 128), "self_attn.o_proj": ("o", 256, 256),
    "mlp.gate_proj": ("mlp", 256, 512), "mlp.up_proj": ("mlp", 256, 512), "mlp.down_proj": ("down", 512, 256),
}


def fp16_exact(x: np.ndarray) -> np.ndarray:
    """float32 values that float16 represents exactly (so a fp16 export loses nothing)."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def float_params(seed: int) -> dict[str, Any]:
    """Random float params of the tiny model (DESIGN.md pytree), fp16-exact, large enough weights
    (std 1/sqrt(in)) that quantization error shows in the logits."""
    rng = np.random.default_rng(seed)
    c = TINY_HF
    d, v = c["hidden_size"], c["vocab_size"]

    def lin(n_in: int, n_out: int) -> dict[str, np.ndarray]:
        return {"kernel": fp16_exact(rng.normal(0, 1 / np.sqrt(n_in), (n_in, n_out)))}

    def norm() -> dict[str, np.ndarray]:
        return {"scale": fp16_exact(1 + 0.1 * rng.normal(size=d))}

    layers = []
    for _ in range(c["num_hidden_layers"]):
        lp: dict[str, Any] = {"input_layernorm": norm(), "post_attention_layernorm": norm(), "self_attn": {}, "mlp": {}}
        for name, (_, n_in, n_out) in _LINEARS.items():
            mod, proj = name.split(".")
            lp[mod][proj] = lin(n_in, n_out)
        layers.append(lp)
    return {"embed_tokens": {"embedding": fp16_exact(rng.normal(0, 1, (v, d)))}, "layers": layers,
            "norm": norm(), "lm_head": lin(d, v)}


def hessians(seed: int) -> dict[str, np.ndarray]:
    """One random positive-definite Hessian ``2 X^T X / n`` per input kind (correlated channels with
    unequal scales, so act-order really permutes)."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, n_in in (("attn", 256), ("o", 256), ("mlp", 256), ("down", 512)):
        mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in) + np.diag(rng.uniform(0.2, 3.0, n_in))
        x = rng.normal(size=(1024, n_in)) @ mix
        out[kind] = (2.0 / len(x) * x.T @ x).astype(np.float32)
    return out


def quantize_tiny(params: dict[str, Any], hs: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
    """Replace every decoder linear by jgptq's GPTQ result (``jgptq.gptq``) in params form."""
    import jgptq

    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = []
    for lp in params["layers"]:
        q = {k: dict(v) for k, v in lp.items()}
        for name, (kind, _, _) in _LINEARS.items():
            mod, proj = name.split(".")
            qw = jgptq.gptq(lp[mod][proj]["kernel"], hs[kind], config, name=name)
            q[mod][proj] = {k: np.asarray(x) for k, x in qw.to_params().items()}
        out["layers"].append(q)
    return out
