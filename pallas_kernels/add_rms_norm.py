"""Residual add + RMSNorm in one kernel: Pallas (Triton lowering), GPU.

A Llama block runs ``h = residual + linear(x)`` then ``x' = rms_norm(scale, h)`` twice per layer
(after ``o_proj`` with ``post_attention_layernorm``, after ``down_proj`` with the next block's
``input_layernorm``). XLA emits three fusions for that (the add with the linear's split-K sum,
the mean-square reduction, the normalising multiply), each ~1.2-1.6 us in a 7B decode step on an
H200 (`benchmarks/RESULTS.md`, session 11), where the work is a few KB per token. This kernel
does all of it in one pass over each row:

* ``y`` is the linear's output (``[..., D]``, any float dtype) or its addends (``[P, ..., D]``:
  the split-K partials of :func:`jgptq.pallas_kernels.dispatch.matmul_parts`, fp32), added in
  fp32 and rounded to the compute dtype once, as the linear would;
* ``h = residual + y`` rounded to the compute dtype (``residual``'s dtype);
* ``x' = scale * (h / sqrt(mean(h^2) + eps))``, statistics in fp32, the normalised value and the
  product each rounded to the compute dtype (exactly :func:`jgptq.models.llama.rms_norm`).

Grid: one program per ``rows_per_program`` rows; ``D`` is one masked tile (padded to a power of
two); with ``zeros``, up to :data:`MAX_ZERO_PROGRAMS` more programs after those write only the
zero arrays (a share each). Up to the fp32 order of the two sums (a last-bit difference in rare
cases) the outputs equal :func:`reference`. The file also holds a benchmark :func:`main` against XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["AddRmsNormConfig", "add_rms_norm", "default_config", "reference", "supported", "main"]

MAX_D = 32768  # one row is one register tile; beyond this it would spill
MAX_PARTS = 64


@dataclasses.dataclass(frozen=True)
class AddRmsNormConfig:
    """Launch parameters of :func:`add_rms_norm`.

    Attributes:
      rows_per_program: rows (tokens) each program normalises (power of two).
      num_warps: Triton warps per program (power of two).
    """

    rows_per_program: int = 1
    num_warps: int = 4


def default_config(m: int, d: int, n_parts: int) -> AddRmsNormConfig:
    """One row per program, more warps for wider rows or more addends (~8 fp32 values per thread
    per addend)."""
    dp = 1 << max(d - 1, 1).bit_length()
    work = dp * max(n_parts, 1)
    warps = 4 if work <= 8192 else 8 if work <= 32768 else 16
    return AddRmsNormConfig(rows_per_program=1, num_warps=warps)


def supported(y_shape: tuple[int, ...], residual_shape: tuple[int, ...], dtype) -> str | None:
    """Why :func:`add_rms_norm` cannot take these shapes / compute dtype (``None`` when it can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"compute dtype {jnp.dtype(dtype)} (bfloat16, float16 or float32)"
    if len(residual_shape) < 1 or residual_shape[-1] < 1:
        return f"residual shape {residual_shape} has no feature axis"
    d = residual_shape[-1]
    if d > MAX_D:
        return f"hidden size {d} (at most {MAX_D})"
    if tuple(y_shape) == tuple(residual_shape):
        return None
    if len(y_shape) == len(residual_shape) + 1 and tuple(y_shape[1:]) == tuple(residual_shape):
        if not 1 <= y_shape[0] <= MAX_PARTS:
            return f"{y_shape[0]} addends (1 to {MAX_PARTS})"
        return None
    return f"y {tuple(y_shape)} is neither the residual's shape {tuple(residual_shape)} nor [P, *that]"


def add_rms_norm(y: jax.Array, residual: jax.Array, scale: jax.Array, eps: float, *,
                 zeros: Sequence[tuple[int, ...]] = (), config: AddRmsNormConfig | None = None,
                 interpret: bool = False) -> tuple[jax.Array, ...]:
    """``h = residual + y`` and ``rms_norm(scale, h)`` in one kernel.

    Args:
      y: ``[..., D]`` (any float dtype; rounded to the residual's dtype first) or ``[P, ..., D]``
        addends whose fp32 sum, rounded to the residual's dtype, is the linear's output.
      residual: ``[..., D]`` in the compute dtype (bfloat16 / float16 / float32).
      scale: ``[D]`` RMSNorm weight (cast to the compute dtype, as ``rms_norm`` does).
      eps: RMSNorm epsilon (> 0).
      zeros: shapes of float32 arrays of zeros the kernel also writes (the accumulators that
        the next matmuls' TMA reductions add into, ``gptq_matmul_mgpu.accumulator_shape``: made
        here they cost a few stores instead of an XLA zero fill, or a copy per matmul inside a loop).
      config: launch parameters; default :func:`default_config`.
      interpret: run through the Pallas interpreter (CPU tests).
    Returns:
      ``(h, x)``, both ``[..., D]`` in the residual's dtype; with ``zeros``, ``(h, x, zs)`` with
      ``zs`` the tuple of those zero arrays.
    """
    dt = residual.dtype
    why = supported(tuple(y.shape), tuple(residual.shape), dt)
    if why:
        raise ValueError(f"add_rms_norm: unsupported input: {why}.")
    d = residual.shape[-1]
    if tuple(scale.shape) != (d,):
        raise ValueError(f"add_rms_norm: scale must be [{d}]; got shape {tuple(scale.shape)}.")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(f"add_rms_norm: y must be a float array; got {y.dtype}.")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"add_rms_norm: eps must be a finite number > 0; got {eps!r}.")
    n_parts = y.shape[0] if y.ndim == residual.ndim + 1 else 0
    lead = residual.shape[:-1]
    m = math.prod(lead)
    cfg = config or default_config(m, d, n_parts)
    rp, nw = cfg.rows_per_program, cfg.num_warps
    if rp < 1 or rp & (rp - 1) or nw < 1 or nw & (nw - 1):
        raise ValueError(f"add_rms_norm: rows_per_program={rp} and num_warps={nw} must be powers of two.")
    zshapes = []
    for zs in zeros:
        try:
            shape = tuple(int(v) for v in zs)
        except TypeError:
            raise ValueError(f"add_rms_norm: zeros must be a sequence of shapes; got {zs!r}.") from None
        if not shape or min(shape) < 1:
            raise ValueError(f"add_rms_norm: zeros shape {shape} must have every dimension >= 1.")
        zshapes.append(shape)
    if m == 0:
        zs = tuple(jnp.zeros(z, jnp.float32) for z in zshapes)
        return (residual, residual, zs) if zshapes else (residual, residual)
    y2 = y.reshape(n_parts, m, d) if n_parts else y.reshape(m, d)
    sizes = tuple(math.prod(z) for z in zshapes)
    h, x, *zs = _forward(y2, residual.reshape(m, d), scale.astype(dt), float(eps), cfg, interpret, sizes)
    h, x = h.reshape(residual.shape), x.reshape(residual.shape)
    if not zshapes:
        return h, x
    return h, x, tuple(z.reshape(shape) for z, shape in zip(zs, zshapes))


def _groups(n: int, cap: int) -> list[tuple[int, int]]:
    """``(start, size)`` runs covering ``0..n-1``: powers of two, at most ``cap`` (rounded down to
    one), largest first (22 addends, cap 4: 4, 4, 4, 4, 4, 2)."""
    cap = 1 << (max(cap, 1).bit_length() - 1)
    out, p0 = [], 0
    while p0 < n:
        size = min(cap, 1 << ((n - p0).bit_length() - 1))
        out.append((p0, size))
        p0 += size
    return out


def _round(x: jax.Array, dt, interpret: bool) -> jax.Array:
    """``x`` (fp32) rounded to ``dt`` and kept in fp32. In the interpreter the kernel runs as XLA
    ops, and XLA drops an fp32 -> bf16 -> fp32 round trip (excess precision); ``reduce_precision``
    it keeps (Triton has no lowering for it, and honours the casts)."""
    if interpret:
        fi = jnp.finfo(dt)
        return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    return x.astype(dt).astype(jnp.float32)


ZERO_BLOCK = 2048  # float32 zeros per store of the zeros outputs
ZERO_PER_PROGRAM = 8192  # float32 zeros a zero-only program writes, at least (32 KB)
MAX_ZERO_PROGRAMS = 64


def zero_programs(sizes: Sequence[int]) -> int:
    """Programs that only write the zeros outputs (after the row programs): one per
    ``ZERO_PER_PROGRAM`` values, at most ``MAX_ZERO_PROGRAMS``. A decode step has one row
    program; left to it, ~100 KB of zeros made the kernel ~2x slower (H200, session 13)."""
    total = sum(int(v) for v in sizes)
    return min(MAX_ZERO_PROGRAMS, -(-total // ZERO_PER_PROGRAM)) if total else 0


def _zero_fill(z_refs, sizes: tuple[int, ...], i, programs: int) -> None:
    """Program ``i`` of ``programs`` writes its contiguous share of each flat float32 output."""
    from jax.experimental.pallas import triton as plt

    for ref, size in zip(z_refs, sizes):
        per = -(-size // programs)
        nb = -(-per // ZERO_BLOCK)
        start = i * (nb * ZERO_BLOCK)
        zero = jnp.zeros((ZERO_BLOCK,), jnp.float32)

        def store(j, carry, ref=ref, size=size, start=start, zero=zero):
            idx = start + j * ZERO_BLOCK + jnp.arange(ZERO_BLOCK)
            plt.store(ref.at[pl.ds(start + j * ZERO_BLOCK, ZERO_BLOCK)], zero, mask=idx < size)
            return carry

        if nb <= 16:
            for j in range(nb):
                store(j, None)
        else:
            jax.lax.fori_loop(0, nb, store, None)


def _kernel(y_ref, r_ref, s_ref, h_ref, x_ref, *z_refs, n_parts: int, m: int, d: int, rp: int, eps: float,
            interpret: bool, zero_sizes: tuple[int, ...] = ()):
    row_programs = -(-m // rp)
    pid = pl.program_id(0)  # read here: the interpreter has no program_id inside a pl.when branch
    if not zero_sizes:
        _rows(y_ref, r_ref, s_ref, h_ref, x_ref, pid, n_parts=n_parts, m=m, d=d, rp=rp, eps=eps,
              interpret=interpret)
        return
    zp = zero_programs(zero_sizes)

    @pl.when(pid < row_programs)
    def _():
        _rows(y_ref, r_ref, s_ref, h_ref, x_ref, pid, n_parts=n_parts, m=m, d=d, rp=rp, eps=eps,
              interpret=interpret)

    @pl.when(pid >= row_programs)
    def _():
        _zero_fill(z_refs, zero_sizes, pid - row_programs, zp)


def _rows(y_ref, r_ref, s_ref, h_ref, x_ref, pid, *, n_parts: int, m: int, d: int, rp: int, eps: float,
          interpret: bool):
    from jax.experimental.pallas import triton as plt

    f32 = jnp.float32
    dt = r_ref.dtype
    dp = 1 << max(d - 1, 1).bit_length()
    row0 = pid * rp
    rows = row0 + jnp.arange(rp)
    cmask = jnp.arange(dp) < d
    mask = (rows < m)[:, None] & cmask[None, :]  # [rp, dp]
    if n_parts:  # the addends in power-of-two groups of up to ~16K values, one 3-D load each
        yv = None
        for p0, size in _groups(n_parts, max(1, 16384 // (rp * dp))):
            part = plt.load(y_ref.at[pl.ds(p0, size), pl.ds(row0, rp), pl.ds(0, dp)],
                            mask=jnp.broadcast_to(mask[None], (size, rp, dp)), other=0)
            part = jnp.sum(part.astype(f32), axis=0)
            yv = part if yv is None else yv + part
    else:
        yv = plt.load(y_ref.at[pl.ds(row0, rp), pl.ds(0, dp)], mask=mask, other=0).astype(f32)
    r = plt.load(r_ref.at[pl.ds(row0, rp), pl.ds(0, dp)], mask=mask, other=0).astype(f32)
    hf = _round(r + _round(yv, dt, interpret), dt, interpret)
    ms = jnp.sum(hf * hf, axis=1) / d  # masked columns are zeros
    yn = _round(hf * jax.lax.rsqrt(ms + eps)[:, None], dt, interpret)
    sc = plt.load(s_ref.at[pl.ds(0, dp)], mask=cmask, other=0).astype(f32)
    x = (sc[None, :] * yn).astype(dt)
    h = hf.astype(dt)
    plt.store(h_ref.at[pl.ds(row0, rp), pl.ds(0, dp)], h, mask=mask)
    plt.store(x_ref.at[pl.ds(row0, rp), pl.ds(0, dp)], x, mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "cfg", "interpret", "zero_sizes"))
def _forward(y, residual, scale, eps: float, cfg: AddRmsNormConfig, interpret: bool,
             zero_sizes: tuple[int, ...] = ()):
    m, d = residual.shape
    n_parts = y.shape[0] if y.ndim == 3 else 0
    rp = cfg.rows_per_program
    whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_kernel, n_parts=n_parts, m=m, d=d, rp=rp, eps=eps, interpret=interpret,
                               zero_sizes=zero_sizes)
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        kw["compiler_params"] = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
    out = jax.ShapeDtypeStruct((m, d), residual.dtype)
    grid = (-(-m // rp) + zero_programs(zero_sizes),)  # row programs, then zero-only programs
    call = pl.pallas_call(kernel, grid=grid, in_specs=[whole(*y.shape), whole(m, d), whole(d)],
                          out_specs=(whole(m, d), whole(m, d), *(whole(z) for z in zero_sizes)),
                          out_shape=(out, out, *(jax.ShapeDtypeStruct((z,), jnp.float32) for z in zero_sizes)),
                          interpret=interpret,
                          name="add_rms_norm", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton lowering is deprecated upstream
        return call(y, residual, scale)


def reference(y: jax.Array, residual: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Plain jnp, the model's own ops: ``h = residual + y`` (addends summed in fp32 and rounded
    first), ``x = rms_norm(scale, h)``."""
    dt = residual.dtype
    if y.ndim == residual.ndim + 1:
        y = jnp.sum(y.astype(jnp.float32), axis=0)
    h = residual + y.astype(dt)
    hf = h.astype(jnp.float32)
    yn = hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)
    return h, scale.astype(dt) * yn.astype(dt)


def main() -> None:  # pragma: no cover - benchmark
    """Device-timed kernel vs the XLA ops (Llama-2-7B hidden size; 1 / 16 tokens; 1 / 8 / 22 addends)."""
    import time

    interpret = jax.default_backend() != "gpu"
    d = 512 if interpret else 4096
    for m in (1, 16):
        for p in (0, 8, 22):
            key = jax.random.key(m * 100 + p)
            k1, k2, k3 = jax.random.split(key, 3)
            y = jax.random.normal(k1, ((p,) if p else ()) + (m, d), jnp.float32 if p else jnp.bfloat16)
            res = jax.random.normal(k2, (m, d), jnp.bfloat16)
            sc = (1 + 0.1 * jax.random.normal(k3, (d,))).astype(jnp.bfloat16)
            fns = {"xla": jax.jit(functools.partial(reference, eps=1e-5)),
                   "kernel": jax.jit(functools.partial(add_rms_norm, eps=1e-5, interpret=interpret))}
            for name, f in fns.items():
                out = f(y, res, sc)
                jax.block_until_ready(out)
                n = 3 if interpret else 500
                t0 = time.perf_counter()
                for _ in range(n):
                    out = f(y, res, sc)
                jax.block_until_ready(out)
                print(f"M={m:3d} D={d} addends={p:2d} {name:>6}: {(time.perf_counter() - t0) / n * 1e6:8.1f} us "
                      "(host loop)", flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
