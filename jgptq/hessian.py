"""Hessian of the layer-wise objective, accumulated over calibration batches.

For a linear ``y = x @ W`` and calibration inputs ``X`` (``N`` sequences), GPTQ minimises
``||X W - X Q||^2``; its Hessian with respect to each output column is ``H = 2 X^T X / N`` (up to a
scale that does not matter: damping is relative to ``mean(diag(H))`` and the updates use
``err / Hinv[i, i]``). ``hessian_update`` keeps the reference's running mean over *sequences*
(``IST-DASLab/gptq:gptq.py`` ``add_batch``)::

    H *= n / (n + t);  n += t;  x *= sqrt(2 / n);  H += x^T x

with ``t`` the number of sequences in the batch (leading dimension; a 2-D batch counts as one
sequence, as in the reference). Masked (padding) tokens contribute nothing to ``H``; they still
belong to their sequence for the count ``t``. All arithmetic is float32, matmuls at HIGHEST
precision; everything is jit-able. Non-finite activations are recorded in-graph
(``HessianState.finite``) and, when the inputs are concrete, rejected at once with an error naming
the layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HessianState(NamedTuple):
    """Running Hessian: ``h`` float32 ``[n, n]``, ``nsamples`` int32 ``[]`` (sequences seen),
    ``finite`` bool ``[]`` (False once any unmasked activation was NaN/Inf)."""

    h: jax.Array
    nsamples: jax.Array
    finite: jax.Array


def hessian_init(n: int) -> HessianState:
    """Empty state for a layer with ``n`` input features."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"hessian_init: n (in_features) must be a positive int, got {n!r}")
    return HessianState(jnp.zeros((n, n), jnp.float32), jnp.zeros((), jnp.int32),
                        jnp.ones((), bool))


def _is_concrete(*xs: object) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def hessian_update(state: HessianState, x: jax.Array, mask: jax.Array | None = None, *,
                   name: str | None = None, check: bool = True) -> HessianState:
    """Add a batch of activations ``x [..., n]`` (``[batch, seq, n]`` or ``[tokens, n]``).

    ``mask`` (shape ``x.shape[:-1]``, bool or 0/1) marks real tokens; masked tokens are zeroed
    before the outer product. With ``check`` and concrete inputs, NaN/Inf in unmasked activations
    raise ``FloatingPointError`` naming ``name``; under ``jit`` they set ``finite = False``.
    """
    where = f"layer {name!r}: " if name else ""
    n = state.h.shape[0]
    if x.ndim < 2 or x.shape[-1] != n:
        raise ValueError(f"{where}activations must have shape [..., {n}] (in_features of the "
                         f"Hessian), got {tuple(x.shape)}")
    t = x.shape[0] if x.ndim >= 3 else 1
    lead = tuple(x.shape[:-1])
    x = jnp.asarray(x)
    # bf16/fp16 activations stay in their dtype: their products are exact in fp32, so the
    # tensor-core dot with fp32 accumulation equals the fp32 HIGHEST one on the same values
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        x = x.astype(jnp.float32)
    x = x.reshape(-1, n)
    if mask is not None:
        mask = jnp.asarray(mask)
        if tuple(mask.shape) != lead:
            raise ValueError(f"{where}mask must have shape {lead} (the activations without the "
                             f"feature axis), got {tuple(mask.shape)}")
        keep = mask.reshape(-1).astype(bool)
        x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
    finite = jnp.all(jnp.isfinite(x))
    new = _update(state, x, t)
    new = new._replace(finite=state.finite & finite)
    if check and _is_concrete(x, state.h) and not bool(new.finite):
        raise FloatingPointError(
            f"{where}calibration activations contain NaN or Inf (shape {tuple(x.shape)}); the "
            "Hessian would be corrupted. Check the model's dtype (fp16 overflow) and the "
            "calibration batch")
    return new


@jax.jit
def _update_impl(h: jax.Array, nsamples: jax.Array, x: jax.Array, t: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    n_old = nsamples.astype(jnp.float32)
    n_new = n_old + t.astype(jnp.float32)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    xtx = jnp.dot(x.T, x, precision=precision, preferred_element_type=jnp.float32)
    h = h * (n_old / n_new) + xtx * (2.0 / n_new)
    return h, nsamples + t


def _update(state: HessianState, x: jax.Array, t: int) -> HessianState:
    h, ns = _update_impl(state.h, state.nsamples, x, jnp.asarray(t, jnp.int32))
    return HessianState(h, ns, state.finite)


def hessian_from_activations(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """One-shot ``H = 2 X^T X / N`` from all activations ``x [N, seq, n]`` (or ``[tokens, n]``
    counted as one sequence), masked tokens excluded; equals a single ``hessian_update``."""
    st = hessian_update(hessian_init(int(x.shape[-1])), x, mask, check=False)
    return st.h
