"""GPTQ against the float64 NumPy transcription of the reference, plus properties and bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgptq
from jgptq.config import GPTQConfig
from jgptq.solver import gptq, gptq_columns, gptq_shared, layer_objective, rtn
from jgptq.linalg import CholeskyError

import reference_numpy as ref

N_IN, N_OUT = 256, 32


def correlated_problem(seed: int, n_in: int = N_IN, n_out: int = N_OUT, dead: tuple = (5,)):
    """Weights [in, out] with a few outliers and a Hessian from correlated, unevenly scaled inputs
    (so act-order matters); input channels in ``dead`` never fire (zero Hessian diagonal)."""
    rng = np.random.default_rng(seed)
    t = 3 * n_in
    mix = rng.standard_normal((n_in, n_in)) * (1.2 / np.sqrt(n_in)) + np.eye(n_in)
    feat = np.exp(rng.normal(0.0, 0.7, n_in))
    x = (rng.standard_normal((t, n_in)) @ mix) * feat
    x[:, list(dead)] = 0.0
    h = (2.0 * x.T @ x / t).astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) * 0.05).astype(np.float32)
    w[rng.integers(0, n_in, 8), rng.integers(0, n_out, 8)] *= 8.0
    return w, h


@pytest.fixture(scope="module")
def problem():
    return correlated_problem(0)


CASES = [c for c in itertools.product((2, 3, 4, 8), (-1, 32, 128, 80), (True, False),
                                      (False, True), (False, True))
         if not (c[1] == -1 and c[4])]  # static groups mean nothing per channel


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static_groups", CASES)
def test_matches_float64_reference(problem, bits, group_size, sym, desc_act, static_groups):
    w, h = problem
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                     static_groups=static_groups)
    qw = gptq(jnp.asarray(w), jnp.asarray(h), cfg)
    r = ref.fasterquant(w, h, bits=bits, group_size=group_size, sym=sym, actorder=desc_act,
                        static_groups=static_groups)
    codes = np.asarray(qw.codes)
    assert codes.dtype == np.uint8 and codes.shape == (N_IN, N_OUT)
    equal, excused = ref.codes_agreement(codes, r)
    assert equal >= 0.999, f"only {equal:.5f} of codes equal the reference"
    assert excused <= N_OUT // 10, f"{excused} output channels diverged after a rounding tie"
    assert float(qw.loss) == pytest.approx(r["loss"], rel=1e-3)
    np.testing.assert_array_equal(np.asarray(qw.g_idx), r["g_idx"])
    np.testing.assert_allclose(np.asarray(qw.scales, np.float64), r["scales"], rtol=2e-3)
    # zeros may differ by one step only where a near-tied scale rounded differently
    assert np.mean(np.asarray(qw.zeros) == r["zeros"]) >= 0.99
    assert float(qw.damp) == pytest.approx(0.01)
    if desc_act and not static_groups and group_size != -1:
        assert not np.all(np.diff(np.asarray(qw.g_idx)) >= 0), "act-order g_idx should be shuffled"


@pytest.mark.parametrize("cfg", [
    GPTQConfig(bits=4, group_size=64, sym=False, desc_act=True, block_size=64),
    GPTQConfig(bits=3, group_size=48, sym=True, desc_act=False, block_size=32),
    GPTQConfig(bits=2, group_size=-1, sym=False, desc_act=True, block_size=128),
    GPTQConfig(bits=8, group_size=70, sym=True, desc_act=True, static_groups=True, block_size=50),
])
def test_ragged_shapes_and_block_sizes(cfg):
    # in_features 200: not a multiple of the block size nor of most group sizes
    w, h = correlated_problem(1, n_in=200, n_out=24, dead=(3, 150))
    qw = gptq(jnp.asarray(w), jnp.asarray(h), cfg)
    r = ref.fasterquant(w, h, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                        actorder=cfg.desc_act, static_groups=cfg.static_groups,
                        blocksize=cfg.block_size)
    assert ref.codes_agreement(qw.codes, r)[0] >= 0.999
    assert float(qw.loss) == pytest.approx(r["loss"], rel=1e-3)
    np.testing.assert_array_equal(np.asarray(qw.g_idx), r["g_idx"])


def test_mse_clip_search_matches_reference():
    w, h = correlated_problem(2, n_in=128, n_out=16)
    cfg = GPTQConfig(bits=3, group_size=32, sym=False, mse=1.0)
    qw = gptq(jnp.asarray(w), jnp.asarray(h), cfg)
    r = ref.fasterquant(w, h, bits=3, group_size=32, sym=False, actorder=False,
                        static_groups=False, mse=True)
    assert ref.codes_agreement(qw.codes, r)[0] >= 0.999
    assert float(qw.loss) == pytest.approx(r["loss"], rel=1e-3)
    plain = gptq(jnp.asarray(w), jnp.asarray(h), cfg.replace(mse=0.0))
    assert not np.array_equal(np.asarray(plain.scales), np.asarray(qw.scales))


@pytest.mark.parametrize("cfg", [GPTQConfig(bits=4, group_size=32, sym=False),
                                 GPTQConfig(bits=3, group_size=-1, desc_act=True),
                                 GPTQConfig(bits=2, group_size=80, static_groups=True)])
def test_identity_hessian_gives_rtn(cfg):
    w, _ = correlated_problem(3)
    qw = gptq(jnp.asarray(w), jnp.eye(N_IN, dtype=jnp.float32) * 3.0, cfg)
    r = rtn(jnp.asarray(w), cfg)
    np.testing.assert_array_equal(np.asarray(qw.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(qw.scales), np.asarray(r.scales))
    np.testing.assert_array_equal(np.asarray(r.codes),
                                  ref.rtn(w, bits=cfg.bits, group_size=cfg.group_size,
                                          sym=cfg.sym))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_rtn_on_correlated_inputs(problem, bits):
    w, h = problem
    for cfg in (GPTQConfig(bits=bits, group_size=32, sym=False),
                GPTQConfig(bits=bits, group_size=-1, desc_act=True)):
        q_g = gptq(jnp.asarray(w), jnp.asarray(h), cfg).dequantize()
        q_r = rtn(jnp.asarray(w), cfg).dequantize()
        obj_g = float(layer_objective(w, q_g, h))
        obj_r = float(layer_objective(w, q_r, h))
        assert obj_g < 0.9 * obj_r, (cfg, obj_g, obj_r)


def test_dequantize_matches_fake_quant_of_reference(problem):
    w, h = problem
    cfg = GPTQConfig(bits=4, group_size=128, sym=False, desc_act=True)
    qw = gptq(jnp.asarray(w), jnp.asarray(h), cfg)
    r = ref.fasterquant(w, h, bits=4, group_size=128, sym=False, actorder=True,
                        static_groups=False)
    deq_ref = r["scales"][r["g_idx"]] * (r["codes"] - r["zeros"][r["g_idx"]])
    close = np.isclose(np.asarray(qw.dequantize()), deq_ref, rtol=1e-3, atol=1e-6)
    assert close.mean() >= 0.999
    # the checkpoint round trip reproduces the dequantized weight bit for bit
    t = qw.to_gptq_tensors("gptq_v2")
    back = jgptq.QuantizedWeight.from_gptq_tensors(t, bits=4, group_size=128, sym=False,
                                                   checkpoint_format="gptq_v2")
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qw.dequantize()))


def test_shared_hessian_equals_separate_solves(problem):
    w, h = problem
    cfg = GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False)
    parts = [w[:, :16], w[:, 16:]]
    together = gptq_shared([jnp.asarray(p) for p in parts], jnp.asarray(h), cfg)
    for p, q in zip(parts, together):
        alone = gptq(jnp.asarray(p), jnp.asarray(h), cfg)
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(alone.codes))
        np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(alone.scales))
        assert float(q.loss) == pytest.approx(float(alone.loss), rel=1e-5)


def test_column_losses_sum_to_loss(problem):
    w, h = problem
    qw, cols = gptq_columns(jnp.asarray(w), jnp.asarray(h), GPTQConfig(bits=3, group_size=32))
    assert cols.shape == (N_OUT,)
    r = ref.fasterquant(w, h, bits=3, group_size=32, sym=True, actorder=False,
                        static_groups=False)
    np.testing.assert_allclose(np.asarray(cols), r["losses"].sum(axis=0), rtol=2e-3)
    assert float(qw.loss) == pytest.approx(float(np.sum(cols)), rel=1e-6)


def test_runs_under_jit_with_a_static_config(problem):
    w, h = problem
    cfg = GPTQConfig(bits=4, group_size=32)
    f = jax.jit(lambda w, h: gptq(w, h, cfg).to_params())
    lin = f(jnp.asarray(w), jnp.asarray(h))
    eager = gptq(jnp.asarray(w), jnp.asarray(h), cfg).to_params()
    for k in lin:
        np.testing.assert_array_equal(np.asarray(lin[k]), np.asarray(eager[k]))


def test_indefinite_hessian_raises_eagerly_and_is_nan_under_jit():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    h = -np.eye(64, dtype=np.float32) - 0.1
    cfg = GPTQConfig(bits=4, group_size=32, damp_auto_increment=0.1, damp_max=0.5)
    with pytest.raises(CholeskyError, match=r"\(64, 64\).*5 damping values from 0\.01 to 0\.41"):
        gptq(jnp.asarray(w), jnp.asarray(h), cfg, name="blk.0.q_proj")
    qw = jax.jit(lambda w, h: gptq(w, h, cfg))(jnp.asarray(w), jnp.asarray(h))
    assert np.isnan(float(qw.damp)) and np.isnan(float(qw.loss))


def test_damping_is_raised_until_the_factorisation_works():
    rng = np.random.default_rng(6)
    n = 64
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(0.5, 1.5, n)
    eig[0] = -0.015 * eig.sum() / n * 1.0  # needs damping > 1.5% of the mean diagonal
    h = (q * eig) @ q.T
    h = h * (n / np.trace(h))              # mean diagonal 1, same sign pattern
    w = rng.standard_normal((n, 4)).astype(np.float32)
    qw = gptq(jnp.asarray(w), jnp.asarray(h.astype(np.float32)), GPTQConfig(group_size=32))
    assert 0.015 < float(qw.damp) <= 0.04


def test_bad_inputs_are_rejected_clearly(problem):
    w, h = problem
    cfg = GPTQConfig(bits=4, group_size=32)
    wn = w.copy()
    wn[3, 4] = np.nan
    with pytest.raises(ValueError, match="w .* NaN or Inf"):
        gptq(jnp.asarray(wn), jnp.asarray(h), cfg)
    hn = h.copy()
    hn[0, 1] = np.inf
    with pytest.raises(ValueError, match="h .* NaN or Inf"):
        gptq(jnp.asarray(w), jnp.asarray(hn), cfg)
    with pytest.raises(ValueError, match=r"Hessian \[in_features, in_features\]"):
        gptq(jnp.asarray(w), jnp.asarray(h[:100, :100]), cfg)
    with pytest.raises(ValueError, match="group_size 512 is larger than in_features 256"):
        gptq(jnp.asarray(w), jnp.asarray(h), GPTQConfig(group_size=512))
    with pytest.raises(ValueError, match="Flax kernel"):
        gptq(jnp.asarray(w[0]), jnp.asarray(h), cfg)
    with pytest.raises(ValueError, match="bits must be one of"):
        GPTQConfig(bits=5)
    with pytest.raises(ValueError, match="no calibration data"):
        gptq(jnp.asarray(w), jnp.zeros_like(jnp.asarray(h)), cfg)
    with pytest.raises(TypeError, match="GPTQConfig"):
        gptq(jnp.asarray(w), jnp.asarray(h), {"bits": 4})
    with pytest.raises(ValueError, match="w .* NaN or Inf"):
        rtn(jnp.asarray(wn), cfg)


def test_public_names_are_exported(problem):
    import jgptq.solver as solver_module  # importing the implementation must not shadow ``jgptq.gptq``

    w, h = problem
    cfg = GPTQConfig(bits=4, group_size=32)
    a = jgptq.gptq(jnp.asarray(w), jnp.asarray(h), cfg)
    b = solver_module.gptq(jnp.asarray(w), jnp.asarray(h), cfg)
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert jgptq.gptq is solver_module.gptq and callable(jgptq.gptq)
    assert jgptq.rtn is rtn
    assert jgptq.CholeskyError is CholeskyError
    assert jgptq.GPTQConfig is GPTQConfig


def test_pallas_block_kernel_matches_numpy():
    # the GPU in-block kernel, run by the Pallas interpreter on CPU, against the reference's
    # right-looking column loop in float64; out=40 is not a multiple of the kernel's tile
    from jgptq.solver import _block_pallas

    rng = np.random.default_rng(7)
    bs, n, maxq = 32, 40, 15.0
    w1 = rng.standard_normal((bs, n)).astype(np.float32)
    u1 = (np.triu(rng.standard_normal((bs, bs)) * 0.2, 1) + np.diag(rng.uniform(0.5, 1.5, bs)))
    u1 = u1.astype(np.float32)
    s = rng.uniform(0.2, 0.4, (bs, n)).astype(np.float32)
    z = rng.integers(4, 12, (bs, n)).astype(np.float32)
    err, codes = _block_pallas(jnp.asarray(w1), jnp.asarray(u1), jnp.asarray(s), jnp.asarray(z),
                               jnp.float32(maxq), interpret=True)
    W1 = w1.astype(np.float64).copy()
    exp_codes = np.zeros((bs, n))
    exp_err = np.zeros((bs, n))
    for i in range(bs):
        c = np.clip(np.round(W1[i] / s[i]) + z[i], 0, maxq)
        e = (W1[i] - s[i] * (c - z[i])) / u1[i, i]
        W1[i:] -= np.outer(u1[i, i:], e)
        exp_codes[i], exp_err[i] = c, e
    np.testing.assert_array_equal(np.asarray(codes), exp_codes.astype(np.uint8))
    np.testing.assert_allclose(np.asarray(err), exp_err, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        gptq_columns(jnp.asarray(w1), jnp.eye(bs), GPTQConfig(group_size=16), impl="cuda")
