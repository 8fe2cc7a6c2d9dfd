"""Persistent decode MLP (``persistent_mlp.gptq_mlp_mgpu``) vs a float64 NumPy gated MLP.

CPU: the kernel body in the Mosaic GPU interpreter (one CTA running every work item of both
phases, K unsplit, no barrier: the interpreter has no semaphores or TMA reduction), and the
multi-CTA hardware kernel *lowered* for CUDA (barrier, fences, TMA reduce-adds). GPU (``-m gpu``):
compiled and run for real, several launches in a row (the barrier's counters must end at 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
from jgptq.pallas_kernels import persistent_mlp as pm
from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

from dequant_reference import np_dequant, rel_err  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


def mlp(seed, d, inter, n=None, *, gs=128, act_order=False):
    """A fused [gate | up] layer (one GPTQ linear of 2 x inter columns: one g_idx, as a fused
    checkpoint layer has) and a down projection, with their float64 weights."""
    n = n or d
    gu = random_gptq_linear(jax.random.key(seed), d, 2 * inter, bits=4, group_size=gs, act_order=act_order)
    dn = random_gptq_linear(jax.random.key(seed + 1), inter, n, bits=4, group_size=gs)
    return (np_dequant(gu, 4), np_dequant(dn, 4), mg.pack_mgpu_linear(gu, bits=4), mg.pack_mgpu_linear(dn, bits=4))


def np_mlp(h, w_gu, w_d, dtype=jnp.bfloat16):
    """float64 ``silu(h @ gate) * (h @ up) @ down``; the activation rounded to ``dtype`` once, as
    the kernel makes its x tiles."""
    x = np.asarray(jnp.asarray(h).astype(jnp.float32), np.float64).reshape(-1, w_gu.shape[0])
    gu = x @ w_gu
    g, u = np.split(gu, 2, axis=-1)
    a = g / (1.0 + np.exp(-g)) * u
    a = np.asarray(jnp.asarray(a, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)
    return a @ w_d


@pytest.mark.parametrize("d,inter,m,gs,act_order", [
    (256, 384, 1, 128, False),
    (320, 384, 5, 128, True),   # gate/up K padded 320 -> 384, with act-order
    (128, 4992, 3, 128, False),  # down K split-padded 4992 -> 5120: its last K block reads gu's zero columns
    (256, 256, 16, 64, False),  # 16 tokens, g64 (K blocks of 64)
])
def test_interpreter_matches_float64(d, inter, m, gs, act_order):
    w_gu, w_d, gup, dn = mlp(7 + m, d, inter, gs=gs, act_order=act_order)
    assert (gup.perm is not None) == act_order and (dn.k_pad == 5120 if inter == 4992 else True)
    h = jax.random.normal(jax.random.key(m), (m, d), jnp.float32).astype(jnp.bfloat16)
    ref = np_mlp(h, w_gu, w_d)
    y = pm.gptq_mlp_mgpu(h, gup, dn, interpret=True)
    assert y.shape == (1, m, d) and y.dtype == jnp.float32
    assert rel_err(y[0], ref) < 8e-3
    # the jnp reference agrees too (it dequantizes the packed layers)
    assert rel_err(pm.reference(h, gup, dn), ref) < 8e-3
    # acc: addends (a residual) come back added; gu: caller-made zeros
    _, y_shape = pm.accumulator_shapes(m, gup, dn, interpret=True)
    acc = jax.random.normal(jax.random.key(99), y_shape, jnp.float32)
    gu0 = jnp.zeros(pm.accumulator_shapes(m, gup, dn, interpret=True)[0], jnp.float32)
    y2 = pm.gptq_mlp_mgpu(h, gup, dn, acc=acc, gu=gu0, interpret=True)
    assert rel_err(y2[0], ref + np.asarray(acc[0, :m, :d], np.float64)) < 8e-3


def test_leading_dims_and_float16():
    w_gu, w_d, gup, dn = mlp(3, 256, 256)
    gup16 = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(3), 256, 512, bits=4, group_size=128), bits=4,
                                dtype=jnp.float16)
    h = jax.random.normal(jax.random.key(4), (2, 3, 256), jnp.float32)
    y = pm.gptq_mlp_mgpu(h.astype(jnp.bfloat16), gup, dn, interpret=True)
    assert y.shape == (1, 2, 3, 256)
    assert rel_err(y[0].reshape(6, 256), np_mlp(h.astype(jnp.bfloat16), w_gu, w_d)) < 8e-3
    dn16 = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(4), 256, 256, bits=4, group_size=128), bits=4,
                               dtype=jnp.float16)
    y16 = pm.gptq_mlp_mgpu(h.astype(jnp.float16), gup16, dn16, interpret=True)
    assert rel_err(y16[0].reshape(6, 256), np_mlp(h.astype(jnp.float16), w_gu, w_d, jnp.float16)) < 8e-3


def test_bad_inputs_are_refused_by_name():
    _, _, gup576, dn576 = mlp(4, 256, 576)
    with pytest.raises(ValueError, match="intermediate size 576 must be a multiple"):
        pm.gptq_mlp_mgpu(jnp.ones((1, 256), jnp.bfloat16), gup576, dn576, interpret=True)
    _, _, gup, dn = mlp(5, 256, 384)
    h = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        pm.gptq_mlp_mgpu(h.astype(jnp.float32), gup, dn, interpret=True)
    with pytest.raises(ValueError, match=r"K=256"):
        pm.gptq_mlp_mgpu(jnp.ones((2, 128), jnp.bfloat16), gup, dn, interpret=True)
    with pytest.raises(ValueError, match="1 to 16 tokens"):
        pm.gptq_mlp_mgpu(jnp.ones((17, 256), jnp.bfloat16), gup, dn, interpret=True)
    _, _, _, dn_other = mlp(6, 384, 256)
    with pytest.raises(ValueError, match="N = 2 x down's K"):
        pm.gptq_mlp_mgpu(h, gup, dn_other, interpret=True)
    with pytest.raises(ValueError, match="MgpuPacked"):
        pm.gptq_mlp_mgpu(h, gup, {"qweight": 0}, interpret=True)
    dn_perm = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(8), 384, 256, bits=4, group_size=128,
                                                     act_order=True), bits=4)
    assert dn_perm.perm is not None
    with pytest.raises(ValueError, match="act-order"):
        pm.gptq_mlp_mgpu(h, gup, dn_perm, interpret=True)
    with pytest.raises(ValueError, match=r"acc must be float32 \(1, 8, 256\)"):
        pm.gptq_mlp_mgpu(h, gup, dn, acc=jnp.zeros((1, 2, 256), jnp.float32), interpret=True)
    cfg = pm.default_config(2, gup, dn, interpret=True)
    with pytest.raises(ValueError, match="ctas_per_sm must be 1 to 4"):
        pm.gptq_mlp_mgpu(h, gup, dn, config=dataclasses.replace(cfg, ctas_per_sm=5), interpret=True)
    with pytest.raises(ValueError, match="split_k=1"):  # the interpreter has no TMA reduction
        pm.gptq_mlp_mgpu(h, gup, dn, interpret=True,
                         config=dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, split_k=2)))
    with pytest.raises(ValueError, match="token-major 'grid'"):
        pm.gptq_mlp_mgpu(h, gup, dn, interpret=True,
                         config=dataclasses.replace(cfg, down=dataclasses.replace(cfg.down, transpose_out=False)))
    # 16 stages of gate/up tiles for each of 4 CTAs per SM: more than an SM holds with 64- or 128-row tiles
    big = dataclasses.replace(cfg, ctas_per_sm=4, gate_up=dataclasses.replace(cfg.gate_up, num_stages=16))
    assert 4 * pm._smem_bytes(big, gup, dn, h.dtype) > pm.SMEM_BYTES
    with pytest.raises(ValueError, match="4 CTAs per SM need .* shared memory"):
        pm.gptq_mlp_mgpu(h, gup, dn, config=big, interpret=True)


@pytest.mark.parametrize("m", [1, 16])
def test_hardware_kernel_lowers_for_cuda(m, monkeypatch):
    """The multi-CTA kernel (K split and TMA-added, counter barrier between the phases, proxy
    fences around it) at a 7B-like ratio of shapes, lowered for CUDA; with one CTA no barrier."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 132)
    _, _, gup, dn = mlp(11, 1024, 2816)
    cfg = pm.default_config(m, gup, dn)
    assert cfg.gate_up.split_k > 1 and cfg.down.split_k > 1 and cfg.down.split_reduce == "tma"
    steps = gup.k_pad // cfg.gate_up.block_k // cfg.gate_up.split_k
    assert cfg.gate_up.num_stages <= steps
    gs, ys = pm.accumulator_shapes(m, gup, dn)
    assert gs == (1, m if m < 8 else 16, 2816 + dn.k_pad) and ys == (1, gs[1], 1024)
    h = jnp.ones((m, 1024), jnp.bfloat16)
    args = (h, gup, dn, jnp.zeros(gs, jnp.float32), jnp.zeros(ys, jnp.float32), cfg)
    text = pm._forward.trace(*args, 264, False).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    for ptx in ("fence.proxy.async.global", "red.release.gpu", "ld.relaxed.gpu"):
        assert ptx in text, ptx
    one = pm._forward.trace(*args, 1, False).lower(lowering_platforms=("cuda",)).as_text()
    assert "fence.proxy.async.global" not in one and "red.release.gpu" not in one
    # its items wait for their TMA adds in full (they signal the barrier next), whatever the configs say
    reads = []
    for sw in ("full", "read"):
        c = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, store_wait=sw),
                                down=dataclasses.replace(cfg.down, store_wait=sw))
        reads.append(str(jax.make_jaxpr(lambda h, c=c: pm._forward(h, *args[1:5], c, 264, False))(h))
                     .count("wait_read_only=True"))
    assert reads[0] == reads[1], reads
    # the next work item's weights are prefetched into L2 (frag layouts), unless turned off
    for pf in (True, False):
        c = dataclasses.replace(cfg, prefetch=pf)
        jaxpr = str(jax.make_jaxpr(lambda h, c=c: pm._forward(h, *args[1:5], c, 264, False))(h))
        assert ("async_prefetch" in jaxpr) == pf


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
def test_compiled_on_gpu_matches_float64(m):
    """Real launches (every CTA resident, the barrier between the phases), 1 to 4 CTAs per SM
    (3 and 4 with fewer pipeline stages, as timed), three launches in a row with the same result up
    to the fp32 order of the TMA adds."""
    w_gu, w_d, gup, dn = mlp(21 + m, 1024, 2816)
    h = jax.random.normal(jax.random.key(m), (m, 1024), jnp.float32).astype(jnp.bfloat16)
    ref = np_mlp(h, w_gu, w_d)
    for cps in ("1", "2", "3s2", "4s2", "2k4"):
        cfg = pm._variant(cps, pm.default_config(m, gup, dn), gup)
        if m == 16 and cps == "4s2":  # its down phase's fp32 x tiles: too much shared memory for 4
            with pytest.raises(ValueError, match="shared memory"):
                pm.gptq_mlp_mgpu(h, gup, dn, config=cfg)
            continue
        f = jax.jit(lambda h, cfg=cfg: pm.gptq_mlp_mgpu(h, gup, dn, config=cfg))
        ys = [np.asarray(f(h)[0], np.float64) for _ in range(3)]
        for y in ys:
            assert rel_err(y, ref) < 8e-3, cps
        np.testing.assert_allclose(ys[1], ys[0], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_timing_variants():
    """main()'s variant specs: CTAs per SM, a cap on both phases' pipeline stages, no prefetch;
    a bad spec is refused by name."""
    gup, dn = mlp(5, 256, 384)[2:]
    cfg = pm.default_config(16, gup, dn)
    v = pm._variant("4s2nopf", cfg)
    assert (v.ctas_per_sm, v.prefetch) == (4, False)
    assert v.gate_up.num_stages == min(2, cfg.gate_up.num_stages) and v.down.num_stages == min(2, cfg.down.num_stages)
    assert dataclasses.replace(v, ctas_per_sm=2, prefetch=True, gate_up=cfg.gate_up, down=cfg.down) == cfg
    assert pm._variant("2", cfg) == cfg
    k = pm._variant("2k2", cfg, gup)
    assert k.gate_up.split_k == 2 and k.gate_up.num_stages == min(8, gup.k_pad // cfg.gate_up.block_k // 2)
    assert k.down == cfg.down
    with pytest.raises(ValueError, match="variant '5'"):
        pm._variant("5", cfg)
    with pytest.raises(ValueError, match="variant '2k2'"):  # a split needs the gate/up layer
        pm._variant("2k2", cfg)


def test_dispatch_switch_and_refusals():
    """dispatch.mlp_in_kernel: on for two Mosaic-prepared layers of a fused MLP at 1-16 tokens,
    off for the Triton kernel, 17 tokens, float32 or mismatched layers; matmul_mlp then refuses
    with the reason; where on it gives the kernel's result with the accumulators' shapes."""
    from jgptq.pallas_kernels import dispatch

    gu = random_gptq_linear(jax.random.key(31), 256, 768, bits=4, group_size=128)
    dn = random_gptq_linear(jax.random.key(32), 384, 256, bits=4, group_size=128)
    prep = lambda lin, kernel="mgpu": dispatch.prepare(lin, bits=4, backend="gpu", interpret=True,  # noqa: E731
                                                        gpu_kernel=kernel)
    pg, pd = prep(gu), prep(dn)
    assert dispatch.mlp_in_kernel((2, 1, 256), jnp.bfloat16, pg, pd)
    assert not dispatch.mlp_in_kernel((17, 256), jnp.bfloat16, pg, pd)
    assert not dispatch.mlp_in_kernel((2, 256), jnp.float32, pg, pd)
    assert not dispatch.mlp_in_kernel((2, 256), jnp.bfloat16, prep(gu, "triton"), pd)
    assert not dispatch.mlp_in_kernel((2, 256), jnp.bfloat16, pd, pg)
    assert dispatch.mlp_accumulators((17, 256), jnp.bfloat16, pg, pd) is None
    gs, ys = dispatch.mlp_accumulators((2, 1, 256), jnp.bfloat16, pg, pd)
    assert gs == pm.accumulator_shapes(2, pg.packed, pd.packed, interpret=True)[0] and ys[-1] == 256
    h = jax.random.normal(jax.random.key(33), (2, 1, 256), jnp.float32).astype(jnp.bfloat16)
    y = dispatch.matmul_mlp(h, pg, pd, gu=jnp.zeros(gs, jnp.float32), acc=jnp.zeros(ys, jnp.float32))
    assert y.shape == (1, 2, 1, 256)
    assert rel_err(y[0].reshape(2, 256), np_mlp(h, np_dequant(gu, 4), np_dequant(dn, 4))) < 8e-3
    with pytest.raises(ValueError, match=r"17 tokens \(1 to 16\)"):
        dispatch.matmul_mlp(jnp.ones((17, 256), jnp.bfloat16), pg, pd)
    with pytest.raises(ValueError, match="persistent MLP kernel does not apply"):
        dispatch.matmul_mlp(h, prep(gu, "triton"), pd)


def test_benchmark_main_runs_in_the_interpreter(monkeypatch, capsys):
    """``python -m jgptq.pallas_kernels.persistent_mlp`` (the GPU timing) on tiny shapes through the
    interpreter: one JSON row per M, both paths within fp32 / bf16 rounding of the reference."""
    import json
    import sys

    monkeypatch.setattr(sys, "argv", ["persistent_mlp", "--interpret", "--hidden", "128", "--inter", "256",
                                      "--ms", "1,3", "--copies", "2", "--reps", "2", "--variants", "2,1nopf"])
    pm.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["M"] for r in rows] == [1, 3]
    for r in rows:
        for key in ("two_launches_err", "persistent_cps2_err", "persistent_cps1nopf_err"):
            assert 0 <= r[key] < 8e-3, (key, r)
        assert r["persistent_cps2_us"] > 0 and r["two_launches_us"] > 0
