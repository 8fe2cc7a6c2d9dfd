"""Damped Cholesky inverse of the GPTQ Hessian, with dead-column handling and failure detection.

GPTQ needs ``U``, the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``); row ``i`` of ``U``
divided by ``U[i, i]`` is the update direction after quantizing column ``i``. The reference
(``IST-DASLab/gptq:gptq.py``) computes ``chol_upper(cholesky_inverse(chol_lower(H)))``: two
factorisations and an inverse. We use the identity (``J`` = the exchange matrix, which reverses
index order)::

    J H J = L L^T   =>   H^-1 = (J L^-T J)(J L^-1 J)   and   U = J L^-1 J  is upper triangular,

so one Cholesky and one triangular inverse give the same ``U`` (it is unique: positive diagonal).
On CPU the triangular inverse is computed by recursive blocking with matmuls
(:func:`lower_triangular_inverse`), about twice as fast as a triangular solve against the
identity, at the same accuracy.

``torch.linalg.cholesky`` raises on a matrix that is not positive definite; JAX returns NaNs.
We test the result for finiteness in-graph and retry with more damping inside ``lax.while_loop``
(GPTQModel's ``damp_auto_increment`` strategy), so a jitted caller never synchronises. The eager
entry point raises :class:`CholeskyError` naming the shape and the damping values tried.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


class CholeskyError(RuntimeError):
    """The damped Hessian stayed non positive-definite for every damping value tried."""


def fix_dead(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reference dead-column handling: where ``diag(H) == 0`` set ``H[i, i] = 1``.

    Returns ``(h_fixed [n, n], dead bool [n])``; the caller zeroes the matching weight rows.
    """
    d = jnp.diagonal(h)
    dead = d == 0
    idx = jnp.arange(h.shape[0])
    h = h.at[idx, idx].set(jnp.where(dead, 1.0, d))
    return h, dead


def lower_triangular_inverse(lower: jax.Array, leaf: int = 128) -> jax.Array:
    """Inverse of a lower-triangular ``[n, n]`` matrix by recursive 2x2 blocking.

    ``inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``: the work is in HIGHEST-precision
    matmuls (``n^3/3`` multiply-adds against ``n^3/2`` for a triangular solve against the identity,
    which does not know the right-hand side is triangular); blocks of ``<= leaf`` rows use a
    triangular solve. Shapes are static, so this unrolls at trace time (``~n/leaf`` leaves).
    """
    n = lower.shape[0]
    if n <= leaf:
        eye = jnp.eye(n, dtype=lower.dtype)
        return jax.lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)
    k = -(-(n // 2) // leaf) * leaf
    a_inv = lower_triangular_inverse(lower[:k, :k], leaf)
    d_inv = lower_triangular_inverse(lower[k:, k:], leaf)
    c = jnp.dot(lower[k:, :k], a_inv, precision=jax.lax.Precision.HIGHEST)
    x = -jnp.dot(d_inv, c, precision=jax.lax.Precision.HIGHEST)
    top = jnp.concatenate([a_inv, jnp.zeros((k, n - k), lower.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([x, d_inv], axis=1)], axis=0)


def upper_inverse_factor(h: jax.Array, method: str | None = None) -> jax.Array:
    """``U`` upper triangular with ``H^-1 = U^T U`` for a symmetric positive-definite ``h [n, n]``
    (float32, HIGHEST precision). Non-finite entries signal that ``h`` was not positive definite.

    ``method``: ``"blocked"`` (:func:`lower_triangular_inverse`, the CPU default) or ``"solve"``
    (one triangular solve against the identity; the default on accelerators, where it is the path
    the GPU benchmarks in ``benchmarks/RESULTS.md`` measured).
    """
    if method is None:
        method = "blocked" if jax.default_backend() == "cpu" else "solve"
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    if method == "blocked":
        linv = lower_triangular_inverse(lower)
    elif method == "solve":
        eye = jnp.eye(h.shape[0], dtype=h.dtype)
        linv = jax.lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)
    else:
        raise ValueError(f"method must be 'blocked' or 'solve', got {method!r}")
    return linv[::-1, ::-1]


def damp_schedule(damp_percent: float, damp_auto_increment: float, damp_max: float
                  ) -> tuple[float, ...]:
    """The damping fractions tried, in order: ``damp_percent``, then ``+ increment`` up to
    ``damp_max`` (just ``damp_percent`` when the increment is 0)."""
    if damp_auto_increment <= 0 or damp_percent >= damp_max:
        return (float(damp_percent),)
    steps = int(math.floor((damp_max - damp_percent) / damp_auto_increment + 1e-6))
    return tuple(float(damp_percent + k * damp_auto_increment) for k in range(steps + 1))


def damped_inverse_factor(h: jax.Array, damp_percent: float = 0.01, *,
                          damp_auto_increment: float = 0.01, damp_max: float = 1.0
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Jit-able core: ``(U [n, n], damp float32 [], ok bool [])`` for ``h [n, n]``.

    Dead columns are fixed (:func:`fix_dead`), then ``H + damp * mean(diag(H)) * I`` is factored
    for each damping value of :func:`damp_schedule` until ``U`` is finite. On failure ``ok`` is
    False and ``U``/``damp`` are NaN.
    """
    h = jnp.asarray(h, jnp.float32)
    h, _ = fix_dead(h)
    n = h.shape[0]
    mean_diag = jnp.mean(jnp.diagonal(h))
    damps = jnp.asarray(damp_schedule(damp_percent, damp_auto_increment, damp_max), jnp.float32)
    eye = jnp.eye(n, dtype=jnp.float32)

    def attempt(k):
        u = upper_inverse_factor(h + (damps[k] * mean_diag) * eye)
        return u, jnp.all(jnp.isfinite(u))

    def cond(carry):
        k, _, ok = carry
        return (~ok) & (k < damps.shape[0])

    def body(carry):
        k, _, _ = carry
        u, ok = attempt(k)
        return k + 1, u, ok

    k, u, ok = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), jnp.full((n, n), jnp.nan,
                                                                                  jnp.float32),
                                               jnp.zeros((), bool)))
    damp = jnp.where(ok, damps[jnp.maximum(k - 1, 0)], jnp.nan)
    u = jnp.where(ok, u, jnp.nan)
    return u, damp, ok


def damped_cholesky_inverse(h: jax.Array, damp_percent: float = 0.01, *,
                            damp_auto_increment: float = 0.01, damp_max: float = 1.0,
                            name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(U, damp)``: the upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1`` and the damping
    fraction that worked, retrying with ``damp += damp_auto_increment`` up to ``damp_max``.

    ``h`` is ``[n, n]`` (symmetric, float32). Eagerly, a failure raises :class:`CholeskyError`
    naming the shape and the damping values tried, and NaN/Inf in ``h`` raise ``ValueError``;
    under ``jit`` a failure gives NaN ``U`` and ``damp`` instead (check ``damp`` for NaN).
    """
    where = f"layer {name!r}: " if name else ""
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{where}the Hessian must be square [n, n], got shape {tuple(h.shape)}")
    concrete = not isinstance(h, jax.core.Tracer)
    if concrete and not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"{where}the Hessian {tuple(h.shape)} contains NaN or Inf; check the "
                         "calibration activations")
    u, damp, ok = _damped_inverse_jit(h, damp_percent, damp_auto_increment, damp_max)
    if concrete and not bool(ok):
        tried = damp_schedule(damp_percent, damp_auto_increment, damp_max)
        shown = ", ".join(f"{d:g}" for d in tried[:5]) + (", ..." if len(tried) > 6 else "") + (
            f", {tried[-1]:g}" if len(tried) > 5 else "")
        raise CholeskyError(
            f"{where}the damped Hessian {tuple(h.shape)} is not positive definite for any of "
            f"{len(tried)} damping values ({shown}) x mean(diag(H)). The calibration data is "
            "probably too small or degenerate for this layer: use more/longer calibration "
            "samples, a larger damp_percent, or RTN for this layer")
    return u, damp


_damped_inverse_jit = jax.jit(
    lambda h, d, inc, mx: damped_inverse_factor(h, d, damp_auto_increment=inc, damp_max=mx),
    static_argnums=(1, 2, 3))
