"""Damped Cholesky inverse factor against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.linalg import (CholeskyError, damp_schedule, damped_cholesky_inverse,
                          upper_inverse_factor)


def spd(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * n, n)) @ (np.eye(n) + 0.2 * rng.standard_normal((n, n)))
    return 2 * x.T @ x / (2 * n)


def reference_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """The reference recipe: chol_upper(cholesky_inverse(chol_lower(H + damp*mean(diag)*I)))."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    return np.linalg.cholesky(hinv).T


def test_upper_factor_matches_reference_recipe():
    h = spd(0, 96)
    u, damp = damped_cholesky_inverse(jnp.asarray(h, jnp.float32), 0.01)
    u = np.asarray(u)
    assert float(damp) == pytest.approx(0.01)
    assert np.all(np.tril(u, -1) == 0), "U must be upper triangular"
    np.testing.assert_allclose(u, reference_factor(h, 0.01), rtol=1e-4, atol=1e-5)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(96)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.linalg.inv(hd), rtol=1e-4,
                               atol=1e-5)


def test_dead_columns_are_handled_like_the_reference():
    h = spd(1, 40)
    h[7, :] = 0
    h[:, 7] = 0
    h[30, :] = 0
    h[:, 30] = 0
    u, _ = damped_cholesky_inverse(jnp.asarray(h, jnp.float32), 0.01)
    np.testing.assert_allclose(np.asarray(u), reference_factor(h, 0.01), rtol=1e-4, atol=1e-5)


def test_damping_increments_until_success_and_reports_it():
    rng = np.random.default_rng(2)
    n = 50
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(0.5, 1.5, n)
    eig[3] = -0.025 * eig.mean()
    h = (q * eig) @ q.T
    md = np.mean(np.diag(h))
    u, damp = damped_cholesky_inverse(jnp.asarray(h, jnp.float32), 0.01)
    # the smallest tried damping whose shift makes H positive definite
    need = -np.linalg.eigvalsh(h).min() / md
    tried = np.array(damp_schedule(0.01, 0.01, 1.0))
    assert float(damp) == pytest.approx(tried[tried > need][0], abs=1e-6)
    np.testing.assert_allclose(np.asarray(u), reference_factor(h, float(damp)), rtol=2e-3,
                               atol=2e-3)


def test_failure_raises_eagerly_and_is_nan_under_jit():
    h = -np.eye(16, dtype=np.float32) * 3 + 0.01
    with pytest.raises(CholeskyError, match=r"\(16, 16\).*100 damping values \(0\.01, 0\.02"):
        damped_cholesky_inverse(jnp.asarray(h), 0.01)
    u, damp = jax.jit(lambda h: damped_cholesky_inverse(h, 0.01))(jnp.asarray(h))
    assert np.isnan(float(damp)) and np.all(np.isnan(np.asarray(u)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        damped_cholesky_inverse(jnp.full((4, 4), jnp.nan))
    with pytest.raises(ValueError, match="square"):
        damped_cholesky_inverse(jnp.ones((4, 5)))


def test_damp_schedule():
    assert damp_schedule(0.01, 0.01, 0.05) == pytest.approx((0.01, 0.02, 0.03, 0.04, 0.05))
    assert damp_schedule(0.1, 0.0, 1.0) == (0.1,)
    assert len(damp_schedule(0.01, 0.01, 1.0)) == 100


@pytest.mark.parametrize("method", ["blocked", "solve"])
def test_factor_without_damping_on_a_well_conditioned_matrix(method):
    h = spd(3, 333)
    u = np.asarray(upper_inverse_factor(jnp.asarray(h, jnp.float32), method))
    assert np.all(np.tril(u, -1) == 0)
    inv = np.linalg.inv(h)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, inv, rtol=0,
                               atol=1e-6 * np.linalg.cond(h) * np.abs(inv).max())


@pytest.mark.parametrize("n,leaf", [(300, 64), (257, 32), (40, 128)])
def test_lower_triangular_inverse_matches_numpy(n, leaf):
    from jgptq.linalg import lower_triangular_inverse

    l = np.linalg.cholesky(spd(4, n))
    got = np.asarray(lower_triangular_inverse(jnp.asarray(l, jnp.float32), leaf), np.float64)
    assert np.all(np.triu(got, 1) == 0)
    # as accurate as a float32 triangular solve against the identity
    l32 = jnp.asarray(l, jnp.float32)
    base = np.asarray(jax.lax.linalg.triangular_solve(l32, jnp.eye(n), left_side=True, lower=True),
                      np.float64)
    l64 = np.asarray(l32, np.float64)
    resid = np.abs(got @ l64 - np.eye(n)).max()
    assert resid <= 3 * np.abs(base @ l64 - np.eye(n)).max() + 1e-6, resid
    np.testing.assert_allclose(got, np.linalg.inv(l64), rtol=1e-3,
                               atol=1e-4 * np.abs(np.linalg.inv(l64)).max())
