"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2) in JAX: pure functions and NNX modules.

The math lives once, in pure functions over a *params tree* (DESIGN.md): :func:`embed`,
:func:`decoder_block`, :func:`final_logits`, :func:`forward` (full recomputation) and
:func:`forward_step` (with a KV cache). A linear entry of the tree is a LIN dict or an NNX linear
module (see :func:`jgptq.models.quant_linear.linear`), so the NNX modules (:class:`LlamaForCausalLM`)
run exactly these functions over a tree whose linears are their own submodules.

Shapes: ``B`` batch, ``T`` tokens in this call, ``S`` KV-cache slots, ``D`` hidden size, ``H`` query
heads, ``KV`` key/value heads, ``hd`` head dim, ``V`` vocabulary.

Masks and positions: ``mask [B, T]`` marks valid (non-padding) tokens; padding may be on either
side. Positions are ``cumsum(mask) - 1`` (clipped at 0), so a padded row computes exactly what the
same tokens compute unpadded. Attention is causal in slot order and never attends to padding; with
``sliding_window`` (Mistral) a query at position p sees keys at positions ``> p - window``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jgptq.models.config import LlamaConfig
from jgptq.pallas_kernels import add_rms_norm as _add_rms_norm
from jgptq.pallas_kernels import decode_attention as _decode_attn
from jgptq.pallas_kernels import dispatch as _dispatch
from jgptq.models.quant_linear import Linear, QuantLinear, fuse_quantized, linear, linear_from_params, prepared_of

__all__ = [
    "LINEAR_GROUPS", "LINEAR_INPUT", "LINEAR_NAMES", "embed", "decoder_block", "final_logits",
    "forward", "forward_step", "init_cache", "positions_from_mask", "rms_norm", "rope_inv_freq",
    "LlamaForCausalLM", "DecoderLayer", "Attention", "MLP", "RMSNorm", "check_params",
    "attention_input", "attention_output", "attention_residual", "mlp_input", "mlp_hidden",
    "block_output", "ATTENTION_IMPLS", "DECODE_ATTENTION", "DECODE_NORM",
]

# GPTQ's true-sequential order: each inner list shares one input (and one Hessian).
LINEAR_GROUPS: list[list[str]] = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]
# linear name -> name of its captured input in decoder_block(..., capture=True)
LINEAR_INPUT: dict[str, str] = {
    "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in", "self_attn.q_proj": "attn_in",
    "self_attn.o_proj": "o_in", "mlp.up_proj": "mlp_in", "mlp.gate_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
LINEAR_NAMES: tuple[str, ...] = tuple(n for g in LINEAR_GROUPS for n in g)

_NEG = -1e30  # finite "minus infinity": fully masked rows (left padding) stay NaN-free


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def rms_norm(scale: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in fp32: ``scale * x / sqrt(mean(x^2) + eps)`` in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return jnp.asarray(scale).astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[hd/2]`` (float32, radians per position), with scaling applied."""
    hd = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv = inv / np.float32(s.factor)
    elif s.rope_type == "llama3":
        old = np.float32(s.original_max_position_embeddings)
        low_wavelen = old / np.float32(s.low_freq_factor)
        high_wavelen = old / np.float32(s.high_freq_factor)
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv)
        smooth = (old / wavelen - np.float32(s.low_freq_factor)) / np.float32(s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE: ``x [B, T, n, hd]``, ``positions [B, T]`` int -> same shape and dtype."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Token positions ``[B, T]`` int32 from a validity mask ``[B, T]``: ``max(cumsum(mask) - 1, 0)``."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slot: jax.Array, k_valid: jax.Array,
               q_pos: jax.Array, k_pos: jax.Array, config: LlamaConfig) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: ``[B, T, H, hd]``; k, v: ``[B, S, KV, hd]``.
      q_slot: ``[T]`` slot index of each query (keys occupy slots ``0..S-1``); causal in slots.
      k_valid: ``[B, S]`` bool, keys that may be attended to.
      q_pos: ``[B, T]``, k_pos: ``[B, S]`` token positions (used by the sliding window).
    Returns:
      ``[B, T, H * hd]`` in q.dtype.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    s = k.shape[1]
    allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & k_valid[:, None, :]  # [B, T, S]
    if config.sliding_window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < config.sliding_window
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * hd)


def _qkv(attn: Mapping[str, Any], x: jax.Array, q_pos: jax.Array, config: LlamaConfig
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projections and RoPE: ``x [B, T, D]`` -> q ``[B, T, H, hd]``, k, v ``[B, T, KV, hd]``."""
    b, t, _ = x.shape
    if "qkv_proj" in attn:  # a FusedQuantLinear (LlamaForCausalLM.tree()): one matmul for q, k, v
        q, k, v = attn["qkv_proj"](x)
    else:
        q, k, v = (linear(attn[n], x) for n in ("q_proj", "k_proj", "v_proj"))
    q = q.reshape(b, t, config.num_heads, config.head_dim)
    k = k.reshape(b, t, config.num_kv_heads, config.head_dim)
    v = v.reshape(b, t, config.num_kv_heads, config.head_dim)
    inv_freq = rope_inv_freq(config)
    return _rope(q, q_pos, inv_freq), _rope(k, q_pos, inv_freq), v


def _attention_fused(q: jax.Array, k: jax.Array, v: jax.Array, config: LlamaConfig) -> jax.Array:
    """Causal GQA attention through cuDNN's fused kernel (bf16/fp16 on NVIDIA GPUs): ``[B, T, H*hd]``.

    Only for rows whose padding, if any, is on the right: valid tokens then never see padding
    under the causal mask (padding rows compute garbage that callers mask out).
    """
    b, t, h, hd = q.shape
    window = None if config.sliding_window is None else (int(config.sliding_window) - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                       implementation="cudnn")
    return out.reshape(b, t, h * hd)


ATTENTION_IMPLS = ("xla", "cudnn")
# forward_step's attention over the cache for one new token per row: "pallas" is
# pallas_kernels.decode_attention (one kernel instead of ~6 XLA fusions; interpreted off the GPU),
# "fused" pallas_kernels.decode_attention_update (that kernel with RoPE and the in-place cache
# write folded in: no separate RoPE, padding or dynamic-update-slice ops), "xla" the einsum path
# of _attention, "auto" the fused kernel on NVIDIA GPUs (compute capability >= 8.0) where it
# applies, else the unfused one where that applies, else XLA.
DECODE_ATTENTION = ("auto", "xla", "pallas", "fused")


def _decode_path(attention: str, x: jax.Array, kc: jax.Array, config: LlamaConfig) -> str:
    """How this one-token decode step attends: ``"xla"``, ``"pallas"`` or ``"fused"``
    (``x [B, 1, D]`` is the attention input, ``kc`` the layer's key cache)."""
    if attention == "xla":
        return "xla"
    b, c = x.shape[0], config
    why = _decode_attn.supported((b, c.num_heads, c.head_dim), tuple(kc.shape), x.dtype)
    if why is None and c.sliding_window is not None:
        why = "a sliding window (not implemented in the kernels)"
    why_fused = why or _decode_attn.supported_update((b, c.num_heads + 2 * c.num_kv_heads, c.head_dim),
                                                     tuple(kc.shape), x.dtype)
    if why_fused is None and kc.dtype != x.dtype:
        why_fused = (f"a {kc.dtype} cache under {x.dtype} activations (the fused kernel writes the cache in the "
                     "compute dtype)")
    if attention in ("pallas", "fused"):
        reason = why if attention == "pallas" else why_fused
        if reason:
            raise ValueError(f"attention={attention!r} cannot run this decode step: {reason}; use 'xla' or 'auto'.")
        return attention
    # "auto": NVIDIA GPUs of compute capability >= 8.0 (bf16 tensor-core dots in Triton); ROCm,
    # older GPUs, CPU and TPU keep the XLA path
    if (_dispatch.cuda_major() or 0) < 8:
        return "xla"
    return "fused" if why_fused is None else "pallas" if why is None else "xla"


# How a one-token decode step runs each "residual add + RMSNorm" (after o_proj with
# post_attention_layernorm, after down_proj with the next block's input_layernorm or the final
# norm): "xla" as jnp ops (three XLA fusions each), "pallas" through the one-pass kernel
# pallas_kernels.add_rms_norm (which also adds the linear's split-K partials), "auto" the kernel
# on NVIDIA GPUs (compute capability >= 8.0) where it applies, else XLA.
DECODE_NORM = ("auto", "xla", "pallas")

# The kernel adds at most this many split-K addends of a linear itself; a linear with more (7B
# down_proj at batch 1: 22 partials, 360 KB per token) has them summed by XLA first.
NORM_MAX_PARTS = 8

# True: with the norm kernels on, a quantized gated MLP whose down projection runs a Mosaic decode
# grid (no act-order permutation) has silu(gate) * up made inside that kernel from the fused
# gate/up matmul's fp32 output (QuantLinear.glu_parts), one kernel fewer per block. Off by default:
# on the H200 (session 15, 7B shapes, scan of 20) it gained nothing. Its stages hold fp32 gate and
# up tiles; with the plain kernel's stage count (2.39 vs 2.09 ms/step at batch 1) a CTA needs
# ~137 KB of shared memory instead of ~86 (1 CTA per SM instead of 2, by that count), and with the stages cut to the same shared memory (gptq_matmul_mgpu.glu_config) the
# down projection lost about what the ~1.4 us/layer XLA op costs (2.21 vs 2.14 ms at batch 1,
# 2.86 vs 2.80 at batch 16, within the rounds' spread).
GLU_IN_DOWN = False

# True: with the norm kernels on, each quantized decode matmul whose kernel is a Mosaic decode grid
# also prefetches into L2 the first weights of the matmul that runs after it (q/k/v -> o_proj ->
# gate/up -> down -> the next block's q/k/v), so that kernel's first loads find them there
# (gptq_matmul_mgpu_parts(prefetch=)). Off: session 13 bounded the gain at 0.6-2.4 us per 7B decode
# matmul (cold against L2-resident weights), and on the H100 (session 17, scan of 20) it gained
# nothing beyond the rounds' spread (2.47 against 2.48 ms at batch 1; benchmarks/RESULTS.md).
PREFETCH_NEXT = False

# True: with the norm kernels on, a quantized gated MLP (fused gate/up, no biases) whose layers run on
# the Mosaic kernel runs its decode step as one persistent kernel: gate/up, a grid barrier, then
# down with silu(gate) * up made in its x tiles (pallas_kernels.persistent_mlp; no SiLU kernel, one
# launch instead of two). Off: correct on an H100 but slower (session 19, 7B shapes, scan of 20:
# 2.62 against 2.27 ms per step at batch 1, 3.62 against 3.01 at batch 16; the kernel takes 42.5 us
# where the three kernels take 32.9), as its few resident CTAs keep fewer loads in flight
# (benchmarks/RESULTS.md, session 19).
PERSISTENT_MLP = False


def _norm_path(norm: str, h: jax.Array, config: LlamaConfig) -> str:
    """``"xla"`` or ``"pallas"``: how this one-token step's residual adds + RMSNorms run."""
    if norm == "xla":
        return "xla"
    why = _add_rms_norm.supported(tuple(h.shape), tuple(h.shape), h.dtype)
    if norm == "pallas":
        if why:
            raise ValueError(f"norm='pallas' cannot run this decode step: {why}; use 'xla' or 'auto'.")
        return "pallas"
    return "pallas" if why is None and (_dispatch.cuda_major() or 0) >= 8 else "xla"


def _linear_addends(lin: Any, x: jax.Array, acc: jax.Array | None = None, prefetch: Any = None) -> jax.Array:
    """``linear(lin, x)`` as ``[P, ..., N]`` addends (a quantized module's split-K partials, at
    most :data:`NORM_MAX_PARTS` of them; else ``P = 1``, the output itself). ``acc``: the zeros
    its kernel adds into (:func:`_acc_shape`); ``prefetch``: the module whose matmul runs next
    (:data:`PREFETCH_NEXT`)."""
    if callable(getattr(lin, "parts", None)) and getattr(lin, "bias", None) is None:
        kw = {k: v for k, v in (("acc", acc), ("prefetch", prefetch)) if v is not None}  # any module with parts()
        return _few_addends(lin.parts(x, **kw), x.dtype)
    return linear(lin, x)[None]


def _few_addends(y: jax.Array, dtype: Any) -> jax.Array:
    """``y [P, ...]`` as is when ``P <= NORM_MAX_PARTS``, else summed in fp32 into one addend."""
    if y.shape[0] <= NORM_MAX_PARTS:
        return y
    return jnp.sum(y.astype(jnp.float32), axis=0).astype(dtype)[None]


def _glu_in_down(mlp: Mapping[str, Any], x2: jax.Array, config: LlamaConfig) -> bool:
    """Whether this block's down projection makes ``silu(gate) * up`` in its kernel (:data:`GLU_IN_DOWN`)."""
    gu, down = mlp.get("gate_up_proj"), mlp["down_proj"]
    if not GLU_IN_DOWN or gu is None or getattr(gu, "has_bias", True) or not callable(getattr(gu, "parts", None)):
        return False
    if tuple(getattr(gu, "sizes", ())) != (config.intermediate_size,) * 2:
        return False
    f = getattr(down, "glu_in_kernel", None)
    return callable(f) and f((*x2.shape[:-1], config.intermediate_size), x2.dtype)


def _persistent_mlp(mlp: Mapping[str, Any], x: jax.Array, config: LlamaConfig) -> tuple[Any, Any] | None:
    """The two layers' kernel weights (``dispatch.Prepared``) when this block's MLP runs as one
    persistent kernel (:data:`PERSISTENT_MLP`), else None."""
    gu, down = mlp.get("gate_up_proj"), mlp["down_proj"]
    if not PERSISTENT_MLP or gu is None or getattr(gu, "has_bias", True) or getattr(down, "bias", None) is not None:
        return None
    if tuple(getattr(gu, "sizes", ())) != (config.intermediate_size,) * 2:
        return None
    pg, pd = prepared_of(gu), prepared_of(down)
    return (pg, pd) if _dispatch.mlp_in_kernel(tuple(x.shape), x.dtype, pg, pd) else None


def _acc_shape(lin: Any, x_shape: tuple[int, ...], dtype: Any) -> tuple[int, ...] | None:
    """The float32 accumulator shape ``lin.parts`` takes for an input of ``x_shape`` (a Mosaic
    decode grid that TMA-adds its split-K partials into one zeroed buffer), or None."""
    f = getattr(lin, "parts_accumulator", None)
    if not callable(f) or getattr(lin, "bias", None) is not None or getattr(lin, "has_bias", False):
        return None
    return f(tuple(x_shape), dtype)


def _add_norm(lin: Any, x: jax.Array | None, h: jax.Array, scale: jax.Array, config: LlamaConfig, *,
              acc: jax.Array | None = None, zeros: Sequence[tuple[int, ...] | None] = (),
              addends: jax.Array | None = None, prefetch: Any = None):
    """``h + linear(lin, x)`` and its RMSNorm by ``scale``, in one kernel. ``acc``: zeros for the
    linear's kernel to add into; ``zeros``: shapes (or None) of the zero accumulators the kernel
    also writes for the next linears; ``addends``: the linear's output already made, ``[P, ...]``
    (then ``lin``, ``x`` and ``acc`` are unused). Returns ``(h, x)``, plus the list of those zero
    arrays (None where the shape is None) when ``zeros`` is given."""
    y = _linear_addends(lin, x, acc, prefetch) if addends is None else addends
    if y.shape[0] == 1:
        y = y[0]
    want = [z for z in zeros if z is not None]
    out = _add_rms_norm.add_rms_norm(y, h, jnp.asarray(scale), config.rms_norm_eps, zeros=want,
                                     interpret=jax.default_backend() != "gpu")
    if not zeros:
        return out
    made = iter(out[2] if want else ())
    return out[0], out[1], [None if z is None else next(made) for z in zeros]


def _decode_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, k_valid: jax.Array, index: jax.Array
                      ) -> jax.Array:
    """The Pallas decode-attention kernel for ``q [B, 1, H, hd]`` -> ``[B, 1, H * hd]``."""
    b, _, h, hd = q.shape
    o = _decode_attn.decode_attention(q[:, 0], kc, vc, k_valid, index,
                                      interpret=jax.default_backend() != "gpu")
    return o.reshape(b, 1, h * hd)


def _attn_counter_shape(kc: jax.Array) -> tuple[int, int] | None:
    """``[B, KV]`` when the fused decode-attention kernel's default tiles for this cache split the
    slots and combine the splits in the kernel (it then counts finished splits in zeros that the
    previous norm kernel writes, as the matmul accumulators are made), else None."""
    b, s, kvh, _ = kc.shape
    cfg = _decode_attn.default_config(b, kvh, s)
    return (b, kvh) if cfg.splits > 1 and cfg.combine == "kernel" else None


def _decode_step_fused(attn: Mapping[str, Any], x: jax.Array, q_pos: jax.Array, kc: jax.Array, vc: jax.Array,
                       k_valid: jax.Array, index: jax.Array, config: LlamaConfig, acc: jax.Array | None = None,
                       prefetch: Any = None, counter: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One-token attention through ``decode_attention_update``: ``x [B, 1, D]`` -> ``o [B, 1, H*hd]``
    and the caches with the new key/value written at ``index`` (RoPE and the write in the kernel).
    ``counter``: zeros for the kernel's in-kernel split combine (:func:`_attn_counter_shape`), or None."""
    b = x.shape[0]
    c = config
    rows = c.num_heads + 2 * c.num_kv_heads
    if "qkv_proj" in attn:  # the fused matmul's output is already [q | k | v] per row
        lin = attn["qkv_proj"]
        if lin.has_bias:
            qkv = lin.concatenated(x).reshape(b, rows, c.head_dim)
        else:  # its split-K partials: the kernel adds them (no XLA sum between the two kernels)
            y = lin.parts(x, acc=acc, prefetch=prefetch)
            qkv = y.reshape(y.shape[0], b, rows, c.head_dim)
    else:
        y = jnp.concatenate([linear(attn[n], x) for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
        qkv = y.reshape(b, rows, c.head_dim)
    freqs = q_pos[:, 0].astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(c))  # [B, hd/2]
    cos, sin = jnp.cos(freqs).astype(x.dtype), jnp.sin(freqs).astype(x.dtype)
    o, kc, vc = _decode_attn.decode_attention_update(qkv, kc, vc, k_valid, index, cos, sin, counter=counter,
                                                     interpret=jax.default_backend() != "gpu")
    return o.reshape(b, 1, c.num_heads * c.head_dim), kc, vc


def _mlp_act(mlp: Mapping[str, Any], x2: jax.Array, acc: jax.Array | None = None, prefetch: Any = None) -> jax.Array:
    if "gate_up_proj" in mlp:  # a FusedQuantLinear: one matmul for gate and up (acc: its zeros)
        gate, up = mlp["gate_up_proj"](x2, acc=acc, prefetch=prefetch)
    else:
        gate, up = linear(mlp["gate_proj"], x2), linear(mlp["up_proj"], x2)
    return jax.nn.silu(gate) * up


def _block(lp: Mapping[str, Any], h: jax.Array, q_pos: jax.Array, mask: jax.Array, config: LlamaConfig,
           *, kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
           k_valid: jax.Array | None = None, k_pos: jax.Array | None = None, capture: bool = False,
           attention: str = "xla", x_in: jax.Array | None = None, next_scale: jax.Array | None = None,
           accs: Mapping[str, jax.Array] | None = None, next_accs: Sequence[tuple[int, ...] | None] = (),
           next_linear: Any = None):
    """One decoder block; with ``kv`` the new keys/values are written at slot ``index`` first
    (``attention``: see :data:`DECODE_ATTENTION`; it applies to one new token per row).

    With ``next_scale`` (the norm weight of whatever reads the block's output: the next block's
    ``input_layernorm`` or the final norm) both residual adds run through the add + RMSNorm
    kernel, ``x_in`` is this block's normalised input (the previous block's, or None to compute
    it) and the block also returns its output normalised by ``next_scale``. Then ``accs`` holds
    zero accumulators for this block's q/k/v (``"qkv"``) and ``o_proj`` (``"o"``) kernels and the decode-attention
    kernel's split counters (``"attn"``, when it combines its splits itself) (made by
    the previous block's norm kernel; see :func:`_acc_shape`), the post-attention norm kernel
    makes gate/up's and down's, and the last norm kernel also writes zeros of the ``next_accs``
    shapes, returned for the next block. With :data:`PREFETCH_NEXT` each matmul hints the one after
    it (``prefetch=``); ``next_linear`` is the module after this block's down projection (the
    next block's q/k/v), or None.

    Returns ``(h, new_kv_or_None, captured_or_None)``, plus ``x_next`` and the list of
    ``next_accs`` zero arrays with ``next_scale``.
    """
    accs = accs or {}
    hint = (lambda m: m) if PREFETCH_NEXT and next_scale is not None else (lambda m: None)
    b, t, _ = h.shape
    attn, mlp = lp["self_attn"], lp["mlp"]
    x = x_in if x_in is not None else attention_input(lp, h, config)
    path = "xla" if kv is None or t != 1 else _decode_path(attention, x, kv[0], config)
    if path == "fused":
        o, kc, vc = _decode_step_fused(attn, x, q_pos, kv[0], kv[1], k_valid, index, config, accs.get("qkv"),
                                       prefetch=hint(attn["o_proj"]), counter=accs.get("attn"))
        new_kv = (kc, vc)
    elif kv is None:
        q, k, v = _qkv(attn, x, q_pos, config)
        q_slot = jnp.arange(t)
        o = _attention(q, k, v, q_slot, mask.astype(bool), q_pos, q_pos, config)
        new_kv = None
    else:
        q, k, v = _qkv(attn, x, q_pos, config)
        kc, vc = kv
        kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, index, 0, 0))
        vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, index, 0, 0))
        kq, vq = kc.astype(q.dtype), vc.astype(q.dtype)
        if path == "pallas":
            o = _decode_attention(q, kq, vq, k_valid, index)
        else:
            q_slot = index + jnp.arange(t)
            o = _attention(q, kq, vq, q_slot, k_valid, q_pos, k_pos, config)
        new_kv = (kc, vc)
    z_gu = z_down = None
    pmlp = _persistent_mlp(mlp, x, config) if next_scale is not None and not capture else None
    if next_scale is not None:
        gu = mlp["gate_up_proj"] if "gate_up_proj" in mlp else None
        if pmlp is not None:  # the persistent kernel's gate/up and output buffers
            shapes = list(_dispatch.mlp_accumulators(tuple(x.shape), x.dtype, *pmlp))
        else:
            shapes = [_acc_shape(gu, x.shape, x.dtype) if gu is not None else None,
                      _acc_shape(mlp["down_proj"], (*x.shape[:-1], config.intermediate_size), x.dtype)]
        h, x2, (z_gu, z_down) = _add_norm(attn["o_proj"], o, h, lp["post_attention_layernorm"]["scale"], config,
                                          acc=accs.get("o"), zeros=shapes,
                                          prefetch=hint(mlp.get("gate_up_proj", mlp.get("gate_proj"))))
    else:
        h = attention_residual(lp, h, o)
        x2 = mlp_input(lp, h, config)
    if pmlp is not None:  # gate/up, barrier, down (activation in its x tiles): one launch
        y = _dispatch.matmul_mlp(x2, *pmlp, gu=z_gu, acc=z_down)
        h, x_next, *made = _add_norm(None, None, h, next_scale, config, zeros=next_accs, addends=y)
        return h, new_kv, None, x_next, (made[0] if made else [])
    if next_scale is not None and not capture and _glu_in_down(mlp, x2, config):
        # the fused gate/up matmul's output, fp32, straight into the down projection's kernel,
        # which makes silu(gate) * up itself
        gu = mlp["gate_up_proj"].parts(x2, acc=z_gu, prefetch=hint(mlp["down_proj"]))
        gu = gu[0] if gu.shape[0] == 1 else jnp.sum(gu.astype(jnp.float32), axis=0)
        y = _few_addends(mlp["down_proj"].glu_parts(gu, x2.dtype, acc=z_down, prefetch=hint(next_linear)), x2.dtype)
        h, x_next, *made = _add_norm(None, None, h, next_scale, config, zeros=next_accs, addends=y)
        return h, new_kv, None, x_next, (made[0] if made else [])
    act = _mlp_act(mlp, x2, z_gu, prefetch=hint(mlp["down_proj"]))
    captured = {"attn_in": x, "o_in": o, "mlp_in": x2, "down_in": act} if capture else None
    if next_scale is not None:
        h, x_next, *made = _add_norm(mlp["down_proj"], act, h, next_scale, config, acc=z_down, zeros=next_accs,
                                     prefetch=hint(next_linear))
        return h, new_kv, captured, x_next, (made[0] if made else [])
    h = h + linear(mlp["down_proj"], act)
    return h, new_kv, captured


# ---------------------------------------------------------------------------------------------
# the block in stages (driver-facing): the same math as decoder_block, cut at the linears' inputs
# ---------------------------------------------------------------------------------------------
def attention_input(lp: Mapping[str, Any], h: jax.Array, config: LlamaConfig) -> jax.Array:
    """q/k/v's input (``attn_in``): ``input_layernorm(h)``, ``[B, T, D]``."""
    return rms_norm(lp["input_layernorm"]["scale"], h, config.rms_norm_eps)


def attention_output(lp: Mapping[str, Any], h: jax.Array, positions: jax.Array, mask: jax.Array,
                     config: LlamaConfig, impl: str = "xla") -> jax.Array:
    """o_proj's input (``o_in``): attention over the block input ``h [B, T, D]`` -> ``[B, T, H*hd]``.

    ``impl="cudnn"`` uses the fused kernel (:func:`_attention_fused`; right padding only, bf16/fp16
    on an NVIDIA GPU), ``"xla"`` the einsum path that :func:`decoder_block` uses.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    q, k, v = _qkv(lp["self_attn"], attention_input(lp, h, config), positions, config)
    if impl == "cudnn":
        return _attention_fused(q, k, v, config)
    return _attention(q, k, v, jnp.arange(h.shape[1]), mask.astype(bool), positions, positions, config)


def attention_residual(lp: Mapping[str, Any], h: jax.Array, o: jax.Array) -> jax.Array:
    """The residual stream after attention: ``h + o_proj(o)``."""
    return h + linear(lp["self_attn"]["o_proj"], o)


def mlp_input(lp: Mapping[str, Any], h_mid: jax.Array, config: LlamaConfig) -> jax.Array:
    """gate/up's input (``mlp_in``): ``post_attention_layernorm(h_mid)``."""
    return rms_norm(lp["post_attention_layernorm"]["scale"], h_mid, config.rms_norm_eps)


def mlp_hidden(lp: Mapping[str, Any], h_mid: jax.Array, config: LlamaConfig) -> jax.Array:
    """down_proj's input (``down_in``): ``silu(gate(x2)) * up(x2)`` with ``x2 = mlp_input(h_mid)``."""
    return _mlp_act(lp["mlp"], mlp_input(lp, h_mid, config))


def block_output(lp: Mapping[str, Any], h_mid: jax.Array, config: LlamaConfig) -> jax.Array:
    """The block's output from the residual after attention: ``h_mid + down(mlp_hidden(h_mid))``."""
    return h_mid + linear(lp["mlp"]["down_proj"], mlp_hidden(lp, h_mid, config))


# ---------------------------------------------------------------------------------------------
# driver-facing functional interface
# ---------------------------------------------------------------------------------------------
def embed(params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """Token embeddings: ``ids [B, T]`` int -> ``[B, T, D]`` in the embedding's dtype."""
    return jnp.take(jnp.asarray(params["embed_tokens"]["embedding"]), ids, axis=0)


def decoder_block(layer_params: Mapping[str, Any], h: jax.Array, positions: jax.Array | None,
                  mask: jax.Array | None, config: LlamaConfig, capture: bool = False):
    """Run one decoder block on hidden states (pure; jit with ``config``/``capture`` static).

    Args:
      layer_params: one entry of ``params["layers"]`` (float or quantized LINs).
      h: ``[B, T, D]`` hidden states (their dtype is the compute dtype).
      positions: ``[B, T]`` int token positions, or None for ``positions_from_mask(mask)``.
      mask: ``[B, T]`` valid tokens (bool/int), or None for all valid.
      capture: also return the inputs of the block's linears.
    Returns:
      ``h [B, T, D]``, or ``(h, captured)`` with ``captured`` = {"attn_in": [B,T,D] (q/k/v input),
      "o_in": [B,T,H*hd], "mlp_in": [B,T,D] (gate/up input), "down_in": [B,T,F]}.
    """
    b, t, _ = h.shape
    if mask is None:
        mask = jnp.ones((b, t), dtype=bool)
    if positions is None:
        positions = positions_from_mask(mask)
    out, _, captured = _block(layer_params, h, positions, mask, config, capture=capture)
    return (out, captured) if capture else out


def final_logits(params: Mapping[str, Any], h: jax.Array, config: LlamaConfig) -> jax.Array:
    """Final RMSNorm and LM head: ``h [B, T, D]`` -> logits ``[B, T, V]`` float32."""
    return _lm_head(params, rms_norm(params["norm"]["scale"], h, config.rms_norm_eps), config)


def _lm_head(params: Mapping[str, Any], x: jax.Array, config: LlamaConfig) -> jax.Array:
    """The LM head on final-normed hidden states ``x [B, T, D]`` -> logits float32."""
    if config.tie_word_embeddings:
        e = jnp.asarray(params["embed_tokens"]["embedding"]).astype(x.dtype)
        return jnp.einsum("btd,vd->btv", x, e, preferred_element_type=jnp.float32)
    head = params["lm_head"]
    if not callable(head) and "kernel" in head:
        y = jnp.matmul(x, jnp.asarray(head["kernel"]).astype(x.dtype), preferred_element_type=jnp.float32)
        if head.get("bias") is not None:
            y = y + jnp.asarray(head["bias"]).astype(jnp.float32)
        return y
    return linear(head, x).astype(jnp.float32)


def forward(params: Mapping[str, Any], ids: jax.Array, mask: jax.Array | None, config: LlamaConfig) -> jax.Array:
    """Full forward pass (no cache): ``ids [B, T]`` -> logits ``[B, T, V]`` float32."""
    b, t = ids.shape
    if mask is None:
        mask = jnp.ones((b, t), dtype=bool)
    positions = positions_from_mask(mask)
    h = embed(params, ids)
    for lp in params["layers"]:
        h, _, _ = _block(lp, h, positions, mask, config)
    return final_logits(params, h, config)


def init_cache(config: LlamaConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """An empty KV cache: ``k``/``v`` lists (one per layer) of ``[B, S, KV, hd]``, ``valid [B, S]``
    bool, and ``index`` (int32 scalar, the next slot to write)."""
    shape = (batch, slots, config.num_kv_heads, config.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
        "valid": jnp.zeros((batch, slots), dtype=bool),
        "index": jnp.zeros((), jnp.int32),
    }


def forward_step(params: Mapping[str, Any], ids: jax.Array, mask: jax.Array, cache: Mapping[str, Any],
                 config: LlamaConfig, last_only: bool = False, attention: str = "auto", norm: str = "auto"
                 ) -> tuple[jax.Array, dict[str, Any]]:
    """Append ``ids [B, T]`` (validity ``mask [B, T]``) at slot ``cache["index"]`` and run the model.

    Positions continue from the valid tokens already in the cache. Returns logits ``[B, T, V]``
    (``[B, 1, V]`` of the last slot when ``last_only``) float32 and the updated cache. All
    rows write the same slots, so batches should be left-padded for decoding. ``attention``
    chooses how a one-token step attends to the cache (:data:`DECODE_ATTENTION`: ``"auto"``,
    ``"xla"``, ``"pallas"`` or ``"fused"``); a row with no valid slot at all gets zeros from the kernel and
    a uniform average from ``"xla"`` (callers mask such rows out). ``norm`` chooses how a one-token
    step runs its residual adds + RMSNorms (:data:`DECODE_NORM`: ``"auto"``, ``"xla"`` or
    ``"pallas"``, the one-pass kernel that also adds the linears' split-K partials).
    """
    if attention not in DECODE_ATTENTION:
        raise ValueError(f"attention must be one of {DECODE_ATTENTION}, got {attention!r}")
    if norm not in DECODE_NORM:
        raise ValueError(f"norm must be one of {DECODE_NORM}, got {norm!r}")
    index = cache["index"]
    b, t = ids.shape
    valid = jax.lax.dynamic_update_slice(cache["valid"], mask.astype(bool), (0, index))
    k_pos = positions_from_mask(valid)
    q_pos = jax.lax.dynamic_slice(k_pos, (0, index), (b, t))
    h = embed(params, ids)
    layers = list(params["layers"])
    fused_norm = t == 1 and bool(layers) and _norm_path(norm, h, config) == "pallas"
    x = attention_input(layers[0], h, config) if fused_norm else None
    fused_attn = fused_norm and _decode_path(attention, x, cache["k"][0], config) == "fused"
    new_k, new_v = [], []
    accs: dict[str, jax.Array] = {}
    for i, (lp, kc, vc) in enumerate(zip(layers, cache["k"], cache["v"])):
        kw = dict(kv=(kc, vc), index=index, k_valid=valid, k_pos=k_pos, attention=attention)
        if fused_norm:  # the block hands the next one its normalised input (and its zero accumulators)
            last = i + 1 == len(layers)
            nxt = params["norm"]["scale"] if last else layers[i + 1]["input_layernorm"]["scale"]
            names, shapes = [], []
            if not last:
                attn_n = layers[i + 1]["self_attn"]
                if fused_attn and "qkv_proj" in attn_n:
                    names.append("qkv")
                    shapes.append(_acc_shape(attn_n["qkv_proj"], x.shape, x.dtype))
                if fused_attn:  # the next block's decode-attention split counters, when it combines in the kernel
                    names.append("attn")
                    shapes.append(_attn_counter_shape(cache["k"][i + 1]))
                names.append("o")
                shapes.append(_acc_shape(attn_n["o_proj"], (*x.shape[:-1], config.num_heads * config.head_dim),
                                         x.dtype))
            after = None if last else layers[i + 1]["self_attn"]
            after = None if after is None else after.get("qkv_proj", after.get("q_proj"))
            h, (kc, vc), _, x, made = _block(lp, h, q_pos, mask, config, x_in=x, next_scale=nxt, accs=accs,
                                             next_accs=shapes, next_linear=after, **kw)
            accs = {n: z for n, z in zip(names, made) if z is not None}
        else:
            h, (kc, vc), _ = _block(lp, h, q_pos, mask, config, **kw)
        new_k.append(kc)
        new_v.append(vc)
    if fused_norm:  # x is the final norm of h (one token per row: last_only changes nothing)
        logits = _lm_head(params, x, config)
    else:
        if last_only:
            h = h[:, -1:]
        logits = final_logits(params, h, config)
    return logits, {"k": new_k, "v": new_v, "valid": valid, "index": index + t}


# ---------------------------------------------------------------------------------------------
# parameter checking
# ---------------------------------------------------------------------------------------------
def _lin_shape(lin: Mapping[str, Any]) -> tuple[int, int]:
    if "kernel" in lin:
        return tuple(lin["kernel"].shape)  # type: ignore[return-value]
    return (lin["g_idx"].shape[0], lin["qweight"].shape[1])


def _all_finite(x: Any) -> bool:
    """NaN/Inf check where the array lives (host numpy or device), without a float32 copy."""
    if isinstance(x, np.ndarray):
        return bool(np.isfinite(x).all())
    return bool(jnp.isfinite(x).all())


def check_params(params: Mapping[str, Any], config: LlamaConfig) -> None:
    """Check a params tree against a config: every tensor present, shapes right, floats finite.

    Raises:
      ValueError: naming the first missing/extra/misshaped tensor (``layers.3.self_attn.q_proj``)
        or one with NaN/Inf values.
    """
    from jgptq.models.quant_linear import is_quantized, quant_bits

    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size

    def need(tree: Mapping[str, Any], key: str, where: str) -> Any:
        if not isinstance(tree, Mapping) or key not in tree:
            raise ValueError(f"params are missing {where}{key}")
        return tree[key]

    def check_array(x: Any, shape: tuple[int, ...], name: str) -> None:
        if tuple(x.shape) != shape:
            raise ValueError(f"params {name} has shape {tuple(x.shape)}, expected {shape} for this config")
        if jnp.issubdtype(x.dtype, jnp.floating) and not _all_finite(x):
            raise ValueError(f"params {name} contains NaN or Inf values")

    def check_lin(lin: Mapping[str, Any], shape: tuple[int, int], bias: bool, name: str) -> None:
        if is_quantized(lin):
            quant_bits(lin)
        else:
            check_array(lin["kernel"], shape, name + ".kernel")
        got = _lin_shape(lin)
        if got != shape:
            raise ValueError(f"params {name} is [{got[0]}, {got[1]}] (in, out), expected {list(shape)}")
        if bias and lin.get("bias") is None:
            raise ValueError(f"params are missing {name}.bias (this config has biases there)")
        if not bias and lin.get("bias") is not None:
            raise ValueError(f"params have an unexpected {name}.bias (this config has no bias there)")
        if lin.get("bias") is not None:
            check_array(lin["bias"], (shape[1],), name + ".bias")

    check_array(need(need(params, "embed_tokens", ""), "embedding", "embed_tokens."), (v, d), "embed_tokens.embedding")
    check_array(need(need(params, "norm", ""), "scale", "norm."), (d,), "norm.scale")
    if c.tie_word_embeddings:
        if "lm_head" in params:
            raise ValueError("params have lm_head but the config ties it to the embeddings "
                             "(tie_word_embeddings=True); drop one of them")
    else:
        check_lin(need(params, "lm_head", ""), (d, v), False, "lm_head")
    layers = need(params, "layers", "")
    if len(layers) != c.num_layers:
        raise ValueError(f"params have {len(layers)} layers, config says num_layers={c.num_layers}")
    shapes = {
        "self_attn.q_proj": ((d, c.q_size), c.qkv_bias), "self_attn.k_proj": ((d, c.kv_size), c.qkv_bias),
        "self_attn.v_proj": ((d, c.kv_size), c.qkv_bias), "self_attn.o_proj": ((c.q_size, d), c.o_bias),
        "mlp.gate_proj": ((d, f), c.mlp_bias), "mlp.up_proj": ((d, f), c.mlp_bias),
        "mlp.down_proj": ((f, d), c.mlp_bias),
    }
    for i, lp in enumerate(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            check_array(need(need(lp, norm, f"layers.{i}."), "scale", f"layers.{i}.{norm}."), (d,),
                        f"layers.{i}.{norm}.scale")
        for name, (shape, bias) in shapes.items():
            mod, proj = name.split(".")
            lin = need(need(lp, mod, f"layers.{i}."), proj, f"layers.{i}.{mod}.")
            check_lin(lin, shape, bias, f"layers.{i}.{name}")


# ---------------------------------------------------------------------------------------------
# NNX modules
# ---------------------------------------------------------------------------------------------
def _cast(x: Any, dtype: Any | None) -> jax.Array:
    x = jnp.asarray(x)
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(dtype)
    return x


def _cast_lin(lin: Mapping[str, Any], dtype: Any | None) -> dict[str, Any]:
    if "kernel" in lin:
        return {k: _cast(x, dtype) for k, x in lin.items() if x is not None}
    out = {k: jnp.asarray(x) for k, x in lin.items() if x is not None}
    if out.get("bias") is not None:
        out["bias"] = _cast(out["bias"], dtype)
    return out


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale [D]``."""

    def __init__(self, scale: Any, eps: float):
        self.scale = nnx.Param(jnp.asarray(scale))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(self.scale[...], x, self.eps)


class _Projections(nnx.Module):
    """Linears of one block part; those that read the same input (``FUSE``) become one
    :class:`FusedQuantLinear` when they are GPTQ layers that can share a matmul (``fuse``)."""

    NAMES: tuple[str, ...] = ()
    FUSE: tuple[str, ...] = ()
    FUSED_NAME = ""

    def __init__(self, p: Mapping[str, Any], dtype: Any | None, use_kernels: bool, fuse: bool = True):
        lins = {name: _cast_lin(p[name], dtype) for name in self.NAMES}
        fused = fuse_quantized([lins[n] for n in self.FUSE], use_kernel=use_kernels) if fuse else None
        setattr(self, self.FUSED_NAME, fused)
        for name in self.NAMES:
            setattr(self, name, None if fused is not None and name in self.FUSE
                    else linear_from_params(lins[name], use_kernel=use_kernels))

    def tree(self) -> dict[str, Any]:
        """Name -> module, with the fused module under ``FUSED_NAME`` in place of its parts."""
        fused = getattr(self, self.FUSED_NAME)
        t = {} if fused is None else {self.FUSED_NAME: fused}
        t.update({n: getattr(self, n) for n in self.NAMES if getattr(self, n) is not None})
        return t

    def to_params(self) -> dict[str, Any]:
        """Name -> LIN dict for every linear (fused parts split back)."""
        fused = getattr(self, self.FUSED_NAME)
        out = {} if fused is None else dict(zip(self.FUSE, fused.to_params()))
        out.update({n: getattr(self, n).to_params() for n in self.NAMES if getattr(self, n) is not None})
        return {n: out[n] for n in self.NAMES}


class Attention(_Projections):
    """The four attention projections (float :class:`Linear` or GPTQ :class:`QuantLinear`; q/k/v
    fused into ``qkv_proj`` when they are GPTQ layers with the same ``g_idx``)."""

    NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
    FUSE = ("q_proj", "k_proj", "v_proj")
    FUSED_NAME = "qkv_proj"


class MLP(_Projections):
    """SwiGLU MLP projections (gate/up fused into ``gate_up_proj`` when they can be)."""

    NAMES = ("gate_proj", "up_proj", "down_proj")
    FUSE = ("gate_proj", "up_proj")
    FUSED_NAME = "gate_up_proj"


class DecoderLayer(nnx.Module):
    """One decoder block; ``__call__`` runs :func:`decoder_block` over this module's tree."""

    def __init__(self, config: LlamaConfig, p: Mapping[str, Any], dtype: Any | None = None,
                 use_kernels: bool = True, fuse: bool = True):
        self.config = config
        self.input_layernorm = RMSNorm(_cast(p["input_layernorm"]["scale"], dtype), config.rms_norm_eps)
        self.self_attn = Attention(p["self_attn"], dtype, use_kernels, fuse)
        self.post_attention_layernorm = RMSNorm(_cast(p["post_attention_layernorm"]["scale"], dtype),
                                                config.rms_norm_eps)
        self.mlp = MLP(p["mlp"], dtype, use_kernels, fuse)

    def tree(self) -> dict[str, Any]:
        """The layer-params tree with this module's linears in place of LIN dicts."""
        return {
            "input_layernorm": {"scale": self.input_layernorm.scale[...]},
            "self_attn": self.self_attn.tree(),
            "post_attention_layernorm": {"scale": self.post_attention_layernorm.scale[...]},
            "mlp": self.mlp.tree(),
        }

    def __call__(self, h: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
                 capture: bool = False):
        return decoder_block(self.tree(), h, positions, mask, self.config, capture)

    def to_params(self) -> dict[str, Any]:
        return {
            "input_layernorm": {"scale": self.input_layernorm.scale[...]},
            "self_attn": self.self_attn.to_params(),
            "post_attention_layernorm": {"scale": self.post_attention_layernorm.scale[...]},
            "mlp": self.mlp.to_params(),
        }


class LlamaForCausalLM(nnx.Module):
    """A Llama-family causal LM over float or packed GPTQ weights.

    Build with :meth:`from_params`; ``to_params()`` gives the params tree back. Calling the module
    (``model(ids, mask)``) runs :func:`forward`; :meth:`step` runs :func:`forward_step` with a KV
    cache. The module is a pytree, so it can be passed straight to ``jax.jit``.
    """

    def __init__(self, config: LlamaConfig, params: Mapping[str, Any], *, dtype: Any | None = None,
                 use_kernels: bool = True, check: bool = True, fuse: bool = True):
        if check:
            check_params(params, config)
        self.config = config
        self.embed_tokens = nnx.Param(_cast(params["embed_tokens"]["embedding"], dtype))
        self.layers = nnx.List([DecoderLayer(config, lp, dtype, use_kernels, fuse) for lp in params["layers"]])
        self.norm = RMSNorm(_cast(params["norm"]["scale"], dtype), config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else linear_from_params(_cast_lin(params["lm_head"], dtype), use_kernel=use_kernels))

    @classmethod
    def from_params(cls, config: LlamaConfig, params: Mapping[str, Any], *, dtype: Any | None = None,
                    use_kernels: bool = True, fuse: bool = True) -> "LlamaForCausalLM":
        """Build from a params tree (DESIGN.md); float arrays are cast to ``dtype`` when given.

        Packed GPTQ tensors stay as they are; their linears ask the Pallas dispatch for a kernel
        unless ``use_kernels=False``. With ``fuse`` (default) GPTQ q/k/v and gate/up projections
        that share their ``g_idx`` run as one matmul each (``qkv_proj`` / ``gate_up_proj`` in
        :meth:`tree`; ``to_params()`` still gives the separate layers).
        """
        return cls(config, params, dtype=dtype, use_kernels=use_kernels, fuse=fuse)

    @property
    def dtype(self) -> Any:
        """The compute dtype (that of the embedding table)."""
        return self.embed_tokens[...].dtype

    def tree(self) -> dict[str, Any]:
        """The params tree with this module's linears in place of LIN dicts (input of the pure functions)."""
        t: dict[str, Any] = {
            "embed_tokens": {"embedding": self.embed_tokens[...]},
            "layers": [layer.tree() for layer in self.layers],
            "norm": {"scale": self.norm.scale[...]},
        }
        if self.lm_head is not None:
            t["lm_head"] = self.lm_head
        return t

    def to_params(self) -> dict[str, Any]:
        """The plain params tree (DESIGN.md) of this model."""
        p: dict[str, Any] = {
            "embed_tokens": {"embedding": self.embed_tokens[...]},
            "layers": [layer.to_params() for layer in self.layers],
            "norm": {"scale": self.norm.scale[...]},
        }
        if self.lm_head is not None:
            p["lm_head"] = self.lm_head.to_params()
        return p

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` float32 for ``ids [B, T]`` (``mask [B, T]`` valid tokens)."""
        return forward(self.tree(), ids, mask, self.config)

    def step(self, ids: jax.Array, mask: jax.Array, cache: Mapping[str, Any], last_only: bool = False,
             attention: str = "auto", norm: str = "auto"):
        """:func:`forward_step` on this model: ``(logits, new_cache)``."""
        return forward_step(self.tree(), ids, mask, cache, self.config, last_only, attention, norm)

    def init_cache(self, batch: int, slots: int) -> dict[str, Any]:
        """An empty KV cache for ``batch`` rows and ``slots`` positions in the compute dtype."""
        return init_cache(self.config, batch, slots, self.dtype)


def layer_names(config: LlamaConfig) -> Sequence[str]:
    """Dotted names of every linear in the model, in block order (``layers.0.self_attn.k_proj``, ...)."""
    return [f"layers.{i}.{n}" for i in range(config.num_layers) for n in LINEAR_NAMES]
