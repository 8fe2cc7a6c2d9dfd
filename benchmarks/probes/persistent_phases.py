"""Probe (issue #6): could one persistent kernel replace a decode layer's chain of launches?

Usage (an H100 / H200, jgptq importable; OUT=dir)::

    python benchmarks/probes/persistent_phases.py [--phases 64] [--rows 8,128] [--reps 20]

Why: a batch-1 decode step of the 7B model is a chain of 8 dependent kernels per layer (add +
RMSNorm, q/k/v, decode attention, o_proj, add + RMSNorm, gate/up, SiLU * up, down: 269 GPU ops per
step). Each one pays its launch, the first DRAM round trip of its pipeline and its drain, so even
with L2-resident weights o_proj takes ~4.2 us for ~1 us of data (benchmarks/RESULTS.md, sessions
13 and 16). A persistent kernel would cross the same dependency points with grid-wide barriers
instead of launches, and could issue the next phase's weight loads *before* each barrier, since
weights never depend on activations. Whether that pays depends on two numbers nobody measured
here yet: what a grid-wide barrier costs, and how fast a persistent kernel streams across them.

Each variant runs ``P`` phases. In phase ``p`` each of ``G`` CTAs (one per SM) copies its
``[R, 64]`` int32 slice ``w[p, g]`` (``R`` x 256 bytes) from GMEM into SMEM with TMA and waits
for it; ``w`` spans ``P * G * R * 256`` bytes, more than L2 at ``R = 128``.

* ``chain``: ``P`` dependent launches of a ``G``-CTA kernel (the per-op design): launch ``p``
  loads ``w[p]`` and stores it as its output, which launch ``p + 1`` takes as an operand.
* ``chain_pf``: the same launches, each CTA ending with a TMA prefetch of its slice of
  ``w[p + 1]`` into L2 (``plgpu.async_prefetch``), as a decode matmul could prefetch the next
  matmul's weights (the cheap form of overlap, which keeps one launch per op).
* ``chain_pdl``: the same launches written for programmatic dependent launch (PDL): each CTA
  first lets the next launch start (``griddepcontrol.launch_dependents``), issues its load, and
  waits for the previous launch to finish (``griddepcontrol.wait``) only before it stores its
  output. Where the launcher or the CUDA graph honours PDL, launch ``p + 1``'s loads overlap
  launch ``p``'s tail and the time per phase falls towards ``stream``; where it does not, both
  instructions are no-ops and it times as ``chain``. This is the question the probe answers.
* ``barrier``: one launch whose CTAs run the ``P`` phases with a grid-wide barrier after each;
  a phase's load is issued after the barrier before it.
* ``overlap``: the same, but phase ``p + 1``'s load is issued before phase ``p``'s barrier
  (two SMEM slots), as a persistent decode kernel would prefetch the next matmul's weights.
* ``counter`` / ``counter_ov``: ``barrier`` / ``overlap`` with the cheaper counter barrier below.
* ``stream``: the same loads in one launch with no barrier at all (the bandwidth reference).

Every variant's output is ``w[P - 1]`` (the last phase's slices), checked against the input.
Prints µs per phase and GB/s per variant and writes ``persistent_phases.json`` under OUT.

The grid barrier uses two kinds of global semaphores (``pl.get_global``, which keeps its value
across launches): every CTA adds 1 to ``arrive``; CTA 0 waits for ``G`` (and takes them back),
then adds ``G`` to ``depart[k % 2]``, from which every CTA takes 1 to leave barrier ``k``. Both
end each launch at 0. Two departure semaphores, alternating, keep a CTA that leaves barrier
``k + 1`` early from taking a token of barrier ``k`` meant for a CTA still waiting there. All
``G`` CTAs must be resident at once (one per SM, little SMEM), or the barrier deadlocks.

The H100 run of session 17 timed that barrier at ~37 µs: Mosaic GPU's decrementing
``semaphore_wait`` is a compare-and-swap loop, and ``G`` CTAs taking one token each from the same
word succeed one per round, ``O(G^2)`` atomics on one L2 line. The ``counter`` barrier takes no
tokens: every CTA adds 1 to ``arrive`` and polls it with plain loads (``decrement=False``) until it
reaches ``(k + 1) * G``; the count only grows within a launch. To end at 0, each CTA adds 1 to
``done`` after the last barrier, and CTA 0 alone waits for ``done = G`` and then takes ``P * G``
from ``arrive`` and ``G`` from ``done`` (one waiter: no contention), when nobody polls any more.

CPU: ``chain`` and ``stream`` run in the Mosaic GPU interpreter (tests); the barrier variants use
semaphores, which the interpreter lacks, so the tests only lower them for CUDA.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jgptq.pallas_kernels.grid_sync import counter_barrier, counter_reset  # the library's barrier, timed here

COLS = 64  # int32 words per row: 256-byte rows
VARIANTS = ("chain", "chain_pf", "chain_pdl", "barrier", "overlap", "counter", "counter_ov", "stream")
BARRIERS = ("barrier", "overlap", "counter", "counter_ov")


def _params(interpret: bool) -> dict:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return dict(interpret=InterpretGPUParams())
    return dict(compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def _check(w: jax.Array) -> tuple[int, int, int]:
    if w.ndim != 4 or w.shape[-1] != COLS or w.dtype != jnp.int32:
        raise ValueError(f"w must be int32 [P, G, R, {COLS}]; got {w.dtype} {tuple(w.shape)}")
    p, g, r, _ = w.shape
    if min(p, g, r) < 1 or r > 256:
        raise ValueError(f"need P, G >= 1 and 1 <= R <= 256 (one TMA box); got P={p}, G={g}, R={r}")
    return p, g, r


def grid_barrier(arrive, depart, k, g, n: int) -> None:
    """Barrier ``k`` across the ``n`` CTAs of the grid (``g``: this CTA's index); see the module
    docstring for the protocol."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.semaphore_signal(arrive, 1, memory_scope="gpu")
    slot = depart.at[k % 2]

    @pl.when(g == 0)
    def _release():
        plgpu.semaphore_wait(arrive, n, memory_scope="gpu")
        plgpu.semaphore_signal(slot, n, memory_scope="gpu")

    plgpu.semaphore_wait(slot, 1, memory_scope="gpu")


def _persistent(w: jax.Array, variant: str, interpret: bool) -> jax.Array:
    """One launch of ``G`` CTAs running all ``P`` phases (the barrier variants, or ``stream``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n_ph, n_cta, rows = _check(w)
    barriers = variant in BARRIERS
    counter = variant in ("counter", "counter_ov")
    ahead = variant in ("overlap", "counter_ov", "stream")  # next phase's load issued before this phase ends

    def body(w_gmem, o_gmem, buf, bars):
        g = jax.lax.axis_index("g")
        if barriers:
            arrive = pl.get_global(plgpu.SemaphoreType.REGULAR)
            # counter: depart[0] serves as ``done``
            depart = pl.get_global(plgpu.SemaphoreType.REGULAR((2,)))

        def load(p, slot):
            plgpu.copy_gmem_to_smem(w_gmem.at[p, g], buf.at[slot], bars.at[slot])

        if ahead:
            load(0, 0)

        def phase(p, carry):
            slot = p % 2
            if not ahead:
                load(p, slot)
            plgpu.barrier_wait(bars.at[slot])
            if ahead:
                @pl.when(p + 1 < n_ph)
                def _next():
                    load(p + 1, 1 - slot)
            if counter:
                counter_barrier(arrive, p, n_cta)
            elif barriers:
                grid_barrier(arrive, depart, p, g, n_cta)
            return carry

        jax.lax.fori_loop(0, n_ph, phase, 0)
        if counter:
            counter_reset(arrive, depart.at[0], g, n_ph, n_cta)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf.at[(n_ph - 1) % 2], o_gmem.at[g])
        plgpu.wait_smem_to_gmem(0)

    run = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((n_cta, rows, COLS), jnp.int32),
                       scratch_types=[plgpu.SMEM((2, rows, COLS), jnp.int32),
                                      plgpu.Barrier(num_arrivals=1, num_barriers=2)],
                       grid=(n_cta,), grid_names=("g",), **_params(interpret))
    return run(w)


def _one_phase(interpret: bool, w: jax.Array, p: int, prev: jax.Array, prefetch: bool = False,
               pdl: bool = False) -> jax.Array:
    """``chain``'s launch ``p``: each CTA copies ``w[p, g]`` through SMEM to the output (``w`` is
    passed whole and indexed in the kernel, so XLA adds no slice copies). ``prev`` (the last
    launch's output) is an operand the kernel does not read: it orders the launches. With
    ``prefetch`` each CTA then prefetches ``w[p + 1, g]`` into L2 (the interpreter skips it). With
    ``pdl`` it releases the next launch first and waits for the previous one just before its store
    (the interpreter runs launches one after another and skips both)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, n_cta, rows, _ = w.shape

    def body(w_gmem, prev_gmem, o_gmem, buf, bar):
        del prev_gmem
        g = jax.lax.axis_index("g")
        if pdl and not interpret:
            plgpu.griddepcontrol_launch_dependents()
        plgpu.copy_gmem_to_smem(w_gmem.at[p, g], buf, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        if pdl and not interpret:
            plgpu.griddepcontrol_wait()  # the previous launch's output is complete and visible from here
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, o_gmem.at[g])
        if prefetch and not interpret:
            plgpu.async_prefetch(w_gmem.at[p + 1, g])
        plgpu.wait_smem_to_gmem(0)

    run = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((n_cta, rows, COLS), jnp.int32),
                       scratch_types=[plgpu.SMEM((rows, COLS), jnp.int32),
                                      plgpu.Barrier(num_arrivals=1, num_barriers=1)],
                       grid=(n_cta,), grid_names=("g",), **_params(interpret))
    return run(w, prev)


def _chain(w: jax.Array, interpret: bool, prefetch: bool = False, pdl: bool = False) -> jax.Array:
    n_ph, n_cta, rows = _check(w)
    out = jnp.zeros((n_cta, rows, COLS), jnp.int32)
    for p in range(n_ph):  # unrolled: P launches in one executable (one command buffer on the GPU)
        out = _one_phase(interpret, w, p, out, prefetch and p + 1 < n_ph, pdl)
    return out


@functools.partial(jax.jit, static_argnames=("variant", "interpret"))
def run_variant(w: jax.Array, variant: str, interpret: bool = False) -> jax.Array:
    """``w [P, G, R, 64]`` int32 through one variant -> ``[G, R, 64]``, which equals ``w[P - 1]``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if variant in ("chain", "chain_pf", "chain_pdl"):
        return _chain(w, interpret, prefetch=variant == "chain_pf", pdl=variant == "chain_pdl")
    return _persistent(w, variant, interpret)


def per_phase_row(variant: str, w_shape: tuple[int, ...], seconds_per_call: float) -> dict:
    """A report row: µs per phase and the bytes each phase loads over that time."""
    n_ph, n_cta, rows, cols = w_shape
    us = seconds_per_call / n_ph * 1e6
    phase_bytes = n_cta * rows * cols * 4
    return dict(variant=variant, phases=n_ph, ctas=n_cta, rows=rows, phase_bytes=phase_bytes,
                us_per_phase=us, GBps=phase_bytes / us / 1e3)


def main() -> None:  # pragma: no cover - GPU timing
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phases", type=int, default=64)
    ap.add_argument("--rows", default="8,128", help="comma list of rows (x 256 bytes) per CTA and phase")
    ap.add_argument("--ctas", type=int, default=0, help="CTAs (default: one per SM)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    interpret = jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    n_cta = args.ctas or int(getattr(dev, "core_count", 0) or 132)
    if interpret:
        n_cta, args.phases, args.rows, args.reps = 2, 3, "8", 1
    print(f"jax {jax.__version__} {dev.device_kind} G={n_cta} P={args.phases}", flush=True)
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        w = jax.random.randint(jax.random.key(rows), (args.phases, n_cta, rows, COLS), -2**31, 2**31 - 1,
                               jnp.int32)
        want = np.asarray(w[-1])
        for variant in args.variants.split(","):
            try:
                out = jax.block_until_ready(run_variant(w, variant, interpret))  # compile + check
                ok = bool(np.array_equal(np.asarray(out), want))
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        out = run_variant(w, variant, interpret)
                    jax.block_until_ready(out)
                    times.append((time.perf_counter() - t0) / args.reps)
                row = per_phase_row(variant, tuple(w.shape), min(times))
                row["correct"] = ok
            except Exception as e:  # report and go on: one variant failing to build says something too
                row = dict(variant=variant, rows=rows, error=f"{type(e).__name__}: {e}"[:400])
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "persistent_phases.json"), "w") as f:
        json.dump(rows_out, f, indent=1)
    print("\nvariant   rows  KB/phase  us/phase   GB/s  correct")
    for r in rows_out:
        if "error" in r:
            print(f"{r['variant']:>8} {r['rows']:5d}  failed: {r['error'][:80]}")
        else:
            print(f"{r['variant']:>8} {r['rows']:5d} {r['phase_bytes'] / 1024:9.0f} {r['us_per_phase']:9.2f} "
                  f"{r['GBps']:6.0f}  {r['correct']}")


if __name__ == "__main__":  # pragma: no cover
    main()
