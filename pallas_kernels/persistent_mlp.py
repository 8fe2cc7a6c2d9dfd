"""Persistent decode MLP (Pallas Mosaic GPU, Hopper): ``down(silu(gate(h)) * up(h))`` in one launch.

Why: in a 7B decode step one launch per op tops out near 2.7-2.8x bf16 at batch 1, because every
launch boundary costs a ramp-down and a ramp-up (~1.5-2.3 us) and the small ops between the
matmuls (SiLU * up, add + RMSNorm) are kernels of their own (benchmarks/RESULTS.md, sessions
16-18). A persistent kernel crosses the dependency with a grid barrier instead: on an H100 a
phase behind the counter barrier of :mod:`.grid_sync` cost 1.30 us against 2.20 us as its own
launch (session 18). This kernel is the first such step: the gated MLP of a decode step.

How: ``G = ctas_per_sm x SMs`` CTAs, all resident. Phase 1 runs the fused gate/up matmul's
``"grid"`` work items (``(N tile, M tile, K split)``, the same code as
:func:`~.gptq_matmul_mgpu.gptq_matmul_mgpu`'s decode grid, :func:`~.gptq_matmul_mgpu._tile_program`),
CTA ``c`` taking items ``c, c + G, ...``; each TMA-adds its fp32 partial into ``gu [1, rows, 2 I]``
(``[gate | up]`` as the gate/up grid stores it). After a grid barrier phase 2 runs the down projection's
work items, each pipeline step loading fp32 gate / up tiles of ``gu`` and making its x tile
``silu(gate) * up`` in SMEM (as :func:`~.gptq_matmul_mgpu.gptq_matmul_mgpu_glu_parts` does), and
TMA-adds its partial into ``y [1, rows, N]``. No SiLU kernel, no second launch, and ``gu`` never
leaves L2 in between.

Contract: ``h [..., K]`` bf16 / fp16 with at most 16 tokens; ``gate_up`` the fused gate/up layer
(:func:`~.gptq_matmul_mgpu.pack_mgpu` of ``[gate | up]``, ``N = 2 I``, no N padding) and ``down``
(``K = I``, no act-order permutation: its x is made in the kernel). Returns fp32 addends
``[1, ..., N]`` like :func:`~.gptq_matmul_mgpu.gptq_matmul_mgpu_parts`: ``acc + mlp(h)``.

Hardware only for the multi-CTA kernel (the Mosaic GPU interpreter has no semaphores and no TMA
reduction): in interpret mode the same body runs with one CTA, K unsplit and no barrier, which
checks the work-item loop, the two phases and the in-kernel activation against the references.
Status (session 19, H100): correct on the GPU (its ``-m gpu`` test, 1 to 4 CTAs per SM), but
**slower than the per-op path**: in the 7B decode step the kernel takes 42.5 us where gate/up, SiLU *
up and down take 32.9 us (2.62 against 2.27 ms per step). Its 2 CTAs per SM keep fewer weight loads
in flight than the grid kernels' many short CTAs, and every work item drains its pipeline
(benchmarks/RESULTS.md, session 19). ``jgptq.models.llama.PERSISTENT_MLP`` therefore stays off.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import grid_sync
from . import gptq_matmul_mgpu as mg

MAX_TOKENS = 16
SMEM_BYTES = 227 * 1024  # per SM on Hopper, what one CTA may use at most
SMEM_SLACK = 4096  # pipeline barriers and Mosaic's own scratch


@dataclasses.dataclass(frozen=True)
class MlpConfig:
    """Tiles of :func:`gptq_mlp_mgpu`: the two phases' decode-grid configs and the grid size.

    Attributes:
      gate_up: the gate/up phase's :class:`~.gptq_matmul_mgpu.MgpuConfig` (``"grid"``, token-major).
      down: the down phase's (``"grid"``, token-major; its x tiles are made from fp32 gate / up).
      ctas_per_sm: CTAs per SM, 1 to 4. All CTAs must be resident at once for the grid barrier:
        two CTAs of 128 threads fit the register file whatever their register count (3: up to
        170 registers per thread, 4: up to 128; the configs timed on an H100 in
        benchmarks/RESULTS.md, session 19), and :func:`gptq_mlp_mgpu` checks shared memory.
      prefetch: before each work item a CTA issues TMA prefetches into L2 of the weight words of
        its next one (after its last gate/up item: its first down item, so those loads are on
        their way through the barrier), hiding the pipeline drain between items. ``"frag"``
        layouts on hardware only (the interpreter has no L2); a hint, results do not change.
    """

    gate_up: mg.MgpuConfig
    down: mg.MgpuConfig
    ctas_per_sm: int = 2
    prefetch: bool = True


def default_config(m: int, gate_up: mg.MgpuPacked, down: mg.MgpuPacked, *, interpret: bool = False) -> MlpConfig:
    """The split-K decode grids' configs for ``m`` tokens (``gptq_matmul_mgpu._grid_config``,
    :func:`~.gptq_matmul_mgpu.glu_config` with ``grid=True``; the default config of some layers at
    9-16 tokens is stream-K, which has no work items to run here) with no more pipeline stages than a work item has K
    steps (more would only hold shared memory). The interpreter: K unsplit (it has no TMA
    reduction, and one CTA runs every item)."""
    out = []
    for p, cfg in ((gate_up, mg._grid_config(m, gate_up)), (down, mg.glu_config(m, down, grid=True))):
        if interpret:
            cfg = dataclasses.replace(cfg, split_k=1, split_reduce="xla")
        steps = p.k_pad // cfg.block_k // cfg.split_k
        out.append(dataclasses.replace(cfg, num_stages=max(1, min(cfg.num_stages, steps))))
    return MlpConfig(gate_up=out[0], down=out[1])


def _smem_bytes(cfg: MlpConfig, gate_up: mg.MgpuPacked, down: mg.MgpuPacked, cdt) -> int:
    """Shared memory of one CTA: both phases' output tiles and the x tile, plus the larger of the
    two pipelines (each is allocated inside its phase)."""
    a = jnp.dtype(cdt).itemsize

    def pipe(c: mg.MgpuConfig, p: mg.MgpuPacked, x_bytes: int) -> int:
        s_rows = max(1, c.block_k // p.group_size)
        return c.num_stages * (c.block_k * c.block_n * p.bits // 8 + x_bytes + 2 * s_rows * c.block_n * a)

    g, d = cfg.gate_up, cfg.down
    tiles = g.block_m * g.block_n * 4 + d.block_m * d.block_n * 4 + d.block_m * d.block_k * a
    return tiles + max(pipe(g, gate_up, g.block_m * g.block_k * a), pipe(d, down, 2 * d.block_m * d.block_k * 4)) \
        + SMEM_SLACK


def _validate(h: jax.Array, gate_up: Any, down: Any, cfg: MlpConfig, interpret: bool) -> None:
    if not isinstance(gate_up, mg.MgpuPacked) or not isinstance(down, mg.MgpuPacked):
        raise ValueError(f"gptq_mlp_mgpu needs MgpuPacked layers (pack_mgpu); got {type(gate_up).__name__} and "
                         f"{type(down).__name__}.")
    if h.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"gptq_mlp_mgpu: h must be bfloat16 or float16; got {h.dtype}.")
    if h.ndim < 1 or h.shape[-1] != gate_up.k:
        raise ValueError(f"gptq_mlp_mgpu: h must be [..., K={gate_up.k}] (gate_up's K); got {tuple(h.shape)}.")
    m = math.prod(h.shape[:-1])
    if not 1 <= m <= MAX_TOKENS:
        raise ValueError(f"gptq_mlp_mgpu is a decode kernel: 1 to {MAX_TOKENS} tokens; got {m}.")
    if gate_up.n != 2 * down.k or gate_up.n_pad != gate_up.n:
        raise ValueError(f"gptq_mlp_mgpu: gate_up must be [gate | up] with N = 2 x down's K = {2 * down.k} and "
                         f"no N padding; got N = {gate_up.n} (padded {gate_up.n_pad}).")
    if down.perm is not None:
        raise ValueError("gptq_mlp_mgpu: down must have no act-order permutation (its x is made in the kernel); "
                         "use the unfused path for act-order down projections.")
    for name, c, p in (("gate_up", cfg.gate_up, gate_up), ("down", cfg.down, down)):
        mg._validate(jax.ShapeDtypeStruct((m, p.k), h.dtype), p, c)
        if c.schedule != "grid" or not c.writes_y or c.zero_mode != "regs":
            raise ValueError(f"gptq_mlp_mgpu: the {name} config must be the token-major 'grid' schedule with "
                             f"zero_mode='regs'; got {c}.")
        if c.block_m != cfg.gate_up.block_m:
            raise ValueError(f"gptq_mlp_mgpu: both phases need the same block_m; got {cfg.gate_up.block_m} and "
                             f"{c.block_m}.")
        if c.split_k > 1 and (interpret or c.split_reduce != "tma"):
            raise ValueError(f"gptq_mlp_mgpu: the {name} phase splits K {c.split_k} ways, which needs "
                             "split_reduce='tma' on hardware (the interpreter: split_k=1).")
    if down.k % cfg.down.block_k:
        raise ValueError(f"gptq_mlp_mgpu: the intermediate size {down.k} must be a multiple of down's block_k="
                         f"{cfg.down.block_k} (up's columns start a K block of the down phase).")
    if cfg.ctas_per_sm not in (1, 2, 3, 4):
        raise ValueError(f"gptq_mlp_mgpu: ctas_per_sm must be 1 to 4 (all CTAs resident); got {cfg.ctas_per_sm}.")
    smem = _smem_bytes(cfg, gate_up, down, h.dtype)
    if cfg.ctas_per_sm * smem > SMEM_BYTES:
        raise ValueError(f"gptq_mlp_mgpu: {cfg.ctas_per_sm} CTAs per SM need {cfg.ctas_per_sm * smem} bytes of shared "
                         f"memory (> {SMEM_BYTES}); use fewer pipeline stages or ctas_per_sm=1.")


def supported(m: int, gate_up: Any, down: Any, dtype: Any, *, interpret: bool = False) -> str | None:
    """Why :func:`gptq_mlp_mgpu` cannot run ``m`` tokens of ``dtype`` through these layers with its
    default config, or None when it can (the callers' switch: the model falls back to its
    per-op path)."""
    if not isinstance(gate_up, mg.MgpuPacked) or not isinstance(down, mg.MgpuPacked):
        return "the layers are not MgpuPacked"
    if not 1 <= m <= MAX_TOKENS:
        return f"{m} tokens (1 to {MAX_TOKENS})"
    try:
        _validate(jax.ShapeDtypeStruct((m, gate_up.k), jnp.dtype(dtype)), gate_up, down,
                  default_config(m, gate_up, down, interpret=interpret), interpret)
    except ValueError as e:
        return str(e)
    return None


def accumulator_shapes(m: int, gate_up: mg.MgpuPacked, down: mg.MgpuPacked, *, config: MlpConfig | None = None,
                       interpret: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The fp32 buffers :func:`gptq_mlp_mgpu` adds into for ``m`` tokens (``config``: default
    :func:`default_config`): ``gu [1, rows, I + Ip]`` (the gate/up product as its grid stores it,
    ``[gate | up]``, then ``Ip - I`` zero columns, so that the down phase's K blocks past ``I`` read
    zeros: ``Ip`` is down's padded K) and ``y [1, rows, N]``. ``gu`` must be zeros; ``y`` may hold
    addends."""
    cfg = config or default_config(max(m, 1), gate_up, down, interpret=interpret)
    rows = mg._x_geometry(m, gate_up, cfg.gate_up, interpret)[0]
    return (1, rows, down.k + down.k_pad), (1, rows, down.n_pad)


def gptq_mlp_mgpu(
    h: jax.Array,
    gate_up: mg.MgpuPacked,
    down: mg.MgpuPacked,
    *,
    config: MlpConfig | None = None,
    gu: jax.Array | None = None,
    acc: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``acc + down(silu(h @ gate) * (h @ up))`` in fp32, ``[1, ..., N]`` (module docstring).

    Args:
      h: ``[..., K]`` bf16 / fp16, 1 to 16 tokens (the normalized MLP input).
      gate_up: the fused gate / up layer, ``N = 2 I`` (gate first).
      down: the down projection, ``K = I``.
      config: :class:`MlpConfig`; default :func:`default_config`.
      gu, acc: fp32 zeros of :func:`accumulator_shapes` made elsewhere (e.g. by the norm kernel
        before the MLP); default made here. ``acc`` may hold addends (a residual), which the
        result then includes.
      interpret: run in the Mosaic GPU interpreter (one CTA, no barrier).
    Returns:
      ``[1, ..., N]`` float32.
    """
    if not isinstance(down, mg.MgpuPacked) or not isinstance(gate_up, mg.MgpuPacked):
        _validate(h, gate_up, down, None, interpret)  # raises: names the bad argument
    m = math.prod(h.shape[:-1]) if h.ndim >= 1 else 0
    cfg = config or default_config(max(m, 1), gate_up, down, interpret=interpret)
    _validate(h, gate_up, down, cfg, interpret)
    gu_shape, y_shape = accumulator_shapes(m, gate_up, down, config=cfg, interpret=interpret)
    for name, buf, want in (("gu", gu, gu_shape), ("acc", acc, y_shape)):
        if buf is not None and (tuple(buf.shape) != want or buf.dtype != jnp.float32):
            raise ValueError(f"gptq_mlp_mgpu: {name} must be float32 {want} (accumulator_shapes); got "
                             f"{buf.dtype} {tuple(buf.shape)}.")
    gu = jnp.zeros(gu_shape, jnp.float32) if gu is None else gu
    acc = jnp.zeros(y_shape, jnp.float32) if acc is None else acc
    ctas = 1 if interpret else cfg.ctas_per_sm * mg._num_sms()
    y = _forward(h.reshape(m, gate_up.k), gate_up, down, gu, acc, cfg, ctas, interpret)
    return y[:, :m, : down.n].reshape(1, *h.shape[:-1], down.n)


@functools.partial(jax.jit, static_argnames=("cfg", "ctas", "interpret"))
def _forward(h2, gate_up, down, gu, acc, cfg: MlpConfig, ctas: int, interpret: bool) -> jax.Array:
    m = h2.shape[0]
    cdt = h2.dtype
    rows, pad_k = mg._x_geometry(m, gate_up, cfg.gate_up, interpret)
    if gate_up.perm is not None:
        h2 = jnp.take(h2, gate_up.perm, axis=1)
    if rows - m or pad_k:
        h2 = jnp.pad(h2, ((0, rows - m), (0, pad_k)))
    sz1 = gate_up.sz if gate_up.sz.dtype == cdt else gate_up.sz.astype(cdt)
    sz2 = down.sz if down.sz.dtype == cdt else down.sz.astype(cdt)
    mp = -(-m // cfg.gate_up.block_m) * cfg.gate_up.block_m
    # each item's TMA adds must have landed before the CTA signals the barrier: wait in full
    prog1 = mg._tile_program(mp, gate_up, cfg.gate_up, cdt, interpret, rows, fp32_out=True, store_wait="full")
    prog2 = mg._tile_program(mp, down, cfg.down, cdt, interpret, rows, glu=True, fp32_out=True,
                             glu_offset=down.k // cfg.down.block_k, store_wait="full")
    pf = _prefetches(cfg, gate_up, down, interpret)
    run = _kernel(prog1, prog2, gate_up, down, cfg, ctas, interpret, pf)
    # a phase whose K is not split stores its tiles (no TMA add): gu must then start at zero (the
    # caller's contract) and acc's addends are added here
    adds = prog2.reduce_into
    views = (gate_up.w.reshape(-1, 256), down.w.reshape(-1, 256)) if pf else ()
    _, y = run(h2, gate_up.w, sz1, down.w, sz2, *views, gu, acc if adds else jnp.zeros_like(acc))
    return y if adds else acc + y


def _prefetches(cfg: MlpConfig, gate_up: mg.MgpuPacked, down: mg.MgpuPacked, interpret: bool) -> bool:
    """Whether the kernel prefetches its next work item's weights (:attr:`MlpConfig.prefetch`)."""
    return cfg.prefetch and not interpret and gate_up.layout == down.layout == "frag"


def _item_prefetch(view, p: mg.MgpuPacked, c: mg.MgpuConfig, ni, si) -> None:
    """TMA prefetches into L2 of the ``"frag"`` words of work item ``(ni, si)``: the 128-column K
    blocks of its split, ``block_n / 16`` rows of the ``[Kp/128 * Np/16, 256]`` view each."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n16, rows = p.n_pad // 16, c.block_n // 16
    cols = p.k_pad // c.split_k  # K columns per split; with 64-column K blocks a split may end mid-block (a hint)
    for j in range(max(1, cols // mg.W_KBLOCK)):
        kb = si * cols // mg.W_KBLOCK + j
        plgpu.async_prefetch(view.at[pl.ds(kb * n16 + ni * rows, rows)])


def _kernel(prog1, prog2, gate_up: mg.MgpuPacked, down: mg.MgpuPacked, cfg: MlpConfig, ctas: int, interpret: bool,
            prefetch: bool = False):
    """The launch: ``(h, w1, sz1, w2, sz2, gu, y) -> (gu, y)``, ``gu`` / ``y`` aliased in and out:
    a phase with split K TMA-adds its partials into them, one with whole K (always in the
    interpreter, which has no TMA reduction) stores its tiles."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    items1, items2 = math.prod(prog1.grid), math.prod(prog2.grid)
    sync = not interpret and ctas > 1

    def split(prog, idx):
        n_t, m_t, _ = prog.grid
        return idx % n_t, (idx // n_t) % m_t, idx // (n_t * m_t)

    def phase(c, prog, total, call, pf_here=None, pf_next=None):
        """CTA ``c``'s items ``c, c + G, ...`` of one phase; ``pf_here(ni, si)`` prefetches an item
        of this phase, ``pf_next()`` this CTA's first item of the next one."""

        def one(t, carry):
            idx = c + t * ctas
            if pf_here is not None:  # the next item's weights, while this one streams its own
                nxt = idx + ctas

                @pl.when(nxt < total)
                def _pf_here():
                    ni, _, si = split(prog, nxt)
                    pf_here(ni, si)

                if pf_next is not None:
                    @pl.when((nxt >= total) & (idx < total))
                    def _pf_next():
                        pf_next()

            @pl.when(idx < total)
            def _item():
                call(*split(prog, idx))

            return carry

        jax.lax.fori_loop(0, -(-total // ctas), one, 0)

    def body(x, w1, sz1, w2, sz2, *rest):
        v1, v2, gu, y, o1, o2, xg = rest if prefetch else (None, None, *rest)
        c = jax.lax.axis_index("c")
        pf1 = pf2 = pf12 = None
        if prefetch:
            pf1 = lambda ni, si: _item_prefetch(v1, gate_up, cfg.gate_up, ni, si)  # noqa: E731
            pf2 = lambda ni, si: _item_prefetch(v2, down, cfg.down, ni, si)  # noqa: E731

            def pf12():
                @pl.when(c < items2)
                def _first_down():
                    ni, _, si = split(prog2, c)
                    pf2(ni, si)

        phase(c, prog1, items1, lambda ni, mi, si: prog1.run(ni, mi, si, x, w1, sz1, gu, o1), pf1, pf12)
        if sync:
            arrive, done = grid_sync.semaphores()
            grid_sync.fence_async_global()  # this CTA's TMA adds into gu (completed) before the signal
            grid_sync.counter_barrier(arrive, 0, ctas)
            grid_sync.fence_async_global()  # ... and the other CTAs' before this CTA's TMA loads of gu
        phase(c, prog2, items2, lambda ni, mi, si: prog2.run(ni, mi, si, gu.at[0], w2, sz2, y, o2, xg), pf2)
        if sync:
            grid_sync.counter_reset(arrive, done, c, 1, ctas)

    scratch = [*prog1.scratch, *prog2.scratch]
    if interpret:  # the interpreter takes no Ref operands: gu / y are outputs, zero-initialised
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        def call_interpret(h, w1, sz1, w2, sz2, gu, y):
            kern = plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct(gu.shape, jnp.float32),
                                                jax.ShapeDtypeStruct(y.shape, jnp.float32)),
                                scratch_types=scratch, grid=(ctas,), grid_names=("c",),
                                interpret=InterpretGPUParams(uninitialized_memory="zero"))
            gu_out, y_out = kern(h, w1, sz1, w2, sz2)
            return gu + gu_out, y + y_out

        return call_interpret

    def scoped(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch)

    run = pl.kernel(scoped, out_type=(), mesh=plgpu.Mesh(grid=(ctas,), grid_names=("c",)),
                    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))

    def call(h, w1, sz1, w2, sz2, *rest):
        *views, gu, y = rest
        gu_ref, y_ref = jax.new_ref(gu), jax.new_ref(y)
        run(h, w1, sz1, w2, sz2, *views, gu_ref, y_ref)
        return gu_ref[...], y_ref[...]

    return call


def reference(h: jax.Array, gate_up: mg.MgpuPacked, down: mg.MgpuPacked) -> jax.Array:
    """Plain jnp: ``h @ [gate | up]`` in fp32 (:func:`~.gptq_matmul_mgpu.reference` before its
    rounding), ``silu(gate) * up`` rounded once to ``h.dtype``, then the down projection in fp32;
    ``[..., N]`` float32."""
    k = gate_up.k
    x = h.reshape(-1, k)
    if gate_up.perm is not None:
        x = jnp.take(x, gate_up.perm, axis=1)
    x = jnp.pad(x, ((0, 0), (0, gate_up.k_pad - k))).astype(jnp.float32)
    gu = (x @ mg.dequantize_mgpu(gate_up, jnp.float32))[:, : gate_up.n]
    a = mg.glu_activation(gu, h.dtype).astype(jnp.float32)
    a = jnp.pad(a, ((0, 0), (0, down.k_pad - down.k)))
    y = a @ mg.dequantize_mgpu(down, jnp.float32)
    return y[:, : down.n].reshape(*h.shape[:-1], down.n)


_VARIANT = re.compile(r"([1-4])(?:k([0-9]+))?(?:s([1-9]))?(nopf)?")  # main()'s timing variants


def _variant(spec: str, cfg: MlpConfig, gate_up: mg.MgpuPacked | None = None) -> MlpConfig:
    """``cfg`` changed by a timing variant ``<ctas per SM>[k<split>][s<max stages>][nopf]``
    (:func:`main`): ``k``: the gate/up phase's K split (its items then have more K steps, and it
    gets as many pipeline stages as it has steps, at most 8; needs ``gate_up``), ``s``: at most
    that many stages in both phases, ``nopf``: no L2 prefetch of the next item."""
    mt = _VARIANT.fullmatch(spec)
    if not mt or (mt[2] and gate_up is None):
        raise ValueError(f"variant {spec!r}: want <ctas per SM 1-4>[k<gate/up split>][s<max stages>][nopf], "
                         "e.g. 2, 4s2, 2k4, 2nopf")
    out = dataclasses.replace(cfg, ctas_per_sm=int(mt[1]), prefetch=mt[4] is None)
    if mt[2]:
        split = int(mt[2])
        steps = gate_up.k_pad // out.gate_up.block_k // split
        out = dataclasses.replace(out, gate_up=dataclasses.replace(out.gate_up, split_k=split,
                                                                   num_stages=max(1, min(8, steps))))
    if mt[3]:
        out = dataclasses.replace(out, **{name: dataclasses.replace(c, num_stages=min(c.num_stages, int(mt[3])))
                                          for name, c in (("gate_up", out.gate_up), ("down", out.down))})
    return out


def main() -> None:  # pragma: no cover - GPU timing
    """Time the kernel against the two-launch path (gate/up grid, then the down grid with the
    activation in its kernel) at the Llama-2-7B MLP shapes, weights rotated over copies larger
    than L2; prints µs and checks both against :func:`reference`."""
    import argparse
    import json
    import time

    from .gptq_matmul_gpu import random_gptq_linear

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--interpret", action="store_true",
                    help="CPU smoke run through the interpreter (its times mean nothing)")
    ap.add_argument("--variants", default="2,1,2nopf",
                    help="comma list: CTAs per SM, then optionally 'kN' (gate/up split N ways, as many stages "
                         "as its items have K steps, up to 8), 'sS' (at most S pipeline stages in both phases) "
                         "and 'nopf' (without the next item's L2 prefetch), e.g. 4s2, 2k4")
    args = ap.parse_args()
    d, i = args.hidden, args.inter

    def layers(seed):
        g = random_gptq_linear(jax.random.key(seed), d, i, bits=4, group_size=128)
        u = random_gptq_linear(jax.random.key(seed + 1), d, i, bits=4, group_size=128)
        fused = {key: jnp.concatenate([g[key], u[key]], axis=-1) for key in ("qweight", "scales", "zeros")}
        fused["g_idx"] = g["g_idx"]
        dn = random_gptq_linear(jax.random.key(seed + 2), i, d, bits=4, group_size=128)
        return mg.pack_mgpu_linear(fused, bits=4), mg.pack_mgpu_linear(dn, bits=4)

    models = [layers(10 * c) for c in range(args.copies)]

    def timed(f, h):
        """µs per call: ``reps`` calls rotating over the copies inside one jitted function (device
        time dominates; the host issues one executable), best of 3. Each call's input depends on
        the previous output, as in a model, through one small elementwise op (independent calls
        repeat identical inputs, which XLA may compute once or overlap: session 19's run 1)."""

        def chain(h, ms):
            for r in range(args.reps):
                y = f(h, *ms[r % len(ms)])
                h = (h.astype(jnp.float32) + 1e-30 * y[:, :d]).astype(h.dtype)
            return h

        many = jax.jit(chain)
        jax.block_until_ready(many(h, models))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(many(h, models))
            best = min(best, time.perf_counter() - t0)
        return best / args.reps * 1e6

    ip = args.interpret

    def two(h, gup, dn):
        gu = mg.gptq_matmul_mgpu_parts(h, gup, interpret=ip).sum(0)
        return mg.gptq_matmul_mgpu_glu_parts(gu, dn, interpret=ip).sum(0)

    for m in map(int, args.ms.split(",")):
        h = (jax.random.normal(jax.random.key(m), (m, d), jnp.float32) * 0.5).astype(jnp.bfloat16)
        ref = reference(h, *models[0])
        scale = float(jnp.linalg.norm(ref))
        row = {"M": m, "two_launches_us": timed(two, h)}
        row["two_launches_err"] = float(jnp.linalg.norm(two(h, *models[0]) - ref)) / scale
        for v in args.variants.split(","):
            cfg = _variant(v, default_config(m, *models[0], interpret=ip), models[0][0])
            try:
                _validate(h, *models[0], cfg, ip)
            except ValueError as e:  # e.g. too much shared memory for that many CTAs per SM
                row[f"persistent_cps{v}_skipped"] = str(e)
                continue

            def f(h, gup, dn, cfg=cfg):
                return gptq_mlp_mgpu(h, gup, dn, config=cfg, interpret=ip)[0]

            row[f"persistent_cps{v}_us"] = timed(f, h)
            row[f"persistent_cps{v}_err"] = float(jnp.linalg.norm(f(h, *models[0]) - ref)) / scale
        print(json.dumps(row), flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
