"""``LlamaConfig``: the static description of a Llama-family model, and its Hugging Face converter.

The converter (:func:`LlamaConfig.from_hf`) checks every key of a Hugging Face ``config.json``
against the keys it handles or knowingly ignores, and refuses unknown architectures, unknown keys
and unsupported values (activation, RoPE type, ...) with a message that names the key, the value
seen and what to do. It understands both the transformers v4 spelling (``rope_theta`` +
``rope_scaling``) and the v5 spelling (``rope_parameters``).

``LlamaConfig`` is a frozen, hashable dataclass so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

__all__ = ["LlamaConfig", "RopeScaling", "ConfigError", "SUPPORTED_ARCHITECTURES"]


class ConfigError(ValueError):
    """A Hugging Face config that this converter does not understand or does not support."""


# model_type -> the architectures entry transformers writes for it
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Keys of the model's own math, read by from_hf (per model type).
_HANDLED_COMMON = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
}
_HANDLED_BY_TYPE = {
    "llama": {"attention_bias", "mlp_bias", "pretraining_tp", "rope_interleaved"},
    "mistral": {"sliding_window"},
    "qwen2": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
}

# Keys that do not change the forward pass (training, bookkeeping, generation defaults, other
# loaders' metadata). Knowingly ignored.
_IGNORED = {
    # bookkeeping
    "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype", "use_bfloat16",
    "is_llama_config", "transformers.js_config", "_attn_implementation_autoset", "model_name",
    "tokenizer_class", "_commit_hash", "quantization_config",  # read by the GPTQ folder loader
    # training-only
    "initializer_range", "attention_dropout", "hidden_dropout", "dropout", "use_cache",
    "tf_legacy_loss", "torchscript", "pruned_heads", "chunk_size_feed_forward", "problem_type",
    "id2label", "label2id", "finetuning_task", "num_labels",
    # output switches
    "output_attentions", "output_hidden_states", "return_dict", "output_scores",
    "return_dict_in_generate",
    # encoder-decoder switches (always off for these decoders; checked below)
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "decoder_start_token_id", "sep_token_id",
    # generation defaults (the generate() arguments decide these)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "task_specific_params", "prefix",
}

_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is ``"default"``, ``"linear"`` or ``"llama3"``.

    ``factor`` divides the frequencies (``linear``) or the low frequencies (``llama3``);
    ``low_freq_factor``/``high_freq_factor``/``original_max_position_embeddings`` are the Llama 3.1
    wavelength thresholds (in tokens: ``original_max / low_freq_factor`` and
    ``original_max / high_freq_factor``).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static shape and math options of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

    Attributes:
      model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"`` (Hugging Face ``model_type``).
      vocab_size: V. hidden_size: D. intermediate_size: F (MLP width).
      num_layers: number of decoder blocks. num_heads: query heads H. num_kv_heads: key/value
        heads (H % num_kv_heads == 0; grouped-query attention when smaller than H).
      head_dim: per-head width (defaults to D // H in the HF config).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base. rope_scaling: frequency scaling (:class:`RopeScaling`).
      max_position_embeddings: the context the model was trained for (not enforced; kept for export).
      qkv_bias: q/k/v projections have biases (Qwen2, Llama ``attention_bias``).
      o_bias: o_proj has a bias (Llama ``attention_bias``). mlp_bias: gate/up/down have biases.
      tie_word_embeddings: lm_head reuses the embedding matrix (no ``lm_head`` in params).
      sliding_window: attend only to keys with ``query_pos - key_pos < sliding_window`` (Mistral);
        None for full attention.
      bos_token_id, pad_token_id: token ids or None. eos_token_ids: tuple of end-of-sequence ids.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs each KV head to serve the same number of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be a positive finite number, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive finite number, got {self.rope_theta!r}")
        if self.rope_scaling.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_scaling.rope_type!r} is not supported; "
                "supported: 'default', 'linear', 'llama3'")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ConfigError(f"eos_token_ids must be a tuple of ints, got {self.eos_token_ids!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_groups(self) -> int:
        """Query heads per KV head (H // num_kv_heads)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        """Output width of q_proj (H * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Output width of k_proj and v_proj (num_kv_heads * head_dim)."""
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """Convert a Hugging Face ``config.json`` dict, refusing anything not understood.

        Raises:
          ConfigError: unknown ``model_type``/``architectures``, an unknown key, or a value that
            would change the math in a way this implementation does not support.
        """
        if not isinstance(hf, Mapping):
            raise ConfigError(f"expected a config dict, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported model_type={model_type!r}: jgptq.models implements "
                f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama 2/3/3.1, SmolLM2, Mistral, Qwen2/2.5). "
                "Other architectures need their own model code.")
        archs = hf.get("architectures")
        want = SUPPORTED_ARCHITECTURES[model_type]
        if archs is not None and list(archs) != [want]:
            raise ConfigError(
                f"architectures={archs!r} for model_type={model_type!r}: only [{want!r}] is supported "
                "(a causal LM head over the decoder)")
        known = _HANDLED_COMMON | _HANDLED_BY_TYPE[model_type] | _IGNORED
        unknown = sorted(k for k in hf if k not in known)
        if unknown:
            raise ConfigError(
                f"config.json ({model_type}) has keys this converter does not know: {unknown}. "
                "They may change the model's math; refusing rather than building a subtly wrong "
                "model. If a key is harmless, add it to the ignored keys in jgptq/models/config.py.")
        for flag in ("is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder"):
            if hf.get(flag):
                raise ConfigError(f"config.json has {flag}={hf[flag]!r}; only decoder-only models are supported")

        def req(key: str) -> Any:
            if hf.get(key) is None:
                raise ConfigError(f"config.json ({model_type}) is missing the required key {key!r}")
            return hf[key]

        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv_heads = hf.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else int(kv_heads)
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                                  "and config.json has no head_dim")
            head_dim = hidden // heads
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported; the Llama family uses 'silu'")
        # pretraining_tp > 1 only splits the matmuls in transformers v4; the math is the same.
        if hf.get("rope_interleaved"):
            raise ConfigError("rope_interleaved=True is not supported (transformers uses the rotate-half "
                              "RoPE layout for Llama)")

        rope_theta, scaling = _parse_rope(hf, model_type)

        qkv_bias = o_bias = mlp_bias = False
        sliding_window = None
        if model_type == "llama":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        elif model_type == "mistral":
            sw = hf.get("sliding_window")
            sliding_window = None if sw is None else int(sw)
        elif model_type == "qwen2":
            qkv_bias = True
            layer_types = hf.get("layer_types")
            uses_window = bool(hf.get("use_sliding_window", False))
            if layer_types is not None:
                bad = [t for t in layer_types if t not in ("full_attention", "sliding_attention")]
                if bad:
                    raise ConfigError(f"qwen2 layer_types has unknown entries {sorted(set(bad))}")
                uses_window = uses_window and "sliding_attention" in layer_types
            if uses_window:
                raise ConfigError(
                    "qwen2 config has use_sliding_window=True (per-layer sliding window attention); "
                    "not supported. Released Qwen2/2.5 checkpoints set it to false.")

        eos = hf.get("eos_token_id")
        eos_ids: tuple[int, ...] = () if eos is None else (
            tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        bos = hf.get("bos_token_id")
        pad = hf.get("pad_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            pad_token_id=None if pad is None else int(pad),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read and convert a Hugging Face ``config.json`` file."""
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{os.fspath(path)} is not valid JSON: {e}") from e
        try:
            return cls.from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{os.fspath(path)}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers v4 spelling, read by v4, v5 and vLLM)."""
        d: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_to_hf(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (None if not self.eos_token_ids else self.eos_token_ids[0]
                             if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ConfigError("a llama config with qkv_bias != o_bias cannot be written as HF "
                                  "attention_bias (which sets both)")
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        return d


def _parse_rope(hf: Mapping[str, Any], model_type: str) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from either ``rope_parameters`` (v5) or ``rope_theta``/``rope_scaling`` (v4)."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if params is not None and legacy is not None and dict(params) != dict(legacy):
        raise ConfigError(f"config.json has both rope_parameters={params!r} and rope_scaling={legacy!r} "
                          "and they differ; keep one")
    spec = dict(params if params is not None else (legacy or {}))
    if "rope_theta" in spec:
        if theta is not None and float(theta) != float(spec["rope_theta"]):
            raise ConfigError(f"rope_theta={theta!r} disagrees with rope parameters {spec!r}")
        theta = spec["rope_theta"]
    theta = 10000.0 if theta is None else float(theta)
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(
            f"RoPE type {rope_type!r} ({model_type}) is not supported; supported: "
            f"{sorted(_ROPE_KEYS)}. (dynamic/yarn/longrope scaling are not implemented.)")
    unknown = sorted(set(spec) - _ROPE_KEYS[rope_type] - {"partial_rotary_factor"})
    if unknown:
        raise ConfigError(f"RoPE type {rope_type!r} has unknown parameters {unknown} in {spec!r}")
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={spec['partial_rotary_factor']!r} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, RopeScaling()
    if "factor" not in spec:
        raise ConfigError(f"RoPE type {rope_type!r} needs a 'factor'; got {spec!r}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(spec["factor"]))
    missing = sorted({"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(spec))
    if missing:
        raise ConfigError(f"llama3 RoPE scaling is missing {missing}; got {spec!r}")
    s = RopeScaling("llama3", factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
                    high_freq_factor=float(spec["high_freq_factor"]),
                    original_max_position_embeddings=int(spec["original_max_position_embeddings"]))
    if not s.high_freq_factor > s.low_freq_factor:
        raise ConfigError(f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {spec!r}")
    return theta, s


def _rope_to_hf(s: RopeScaling) -> dict[str, Any] | None:
    if s.rope_type == "default":
        return None
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
