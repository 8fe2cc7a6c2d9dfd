"""Where ``jgptq.quantize``'s time goes, phase by phase (a diagnostic for ``bench_quantize.py``).

Times each jitted phase of the driver in isolation on one block, after a compiling call, as
device-synchronised medians: the embedding, every true-sequential Hessian pass, the block forward,
and the per-group GPTQ solve (with its RTN comparison and losses). Multiplying by the number of
blocks gives the floor of an end-to-end run; comparing with ``bench_quantize.py``'s steady state
shows the host-side overhead.

``--random-model`` builds a SmolLM2-135M-shaped model with random weights (speed does not depend on
the weight values), so no model file has to travel to the accelerator.

Usage:  python benchmarks/profile_quantize.py --random-model --out DIR [--compute-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_quantize import add_common_arguments, calibration, load_model, machine  # noqa: E402


def smollm2_shaped(seed: int = 0, layers: int = 30) -> tuple[Any, dict[str, Any]]:
    """``(LlamaConfig, params)`` with SmolLM2-135M's shapes and random fp32 weights."""
    from jgptq.models.config import LlamaConfig

    cfg = LlamaConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=layers, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size

    def lin(i: int, o: int) -> dict[str, np.ndarray]:
        return {"kernel": (rng.standard_normal((i, o), np.float32) / np.sqrt(i)).astype(np.float32)}

    def norm() -> dict[str, np.ndarray]:
        return {"scale": (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)}

    params = {
        "embed_tokens": {"embedding": (0.05 * rng.standard_normal((cfg.vocab_size, d), np.float32))},
        "layers": [{"input_layernorm": norm(),
                    "self_attn": {"q_proj": lin(d, cfg.q_size), "k_proj": lin(d, cfg.kv_size),
                                  "v_proj": lin(d, cfg.kv_size), "o_proj": lin(cfg.q_size, d)},
                    "post_attention_layernorm": norm(),
                    "mlp": {"gate_proj": lin(d, f), "up_proj": lin(d, f), "down_proj": lin(f, d)}}
                   for _ in range(layers)],
        "norm": norm(),
    }
    return cfg, params


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """``(first call s, median of reps later calls s)``, each synchronised on its outputs."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def attention_variants(model: Any, args: argparse.Namespace, record: Callable[..., None]) -> None:
    """Causal GQA attention of one calibration batch: the model's einsum/softmax path against
    ``jax.nn.dot_product_attention`` (XLA and cuDNN), fp32 and bf16 (not part of the sum)."""
    import jax
    import jax.numpy as jnp

    from jgptq.models import llama

    b, t, h, kv, hd = args.batch_size, args.seqlen, model.num_heads, model.num_kv_heads, model.head_dim
    key = jax.random.PRNGKey(0)
    kq, kk, kvv = jax.random.split(key, 3)
    valid = jnp.ones((b, t), bool)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    for dt in (jnp.float32, jnp.bfloat16):
        q = jax.random.normal(kq, (b, t, h, hd), dt)
        k = jax.random.normal(kk, (b, t, kv, hd), dt)
        v = jax.random.normal(kvv, (b, t, kv, hd), dt)
        ours = jax.jit(lambda q, k, v: llama._attention(q, k, v, jnp.arange(t), valid, pos, pos, model))
        first, st = timed(lambda: ours(q, k, v), args.reps)
        record(f"attn ours {jnp.dtype(dt).name}", first, st, 4 * model.num_layers)
        for impl in ("xla", "cudnn"):
            if impl == "cudnn" and (jax.default_backend() != "gpu" or dt == jnp.float32):
                continue
            try:
                f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation=impl))
                first, st = timed(lambda: f(q, k, v), args.reps)
                record(f"attn dpa-{impl} {jnp.dtype(dt).name}", first, st, 4 * model.num_layers)
            except Exception as e:  # noqa: BLE001 - a diagnostic; report and go on
                print(f"attn dpa-{impl} {jnp.dtype(dt).name}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def collect_compile_times() -> list[tuple[float, str]]:
    """Turn on ``jax_log_compiles`` and collect ``(seconds, what)`` of every XLA compilation."""
    import logging
    import re

    import jax

    found: list[tuple[float, str]] = []
    pat = re.compile(r"Finished XLA compilation of (.*) in ([0-9.eE+-]+) sec")

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = pat.search(record.getMessage())
            if m:
                found.append((float(m.group(2)), m.group(1)))

    jax.config.update("jax_log_compiles", True)
    logger = logging.getLogger("jax")
    logger.addHandler(Grab())
    for h in logging.getLogger().handlers:  # keep the per-compile lines off the console
        h.setLevel(logging.ERROR)
    logging.getLogger().addHandler(logging.NullHandler())
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--random-model", action="store_true", help="SmolLM2-shaped random weights")
    p.add_argument("--random-calib", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--end-to-end", type=int, default=2, help="full quantize() runs after the phases")
    p.add_argument("--attention", action="store_true", help="also time attention variants on [B, S] batches")
    p.add_argument("--attention-impl", default="auto", help="the driver's attention option")
    p.add_argument("--log-compiles", action="store_true", help="print the slowest XLA compilations at the end")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import jgptq
    from jgptq import driver

    compiles: list[tuple[float, str]] = []
    if args.log_compiles:
        compiles = collect_compile_times()
    from jgptq.models import llama

    if args.random_model:
        model, params = smollm2_shaped(layers=args.layers or 30)
        tokenizer = None
        args.random_calib = True
    else:
        model, params, tokenizer = load_model(args)
    ids = calibration(args, tokenizer, model.vocab_size)
    cdt = jnp.dtype(args.compute_dtype)
    qcfg = jgptq.GPTQConfig(bits=4, group_size=128)
    cal = driver.Calibration.from_any(ids)
    rows: list[dict[str, Any]] = []

    def record(phase: str, first: float, steady: float, per_model: int) -> None:
        rows.append({"phase": phase, "first_s": first, "steady_ms": steady * 1e3, "per_model": per_model,
                     "model_s": steady * per_model})
        print(f"{phase:34s} first {first:7.2f} s  steady {steady * 1e3:9.2f} ms  x{per_model:3d} = "
              f"{steady * per_model:6.2f} s", flush=True)

    nl = len(params["layers"])
    first, st = timed(lambda: driver._embed(params, cal, model, args.batch_size, cdt)[0], args.reps)
    record("embed", first, st, 1)
    hs, mask, n = driver._embed(params, cal, model, args.batch_size, cdt)
    layer = jax.tree_util.tree_map(lambda a: driver._cast_float(driver._to_f32(a), cdt), params["layers"][0])
    master = jax.tree_util.tree_map(driver._to_f32, params["layers"][0])
    impl = driver._attention_impl(args.attention_impl, cal.mask, cdt, model)
    print(f"attention in the calibration forwards: {impl}", flush=True)
    first, st = timed(lambda: driver._stage_attn_in(layer, hs, mask, model), args.reps)
    record("stage q/k/v input + H", first, st, nl)
    first, st = timed(lambda: driver._stage_attention(layer, hs, mask, model, impl, True), args.reps)
    record("stage attention + H(o_in)", first, st, nl)
    o, _ = driver._stage_attention(layer, hs, mask, model, impl, True)
    first, st = timed(lambda: driver._stage_residual(layer, hs, o, mask, model, True), args.reps)
    record("stage residual + H(mlp_in)", first, st, nl)
    h_mid, _ = driver._stage_residual(layer, hs, o, mask, model, True)
    first, st = timed(lambda: driver._stage_down_in(layer, h_mid, mask, model), args.reps)
    record("stage H(down_in)", first, st, nl)
    first, st = timed(lambda: driver._stage_output(layer, jnp.copy(h_mid), model), args.reps)
    record("stage output (incl. a copy)", first, st, nl)
    states = {"attn_in": driver._stage_attn_in(layer, hs, mask, model),
              "o_in": driver._stage_attention(layer, hs, mask, model, impl, True)[1],
              "mlp_in": driver._stage_residual(layer, hs, o, mask, model, True)[1],
              "down_in": driver._stage_down_in(layer, h_mid, mask, model)}
    tokens = (jnp.sum(mask, dtype=jnp.float32), int(cal.mask.sum()))
    for group in llama.LINEAR_GROUPS:
        state = states[llama.LINEAR_INPUT[group[0]]]
        active = [(m, qcfg) for m in group]
        first, st = timed(lambda: driver._quantize_shared(0, master, active, state, tokens), args.reps)
        record(f"quantize {'+'.join(group)}", first, st, nl)
    phase_total = sum(r["model_s"] for r in rows)
    if args.attention:
        attention_variants(model, args, record)
    print(f"{'sum of phases (one model)':34s} {phase_total:6.2f} s", flush=True)

    runs = []
    host = jax.tree_util.tree_map(np.asarray, params)
    for r in range(args.end_to_end):
        t0 = time.perf_counter()
        _, report = jgptq.quantize(host, ids, qcfg, model, batch_size=args.batch_size,
                                   compute_dtype=args.compute_dtype, attention=args.attention_impl,
                                   progress=False)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, **report.timings})
        print(f"quantize() run {r}: {wall:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in report.timings.items()),
              flush=True)
    if compiles:
        total = sum(t for t, _ in compiles)
        print(f"XLA compilations: {len(compiles)}, {total:.1f} s in all; slowest:")
        for t, what in sorted(compiles, reverse=True)[:15]:
            print(f"  {t:7.2f} s  {what[:110]}")
    res = {"benchmark": "profile_quantize", "random_model": bool(args.random_model), "layers": nl,
           "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                           "compute_dtype": args.compute_dtype},
           "phases": rows, "sum_of_phases_s": phase_total, "end_to_end": runs, "machine": machine()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_quantize_{args.compute_dtype}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
