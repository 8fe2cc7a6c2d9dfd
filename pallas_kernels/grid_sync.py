"""Grid-wide synchronisation for persistent Mosaic GPU kernels (Hopper): a counter barrier and
the cross-proxy fence that makes one CTA's TMA writes visible to another CTA's TMA reads.

A persistent kernel runs one CTA per slot of the machine (all resident at once) through several
dependent phases. Between two phases every CTA must have finished writing what the next phase
reads, so the CTAs meet at a grid barrier.

**Counter barrier** (:func:`counter_barrier`, :func:`counter_reset`): one global counter that only
grows within a launch. At barrier ``k`` every CTA adds 1 (``red.release.gpu``) and polls the
counter with plain loads until it reaches ``(k + 1) * n`` (then ``fence.acquire.gpu``). No CTA
takes tokens, so there is no compare-and-swap contention: on an H100 with 132 CTAs a phase with
the barrier cost 1.30 us against 0.75 us without it and 2.20 us as one launch per phase
(``benchmarks/probes/persistent_phases.py``, benchmarks/RESULTS.md session 18; the token-taking
barrier built first cost ~37 us, session 17). The counter lives in a global semaphore
(``pl.get_global``) that keeps its value from one launch to the next, so each launch must end
with it at 0: after its last barrier every CTA adds 1 to a second semaphore, ``done``, and CTA 0
alone waits for ``done == n`` and then takes ``n_barriers * n`` from the counter and ``n`` from
``done`` (one waiter, no contention; nobody polls any more).

**Fence** (:func:`fence_async_global`): TMA copies run in the *async proxy*, semaphores in the
generic proxy. A CTA whose TMA stores / reduce-adds completed (``wait_smem_to_gmem(0)``) fences
before it signals, and a CTA that leaves the barrier fences before it issues TMA loads of that
data (``fence.proxy.async.global``, PTX ISA "proxy fences").

All CTAs of the launch must be resident at once or the barrier never opens: callers size the
grid to the SM count times the CTAs one SM holds (shared memory and registers). The Mosaic GPU
interpreter has no semaphores; kernels that use these run there with one CTA and no barrier.
"""

from __future__ import annotations

from jax.experimental import pallas as pl


def semaphores():
    """The two global semaphores of a counter barrier: ``(arrive, done)``, each one int32 word
    that keeps its value across launches (0 between launches of a kernel that ends with
    :func:`counter_reset`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return pl.get_global(plgpu.SemaphoreType.REGULAR), pl.get_global(plgpu.SemaphoreType.REGULAR)


def counter_barrier(arrive, k, n: int) -> None:
    """Barrier number ``k`` (0, 1, ... within the launch) across the ``n`` CTAs of the grid."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.semaphore_signal(arrive, 1, memory_scope="gpu")
    plgpu.semaphore_wait(arrive, (k + 1) * n, decrement=False, memory_scope="gpu")


def counter_reset(arrive, done, cta, n_barriers: int, n: int) -> None:
    """After a launch's last counter barrier: ``arrive`` and ``done`` back to 0 (``cta``: this
    CTA's index; ``n_barriers`` barriers were passed)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    plgpu.semaphore_signal(done, 1, memory_scope="gpu")

    @pl.when(cta == 0)
    def _reset():
        plgpu.semaphore_wait(done, n, memory_scope="gpu")
        plgpu.semaphore_wait(arrive, n_barriers * n, memory_scope="gpu")


def fence_async_global() -> None:
    """``fence.proxy.async.global`` in every thread of the warpgroup: orders this thread's
    generic-proxy accesses to global memory with its async-proxy (TMA) ones."""
    from jax._src.lib.mlir.dialects import llvm
    from jax._src.lib.mlir import ir
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu()
    def _fence(_ctx):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.proxy.async.global;", "", has_side_effects=True)

    _fence()
