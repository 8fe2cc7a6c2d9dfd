"""Blocked lazy-batch GPTQ (Frantar et al. 2022) and round-to-nearest, under ``jax.jit``.

Layout: ``w`` is a Flax kernel ``[in, out]``; a "column" of the paper / reference (an input channel
of the PyTorch ``[out, in]`` weight) is a *row* of ``w`` here. Everything below is elementwise
across output channels, so concatenating several weights that share one Hessian along ``out``
(q/k/v, gate/up) and quantizing once gives exactly the per-weight results (:func:`gptq_shared`).

Algorithm (``shared/reference/gptq.md`` §2.3, IST-DASLab ``fasterquant``), for ``H [in, in]``:

1. ``group_size == -1``: one grid per output channel from the whole ``w`` (before dead rows are
   zeroed, as in the reference).
2. Dead inputs (``H[i, i] == 0``): ``H[i, i] = 1``, ``w[i] = 0``.
3. ``static_groups``: every group's grid from the dead-zeroed ``w``, before any update.
4. ``desc_act``: process inputs by decreasing ``diag(H)``; the sort is **stable** (ties keep input
   order; torch's unstable argsort may order ties differently).
5. ``H += damp * mean(diag H) * I``; ``U`` = upper Cholesky factor of ``H^-1`` (damping raised step
   by step if the factorisation fails, see :mod:`jgptq.linalg`).
6. Blocks of ``block_size`` rows: each row is quantized on its group's grid, its error
   ``(w - q) / U[i, i]`` is fed back into the later rows of the block, and after the block the
   rows below receive the block's errors in one matmul (lazy batch update).
   Dynamic groups take their grid, as in the reference, from the *outer* weight when the group's
   first row is reached: it has all previous blocks' updates but none of the current block's
   (exact when groups start at block starts; stale for groups starting mid-block).
7. Codes are un-permuted to input order; ``g_idx = invperm // group_size`` for act-order with
   dynamic groups, ``k // group_size`` otherwise.

Scales are float16-rounded inside the loop (:mod:`jgptq.quantizer`), and the integer codes come
straight out of the loop, so the checkpoint holds exactly the weights the error feedback assumed.

Implementation: one ``lax.fori_loop`` over blocks (static shapes: one compilation per layer shape
and structural config; ``bits``, ``sym`` and ``desc_act`` are runtime values, so they share it).
Inside a block each row is computed *left-looking* (``w_i = w_i^0 - U[:i, i]^T Err[:i]``), either
by a ``lax.fori_loop`` of vector ops (``impl="xla"``, everywhere) or by one Pallas kernel per block
(``impl="pallas"``, GPU default) in which each program carries a tile of output channels through
all ``block_size`` steps in registers. The trailing update is one ``[in, block] x [block, out]``
matmul at HIGHEST precision over all rows (earlier blocks receive exact zeros from the upper
triangular ``U`` and the current block is already quantized; this keeps shapes static at the cost
of 2x the reference's trailing flops).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jgptq import linalg
from jgptq.config import GPTQConfig
from jgptq.quantized import QuantizedWeight
from jgptq.quantizer import GridParams, codes_for_maxq, find_params_maxq

HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# validation

def _is_tracer(*xs: object) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_inputs(w: jax.Array, h: jax.Array | None, config: GPTQConfig, name: str | None, *,
                  values: bool = True) -> None:
    """Shapes, dtypes and config always; with ``values`` and concrete arrays also NaN/Inf and an
    empty Hessian (device syncs; drivers that check flags themselves pass ``values=False``)."""
    where = f"layer {name!r}: " if name else ""
    if not isinstance(config, GPTQConfig):
        raise TypeError(f"{where}config must be a jgptq.GPTQConfig, got {type(config).__name__}")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"{where}w must be a Flax kernel [in_features, out_features], got shape "
                         f"{tuple(getattr(w, 'shape', ()))}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{where}w must be floating point, got dtype {w.dtype}")
    n_in, n_out = w.shape
    if n_in == 0 or n_out == 0:
        raise ValueError(f"{where}w must be non-empty, got shape {tuple(w.shape)}")
    if config.group_size != -1 and config.group_size > n_in:
        raise ValueError(f"{where}group_size {config.group_size} is larger than in_features "
                         f"{n_in}; use group_size=-1 (per output channel) or a size <= {n_in}")
    if h is not None:
        if getattr(h, "ndim", None) != 2 or tuple(h.shape) != (n_in, n_in):
            raise ValueError(f"{where}h must be the Hessian [in_features, in_features] = "
                             f"{(n_in, n_in)} for w of shape {tuple(w.shape)}, got "
                             f"{tuple(getattr(h, 'shape', ()))}")
        if not jnp.issubdtype(h.dtype, jnp.floating):
            raise ValueError(f"{where}h must be floating point, got dtype {h.dtype}")
    if values and not _is_tracer(w, h):
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"{where}w {tuple(w.shape)} contains NaN or Inf")
        if h is not None:
            if not bool(jnp.all(jnp.isfinite(h))):
                raise ValueError(f"{where}h {tuple(h.shape)} contains NaN or Inf; check the "
                                 "calibration activations")
            if not bool(jnp.any(jnp.diagonal(h) != 0)):
                raise ValueError(f"{where}h is all zero on the diagonal: no calibration data "
                                 "reached this layer (GPTQ would silently equal RTN)")


# --------------------------------------------------------------------------------------------
# grids

def _group_params(w: jax.Array, gs: int, config: GPTQConfig, maxq, sym) -> GridParams:
    """Grid of each contiguous group of ``gs`` rows of ``w [n, out]`` -> ``[ceil(n/gs), out]``."""
    n, out = w.shape
    g = -(-n // gs)
    wp = jnp.pad(w, ((0, g * gs - n), (0, 0)))
    return jax.vmap(lambda x: _find(x, config, maxq, sym))(wp.reshape(g, gs, out))


def _find(w: jax.Array, config: GPTQConfig, maxq, sym) -> GridParams:
    return find_params_maxq(w, maxq, sym, mse=config.mse, norm=config.mse_norm,
                            grid=config.mse_grid, maxshrink=config.mse_maxshrink)


def _structural(config: GPTQConfig) -> GPTQConfig:
    """The config with the fields that are passed as runtime values (bits, sym, desc_act) and
    the driver-only ones canonicalised, so that one compilation serves all of them."""
    return config.replace(bits=4, sym=True, desc_act=False, true_sequential=True)


def _runtime(config: GPTQConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (jnp.asarray(float(config.maxq), jnp.float32), jnp.asarray(config.sym),
            jnp.asarray(config.desc_act))


def _to_storage(p: GridParams) -> tuple[jax.Array, jax.Array]:
    return p.scale.astype(jnp.float16), p.zero.astype(jnp.uint8)


# --------------------------------------------------------------------------------------------
# the solver

def _solve_impl(w: jax.Array, h: jax.Array, maxq: jax.Array, sym: jax.Array,
                desc_act: jax.Array, config: GPTQConfig, unroll: int, impl: str = "xla"):
    """Jittable GPTQ on arrays; ``maxq``, ``sym``, ``desc_act`` are runtime values (``config``'s
    copies of them are ignored). Returns ``(codes uint8 [in,out], scales f16 [G,out],
    zeros u8 [G,out], g_idx i32 [in], column_loss f32 [out], damp f32 [], ok bool [])``."""
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    n_in, n_out = w.shape
    bs = config.block_size
    per_channel = config.group_size == -1
    gs = n_in if per_channel else config.group_size
    n_groups = -(-n_in // gs)

    global_params = _find(w, config, maxq, sym) if per_channel else None          # step 1
    h, dead = linalg.fix_dead(h)                                         # step 2
    w = jnp.where(dead[:, None], 0.0, w)
    static = config.static_groups and not per_channel
    static_params = _group_params(w, gs, config, maxq, sym) if static else None  # step 3

    perm = jnp.where(desc_act, jnp.argsort(-jnp.diagonal(h), stable=True),   # step 4
                     jnp.arange(n_in))
    w = w[perm]
    h = h[perm][:, perm]
    invperm = jnp.argsort(perm)

    u, damp, ok = linalg.damped_inverse_factor(                          # step 5
        h, config.damp_percent, damp_auto_increment=config.damp_auto_increment,
        damp_max=config.damp_max)
    u = jnp.triu(u)

    # pad to whole blocks; padded rows are zero with an identity factor, so they quantize to their
    # zero point with zero error and never touch real rows
    nb = -(-n_in // bs)
    n_pad = nb * bs
    dynamic = not per_channel and not static
    k_cand = (bs - 1) // gs + 2 if dynamic else 0
    n_big = n_pad + k_cand * gs
    w_big = jnp.pad(w, ((0, n_big - n_in), (0, 0)))
    u_pad = jnp.eye(n_pad, dtype=jnp.float32).at[:n_in, :n_in].set(u)
    ut_pad = u_pad.T                                                     # ut[j, i] = U[i, j]
    if static:
        row_group = jnp.pad(perm // gs, (0, n_pad - n_in))               # group of each row
    g_buf = n_groups + k_cand

    def block(b, carry):
        w_big, codes, scales_buf, zeros_buf, col_loss, cur_scale, cur_zero = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w_big, (i1, 0), (bs, n_out))           # [bs, out], outer W
        u1t = jax.lax.dynamic_slice(ut_pad, (i1, i1), (bs, bs))           # u1t[j, i] = U[i1+i, i1+j]
        d = jnp.diagonal(u1t)

        if per_channel:
            row_scale = jnp.broadcast_to(global_params.scale, (bs, n_out))
            row_zero = jnp.broadcast_to(global_params.zero, (bs, n_out))
        elif static:
            rg = jax.lax.dynamic_slice(row_group, (i1,), (bs,))
            row_scale = static_params.scale[rg]
            row_zero = static_params.zero[rg]
        else:
            g_lo = i1 // gs
            win = jax.lax.dynamic_slice(w_big, (g_lo * gs, 0), (k_cand * gs, n_out))
            cand = jax.vmap(lambda x: _find(x, config, maxq, sym))(
                win.reshape(k_cand, gs, n_out))
            started_before = g_lo * gs < i1
            cand = GridParams(
                cand.scale.at[0].set(jnp.where(started_before, cur_scale, cand.scale[0])),
                cand.zero.at[0].set(jnp.where(started_before, cur_zero, cand.zero[0])))
            rg = (i1 + jnp.arange(bs)) // gs - g_lo
            row_scale = cand.scale[rg]
            row_zero = cand.zero[rg]
            scales_buf = jax.lax.dynamic_update_slice(scales_buf, cand.scale, (g_lo, 0))
            zeros_buf = jax.lax.dynamic_update_slice(zeros_buf, cand.zero, (g_lo, 0))
            cur_scale, cur_zero = row_scale[bs - 1], row_zero[bs - 1]

        if impl != "xla":
            err1, q1 = _block_pallas(w1, u1t.T, row_scale, row_zero, maxq,
                                     interpret=(impl == "pallas_interpret"))
            col_loss = col_loss + 0.5 * jnp.sum(err1 * err1, axis=0)
            codes = jax.lax.dynamic_update_slice(codes, q1, (i1, 0))
            u_rows = jax.lax.dynamic_slice(u_pad, (i1, 0), (bs, n_pad))
            upd = jnp.dot(u_rows.T, err1, precision=HIGHEST)
            w_big = w_big.at[:n_pad].add(-upd)
            return w_big, codes, scales_buf, zeros_buf, col_loss, cur_scale, cur_zero

        def column(i, c):
            err1, q1, loss = c
            # left-looking: row i after the in-block updates of rows < i (err1 rows >= i are 0)
            w_i = w1[i] - jnp.dot(u1t[i], err1, precision=HIGHEST)
            s, z = row_scale[i], row_zero[i]
            q_code = jnp.clip(jnp.round(w_i / s) + z, 0.0, maxq)
            q = s * (q_code - z)
            e = (w_i - q) / d[i]
            err1 = jax.lax.dynamic_update_index_in_dim(err1, e, i, 0)
            q1 = jax.lax.dynamic_update_index_in_dim(q1, q_code.astype(jnp.uint8), i, 0)
            return err1, q1, loss + 0.5 * e * e

        err1, q1, col_loss = jax.lax.fori_loop(
            0, bs, column,
            (jnp.zeros((bs, n_out), jnp.float32), jnp.zeros((bs, n_out), jnp.uint8), col_loss),
            unroll=unroll)
        codes = jax.lax.dynamic_update_slice(codes, q1, (i1, 0))
        # lazy batch update of every later row; U[i1:i2, :i2] only touches rows already done
        u_rows = jax.lax.dynamic_slice(u_pad, (i1, 0), (bs, n_pad))        # [bs, n_pad]
        upd = jnp.dot(u_rows.T, err1, precision=HIGHEST)                   # [n_pad, out]
        w_big = w_big.at[:n_pad].add(-upd)
        return w_big, codes, scales_buf, zeros_buf, col_loss, cur_scale, cur_zero

    init = (w_big, jnp.zeros((n_pad, n_out), jnp.uint8),
            jnp.ones((g_buf, n_out), jnp.float32), jnp.zeros((g_buf, n_out), jnp.float32),
            jnp.zeros((n_out,), jnp.float32), jnp.ones((n_out,), jnp.float32),
            jnp.zeros((n_out,), jnp.float32))
    _, codes, scales_buf, zeros_buf, col_loss, _, _ = jax.lax.fori_loop(0, nb, block, init)

    codes = codes[:n_in][invperm]                                        # step 7
    if per_channel:
        scales, zeros = _to_storage(GridParams(global_params.scale[None], global_params.zero[None]))
        g_idx = jnp.zeros((n_in,), jnp.int32)
    elif static:
        scales, zeros = _to_storage(static_params)
        g_idx = (jnp.arange(n_in) // gs).astype(jnp.int32)
    else:
        scales, zeros = _to_storage(GridParams(scales_buf[:n_groups], zeros_buf[:n_groups]))
        g_idx = (invperm // gs).astype(jnp.int32)
    bad = ~ok
    col_loss = jnp.where(bad, jnp.nan, col_loss)
    return codes, scales, zeros, g_idx, col_loss, damp, ok


_solve = jax.jit(_solve_impl, static_argnames=("config", "unroll", "impl"))


# --------------------------------------------------------------------------------------------
# the in-block column loop as one Pallas kernel (GPU, Triton lowering)

PALLAS_TILE_N = 32


def _rint(x: jax.Array) -> jax.Array:
    """Round half to even (== ``jnp.round``) from floor only; exact for ``|x| < 2^22``."""
    f = jnp.floor(x + 0.5)
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    return jnp.where(((f - x) == 0.5) & odd, f - 1.0, f)


def _block_kernel(w_ref, u_ref, s_ref, z_ref, mq_ref, e_ref, q_ref):
    """One tile of output channels through the ``bs`` sequential steps of a block.

    ``w_ref``/``s_ref``/``z_ref`` ``[bs, tn]`` (block rows, scales, zeros), ``u_ref [bs, bs]`` (the
    block of ``U``), ``mq_ref [1, tn]`` (maxq); writes errors ``e_ref`` and codes ``q_ref``
    ``[bs, tn]``. Left-looking like the XLA loop: ``w_i = w_i^0 - U[:, i]^T E``.
    """
    bs, tn = w_ref.shape
    rows = jax.lax.broadcasted_iota(jnp.int32, (bs, tn), 0)
    mq = mq_ref[...]

    def body(i, e_acc):
        u_col = u_ref[:, pl.ds(i, 1)]                                   # [bs, 1]
        w = w_ref[pl.ds(i, 1), :] - jnp.sum(u_col * e_acc, axis=0)[None, :]
        s = s_ref[pl.ds(i, 1), :]
        z = z_ref[pl.ds(i, 1), :]
        d = u_ref[pl.ds(i, 1), pl.ds(i, 1)]                              # [1, 1]
        code = jnp.minimum(jnp.maximum(_rint(w / s) + z, 0.0), mq)
        e = (w - s * (code - z)) / d
        q_ref[pl.ds(i, 1), :] = code
        return jnp.where(rows == i, e, e_acc)

    e_ref[...] = jax.lax.fori_loop(0, bs, body, jnp.zeros((bs, tn), jnp.float32))


def _block_pallas(w1: jax.Array, u1: jax.Array, row_scale: jax.Array, row_zero: jax.Array,
                  maxq: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(err1 [bs, out] f32, codes [bs, out] uint8)`` of one block via :func:`_block_kernel`."""
    bs, n_out = w1.shape
    tn = PALLAS_TILE_N
    n_pad = -(-n_out // tn) * tn
    pad = ((0, 0), (0, n_pad - n_out))
    w1 = jnp.pad(w1, pad)
    row_scale = jnp.pad(row_scale, pad, constant_values=1.0)
    row_zero = jnp.pad(row_zero, pad)
    mq = jnp.full((1, n_pad), maxq, jnp.float32)
    tile = pl.BlockSpec((bs, tn), lambda j: (0, j))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=1)
    err, codes = pl.pallas_call(
        _block_kernel,
        out_shape=(jax.ShapeDtypeStruct((bs, n_pad), jnp.float32),
                   jax.ShapeDtypeStruct((bs, n_pad), jnp.float32)),
        grid=(n_pad // tn,),
        in_specs=[tile, pl.BlockSpec((bs, bs), lambda j: (0, 0)), tile, tile,
                  pl.BlockSpec((1, tn), lambda j: (0, j))],
        out_specs=(tile, tile),
        interpret=interpret,
        name="gptq_block",
        **kwargs,
    )(w1, u1, row_scale, row_zero, mq)
    return err[:, :n_out], codes[:, :n_out].astype(jnp.uint8)


IMPLS = ("xla", "pallas", "pallas_interpret")


def solve_core(w: jax.Array, h: jax.Array, config: GPTQConfig, *, impl: str | None = None,
               unroll: int | None = None, runtime: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    """Jittable GPTQ without value checks, for drivers that check the returned flags themselves.

    ``runtime`` = ``(maxq, sym, desc_act)`` as arrays (:func:`runtime_values`); passing them from
    outside a ``jit`` lets one compilation serve every bit width / symmetry / act-order. Returns
    ``(codes u8 [in,out], scales f16 [G,out], zeros u8 [G,out], g_idx i32 [in],
    column_loss f32 [out], damp f32 [], ok bool [])``; ``ok`` False means no damping made ``H``
    positive definite (the outputs are then NaN).
    """
    _check_inputs(w, h, config, None, values=False)
    impl = default_impl(config) if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    maxq, sym, desc_act = _runtime(config) if runtime is None else runtime
    return _solve(w, h, maxq, sym, desc_act, config=_structural(config),
                  unroll=default_unroll() if unroll is None else unroll, impl=impl)


def rtn_core(w: jax.Array, config: GPTQConfig,
             runtime: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    """Jittable round-to-nearest: ``(codes, scales, zeros, g_idx)`` as :func:`solve_core`'s."""
    maxq, sym, _ = _runtime(config) if runtime is None else runtime
    return _rtn_impl(w, maxq, sym, config=_structural(config))


def runtime_values(config: GPTQConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(maxq f32, sym bool, desc_act bool)`` arrays: the config fields the solver takes at run time."""
    return _runtime(config)


def structural(config: GPTQConfig) -> GPTQConfig:
    """``config`` with the run-time fields canonicalised: configs equal under it share compilations."""
    return _structural(config)


def default_impl(config: GPTQConfig) -> str:
    """In-block loop implementation: the Pallas kernel on GPU when ``block_size`` is a power of two
    (>= 16), else the XLA ``fori_loop`` (on an H100 the kernel solves 4096x4096 g128 in ~21 ms
    against ~48 ms; benchmarks/RESULTS.md)."""
    bs = config.block_size
    if jax.default_backend() == "gpu" and bs >= 16 and bs & (bs - 1) == 0:
        return "pallas"
    return "xla"


def default_unroll() -> int:
    """Inner-loop unroll factor for the current backend (1 on CPU, more on accelerators)."""
    return 1 if jax.default_backend() == "cpu" else 8


def gptq_columns(w: jax.Array, h: jax.Array, config: GPTQConfig, *, unroll: int | None = None,
                 impl: str | None = None, name: str | None = None
                 ) -> tuple[QuantizedWeight, jax.Array]:
    """Like :func:`gptq`, also returning the loss per output channel ``[out]`` (float32).

    Under ``jit`` nothing is checked that needs values (NaN inputs, Cholesky failure): a failed
    factorisation then shows as NaN ``loss``/``damp``.
    """
    _check_inputs(w, h, config, name)
    impl = default_impl(config) if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    codes, scales, zeros, g_idx, col_loss, damp, ok = _solve(
        w, h, *_runtime(config), config=_structural(config),
        unroll=default_unroll() if unroll is None else unroll, impl=impl)
    if not _is_tracer(w, h) and not bool(ok):
        tried = linalg.damp_schedule(config.damp_percent, config.damp_auto_increment,
                                     config.damp_max)
        where = f"layer {name!r}: " if name else ""
        raise linalg.CholeskyError(
            f"{where}the damped Hessian {tuple(h.shape)} is not positive definite for any of "
            f"{len(tried)} damping values from {tried[0]:g} to {tried[-1]:g} (x mean diag). Use "
            "more/longer calibration samples, a larger damp_percent, or RTN for this layer")
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx,
                         loss=jnp.sum(col_loss), damp=damp.astype(jnp.float32), bits=config.bits,
                         group_size=config.group_size, sym=config.sym)
    return qw, col_loss


def gptq(w: jax.Array, h: jax.Array, config: GPTQConfig, *, name: str | None = None
         ) -> QuantizedWeight:
    """Quantize a Flax kernel ``w [in, out]`` with GPTQ given the Hessian ``h [in, in]``.

    ``h = 2 X^T X / n`` from :func:`jgptq.hessian_update` (any positive scale gives the same
    result). Returns a :class:`QuantizedWeight` whose ``loss`` is the reference's layer loss
    ``sum((w - q)^2 / U_ii^2) / 2`` and whose ``damp`` is the damping fraction used.

    Eagerly, bad inputs raise ``ValueError`` (NaN/Inf, wrong shapes, group larger than
    ``in_features``, empty Hessian) and a Hessian that stays indefinite raises
    :class:`jgptq.CholeskyError`; inside ``jit`` shape errors still raise, a failure gives NaN
    ``loss`` and ``damp``. ``name`` only labels error messages.
    """
    return gptq_columns(w, h, config, name=name)[0]


def gptq_shared(ws: Sequence[jax.Array], h: jax.Array, config: GPTQConfig, *,
                name: str | None = None) -> list[QuantizedWeight]:
    """GPTQ of several kernels ``[in, out_k]`` that share one Hessian (q/k/v; gate/up) in one solve.

    Equivalent to ``[gptq(w, h, config) for w in ws]`` (GPTQ is independent per output channel and
    act-order depends only on ``h``), with one factorisation and one loop; each result carries its
    own loss.
    """
    if not ws:
        raise ValueError("gptq_shared needs at least one weight")
    n_in = ws[0].shape[0]
    for k, w in enumerate(ws):
        if getattr(w, "ndim", None) != 2 or w.shape[0] != n_in:
            raise ValueError(f"gptq_shared: weight {k} has shape {tuple(getattr(w, 'shape', ()))}; "
                             f"all weights must be [in_features={n_in}, out_k]")
    qw, col_loss = gptq_columns(jnp.concatenate([jnp.asarray(w) for w in ws], axis=1), h, config,
                                name=name)
    return qw.split([int(w.shape[1]) for w in ws], losses=col_loss)


# --------------------------------------------------------------------------------------------
# round to nearest

@functools.partial(jax.jit, static_argnames=("config",))
def _rtn_impl(w: jax.Array, maxq: jax.Array, sym: jax.Array, config: GPTQConfig):
    w = w.astype(jnp.float32)
    n_in, _ = w.shape
    if config.group_size == -1:
        p = _find(w, config, maxq, sym)
        params = GridParams(p.scale[None], p.zero[None])
        g_idx = jnp.zeros((n_in,), jnp.int32)
    else:
        params = _group_params(w, config.group_size, config, maxq, sym)
        g_idx = (jnp.arange(n_in) // config.group_size).astype(jnp.int32)
    codes = codes_for_maxq(w, GridParams(params.scale[g_idx], params.zero[g_idx]), maxq)
    scales, zeros = _to_storage(params)
    return codes.astype(jnp.uint8), scales, zeros, g_idx


def rtn(w: jax.Array, config: GPTQConfig, *, name: str | None = None) -> QuantizedWeight:
    """Round-to-nearest baseline of ``w [in, out]`` on the same grid as GPTQ (``desc_act``,
    ``static_groups`` and damping do not apply). ``loss`` is NaN (no Hessian), ``damp`` 0."""
    _check_inputs(w, None, config, name)
    maxq, sym, _ = _runtime(config)
    codes, scales, zeros, g_idx = _rtn_impl(w, maxq, sym, config=_structural(config))
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx,
                           loss=jnp.asarray(jnp.nan, jnp.float32),
                           damp=jnp.asarray(0.0, jnp.float32), bits=config.bits,
                           group_size=config.group_size, sym=config.sym)


def layer_objective(w: jax.Array, q: jax.Array, h: jax.Array) -> jax.Array:
    """``tr((w - q)^T H (w - q))`` = ``||X (w - q)||^2 * 2/n`` for ``H = 2 X^T X / n``: the layer
    output error GPTQ minimises (float32 ``[]``)."""
    delta = (jnp.asarray(w, jnp.float32) - jnp.asarray(q, jnp.float32))
    return jnp.sum(delta * jnp.dot(jnp.asarray(h, jnp.float32), delta, precision=HIGHEST))


__all__ = ["gptq", "gptq_columns", "gptq_shared", "rtn", "layer_objective", "default_unroll"]
