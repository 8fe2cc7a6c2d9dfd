"""``GPTQConfig``: the quantization settings, with AutoGPTQ ``quantize_config`` field names.

``to_dict()`` writes the classic AutoGPTQ ``quantize_config.json`` keys (``shared/reference/gptq.md``
§1.7); ``from_dict()`` reads AutoGPTQ, optimum, transformers and GPTQModel dicts (including
GPTQModel's ``meta`` block and the ``w_bit``/``q_group_size`` synonyms) and refuses keys it does not
know, so that a setting is never silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings (hashable; usable as a static ``jit`` argument).

    Attributes:
      bits: code width, one of 2, 3, 4, 8.
      group_size: input channels per scale/zero group; ``-1`` = one group per output channel.
        A size that does not divide ``in_features`` makes the last group shorter.
      sym: symmetric grid (zero point fixed at ``2^(bits-1)``) if True, else asymmetric.
      desc_act: act-order -- quantize input channels by decreasing Hessian diagonal.
      static_groups: compute every group's scale/zero from the original weight before the GPTQ
        updates (keeps ``g_idx = k // group_size`` even with act-order).
      damp_percent: Tikhonov damping as a fraction of ``mean(diag(H))`` (reference default 0.01).
      damp_auto_increment: when the Cholesky fails, raise the damping by this much and retry
        (GPTQModel semantics); 0 disables retrying.
      damp_max: largest damping fraction tried before giving up (``CholeskyError``).
      block_size: columns per lazy-batch block (reference default 128).
      true_sequential: driver setting -- quantize the linear groups of a block one after the other,
        recomputing inputs in between (not used by the per-layer math).
      mse: > 0 enables the MSE clip search for scales (GPTQModel's ``mse`` switch); 0 = off.
      mse_norm: exponent ``p`` of the clip-search error ``sum |w - q|^p`` (reference 2.4).
      mse_grid: number of shrink steps of the search grid (reference 100).
      mse_maxshrink: largest shrink fraction tried (reference 0.8).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.01
    damp_max: float = 1.0
    block_size: int = 128
    true_sequential: bool = True
    mse: float = 0.0
    mse_norm: float = 2.4
    mse_grid: int = 100
    mse_maxshrink: float = 0.8

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.bits not in SUPPORTED_BITS or not is_int(self.bits):
            raise ValueError(f"GPTQConfig.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError("GPTQConfig.group_size must be -1 (per output channel) or a positive "
                             f"integer, got {self.group_size!r}")
        for name in ("sym", "desc_act", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTQConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        if not is_real(self.damp_percent) or not 0 <= self.damp_percent <= 1:
            raise ValueError("GPTQConfig.damp_percent must be a number in [0, 1] (fraction of the "
                             f"mean Hessian diagonal), got {self.damp_percent!r}")
        if not is_real(self.damp_auto_increment) or not 0 <= self.damp_auto_increment <= 1:
            raise ValueError("GPTQConfig.damp_auto_increment must be a number in [0, 1], got "
                             f"{self.damp_auto_increment!r}")
        if not is_real(self.damp_max) or not 0 < self.damp_max <= 10:
            raise ValueError(f"GPTQConfig.damp_max must be a number in (0, 10], got "
                             f"{self.damp_max!r}")
        if not is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"GPTQConfig.block_size must be a positive integer, got "
                             f"{self.block_size!r}")
        if not is_real(self.mse) or self.mse < 0:
            raise ValueError(f"GPTQConfig.mse must be a number >= 0 (0 = off), got {self.mse!r}")
        if not is_real(self.mse_norm) or self.mse_norm <= 0:
            raise ValueError(f"GPTQConfig.mse_norm must be a positive number, got "
                             f"{self.mse_norm!r}")
        if not is_int(self.mse_grid) or self.mse_grid <= 0:
            raise ValueError(f"GPTQConfig.mse_grid must be a positive integer, got "
                             f"{self.mse_grid!r}")
        if not is_real(self.mse_maxshrink) or not 0 < self.mse_maxshrink < 1:
            raise ValueError(f"GPTQConfig.mse_maxshrink must be a number in (0, 1), got "
                             f"{self.mse_maxshrink!r}")

    @property
    def maxq(self) -> int:
        """Largest integer code, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    @classmethod
    def recommended(cls, **overrides: Any) -> "GPTQConfig":
        """jgptq's default settings (what ``jgptq quantize`` uses): the reference algorithm plus
        act-order with static groups and the MSE clip search for the scales.

        The plain constructor keeps the reference's defaults (no act-order, no static groups, min/max
        scales) so that ``jgptq.gptq(w, h, GPTQConfig())`` reproduces it exactly. On SmolLM2-135M /
        Brown (128 x 2048 calibration, H100; ``benchmarks/RESULTS.md``) the reference defaults *lose*
        to round-to-nearest at 4-bit g128 (55.8 vs 53.5 perplexity), while act-order + static groups
        give 48.9 and adding the clip search 44.6 (fp32 model: 35.0). Static groups keep
        ``g_idx = k // group_size``, so the checkpoints need no act-order permutation at inference.
        ``overrides`` replace any field, e.g. ``GPTQConfig.recommended(bits=3)``.
        """
        kw: dict[str, Any] = {"desc_act": True, "static_groups": True, "mse": 2.4}
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **changes: Any) -> "GPTQConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """AutoGPTQ ``quantize_config`` keys (+ ``quant_method``) and our extra settings.

        The classic keys are ``bits, group_size, damp_percent, desc_act, static_groups, sym,
        true_sequential, quant_method``; extras (``block_size``, ``damp_auto_increment``,
        ``damp_max``, ``mse*``) are written only when they differ from the defaults.
        """
        d: dict[str, Any] = {
            "bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
            "desc_act": self.desc_act, "static_groups": self.static_groups, "sym": self.sym,
            "true_sequential": self.true_sequential, "quant_method": "gptq",
        }
        default = GPTQConfig()
        for name in _EXTRA_FIELDS:
            if getattr(self, name) != getattr(default, name):
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTQConfig":
        """Read an AutoGPTQ / optimum / transformers / GPTQModel quantization config dict.

        Unknown keys raise ``ValueError``; keys that only concern files or other tools
        (``checkpoint_format``, ``model_name_or_path``, ``dataset``, ...) are ignored. Missing
        keys take the AutoGPTQ ``BaseQuantizeConfig`` defaults for the keys that define the
        stored weights (``group_size=-1``, ``desc_act=True``) -- the meaning a reader of an old
        ``quantize_config.json`` would give them -- and our defaults otherwise.
        """
        d = dict(d)
        meta = d.pop("meta", None) or {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"quantization config 'meta' must be a dict, got {type(meta).__name__}")
        qm = d.get("quant_method")
        if qm is not None and str(qm).lower() not in ("gptq",):
            raise ValueError(f"quant_method must be 'gptq', got {qm!r}")
        if d.get("is_marlin_format") or str(d.get("checkpoint_format", "gptq")) == "marlin":
            raise ValueError("Marlin-format checkpoints are not GPTQ-packed; convert them to "
                             "'gptq' with GPTQModel first")
        for syn, key in (("w_bit", "bits"), ("q_group_size", "group_size")):
            if syn in d:
                val = d.pop(syn)
                if key in d and d[key] != val:
                    raise ValueError(f"conflicting {key}={d[key]!r} and {syn}={val!r}")
                d[key] = val
        kwargs: dict[str, Any] = {"group_size": -1, "desc_act": True}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, val in list(meta.items()):
            if key in fields:
                kwargs[key] = val
        for key, val in d.items():
            if key in fields:
                kwargs[key] = val
            elif key not in _IGNORED_KEYS:
                raise ValueError(
                    f"unknown quantization config key {key!r} (value {val!r}); jgptq refuses keys it "
                    f"does not understand. Known: {sorted(fields | _IGNORED_KEYS)}")
        if "damp_percent" in kwargs and kwargs["damp_percent"] is None:
            kwargs.pop("damp_percent")
        if isinstance(kwargs.get("mse"), bool):
            kwargs["mse"] = 1.0 if kwargs["mse"] else 0.0
        return cls(**kwargs)


_EXTRA_FIELDS = ("block_size", "damp_auto_increment", "damp_max", "mse", "mse_norm", "mse_grid",
                 "mse_maxshrink")

# keys written by AutoGPTQ / optimum / transformers / GPTQModel that do not change the math
_IGNORED_KEYS = frozenset({
    "quant_method", "checkpoint_format", "format", "model_name_or_path", "model_file_base_name",
    "dataset", "tokenizer", "modules_in_block_to_quantize", "block_name_to_quantize",
    "module_name_preceding_first_block", "batch_size", "pad_token_id", "max_input_length",
    "cache_block_outputs", "use_cuda_fp16", "use_exllama", "exllama_config", "disable_exllama",
    "backend", "model_seqlen", "lm_head", "dynamic", "pack_dtype", "method", "rotation",
    "act_group_aware", "quantizer", "uri", "is_marlin_format", "use_marlin",
})


def resolve_dynamic(name: str, config: Any, dynamic: Mapping[str, Mapping[str, Any]] | None) -> Any:
    """Effective config of module ``name`` under GPTQModel-style ``dynamic`` rules, or ``None`` (skip).

    Rules are tried in order and the first whose regex matches (``re.match``, i.e. anchored at the
    start of the full name such as ``model.layers.0.mlp.down_proj``) wins: ``"-:regex"`` leaves the
    module in float; ``"+:regex"`` (or a bare regex) replaces the given ``GPTQConfig`` fields, e.g.
    ``{"+:.*down_proj": {"bits": 8}, "-:model\\.layers\\.0\\..*": {}}``.
    """
    if not dynamic:
        return config
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
            continue
        regex = pattern[2:] if pattern.startswith("+:") else pattern
        if re.match(regex, name):
            return dataclasses.replace(config, **dict(overrides or {}))
    return config
