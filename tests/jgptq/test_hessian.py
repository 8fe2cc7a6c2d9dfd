"""Hessian accumulation against the reference running mean (float64 NumPy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.hessian import hessian_from_activations, hessian_init, hessian_update

import reference_numpy as ref


def test_running_mean_matches_reference_over_uneven_batches():
    rng = np.random.default_rng(0)
    n = 48
    batches = [rng.standard_normal((b, 7, n)).astype(np.float32) * rng.uniform(0.5, 2.0)
               for b in (3, 1, 5, 2)]
    batches.append(rng.standard_normal((11, n)).astype(np.float32))   # 2-D = one sequence
    st = hessian_init(n)
    for x in batches:
        st = hessian_update(st, jnp.asarray(x))
    expected = ref.hessian_running_mean(batches)
    assert int(st.nsamples) == 3 + 1 + 5 + 2 + 1
    np.testing.assert_allclose(np.asarray(st.h), expected, rtol=2e-5, atol=2e-5)
    # the running mean is 2 X^T X / N over all sequences
    flat = np.concatenate([b.reshape(-1, n) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(expected, 2 * flat.T @ flat / 12, rtol=1e-10)
    assert st.h.dtype == jnp.float32 and bool(st.finite)


def test_masked_tokens_contribute_nothing():
    rng = np.random.default_rng(1)
    n = 32
    x = rng.standard_normal((4, 9, n)).astype(np.float32)
    mask = rng.random((4, 9)) > 0.3
    garbage = x.copy()
    garbage[~mask] = rng.standard_normal(((~mask).sum(), n)) * 100.0
    garbage[0, np.flatnonzero(~mask[0])[:1]] = np.nan       # even NaN padding is ignored
    got = hessian_update(hessian_init(n), jnp.asarray(garbage), jnp.asarray(mask)).h
    real = x.copy()
    real[~mask] = 0.0
    np.testing.assert_allclose(np.asarray(got), ref.hessian_running_mean([real]), rtol=2e-5,
                               atol=2e-5)
    xs = x[mask].astype(np.float64)                          # only real tokens, N = 4 sequences
    np.testing.assert_allclose(np.asarray(got), 2 * xs.T @ xs / 4, rtol=2e-5, atol=2e-5)


def test_jittable_and_flags_non_finite_under_jit():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    step = jax.jit(lambda st, x, m: hessian_update(st, x, m))
    st = step(hessian_init(16), jnp.asarray(x), jnp.ones((2, 5), bool))
    np.testing.assert_allclose(np.asarray(st.h), np.asarray(hessian_from_activations(x)),
                               rtol=1e-6)
    x[1, 2, 3] = np.inf
    st = step(st, jnp.asarray(x), jnp.ones((2, 5), bool))
    assert not bool(st.finite)


def test_bad_inputs():
    st = hessian_init(8)
    x = np.ones((2, 3, 8), np.float32)
    x[0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="layer 'model.layers.3.mlp.down_proj'.*NaN"):
        hessian_update(st, jnp.asarray(x), name="model.layers.3.mlp.down_proj")
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        hessian_update(st, jnp.ones((2, 3, 9)))
    with pytest.raises(ValueError, match="mask must have shape"):
        hessian_update(st, jnp.ones((2, 3, 8)), jnp.ones((3, 2), bool))
    with pytest.raises(ValueError, match="positive int"):
        hessian_init(0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_activations_give_exact_fp32_sums(dtype):
    """bf16/fp16 activations: the Hessian is the float64 sum over exactly those values (their
    products are exact in fp32), masked tokens excluded, accumulated in float32."""
    rng = np.random.default_rng(3)
    n = 40
    x = jnp.asarray(rng.standard_normal((4, 9, n)) * 3.0, dtype)
    mask = rng.random((4, 9)) > 0.2
    st = hessian_update(hessian_init(n), x, jnp.asarray(mask))
    xv = np.asarray(x.astype(jnp.float32), np.float64)[mask]
    want = 2.0 * xv.T @ xv / 4
    assert st.h.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(st.h), want, rtol=1e-5, atol=1e-4)
