"""Quantize a whole model: sequential, block-by-block GPTQ as the reference drives it.

``quantize(params, calib, config, model=...)`` walks the decoder blocks in order:

1. embed the calibration ids (block 0's inputs, ``hs [n, S, D]``, kept on the accelerator);
2. for each block (moved to the accelerator alone; the others stay on host), in stages cut at the
   linears' inputs: for each true-sequential group (``[k, v, q]``, ``[o]``, ``[up, gate]``,
   ``[down]``) accumulate the group's input Hessian ``Σ_t x_t x_tᵀ`` over all calibration samples
   (in batches, unmasked tokens only) and quantize the group's linears with that one Hessian
   (linears with the same settings are concatenated along ``out`` so they also share one damped
   Cholesky inverse — GPTQ treats output rows independently, so this is exact); the dequantized
   weights are written back so the next group sees quantized inputs. The results equal re-running
   the whole block before every group (what the reference does), but the attention of all samples
   is computed once per block: its output ``o`` and the residual ``h_mid = hs + o_proj(o)`` are
   kept between stages;
3. the block's outputs ``h_mid + down(...)`` are the next block's inputs.

Peak accelerator memory: up to three ``n·S·D`` activation buffers in the compute dtype (the block
inputs, the attention outputs and the residual; the residual stage reuses the inputs' buffer and
the output stage the residual's), plus one block's weights (fp32 master + compute copy), one
batch's intermediates ``B·S·max(D, F)`` and, on the XLA attention path, its scores ``B·H·S²``
(fp32; the cuDNN path used for bf16 on NVIDIA GPUs has none), the Hessians (``in²`` fp32 per
shared input) and the GPTQ workspace of one group (``in·out``). It does not grow with the number
of blocks; everything else (the other blocks, the packed results) stays on host. SmolLM2-135M at
128 x 2048, fp32, batch 8: 3 x 0.6 GB activations + ~2.4 GB attention scores/probs per batch +
< 50 MB for weights and Hessians.

Hessians of bf16/fp16 activations are exact fp32 sums (their products are exact in fp32); the
solver always runs on the float32 master weights.

Compilation: one jitted function per stage and one group step per (shape, structural setting):
bits, symmetry and act-order are run-time values of the solver, and the block's parameters are
arguments, so blocks of equal shapes and runs of different bit widths reuse the compiled code.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgptq.config import resolve_dynamic
from jgptq.report import ModuleReport, QuantizationReport

__all__ = ["Calibration", "quantize", "resolve_dynamic", "block_inputs", "module_name"]

MODES = ("gptq", "rtn")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration token ids and their padding mask.

    Attributes:
      ids: int32 ``[n, S]`` token ids.
      mask: bool ``[n, S]``; ``False`` marks padding, which never enters a Hessian.
    """

    ids: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_any(cls, calib: Any) -> "Calibration":
        """Accept ``ids``, ``(ids, mask)``, a dict with ``ids``/``input_ids`` (+ ``mask``/
        ``attention_mask``), or any object with such attributes."""
        if isinstance(calib, Calibration):
            return calib
        ids = mask = None
        if isinstance(calib, Mapping):
            ids = calib.get("ids", calib.get("input_ids"))
            mask = calib.get("mask", calib.get("attention_mask"))
        elif isinstance(calib, (tuple, list)) and len(calib) == 2:
            ids, mask = calib
        elif hasattr(calib, "ids") or hasattr(calib, "input_ids"):
            ids = getattr(calib, "ids", None)
            if ids is None:
                ids = getattr(calib, "input_ids")
            mask = getattr(calib, "mask", None)
            if mask is None:
                mask = getattr(calib, "attention_mask", None)
        else:
            ids = calib
        if ids is None:
            raise TypeError(f"calibration of type {type(calib).__name__} has no token ids; pass "
                            "ids [n, S], (ids, mask) or {'ids': ..., 'mask': ...}")
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"calibration ids must be an integer array [n, seqlen], got "
                             f"{ids.dtype} {ids.shape}")
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"calibration mask shape {mask.shape} does not match ids {ids.shape}")
        if not mask.any():
            raise ValueError("calibration mask is all False: no token would reach the Hessians")
        return cls(ids=ids.astype(np.int32), mask=mask)


def module_name(layer: int, module: str) -> str:
    """Hugging Face name of a linear in block ``layer``: ``model.layers.{layer}.{module}``."""
    return f"model.layers.{layer}.{module}"


def _validate_dynamic(config: Any, dynamic: Mapping[str, Mapping[str, Any]] | None) -> None:
    if not dynamic:
        return
    fields = {f.name for f in dataclasses.fields(config)}
    for pattern, overrides in dynamic.items():
        if not isinstance(pattern, str):
            raise TypeError(f"dynamic rule keys must be strings like '+:regex' or '-:regex', got {pattern!r}")
        regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"dynamic rule {pattern!r}: invalid regex ({e})") from None
        if pattern.startswith("-:"):
            continue
        unknown = set(overrides or {}) - fields
        if unknown:
            raise ValueError(f"dynamic rule {pattern!r} overrides unknown GPTQConfig fields "
                             f"{sorted(unknown)}; allowed: {sorted(fields)}")
        try:
            dataclasses.replace(config, **dict(overrides or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"dynamic rule {pattern!r} gives an invalid config: {e}") from None


# --------------------------------------------------------------------------------------------
# jitted phases


def _positions(mask: jax.Array) -> jax.Array:
    """Token positions ``[..., S]`` that skip left padding (``arange`` when there is none)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


@partial(jax.jit, static_argnames=("model_config", "dtype"))
def _embed_batches(params: Any, ids: jax.Array, model_config: Any, dtype: Any) -> jax.Array:
    """``ids [nb, B, S]`` -> hidden states ``[nb, B, S, D]`` in the compute ``dtype``."""
    from jgptq.models import llama

    return jax.lax.map(lambda i: llama.embed(params, i).astype(dtype), ids)


@partial(jax.jit, static_argnames=("model_config",))
def _stage_attn_in(layer: Any, hs: jax.Array, mask: jax.Array, model_config: Any) -> Any:
    """Hessian of q/k/v's input ``input_layernorm(h)`` over all batches (``hs [nb, B, S, D]``).

    Every ``HessianState`` here holds the reference's ``H = 2 Σ_t x_t x_tᵀ / N`` (``N`` sequences,
    padding rows included; the scale does not matter) and a finiteness flag; masked tokens add
    nothing (``jgptq.hessian_update``).
    """
    from jgptq.hessian import hessian_init, hessian_update
    from jgptq.models import llama

    def body(acc, xs):
        h, m = xs
        return hessian_update(acc, llama.attention_input(layer, h, model_config), m, check=False), None

    acc, _ = jax.lax.scan(body, hessian_init(hs.shape[-1]), (hs, mask))
    return acc


@partial(jax.jit, static_argnames=("model_config", "impl", "with_h"))
def _stage_attention(layer: Any, hs: jax.Array, mask: jax.Array, model_config: Any, impl: str,
                     with_h: bool) -> tuple[jax.Array, Any]:
    """Attention outputs ``o [nb, B, S, H*hd]`` (o_proj's input) and, with ``with_h``, their Hessian."""
    from jgptq.hessian import hessian_init, hessian_update
    from jgptq.models import llama

    def body(acc, xs):
        h, m = xs
        o = llama.attention_output(layer, h, _positions(m), m, model_config, impl).astype(h.dtype)
        return (hessian_update(acc, o, m, check=False) if with_h else acc), o

    width = model_config.num_heads * model_config.head_dim
    init = hessian_init(width) if with_h else None
    acc, o = jax.lax.scan(body, init, (hs, mask))
    return o, acc


def _stage_residual_impl(layer: Any, hs: jax.Array, o: jax.Array, mask: jax.Array, model_config: Any,
                         with_h: bool) -> tuple[jax.Array, Any]:
    """Residual after attention ``h_mid = h + o_proj(o)`` and, with ``with_h``, the Hessian of
    gate/up's input ``post_attention_layernorm(h_mid)``."""
    from jgptq.hessian import hessian_init, hessian_update
    from jgptq.models import llama

    def body(acc, xs):
        h, oo, m = xs
        hm = llama.attention_residual(layer, h, oo).astype(h.dtype)
        if with_h:
            acc = hessian_update(acc, llama.mlp_input(layer, hm, model_config), m, check=False)
        return acc, hm

    init = hessian_init(hs.shape[-1]) if with_h else None
    acc, hm = jax.lax.scan(body, init, (hs, o, mask))
    return hm, acc


_stage_residual = jax.jit(_stage_residual_impl, static_argnames=("model_config", "with_h"))
# true-sequential runs need the block input only once: let XLA reuse its buffer for h_mid
_stage_residual_donating = jax.jit(_stage_residual_impl, static_argnames=("model_config", "with_h"),
                                   donate_argnames=("hs",))


@partial(jax.jit, static_argnames=("model_config",))
def _stage_down_in(layer: Any, h_mid: jax.Array, mask: jax.Array, model_config: Any) -> Any:
    """Hessian of down_proj's input ``silu(gate(x2)) * up(x2)`` over all batches."""
    from jgptq.hessian import hessian_init, hessian_update
    from jgptq.models import llama

    def body(acc, xs):
        hm, m = xs
        return hessian_update(acc, llama.mlp_hidden(layer, hm, model_config), m, check=False), None

    init = hessian_init(model_config.intermediate_size)
    acc, _ = jax.lax.scan(body, init, (h_mid, mask))
    return acc


@partial(jax.jit, static_argnames=("model_config",), donate_argnames=("h_mid",))
def _stage_output(layer: Any, h_mid: jax.Array, model_config: Any) -> jax.Array:
    """The block's outputs (the next block's inputs) from ``h_mid``, overwriting its buffer."""
    from jgptq.models import llama

    return jax.lax.map(lambda hm: llama.block_output(layer, hm, model_config).astype(hm.dtype), h_mid)


def _column_losses(delta: jax.Array, h: jax.Array, scale: jax.Array) -> jax.Array:
    """Per output column ``scale · Σ_i,j delta[i,o] h[i,j] delta[j,o]``: ``[in, out]``, ``[in, in]`` -> ``[out]``."""
    hd = jnp.dot(h, delta, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(delta * hd, axis=0) * scale


def _dequant(codes: jax.Array, scales: jax.Array, zeros: jax.Array, g_idx: jax.Array) -> jax.Array:
    s = jnp.take(scales.astype(jnp.float32), g_idx, axis=0)
    z = jnp.take(zeros.astype(jnp.float32), g_idx, axis=0)
    return s * (codes.astype(jnp.float32) - z)


@partial(jax.jit, static_argnames=("config", "impl", "unroll"))
def _group_step(w: jax.Array, h: jax.Array, runtime: tuple, scale: jax.Array, config: Any, impl: str,
                unroll: int) -> dict[str, Any]:
    """GPTQ of ``w [in, out]`` with ``H [in, in]``, RTN for comparison, the dequantized GPTQ weight
    and per-column losses of both, in one compiled step per (shape, structural config).

    ``runtime`` = ``(maxq, sym, desc_act)`` arrays, so bit width, symmetry and act-order share the
    compilation. ``scale`` turns ``tr(ΔWᵀ H ΔW)`` into the report's per-token loss: ``H = 2 Σ_t x_t
    x_tᵀ / nsamples``, so ``tr(ΔWᵀ Σ ΔW) / tokens = tr(ΔWᵀ H ΔW) · nsamples / (2 · tokens)``. Nothing
    here syncs with the host: ``ok`` (damping found a factor) and ``h_used`` (some calibration token
    reached ``H``) are checked by the caller once per block.
    """
    from jgptq.solver import rtn_core, solve_core

    codes, scales, zeros, g_idx, _, damp, ok = solve_core(w, h, config, impl=impl, unroll=unroll,
                                                          runtime=runtime)
    rq = rtn_core(w, config, runtime=runtime)
    q = _dequant(codes, scales, zeros, g_idx)
    return {"params": {"codes": codes, "scales": scales, "zeros": zeros, "g_idx": g_idx},
            "dequant": q, "loss": _column_losses(w - q, h, scale),
            "rtn_loss": _column_losses(w - _dequant(*rq), h, scale), "damp": damp.astype(jnp.float32),
            "ok": ok, "h_used": jnp.any(jnp.diagonal(h) != 0)}


@partial(jax.jit, static_argnames=("config",))
def _quantize_rtn(w: jax.Array, config: Any) -> dict[str, Any]:
    """Round-to-nearest of ``w [in, out]`` (no calibration)."""
    from jgptq.solver import rtn

    qw = rtn(w, config)
    return {"params": qw.to_params(), "dequant": qw.dequantize().astype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# pytree helpers (module paths like "self_attn.q_proj")


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


def _copy_dicts(tree: Any) -> Any:
    """Copy the dict/list structure of a pytree, sharing the array leaves."""
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_dicts(v) for v in tree]
    return tree


def _to_f32(a: Any) -> jax.Array:
    a = jnp.asarray(a)
    return a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a


def _cast_float(a: jax.Array, dtype: Any) -> jax.Array:
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a


def _check_finite(tree: Any, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise ValueError(f"{what}{jax.tree_util.keystr(path)} has {bad} NaN/Inf values; "
                             "quantization needs finite float weights")


# --------------------------------------------------------------------------------------------
# the driver


def block_inputs(params: Mapping[str, Any], ids: Any, model: Any, *, batch_size: int = 8) -> jax.Array:
    """Block 0's inputs (the embeddings) as the driver captures them: fp32 ``[n, S, D]``."""
    cal = Calibration.from_any(ids)
    hs, _, n = _embed(params, cal, model, batch_size, jnp.float32)
    return hs.reshape(-1, *hs.shape[2:])[:n]


def _embed(params: Mapping[str, Any], cal: Calibration, model: Any, batch_size: int, dtype: Any
           ) -> tuple[jax.Array, jax.Array, int]:
    n, s = cal.ids.shape
    b = max(1, min(batch_size, n))
    nb = math.ceil(n / b)
    ids = np.zeros((nb * b, s), np.int32)
    mask = np.zeros((nb * b, s), bool)
    ids[:n], mask[:n] = cal.ids, cal.mask
    emb = {k: params[k] for k in ("embed_tokens",)}
    hs = _embed_batches(emb, jnp.asarray(ids.reshape(nb, b, s)), model, dtype)
    return hs, jnp.asarray(mask.reshape(nb, b, s)), n


def quantize(params: Mapping[str, Any], calib: Any, config: Any, model: Any, *,
             mode: str = "gptq", dynamic: Mapping[str, Mapping[str, Any]] | None = None,
             batch_size: int = 8, compute_dtype: Any = None, attention: str = "auto",
             progress: bool = True,
             on_block_input: Callable[[int, jax.Array], None] | None = None,
             ) -> tuple[dict[str, Any], QuantizationReport]:
    """Quantize every decoder-block linear of a Llama-family model, block by block.

    Args:
      params: the model pytree of DESIGN.md (float ``LIN``s); arrays may live on host (numpy).
      calib: calibration ids ``[n, S]`` (+ padding mask), see :class:`Calibration`. Ignored (may be
        ``None``) for ``mode="rtn"``.
      config: base ``jgptq.GPTQConfig``; ``config.true_sequential`` picks per-group Hessian passes
        (reference) or one pass on the float block for all seven linears.
      model: the model's ``LlamaConfig`` (hashable; passed to ``jgptq.models.llama.decoder_block``).
      mode: ``"gptq"`` or ``"rtn"`` (round-to-nearest, no calibration).
      dynamic: GPTQModel-style per-module overrides (:func:`resolve_dynamic`); defaults to
        ``config.dynamic`` when the config has such a field.
      batch_size: calibration samples per forward batch (bounds activation memory).
      compute_dtype: dtype of the calibration forwards and stored activations (default float32;
        ``"bfloat16"`` halves activation memory and traffic, as the reference's fp16 forwards do).
        Hessians are always accumulated in float32 and GPTQ always runs on the float32 weights.
      attention: how the calibration forwards compute attention: ``"xla"`` (the model's einsum path,
        any dtype and padding), ``"cudnn"`` (fused kernel; NVIDIA GPU, bf16/fp16, right padding
        only) or ``"auto"`` (cuDNN where it applies, else XLA).
      progress: show a tqdm bar over blocks.
      on_block_input: called as ``fn(i, hs)`` with block ``i``'s inputs ``hs [n, S, D]`` (compute
        dtype, on device) before block ``i`` is processed; for tests and diagnostics.

    Returns:
      ``(qparams, report)``: ``qparams`` is the same pytree with each quantized linear replaced by
      its packed dict (``qweight``, ``scales``, ``zeros``, ``g_idx``, ``bias``?) as numpy arrays;
      embeddings, norms and ``lm_head`` are the input arrays, untouched. ``report`` is a
      :class:`~jgptq.report.QuantizationReport` (losses are defined in ``jgptq.report``).
    """
    from jgptq.models import llama

    t_start = time.perf_counter()
    cdt = jnp.dtype(compute_dtype or jnp.float32)
    if not jnp.issubdtype(cdt, jnp.floating):
        raise ValueError(f"compute_dtype must be a float dtype, got {compute_dtype!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dynamic is None:
        dynamic = getattr(config, "dynamic", None)
    _validate_dynamic(config, dynamic)
    if "layers" not in params or not params["layers"]:
        raise ValueError("params has no 'layers' list of decoder blocks; expected the pytree of "
                         "DESIGN.md (load one with jgptq.models.load)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_finite(params["layers"], "params['layers']")

    groups: list[list[str]] = [list(g) for g in llama.LINEAR_GROUPS]
    true_sequential = bool(getattr(config, "true_sequential", True))
    timings = {"embed": 0.0, "hessian": 0.0, "quantize": 0.0, "forward": 0.0, "pack": 0.0}
    modules: list[ModuleReport] = []

    cal = None
    hs = mask = None
    n = 0
    attn_impl = "xla"
    if mode == "gptq":
        if calib is None:
            raise ValueError("mode='gptq' needs calibration ids; pass calib=ids [n, seqlen] or use mode='rtn'")
        cal = Calibration.from_any(calib)
        vocab = int(np.shape(params["embed_tokens"]["embedding"])[0])
        if cal.ids.min() < 0 or cal.ids.max() >= vocab:
            raise ValueError(f"calibration ids must lie in [0, {vocab}), got range "
                             f"[{cal.ids.min()}, {cal.ids.max()}]")
        t0 = time.perf_counter()
        hs, mask, n = _embed(params, cal, model, batch_size, cdt)
        hs.block_until_ready()
        timings["embed"] = time.perf_counter() - t0
        tokens = (jnp.sum(mask, dtype=jnp.float32), int(cal.mask.sum()))
        attn_impl = _attention_impl(attention, cal.mask, cdt, model)

    out_layers: list[dict[str, Any]] = []
    layers = params["layers"]
    bar = _progress(len(layers), progress, "quantize blocks" if mode == "gptq" else "rtn blocks")
    for i, layer_host in enumerate(layers):
        if on_block_input is not None and hs is not None:
            on_block_input(i, hs.reshape(-1, *hs.shape[2:])[:n])
        # this block only: fp32 master weights (what GPTQ quantizes) + a compute-dtype copy for the passes
        master = jax.tree_util.tree_map(_to_f32, _copy_dicts(layer_host))
        layer = master if cdt == jnp.float32 else jax.tree_util.tree_map(lambda a: _cast_float(a, cdt), master)
        packed: dict[str, Any] = {}

        if mode == "rtn":
            t0 = time.perf_counter()
            for module in (m for g in groups for m in g):
                cfg = resolve_dynamic(module_name(i, module), config, dynamic)
                lin = _get(layer, module)
                rep = ModuleReport(name=module_name(i, module), layer=i,
                                   shape=tuple(int(d) for d in lin["kernel"].shape), method="skip")
                if cfg is not None:
                    tq = time.perf_counter()
                    res = _quantize_rtn(_get(master, module)["kernel"], cfg)
                    packed[module] = res["params"]
                    jax.block_until_ready(packed[module])
                    rep = dataclasses.replace(rep, method="rtn", **_settings(cfg),
                                              time_s=time.perf_counter() - tq)
                modules.append(rep)
            timings["quantize"] += time.perf_counter() - t0
        else:
            hs = _gptq_block(i, layer, master, hs, mask, groups, config, dynamic, true_sequential,
                             model, attn_impl, tokens, modules, packed, timings, cdt)

        t0 = time.perf_counter()
        out_layer = _copy_dicts(layer_host)
        for m, pk in jax.device_get(packed).items():
            _set(out_layer, m, _with_bias(pk, _get(layer_host, m)))  # bias: the caller's array
        out_layers.append(out_layer)
        timings["pack"] += time.perf_counter() - t0
        del layer, master
        bar.update(1)
    bar.close()

    qparams = dict(params)
    qparams["layers"] = out_layers
    timings["total"] = time.perf_counter() - t_start
    report = QuantizationReport(
        modules=modules,
        config={**_config_dict(config), "mode": mode, "dynamic": dict(dynamic) if dynamic else None,
                "compute_dtype": cdt.name},
        calibration=({"nsamples": int(cal.ids.shape[0]), "seqlen": int(cal.ids.shape[1]),
                      "tokens": int(cal.mask.sum()), "batch_size": int(min(batch_size, cal.ids.shape[0])),
                      "attention": attn_impl}
                     if cal is not None else {}),
        timings=timings,
        environment=_environment(),
    )
    return qparams, report


def _attention_impl(requested: str, mask: np.ndarray, cdt: Any, model: Any) -> str:
    """Resolve ``attention="auto"``; refuse ``"cudnn"`` where the fused kernel does not apply."""
    from jgptq.models import llama

    choices = ("auto",) + llama.ATTENTION_IMPLS
    if requested not in choices:
        raise ValueError(f"attention must be one of {choices}, got {requested!r}")
    right_padded = bool(np.all(mask[:, 1:] <= mask[:, :-1]))  # each row: valid tokens, then padding
    reasons = []
    if jax.default_backend() != "gpu":
        reasons.append(f"the backend is {jax.default_backend()!r}, not an NVIDIA GPU")
    if cdt not in (jnp.bfloat16, jnp.float16):
        reasons.append(f"compute_dtype is {cdt.name} (cuDNN attention takes bfloat16/float16)")
    if not right_padded:
        reasons.append("some calibration rows are left-padded (cuDNN's causal mask cannot skip them)")
    if model.head_dim % 8 or model.head_dim > 128:
        reasons.append(f"head_dim {model.head_dim} is not a multiple of 8 up to 128")
    if requested == "cudnn" and reasons:
        raise ValueError("attention='cudnn' does not apply: " + "; ".join(reasons))
    if requested == "auto":
        return "xla" if reasons else "cudnn"
    return requested


def _gptq_block(i: int, layer: dict[str, Any], master: dict[str, Any], hs: jax.Array, mask: jax.Array,
                groups: Sequence[Sequence[str]], config: Any, dynamic: Any, true_sequential: bool,
                model: Any, attn_impl: str, tokens: tuple[jax.Array, int], modules: list[ModuleReport],
                packed: dict[str, Any], timings: dict[str, float], cdt: Any) -> jax.Array:
    """Quantize block ``i`` (GPTQ) and return the next block's inputs.

    The block runs in stages cut at the linears' inputs (``jgptq.models.llama``'s staged functions),
    so the attention of all calibration samples is computed once per block with the quantized
    q/k/v, not once per group as re-running the whole block would: q/k/v's input (a norm of
    ``hs``); attention outputs ``o`` (o_proj's input, kept); ``h_mid = hs + o_proj(o)`` (kept,
    overwriting ``hs``; gate/up's input is its norm); down's input (from ``h_mid``); the output
    ``h_mid + down(...)``. With ``true_sequential`` each group is quantized right after its
    input's Hessian, so later groups see quantized earlier ones (the reference's order); without
    it all four Hessians come from the float block and the outputs are recomputed afterwards.
    """
    plans = [[(m, resolve_dynamic(module_name(i, m), config, dynamic)) for m in g] for g in groups]
    for plan in plans:
        for m, c in plan:
            if c is None:
                modules.append(ModuleReport(name=module_name(i, m), layer=i, method="skip",
                                            shape=tuple(int(d) for d in _get(layer, m)["kernel"].shape)))
    active = [[(m, c) for m, c in plan if c is not None] for plan in plans]
    deferred: list[tuple[int, Any]] = []

    def hessian(fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        timings["hessian"] += time.perf_counter() - t0
        return out

    def quantize_now(g: int, state: Any) -> None:
        t0 = time.perf_counter()
        reports, new = _quantize_shared(i, master, active[g], state, tokens)
        timings["quantize"] += time.perf_counter() - t0
        modules.extend(reports)
        for m, (pk, deq) in new.items():  # later stages see the quantized weights
            packed[m] = pk
            _set(layer, f"{m}.kernel", deq.astype(cdt))

    def quantize_group(g: int, state: Any) -> None:
        if not active[g]:
            return
        if true_sequential:
            quantize_now(g, state)
        else:
            deferred.append((g, state))

    st = hessian(lambda: _stage_attn_in(layer, hs, mask, model)) if active[0] else None
    quantize_group(0, st)
    o, st = hessian(lambda: _stage_attention(layer, hs, mask, model, attn_impl, bool(active[1])))
    quantize_group(1, st)
    residual = _stage_residual_donating if true_sequential else _stage_residual
    h_mid, st = hessian(lambda: residual(layer, hs, o, mask, model, bool(active[2])))
    del o
    quantize_group(2, st)
    st = hessian(lambda: _stage_down_in(layer, h_mid, mask, model)) if active[3] else None
    quantize_group(3, st)
    if deferred:  # not true-sequential: quantize everything from the float block's Hessians
        for g, state in deferred:
            quantize_now(g, state)
        o, _ = hessian(lambda: _stage_attention(layer, hs, mask, model, attn_impl, False))
        h_mid, _ = hessian(lambda: _stage_residual_donating(layer, hs, o, mask, model, False))
        del o
    t0 = time.perf_counter()
    out = jax.block_until_ready(_stage_output(layer, h_mid, model))
    timings["forward"] += time.perf_counter() - t0
    return out


def _quantize_shared(i: int, layer: dict[str, Any], active: Sequence[tuple[str, Any]], state: Any,
                     tokens: tuple[jax.Array, int],
                     ) -> tuple[list[ModuleReport], dict[str, tuple[Any, jax.Array]]]:
    """Quantize linears that read the same input (Hessian ``state``), concatenated along ``out``
    per distinct setting, so they share one damped Cholesky factor and one solve."""
    from jgptq import pack
    from jgptq.linalg import CholeskyError
    from jgptq.models import llama
    from jgptq.solver import _check_inputs, default_impl, default_unroll, runtime_values, structural

    tokens_dev, tokens_host = tokens
    by_key: dict[Any, list[str]] = {}
    for m, c in active:
        by_key.setdefault(c, []).append(m)
    inp = llama.LINEAR_INPUT[active[0][0]]
    reports: list[ModuleReport] = []
    new: dict[str, tuple[Any, jax.Array]] = {}
    for cfg, mods in by_key.items():
        lins = [_get(layer, m) for m in mods]
        widths = [int(lin["kernel"].shape[1]) for lin in lins]
        w = jnp.concatenate([lin["kernel"].astype(jnp.float32) for lin in lins], axis=1)
        label = f"block {i} {'+'.join(mods)}"
        _check_inputs(w, state.h, cfg, label, values=False)
        t0 = time.perf_counter()
        scale = state.nsamples.astype(jnp.float32) / (2.0 * tokens_dev)
        res = _group_step(w, state.h, runtime_values(cfg), scale, config=structural(cfg),
                          impl=default_impl(cfg), unroll=default_unroll())
        finite, ok, used, loss, rtn_loss, damp = jax.device_get(
            (state.finite, res["ok"], res["h_used"], res["loss"], res["rtn_loss"], res["damp"]))
        dt = time.perf_counter() - t0
        if not finite:
            raise FloatingPointError(
                f"block {i}: NaN/Inf in the calibration activations feeding {mods} ({inp!r}); check "
                "the weights and the model dtype (fp16 overflow)")
        if not used:
            raise ValueError(f"{label}: the Hessian of {inp!r} is all zero on the diagonal: no "
                             "calibration token reached these modules (GPTQ would silently equal RTN)")
        if not ok:
            raise CholeskyError(
                f"block {i}, {mods}: the damped Hessian of {inp!r} ({w.shape[0]}x{w.shape[0]}, "
                f"{tokens_host} tokens) is not positive definite for any damping up to "
                f"{cfg.damp_max:g}; use more or longer calibration samples, a larger damp_percent, "
                f"or skip these modules with a dynamic rule")
        if not np.isfinite(loss).all():
            raise FloatingPointError(f"GPTQ produced a non-finite loss in block {i} for {mods}; "
                                     "check the calibration data and weights for NaN/Inf")
        p = res["params"]
        start = 0
        for m, width in zip(mods, widths):
            sl = slice(start, start + width)
            start += width
            pk = {"qweight": pack.pack_rows(p["codes"][:, sl], cfg.bits), "scales": p["scales"][:, sl],
                  "zeros": p["zeros"][:, sl], "g_idx": p["g_idx"]}
            new[m] = (pk, res["dequant"][:, sl])
            reports.append(ModuleReport(
                name=module_name(i, m), layer=i, shape=(int(w.shape[0]), width), method="gptq",
                **_settings(cfg), loss=float(loss[sl].sum()), rtn_loss=float(rtn_loss[sl].sum()),
                damp=float(damp), time_s=dt * width / w.shape[1], hessian=inp, tokens=tokens_host))
    return reports, new


def _with_bias(packed: Mapping[str, Any], lin: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(packed)
    if "bias" in lin:
        out["bias"] = lin["bias"]
    return out


def _settings(cfg: Any) -> dict[str, Any]:
    return {"bits": int(cfg.bits), "group_size": int(cfg.group_size), "sym": bool(cfg.sym),
            "desc_act": bool(cfg.desc_act)}


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return {k: v for k, v in dataclasses.asdict(config).items() if _jsonable(v)}
    return {"repr": repr(config)}


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, list, tuple, dict))


def _environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count()}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)
