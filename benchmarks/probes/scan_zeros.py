"""Probe: where do the per-step ``memcpy32_post`` ops of a decode scan come from? (session 13)

Usage (an H100 / H200, jgptq importable; OUT=dir)::  python benchmarks/probes/scan_zeros.py

A ``lax.scan`` of 10 steps, each ``NMM`` = 8 dependent TMA-reduced Mosaic matmuls (4096 x 4096,
M = 1, distinct weights passed as arguments). Each matmul TMA-adds into a zero-initialised fp32
buffer aliased through its custom call. Ways to create those zeros (``MODE``):

* ``zeros``: ``jnp.zeros`` in the call (the kernel's own way);
* ``pre``: all of a step's zeros made at the top of the step body;
* ``dep_w``: ``zeros + 0 * one weight word`` (distinct per layer, activation-free);
* ``barrier``: ``optimization_barrier(zeros)``.

Per mode: the optimized HLO's op counts (``hlo_<mode>.txt`` under OUT) and the GPU ops per step
from one profiler trace. Session 13 (H200): every mode gives 1 broadcast + 7 ``copy`` per step:
XLA merges the identical zero broadcasts (CSE; ``0 * int-converted word`` folds to 0) and then
copies the one buffer for each in-place custom call; each copy is a ``memcpy32_post`` kernel of
~0.95 us. A 7B decode step has 128 of them (~120 us per step inside a loop).
"""

import collections, functools, glob, gzip, json, os, re, sys, tempfile
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jgptq.pallas_kernels import gptq_matmul_mgpu as mg
from jgptq.pallas_kernels.gptq_matmul_gpu import random_gptq_linear

OUT = os.environ.get("OUT", "/tmp")
real = mg._make_kernel
MODE = ["zeros"]
PRE = []
NMM = 8


def patched(body, *, out_type, scratch_types, grid, grid_names, interpret, reduce_into, **mesh_kw):
    if not reduce_into or MODE[0] == "zeros":
        return real(body, out_type=out_type, scratch_types=scratch_types, grid=grid, grid_names=grid_names,
                    interpret=interpret, reduce_into=reduce_into, **mesh_kw)
    from jax.experimental.pallas import mosaic_gpu as plgpu
    params = dict(compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))

    def scoped(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch_types)

    run = pl.kernel(scoped, out_type=(), mesh=plgpu.Mesh(grid=grid, grid_names=grid_names, **mesh_kw), **params)

    def call(*args):
        if MODE[0] == "pre":  # made at the top of the step body, all at once
            z = PRE.pop(0)
            assert z.shape == out_type.shape, (z.shape, out_type.shape)
        else:
            z = jnp.zeros(out_type.shape, jnp.float32)
        if MODE[0] == "barrier":
            z = jax.lax.optimization_barrier(z)
        elif MODE[0] == "dep_w":  # distinct per weight (no CSE), activation-free: 0 * one weight word
            z = z + jax.lax.convert_element_type(args[1].reshape(-1)[0], jnp.float32) * 0.0
        elif MODE[0] == "dep":  # loop-variant: 0 * one element of x
            z = z + args[0].reshape(-1)[0].astype(jnp.float32) * 0.0
        acc = jax.new_ref(z)
        run(*args, acc)
        return acc[...]
    return call


mg._make_kernel = patched
packs = [mg.pack_mgpu_linear(random_gptq_linear(jax.random.key(i), 4096, 4096, bits=4, group_size=128), bits=4)
         for i in range(8)]
p = packs[0]
cfg = mg.default_config(1, p)
print("config", cfg, flush=True)
x0 = jax.random.normal(jax.random.key(1), (1, 4096), jnp.float32).astype(jnp.bfloat16)
rows = []
acc_shape = None
for mode in ("zeros", "pre", "dep_w", "barrier"):
    MODE[0] = mode

    def step(x, _, packs=None):
        if mode == "pre":
            PRE[:] = [jnp.zeros(acc_shape, jnp.float32) for _ in range(NMM)]
        for i in range(NMM):  # NMM dependent matmuls per step, as the layers of a decode step
            y = mg.gptq_matmul_mgpu(x, packs[i], config=cfg)
            x = x + 0.01 * y.astype(x.dtype)
        return x, None

    if acc_shape is None:  # the kernel's accumulator shape, from one traced call
        MODE[0] = "probe"
        shapes = []
        orig_new_ref = jax.new_ref
        jax.new_ref = lambda z: (shapes.append(z.shape), orig_new_ref(z))[1]
        jax.make_jaxpr(lambda x: mg.gptq_matmul_mgpu(x, p, config=cfg))(x0)
        jax.new_ref = orig_new_ref
        acc_shape = shapes[0]
        MODE[0] = mode
        print("accumulator", acc_shape, flush=True)
    f0 = jax.jit(lambda x, ps: jax.lax.scan(functools.partial(step, packs=ps), x, None, length=10)[0])
    f = functools.partial(f0, ps=packs)
    txt = f0.lower(x0, packs).compile().as_text()
    open(os.path.join(OUT, f"hlo_{mode}.txt"), "w").write(txt)
    ops = collections.Counter(re.findall(r"= \S+ (copy|copy-start|broadcast|custom-call|fusion|while)\(", txt))
    y = f(x0); jax.block_until_ready(y)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(f(x0))
        fn = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
        ev = json.load(gzip.open(fn))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    pn = {e["pid"]: e.get("args", {}).get("name", "") for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {q for q, nm in pn.items() if "GPU" in nm or "gpu" in nm or "/device:" in nm}
    names = collections.Counter(e["name"][:40] for e in ev if e.get("ph") == "X" and e.get("pid") in gpu)
    dur = collections.defaultdict(float)
    for e in ev:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            dur[e["name"][:40]] += e["dur"]
    row = dict(mode=mode, hlo_ops=dict(ops), gpu_ops_per_step={k: v / 10 for k, v in names.items()},
               gpu_us_per_step={k: round(v / 10, 2) for k, v in dur.items()})
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(os.path.join(OUT, "scan_zeros.json"), "w"), indent=1)
