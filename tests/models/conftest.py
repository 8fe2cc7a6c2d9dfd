"""Tiny random Hugging Face models of every supported variant, saved with ``save_pretrained``.

``tiny_hf_model(variant, sharded=False)`` (fixture factory, session-scoped cache) returns a
:class:`TinyModel` with the folder and the PyTorch reference model (fp32, eager attention).
Colleagues can reuse it: ``def test_x(tiny_hf_model): m = tiny_hf_model("qwen2")``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# variant -> (transformers config class name, kwargs)
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.2,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 2 style, grouped-query attention
    "llama": ("LlamaConfig", dict(_COMMON)),
    # Llama with attention and MLP biases, multi-head (no GQA)
    "llama_bias": ("LlamaConfig", dict(_COMMON, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    # Llama 3.1: llama3 RoPE scaling (thresholds chosen so all three frequency bands occur at hd=16)
    "llama31": ("LlamaConfig", dict(_COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    # linear RoPE scaling
    "llama_linear_rope": ("LlamaConfig", dict(_COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # SmolLM2: tied embeddings, 3 query heads per KV head, theta 1e5
    "smollm2": ("LlamaConfig", dict(_COMMON, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                    tie_word_embeddings=True, rope_theta=100000.0)),
    # SmolLM2-135M's head layout (head_dim 64, 3 query heads per KV head) at a tiny width
    "smollm2_hd64": ("LlamaConfig", dict(_COMMON, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                                         tie_word_embeddings=True, rope_theta=100000.0)),
    # Mistral with a sliding window shorter than the test sequences
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=8, head_dim=16)),
    # Qwen2/2.5: q/k/v biases, explicit head_dim larger than hidden/heads
    "qwen2": ("Qwen2Config", dict(_COMMON, head_dim=24)),
}


@dataclasses.dataclass
class TinyModel:
    variant: str
    folder: Path
    torch_model: Any  # transformers *ForCausalLM, fp32, eval mode, eager attention
    hf_config: Any


def _build(variant: str, root: Path, sharded: bool) -> TinyModel:
    import torch
    import transformers

    cls_name, kwargs = VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, variant)))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    folder = root / (variant + ("_sharded" if sharded else ""))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB" if sharded else "1GB")
    return TinyModel(variant, folder, model, cfg)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TinyModel]:
    """Factory: ``tiny_hf_model(variant, sharded=False) -> TinyModel`` (built once per session)."""
    cache: dict[tuple[str, bool], TinyModel] = {}
    root = tmp_path_factory.mktemp("tiny_hf")

    def get(variant: str, sharded: bool = False) -> TinyModel:
        key = (variant, sharded)
        if key not in cache:
            cache[key] = _build(variant, root, sharded)
        return cache[key]

    return get
