"""The Hugging Face config converter: every key handled or knowingly ignored, unknowns refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import transformers

from conftest import VARIANTS
from jgptq.models.config import ConfigError, LlamaConfig, RopeScaling
from jgptq.models.llama import rope_inv_freq

# config.json files of released checkpoints (transformers v4 spelling), as published on the Hub.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256,
}
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
RELEASED = {"llama31_8b": LLAMA31_8B, "llama2_7b": LLAMA2_7B, "smollm2_135m": SMOLLM2_135M,
            "mistral_7b": MISTRAL_7B_V01, "qwen25_05b": QWEN25_05B}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_convert(name):
    hf = RELEASED[name]
    c = LlamaConfig.from_hf(hf)
    assert c.model_type == hf["model_type"]
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"])
    assert c.num_kv_heads == hf["num_key_value_heads"]
    assert c.head_dim == hf["hidden_size"] // hf["num_attention_heads"]
    assert c.tie_word_embeddings == hf["tie_word_embeddings"]
    assert c.qkv_bias == (hf["model_type"] == "qwen2")
    assert not c.o_bias and not c.mlp_bias
    eos = hf["eos_token_id"]
    assert c.eos_token_ids == (tuple(eos) if isinstance(eos, list) else (eos,))
    assert c.sliding_window == (4096 if name == "mistral_7b" else None)
    hash(c)  # static argument of jit
    # round trip through our HF form
    assert LlamaConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_rope_frequencies_match_transformers(name):
    hf = {k: v for k, v in RELEASED[name].items() if k != "transformers.js_config"}
    c = LlamaConfig.from_hf(hf)
    tcfg = transformers.AutoConfig.for_model(**hf)
    mod = __import__(getattr(transformers, hf["architectures"][0]).__module__, fromlist=["x"])
    rot_cls = [getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding")][0]
    rotary = rot_cls(config=tcfg)  # transformers' own RoPE initialisation for this config
    inv, scale = rotary.inv_freq, rotary.attention_scaling
    assert scale == 1.0
    np.testing.assert_allclose(rope_inv_freq(c), inv.numpy(), rtol=1e-6, atol=0)
    if name == "llama31_8b":  # all three llama3 bands present: some scaled, some smoothed, some kept
        base = LlamaConfig.from_hf({**hf, "rope_scaling": None})
        ratio = rope_inv_freq(c) / rope_inv_freq(base)
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 8).any()
        assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_v5_dicts_convert(variant):
    cls_name, kwargs = VARIANTS[variant]
    tcfg = getattr(transformers, cls_name)(**kwargs)
    full = tcfg.to_dict()  # v5 spelling: rope_parameters, plus every generic PretrainedConfig key
    c = LlamaConfig.from_hf(full)
    assert c == LlamaConfig.from_hf(json.loads(tcfg.to_json_string(use_diff=True)))
    assert c.num_heads == kwargs["num_attention_heads"]
    assert c.head_dim == kwargs.get("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if variant == "llama31":
        assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and c.rope_theta == 500000.0
    if variant == "llama_bias":
        assert c.qkv_bias and c.o_bias and c.mlp_bias
    # transformers reads our HF form back to the same model config
    back = transformers.AutoConfig.for_model(**c.to_hf())
    assert LlamaConfig.from_hf(back.to_dict()) == c


def _with(base: dict, **changes) -> dict:
    d = copy.deepcopy(base)
    d.update(changes)
    return d


@pytest.mark.parametrize("hf,pattern", [
    (_with(LLAMA2_7B, attn_logit_softcapping=50.0), r"attn_logit_softcapping"),
    (_with(LLAMA2_7B, model_type="gemma2", architectures=["Gemma2ForCausalLM"]), r"model_type='gemma2'"),
    (_with(LLAMA2_7B, architectures=["LlamaForSequenceClassification"]), r"LlamaForSequenceClassification"),
    (_with(LLAMA2_7B, hidden_act="gelu"), r"hidden_act='gelu'"),
    (_with(LLAMA2_7B, rope_scaling={"type": "dynamic", "factor": 2.0}), r"'dynamic'.*not supported"),
    (_with(LLAMA2_7B, rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"'yarn'.*not supported"),
    (_with(LLAMA31_8B, rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"llama3.*missing"),
    (_with(LLAMA2_7B, rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), r"unknown parameters \['beta'\]"),
    (_with(LLAMA2_7B, num_key_value_heads=5), r"num_heads=32 is not a multiple of num_kv_heads=5"),
    (_with(LLAMA2_7B, rope_interleaved=True), r"rope_interleaved"),
    (_with(QWEN25_05B, use_sliding_window=True), r"use_sliding_window"),
    (_with(MISTRAL_7B_V01, attention_bias=True), r"attention_bias"),  # not a Mistral key
    ({k: v for k, v in LLAMA2_7B.items() if k != "hidden_size"}, r"missing the required key 'hidden_size'"),
    (_with(LLAMA2_7B, rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
     r"disagrees"),
])
def test_refusals_name_the_problem(hf, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LlamaConfig.from_hf(hf)


def test_v4_and_v5_rope_spellings_agree():
    v4 = LLAMA31_8B
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=v4["rope_theta"])
    assert LlamaConfig.from_hf(v4) == LlamaConfig.from_hf(v5)
    linear = _with(LLAMA2_7B, rope_scaling={"type": "linear", "factor": 4.0})  # legacy "type" key
    assert LlamaConfig.from_hf(linear).rope_scaling == RopeScaling("linear", factor=4.0)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="head_dim=15 must be even"):
        LlamaConfig("llama", 10, 8, 8, 1, 2, 1, 15)
    with pytest.raises(ConfigError, match="vocab_size must be a positive int"):
        LlamaConfig("llama", 0, 8, 8, 1, 2, 1, 4)
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        LlamaConfig("gpt2", 10, 8, 8, 1, 2, 1, 4)


def test_from_json_file_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_with(LLAMA2_7B, mystery=1)))
    with pytest.raises(ConfigError, match=rf"{p}.*mystery"):
        LlamaConfig.from_json_file(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_json_file(p)
