"""Mosaic GPU GPTQ kernel (``gptq_matmul_mgpu``) vs float64 NumPy GPTQ dequantization.

CPU: the kernel through the Mosaic GPU interpreter (same grid, pipeline, TMA copies and SMEM
tiles; per-chunk dequant + MMA in jnp), and the hardware path *lowered* for CUDA (Pallas ->
Mosaic GPU incl. layout inference; no ptxas). GPU (``-m gpu``): compiled and run for real.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq.pallas_kernels import dispatch
from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

from dequant_reference import np_dequant, rel_err  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


def make(seed, k, n, bits, gs, act_order, dtype=jnp.bfloat16):
    lin = random_gptq_linear(jax.random.key(seed), k, n, bits=bits, group_size=gs, act_order=act_order)
    return lin, np_dequant(lin, bits), mg.pack_mgpu_linear(lin, bits=bits, dtype=dtype)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits,gs,act_order,k", [(4, 128, True, 576), (4, -1, False, 320), (8, 32, False, 256),
                                                  (4, 64, False, 384)])
def test_pack_dequant_matches_numpy(bits, gs, act_order, k):
    lin, w64, default = make(1, k, 72, bits, gs, act_order)
    assert default.layout == ("frag" if bits == 4 else "kblocks") == mg.default_layout(bits)
    kb = mg.pack_mgpu_linear(lin, bits=bits, layout="kblocks")
    p = mg.pack_mgpu_linear(lin, bits=bits, layout="nk")
    assert p.w.shape == (128, p.k_pad) and p.w.dtype == (jnp.int4 if bits == 4 else jnp.int8)
    assert p.layout == "nk" and p.w_nk() is p.w and kb.layout == "kblocks"
    assert kb.w.shape == (p.k_pad // 128, 128, 128) and kb.w.dtype == p.w.dtype
    assert np.array_equal(np.asarray(kb.w_nk(), np.int8), np.asarray(p.w, np.int8))
    # tile (n tile 0, K block 1) of "kblocks" is one contiguous block of memory holding w[:, 128:256]
    assert np.array_equal(np.asarray(kb.w[1], np.int8), np.asarray(p.w[:, 128:256], np.int8))
    assert p.sz.shape == (2, *p.scales.shape) and p.sz.dtype == jnp.bfloat16
    assert p.k_pad % 128 == 0 and p.k_pad % p.group_size == 0 and p.scales.shape == (p.k_pad // p.group_size, 128)
    w = np.asarray(mg.dequantize_mgpu(p, jnp.float32), np.float64)[: k, :72]
    if p.perm is not None:  # dequantize_mgpu is in permuted K order
        w = w[np.argsort(np.asarray(p.perm))]
    # scales were rounded to bf16 at pack time
    np.testing.assert_allclose(w, w64, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("k,gs,want", [(4992, 128, 5120), (11008, 128, 11264), (4992, -1, 5120), (576, 128, 640),
                                       (1536, 64, 1536), (4096, 128, 4096), (3968, 128, 3968), (14336, 32, 14336)])
def test_split_pad_widens_k_for_split_k(k, gs, want, monkeypatch):
    """K padded (zero codes, zero-scale groups) to a multiple of 8 x 128 when that adds at most K / 32,
    so the decode grid can split K 8+ ways (K = 11008: 86 blocks = 2 x 43 -> 88); the dequantized
    weight is unchanged; split_pad=False keeps the plain 128 / group alignment."""
    lin = random_gptq_linear(jax.random.key(k), k, 72, bits=4, group_size=gs, act_order=gs > 0)
    p = mg.pack_mgpu_linear(lin, bits=4)
    plain = mg.pack_mgpu_linear(lin, bits=4, split_pad=False)
    assert p.k_pad == want and plain.k_pad == -(-k // 128) * 128
    assert p.k == plain.k == k and p.k_pad % p.group_size == 0
    if gs > 0:
        assert p.group_size == plain.group_size == gs
        assert not np.asarray(p.scales[-(-k // gs):], np.float32).any()  # the added groups scale by 0
    else:
        assert p.group_size == p.k_pad
    w, w_plain = (np.asarray(mg.dequantize_mgpu(q, jnp.float32)) for q in (p, plain))
    np.testing.assert_array_equal(w[:plain.k_pad], w_plain)
    assert not w[plain.k_pad:].any() if gs > 0 else True
    if k == 11008:  # the decode grid at 9-16 tokens: 22 K splits of 4 blocks (704 CTAs at N = 4096), not 2 of
        # 43 (64 CTAs); at M <= 8 (2 blocks per CTA at least, 64 splits at most) 44 of 2, not 43 of 2
        monkeypatch.setattr(mg, "_num_sms", lambda: 132)
        assert mg.default_config(16, p).split_k == 22 and mg.default_config(16, plain).split_k == 2
        assert mg.default_config(1, p).split_k == 44 and mg.default_config(1, plain).split_k == 43
        assert mg.default_config(1, p).block_n == 64 and mg.default_config(16, p).block_n == 128
        # decode grids TMA-reduce their partials on hardware (the interpreter adds them in XLA)
        assert mg.default_config(1, p).split_reduce == "tma" and mg._tma_reduces(mg.default_config(1, p), False)
        assert not mg._tma_reduces(mg.default_config(1, p), True)
        assert mg._grid_config(1, p, max_split=16, min_steps=4).split_k == 11


def test_decode_grid_tiles_of_the_7b_layers(monkeypatch):
    """The default decode grid (132 SMs) for the 7B step's layers, as session 20 measured it in the
    step on the H100: at M <= 8 2+ K blocks per CTA, up to 64 splits, 64-row N tiles where 128-row
    ones stay under 16 CTAs per SM; at 9-16 tokens 128-row tiles (64 for the wide layers), 4+ blocks
    per CTA, up to 32 splits. 8192 x 28672 keeps 128-row tiles and 16 splits at M = 1. At 9-16 tokens
    the default moves o_proj and down_proj (not wide, at least 4096 x 4096) to stream-K with 2 CTAs
    per SM and 128-row tiles (session 24), the grid's token tile and stages kept."""
    import types

    monkeypatch.setattr(mg, "_num_sms", lambda: 132)
    layers = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11264, 4096),
              "big": (8192, 28672)}
    small = {"qkv": (64, 16), "o": (64, 16), "gate_up": (128, 16), "down": (64, 44), "big": (128, 16)}
    want = {1: small, 8: small,
            16: {"qkv": (64, 8), "o": (128, 8), "gate_up": (64, 8), "down": (128, 22), "big": (64, 16)}}
    for m, by_layer in want.items():
        for name, (k_pad, n) in layers.items():
            p = types.SimpleNamespace(k_pad=k_pad, n_pad=n, group_size=128)
            cfg = mg._grid_config(m, p)
            assert (cfg.block_n, cfg.split_k) == by_layer[name], (m, name, cfg)
            assert cfg.schedule == "grid" and cfg.split_reduce == "tma" and cfg.block_m == (8 if m <= 8 else 16)
            assert k_pad // cfg.block_k // cfg.split_k >= (2 if m <= 8 else 4)
            default = mg.default_config(m, p)
            if m == 16 and name in ("o", "down"):  # stream-K, 2 CTAs per SM, 128-row tiles (H100 session 24)
                assert default == dataclasses.replace(cfg, schedule="stream", split_k=1, ctas_per_sm=2, block_n=128,
                                                      transpose_out=True, split_reduce="tma"), (name, default)
                assert default.writes_y and default.block_m == 16
            else:
                assert default == cfg, (m, name)
    ns = types.SimpleNamespace
    assert mg.default_config(16, ns(k_pad=2048, n_pad=2048, group_size=128)).schedule == "grid"  # under 4096 x 4096
    o_proj = ns(k_pad=4096, n_pad=4096, group_size=128)
    assert mg.default_config(9, o_proj).schedule == "stream" and mg.default_config(8, o_proj).schedule == "grid"


def test_prefill_schedule_by_sm_coverage(monkeypatch):
    """Above 64 tokens (132 SMs): whole 256-token tiles once they cover 5/8 of the SMs, else stream-K
    over 128-token tiles with K blocks of 128 (64 for group size 64), as measured on the H100 in session 21."""
    import types

    monkeypatch.setattr(mg, "_num_sms", lambda: 132)
    want = {  # (K, N, M): (schedule, block_m, block_k)
        (4096, 14336, 256): ("tiles", 256, 64),  # 112 tiles, 85 % of the SMs
        (4096, 4096, 1024): ("tiles", 256, 64),  # 128 tiles
        (14336, 4096, 1024): ("tiles", 256, 64),
        (4096, 4096, 256): ("stream", 128, 128),  # 32 tiles
        (14336, 4096, 256): ("stream", 128, 128),
        (8192, 28672, 256): ("tiles", 256, 64),
        (4096, 4096, 4096): ("tiles", 256, 64),
        (4096, 14336, 128): ("tiles", 128, 128),
        (4096, 4096, 128): ("stream", 128, 128),
    }
    for (k, n, m), (schedule, bm, bk) in want.items():
        cfg = mg.default_config(m, types.SimpleNamespace(k_pad=k, n_pad=n, group_size=128, bits=4))
        assert (cfg.schedule, cfg.block_m, cfg.block_k) == (schedule, bm, bk), (k, n, m, cfg)
        assert cfg.compute_wgs == 2 and cfg.split_k == 1
    # 82 tiles of 160 SMs (51 %) stay stream-K; 8-bit weights and groups of 32 / 64 keep stream-K's K blocks
    # of 64 (128 overflowed SMEM on the H100 for 8-bit g128 and 4-bit g32)
    monkeypatch.setattr(mg, "_num_sms", lambda: 160)
    ns = types.SimpleNamespace
    assert mg.default_config(256, ns(k_pad=4096, n_pad=10496, group_size=128, bits=4)).schedule == "stream"
    for bits, gs in ((4, 64), (4, 32), (8, 128)):
        cfg = mg.default_config(130, ns(k_pad=2048, n_pad=1024, group_size=gs, bits=bits))
        assert (cfg.schedule, cfg.block_k) == ("stream", 64), (bits, gs, cfg)
    assert mg.default_config(130, ns(k_pad=2048, n_pad=1024, group_size=2048, bits=4)).block_k == 128  # per channel


def test_split_pad_kernel_matches_numpy(monkeypatch):
    """A split-padded layer (K = 4992 -> 5120) through the interpreter with K split 8 ways (the
    last split holds the padding block) and through the default decode config, vs float64."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    lin, w64, p = make(77, 4992, 128, 4, 128, True)
    assert p.k_pad == 5120
    x = jax.random.normal(jax.random.key(5), (3, 4992), jnp.float32).astype(jnp.bfloat16)
    ref64 = np.asarray(x, np.float64) @ w64
    for cfg in (mg.MgpuConfig(block_m=8, block_n=64, block_k=128, split_k=8, num_stages=2, scale_mode="acc"),
                mg.default_config(3, p)):
        assert rel_err(mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True), ref64) < 8e-3, cfg


def test_pack_refusals_and_errors():
    lin, _, _ = make(2, 256, 128, 4, 128, False)
    assert mg.pack_mgpu_linear(dict(lin, g_idx=jnp.repeat(jnp.arange(3), jnp.asarray([100, 100, 56]),
                                                          total_repeat_length=256).astype(jnp.int32),
                                    scales=lin["scales"][:1].repeat(3, 0), zeros=lin["zeros"][:1].repeat(3, 0)),
                               bits=4) is None  # group size 100: no layout
    with pytest.raises(ValueError, match="bits in"):
        mg.pack_mgpu_linear(lin, bits=2)
    with pytest.raises(ValueError, match="dtype"):
        mg.pack_mgpu_linear(lin, bits=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mg.pack_mgpu_linear(dict(lin, scales=lin["scales"].at[0, 0].set(jnp.inf)), bits=4)
    with pytest.raises(ValueError, match="qweight must be int32"):
        mg.pack_mgpu_linear(lin, bits=8)


def _np_frag_words(codes_nk: np.ndarray) -> np.ndarray:
    """Independent loop transcription of the "frag" packing from the PTX m64k16 A fragment: lane
    4g+t of a warp holds (row g, cols 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..) of a
    16 x 16 tile as slots 0..3, the pair's values at nibbles slot and slot+4."""
    n, k = codes_nk.shape
    out = np.zeros((k // 128, n // 16, 256), np.uint32)
    for kb in range(k // 128):
        for rg in range(n // 16):
            for c in range(2):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for i in range(4):
                        word = 0
                        for slot, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                            for v in range(2):
                                q = codes_nk[16 * rg + g + dr, 128 * kb + 64 * c + 16 * i + 2 * t + dc + v]
                                word |= int(q) << (4 * (slot + 4 * v))
                        out[kb, rg, c * 128 + lane * 4 + i] = word
    return out.view(np.int32)


def test_frag_layout_packs_the_wgmma_fragment():
    codes = np.asarray(jax.random.randint(jax.random.key(5), (32, 256), 0, 16))
    words = mg.frag_pack(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(words), _np_frag_words(codes))
    np.testing.assert_array_equal(np.asarray(mg.frag_unpack(words)), codes)
    np.testing.assert_array_equal(np.asarray(mg.frag_unpack(words[:, :, 128:])), codes.reshape(32, 2, 2, 64)[:, :, 1]
                                  .reshape(32, 128))  # one 64-column chunk per K block (block_k 64)
    rs, fmap = mg._wgmma_fragment_map((128, 64))  # Mosaic's WGMMA layout agrees with the PTX fragment
    assert fmap.reshape(-1, 4).max(0).tolist() == [1, 1, 3, 1] and len({tuple(r) for r in fmap.reshape(-1, 4)}) == 32
    lin, w64, p = make(7, 576, 200, 4, 64, True)
    pf = mg.pack_mgpu_linear(lin, bits=4, layout="frag")
    assert pf.w.dtype == jnp.int32 and pf.w.shape == (p.k_pad // 128, p.n_pad // 16, 256)
    np.testing.assert_array_equal(np.asarray(mg.dequantize_mgpu(pf)), np.asarray(mg.dequantize_mgpu(p)))
    with pytest.raises(ValueError, match="4-bit weights only"):
        mg.pack_mgpu_linear(make(8, 256, 128, 8, 128, False)[0], bits=8, layout="frag")


@pytest.mark.parametrize("gs,m,dtype,tiles", [
    (128, 1, jnp.bfloat16, (8, 128, 128, 2, "acc", "grid", 1)), (64, 9, jnp.float16, (16, 64, 64, 2, "acc", "grid", 1)),
    (32, 3, jnp.bfloat16, (8, 64, 128, 1, "weights", "grid", 1)), (128, 5, jnp.float16, (8, 64, 256, 1, "weights", "grid", 1)),
    (128, 17, jnp.bfloat16, (32, 64, 128, 1, "acc", "stream", 2)), (-1, 70, jnp.bfloat16, (64, 64, 64, 1, "weights", "tiles", 2)),
])
def test_frag_layout_kernel(gs, m, dtype, tiles, monkeypatch):
    """The "frag" weights through every schedule, both scale modes, K blocks of 64 / 128 / 256,
    g32 / g64 / g128 / per-channel, bf16 and fp16: interpreter vs float64, and the hardware
    path (shift + lop3 + sub per pair, no shuffles) lowers for CUDA."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    bm, bn, bk, split, mode, sched, wgs = tiles
    lin, w64, _ = make(30 + m, 512, 192, 4, gs, True)
    p = mg.pack_mgpu_linear(lin, bits=4, dtype=dtype, layout="frag")
    cfg = mg.MgpuConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_stages=2, scale_mode=mode,
                        schedule=sched, compute_wgs=wgs, ctas_per_sm=1)
    x = jax.random.normal(jax.random.key(m), (m, 512), jnp.float32).astype(dtype)
    y = mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)
    assert y.shape == (m, 192) and rel_err(y, np.asarray(x, np.float64) @ w64) < 8e-3
    text = mg._forward.trace(x, p, cfg, False).lower(lowering_platforms=("cuda",)).as_text()
    assert "lop3.b32" in text and ("f16x2" if dtype == jnp.float16 else "bf16x2") in text
    if mode == "acc":
        with pytest.raises(ValueError, match="zero_mode='xsum' needs the 'kblocks' or 'nk'"):
            mg.gptq_matmul_mgpu(x, p, config=dataclasses.replace(cfg, zero_mode="xsum"), interpret=True)


# ---------------------------------------------------------------- kernel (interpret)

CASES = [
    # bits, gs, act_order, K, N, M, dtype, (block_m, block_n, block_k, split_k, scale_mode)
    (4, 128, False, 576, 192, 1, jnp.bfloat16, (8, 64, 128, 1, "weights")),   # SmolLM2 K=576, N padded
    (4, 128, True, 576, 128, 3, jnp.bfloat16, (8, 64, 128, 1, "weights")),    # act-order
    (4, 128, True, 576, 128, 3, jnp.bfloat16, (8, 64, 128, 1, "acc")),        # act-order, scales on acc
    (4, 64, False, 1536, 128, 17, jnp.bfloat16, (16, 64, 128, 3, "weights")), # K=1536, M not a block multiple
    (4, 64, False, 1536, 128, 17, jnp.bfloat16, (16, 64, 64, 4, "acc")),      # g64 with block_k 64
    (4, 32, True, 256, 128, 9, jnp.float16, (16, 128, 128, 2, "weights")),    # g32 (4 groups per block), fp16
    (4, -1, False, 320, 128, 2, jnp.bfloat16, (8, 64, 128, 1, "weights")),    # per-channel
    (4, -1, False, 320, 128, 2, jnp.float16, (8, 64, 128, 3, "acc")),         # per-channel, split-K, acc
    (4, 128, False, 512, 64, 5, jnp.float16, (8, 64, 64, 2, "weights")),      # block_k 64 < group
    (8, 128, True, 384, 128, 5, jnp.bfloat16, (8, 64, 128, 1, "weights")),    # 8-bit act-order
    (8, 128, False, 384, 128, 70, jnp.bfloat16, (128, 64, 128, 1, "acc")),    # 8-bit, acc, bf16 out (bm 128)
    (4, 128, False, 512, 256, 3, jnp.bfloat16, (8, 256, 128, 2, "acc")),      # 256-row weight tiles
]


@pytest.mark.parametrize("bits,gs,act_order,k,n,m,dtype,tiles", CASES)
def test_mgpu_kernel_interpret(bits, gs, act_order, k, n, m, dtype, tiles):
    bm, bn, bk, split, mode = tiles
    lin, w64, p = make(10 + k + m, k, n, bits, gs, act_order, dtype)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
    cfg = mg.MgpuConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_stages=2, scale_mode=mode)
    y = mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    ref64 = np.asarray(x, np.float64) @ w64
    assert rel_err(y, ref64) < 8e-3  # bf16 scales + weights + output rounding
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(mg.reference(x, p), np.float32),
                               rtol=2e-2, atol=2e-2 * float(np.abs(ref64).max()))


@pytest.mark.parametrize("layout,tiles", [
    ("nk", (8, 64, 128, 2, "acc", "grid", 1)), ("kblocks", (8, 128, 256, 2, "weights", "grid", 1)),
    ("kblocks", (16, 64, 64, 1, "acc", "grid", 1)), ("nk", (16, 64, 128, 1, "acc", "stream", 2)),
    ("kblocks", (16, 64, 256, 1, "weights", "stream", 2)), ("nk", (128, 64, 128, 1, "weights", "tiles", 2)),
    ("kblocks", (128, 64, 128, 1, "acc", "tiles", 1)),
])
@pytest.mark.parametrize("new", [False, True])
def test_weight_layouts_and_output_options(layout, tiles, new, monkeypatch):
    """Both weight layouts (``"kblocks"`` tiles are one contiguous run; ``"nk"`` rows), K blocks
    of 64 / 128 / 256 (a 256 block is two 128-column parts), one and two compute warpgroups; with
    ``new`` also token-major grid partials and TMA bounds (hardware only: the interpreter pads x,
    the CUDA lowering takes x unpadded). Interpreter vs float64, and the hardware path lowers."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    bm, bn, bk, split, mode, sched, wgs = tiles
    lin, w64, _ = make(60 + bk, 512, 256, 4, 128, True)
    p = mg.pack_mgpu_linear(lin, bits=4, layout=layout)
    assert p.layout == layout
    extra = dict(tma_bounds=True, transpose_out=None if sched == "stream" else True) if new else {}
    cfg = mg.MgpuConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_stages=2, scale_mode=mode,
                        schedule=sched, compute_wgs=wgs, ctas_per_sm=1, **extra)
    assert cfg.writes_y == (sched == "tiles" or (new and sched == "grid"))
    for m in ((1, 3, 9) if bm <= 16 else (130,)):
        x = jax.random.normal(jax.random.key(bk + m), (m, 512), jnp.float32).astype(jnp.bfloat16)
        y = mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)
        assert y.shape == (m, 256) and rel_err(y, np.asarray(x, np.float64) @ w64) < 8e-3, m
        lowered = mg._forward.trace(x, p, cfg, False).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
    with pytest.raises(ValueError, match="layout must be one of"):
        mg.pack_mgpu_linear(lin, bits=4, layout="kn")


def test_parts_add_up_to_the_product(monkeypatch):
    """gptq_matmul_mgpu_parts: a token-major split-K grid hands out its fp32 partials (their sum,
    rounded, is gptq_matmul_mgpu's output), other configs one addend, the product; dispatch's
    matmul_parts the same for Mosaic-prepared layers and one addend for the others."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    lin, w64, p = make(81, 512, 256, 4, 128, True)
    x = jax.random.normal(jax.random.key(82), (2, 1, 512), jnp.float32).astype(jnp.bfloat16)
    split = mg.MgpuConfig(block_m=8, block_n=64, block_k=128, split_k=4, num_stages=2, scale_mode="acc",
                          transpose_out=True)
    for cfg, n_parts in ((split, 4), (dataclasses.replace(split, transpose_out=False), 1),
                         (dataclasses.replace(split, split_k=1), 1)):
        parts = mg.gptq_matmul_mgpu_parts(x, p, config=cfg, interpret=True)
        y = mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)
        assert parts.shape == (n_parts, 2, 1, 256), cfg
        assert parts.dtype == (jnp.float32 if n_parts > 1 else jnp.bfloat16)
        total = jnp.sum(parts.astype(jnp.float32), axis=0).astype(jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(total, np.float32), np.asarray(y, np.float32), rtol=1e-2, atol=1e-2)
        assert rel_err(total, np.asarray(x, np.float64) @ w64) < 8e-3, cfg
    prep = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel="mgpu")
    got = dispatch.matmul_parts(x, prep)
    assert got.ndim == 4 and got.shape[1:] == (2, 1, 256)
    assert rel_err(jnp.sum(got.astype(jnp.float32), 0).astype(jnp.bfloat16), np.asarray(x, np.float64) @ w64) < 8e-3
    tri = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel="triton")
    one = dispatch.matmul_parts(x, tri)
    assert one.shape == (1, 2, 1, 256)
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(dispatch.matmul(x, tri)))


def test_parts_add_into_a_given_accumulator(monkeypatch):
    """gptq_matmul_mgpu_parts(acc=): a TMA-reduced decode grid takes its fp32 accumulator from the
    caller; the addends then sum to acc + x @ W (interpreter: acc is one more addend; here acc is
    random, not zeros, so that it is seen to be added). accumulator_shape is None where a call has
    no such buffer, and a wrong acc is refused; the hardware path lowers with the caller's buffer."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    lin, w64, p = make(83, 1024, 256, 4, 128, False)
    x = jax.random.normal(jax.random.key(84), (3, 1, 1024), jnp.float32).astype(jnp.bfloat16)
    cfg = mg.default_config(3, p)
    assert cfg.split_k > 1 and cfg.split_reduce == "tma", cfg
    shape = mg.accumulator_shape(3, p, interpret=True)
    assert shape == (1, -(-3 // cfg.block_m) * cfg.block_m, p.n_pad)
    assert mg.accumulator_shape(3, p) == (1, 3, p.n_pad)  # hardware: TMA bounds, rows not padded
    acc = jax.random.normal(jax.random.key(85), shape, jnp.float32)
    parts = mg.gptq_matmul_mgpu_parts(x, p, interpret=True, acc=acc)
    plain = mg.gptq_matmul_mgpu_parts(x, p, interpret=True)
    assert parts.shape[0] == plain.shape[0] + 1
    total = np.asarray(jnp.sum(parts, axis=0), np.float64)
    want = np.asarray(x, np.float64) @ w64 + np.asarray(acc[0, :3, :256], np.float64)[:, None]
    assert rel_err(total, want) < 8e-3
    for bad in (acc[:, :1], acc.astype(jnp.bfloat16)):
        with pytest.raises(ValueError, match="acc must be float32"):
            mg.gptq_matmul_mgpu_parts(x, p, interpret=True, acc=bad)
    for c in (dataclasses.replace(cfg, split_k=1, split_reduce="xla"), dataclasses.replace(cfg, split_reduce="xla")):
        assert mg.accumulator_shape(3, p, config=c) is None, c
        with pytest.raises(ValueError, match="acc must be float32"):
            mg.gptq_matmul_mgpu_parts(x, p, config=c, interpret=True, acc=acc)
    hw = mg.accumulator_shape(3, p)
    low = mg._forward.trace(x.reshape(3, 1024), p, cfg, False, True, jnp.zeros(hw, jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in low
    prep = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel="mgpu")
    assert dispatch.parts_accumulator(x.shape, x.dtype, prep) == shape
    assert dispatch.parts_accumulator(x.shape, jnp.float32, prep) is None
    got = dispatch.matmul_parts(x, prep, acc=acc)
    assert rel_err(np.asarray(jnp.sum(got, axis=0), np.float64), want) < 8e-3
    tri = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel="triton")
    assert dispatch.parts_accumulator(x.shape, x.dtype, tri) is None
    with pytest.raises(ValueError, match="takes no acc"):
        dispatch.matmul_parts(x, tri, acc=acc)


@pytest.mark.parametrize("m", [16, 11])
def test_parts_acc_of_a_feature_major_grid(monkeypatch, m):
    """A split grid that stores [Np, Mp] (transpose_out=False; batch 16's decode grid until session 14) takes an
    [1, Np, Mp] accumulator: the call returns one addend, acc[0, :N, :M].T + x @ W rounded to
    x.dtype (random acc, so that it is seen to be added); the hardware path lowers with it."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    lin, w64, p = make(86, 1024, 256, 4, 128, False)
    x = jax.random.normal(jax.random.key(87), (m, 1024), jnp.float32).astype(jnp.bfloat16)
    cfg = dataclasses.replace(mg.default_config(m, p), transpose_out=False)
    assert cfg.split_k > 1 and cfg.split_reduce == "tma" and not cfg.writes_y, cfg
    mp = -(-m // cfg.block_m) * cfg.block_m
    shape = mg.accumulator_shape(m, p, config=cfg)
    assert shape == mg.accumulator_shape(m, p, config=cfg, interpret=True) == (1, p.n_pad, mp)
    acc = jax.random.normal(jax.random.key(88), shape, jnp.float32)
    got = mg.gptq_matmul_mgpu_parts(x, p, config=cfg, interpret=True, acc=acc)
    assert got.shape == (1, m, 256) and got.dtype == jnp.bfloat16
    want = np.asarray(x, np.float64) @ w64 + np.asarray(acc[0, :256, :m], np.float64).T
    assert rel_err(np.asarray(got[0], np.float64), want) < 8e-3
    plain = mg.gptq_matmul_mgpu_parts(x, p, config=cfg, interpret=True)
    assert rel_err(np.asarray(plain[0], np.float64), np.asarray(x, np.float64) @ w64) < 8e-3
    with pytest.raises(ValueError, match="acc must be float32"):
        mg.gptq_matmul_mgpu_parts(x, p, config=cfg, interpret=True, acc=acc[:, :, :1])
    low = mg._forward.trace(x, p, cfg, False, False, jnp.zeros(shape, jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in low


def test_tma_bounds_pads_only_what_tiled_views_need():
    """With ``tma_bounds`` the hardware path hands x over unpadded below 8 rows, padded to a
    multiple of 8 above (Mosaic's tiled GMEM views need it), and K unpadded when it is a whole
    number of 64-column tiles; the interpreter and ``tma_bounds=False`` pad to whole token tiles."""
    lin, _, p = make(70, 576, 128, 4, 128, False)  # K = 576 = 9 x 64, Kp = 640
    cfg = mg.MgpuConfig(block_m=16, block_n=64, block_k=128, split_k=1, scale_mode="acc", tma_bounds=True,
                        transpose_out=True)

    def x_shape(m, cfg, interpret):
        jaxpr = jax.make_jaxpr(lambda x: mg._forward(x, p, cfg, interpret))(jnp.ones((m, 576), jnp.bfloat16))
        # the kernel call: the equation that takes the packed weights as its second operand
        calls = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns
                 if len(e.invars) > 1 and e.invars[1].aval.shape == p.w.shape]
        assert len(calls) == 1
        return tuple(calls[0].invars[0].aval.shape)

    assert x_shape(3, cfg, False) == (3, 576)
    assert x_shape(9, cfg, False) == (16, 576)
    assert x_shape(17, cfg, False) == (24, 576)
    assert x_shape(3, cfg, True) == (16, 640)
    assert x_shape(3, dataclasses.replace(cfg, tma_bounds=False), False) == (16, 640)


def test_mgpu_leading_dims_default_config_and_dtype_cast():
    lin, w64, p = make(5, 256, 128, 4, 128, True)  # packed for bf16, called with fp16: cast per call
    x = jax.random.normal(jax.random.key(1), (2, 3, 256), jnp.float32).astype(jnp.float16)
    y = mg.gptq_matmul_mgpu(x, p, interpret=True)
    assert y.shape == (2, 3, 128) and y.dtype == jnp.float16
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < 8e-3
    assert mg.gptq_matmul_mgpu(jnp.ones((0, 256), jnp.bfloat16), p, interpret=True).shape == (0, 128)


def test_mgpu_validation_errors():
    _, _, p = make(6, 256, 128, 4, 128, False)
    x = jnp.ones((2, 256), jnp.bfloat16)
    C = mg.MgpuConfig
    with pytest.raises(ValueError, match="K=256"):
        mg.gptq_matmul_mgpu(jnp.ones((2, 255), jnp.bfloat16), p, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mg.gptq_matmul_mgpu(x.astype(jnp.float32), p, interpret=True)
    with pytest.raises(ValueError, match="block_m=12"):
        mg.gptq_matmul_mgpu(x, p, config=C(block_m=12), interpret=True)
    with pytest.raises(ValueError, match="block_n=96"):
        mg.gptq_matmul_mgpu(x, p, config=C(block_n=96), interpret=True)
    with pytest.raises(ValueError, match="registers"):
        mg.gptq_matmul_mgpu(x, p, config=C(block_m=256, block_n=128), interpret=True)
    with pytest.raises(ValueError, match="block_k=32"):
        mg.gptq_matmul_mgpu(x, p, config=C(block_k=32), interpret=True)
    with pytest.raises(ValueError, match="split_k=3"):
        mg.gptq_matmul_mgpu(x, p, config=C(split_k=3), interpret=True)
    with pytest.raises(ValueError, match="two fp32 accumulators"):
        mg.gptq_matmul_mgpu(x, p, config=C(block_m=128, block_n=128, scale_mode="acc"), interpret=True)
    with pytest.raises(ValueError, match="scale_impl must"):
        mg.gptq_matmul_mgpu(x, p, config=C(scale_impl="asm"), interpret=True)
    with pytest.raises(ValueError, match="scale_mode must"):
        mg.gptq_matmul_mgpu(x, p, config=C(scale_mode="fused"), interpret=True)
    with pytest.raises(ValueError, match="w_layout must"):
        mg.gptq_matmul_mgpu(x, p, config=C(w_layout="tiled"), interpret=True)
    _, _, p32 = make(6, 256, 128, 4, 32, False)
    with pytest.raises(ValueError, match="scale_mode='acc' needs"):
        mg.gptq_matmul_mgpu(x, p32, config=C(scale_mode="acc"), interpret=True)
    assert mg.default_config(1, p32).scale_mode == "weights" and mg.default_config(1, p).scale_mode == "acc"
    with pytest.raises(ValueError, match="MgpuPacked"):
        mg.gptq_matmul_mgpu(x, {"w": 1}, interpret=True)


# ---------------------------------------------------------------- persistent schedules (interpret)


@pytest.mark.parametrize("tiles,nk,ctas,aligned", [(7, 5, 3, False), (7, 5, 3, True), (224, 64, 264, False),
                                                   (3, 4, 20, False), (12, 1, 5, False), (5, 3, 5, True),
                                                   (448, 64, 132, True), (33, 7, 16, False)])
def test_stream_plan_matches_brute_force(tiles, nk, ctas, aligned):
    """The static split (which slots are written) and the kernel's integer formulas agree with a
    step-by-step assignment: every step in exactly one CTA, contiguous ranges, balanced to one
    step (or one tile when aligned), and each tile's partial slots numbered from its first CTA."""
    c, starts, counts = mg.stream_plan(tiles, nk, ctas, aligned)
    total = tiles * nk
    assert starts[0] == 0 and starts[-1] == total and np.all(np.diff(starts) > 0)
    sizes = np.diff(starts) // (nk if aligned else 1)
    assert sizes.max() - sizes.min() <= 1 and c == min(ctas, tiles if aligned else total)
    owner = np.repeat(np.arange(c), np.diff(starts))  # CTA of every step
    for ci in range(c + 1):
        assert mg._cta_start(ci, ctas=c, tiles=tiles, nk=nk, aligned=aligned) == starts[ci]
    if not aligned:
        steps = np.arange(total)
        np.testing.assert_array_equal(mg._first_cta(steps, ctas=c, total=total), owner)
        assert int(mg._first_cta(jnp.int32(total - 1), ctas=c, total=total)) == owner[-1]
    for t in range(tiles):
        cs = np.unique(owner[t * nk:(t + 1) * nk])
        assert counts[t] == len(cs) and np.all(np.diff(cs) == 1)
    if aligned:
        assert counts.max() == 1


STREAM_CASES = [
    # bits, gs, act_order, K, N, M, dtype, (block_m, block_n, block_k, mode, schedule, compute_wgs, sms, cps)
    (4, 128, True, 576, 192, 1, jnp.bfloat16, (8, 64, 128, "acc", "stream", 1, 3, 1)),     # tiles cut across CTAs
    (4, 128, False, 512, 256, 3, jnp.bfloat16, (8, 64, 128, "acc", "stream", 2, 2, 2)),    # warp-specialised
    (4, 64, True, 1536, 128, 17, jnp.float16, (8, 64, 64, "acc", "stream", 1, 5, 1)),      # 3 M tiles, g64
    (4, -1, False, 320, 128, 5, jnp.bfloat16, (8, 64, 64, "weights", "stream", 2, 3, 1)),  # per-channel
    (4, 32, False, 256, 128, 9, jnp.bfloat16, (16, 64, 128, "weights", "stream", 1, 2, 2)),  # g32, weights
    (8, 128, True, 384, 128, 20, jnp.bfloat16, (8, 64, 128, "acc", "tiles", 2, 2, 1)),     # 8-bit, tiles, y direct
    (4, 128, False, 512, 256, 40, jnp.float16, (16, 64, 128, "weights", "tiles", 1, 3, 1)),  # tiles, weights
    (4, 128, True, 576, 128, 33, jnp.bfloat16, (16, 64, 128, "acc", "tiles", 2, 40, 1)),   # more CTAs than tiles
]


@pytest.mark.parametrize("bits,gs,act_order,k,n,m,dtype,tiles", STREAM_CASES)
def test_mgpu_persistent_schedules_interpret(bits, gs, act_order, k, n, m, dtype, tiles, monkeypatch):
    bm, bn, bk, mode, sched, wgs, sms, cps = tiles
    monkeypatch.setattr(mg, "_num_sms", lambda: sms)  # a few CTAs, so that tiles are cut across them
    lin, w64, p = make(60 + k + m, k, n, bits, gs, act_order, dtype)
    x = jax.random.normal(jax.random.key(m + 7), (m, k), jnp.float32).astype(dtype)
    cfg = mg.MgpuConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=2, scale_mode=mode, schedule=sched,
                        compute_wgs=wgs, ctas_per_sm=cps)
    ctas, _, counts, *_ = mg._stream_geometry(-(-m // bm) * bm, p, cfg)
    if sched == "stream":
        assert counts.max() > 1  # the case really adds partial sums of one tile from several CTAs
    y = mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    ref64 = np.asarray(x, np.float64) @ w64
    assert rel_err(y, ref64) < 8e-3
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(mg.reference(x, p), np.float32),
                               rtol=2e-2, atol=2e-2 * float(np.abs(ref64).max()))


def test_mgpu_persistent_validation_errors():
    _, _, p = make(6, 256, 192, 4, 128, False)
    x = jnp.ones((2, 256), jnp.bfloat16)
    C = mg.MgpuConfig
    with pytest.raises(ValueError, match="schedule must be"):
        mg.gptq_matmul_mgpu(x, p, config=C(schedule="dynamic"), interpret=True)
    with pytest.raises(ValueError, match="compute_wgs=3"):
        mg.gptq_matmul_mgpu(x, p, config=C(schedule="stream", compute_wgs=3), interpret=True)
    with pytest.raises(ValueError, match="needs schedule='stream' or 'tiles'"):
        mg.gptq_matmul_mgpu(x, p, config=C(compute_wgs=2), interpret=True)
    with pytest.raises(ValueError, match="needs split_k=1"):
        mg.gptq_matmul_mgpu(x, p, config=C(schedule="stream", split_k=2), interpret=True)
    with pytest.raises(ValueError, match="ctas_per_sm=0"):
        mg.gptq_matmul_mgpu(x, p, config=C(schedule="tiles", ctas_per_sm=0), interpret=True)
    _, _, p384 = make(7, 256, 384, 4, 128, False)
    with pytest.raises(ValueError, match="must divide Np=384"):
        mg.gptq_matmul_mgpu(x, p384, config=C(block_n=128, schedule="stream", compute_wgs=2), interpret=True)


# ---------------------------------------------------------------- hardware path, lowered on CPU

LOWER_CASES = [
    # bits, gs, M, dtype, (block_m, block_n, block_k, split_k, scale_mode[, scale_impl])
    (4, 128, 1, jnp.bfloat16, (8, 128, 128, 2, "weights")),
    (4, 128, 1, jnp.bfloat16, (8, 128, 128, 2, "weights", "inline")),
    (4, 128, 1, jnp.bfloat16, (8, 128, 128, 2, "acc")),
    (4, 128, 1, jnp.bfloat16, (8, 128, 128, 2, "acc", "inline")),
    (4, 64, 64, jnp.float16, (64, 128, 128, 1, "weights", "inline")),
    (4, 128, 16, jnp.bfloat16, (16, 128, 128, 1, "weights")),
    (4, 128, 16, jnp.float16, (16, 128, 256, 1, "acc")),
    (4, 32, 64, jnp.bfloat16, (64, 128, 128, 1, "weights")),
    (4, 64, 200, jnp.float16, (128, 128, 128, 1, "weights")),
    (4, 128, 200, jnp.bfloat16, (128, 64, 128, 1, "acc")),
    (4, -1, 5, jnp.bfloat16, (8, 64, 256, 2, "weights")),
    (4, 128, 5, jnp.bfloat16, (8, 64, 64, 1, "weights")),
    (4, 64, 5, jnp.bfloat16, (8, 128, 64, 2, "acc")),
    (8, 128, 5, jnp.bfloat16, (8, 64, 128, 1, "weights")),
    (8, 128, 5, jnp.bfloat16, (8, 64, 128, 1, "acc")),
    (8, 32, 9, jnp.float16, (16, 64, 64, 1, "weights")),
    # weights loaded explicitly in the conversion-friendly WGMMA_UPCAST layouts
    (4, 128, 5, jnp.bfloat16, (8, 128, 128, 2, "acc", "jnp", "upcast")),
    (4, 128, 200, jnp.bfloat16, (128, 128, 128, 1, "weights", "jnp", "upcast")),
    (8, 128, 40, jnp.float16, (64, 64, 128, 1, "acc", "jnp", "upcast")),
    (4, 128, 16, jnp.bfloat16, (16, 256, 128, 2, "acc", "jnp", "upcast")),
    # persistent schedules (schedule, compute_wgs[, transpose_out])
    (4, 128, 1, jnp.bfloat16, (8, 128, 128, 1, "acc", "jnp", "upcast", "stream", 1)),
    (4, 128, 1, jnp.bfloat16, (8, 128, 128, 1, "acc", "jnp", "upcast", "stream", 2)),
    (4, 64, 16, jnp.float16, (16, 128, 64, 1, "acc", "jnp", "upcast", "stream", 2)),
    (4, 128, 64, jnp.bfloat16, (64, 64, 128, 1, "acc", "jnp", "auto", "stream", 2)),
    (8, 128, 5, jnp.bfloat16, (8, 64, 128, 1, "acc", "jnp", "upcast", "stream", 1)),
    (4, 32, 9, jnp.bfloat16, (16, 64, 128, 1, "weights", "jnp", "auto", "stream", 2)),
    (4, 128, 200, jnp.bfloat16, (128, 64, 128, 1, "acc", "jnp", "auto", "tiles", 2)),
    (4, 128, 300, jnp.float16, (128, 64, 128, 1, "weights", "jnp", "upcast", "tiles", 2)),
    (4, 128, 256, jnp.bfloat16, (256, 64, 64, 1, "weights", "jnp", "upcast", "tiles", 2)),
    (4, 128, 200, jnp.bfloat16, (128, 64, 128, 1, "acc", "jnp", "auto", "tiles", 2, False)),
    (4, 128, 130, jnp.bfloat16, (128, 128, 128, 1, "weights", "jnp", "upcast", "tiles", 1)),
]


@pytest.mark.parametrize("bits,gs,m,dtype,tiles", LOWER_CASES)
def test_lowers_for_cuda(bits, gs, m, dtype, tiles):
    """Pallas -> Mosaic GPU lowering of the real (wgmma, register-A, inline_mgpu) kernel."""
    bm, bn, bk, split, mode, *impl = tiles
    _, _, p = make(3, 1024, 256, bits, gs, False, dtype)
    sched = dict(zip(("schedule", "compute_wgs", "transpose_out"), impl[2:]))
    cfg = mg.MgpuConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_stages=3, scale_mode=mode,
                        scale_impl=impl[0] if impl else "jnp", w_layout=impl[1] if len(impl) > 1 else "auto",
                        **sched)
    x = jnp.zeros((m, 1024), dtype)
    lowered = mg._forward.trace(x, p, cfg, False).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


# ---------------------------------------------------------------- dispatch


def test_dispatch_mgpu_option():
    lin, w64, _ = make(30, 576, 128, 4, 128, True)
    prep = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel="mgpu")
    assert prep is not None and prep.kernel == "mgpu" and prep.in_features == 576 and prep.out_features == 128
    x = jax.random.normal(jax.random.key(3), (2, 576), jnp.float32).astype(jnp.bfloat16)
    y = jax.jit(dispatch.matmul)(x, prep)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < 8e-3
    y32 = dispatch.matmul(x.astype(jnp.float32), prep)  # fp32: XLA path on the mgpu layout
    assert y32.dtype == jnp.float32 and rel_err(y32, np.asarray(x, np.float64) @ w64) < 5e-3
    assert dispatch.prepare(lin, bits=2, backend="gpu", gpu_kernel="mgpu") is None  # no 2-bit mgpu kernel
    with pytest.raises(ValueError, match="gpu_kernel"):
        dispatch.prepare(lin, bits=4, backend="gpu", gpu_kernel="cuda")


def test_dispatch_auto_kernel_choice(monkeypatch):
    """``gpu_kernel="auto"`` (the default): the Mosaic GPU kernel on Hopper, the Triton-lowered one
    elsewhere and for what the Mosaic kernel lacks (2-bit); an explicit "mgpu" refuses 2-bit."""
    assert dispatch.DEFAULT_GPU_KERNEL == "auto"
    if not ON_GPU:
        assert dispatch._auto_gpu_kernel() == "triton"  # CPU: never the Hopper kernel
    lin4, w64, _ = make(31, 576, 128, 4, 128, True)
    lin2 = random_gptq_linear(jax.random.key(32), 576, 128, bits=2, group_size=128)
    monkeypatch.setattr(dispatch, "_auto_gpu_kernel", lambda: "mgpu")
    p4 = dispatch.prepare(lin4, bits=4, backend="gpu", interpret=True)
    p2 = dispatch.prepare(lin2, bits=2, backend="gpu", interpret=True)
    assert p4.kernel == "mgpu" and p2.kernel == "triton"
    assert dispatch.prepare(lin2, bits=2, backend="gpu", interpret=True, gpu_kernel="mgpu") is None
    x = jax.random.normal(jax.random.key(4), (3, 576), jnp.float32).astype(jnp.bfloat16)
    assert rel_err(dispatch.matmul(x, p4), np.asarray(x, np.float64) @ w64) < 8e-3
    monkeypatch.setattr(dispatch, "_auto_gpu_kernel", lambda: "triton")
    assert dispatch.prepare(lin4, bits=4, backend="gpu", interpret=True).kernel == "triton"


@pytest.mark.parametrize("sched,split,m", [("grid", 4, 1), ("grid", 2, 9), ("stream", 1, 5)])
def test_split_reduce_tma(sched, split, m, monkeypatch):
    """``split_reduce="tma"``: the hardware kernel TMA-adds its fp32 partials into one buffer that
    is aliased in and out of the custom call (``cp.reduce.async.bulk ... add``, no per-split
    slots, no XLA sum over them); the interpreter (no TMA reduction) gives the same result as the
    default path, which it runs."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 3)
    lin, w64, p = make(91 + m, 1024, 256, 4, 128, True)
    cfg = mg.MgpuConfig(block_m=8 if m < 8 else 16, block_n=64, block_k=128, split_k=split, num_stages=2,
                        scale_mode="acc", w_layout="upcast", schedule=sched, ctas_per_sm=1)
    x = jax.random.normal(jax.random.key(m), (m, 1024), jnp.float32).astype(jnp.bfloat16)
    tma = dataclasses.replace(cfg, split_reduce="tma")
    y = mg.gptq_matmul_mgpu(x, p, config=tma, interpret=True)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < 8e-3
    np.testing.assert_array_equal(np.asarray(y), np.asarray(mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)))
    for c, reduces in ((tma, True), (cfg, False)):
        text = mg._forward.trace(x, p, c, False).lower(lowering_platforms=("cuda",)).as_text()
        assert ("cp.reduce.async.bulk" in text) == reduces, c
        assert ("output_operand_alias" in text) == reduces, c
    assert not mg._tma_reduces(dataclasses.replace(tma, schedule="tiles"), False)  # no partials to add
    assert mg._tma_reduces(tma, False) and not mg._tma_reduces(tma, True)
    with pytest.raises(ValueError, match="split_reduce must be one of"):
        mg.gptq_matmul_mgpu(x, p, config=dataclasses.replace(cfg, split_reduce="atomic"), interpret=True)


@pytest.mark.parametrize("sched,split,m", [("grid", 4, 1), ("grid", 1, 16), ("stream", 1, 5)])
def test_store_wait_read_is_the_ctas_last_wait(sched, split, m, monkeypatch):
    """``store_wait="read"``: a CTA's last wait after its output store is for the copy engine's SMEM
    read only (``wait_read_only``: ``cp.async.bulk.wait_group.read``), ``"full"`` (the default) waits
    for the write; the interpreter's result is the same either way; a bad value is refused by name."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 3)
    lin, w64, p = make(61 + m, 1024, 256, 4, 128, True)
    cfg = mg.MgpuConfig(block_m=8 if m < 8 else 16, block_n=64, block_k=128, split_k=split, num_stages=2,
                        scale_mode="acc", w_layout="upcast", schedule=sched, ctas_per_sm=1,
                        split_reduce="tma" if split > 1 else "xla")
    assert cfg.store_wait == "full"
    x = jax.random.normal(jax.random.key(m), (m, 1024), jnp.float32).astype(jnp.bfloat16)
    read = dataclasses.replace(cfg, store_wait="read")
    counts = {}
    for c in (cfg, read):
        jaxpr = str(jax.make_jaxpr(lambda x, c=c: mg._forward(x, p, c, False))(x))
        counts[c.store_wait] = jaxpr.count("wait_read_only=True")
    # grid: the only wait is the last one; stream: its flushes already wait for reads only
    assert counts["read"] == counts["full"] + 1, counts
    y = mg.gptq_matmul_mgpu(x, p, config=read, interpret=True)
    assert rel_err(y, np.asarray(x, np.float64) @ w64) < 8e-3
    np.testing.assert_array_equal(np.asarray(y), np.asarray(mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True)))
    with pytest.raises(ValueError, match="store_wait must be one of"):
        mg.gptq_matmul_mgpu(x, p, config=dataclasses.replace(cfg, store_wait="none"), interpret=True)


# ---------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,gs,act_order,k,n,dtype", [
    (4, 128, True, 576, 1536, jnp.bfloat16), (4, 32, False, 4096, 4096, jnp.float16),
    (4, 64, True, 1536, 1024, jnp.bfloat16), (4, -1, False, 2048, 1024, jnp.bfloat16),
    (8, 128, True, 2048, 1024, jnp.float16),
    (4, 128, True, 4992, 1024, jnp.bfloat16),  # split-padded K 4992 -> 5120: x's last K block is all past its end
])
def test_mgpu_kernel_compiled(bits, gs, act_order, k, n, dtype):
    lin, w64, p = make(40 + k, k, n, bits, gs, act_order, dtype)
    p_nk = mg.pack_mgpu_linear(lin, bits=bits, dtype=dtype, layout="nk")  # p: the default ("frag" for 4-bit)
    p_kb = mg.pack_mgpu_linear(lin, bits=bits, dtype=dtype, layout="kblocks") if bits == 4 else None
    for m in (1, 16, 33, 130):  # 16: the batch-16 decode grid (token-major, ~16 CTAs per SM)
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(dtype)
        ref64 = np.asarray(x, np.float64) @ w64
        cfgs = [mg.default_config(m, p)]
        cfgs.append(dataclasses.replace(cfgs[0], w_layout="upcast"))
        if m == 1:
            cfgs.append(mg.MgpuConfig(block_m=8, block_n=64, block_k=128, split_k=1, scale_mode="weights"))
        for cfg in cfgs:
            y = jax.jit(lambda x: mg.gptq_matmul_mgpu(x, p, config=cfg))(x)
            assert rel_err(y, ref64) < 8e-3, (m, cfg)
        # "nk" weights; x padded in XLA (no TMA bounds) with [split, Np, Mp] partials; token-major
        # partials forced on
        rp = dataclasses.replace
        variants = [(cfgs[0], p_nk), (rp(cfgs[0], tma_bounds=False, transpose_out=None), p_nk),
                    (rp(cfgs[0], transpose_out=None if cfgs[0].schedule == "stream" else True), p)]
        # partials TMA-added in the kernel (split-K at M = 1: token-major; M = 33: stream-K)
        nkb = p.k_pad // cfgs[0].block_k
        split = max((d for d in (2, 4, 8) if nkb % d == 0), default=1) if cfgs[0].schedule == "grid" else 1
        variants += [(rp(cfgs[0], split_reduce="tma", split_k=split), p),
                     (rp(cfgs[0], split_reduce="tma", split_k=split, transpose_out=None), p_nk)]
        if p_kb is not None:  # 4-bit: also the "kblocks" layout (shuffle-based upcast)
            variants += [(cfgs[0], p_kb), (rp(cfgs[0], split_reduce="tma", split_k=split), p_kb)]
        for cfg, q in variants:
            y = jax.jit(lambda x: mg.gptq_matmul_mgpu(x, q, config=cfg))(x)
            assert rel_err(y, ref64) < 8e-3, (m, cfg, q.layout)
    prep = dispatch.prepare(lin, bits=bits, backend="gpu", gpu_kernel="mgpu")
    assert rel_err(dispatch.matmul(x, prep), ref64) < 8e-3  # M=130 through dispatch


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,gs,act_order,k,n,dtype", [
    (4, 128, True, 576, 1536, jnp.bfloat16), (4, 64, False, 4096, 4096, jnp.float16),
    (8, 128, True, 2048, 1024, jnp.float16), (4, 32, False, 1024, 1024, jnp.bfloat16),
])
def test_mgpu_persistent_compiled(bits, gs, act_order, k, n, dtype):
    """The stream-K and persistent-tile schedules (1 and 2 compute warpgroups, both scale modes,
    y written by the kernel or transposed in XLA), compiled, against float64 at M = 1 / 9 / 64 / 130.
    Every config is checked; the failures are listed together."""
    lin, w64, p = make(80 + k, k, n, bits, gs, act_order, dtype)
    C = mg.MgpuConfig
    bk = 64 if gs == 64 else 128
    mode = "acc" if gs % bk == 0 else "weights"
    plan = {
        1: [C(8, 128, bk, 1, 4, mode, "jnp", "upcast", "stream", 2, 1),
            C(8, 64, bk, 1, 4, mode, "jnp", "upcast", "stream", 2, 2),
            mg.default_config(1, p)],
        9: [C(16, 128, bk, 1, 4, mode, "jnp", "upcast", "stream", 1, 2), mg.default_config(9, p)],
        64: [C(64, 64, bk, 1, 4, mode, "jnp", "upcast", "stream", 2, 2),
             C(64, 64, bk, 1, 3, mode, "jnp", "auto", "tiles", 1, 2)],
        130: [C(128, 64, bk, 1, 3, mode, "jnp", "upcast", "tiles", 1, 2),
              C(128, 64, bk, 1, 3, "weights", "jnp", "upcast", "tiles", 1, 2),
              C(128, 64, bk, 1, 3, mode, "jnp", "upcast", "tiles", 1, 2, False)],
    }
    plan[130].append(mg.default_config(130, p))
    bad = []
    for m, cfgs in plan.items():
        x = jax.random.normal(jax.random.key(m + k), (m, k), jnp.float32).astype(dtype)
        ref64 = np.asarray(x, np.float64) @ w64
        for cfg in cfgs:
            if p.n_pad % (cfg.block_n * cfg.compute_wgs):
                continue
            y = jax.jit(lambda x, cfg=cfg: mg.gptq_matmul_mgpu(x, p, config=cfg))(x)
            err = rel_err(y, ref64)
            if y.shape != (m, n) or not err < 8e-3:
                bad.append((m, cfg, err))
    assert not bad, bad


@pytest.mark.parametrize("k,n,gs", [(576, 960, 128), (1536, 576, 64), (4096, 12288, 128), (8192, 28672, 128),
                                    (11008, 4096, 128),
                                    (1024, 512, 32), (2048, 1024, -1), (4096, 4096, 64)])
def test_default_configs_fit_every_layer(k, n, gs, monkeypatch):
    """default_config gives a valid config for every M regime and layer shape (no compile here:
    _validate is the same check gptq_matmul_mgpu runs), with the schedule the tuning chose."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 132)
    lin = random_gptq_linear(jax.random.key(k + n), k, n, bits=4, group_size=gs)
    p = mg.pack_mgpu_linear(lin, bits=4)
    for m in (1, 8, 9, 16, 17, 33, 64, 65, 128, 256, 1000, 3000, 4096):
        cfg = mg.default_config(m, p)
        mg._validate(jnp.zeros((m, k), jnp.bfloat16), p, cfg)
        if 8 < m <= 16:  # wide layers: 64-row N tiles, K split as for 128-row ones (H100 session 18)
            assert cfg.block_n == (64 if p.n_pad >= 12288 else 128 if p.n_pad % 128 == 0 else 64), (m, cfg)
            want_split = {(4096, 12288): 8, (8192, 28672): 16, (11008, 4096): 1}.get((k, n))
            assert want_split is None or cfg.split_k == want_split, (m, cfg)
        if m > 64:  # 3 pipeline stages from 4096 tokens on
            assert cfg.num_stages == (3 if m >= 4096 else 4), (m, cfg)
        stream16 = 8 < m <= 16 and p.n_pad < 12288 and p.n_pad % 128 == 0 and p.k_pad * p.n_pad >= 4096 * 4096
        assert cfg.schedule == ("stream" if stream16 else "grid" if m <= 16 else "stream" if m <= 64 else cfg.schedule)
        # x unpadded on hardware; the decode grids (M <= 16) store token-major partials
        assert cfg.tma_bounds and cfg.writes_y == (True if m <= 16 else cfg.schedule == "tiles")
        if m > 64:
            tiles = -(-m // (256 if m >= 256 else 128)) * (p.n_pad // 128)  # whole tiles of the tile schedule
            assert cfg.schedule in ("tiles", "stream") and cfg.compute_wgs == 2
            assert cfg.schedule == ("tiles" if 8 * tiles >= 5 * 132 else "stream"), (m, tiles, cfg)  # 5/8 of the SMs


def test_default_config_runs_in_the_interpreter(monkeypatch):
    """The default configs of the three regimes (grid / stream / tiles) on one small layer."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    lin, w64, p = make(90, 256, 256, 4, 64, True)
    for m in (3, 20, 130):
        cfg = mg.default_config(m, p)
        x = jax.random.normal(jax.random.key(m), (m, 256), jnp.float32).astype(jnp.bfloat16)
        assert rel_err(mg.gptq_matmul_mgpu(x, p, interpret=True), np.asarray(x, np.float64) @ w64) < 8e-3, cfg


@pytest.mark.parametrize("sched,wgs,split,gs,m", [("grid", 1, 3, 128, 2), ("stream", 1, 1, 64, 5), ("stream", 2, 1, 128, 17),
                                                  ("tiles", 2, 1, -1, 20)])
def test_zero_point_through_x_sums(sched, wgs, split, gs, m, monkeypatch):
    """zero_mode="xsum": wgmma on the raw codes, each K block corrected by z * sum(x) — the same
    function (interpreter), and the hardware path lowers for CUDA."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 3)
    lin, w64, _ = make(95 + m, 384, 256, 4, gs, gs == 128)
    p = mg.pack_mgpu_linear(lin, bits=4, layout="kblocks")  # xsum runs on signed codes, not "frag" words
    bk = 64 if gs == 64 else 128
    cfg = mg.MgpuConfig(block_m=8 if m <= 8 else 16, block_n=64, block_k=bk, split_k=split, num_stages=2,
                        scale_mode="acc", schedule=sched, compute_wgs=wgs, ctas_per_sm=1, zero_mode="xsum")
    x = jax.random.normal(jax.random.key(m), (m, 384), jnp.float32).astype(jnp.bfloat16)
    assert rel_err(mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True), np.asarray(x, np.float64) @ w64) < 8e-3
    lowered = mg._forward.trace(x, p, cfg, False).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    with pytest.raises(ValueError, match="zero_mode='xsum' needs scale_mode='acc'"):
        mg.gptq_matmul_mgpu(x, p, config=dataclasses.replace(cfg, scale_mode="weights"), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
def test_parts_acc_compiled_on_gpu(m):
    """The decode grid TMA-adds into the caller's (random, nonzero) fp32 buffer on the GPU (token
    counts up to 16: token-major partials, [1, rows, Np])."""
    lin, w64, p = make(86 + m, 4096, 4096, 4, 128, True)
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.float32).astype(jnp.bfloat16)
    shape = mg.accumulator_shape(m, p)
    major = mg.default_config(m, p).writes_y
    assert shape is not None and shape[1 if major else 2] >= m
    acc = jax.random.normal(jax.random.key(7 + m), shape, jnp.float32)
    parts = jax.jit(lambda x, a: mg.gptq_matmul_mgpu_parts(x, p, acc=a))(x, acc)
    assert parts.shape == (1, m, 4096)
    a = acc[0, :m, :4096] if major else acc[0, :4096, :m].T
    want = np.asarray(x, np.float64) @ w64 + np.asarray(a, np.float64)
    assert rel_err(np.asarray(parts[0], np.float64), want) < 8e-3


def _stream_decode(m, p, ctas_per_sm=1, token_major=True, wgs=1):
    """The decode grid's tiles on the persistent stream-K schedule, partials TMA-added (the bench's
    ``--e2e-configs stream``; ``wgs=2``: two compute warpgroups of 64 rows each)."""
    return dataclasses.replace(mg._decode_stream_config(m, p, ctas_per_sm), block_n=128 // wgs, compute_wgs=wgs,
                               transpose_out=token_major)


@pytest.mark.parametrize("m,token_major,wgs", [(1, True, 1), (5, True, 1), (16, True, 1), (5, False, 1), (1, True, 2),
                                             (16, True, 2)])
def test_stream_partials_token_major_into_acc(m, token_major, wgs, monkeypatch):
    """Stream-K with ``transpose_out=True`` writes token-major fp32 partials: in the interpreter one
    slot per CTA that touches a tile (summed over the valid slots), on hardware TMA-added into one
    ``[1, rows, Np]`` buffer that a caller may pass as ``acc``, as the split decode grids do. The
    parts call returns ``[1, M, N]`` fp32 = acc + x @ W; act-order K; the hardware path lowers with
    and without acc; ``[Np, Mp]`` stream partials take an ``[1, Np, Mp]`` acc and return one addend."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 3)  # 3 CTAs over 2 N tiles x 8 K blocks: tiles split across CTAs
    lin, w64, p = make(300 + m, 1024, 256, 4, 128, True)
    cfg = _stream_decode(m, p, token_major=token_major, wgs=wgs)
    assert cfg.writes_y == token_major
    _, _, counts, *_ = mg._stream_geometry(-(-m // cfg.block_m) * cfg.block_m, p, cfg)
    assert counts.max() > 1  # some tile's partial sums come from two CTAs
    x = jax.random.normal(jax.random.key(301 + m), (m, 1024), jnp.float32).astype(jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ w64
    shape = mg.accumulator_shape(m, p, config=cfg, interpret=True)
    mp = -(-m // cfg.block_m) * cfg.block_m
    assert shape == ((1, mp, 256) if token_major else (1, 256, mp))
    hw_shape = mg.accumulator_shape(m, p, config=cfg)
    assert hw_shape == ((1, m if m < 8 else mp, 256) if token_major else (1, 256, mp))
    assert mg.accumulator_shape(m, p, config=dataclasses.replace(cfg, split_reduce="xla")) is None
    acc = jax.random.normal(jax.random.key(302 + m), shape, jnp.float32)
    got = mg.gptq_matmul_mgpu_parts(x, p, config=cfg, interpret=True, acc=acc)
    a = np.asarray(acc[0, :m, :256] if token_major else acc[0, :256, :m].T, np.float64)
    if token_major:
        assert got.shape == (1, m, 256) and got.dtype == jnp.float32
    else:
        assert got.shape == (1, m, 256) and got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got[0], np.float64), ref + a) < 8e-3
    assert rel_err(np.asarray(mg.gptq_matmul_mgpu(x, p, config=cfg, interpret=True), np.float64), ref) < 8e-3
    for hw_acc in (None, jnp.zeros(hw_shape, jnp.float32)):
        low = mg._forward.trace(x, p, cfg, False, token_major, hw_acc).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in low


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
def test_stream_partials_compiled_on_gpu(m):
    """Stream-K decode configs (1 and 2 CTAs per SM, one or two compute warpgroups; token-major partials TMA-added into the caller's
    random fp32 buffer) compiled, against float64: the 7B o_proj and down shapes (act-order; K
    split-padded for down), and four launches chained in one jit, each from the previous output."""
    for k, n in ((4096, 4096), (11008, 4096)):
        lin, w64, p = make(310 + m + k, k, n, 4, 128, True)
        x = jax.random.normal(jax.random.key(m + k), (m, k), jnp.float32).astype(jnp.bfloat16)
        for cps, wgs in ((1, 1), (2, 1), (2, 2)):
            cfg = _stream_decode(m, p, cps, wgs=wgs)
            shape = mg.accumulator_shape(m, p, config=cfg)
            acc = jax.random.normal(jax.random.key(7 + m + cps), shape, jnp.float32)
            parts = jax.jit(lambda x, a, cfg=cfg: mg.gptq_matmul_mgpu_parts(x, p, config=cfg, acc=a))(x, acc)
            assert parts.shape == (1, m, n) and parts.dtype == jnp.float32
            want = np.asarray(x, np.float64) @ w64 + np.asarray(acc[0, :m, :n], np.float64)
            assert rel_err(np.asarray(parts[0], np.float64), want) < 8e-3, (k, cps, wgs)
    lin, w64, p = make(320 + m, 4096, 4096, 4, 128, True)
    cfg = _stream_decode(m, p)

    def chain(x):
        xs = [x]
        for _ in range(4):
            y = mg.gptq_matmul_mgpu(xs[-1], p, config=cfg)
            xs.append((y.astype(jnp.float32) * (1.0 / 16)).astype(jnp.bfloat16))
        return xs

    xs = jax.jit(chain)(jax.random.normal(jax.random.key(m), (m, 4096), jnp.float32).astype(jnp.bfloat16))
    for a, b in zip(xs[:-1], xs[1:]):
        assert rel_err(np.asarray(b, np.float64), np.asarray(a, np.float64) @ w64 / 16) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16])
def test_store_wait_read_compiled_on_gpu(m):
    """``store_wait="read"`` compiled: CTAs exit once their TMA reduce-adds have read SMEM; the
    writes still land before the next launch reads them. Four decode-grid launches in one jit,
    each one's input made from the previous one's fp32 sum (one XLA op between), against float64
    steps on the same rounded inputs and against the ``"full"`` chain."""
    k = 4096
    lin, w64, p = make(123 + m, k, k, 4, 128, True)
    base = mg._grid_config(m, p)  # the split grid (at 16 tokens this layer's default is stream-K)
    assert base.split_k > 1 and base.split_reduce == "tma"

    def chain(x, cfg):
        xs = [x]
        for _ in range(4):
            y = mg.gptq_matmul_mgpu(xs[-1], p, config=cfg)
            xs.append((y.astype(jnp.float32) * (1.0 / 16)).astype(jnp.bfloat16))
        return xs

    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    outs = {sw: jax.jit(lambda x, sw=sw: chain(x, dataclasses.replace(base, store_wait=sw)))(x)
            for sw in ("read", "full")}
    for xs in outs.values():
        for a, b in zip(xs[:-1], xs[1:]):  # every step against float64 on its actual (rounded) input
            want = np.asarray(a, np.float64) @ w64 / 16
            assert rel_err(np.asarray(b, np.float64), want) < 1e-2
    assert rel_err(np.asarray(outs["read"][-1], np.float64), np.asarray(outs["full"][-1], np.float64)) < 3e-2


# ---------------------------------------------------------------- silu(gate) * up inside the kernel


def glu_x64(gu: np.ndarray, k: int, dtype) -> np.ndarray:
    """Float64 ``silu(gate) * up`` from fp32 ``[..., 2k]``, rounded to ``dtype`` once (the kernel's x)."""
    g, u = np.asarray(gu, np.float64)[..., :k], np.asarray(gu, np.float64)[..., k:]
    x = g / (1.0 + np.exp(-g)) * u
    return np.asarray(jnp.asarray(x, jnp.float32).astype(dtype), np.float64)


@pytest.mark.parametrize("m,k,n,gs,tiles", [
    (1, 1024, 256, 128, (8, 64, 128, 2, "acc", True)),  # token-major partials
    (5, 576, 128, 64, (8, 64, 64, 5, "acc")),         # K = 576 -> Kp 640: the last K block past gu's end
    (16, 512, 192, 128, (16, 64, 128, 2, "weights")),
    (3, 320, 128, -1, (8, 64, 64, 3, "weights")),      # per-channel
])
def test_glu_parts_interpret(m, k, n, gs, tiles, monkeypatch):
    """gptq_matmul_mgpu_glu_parts: the decode grid makes x = silu(gate) * up from fp32 gate / up
    tiles (fresh random values, large enough to reach silu's tails) in each pipeline step; the
    addends sum to x @ W against float64 (x rounded to bf16 once, as the kernel rounds it), with
    split K summed in XLA and TMA-added into a random accumulator (an addend in the interpreter)."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 3)
    bm, bn, bk, split, mode, *major = tiles
    lin, w64, p = make(120 + m + k, k, n, 4, gs, False)
    gu = jax.random.normal(jax.random.key(m + k), (m, 2 * k), jnp.float32) * 3.0
    want = glu_x64(gu, k, jnp.bfloat16) @ w64
    cfg = mg.MgpuConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_stages=2, scale_mode=mode,
                        transpose_out=major[0] if major else None)
    assert mg.glu_in_kernel(m, p, cfg)
    parts = mg.gptq_matmul_mgpu_glu_parts(gu, p, config=cfg, interpret=True)
    assert parts.shape[1:] == (m, n) and parts.shape[0] in (1, split)
    assert rel_err(np.asarray(parts, np.float64).sum(0), want) < 8e-3
    tma = dataclasses.replace(cfg, split_reduce="tma")
    shape = mg.accumulator_shape(m, p, config=tma, interpret=True)
    acc = jax.random.normal(jax.random.key(5), shape, jnp.float32)
    parts = mg.gptq_matmul_mgpu_glu_parts(gu.reshape(1, m, 2 * k), p, config=tma, interpret=True, acc=acc)
    assert parts.shape[1:] == (1, m, n)
    got = np.asarray(parts, np.float64).sum(0)[0]
    a = acc[0, :m, :n] if tma.writes_y else acc[0, :n, :m].T
    assert rel_err(got, want + np.asarray(a, np.float64)) < 8e-3
    # the same kernel on hardware: lowered for CUDA here
    for c in (cfg, tma):
        text = mg._forward.trace(gu.reshape(m, 2, k), p, c, False, parts=True,
                                 glu_dtype=jnp.dtype(jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_glu_parts_falls_back_and_checks_inputs():
    """Act-order down projections (x permuted per call) and the prefill schedules take silu(gate) *
    up from XLA first, with the same result; bad inputs get errors naming the problem."""
    k, n = 576, 128
    lin, w64, p = make(131, k, n, 4, 128, True)
    assert p.perm is not None and not mg.glu_in_kernel(1, p)
    gu = jax.random.normal(jax.random.key(2), (2, 2 * k), jnp.float32) * 2.0
    parts = mg.gptq_matmul_mgpu_glu_parts(gu, p, interpret=True)
    assert rel_err(np.asarray(parts, np.float64).sum(0), glu_x64(gu, k, jnp.bfloat16) @ w64) < 8e-3
    _, w64b, pb = make(132, k, n, 4, 128, False)
    gu_big = jax.random.normal(jax.random.key(3), (40, 2 * k), jnp.float32)
    assert not mg.glu_in_kernel(40, pb)  # M = 40: stream-K, not the decode grid
    assert rel_err(np.asarray(mg.gptq_matmul_mgpu_glu_parts(gu_big, pb, interpret=True), np.float64).sum(0),
                   glu_x64(gu_big, k, jnp.bfloat16) @ w64b) < 8e-3
    with pytest.raises(ValueError, match=r"gu must be \[\.\.\., 2 K\]"):
        mg.gptq_matmul_mgpu_glu_parts(gu[:, :k], pb, interpret=True)
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float16"):
        mg.gptq_matmul_mgpu_glu_parts(gu, pb, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="gu must be float32, bfloat16 or float16"):
        mg.gptq_matmul_mgpu_glu_parts(gu.astype(jnp.int32), pb, interpret=True)


def test_glu_config_keeps_the_grid_and_fits_the_plain_kernels_shared_memory(monkeypatch):
    """glu_config: the decode grid of default_config (same split, so the same accumulator) with
    the pipeline stages cut so that the stages' fp32 gate / up tiles plus the x scratch take no
    more shared memory than the plain kernel's stages; prefill configs unchanged."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 132)
    for k, n, bits, gs in ((11008, 4096, 4, 128), (4096, 4096, 8, 64), (1536, 576, 4, -1)):
        _, _, p = make(160 + k, k, n, bits, gs, False)
        for m in (1, 5, 16, 64):
            plain, glu = mg.default_config(m, p), mg.glu_config(m, p)
            assert dataclasses.replace(glu, num_stages=plain.num_stages) == plain, (k, m)
            assert mg.accumulator_shape(m, p, config=glu) == mg.accumulator_shape(m, p)
            if plain.schedule != "grid":
                assert glu == plain
                continue
            bm, bn, bk = plain.block_m, plain.block_n, plain.block_k
            sz = 2 * max(1, bk // p.group_size) * bn * 2
            stage = lambda act: bk * bn * bits // 8 + act + sz  # noqa: E731
            assert 2 <= glu.num_stages <= plain.num_stages
            if glu.num_stages > 2:
                assert glu.num_stages * stage(2 * bm * bk * 4) + bm * bk * 2 <= plain.num_stages * stage(bm * bk * 2)
            assert (glu.num_stages + 1) * stage(2 * bm * bk * 4) + bm * bk * 2 > plain.num_stages * stage(bm * bk * 2) \
                or glu.num_stages == plain.num_stages


def test_dispatch_glu_parts():
    """dispatch.matmul_glu_parts: in the Mosaic kernel on the decode grid, through XLA first for the
    Triton kernel; both against float64."""
    k, n = 512, 256
    lin, w64, _ = make(140, k, n, 4, 128, False)
    gu = jax.random.normal(jax.random.key(4), (2, 1, 2 * k), jnp.float32) * 2.0
    want = glu_x64(gu, k, jnp.bfloat16) @ w64
    for kernel in ("mgpu", "triton"):
        prep = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel=kernel)
        assert dispatch.glu_in_kernel((2, 1, k), jnp.bfloat16, prep) == (kernel == "mgpu")
        parts = dispatch.matmul_glu_parts(gu, prep, jnp.bfloat16)
        assert parts.shape[1:] == (2, 1, n)
        assert rel_err(np.asarray(parts, np.float64).sum(0), want) < 8e-3, kernel
    with pytest.raises(ValueError, match="gu must be"):
        dispatch.matmul_glu_parts(gu[..., :k], prep, jnp.bfloat16)
    with pytest.raises(ValueError, match="takes no acc"):
        dispatch.matmul_glu_parts(gu, prep, jnp.bfloat16, acc=jnp.zeros((1, 2, n), jnp.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
def test_glu_parts_compiled_on_gpu(m):
    """The in-kernel silu(gate) * up compiled (default decode grid, TMA-reduced into a random
    accumulator; K = 4992 is split-padded, so gu's last K blocks read past its end), against float64."""
    for k, n in ((4992, 1024), (11008, 4096)):
        lin, w64, p = make(150 + m + k, k, n, 4, 128, False)
        # 9-16 tokens on the 7B down_proj: stream-K by default, silu(gate) * up made in XLA first
        assert mg.glu_in_kernel(m, p) == (mg.default_config(m, p).schedule == "grid") == (m <= 8 or k != 11008)
        gu = jax.random.normal(jax.random.key(m + k), (m, 2 * k), jnp.float32) * 3.0
        want = glu_x64(gu, k, jnp.bfloat16) @ w64
        parts = jax.jit(lambda g: mg.gptq_matmul_mgpu_glu_parts(g, p))(gu)
        assert rel_err(np.asarray(parts, np.float64).sum(0), want) < 8e-3, (k, m)
        shape = mg.accumulator_shape(m, p)
        if shape is not None:
            acc = jax.random.normal(jax.random.key(9), shape, jnp.float32)
            parts = jax.jit(lambda g, a: mg.gptq_matmul_mgpu_glu_parts(g, p, acc=a))(gu, acc)
            a = acc[0, :m, :n] if mg.default_config(m, p).writes_y else acc[0, :n, :m].T
            assert rel_err(np.asarray(parts, np.float64).sum(0), want + np.asarray(a, np.float64)) < 8e-3, (k, m)


# ---------------------------------------------------------------- L2 prefetch of the next layer


def test_prefetch_plan_covers_the_first_k_blocks_and_their_groups(monkeypatch):
    """_prefetch_plan: the next layer's first K blocks ("frag" words are K-block major), capped by
    PREFETCH_MAX_BYTES, in 8 KB chunks of the [rows, 256] word view, plus the scale and zero rows
    of those blocks' groups in the [rows, 128] sz view; nothing for other layouts."""
    lin, _, nxt = make(90, 1024, 384, 4, 128, False)  # 8 K blocks of 128, Np = 384
    words, sz = mg._prefetch_views(nxt)
    assert words.shape == (8 * 384 // 16, 256) and sz.shape == (2 * nxt.sz.shape[1] * 3, 128)
    plan = mg._prefetch_plan(nxt)  # all 8 blocks fit the default budget
    assert plan[0] == (0, 0, 8, 8 * 384 // 128)
    gp = nxt.sz.shape[1]
    assert [(v, s) for v, s, _, _ in plan[1:]] == [(1, 0), (1, gp * 3)]
    assert all(r * n == 8 * 3 for _, _, r, n in plan[1:])  # 8 groups x 3 rows each, scales and zeros
    monkeypatch.setattr(mg, "PREFETCH_MAX_BYTES", 3 * 384 // 16 * 1024)  # 3 K blocks of words
    plan = mg._prefetch_plan(nxt)
    assert plan[0] == (0, 0, 8, 3 * 3) and all(r * n == 3 * 3 for _, _, r, n in plan[1:])
    _, _, g64 = make(91, 1024, 384, 4, 64, False)  # 2 groups per K block
    assert all(r * n == 2 * 3 * 3 for _, _, r, n in mg._prefetch_plan(g64)[1:])
    _, _, per_channel = make(92, 1024, 384, 4, -1, False)
    assert all(r * n == 3 for _, _, r, n in mg._prefetch_plan(per_channel)[1:])
    assert mg._prefetch_plan(mg.pack_mgpu_linear(lin, bits=4, layout="kblocks")) == ()


def test_prefetch_is_a_hint_the_kernel_lowers_with(monkeypatch):
    """prefetch=<next layer> leaves every result as it was (interpreter: no L2), lowers for CUDA
    with the TMA prefetches in the decode grid (and none without it), and refuses what is not an
    MgpuPacked."""
    monkeypatch.setattr(mg, "_num_sms", lambda: 2)
    lin, w64, p = make(93, 1024, 256, 4, 128, False)
    _, _, nxt = make(94, 256, 384, 4, 128, False)
    x = jax.random.normal(jax.random.key(95), (1, 1024), jnp.float32).astype(jnp.bfloat16)
    cfg = mg.default_config(1, p)
    assert cfg.schedule == "grid" and cfg.split_k > 1 and cfg.split_reduce == "tma"
    plain = mg.gptq_matmul_mgpu_parts(x, p, interpret=True)
    hinted = mg.gptq_matmul_mgpu_parts(x, p, interpret=True, prefetch=nxt)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(hinted))
    np.testing.assert_array_equal(np.asarray(mg.gptq_matmul_mgpu(x, p, interpret=True, prefetch=nxt)),
                                  np.asarray(mg.gptq_matmul_mgpu(x, p, interpret=True)))
    assert rel_err(jnp.sum(hinted.astype(jnp.float32), 0), np.asarray(x, np.float64) @ w64) < 8e-3

    def lowered(**kw):
        return mg._forward.trace(x, p, cfg, False, parts=True, **kw).lower(lowering_platforms=("cuda",)).as_text()

    assert "prefetch" in lowered(prefetch=nxt) and "prefetch" not in lowered()
    acc = jnp.zeros(mg.accumulator_shape(1, p), jnp.float32)  # the TMA-reduced form takes it last
    assert "prefetch" in lowered(prefetch=nxt, acc=acc)
    gu = jax.random.normal(jax.random.key(96), (1, 2 * 256), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(mg.gptq_matmul_mgpu_glu_parts(gu, nxt, interpret=True, prefetch=p)),
        np.asarray(mg.gptq_matmul_mgpu_glu_parts(gu, nxt, interpret=True)))
    # the in-kernel silu(gate) * up grid (its x scratch last) with the prefetch operands, TMA-reduced
    glu_cfg = dataclasses.replace(mg.default_config(1, nxt), split_k=2, split_reduce="tma")
    for kw in ({}, dict(acc=jnp.zeros(mg.accumulator_shape(1, nxt, config=glu_cfg), jnp.float32))):
        text = mg._forward.trace(gu.reshape(1, 2, 256), nxt, glu_cfg, False, parts=True, glu_dtype=jnp.dtype(jnp.bfloat16),
                                 prefetch=p, **kw).lower(lowering_platforms=("cuda",)).as_text()
        assert "prefetch" in text
    with pytest.raises(ValueError, match="prefetch must be the next layer's MgpuPacked"):
        mg.gptq_matmul_mgpu_parts(x, p, interpret=True, prefetch=lin)
    # dispatch: a Prepared of the next layer is passed on as its Mosaic layout; anything else refused
    prep = dispatch.prepare(lin, bits=4, backend="gpu", interpret=True, gpu_kernel="mgpu")
    nxt_prep = dispatch.prepare(make(94, 256, 384, 4, 128, False)[0], bits=4, backend="gpu", interpret=True,
                                gpu_kernel="mgpu")
    assert dispatch._prefetch_target(nxt_prep) is nxt_prep.packed and dispatch._prefetch_target(None) is None
    np.testing.assert_array_equal(np.asarray(dispatch.matmul_parts(x, prep, prefetch=nxt_prep)),
                                  np.asarray(dispatch.matmul_parts(x, prep)))
    with pytest.raises(ValueError, match="prefetch must be the next layer's Prepared"):
        dispatch.matmul_parts(x, prep, prefetch=nxt)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16])
def test_prefetch_compiled_on_gpu(m):
    """On the GPU a decode grid that prefetches the next layer (q/k/v-like 4096 x 12288 into an
    o_proj-like 4096 x 4096, and the glu form of a down projection into it) compiles, runs and
    still matches float64; the next layer's own result is unchanged after the prefetch."""
    _, w64, p = make(97 + m, 4096, 12288, 4, 128, False)
    _, w64n, nxt = make(98 + m, 4096, 4096, 4, 128, False)  # no act-order: silu * up in the kernel
    x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.float32).astype(jnp.bfloat16)
    parts = jax.jit(lambda x: mg.gptq_matmul_mgpu_parts(x, p, prefetch=nxt))(x)
    want = np.asarray(x, np.float64) @ w64
    assert rel_err(np.asarray(jnp.sum(parts.astype(jnp.float32), 0), np.float64), want) < 8e-3
    y = jax.jit(lambda x: mg.gptq_matmul_mgpu(x, nxt))(x)
    assert rel_err(y, np.asarray(x, np.float64) @ w64n) < 8e-3
    gu = jax.random.normal(jax.random.key(9 + m), (m, 2 * 4096), jnp.float32)
    down = jax.jit(lambda gu: mg.gptq_matmul_mgpu_glu_parts(gu, nxt, prefetch=p))(gu)
    x_glu = glu_x64(np.asarray(gu), 4096, jnp.bfloat16)
    assert rel_err(np.asarray(jnp.sum(down.astype(jnp.float32), 0), np.float64), x_glu @ w64n) < 8e-3
