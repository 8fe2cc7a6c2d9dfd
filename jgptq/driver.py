"""Quantize a whole model: sequential, block-by-block GPTQ as the reference drives it.

``quantize(params, calib, config, model=...)`` walks the decoder blocks in order:

1. embed the calibration ids (block 0's inputs, ``hs [n, S, D]``, kept on the accelerator);
2. for each block (moved to the accelerator alone; the others stay on host):
   for each true-sequential group (``[k, v, q]``, ``[o]``, ``[up, gate]``, ``[down]``) run the
   block over all calibration samples in batches, accumulating the group's input Hessian
   ``Σ_t x_t x_tᵀ`` over unmasked tokens; quantize the group's linears with that one Hessian
   (linears with the same settings are concatenated along ``out`` so they also share one damped
   Cholesky inverse — GPTQ treats output rows independently, so this is exact); write the
   dequantized weights back so the next group sees quantized inputs;
3. run the block once more with all its weights quantized: its outputs are the next block's inputs.

Peak accelerator memory: ``n·S·D`` calibration activations in the compute dtype (one copy, the
block forward donates and overwrites it), plus one block's weights (fp32 master + compute copy), one
batch's intermediates ``B·S·max(D, F)`` and attention scores ``B·H·S²`` (fp32), the Hessians
(``in²`` fp32 per shared input) and the GPTQ workspace of one group (``in·out``). It does not grow
with the number of blocks; everything else (the other blocks, the packed results) stays on host.
SmolLM2-135M at 128 x 2048, fp32, batch 8: 0.6 GB activations + ~2.4 GB attention scores/probs per
batch + < 50 MB for weights and Hessians.

Compilation: one jitted function per phase (Hessian pass per input name, block forward, group
quantize per shape/setting), with the block's parameters as arguments, so blocks of equal shapes
reuse the compiled code.
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


@partial(jax.jit, static_argnames=("model_config", "names"))
def _hessian_pass(layer: Any, hs: jax.Array, mask: jax.Array, model_config: Any,
                  names: tuple[str, ...]) -> dict[str, Any]:
    """Run one block over all batches; return ``{name: HessianState}`` over unmasked tokens.

    Shapes: ``hs [nb, B, S, D]`` fp32, ``mask [nb, B, S]`` bool; each state holds the reference's
    ``H = 2 Σ_t x_t x_tᵀ / N`` (``N`` sequences, padding rows included; the scale does not matter)
    and a finiteness flag. Masked tokens contribute nothing (``jgptq.hessian_update``).
    """
    from jgptq.hessian import hessian_init, hessian_update
    from jgptq.models import llama

    def body(acc, xs):
        h, m = xs
        _, captured = llama.decoder_block(layer, h, _positions(m), m, model_config, capture=True)
        return {name: hessian_update(acc[name], captured[name], m, check=False) for name in names}, None

    init = {name: hessian_init(_captured_dim(layer, name)) for name in names}
    acc, _ = jax.lax.scan(body, init, (hs, mask))
    return acc


@partial(jax.jit, static_argnames=("model_config",), donate_argnames=("hs",))
def _forward_pass(layer: Any, hs: jax.Array, mask: jax.Array, model_config: Any) -> jax.Array:
    """Run one block over all batches: ``hs [nb, B, S, D]`` -> the next block's inputs (same shape)."""
    from jgptq.models import llama

    def one(xs):
        h, m = xs
        return llama.decoder_block(layer, h, _positions(m), m, model_config).astype(h.dtype)

    return jax.lax.map(one, (hs, mask))


def _captured_dim(layer: Any, name: str) -> int:
    from jgptq.models import llama

    for module, inp in llama.LINEAR_INPUT.items():
        if inp == name:
            return int(_get(layer, module)["kernel"].shape[0])
    raise KeyError(f"no linear reads captured input {name!r}")


def _column_losses(delta: jax.Array, h: jax.Array, scale: jax.Array) -> jax.Array:
    """Per output column ``scale · Σ_i,j delta[i,o] h[i,j] delta[j,o]``: ``[in, out]``, ``[in, in]`` -> ``[out]``."""
    hd = jnp.dot(h, delta, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(delta * hd, axis=0) * scale


def _dequant(codes: jax.Array, scales: jax.Array, zeros: jax.Array, g_idx: jax.Array) -> jax.Array:
    s = jnp.take(scales.astype(jnp.float32), g_idx, axis=0)
    z = jnp.take(zeros.astype(jnp.float32), g_idx, axis=0)
    return s * (codes.astype(jnp.float32) - z)


@jax.jit
def _group_outputs(w: jax.Array, h: jax.Array, gq: tuple, rq: tuple, scale: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dequantized GPTQ weight and per-column losses of GPTQ and RTN (compiled per shape only).

    ``gq``/``rq`` are ``(codes, scales, zeros, g_idx)`` of the GPTQ / RTN results for ``w [in, out]``.
    """
    q = _dequant(*gq)
    return q, _column_losses(w - q, h, scale), _column_losses(w - _dequant(*rq), h, scale)


def _quantize_gptq(w: jax.Array, h: jax.Array, nsamples: jax.Array, tokens: jax.Array, config: Any,
                   name: str) -> dict[str, Any]:
    """GPTQ (and RTN for comparison) of ``w [in, out]`` with ``H [in, in]``; losses per column.

    ``H = 2 Σ_t x_t x_tᵀ / nsamples`` (``jgptq.hessian``), so the report's loss
    ``tr(ΔWᵀ Σ ΔW) / tokens`` is ``tr(ΔWᵀ H ΔW) · nsamples / (2 · tokens)``.
    Called eagerly: the core's jitted solver is compiled once per shape (bits, sym and act-order
    are runtime values there) and raises ``CholeskyError`` naming ``name`` when damping cannot
    make ``H`` positive definite.
    """
    from jgptq.solver import gptq_columns, rtn

    qw, _ = gptq_columns(w, h, config, name=name)
    qr = rtn(w, config, name=name)
    scale = nsamples.astype(jnp.float32) / (2.0 * tokens)
    q, loss, rtn_loss = _group_outputs(w, h, (qw.codes, qw.scales, qw.zeros, qw.g_idx),
                                       (qr.codes, qr.scales, qr.zeros, qr.g_idx), scale)
    return {"params": qw.to_params(), "dequant": q, "loss": loss, "rtn_loss": rtn_loss,
            "damp": jnp.asarray(qw.damp, jnp.float32)}


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
             batch_size: int = 8, compute_dtype: Any = None, progress: bool = True,
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
            passes = groups if true_sequential else [[m for g in groups for m in g]]
            for group in passes:
                plan = [(m, resolve_dynamic(module_name(i, m), config, dynamic)) for m in group]
                active = [(m, c) for m, c in plan if c is not None]
                for m, c in plan:
                    if c is None:
                        lin = _get(layer, m)
                        modules.append(ModuleReport(
                            name=module_name(i, m), layer=i, method="skip",
                            shape=tuple(int(d) for d in lin["kernel"].shape)))
                if not active:
                    continue
                names = tuple(sorted({llama.LINEAR_INPUT[m] for m, _ in active}))
                t0 = time.perf_counter()
                states = _hessian_pass(layer, hs, mask, model, names)
                tokens = jnp.sum(mask, dtype=jnp.float32)
                finite = jax.device_get({k: st.finite for k, st in states.items()})
                bad = [k for k, ok in finite.items() if not ok]
                if bad:
                    raise FloatingPointError(
                        f"block {i}: NaN/Inf in the calibration activations feeding {bad}; check the "
                        "weights and the model dtype (fp16 overflow)")
                timings["hessian"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                reports, new = _quantize_shared(i, master, active, states, tokens)
                timings["quantize"] += time.perf_counter() - t0
                modules.extend(reports)
                for m, (pk, deq) in new.items():
                    packed[m] = pk
                    _set(layer, f"{m}.kernel", deq.astype(cdt))
            t0 = time.perf_counter()
            hs = _forward_pass(layer, hs, mask, model)
            hs.block_until_ready()
            timings["forward"] += time.perf_counter() - t0

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
                      "tokens": int(cal.mask.sum()), "batch_size": int(min(batch_size, cal.ids.shape[0]))}
                     if cal is not None else {}),
        timings=timings,
        environment=_environment(),
    )
    return qparams, report


def _quantize_shared(i: int, layer: dict[str, Any], active: Sequence[tuple[str, Any]],
                     states: Mapping[str, Any], tokens: jax.Array,
                     ) -> tuple[list[ModuleReport], dict[str, tuple[Any, jax.Array]]]:
    """Quantize linears that read the same input, concatenated along ``out`` per distinct setting."""
    from jgptq.models import llama

    by_key: dict[tuple[str, Any], list[str]] = {}
    for m, c in active:
        by_key.setdefault((llama.LINEAR_INPUT[m], c), []).append(m)
    reports: list[ModuleReport] = []
    new: dict[str, tuple[Any, jax.Array]] = {}
    for (inp, cfg), mods in by_key.items():
        lins = [_get(layer, m) for m in mods]
        widths = [int(lin["kernel"].shape[1]) for lin in lins]
        w = jnp.concatenate([lin["kernel"].astype(jnp.float32) for lin in lins], axis=1)
        t0 = time.perf_counter()
        res = _quantize_gptq(w, states[inp].h, states[inp].nsamples, tokens, cfg,
                             name=f"block {i} {'+'.join(mods)}")
        res = jax.block_until_ready(res)
        dt = time.perf_counter() - t0
        loss, rtn_loss, damp = jax.device_get((res["loss"], res["rtn_loss"], res["damp"]))
        if not np.isfinite(damp):
            from jgptq.linalg import CholeskyError

            raise CholeskyError(
                f"block {i}, {mods}: the damped Hessian of {inp!r} ({w.shape[0]}x{w.shape[0]}, "
                f"{int(tokens)} tokens) is not positive definite for any damping up to "
                f"{cfg.damp_max:g}; use more or longer calibration samples, a larger damp_percent, "
                f"or skip these modules with a dynamic rule")
        if not np.isfinite(loss).all():
            raise FloatingPointError(f"GPTQ produced a non-finite loss in block {i} for {mods}; "
                                     "check the calibration data and weights for NaN/Inf")
        start = 0
        for m, lin, width in zip(mods, lins, widths):
            sl = slice(start, start + width)
            start += width
            pk = {k: (v if k == "g_idx" else v[..., sl]) for k, v in res["params"].items()}
            new[m] = (pk, res["dequant"][:, sl])
            reports.append(ModuleReport(
                name=module_name(i, m), layer=i, shape=(int(w.shape[0]), width), method="gptq",
                **_settings(cfg), loss=float(loss[sl].sum()), rtn_loss=float(rtn_loss[sl].sum()),
                damp=float(damp), time_s=dt * width / w.shape[1], hessian=inp,
                tokens=int(tokens)))
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
