"""Probe (issue #6): can a few long-lived CTAs stream weights as fast as many short ones?

Usage (an H100 / H200, jgptq importable; OUT=dir)::

    python benchmarks/probes/ring_stream.py [--mib 512] [--variants grid-k4-s4-r32,ring-s8-r32,...]

Why: the decode matmuls are split-K grids of many short CTAs (4 K blocks each); the hardware starts
the next CTA on an SM as soon as one ends, so many loads stay in flight. Every persistent form built
so far, which would let a decode layer cross its dependency points with grid barriers instead of
launches, streamed slower: the stream-K schedule with its body emptied reached 2.2-2.5 TB/s against
the grid's 3.16 on an H200 (session 4), and the persistent MLP lost ~10 us per layer (session 19).
Both run their loads through ``plgpu.emit_pipeline``. This probe separates the pipeline from the
idea: the same bytes streamed by

* ``grid-kK-sS-rR``: ``T / K`` CTAs, each an ``emit_pipeline`` of ``K`` steps with ``S`` stages
  (the decode grid's pattern; ``K = 4, S = 4, R = 32`` is its 8 KB weight block per step);
* ``pipe-sS-rR[-cC]``: ``C`` CTAs per SM, each one ``emit_pipeline`` of ``S`` stages over its whole
  range (the stream-K schedule's pattern, no matmul);
* ``ring-sS-rR[-cC][-side][-touch][-bB]``: ``C`` CTAs per SM, each a hand-written ring of ``S``
  SMEM slots: wait for slot ``i % S``, then at once reissue it for step ``i + S``. ``-side`` adds
  two small copies per step into the same slot's barrier (the activation tile, 2 KB, and the scale /
  zero rows, 512 B, of a decode matmul step); ``-touch`` reads each slot into registers before it
  is reissued (XOR into a running value, checked); ``-bB`` passes a grid-wide counter barrier
  (``pallas_kernels/grid_sync.py``) every ``B`` steps while the ring's loads stay in flight, as a
  persistent decode layer would at each dependency point (``B = 8`` of 8 KB steps on 132 SMs is a
  8.7 MB phase, about o_proj).

``R`` is rows of 256 bytes per step (``R = 32``: 8 KB). Every variant streams the same ``--mib``
of int32 words laid out ``[T, R, 64]`` and is checked (each CTA stores its last block; ``-touch``
also the XOR of every word it read). Prints GB/s per variant and writes ``ring_stream.json``.

CPU: every variant but ``-bB`` runs in the Mosaic GPU interpreter (tests); ``-bB`` uses global
semaphores, which the interpreter lacks, so the tests lower it for CUDA only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jgptq.pallas_kernels.grid_sync import counter_barrier, counter_reset, semaphores

COLS = 64  # int32 words per row: 256-byte rows
SIDE_X = (8, 64)  # bf16 [8, 128] activation tile as int32 words: 2 KB
SIDE_SZ = (2, 64)  # [2, 128] bf16 scale / zero rows as int32 words: 512 B
DEFAULT_VARIANTS = ("grid-k4-s4-r32,pipe-s8-r32,pipe-s8-r32-c2,ring-s4-r32,ring-s8-r32,ring-s16-r32,ring-s24-r32,"
                    "ring-s8-r64,ring-s12-r64,ring-s8-r32-c2,ring-s16-r32-side,ring-s16-r32-touch,"
                    "ring-s16-r32-b8,ring-s16-r32-b32")
_NAME = re.compile(r"^(grid|pipe|ring)((?:-[a-z]+\d*)*)$")


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str  # grid | pipe | ring
    slots: int  # pipeline stages / ring slots
    rows: int  # 256-byte rows per step
    k: int = 4  # grid: steps per CTA
    ctas_per_sm: int = 1  # pipe / ring
    side: bool = False
    touch: bool = False
    barrier_every: int = 0

    @property
    def name(self) -> str:
        if self.kind == "grid":
            return f"grid-k{self.k}-s{self.slots}-r{self.rows}"
        s = f"{self.kind}-s{self.slots}-r{self.rows}"
        s += f"-c{self.ctas_per_sm}" if self.ctas_per_sm != 1 else ""
        s += "-side" if self.side else ""
        s += "-touch" if self.touch else ""
        s += f"-b{self.barrier_every}" if self.barrier_every else ""
        return s

    def smem_bytes(self) -> int:
        per = self.rows * COLS * 4 + (4 * (SIDE_X[0] + SIDE_SZ[0]) * COLS if self.side else 0)
        return self.slots * per


def parse_variant(name: str) -> Variant:
    """``ring-s16-r32-c2-side-touch-b8`` etc. (module docstring) -> :class:`Variant`."""
    m = _NAME.match(name.strip())
    if not m:
        raise ValueError(f"variant {name!r}: expected grid-kK-sS-rR, pipe-sS-rR[-cC] or "
                         "ring-sS-rR[-cC][-side][-touch][-bB]")
    kind, fields = m.group(1), [f for f in m.group(2).split("-") if f]
    kw: dict = {}
    for f in fields:
        fm = re.match(r"^([a-z]+?)(\d*)$", f)
        key, num = fm.group(1), fm.group(2)
        allowed = {"grid": {"k", "s", "r"}, "pipe": {"s", "r", "c"},
                   "ring": {"s", "r", "c", "side", "touch", "b"}}[kind]
        if key not in allowed or (key in ("side", "touch")) != (num == ""):
            raise ValueError(f"variant {name!r}: field {f!r} is not one of {sorted(allowed)} for {kind}")
        field = dict(k="k", s="slots", r="rows", c="ctas_per_sm", b="barrier_every", side="side",
                     touch="touch")[key]
        if field in kw:
            raise ValueError(f"variant {name!r}: field {key!r} given twice")
        kw[field] = True if num == "" else int(num)
    if "slots" not in kw or "rows" not in kw:
        raise ValueError(f"variant {name!r}: needs both -sS (stages / slots) and -rR (256-byte rows per step)")
    v = Variant(kind=kind, **kw)
    if min(v.slots, v.rows, v.k, v.ctas_per_sm) < 1 or v.rows > 256 or v.barrier_every < 0:
        raise ValueError(f"variant {name!r}: need S, K, C >= 1 and 1 <= R <= 256 (one TMA box)")
    if v.smem_bytes() * v.ctas_per_sm > 220 * 1024:
        raise ValueError(f"variant {name!r}: {v.smem_bytes() * v.ctas_per_sm} bytes of SMEM per SM (> 220 KiB)")
    return v


def _params(interpret: bool) -> dict:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return dict(interpret=InterpretGPUParams())
    return dict(compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def _check(w: jax.Array) -> tuple[int, int]:
    if w.ndim != 3 or w.shape[-1] != COLS or w.dtype != jnp.int32:
        raise ValueError(f"w must be int32 [T, R, {COLS}]; got {w.dtype} {tuple(w.shape)}")
    return int(w.shape[0]), int(w.shape[1])


def _grid(w: jax.Array, v: Variant, interpret: bool) -> jax.Array:
    """``T / K`` CTAs of ``K`` pipelined steps each; CTA ``c`` stores block ``c * K + K - 1``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t, rows = _check(w)
    if t % v.k:
        raise ValueError(f"{v.name}: {t} blocks are not a multiple of K={v.k}")
    n_cta = t // v.k

    def body(w_gmem, o_gmem):
        c = jax.lax.axis_index("c")

        def step(idx, w_smem):
            @pl.when(idx[0] == v.k - 1)
            def _store():
                plgpu.copy_smem_to_gmem(w_smem.at[0], o_gmem.at[c])

        plgpu.emit_pipeline(step, grid=(v.k,), in_specs=[plgpu.BlockSpec((1, rows, COLS), lambda i: (c * v.k + i, 0, 0))],
                            max_concurrent_steps=v.slots)(w_gmem)
        plgpu.wait_smem_to_gmem(0)

    run = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((n_cta, rows, COLS), jnp.int32),
                       grid=(n_cta,), grid_names=("c",), **_params(interpret))
    return run(w)


def side_arrays(t: int, key: int = 0) -> tuple[jax.Array, jax.Array]:
    """The ``-side`` copies' sources for ``t`` blocks: ``[t, 8, 64]`` and ``[t, 2, 64]`` int32."""
    k1, k2 = jax.random.split(jax.random.key(key))
    return (jax.random.randint(k1, (t, *SIDE_X), -2**31, 2**31 - 1, jnp.int32),
            jax.random.randint(k2, (t, *SIDE_SZ), -2**31, 2**31 - 1, jnp.int32))


def _persistent(w: jax.Array, v: Variant, n_cta: int, interpret: bool, sx=None, ssz=None):
    """``n_cta`` CTAs; CTA ``g`` streams blocks ``[g * n, (g + 1) * n)``. Returns its last block
    ``[n_cta, R, 64]`` and, with ``-touch``, the XOR of every word it read (else zeros)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t, rows = _check(w)
    if t % n_cta:
        raise ValueError(f"{v.name}: {t} blocks are not a multiple of {n_cta} CTAs")
    n = t // n_cta
    out_type = (jax.ShapeDtypeStruct((n_cta, rows, COLS), jnp.int32),
                jax.ShapeDtypeStruct((n_cta, rows, COLS), jnp.int32))

    if v.kind == "pipe":
        def body(w_gmem, o_gmem, x_gmem, xbuf):
            g = jax.lax.axis_index("g")

            def step(idx, w_smem):
                @pl.when(idx[0] == n - 1)
                def _store():
                    plgpu.copy_smem_to_gmem(w_smem.at[0], o_gmem.at[g])

            plgpu.emit_pipeline(step, grid=(n,), in_specs=[plgpu.BlockSpec((1, rows, COLS), lambda i: (g * n + i, 0, 0))],
                                max_concurrent_steps=v.slots)(w_gmem)
            xbuf[...] = jnp.zeros((rows, COLS), jnp.int32)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(xbuf, x_gmem.at[g])
            plgpu.wait_smem_to_gmem(0)

        scratch = [plgpu.SMEM((rows, COLS), jnp.int32)]
        run = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(n_cta,), grid_names=("g",),
                           **_params(interpret))
        return run(w)

    slots = min(v.slots, n)
    side = v.side
    barrier_every = v.barrier_every
    n_bar = n // barrier_every if barrier_every else 0
    if side and (sx is None or sx.shape != (t, *SIDE_X) or ssz is None or ssz.shape != (t, *SIDE_SZ)):
        raise ValueError(f"{v.name}: needs side arrays [{t}, 8, 64] and [{t}, 2, 64] (side_arrays)")
    if not side:
        sx, ssz = jnp.zeros((1, *SIDE_X), jnp.int32), jnp.zeros((1, *SIDE_SZ), jnp.int32)

    def body(w_gmem, sx_gmem, ssz_gmem, o_gmem, x_gmem, buf, xb, zb, bars, xbuf):
        g = jax.lax.axis_index("g")
        if barrier_every:
            arrive, done = semaphores()

        def load(i, slot):
            blk = g * n + i
            plgpu.copy_gmem_to_smem(w_gmem.at[blk], buf.at[slot], bars.at[slot])
            if side:
                plgpu.copy_gmem_to_smem(sx_gmem.at[blk], xb.at[slot], bars.at[slot])
                plgpu.copy_gmem_to_smem(ssz_gmem.at[blk], zb.at[slot], bars.at[slot])

        for s in range(slots):  # prologue: the ring full
            load(s, s)

        def step(i, acc):
            slot = jax.lax.rem(i, slots)
            plgpu.barrier_wait(bars.at[slot])
            if v.touch:
                acc = acc ^ buf[slot]
                plgpu.commit_smem()  # every thread's reads of the slot done before it is refilled

            @pl.when(i + slots < n)
            def _refill():
                load(i + slots, slot)

            if barrier_every:
                @pl.when(jax.lax.rem(i + 1, barrier_every) == 0)
                def _meet():
                    counter_barrier(arrive, (i + 1) // barrier_every - 1, n_cta)
            return acc

        acc = jax.lax.fori_loop(0, n, step, jnp.zeros((rows, COLS), jnp.int32))
        if barrier_every:
            counter_reset(arrive, done, g, n_bar, n_cta)
        xbuf[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf.at[(n - 1) % slots], o_gmem.at[g])
        plgpu.copy_smem_to_gmem(xbuf, x_gmem.at[g])
        plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((slots, rows, COLS), jnp.int32),
               plgpu.SMEM((slots if side else 1, *SIDE_X), jnp.int32),
               plgpu.SMEM((slots if side else 1, *SIDE_SZ), jnp.int32),
               plgpu.Barrier(num_arrivals=3 if side else 1, num_barriers=slots),
               plgpu.SMEM((rows, COLS), jnp.int32)]
    run = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(n_cta,), grid_names=("g",),
                       **_params(interpret))
    return run(w, sx, ssz)


@functools.partial(jax.jit, static_argnames=("name", "n_cta", "interpret"))
def run_variant(w: jax.Array, name: str, n_cta: int, interpret: bool = False, sx=None, ssz=None):
    """``w [T, R, 64]`` int32 through one variant. ``n_cta``: the persistent kinds' CTA count (SMs x
    C); ``sx`` / ``ssz``: the ``-side`` copies' sources (:func:`side_arrays`). Returns ``(last, xor)``:
    each CTA's last block and (``-touch``) the XOR of its words."""
    v = parse_variant(name)
    _, rows = _check(w)
    if rows != v.rows:
        raise ValueError(f"{name}: w has {rows} rows per block, the variant streams {v.rows}")
    if v.kind == "grid":
        return _grid(w, v, interpret), None
    return _persistent(w, v, n_cta, interpret, sx, ssz)


def expected(w: np.ndarray, v: Variant, n_cta: int) -> tuple[np.ndarray, np.ndarray | None]:
    """What :func:`run_variant` must return for ``w`` (NumPy)."""
    t = w.shape[0]
    if v.kind == "grid":
        return w[v.k - 1::v.k], None
    per = w.reshape(n_cta, t // n_cta, *w.shape[1:])
    xor = np.bitwise_xor.reduce(per, axis=1) if v.touch else np.zeros_like(per[:, 0])
    return per[:, -1], xor


def blocks_for(mib: int, v: Variant, n_cta: int) -> int:
    """Blocks of ``v.rows`` rows in about ``mib`` MiB, a multiple of every CTA count involved (and of
    the barrier period per CTA)."""
    per = v.rows * COLS * 4
    unit = n_cta * v.k * max(1, v.barrier_every)
    return max(unit, (mib * 2**20 // per) // unit * unit)


def main() -> None:  # pragma: no cover - GPU timing
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="MiB streamed per call (more than L2)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    interpret = jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    sms = int(getattr(dev, "core_count", 0) or 132)
    if interpret:
        sms, args.mib, args.reps = 2, 1, 1
    print(f"jax {jax.__version__} {dev.device_kind} SMs={sms} {args.mib} MiB per call", flush=True)
    rows_out = []
    for name in args.variants.split(","):
        try:
            v = parse_variant(name)
            n_cta = sms * v.ctas_per_sm
            t = blocks_for(args.mib, v, n_cta)
            w = jax.random.randint(jax.random.key(t + v.rows), (t, v.rows, COLS), -2**31, 2**31 - 1, jnp.int32)
            sx, ssz = side_arrays(t) if v.side else (None, None)
            want_last, want_xor = expected(np.asarray(w), v, n_cta)
            last, xor = jax.block_until_ready(run_variant(w, v.name, n_cta, interpret, sx, ssz))
            ok = bool(np.array_equal(np.asarray(last), want_last))
            if want_xor is not None:
                ok = ok and bool(np.array_equal(np.asarray(xor), want_xor))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    out = run_variant(w, v.name, n_cta, interpret, sx, ssz)
                jax.block_until_ready(out)
                times.append((time.perf_counter() - t0) / args.reps)
            nbytes = t * v.rows * COLS * 4
            if v.side:
                nbytes += t * 4 * COLS * (SIDE_X[0] + SIDE_SZ[0])
            us = min(times) * 1e6
            row = dict(variant=v.name, ctas=(t // v.k if v.kind == "grid" else n_cta), blocks=t, bytes=nbytes,
                       us=us, GBps=nbytes / us / 1e3, correct=ok)
            del w, sx, ssz
        except Exception as e:  # report and go on: one variant failing to build says something too
            row = dict(variant=name, error=f"{type(e).__name__}: {e}"[:400])
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ring_stream.json"), "w") as f:
        json.dump(rows_out, f, indent=1)
    print("\nvariant                       CTAs      MB       us    GB/s  correct")
    for r in rows_out:
        if "error" in r:
            print(f"{r['variant']:<28} failed: {r['error'][:90]}")
        else:
            print(f"{r['variant']:<28} {r['ctas']:5d} {r['bytes'] / 1e6:7.1f} {r['us']:8.1f} {r['GBps']:7.0f}  {r['correct']}")


if __name__ == "__main__":  # pragma: no cover
    main()
