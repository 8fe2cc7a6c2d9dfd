"""Decode attention over a KV cache, one new token per row: Pallas (Triton lowering), GPU.

``o[b, h] = softmax_s(q[b, h] . k[b, s, h // G] / sqrt(hd) | allowed[b, s]) @ v[b, s, h // G]``
with ``allowed[b, s] = valid[b, s] and s <= index`` (grouped-query attention: ``G = H / KV`` query
heads share a key/value head). This is the decode step of :mod:`jgptq.models.llama` (its XLA path
builds ~6 fusions per layer for this: scores, masked max, exp, sum, probabilities x V, their sum; on
an H200 they took 15-18 us of a 7B decode layer, `benchmarks/RESULTS.md`), in one kernel:

* grid ``(B, KV, splits)``: each program takes one key/value head of one row and a contiguous
  range of cache slots; the ``G`` query heads of that head are one ``[Gp, hd]`` tile (padded to
  a power of two >= 16, the smallest tensor-core tile), so scores and ``p @ v`` are tensor-core
  dots with fp32 accumulation;
* slots after ``index`` are never allowed, so the loop stops there (a cache of 4096 slots at
  step 100 reads 128 of them); ``valid`` (left padding, holes) is applied per slot;
* online softmax (running max and sum in fp32); with one split the kernel writes the normalised
  output, with several it writes fp32 partial ``(o, max, sum)`` per split and XLA combines them.

A row with no allowed slot gets zeros. The file also holds the plain-jnp :func:`reference` and a
benchmark :func:`main` (against the XLA einsum attention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["DecodeAttentionConfig", "default_config", "decode_attention", "decode_attention_update",
           "reference", "reference_update", "supported", "supported_update", "main"]


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Tiles of :func:`decode_attention`.

    Attributes:
      block_s: cache slots per loop step (power of two, >= 16, divides ``S / splits``).
      splits: contiguous slot ranges per row and head, one program each (divides ``S / block_s``).
      num_warps, num_stages: Triton launch parameters.
      combine: with ``splits > 1``, who combines the splits' fp32 partials: ``"xla"`` (two XLA ops
        after the kernel) or ``"kernel"`` (:func:`decode_attention_update` only: the last program of
        each row and head to finish, found by an atomic counter, reads the others' partials and
        writes the normalised output, so the step stays one launch).
    """

    block_s: int = 64
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    combine: str = "xla"


COMBINES = ("xla", "kernel")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(q_shape: tuple[int, ...], cache_shape: tuple[int, ...], dtype) -> str | None:
    """Why :func:`decode_attention` cannot take these shapes / dtype (``None`` when it can).

    ``q_shape`` is ``[B, H, hd]``, ``cache_shape`` ``[B, S, KV, hd]``."""
    if len(q_shape) != 3 or len(cache_shape) != 4:
        return f"q must be [B, H, hd] and the cache [B, S, KV, hd]; got {q_shape} and {cache_shape}"
    b, h, hd = q_shape
    bc, s, kvh, hdc = cache_shape
    if b != bc or hd != hdc:
        return f"q {q_shape} and the cache {cache_shape} disagree on batch or head_dim"
    if kvh < 1 or h % kvh:
        return f"{h} query heads are not a multiple of {kvh} key/value heads"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (the tensor-core dots take bfloat16 / float16)"
    if not _pow2(hd) or hd < 16:
        return f"head_dim={hd} (a power of two >= 16 is needed)"
    if s % 16:
        return f"{s} cache slots (a multiple of 16 is needed)"
    if h // kvh > 128:
        return f"{h // kvh} query heads per key/value head (at most 128)"
    return None


def default_config(b: int, kvh: int, s: int, num_sms: int | None = None, *,
                   splits: int | None = None) -> DecodeAttentionConfig:
    """Tiles for ``b`` rows, ``kvh`` key/value heads and ``s`` cache slots: 64-slot steps (the
    largest power of two <= 64 dividing ``s``; 32 with many programs, below), and the slots split
    until there are about two programs per SM, each with at least 4 steps (short caches are not
    split: a split costs an XLA combine). With fewer programs than SMs (batch 1 of a 7B model: 32) each program's chain of
    dependent loads is the cost, so the steps take 128 slots where a split's range allows it (half
    the loop iterations over the same slots): in the 7B step at batch 1 on the H100 the kernel
    took 6.6 against 8.2 us per layer and the step 2.10 against 2.15 ms (benchmarks/RESULTS.md,
    session 23; H200 alone, session 12: 4.96 against 5.63 us at slot 128 of 256). At batch 16 (512
    programs) 128-slot steps were slower (3.02 against 2.98 ms); with at least two programs per SM
    and no split, the steps take 32 slots: in the 7B step at batch 16 (context 128-148) the H100
    took 2.62 against 2.74 ms per step (bf16 5.84 against 5.93), and alone, at slot 128 / 255 of
    256, 14.8 / 25.7 against 15.4 / 25.9 us (benchmarks/RESULTS.md, session 25).
    ``splits`` forces the split count (it must divide the 64-slot steps); the 128-slot rule then
    applies to it as to a chosen one."""
    bs = 64
    while s % bs:
        bs //= 2
    steps = s // bs
    if num_sms is None:
        num_sms = _num_sms()
    if splits is not None:
        if splits < 1 or steps % splits:
            raise ValueError(f"default_config: splits={splits} must divide the {steps} steps of {bs} slots of a "
                             f"{s}-slot cache.")
    else:
        splits = 1
        for d in range(1, steps + 1):
            if steps % d or steps // d < 4:
                continue
            splits = d
            if b * kvh * d >= 2 * num_sms:
                break
    if bs == 64 and b * kvh * splits < num_sms and (s // splits) % 128 == 0:
        bs = 128
    elif bs == 64 and splits == 1 and b * kvh >= 2 * num_sms:
        bs = 32
    return DecodeAttentionConfig(block_s=bs, splits=splits)


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        return int(getattr(dev, "core_count", 0) or 132)
    except Exception:  # pragma: no cover - no backend
        return 132


def _validate(q, k_cache, v_cache, k_valid, cfg: DecodeAttentionConfig) -> None:
    why = supported(tuple(q.shape), tuple(k_cache.shape), q.dtype)
    if why:
        raise ValueError(f"decode_attention: unsupported input: {why}.")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {v_cache.shape} must match k_cache {k_cache.shape}.")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: the cache ({k_cache.dtype}, {v_cache.dtype}) must be in q's dtype "
                         f"{q.dtype}.")
    b, s = k_cache.shape[:2]
    if tuple(k_valid.shape) != (b, s):
        raise ValueError(f"decode_attention: k_valid must be [B, S] = {(b, s)}; got {tuple(k_valid.shape)}.")
    bs, sp = cfg.block_s, cfg.splits
    if not _pow2(bs) or bs < 16:
        raise ValueError(f"block_s={bs} must be a power of two >= 16.")
    if sp < 1 or s % (bs * sp):
        raise ValueError(f"splits={sp} x block_s={bs} must divide the {s} cache slots.")
    if cfg.num_warps < 1 or cfg.num_stages < 1:
        raise ValueError(f"num_warps={cfg.num_warps} and num_stages={cfg.num_stages} must be >= 1.")
    if cfg.combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}; got {cfg.combine!r}.")


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_valid: jax.Array,
                     index: jax.Array | int, *, config: DecodeAttentionConfig | None = None,
                     interpret: bool = False) -> jax.Array:
    """Attention of one new token per row over a KV cache.

    Args:
      q: ``[B, H, hd]`` bfloat16 / float16, the new token's queries (RoPE applied).
      k_cache, v_cache: ``[B, S, KV, hd]`` in q's dtype, already holding the new token at ``index``.
      k_valid: ``[B, S]`` bool (or int): slots that hold a real token.
      index: int32 scalar, the new token's slot: slots after it are not attended to.
      config: tiles; default :func:`default_config`.
      interpret: run through the Pallas interpreter (CPU tests).
    Returns:
      ``[B, H, hd]`` in q's dtype; zeros for a row with no allowed slot.
    """
    b, s, kvh, _ = k_cache.shape
    cfg = config or default_config(b, kvh, s)
    _validate(q, k_cache, v_cache, k_valid, cfg)
    if cfg.combine != "xla" and cfg.splits > 1:
        raise ValueError(f"decode_attention: combine={cfg.combine!r} is built for decode_attention_update only; "
                         "use combine='xla' here.")
    return _forward(q, k_cache, v_cache, k_valid, jnp.asarray(index, jnp.int32), cfg, interpret)


def _kernel(idx_ref, q_ref, k_ref, v_ref, valid_ref, *out_refs, block_s: int, split_len: int, scale: float,
            normalize: bool):
    o_ref = out_refs[0]
    j = pl.program_id(2)
    index = idx_ref[0]
    lo = j * split_len
    hi = jnp.minimum(lo + split_len, index + 1)  # slots after the query's own are never allowed
    n_steps = jnp.maximum(hi - lo + block_s - 1, 0) // block_s
    q = q_ref[...]  # [Gp, hd]
    gp, hd = q.shape

    def body(i, carry):
        o, m, l = carry
        start = pl.multiple_of(i * block_s, block_s)  # within this split's slots (the refs' blocks)
        k = k_ref[pl.ds(start, block_s), :]  # [bs, hd]
        v = v_ref[pl.ds(start, block_s), :]
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [Gp, bs] = q k^T, fp32
        pos = lo + start + jnp.arange(block_s, dtype=jnp.int32)  # cache slots
        ok = (valid_ref[pl.ds(start, block_s)] != 0) & (pos <= index)
        sc = jnp.where(ok[None, :], sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        m_base = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no allowed slot yet: keep exp() finite
        corr = jnp.exp(m - m_base)
        p = jnp.exp(sc - m_base[:, None])
        l = corr * l + jnp.sum(p, axis=1)
        o = corr[:, None] * o + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                    preferred_element_type=jnp.float32)
        return o, m_new, l

    init = (jnp.zeros((gp, hd), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, n_steps, body, init)
    if normalize:
        o_ref[...] = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    else:
        m_out, l_out = out_refs[1:]
        o_ref[...] = o
        m_out[...] = m
        l_out[...] = l


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _forward(q, k_cache, v_cache, k_valid, index, cfg: DecodeAttentionConfig, interpret: bool):
    b, h, hd = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    gp = max(16, 1 << (g - 1).bit_length())
    qg = q.reshape(b, kvh, g, hd)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    sp = cfg.splits
    split_len = s // sp
    valid = k_valid.astype(jnp.int32)
    idx = jnp.reshape(index, (1,))
    in_specs = [
        pl.BlockSpec((1,), lambda i, n, j: (0,)),
        pl.BlockSpec((None, None, gp, hd), lambda i, n, j: (i, n, 0, 0)),
        pl.BlockSpec((None, split_len, None, hd), lambda i, n, j: (i, j, n, 0)),
        pl.BlockSpec((None, split_len, None, hd), lambda i, n, j: (i, j, n, 0)),
        pl.BlockSpec((None, split_len), lambda i, n, j: (i, j)),
    ]
    normalize = sp == 1
    if normalize:
        out_shape = jax.ShapeDtypeStruct((b, kvh, gp, hd), q.dtype)
        out_specs = pl.BlockSpec((None, None, gp, hd), lambda i, n, j: (i, n, 0, 0))
    else:
        out_shape, out_specs = _split_outputs(b, kvh, sp, gp, hd)
    kernel = functools.partial(_kernel, block_s=cfg.block_s, split_len=split_len, scale=1.0 / math.sqrt(hd),
                               normalize=normalize)
    out = _pallas_call(kernel, cfg, interpret, "decode_attention", out_shape=out_shape, grid=(b, kvh, sp),
                       in_specs=in_specs, out_specs=out_specs)(idx, qg, k_cache, v_cache, valid)
    if normalize:
        o = out[:, :, :g]
    else:
        o = _combine(*out, g, q.dtype)
    return o.reshape(b, h, hd)


# ---------------------------------------------------------------------------------------------
# the fused decode step: RoPE, the cache write and the attention in one kernel
# ---------------------------------------------------------------------------------------------
def supported_update(qkv_shape: tuple[int, ...], cache_shape: tuple[int, ...], dtype) -> str | None:
    """Why :func:`decode_attention_update` cannot take these shapes / dtype (``None`` when it can).

    ``qkv_shape`` is ``[B, H + 2 KV, hd]``, ``cache_shape`` ``[B, S, KV, hd]``."""
    if len(qkv_shape) != 3 or len(cache_shape) != 4:
        return f"qkv must be [B, H + 2 KV, hd] and the cache [B, S, KV, hd]; got {qkv_shape} and {cache_shape}"
    b, rows, hd = qkv_shape
    kvh = cache_shape[2]
    h = rows - 2 * kvh
    if h < 1:
        return f"{rows} qkv rows leave no query heads next to 2 x {kvh} key/value heads"
    why = supported((b, h, hd), cache_shape, dtype)
    if why is None and hd < 32:
        why = f"head_dim={hd} (the fused kernel's RoPE halves need head_dim >= 32)"
    return why


def decode_attention_update(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_valid: jax.Array,
                            index: jax.Array | int, cos: jax.Array, sin: jax.Array, *,
                            config: DecodeAttentionConfig | None = None, counter: jax.Array | None = None,
                            interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention with RoPE and the KV-cache write fused in.

    The new token's projections arrive as they leave the (fused) qkv matmul: rows ``0..H-1`` of
    ``qkv`` are its query heads, ``H..H+KV-1`` its keys, the last ``KV`` its values, all before RoPE;
    or as that matmul's split-K partials (``[P, B, H + 2 KV, hd]``, fp32), which the kernel adds and
    rounds to the compute dtype itself (no separate XLA sum).
    The kernel rotates q and k (rotate-half RoPE, each product and sum rounded to the compute
    dtype as :func:`jgptq.models.llama._rope` does), writes the rotated key and the value at slot
    ``index`` of the caches *in place* (the caches are aliased to the outputs: under ``jit`` with
    the caches donated, or inside a decode loop, nothing is copied) and attends over the cache
    with the new slot included, as :func:`decode_attention` does.

    Args:
      qkv: ``[B, H + 2 KV, hd]`` in the cache's dtype, or ``[P, B, H + 2 KV, hd]`` addends (float32
        or the cache's dtype) whose sum, rounded to the cache's dtype, is that.
      k_cache, v_cache: ``[B, S, KV, hd]`` bfloat16 / float16 (the compute dtype); slot ``index`` is
        overwritten.
      k_valid: ``[B, S]`` bool (or int): slots that hold a real token, the new one included.
      index: int32 scalar, the new token's slot.
      cos, sin: ``[B, hd / 2]`` in the cache's dtype, ``cos/sin(position * inv_freq)`` of each row's token.
      config: tiles; default :func:`default_config`.
      counter: with ``config.combine == "kernel"`` and several splits, ``[B, KV]`` zeros (int32, or
        float32 zeros such as an add + RMSNorm kernel writes: the same bits) that the kernel counts
        finished splits in; the kernel leaves them at zero. None: made here (one more XLA op).
        Ignored otherwise.
      interpret: run through the Pallas interpreter (CPU tests).
    Returns:
      ``(o [B, H, hd], k_cache, v_cache)``; ``o`` is zeros for a row with no allowed slot.
    """
    b, s, kvh, hd = k_cache.shape
    if qkv.ndim not in (3, 4):
        raise ValueError(f"decode_attention_update: qkv must be [B, H + 2 KV, hd] or [P, B, H + 2 KV, hd]; got "
                         f"shape {tuple(qkv.shape)}.")
    dt = k_cache.dtype
    why = supported_update(tuple(qkv.shape[-3:]), tuple(k_cache.shape), dt)
    if why:
        raise ValueError(f"decode_attention_update: unsupported input: {why}.")
    if qkv.ndim == 3 and qkv.dtype != dt:
        raise ValueError(f"decode_attention_update: qkv ({qkv.dtype}) must be in the cache's dtype {dt}.")
    if qkv.ndim == 4 and (qkv.dtype not in (dt, jnp.dtype(jnp.float32)) or qkv.shape[0] < 1):
        raise ValueError(f"decode_attention_update: qkv addends {tuple(qkv.shape)} {qkv.dtype} must be float32 or "
                         f"the cache's dtype {dt}, at least one of them.")
    if tuple(cos.shape) != (b, hd // 2) or tuple(sin.shape) != (b, hd // 2):
        raise ValueError(f"decode_attention_update: cos and sin must be [B, hd/2] = {(b, hd // 2)}; got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}.")
    if cos.dtype != dt or sin.dtype != dt:
        raise ValueError(f"decode_attention_update: cos / sin ({cos.dtype}, {sin.dtype}) must be in the cache's "
                         f"dtype {dt}.")
    h = qkv.shape[-2] - 2 * kvh
    cfg = config or default_config(b, kvh, s)
    _validate(jax.ShapeDtypeStruct((b, h, hd), dt), k_cache, v_cache, k_valid, cfg)
    if counter is not None and cfg.splits > 1 and cfg.combine == "kernel":
        if tuple(counter.shape) != (b, kvh) or counter.dtype not in (jnp.dtype(jnp.int32), jnp.dtype(jnp.float32)):
            raise ValueError(f"decode_attention_update: counter must be [B, KV] = {(b, kvh)} int32 / float32 zeros; "
                             f"got {tuple(counter.shape)} {counter.dtype}.")
    else:
        counter = None
    return _forward_update(qkv, k_cache, v_cache, k_valid, jnp.asarray(index, jnp.int32), cos, sin, counter, cfg,
                           interpret)


def _rotate(x1, x2, c, s, dt):
    """Rotate-half RoPE on the two halves, every product and sum rounded to ``dt``."""
    f32 = jnp.float32

    def mul(a, b):
        return (a.astype(f32) * b.astype(f32)).astype(dt)

    r1 = (mul(x1, c).astype(f32) - mul(x2, s).astype(f32)).astype(dt)
    r2 = (mul(x2, c).astype(f32) + mul(x1, s).astype(f32)).astype(dt)
    return r1, r2


def _update_kernel(idx_ref, qkv_ref, cos_ref, sin_ref, k_ref, v_ref, valid_ref, *out_refs, h: int, g: int,
                   gp: int, n_parts: int, block_s: int, split_len: int, scale: float, normalize: bool,
                   n_split: int = 0, interpret: bool = False):
    from jax.experimental.pallas import triton as plt

    if n_split:  # combine in the kernel: the counter's input ref (aliased to its output) comes first
        out_refs = out_refs[1:]
    *o_refs, k_out, v_out = out_refs
    n = pl.program_id(1)
    j = pl.program_id(2)
    kvh = (qkv_ref.shape[-2] - h) // 2
    hd = qkv_ref.shape[-1]
    half = hd // 2
    dt = k_ref.dtype
    index = idx_ref[0]
    lo = j * split_len
    c = cos_ref[...]
    s = sin_ref[...]
    # the G query heads of key/value head n (rows n*G ..), padded to Gp rows by masked loads
    rmask = (jnp.arange(gp) < g)[:, None]  # [Gp, 1]
    if n_parts:  # the q/k/v matmul's split-K partials [P, rows, hd]: add them here, round once
        pp = 1 << (n_parts - 1).bit_length()
        pmask = jnp.arange(pp) < n_parts

        def rows(r0, cols):
            m3 = pmask[:, None, None] & rmask[None, :, :]
            x = plt.load(qkv_ref.at[pl.ds(0, pp), pl.ds(r0, gp), cols],
                         mask=jnp.broadcast_to(m3, (pp, gp, cols.size)), other=0)
            return jnp.sum(x.astype(jnp.float32), axis=0).astype(dt)

        def row(r, cols):
            x = plt.load(qkv_ref.at[pl.ds(0, pp), r, cols], mask=jnp.broadcast_to(pmask[:, None], (pp, cols.size)),
                         other=0)
            return jnp.sum(x.astype(jnp.float32), axis=0).astype(dt)
    else:
        def rows(r0, cols):
            return plt.load(qkv_ref.at[pl.ds(r0, gp), cols], mask=jnp.broadcast_to(rmask, (gp, cols.size)),
                            other=0)

        def row(r, cols):
            return qkv_ref[r, cols]

    lo_half, hi_half = pl.ds(0, half), pl.ds(half, half)
    q1, q2 = _rotate(rows(n * g, lo_half), rows(n * g, hi_half), c[None, :], s[None, :], dt)
    k1, k2 = _rotate(row(h + n, lo_half), row(h + n, hi_half), c, s, dt)
    vn = row(h + kvh + n, pl.ds(0, hd))

    here = (index >= lo) & (index < lo + split_len)  # this split holds the new slot

    @pl.when(here)
    def _write():
        k_out[index - lo, pl.ds(0, half)] = k1
        k_out[index - lo, pl.ds(half, half)] = k2
        v_out[index - lo, :] = vn

    # The new slot's score comes from registers and seeds the online softmax; the loop covers the
    # slots before it, reading the cache straight into the dots (slot ``index`` itself, being
    # written, is never read there). A step whose row is padding (invalid slot) adds nothing.
    f32 = jnp.float32
    new_ok = here & (valid_ref[jnp.clip(index - lo, 0, split_len - 1)] != 0)
    s_new = (jnp.sum(q1.astype(f32) * k1.astype(f32)[None, :], axis=1)
             + jnp.sum(q2.astype(f32) * k2.astype(f32)[None, :], axis=1)) * scale  # [Gp]
    m0 = jnp.where(new_ok, s_new, -jnp.inf)
    l0 = jnp.where(new_ok, jnp.ones((gp,), f32), 0.0)
    o0 = jnp.where(new_ok, jnp.broadcast_to(vn.astype(f32)[None, :], (gp, hd)), 0.0)
    hi = jnp.minimum(lo + split_len, index)
    n_steps = jnp.maximum(hi - lo + block_s - 1, 0) // block_s

    def body(i, carry):
        o, m, l = carry
        start = pl.multiple_of(i * block_s, block_s)
        pos = lo + start + jnp.arange(block_s, dtype=jnp.int32)
        dims = (((1,), (1,)), ((), ()))
        sc = (jax.lax.dot_general(q1, k_ref[pl.ds(start, block_s), pl.ds(0, half)], dims, preferred_element_type=f32)
              + jax.lax.dot_general(q2, k_ref[pl.ds(start, block_s), pl.ds(half, half)], dims,
                                    preferred_element_type=f32)) * scale
        ok = (valid_ref[pl.ds(start, block_s)] != 0) & (pos < index)
        sc = jnp.where(ok[None, :], sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        m_base = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        corr = jnp.exp(m - m_base)
        p = jnp.exp(sc - m_base[:, None])
        l = corr * l + jnp.sum(p, axis=1)
        o = corr[:, None] * o + jax.lax.dot_general(p.astype(dt), v_ref[pl.ds(start, block_s), :],
                                                    (((1,), (0,)), ((), ())), preferred_element_type=f32)
        return o, m_new, l

    o, m, l = jax.lax.fori_loop(0, n_steps, body, (o0, m0, l0))
    if normalize:  # straight into [H, hd]: rows n*G .. n*G+G-1 (masked store of the Gp-row tile)
        o = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0).astype(dt)
        plt.store(o_refs[0].at[pl.ds(n * g, gp), :], o, mask=jnp.broadcast_to((jnp.arange(gp) < g)[:, None],
                                                                             (gp, hd)))
    elif not n_split:
        o_refs[0][...] = o
        o_refs[1][...] = m
        o_refs[2][...] = l
    else:
        _combine_last(o, m, l, *o_refs, n=n, j=j, g=g, gp=gp, n_split=n_split, interpret=interpret)


def _combine_last(o, m, l, o_ref, o_p, m_p, l_p, cnt, *, n, j, g: int, gp: int, n_split: int, interpret: bool):
    """The in-kernel split combine (``combine="kernel"``). Every program stores its fp32 partial
    ``(o, max, sum)`` in slot ``j`` of its row and head, then (all its threads past a barrier)
    increments the head's counter (an acquire-release atomic at GPU scope). The program that
    takes the counter to ``n_split`` is the last: it reads every slot (volatile loads, so nothing
    stale comes from L1), rescales to the overall max as :func:`_combine` does, writes the
    normalised rows ``n*G .. n*G+G-1`` of ``o`` and sets the counter back to 0 for the next call."""
    from jax.experimental.pallas import triton as plt

    f32 = jnp.float32
    o_p[j] = o
    m_p[j] = m
    l_p[j] = l
    if not interpret:  # the interpreter runs the programs one after another
        plt.debug_barrier()
    done = plt.atomic_add(cnt, (jnp.int32(0),), jnp.int32(1))

    @pl.when(done == n_split - 1)
    def _last():
        ms = [plt.load(m_p.at[jnp.int32(i)], volatile=True) for i in range(n_split)]
        m_all = functools.reduce(jnp.maximum, ms)
        m_base = jnp.where(m_all == -jnp.inf, 0.0, m_all)
        o_sum = jnp.zeros((gp, o.shape[-1]), f32)
        l_sum = jnp.zeros((gp,), f32)
        for i in range(n_split):
            w = jnp.exp(ms[i] - m_base)  # 0 for a split with no allowed slot
            l_sum = l_sum + w * plt.load(l_p.at[jnp.int32(i)], volatile=True)
            o_sum = o_sum + w[:, None] * plt.load(o_p.at[jnp.int32(i)], volatile=True)
        out = jnp.where(l_sum[:, None] > 0, o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[:, None], 0.0)
        plt.store(o_ref.at[pl.ds(n * g, gp), :], out.astype(o_ref.dtype),
                  mask=jnp.broadcast_to((jnp.arange(gp) < g)[:, None], (gp, o.shape[-1])))
        cnt[0] = jnp.int32(0)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _forward_update(qkv, k_cache, v_cache, k_valid, index, cos, sin, counter, cfg: DecodeAttentionConfig,
                    interpret: bool):
    n_parts = qkv.shape[0] if qkv.ndim == 4 else 0
    b, rows, hd = qkv.shape[-3:]
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    h = rows - 2 * kvh
    g = h // kvh
    gp = max(16, 1 << (g - 1).bit_length())
    sp = cfg.splits
    split_len = s // sp
    valid = k_valid.astype(jnp.int32)
    idx = jnp.reshape(index, (1,))
    cache_spec = pl.BlockSpec((None, split_len, None, hd), lambda i, n, j: (i, j, n, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda i, n, j: (0,)),
        (pl.BlockSpec((n_parts, None, rows, hd), lambda i, n, j: (0, i, 0, 0)) if n_parts else
         pl.BlockSpec((None, rows, hd), lambda i, n, j: (i, 0, 0))),
        pl.BlockSpec((None, hd // 2), lambda i, n, j: (i, 0)),
        pl.BlockSpec((None, hd // 2), lambda i, n, j: (i, 0)),
        cache_spec,
        cache_spec,
        pl.BlockSpec((None, split_len), lambda i, n, j: (i, j)),
    ]
    normalize = sp == 1
    in_kernel = sp > 1 and cfg.combine == "kernel"
    cache_shapes = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                    jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    o_shapes = (jax.ShapeDtypeStruct((b, h, hd), k_cache.dtype),)
    o_specs = (pl.BlockSpec((None, h, hd), lambda i, n, j: (i, 0, 0)),)
    args = [idx, qkv, cos, sin, k_cache, v_cache, valid]
    aliases = {}
    if in_kernel:  # o, then every split's partials of the program's row and head, then the counters
        if counter is None:
            counter = jnp.zeros((b, kvh), jnp.int32)
        elif counter.dtype != jnp.int32:  # float32 zeros (a norm kernel's): the same bits
            counter = jax.lax.bitcast_convert_type(counter, jnp.int32)
        o_shapes += (jax.ShapeDtypeStruct((b, kvh, sp, gp, hd), jnp.float32),
                     jax.ShapeDtypeStruct((b, kvh, sp, gp), jnp.float32),
                     jax.ShapeDtypeStruct((b, kvh, sp, gp), jnp.float32),
                     jax.ShapeDtypeStruct((b, kvh, 1), jnp.int32))
        cnt_spec = pl.BlockSpec((None, None, 1), lambda i, n, j: (i, n, 0))
        o_specs += (pl.BlockSpec((None, None, sp, gp, hd), lambda i, n, j: (i, n, 0, 0, 0)),
                    pl.BlockSpec((None, None, sp, gp), lambda i, n, j: (i, n, 0, 0)),
                    pl.BlockSpec((None, None, sp, gp), lambda i, n, j: (i, n, 0, 0)),
                    cnt_spec)
        in_specs = [*in_specs, cnt_spec]
        args.append(counter.reshape(b, kvh, 1))
        aliases[len(args) - 1] = len(o_shapes) - 1
    elif not normalize:
        o_shapes, o_specs = _split_outputs(b, kvh, sp, gp, hd)
    n_o = len(o_shapes)
    aliases.update({4: n_o, 5: n_o + 1})
    kernel = functools.partial(_update_kernel, h=h, g=g, gp=gp, n_parts=n_parts, block_s=cfg.block_s,
                               split_len=split_len, scale=1.0 / math.sqrt(hd), normalize=normalize,
                               n_split=sp if in_kernel else 0, interpret=interpret)
    out = _pallas_call(kernel, cfg, interpret, "decode_attention_update", out_shape=(*o_shapes, *cache_shapes),
                       grid=(b, kvh, sp), in_specs=in_specs, out_specs=(*o_specs, cache_spec, cache_spec),
                       input_output_aliases=aliases)(*args)
    *o_out, k_new, v_new = out
    if normalize or in_kernel:
        return o_out[0], k_new, v_new
    return _combine(*o_out, g, k_cache.dtype).reshape(b, h, hd), k_new, v_new


def _split_outputs(b: int, kvh: int, sp: int, gp: int, hd: int):
    """Shapes and specs of the fp32 per-split partials ``(o, max, sum)`` over grid ``(B, KV, splits)``."""
    shapes = (jax.ShapeDtypeStruct((b, kvh, sp, gp, hd), jnp.float32),
              jax.ShapeDtypeStruct((b, kvh, sp, gp), jnp.float32),
              jax.ShapeDtypeStruct((b, kvh, sp, gp), jnp.float32))
    specs = (pl.BlockSpec((None, None, None, gp, hd), lambda i, n, j: (i, n, j, 0, 0)),
             pl.BlockSpec((None, None, None, gp), lambda i, n, j: (i, n, j, 0)),
             pl.BlockSpec((None, None, None, gp), lambda i, n, j: (i, n, j, 0)))
    return shapes, specs


def _pallas_call(kernel, cfg: DecodeAttentionConfig, interpret: bool, name: str, **kw):
    """``pl.pallas_call`` with the config's Triton launch parameters (none in the interpreter)."""
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        kw["compiler_params"] = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    call = pl.pallas_call(kernel, interpret=interpret, name=name, **kw)

    def run(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the Triton lowering is deprecated upstream
            return call(*args)

    return run


def _combine(o_p, m_p, l_p, g: int, dtype):
    """Splits' fp32 partials ``(o, max, sum)`` ``[B, KV, splits, Gp, ...]`` -> ``[B, KV, G, hd]``: each
    rescaled to the overall max, added, divided by the total sum."""
    m = jnp.max(m_p, axis=2, keepdims=True)
    w = jnp.where(m_p == -jnp.inf, 0.0, jnp.exp(m_p - jnp.where(m == -jnp.inf, 0.0, m)))
    l_tot = jnp.sum(w * l_p, axis=2)
    o_sum = jnp.sum(w[..., None] * o_p, axis=2)
    o = jnp.where(l_tot[..., None] > 0, o_sum / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
    return o[:, :, :g].astype(dtype)


def reference_update(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_valid: jax.Array,
                     index: jax.Array | int, cos: jax.Array, sin: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain-jnp :func:`decode_attention_update`: RoPE (rounded as the kernel does), the cache write
    with ``dynamic_update_slice``, then :func:`reference`."""
    kvh, hd = k_cache.shape[2], k_cache.shape[3]
    if qkv.ndim == 4:
        qkv = jnp.sum(qkv.astype(jnp.float32), axis=0).astype(k_cache.dtype)
    h = qkv.shape[1] - 2 * kvh
    half = hd // 2
    c, s = cos[:, None, :], sin[:, None, :]
    q1, q2 = _rotate(qkv[:, :h, :half], qkv[:, :h, half:], c, s, qkv.dtype)
    k1, k2 = _rotate(qkv[:, h:h + kvh, :half], qkv[:, h:h + kvh, half:], c, s, qkv.dtype)
    q = jnp.concatenate([q1, q2], axis=-1)
    k = jnp.concatenate([k1, k2], axis=-1)
    idx = jnp.asarray(index, jnp.int32)
    kc = jax.lax.dynamic_update_slice(k_cache, k[:, None].astype(k_cache.dtype), (0, idx, 0, 0))
    vc = jax.lax.dynamic_update_slice(v_cache, qkv[:, None, h + kvh:].astype(v_cache.dtype), (0, idx, 0, 0))
    return reference(q, kc, vc, k_valid, idx), kc, vc


def reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_valid: jax.Array,
              index: jax.Array | int) -> jax.Array:
    """Plain-jnp fp32 decode attention with the same semantics (zeros where no slot is allowed)."""
    b, h, hd = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    qf = q.astype(jnp.float32).reshape(b, kvh, g, hd)
    sc = jnp.einsum("bkgd,bskd->bkgs", qf, k_cache.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST) / math.sqrt(hd)
    allowed = jnp.asarray(k_valid).astype(bool) & (jnp.arange(s)[None, :] <= jnp.asarray(index))
    sc = jnp.where(allowed[:, None, None, :], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    p = jnp.where(allowed[:, None, None, :], jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgs,bskd->bkgd", p, v_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(b, h, hd).astype(q.dtype)


def main() -> None:  # pragma: no cover - benchmark
    """Device-timed decode attention vs the XLA einsum attention of jgptq.models (Llama-2-7B heads)."""
    import time

    interpret = jax.default_backend() != "gpu"
    dt = jnp.bfloat16

    def xla_attention(q, kc, vc, valid, index):
        b, h, hd = q.shape
        kvh = kc.shape[2]
        qg = q.reshape(b, 1, kvh, h // kvh, hd)
        sc = jnp.einsum("btkgd,bskd->bkgts", qg, kc, preferred_element_type=jnp.float32) / math.sqrt(hd)
        allowed = valid & (jnp.arange(kc.shape[1])[None, :] <= index)
        sc = jnp.where(allowed[:, None, None, None, :], sc, -1e30)
        p = jax.nn.softmax(sc, axis=-1).astype(vc.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", p, vc).reshape(b, h, hd)

    shapes = [(1, 32, 32, 128, 256), (16, 32, 32, 128, 256), (1, 32, 32, 128, 4096), (16, 32, 8, 128, 4096)]
    if interpret:
        shapes = [(2, 4, 2, 64, 64)]
    rows = []
    for b, h, kvh, hd, s in shapes:
        key = jax.random.key(0)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (b, h, hd), dt)
        kc = jax.random.normal(kk, (b, s, kvh, hd), dt)
        vc = jax.random.normal(kv, (b, s, kvh, hd), dt)
        valid = jnp.ones((b, s), bool)
        for index in (s // 2, s - 1):
            fns = {"xla": jax.jit(xla_attention),
                   "pallas": jax.jit(functools.partial(decode_attention, interpret=interpret))}
            ref = reference(q, kc, vc, valid, index)
            for name, f in fns.items():
                out = f(q, kc, vc, valid, index)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                n = 3 if interpret else 200
                jax.block_until_ready(f(q, kc, vc, valid, index))
                t0 = time.perf_counter()
                for _ in range(n):
                    out = f(q, kc, vc, valid, index)
                jax.block_until_ready(out)
                us = (time.perf_counter() - t0) / n * 1e6
                rows.append((b, h, kvh, hd, s, index, name, us, err))
                print(f"B={b:3d} H={h} KV={kvh} hd={hd} S={s:5d} index={index:5d} {name:>6}: {us:8.1f} us "
                      f"(host loop) max err {err:.2e}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
