"""Perplexity under the GPTQ protocol, for any model given as a logits function.

``perplexity(logits_fn, ids)`` cuts the evaluation ids into non-overlapping windows of ``seqlen``
tokens (the tail that does not fill a window is dropped), takes per window the mean cross-entropy of
``logits[:-1]`` against ``ids[1:]`` (``seqlen - 1`` predictions), multiplies it by ``seqlen`` (as the
GPTQ reference code does) and returns ``exp(sum / (n_windows * seqlen))``. The log-softmax is
computed in float32 in token chunks so that no second ``[B, T, V]`` array is materialized;
window sums are accumulated in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

__all__ = ["PerplexityResult", "model_logits_fn", "model_perplexity", "perplexity",
           "window_cross_entropy"]

LogitsFn = Callable[[Any], Any]  # ids int32 [B, T] -> logits float [B, T, V]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
      ppl: ``exp(nll)``.
      nll: ``sum(window_ce * seqlen) / (n_windows * seqlen)``, nats per token.
      n_windows: windows evaluated. n_windows_total: full windows in the ids.
      seqlen: tokens per window. n_tokens: length of the evaluation ids.
      window_ce: per-window mean cross-entropy (nats), in window order.
      seconds: wall time of the evaluation loop.
    """

    ppl: float
    nll: float
    n_windows: int
    n_windows_total: int
    seqlen: int
    n_tokens: int
    window_ce: tuple[float, ...]
    seconds: float

    @property
    def partial(self) -> bool:
        """True when ``max_windows`` cut the evaluation short: not the protocol's number."""
        return self.n_windows < self.n_windows_total

    def __float__(self) -> float:
        return self.ppl

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``partial`` included)."""
        d = dataclasses.asdict(self)
        d["window_ce"] = list(self.window_ce)
        d["partial"] = self.partial
        return d

    def __str__(self) -> str:
        note = (f" (partial: first {self.n_windows} of {self.n_windows_total} windows)"
                if self.partial else "")
        return (f"perplexity {self.ppl:.4f} over {self.n_windows} windows of {self.seqlen} "
                f"tokens{note}")


def _check_ids(ids: Any, seqlen: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"evaluation ids must be a 1-D integer array, got {arr.dtype} "
                         f"shape {arr.shape}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (one prediction needs two tokens), got {seqlen}")
    if arr.shape[0] < seqlen:
        raise ValueError(f"{arr.shape[0]} evaluation tokens do not fill one window of "
                         f"seqlen={seqlen}; use a shorter seqlen or more text")
    return arr.astype(np.int32, copy=False)


_CE_CACHE: dict[int, Callable] = {}


def _ce_fn(chunk: int) -> Callable:
    """Jitted ``(logits [B, T, V], ids [B, T]) -> mean CE [B]`` with the vocab reduction done on
    ``chunk``-token slices in float32."""
    if chunk not in _CE_CACHE:
        import jax
        import jax.numpy as jnp

        @jax.jit
        def ce(logits: jax.Array, ids: jax.Array) -> jax.Array:
            _, t, _ = logits.shape
            targets = ids[:, 1:]
            total = jnp.zeros((logits.shape[0],), jnp.float32)
            for s in range(0, t - 1, chunk):
                e = min(s + chunk, t - 1)
                x = logits[:, s:e].astype(jnp.float32)
                lse = jax.nn.logsumexp(x, axis=-1)
                picked = jnp.take_along_axis(x, targets[:, s:e, None], axis=-1)[..., 0]
                total = total + jnp.sum(lse - picked, axis=-1)
            return total / (t - 1)

        _CE_CACHE[chunk] = ce
    return _CE_CACHE[chunk]


def window_cross_entropy(logits: Any, ids: Any, chunk: int = 256) -> np.ndarray:
    """Mean next-token cross-entropy per window: ``logits [B, T, V]``, ``ids int [B, T]`` ->
    float64 ``[B]`` (nats), over the ``T - 1`` predictions ``logits[:, :-1]`` vs ``ids[:, 1:]``."""
    if getattr(logits, "ndim", None) != 3 or tuple(logits.shape[:2]) != tuple(np.shape(ids)):
        raise ValueError(f"logits must be [B, T, V] matching ids [B, T]; got logits "
                         f"{getattr(logits, 'shape', None)} and ids {np.shape(ids)}")
    return np.asarray(_ce_fn(chunk)(logits, ids), dtype=np.float64)


def perplexity(
    logits_fn: LogitsFn,
    ids: Any,
    seqlen: int = 2048,
    batch_size: int = 1,
    progress: bool = True,
    max_windows: int | None = None,
    chunk: int = 256,
) -> PerplexityResult:
    """Perplexity of ``logits_fn`` on non-overlapping ``seqlen`` windows of ``ids`` (tail dropped).

    Args:
      logits_fn: ``ids int32 [B, T] -> logits [B, T, V]`` (a jitted float or quantized forward).
        It is always called with ``B == batch_size`` (the last batch is padded with repeats of
        its windows, whose results are discarded) so that it compiles once.
      ids: evaluation token ids, 1-D integer ``[N]``.
      seqlen: window length T (the protocol: 2048).
      batch_size: windows per ``logits_fn`` call.
      progress: show a tqdm progress bar.
      max_windows: evaluate only the first ``max_windows`` windows (quick runs; the result says
        ``partial``).
      chunk: tokens per slice of the float32 log-softmax (bounds memory to ``B * chunk * V``).

    Raises:
      ValueError: bad ids/arguments, a logits shape that does not match, or NaN/Inf in a window's
        cross-entropy (naming the window).
    """
    arr = _check_ids(ids, seqlen)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    n_total = arr.shape[0] // seqlen
    n = n_total if max_windows is None else min(n_total, max_windows)
    windows = arr[: n * seqlen].reshape(n, seqlen)

    import jax.numpy as jnp
    from tqdm.auto import tqdm

    ce = np.empty((n,), np.float64)
    start = time.perf_counter()
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress)
    try:
        for b0 in range(0, n, batch_size):
            batch = windows[b0 : b0 + batch_size]
            real = batch.shape[0]
            if real < batch_size:  # keep the shape static: pad with repeats, discard their CE
                batch = np.concatenate([batch, batch[np.arange(batch_size - real) % real]])
            batch_j = jnp.asarray(batch)
            logits = logits_fn(batch_j)
            shape = tuple(getattr(logits, "shape", ()))
            if len(shape) != 3 or shape[:2] != (batch_size, seqlen):
                raise ValueError(f"logits_fn returned shape {shape} for ids of shape "
                                 f"{(batch_size, seqlen)}; expected [B, T, V]")
            values = window_cross_entropy(logits, batch_j, chunk)[:real]
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise ValueError(f"cross-entropy of window {b0 + int(bad[0])} is "
                                 f"{values[bad[0]]}: the model produced NaN/Inf logits")
            ce[b0 : b0 + real] = values
            bar.update(real)
            bar.set_postfix(ppl=f"{math.exp(float(ce[: b0 + real].mean())):.3f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    nll = float(np.sum(ce * seqlen) / (n * seqlen))
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_windows=n, n_windows_total=n_total,
                            seqlen=seqlen, n_tokens=int(arr.shape[0]),
                            window_ce=tuple(float(x) for x in ce), seconds=seconds)


def model_logits_fn(config: Any, params: Any, dtype: Any = None, use_kernels: bool = True) -> LogitsFn:
    """A jitted ``ids int32 [B, T] -> logits float32 [B, T, V]`` for a float or GPTQ params tree.

    Builds ``jgptq.models.llama.LlamaForCausalLM`` from ``(config, params)`` (float arrays cast to
    ``dtype`` when given) and jits its forward once per input shape; the weights are arguments of
    the compiled function, not constants baked into it.
    """
    import jax

    from jgptq.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_params(config, params, dtype=dtype, use_kernels=use_kernels)
    forward = jax.jit(lambda m, ids: m(ids))
    return lambda ids: forward(model, ids)


def model_perplexity(
    config: Any,
    params: Any,
    ids: Any,
    seqlen: int = 2048,
    *,
    dtype: Any = None,
    batch_size: int = 1,
    progress: bool = False,
    max_windows: int | None = None,
) -> PerplexityResult:
    """:func:`perplexity` of the Llama-family model ``(config, params)`` (float or GPTQ-packed)."""
    return perplexity(model_logits_fn(config, params, dtype), ids, seqlen=seqlen,
                      batch_size=batch_size, progress=progress, max_windows=max_windows)
