"""Helpers of the benchmark scripts that turn raw measurements into reported numbers."""

import dataclasses
import importlib.util
import json
import pathlib
import random
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(relpath: str):
    """A benchmark script under ``benchmarks/`` loaded as a module (registered under its name: a
    dataclass in it looks its module up)."""
    path = ROOT / "benchmarks" / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_kernels():
    return _script("bench_kernels.py")


def test_gpu_timeline_busy_idle_and_gap_attribution(bench_kernels):
    """Busy = union of (possibly overlapping) spans; idle = the gaps between them, each charged to
    the op right after it; compared with a brute-force 0.25 us grid over random spans."""
    rng = np.random.default_rng(7)
    names = ["gemm", "mosaic", "reduce", "pad"]
    spans, t = [], 0.0
    for _ in range(200):
        t += float(rng.choice([0.0, rng.uniform(0, 3), rng.uniform(5, 20)]))
        dur = float(rng.integers(1, 40)) / 4
        start = t - float(rng.integers(0, 8)) / 4 if rng.random() < 0.2 else t  # some overlap
        start = round(start * 4) / 4
        t = round(t * 4) / 4
        spans.append((start, start + dur, str(rng.choice(names))))
        t = start + dur
    n = 4
    tl = bench_kernels.gpu_timeline(list(reversed(spans)), n)  # order of the trace does not matter
    lo, hi = min(a for a, _, _ in spans), max(b for _, b, _ in spans)
    grid = np.arange(lo, hi, 0.25) + 0.125
    covered = np.zeros(grid.shape, bool)
    for a, b, _ in spans:
        covered |= (grid > a) & (grid < b)
    np.testing.assert_allclose(tl["gpu_busy_us_per_step"], covered.sum() * 0.25 / n, atol=1e-9)
    np.testing.assert_allclose(tl["gpu_idle_us_per_step"], (~covered).sum() * 0.25 / n, atol=1e-9)
    assert tl["gpu_events"] == len(spans) // n
    per_op = {nm: sum(b - a for a, b, x in spans if x == nm) / n for nm in names}
    assert dict(tl["top_ops_us_per_step"]) == pytest.approx(per_op)
    charged = sum(t for _, t in tl["idle_before_ops_us_per_step"])
    assert charged == pytest.approx(tl["gpu_idle_us_per_step"])  # only 4 names: all listed
    big = 0
    ordered = sorted(spans)
    end = ordered[0][1]
    for a, b, _ in ordered[1:]:
        big += a - end > 5
        end = max(end, b)
    assert tl["gaps_over_5us_per_step"] == big / n and big > 0


def test_gpu_spans_keep_only_gpu_tracks(bench_kernels):
    """A trace holds the same op names on host tracks (XLA thunks) and GPU tracks: only the GPU
    tracks' complete events are kernel spans (random names, pids and order)."""
    rng = random.Random(11)
    tracks = {1: "/host:CPU", 2: "/device:GPU:0 (stream 7)", 3: "python3", 4: "GPU:0 Stream #13"}
    events = [dict(ph="M", name="process_name", pid=p, args=dict(name=nm)) for p, nm in tracks.items()]
    want = []
    for i in range(300):
        pid = rng.choice(list(tracks))
        ts, dur = rng.uniform(0, 1e4), rng.uniform(0.5, 30)
        nm = rng.choice(["decode_attention_update", "fusion.3", "mosaic_gpu_kernel"])
        ph = rng.choice(["X", "X", "X", "i"])
        e = dict(ph=ph, name=nm, pid=pid, ts=ts)
        if ph == "X":
            e["dur"] = dur
        events.append(e)
        if ph == "X" and pid in (2, 4):
            want.append((ts, ts + dur, nm))
    rng.shuffle(events)
    assert bench_kernels.gpu_pids(bench_kernels.process_names(events)) == {2, 4}
    got = bench_kernels.gpu_spans(events)
    assert sorted(got) == sorted(want) and len(want) > 50


def test_layer_cycle_positions_and_one_layer(bench_kernels):
    """Median per position of a repeating 4-kernel cycle, and the ops of the second layer."""
    rng = np.random.default_rng(11)
    base = [7.0, 2.0, 13.0, 5.0]
    spans, t, truth = [], 0.0, [[] for _ in base]
    layers = 9
    for layer in range(layers):
        for j, d in enumerate(base):
            dur = d + float(rng.uniform(-0.5, 0.5))
            truth[j].append(dur)
            spans.append((t, t + dur, "body_mosaic_gpu_kernel"))
            t += dur + 0.5
            spans.append((t, t + 1.0, f"input_reduce_fusion_{j}"))
            t += 1.5
    spans.append((t, t + 3.0, "gemm_fusion_dot_lm_head"))
    out = bench_kernels.layer_cycle(list(reversed(spans)), "mosaic", 4)
    assert out["matches"] == 4 * layers
    np.testing.assert_allclose(out["us_by_position"], [np.median(v) for v in truth], atol=0.006)
    names = [nm for nm, _ in out["layer_ops"]]
    assert names == ["body_mosaic_gpu_kernel", "input_reduce_fusion_0", "body_mosaic_gpu_kernel",
                     "input_reduce_fusion_1", "body_mosaic_gpu_kernel", "input_reduce_fusion_2",
                     "body_mosaic_gpu_kernel", "input_reduce_fusion_3"]
    assert out["layer_ops"][0][1] == pytest.approx(truth[0][1], abs=0.006)
    assert bench_kernels.layer_cycle(spans[:10], "mosaic", 4) == {"matches": 5}


def test_e2e_cache_fills_the_context_and_the_config_variants(bench_kernels):
    """--e2e-context: the first slots hold random keys / values and count as valid, decoding goes on
    at that slot; the --e2e-configs variants change only the decode grid's split knobs."""
    import jax
    import jax.numpy as jnp

    from jgptq.models.config import LlamaConfig
    from jgptq.models.llama import LlamaForCausalLM
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
    from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

    cfg = LlamaConfig(model_type="llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16)
    lin = lambda k, n: {"kernel": jnp.ones((k, n), jnp.bfloat16)}  # noqa: E731
    layer = {"input_layernorm": {"scale": jnp.ones(32)}, "post_attention_layernorm": {"scale": jnp.ones(32)},
             "self_attn": {"q_proj": lin(32, 32), "k_proj": lin(32, 16), "v_proj": lin(32, 16),
                           "o_proj": lin(32, 32)},
             "mlp": {"gate_proj": lin(32, 64), "up_proj": lin(32, 64), "down_proj": lin(64, 32)}}
    model = LlamaForCausalLM.from_params(cfg, {"embed_tokens": {"embedding": jnp.ones((16, 32))}, "layers": [layer] * 2,
                                               "norm": {"scale": jnp.ones(32)}, "lm_head": lin(32, 16)},
                                         dtype=jnp.bfloat16)
    cache = bench_kernels.e2e_cache(model, 3, 64, 40)
    assert int(cache["index"]) == 40
    np.testing.assert_array_equal(np.asarray(cache["valid"]), np.arange(64)[None].repeat(3, 0) < 40)
    assert cache["k"][0].shape == (3, 64, 1, 16) and float(jnp.abs(cache["k"][1]).sum()) > 0
    assert bench_kernels.e2e_cache(model, 1, 64, 0)["index"] == 0
    with pytest.raises(SystemExit, match="--e2e-context"):
        bench_kernels.e2e_cache(model, 1, 64, 64)
    p = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(0), 11008, 256), bits=4)
    default = lambda m, q: mg.default_config(m, q)  # noqa: E731
    for name, (pack_kw, pick) in bench_kernels.E2E_CONFIGS.items():
        c1, c64 = pick(default, 1, p), pick(default, 64, p)
        assert c64 == mg.default_config(64, p) or name.startswith("tma"), name  # M > 16: the default (tma: stream-K)
        assert c1.block_m == 8 and c1.schedule == "grid", name
    assert bench_kernels.E2E_CONFIGS["split32"][1](default, 1, p).split_k == 22
    assert bench_kernels.E2E_CONFIGS["steps8"][1](default, 1, p).split_k == 11
    assert bench_kernels.E2E_CONFIGS["tma-split32"][1](default, 1, p).split_reduce == "tma"
    assert bench_kernels.E2E_CONFIGS["kblocks"][0] == {"layout": "kblocks"}
    assert bench_kernels.E2E_CONFIGS["major16"][1](default, 16, p).writes_y
    wide = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(1), 128, 12288), bits=4)
    pick_wide = bench_kernels.E2E_CONFIGS["bn128-wide"][1]
    assert pick_wide(default, 16, wide).block_n == 128 and default(16, wide).block_n == 64
    assert pick_wide(default, 8, wide) == default(8, wide) and pick_wide(default, 16, p) == default(16, p)
    for m in (1, 16, 64):  # the kernel sweep's candidates build for decode, small-batch and stream M
        cands = bench_kernels.mgpu_candidates(m, p, 64)
        assert cands[0] == (mg.default_config(m, p), mg.default_layout(4)) and len(cands) > 3, m


def test_e2e_rewind_sets_decoding_back_to_the_context(bench_kernels):
    """Each timed stretch restarts at --e2e-context: index back, later slots invalid, keys / values
    kept; a stretch that would run past the cache is refused before anything is built."""
    import argparse

    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    b, slots, ctx = 3, 48, int(rng.integers(5, 30))
    k = [jax.random.normal(jax.random.key(i), (b, slots, 2, 8), jnp.bfloat16) for i in range(2)]
    cache = {"k": k, "v": list(reversed(k)), "valid": jnp.asarray(rng.random((b, slots)) < 0.9),
             "index": jnp.asarray(slots + 7, jnp.int32)}  # run past the end, as 140 untouched steps would
    out = bench_kernels.e2e_rewind(cache, ctx)
    assert int(out["index"]) == ctx and out["index"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out["valid"]), np.arange(slots)[None].repeat(b, 0) < ctx)
    assert out["k"] is cache["k"] and out["v"] is cache["v"]
    assert int(cache["index"]) == slots + 7  # the input is not changed
    ns = argparse.Namespace(e2e_context=128, e2e_slots=256, e2e_steps=20, e2e_scan=20, e2e_trace=True)
    assert bench_kernels.e2e_check_slots(ns) == 60  # a traced scan: one warm call + 2 traced ones
    ns.e2e_scan = 50
    with pytest.raises(SystemExit, match="--e2e-slots 256"):
        bench_kernels.e2e_check_slots(ns)
    ns.e2e_trace = False
    assert bench_kernels.e2e_check_slots(ns) == 50


def test_e2e_grid_specs_change_only_the_named_layers(bench_kernels):
    """--e2e-configs g-<knob><N>...[@KxN]: the decode grid's knobs at M <= 16, on the named shapes only;
    bad specs are refused by name."""
    import jax

    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
    from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

    down = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(0), 11008, 256), bits=4)
    square = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(1), 512, 512), bits=4)
    default = lambda m, q: mg.default_config(m, q)  # noqa: E731
    assert (default(1, square).split_k, default(1, square).block_n) == (2, 64)  # 4 K blocks: 2 per CTA
    pack_kw, pick = bench_kernels.e2e_config("g-s1-bn64-st3@512x512")
    assert pack_kw == {}
    c = pick(default, 1, square)
    assert (c.split_k, c.block_n, c.num_stages, c.split_reduce) == (4, 64, 3, "tma")
    assert pick(default, 1, down) == default(1, down)  # another shape: untouched
    assert pick(default, 64, square) == default(64, square)  # M > 16: untouched
    _, pick_all = bench_kernels.e2e_config("g-s2")
    assert pick_all(default, 1, down).split_k == 44 and pick_all(default, 1, square).split_k == 2  # max_split 64
    assert bench_kernels.e2e_config("g-s2-x32")[1](default, 1, down).split_k == 22
    assert bench_kernels.e2e_config("g-s4-x32-bn128")[1](default, 1, down) != default(1, down)  # session 19's
    c = bench_kernels.e2e_config("g-k2@11008x256+512x512")[1](default, 1, down)
    assert c.split_k == 2 and c.split_reduce == "tma"
    assert bench_kernels.e2e_config("g-k1")[1](default, 1, down).split_reduce == "xla"
    rw = bench_kernels.e2e_config("g-rw1")[1](default, 1, down)  # the default tiles, CTAs exit after the SMEM read
    assert rw.store_wait == "read" and rw == dataclasses.replace(default(1, down), store_wait="read")
    assert bench_kernels.e2e_config("g-rw0")[1](default, 16, down) == default(16, down)
    _, first = bench_kernels.e2e_config("g-k4@512x512/g-k8/g-k2")  # the first spec naming the shape wins
    assert first(default, 1, square).split_k == 4 and first(default, 1, down).split_k == 8
    _, only = bench_kernels.e2e_config("g-k2@512x512/g-bn64@1x1")
    assert only(default, 1, down) == default(1, down)
    with pytest.raises(ValueError, match="split 3 does not divide the 88 K blocks of 11008 x 256"):
        bench_kernels.e2e_config("g-k3")[1](default, 1, down)
    with pytest.raises(ValueError, match="block_n=32"):
        bench_kernels.e2e_config("g-bn32")[1](default, 1, down)
    for bad in ("g", "g-q2", "g-s2@4096", "g-s2-s4", "steps3", "g-s2/", "g-s2/steps2"):
        with pytest.raises(SystemExit, match="--e2e-configs"):
            bench_kernels.e2e_config(bad)
    assert bench_kernels.e2e_config("steps2") is bench_kernels.E2E_CONFIGS["steps2"]
    # stream[-cN][-stN][-bnN]: the decode matmuls on persistent stream-K, token-major partials TMA-added
    pack_kw, pick = bench_kernels.e2e_config("stream")
    c = pick(default, 1, down)
    assert pack_kw == {} and (c.schedule, c.split_k, c.ctas_per_sm, c.block_n, c.split_reduce) == ("stream", 1, 1, 128, "tma")
    assert c.writes_y and c.num_stages == default(1, down).num_stages and c.block_m == 8
    mg._validate(jax.numpy.zeros((1, 11008), jax.numpy.bfloat16), down, c)
    c = bench_kernels.e2e_config("stream-c2-st4-bn64")[1](default, 16, square)
    assert (c.ctas_per_sm, c.num_stages, c.block_n, c.block_m) == (2, 4, 64, 16)
    assert pick(default, 64, down) == default(64, down)  # M > 16: untouched
    only = bench_kernels.e2e_config("stream-c2@11008x256+4096x4096")[1]
    assert only(default, 1, down).schedule == "stream" and only(default, 1, square) == default(1, square)
    c = bench_kernels.e2e_config("stream-c2-wg2")[1](default, 1, down)
    assert (c.compute_wgs, c.block_n, c.ctas_per_sm) == (2, 64, 2)
    mg._validate(jax.numpy.zeros((1, 11008), jax.numpy.bfloat16), down, c)
    for bad in ("stream-c2-c3", "stream-q2", "streams", "stream@4096"):
        with pytest.raises(SystemExit, match="--e2e-configs"):
            bench_kernels.e2e_config(bad)


def test_e2e_norm_variants_set_and_restore_the_model_knobs(bench_kernels):
    """--e2e-norm suffixes: -pN / -glu / -xact change llama.NORM_MAX_PARTS / GLU_IN_DOWN only while the
    variant is traced; an unknown suffix is refused by name."""
    from jgptq.models import llama

    parts, glu = llama.NORM_MAX_PARTS, llama.GLU_IN_DOWN
    with bench_kernels.e2e_norm("pallas-p3-xact") as name:
        assert (name, llama.NORM_MAX_PARTS, llama.GLU_IN_DOWN) == ("pallas", 3, False)
    assert (llama.NORM_MAX_PARTS, llama.GLU_IN_DOWN) == (parts, glu)
    with bench_kernels.e2e_norm("auto-glu") as name:
        assert (name, llama.GLU_IN_DOWN) == ("auto", True)
    import jax

    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
    from jgptq.pallas_kernels import persistent_mlp as pm
    from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

    pm_cfg = pm.default_config
    with bench_kernels.e2e_norm("auto-pmlp") as name:
        assert (name, llama.PERSISTENT_MLP, pm.default_config) == ("auto", True, pm_cfg)
    gu = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(5), 128, 256, bits=4, group_size=128), bits=4)
    dn = mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(6), 128, 128, bits=4, group_size=128), bits=4)
    with bench_kernels.e2e_norm("pallas-pmlp1"):
        assert llama.PERSISTENT_MLP and pm.default_config(1, gu, dn).ctas_per_sm == 1
    assert pm.default_config(1, gu, dn).ctas_per_sm == 2
    with bench_kernels.e2e_norm("auto-pmlp3s2"):
        c, d = pm.default_config(1, gu, dn), pm_cfg(1, gu, dn)
        assert (c.ctas_per_sm, c.gate_up.num_stages, c.down.num_stages) == (
            3, min(2, d.gate_up.num_stages), min(2, d.down.num_stages))
    with pytest.raises(SystemExit, match="-pmlp9x"):
        with bench_kernels.e2e_norm("auto-pmlp9x"):
            pass
    assert (llama.PERSISTENT_MLP, pm.default_config) == (False, pm_cfg)
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
    from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

    p = mg.pack_mgpu_linear(random_gptq_linear(__import__("jax").random.key(0), 11008, 256), bits=4)
    glu_cfg = mg.glu_config
    with bench_kernels.e2e_norm("auto-gs3"):
        assert llama.GLU_IN_DOWN and mg.glu_config(1, p).num_stages == 3
    assert mg.glu_config is glu_cfg
    pf, pf_bytes = llama.PREFETCH_NEXT, mg.PREFETCH_MAX_BYTES
    with bench_kernels.e2e_norm("auto-pf8-p4") as name:
        assert (name, llama.PREFETCH_NEXT, mg.PREFETCH_MAX_BYTES, llama.NORM_MAX_PARTS) == ("auto", True, 8 << 20, 4)
    with bench_kernels.e2e_norm("auto-pf"):
        assert llama.PREFETCH_NEXT and mg.PREFETCH_MAX_BYTES == pf_bytes
    assert (llama.PREFETCH_NEXT, mg.PREFETCH_MAX_BYTES) == (pf, pf_bytes) == (False, 16 << 20)
    with bench_kernels.e2e_norm("auto") as name:
        assert (name, llama.GLU_IN_DOWN) == ("auto", glu)
    with pytest.raises(SystemExit, match="'q7'"):
        with bench_kernels.e2e_norm("auto-q7"):
            pass
    assert llama.GLU_IN_DOWN == glu


def test_e2e_attention_variants_patch_and_restore_the_kernel_tiles(bench_kernels):
    """--e2e-attention suffixes change decode_attention.default_config only while the variant is
    traced (splits cut back to what divides the cache); the name passed on is the implementation;
    an unknown suffix is refused by name."""
    from jgptq.pallas_kernels import decode_attention as da

    real = da.default_config
    base = real(1, 32, 256, 132)
    with bench_kernels.e2e_attention("fused-st3-w8") as name:
        cfg = da.default_config(1, 32, 256, 132)
        assert name == "fused"
        assert (cfg.num_stages, cfg.num_warps, cfg.block_s, cfg.splits) == (3, 8, base.block_s, base.splits)
    assert da.default_config is real
    with bench_kernels.e2e_attention("fused-bs128-sp4"):
        cfg = da.default_config(1, 32, 256, 132)
        assert (cfg.block_s, cfg.splits) == (128, 2)  # 4 splits of 128 slots do not divide 256
    with bench_kernels.e2e_attention("fused-sp4-ck"):
        cfg = da.default_config(1, 32, 256, 132)
        assert (cfg.splits, cfg.combine) == (4, "kernel")
    with bench_kernels.e2e_attention("auto") as name:
        assert name == "auto" and da.default_config is real
    for bad in ("fused-q3", "fused-st", "fused-ck2"):
        with pytest.raises(SystemExit, match=repr(bad.split("-")[1])):
            with bench_kernels.e2e_attention(bad):
                pass
    assert da.default_config is real


def test_l2_residency_busy_time_and_op_kinds():
    """bench_l2_residency: busy time is the union of overlapping spans; ops are told apart by name."""
    mod = _script("bench_l2_residency.py")
    rng = random.Random(13)
    spans, covered = [], set()
    for _ in range(40):
        a = rng.randrange(0, 500)
        b = a + rng.randrange(1, 30)
        spans.append((float(a), float(b), "op"))
        covered.update(range(a, b))
    assert mod.busy_us(sorted(spans)) == pytest.approx(len(covered))
    assert mod.kind("add_rms_norm__1") == "norm"
    assert mod.kind("scoped_mosaic_gpu_kernel") == "matmul"
    assert mod.kind("loop_broadcast_fusion") == "other"


@pytest.fixture(scope="module")
def persistent_phases():
    return _script("probes/persistent_phases.py")


def test_persistent_phases_probe_variants(persistent_phases):
    """The probe's launch chain and barrier-free persistent kernel run in the Mosaic GPU interpreter
    and return the last phase's slices; the barrier variants (global semaphores, which the
    interpreter lacks) lower for CUDA with their three zero-initialised semaphores; bad inputs are
    refused by name; the report row's arithmetic."""
    import jax
    import jax.numpy as jnp

    pp = persistent_phases
    w = jax.random.randint(jax.random.key(random.randrange(2**31)), (3, 2, 8, pp.COLS), -2**31, 2**31 - 1,
                           jnp.int32)
    for variant in ("chain", "chain_pf", "chain_pdl", "stream"):
        out = pp.run_variant(w, variant, True)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(w[-1]), err_msg=variant)
    for variant in pp.BARRIERS:
        text = pp.run_variant.trace(w, variant, False).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and "tensor<3xi32>" in text, variant
    text = pp.run_variant.trace(w, "chain_pf", False).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3 and "slice" not in text  # w passed whole: no copies
    assert "prefetch" in text
    assert "prefetch" not in pp.run_variant.trace(w, "chain", False).lower(lowering_platforms=("cuda",)).as_text()
    text = pp.run_variant.trace(w, "chain_pdl", False).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("griddepcontrol.launch_dependents") == 3 and text.count("griddepcontrol.wait") == 3
    assert "griddepcontrol" not in pp.run_variant.trace(w, "chain", False).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(ValueError, match="variant must be one of"):
        pp.run_variant(w, "spin", True)
    with pytest.raises(ValueError, match=r"int32 \[P, G, R, 64\]"):
        pp.run_variant(w.astype(jnp.float32), "chain", True)
    with pytest.raises(ValueError, match="R <= 256"):
        pp.run_variant(jnp.zeros((1, 1, 300, pp.COLS), jnp.int32), "stream", True)
    row = pp.per_phase_row("overlap", (64, 132, 128, 64), 64 * 5e-6)
    assert row["phase_bytes"] == 132 * 128 * 256 and abs(row["us_per_phase"] - 5.0) < 1e-9
    assert abs(row["GBps"] - 132 * 128 * 256 / 5e3) < 1e-6


@pytest.fixture(scope="module")
def ring_stream():
    return _script("probes/ring_stream.py")


def test_ring_stream_probe_variants(ring_stream):
    """The streaming probe's grid, emit_pipeline and hand-written ring variants run in the Mosaic GPU
    interpreter on fresh random words and return each CTA's last block (and, with -touch, the XOR of
    everything it read), as the NumPy expectation says; the barrier variant lowers for CUDA with its
    semaphores; names parse both ways and bad ones are refused by name."""
    import jax
    import jax.numpy as jnp

    rs = ring_stream
    for name in ("grid-k4-s3-r8", "pipe-s3-r8", "ring-s3-r8", "ring-s2-r8-c2-side", "ring-s3-r16-touch"):
        v = rs.parse_variant(name)
        assert v.name == name
        n_cta = 2 * v.ctas_per_sm
        t = rs.blocks_for(0, v, n_cta) * random.choice((2, 3))
        w = jax.random.randint(jax.random.key(random.randrange(2**31)), (t, v.rows, rs.COLS), -2**31, 2**31 - 1,
                               jnp.int32)
        sx, ssz = rs.side_arrays(t, random.randrange(2**31)) if v.side else (None, None)
        last, xor = rs.run_variant(w, name, n_cta, True, sx, ssz)
        want_last, want_xor = rs.expected(np.asarray(w), v, n_cta)
        np.testing.assert_array_equal(np.asarray(last), want_last, err_msg=name)
        if want_xor is not None:
            np.testing.assert_array_equal(np.asarray(xor), want_xor, err_msg=name)
            assert v.touch or not want_xor.any()
    v = rs.parse_variant("ring-s4-r8-b2")
    t = rs.blocks_for(0, v, 4) * 2
    text = rs.run_variant.trace(jax.ShapeDtypeStruct((t, 8, rs.COLS), jnp.int32), v.name, 4, False) \
        .lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert rs.parse_variant("ring-s8-r16-c2-side-touch-b8") == rs.Variant(
        kind="ring", slots=8, rows=16, ctas_per_sm=2, side=True, touch=True, barrier_every=8)
    for bad, msg in (("ring-s8", "needs both"), ("grid-s4-r8-c2", "not one of"), ("ring-s8-r8-s4", "twice"),
                     ("ring-s8-r300", "R <= 256"), ("ring-s64-r64", "SMEM"), ("spin-s1-r1", "expected")):
        with pytest.raises(ValueError, match=msg):
            rs.parse_variant(bad)
    with pytest.raises(ValueError, match="needs side arrays"):
        rs.run_variant(jnp.ones((8, 8, rs.COLS), jnp.int32), "ring-s2-r8-side", 2, True)
    with pytest.raises(ValueError, match="rows per block"):
        rs.run_variant(jnp.ones((8, 16, rs.COLS), jnp.int32), "ring-s2-r8", 2, True)


def test_mgpu_variants_replace_fields_of_the_default_config(bench_kernels):
    """--mgpu-variants: each ';' set replaces fields of the default config; values parse as int /
    bool / None / str; a malformed item or an unknown field is refused by name."""
    from jgptq.pallas_kernels import gptq_matmul_mgpu as mg

    sets = bench_kernels.parse_variants("num_stages=3; block_n=64,split_k=8 ;transpose_out=False;scale_mode=weights")
    assert sets == [{"num_stages": 3}, {"block_n": 64, "split_k": 8}, {"transpose_out": False},
                    {"scale_mode": "weights"}]
    base = mg.MgpuConfig(block_m=16, split_k=16, num_stages=4, transpose_out=True)
    out = bench_kernels.variant_configs(base, sets)
    assert [c.num_stages for c in out] == [3, 4, 4, 4]
    assert (out[1].block_n, out[1].split_k, out[1].block_m) == (64, 8, 16)
    assert out[2].transpose_out is False and not out[2].writes_y and out[0].writes_y
    assert out[3].scale_mode == "weights"
    with pytest.raises(ValueError, match="'stages3'"):
        bench_kernels.parse_variants("stages3")
    with pytest.raises(ValueError, match="num_stage"):
        bench_kernels.variant_configs(base, [{"num_stage": 3}])


def test_mgpu_default_is_timed_again_after_the_other_configs(bench_kernels, monkeypatch):
    """The Mosaic sweep times the default config first and again after the others (its own
    '#again' row, the table's def_again column), so that a position effect shows up as such; off with
    DEFAULT_AGAIN; with one config nothing is repeated. Runs the interpreter on a small layer."""
    import jax
    import jax.numpy as jnp

    from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

    calls = []

    def fake_time(fn, args, copies):  # 20, 30, 40, ... us: the n-th timing in a run
        calls.append(fn)
        return 1e-5 * (1 + len(calls))

    monkeypatch.setattr(bench_kernels, "time_jax", fake_time)
    monkeypatch.setattr(bench_kernels, "MGPU_VARIANTS", [{"num_stages": 2}])
    k, n, m = 256, 128, 3
    lins = [random_gptq_linear(jax.random.key(i), k, n, bits=4, group_size=128) for i in range(2)]
    x = jax.random.normal(jax.random.key(7), (m, k), jnp.float32).astype(jnp.bfloat16)

    def run():
        rows = []
        rec = lambda m_, name, t, nbytes, err=None, cfg=None, layout=None: rows.append(  # noqa: E731
            dict(K=k, N=n, M=m_, variant=name, us=t * 1e6, err=err))
        bench_kernels.bench_mgpu(k, n, m, x, lins, 2, 0, rec, rows)
        return rows

    rows = run()
    names = [r["variant"] for r in rows]
    assert len(names) == 3 and names[2] == names[0] + bench_kernels.AGAIN_SUFFIX and names[1] != names[0], names
    assert all(r["err"] < 1e-2 for r in rows)  # the interpreter's results vs mg.reference
    first, again = bench_kernels.default_times(rows)
    assert (round(first, 3), round(again, 3)) == (20.0, 40.0)  # the stub's 1st and 3rd timing
    assert calls[2] is calls[0]  # the default's compiled function, not a new one
    monkeypatch.setattr(bench_kernels, "DEFAULT_AGAIN", False)
    calls.clear()
    assert [r["variant"] for r in run()] == names[:2]
    monkeypatch.setattr(bench_kernels, "DEFAULT_AGAIN", True)
    monkeypatch.setattr(bench_kernels, "MAX_MGPU_CFGS", 1)
    assert [r["variant"] for r in run()] == names[:1]
    nan_first, nan_again = bench_kernels.default_times(rows[:1])
    assert nan_first == rows[0]["us"] and nan_again != nan_again


@pytest.fixture(scope="module")
def decode_budget():
    return _script("decode_budget.py")


def _budget_rows(decode_budget, rng, r, f, shared_ops, outside, bits, layers=32, bf16_ms=5.3, label="gptq4_g128[auto]"):
    """A bf16 row and a traced quantized row whose matmuls take exactly MB / r + f (us)."""
    mb = decode_budget.layer_mb(bits)
    mm = [b / r + f for b in mb]
    ops = []
    for t, (name, s) in zip(mm, shared_ops):  # matmul, then the ops up to the next matmul
        ops += [["scoped_mosaic_gpu_kernel", t], [name, s]]
    step_us = outside + layers * (sum(mm) + sum(s for _, s in shared_ops))
    common = dict(batch=1, layers=layers, attention="fused", norm="auto", cmdbuf="on", scan_steps=20)
    bf16 = dict(e2e="bf16", ms_per_step_scan=bf16_ms, **common)
    q = dict(e2e=label, ms_per_step_scan=step_us / 1e3, bits_per_quantized_weight=bits,
             gpu_time_scan_call={"layer_mosaic": {"layer_ops": ops}}, **common)
    return bf16, q, mm, step_us


def test_decode_budget_recovers_the_fit_and_the_target_arithmetic(decode_budget, tmp_path):
    """On rows built from a known r, f, shared and outside time: the fit recovers r and f, the
    f = 0 step is the step less 4 f per layer, and the allowed f gives exactly the target ratio."""
    rng = np.random.default_rng(26)
    for _ in range(5):
        r, f = float(rng.uniform(2.0, 3.3)), float(rng.uniform(0.5, 4.0))
        shared_ops = [(n, float(rng.uniform(1.0, 8.0))) for n in ("decode_attention_update", "add_rms_norm",
                                                                 "loop_multiply_fusion", "add_rms_norm__1")]
        outside, bits = float(rng.uniform(20, 200)), float(rng.uniform(4.1, 4.4))
        bf16, q, mm, step = _budget_rows(decode_budget, rng, r, f, shared_ops, outside, bits)
        b = decode_budget.budget(q, bf16["ms_per_step_scan"], bits, target=3.0)
        assert b["r_tbps"] == pytest.approx(r, rel=1e-3) and b["f_us"] == pytest.approx(f, abs=2e-3)
        assert b["shared_us"] == pytest.approx(sum(s for _, s in shared_ops), abs=0.006)  # rounded to 0.01
        assert b["outside_us"] == pytest.approx(outside, abs=0.1)
        assert b["ideal_step_us"] == pytest.approx(step - 32 * 4 * f, abs=0.2)
        # put the allowed fixed cost back in: the step is then bf16 / target
        allowed = step - 32 * 4 * (f - b["f_allowed_us"])
        assert bf16["ms_per_step_scan"] * 1e3 / allowed == pytest.approx(3.0, rel=1e-3)
        # a given (r, f) overrides the row's own fit
        b2 = decode_budget.budget(q, bf16["ms_per_step_scan"], bits, fit=(r * 1.1, 0.0))
        assert b2["r_tbps"] == pytest.approx(r * 1.1, rel=1e-3) and b2["f_us"] == 0.0
    # main(): pairs each traced quantized row with the bf16 row of its variant; a lm_head4 row takes the
    # bits of a row without the 4-bit head; pooled fit over all rows
    bf16, q, _, _ = _budget_rows(decode_budget, rng, 2.7, 2.2, shared_ops, 80.0, 4.27)
    _, q2, _, _ = _budget_rows(decode_budget, rng, 2.7, 2.2, shared_ops, 40.0, 4.27, label="gptq4_g128[auto,lm_head4]")
    q2["bits_per_quantized_weight"] = 4.36  # counts the head: must not be used
    other = dict(bf16, attention="fused-bs64", ms_per_step_scan=9.9)  # another variant's bf16: must not pair
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps([other, bf16, q, q2]))
    out = decode_budget.main([str(path), "--out", str(tmp_path / "b.json")])
    assert [b["e2e"] for b in out] == ["gptq4_g128[auto]", "gptq4_g128[auto,lm_head4]"]
    assert all(b["bf16_us"] == pytest.approx(bf16["ms_per_step_scan"] * 1e3) for b in out)
    assert all(b["pooled"]["r_tbps"] == pytest.approx(2.7, rel=1e-3) for b in out)
    assert out[1]["matmul_mb"] == out[0]["matmul_mb"]
    assert json.loads((tmp_path / "b.json").read_text())[0]["e2e"] == "gptq4_g128[auto]"


def test_decode_budget_refuses_rows_it_cannot_read(decode_budget, tmp_path):
    with pytest.raises(ValueError, match="no per-layer ops"):
        decode_budget.layer_split({"e2e": "gptq", "batch": 1})
    row = {"e2e": "gptq", "gpu_time_scan_call": {"layer_mosaic": {"layer_ops": [["scoped_mosaic_gpu_kernel", 5.0],
                                                                                 ["add_rms_norm", 2.0]]}}}
    with pytest.raises(ValueError, match="1 matmul ops in a layer, expected 4"):
        decode_budget.layer_split(row)
    with pytest.raises(ValueError, match="different sizes"):
        decode_budget.fit_stream([8.0, 8.0], [5.0, 6.0])
    with pytest.raises(ValueError, match="do not grow"):
        decode_budget.fit_stream([8.0, 48.0], [9.0, 5.0])
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps([{"e2e": "bf16", "batch": 1, "ms_per_step_scan": 5.0}]))
    with pytest.raises(SystemExit, match="no traced quantized batch-1 row"):
        decode_budget.main([str(path)])
    # a traced lm_head4 row alone: its bits per weight count the head, so no row gives the layers' bits
    bf16, q, _, _ = _budget_rows(decode_budget, None, 2.7, 2.2, [("decode_attention_update", 6.0)] * 4, 50.0, 4.36,
                                 label="gptq4_g128[auto,lm_head4]")
    path.write_text(json.dumps([bf16, q]))
    with pytest.raises(SystemExit, match="without a 4-bit lm_head"):
        decode_budget.main([str(path)])
