"""Text generation: batched prefill + KV-cache decode under ``jax.jit``.

Prompts of different lengths are left-padded into one batch (padding masked; positions from the
mask, so each row computes what it would alone). The KV cache is preallocated to the bucketed
prompt length plus ``max_new_tokens``; prompt lengths are bucketed so that few shapes compile, and
the decode step compiles once per (batch, cache length). Greedy decoding (``temperature=0``) or
temperature / top-p (nucleus) sampling from a seed; rows stop at an EOS token.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jgptq.models.config import LlamaConfig
from jgptq.models.llama import DECODE_ATTENTION, DECODE_NORM, LlamaForCausalLM, forward_step, init_cache

__all__ = ["generate", "sample_logits", "bucket_length"]

StreamFn = Callable[[list[int | None]], None]


def bucket_length(n: int) -> int:
    """Padded prompt length: the next power of two up to 256, then the next multiple of 256."""
    if n <= 0:
        raise ValueError(f"length must be positive, got {n}")
    if n <= 256:
        return max(8, 1 << (n - 1).bit_length())
    return -(-n // 256) * 256


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float,
                  *, greedy: bool, use_top_p: bool) -> jax.Array:
    """Pick one token per row from ``logits [B, V]`` -> ``[B]`` int32.

    Greedy takes the argmax. Otherwise samples from ``softmax(logits / temperature)``, restricted
    with ``use_top_p`` to the smallest set of most likely tokens whose probability reaches
    ``top_p`` (the most likely token is always kept).
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if not use_top_p:
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of strictly more likely tokens
    kept = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, kept, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


_COMPILED: dict[Any, tuple[Callable, Callable]] = {}


def _step_fns(treedef: Any, config: LlamaConfig, greedy: bool, use_top_p: bool,
              chunk: int, attention: str = "auto", norm: str = "auto") -> tuple[Callable, Callable]:
    key = (treedef, config, greedy, use_top_p, chunk, attention, norm)
    if key in _COMPILED:
        return _COMPILED[key]

    def run(leaves, ids, mask, cache):
        model = jax.tree.unflatten(treedef, leaves)
        tree = model.tree() if isinstance(model, LlamaForCausalLM) else model
        logits, cache = forward_step(tree, ids, mask, cache, config, last_only=True, attention=attention,
                                     norm=norm)
        return logits[:, 0], cache

    def prefill(leaves, ids, mask, cache, rng, temperature, top_p, eos):
        logits, cache = run(leaves, ids, mask, cache)
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits, sub, temperature, top_p, greedy=greedy, use_top_p=use_top_p)
        return tok, cache, rng, jnp.isin(tok, eos)

    def decode(leaves, tok, cache, rng, done, temperature, top_p, eos):
        # ``chunk`` steps in one call (lax.scan): the host dispatches the ~hundreds of weight
        # arrays once per chunk instead of once per token (on a GPU a 7B decode step is otherwise
        # bound by that host work, benchmarks/RESULTS.md); same tokens as one step per call
        def one(carry, _):
            tok, cache, rng, done = carry
            logits, cache = run(leaves, tok[:, None], jnp.ones((tok.shape[0], 1), bool), cache)
            rng, sub = jax.random.split(rng)
            nxt = sample_logits(logits, sub, temperature, top_p, greedy=greedy, use_top_p=use_top_p)
            nxt = jnp.where(done, eos[0], nxt)
            done = done | jnp.isin(nxt, eos)
            return (nxt, cache, rng, done), (nxt, done)

        (tok, cache, rng, done), (toks, dones) = jax.lax.scan(one, (tok, cache, rng, done), None, length=chunk)
        return tok, cache, rng, done, toks, dones

    donate = () if jax.default_backend() == "cpu" else (3,)
    fns = (jax.jit(prefill, donate_argnums=donate), jax.jit(decode, donate_argnums=() if not donate else (2,)))
    _COMPILED[key] = fns
    return fns


def generate(model_or_params: LlamaForCausalLM | Mapping[str, Any], config: LlamaConfig | None,
             prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
             stream: StreamFn | None = None, dtype: Any | None = None, decode_chunk: int = 8,
             attention: str = "auto", norm: str = "auto") -> list[list[int]]:
    """Generate continuations of a batch of token-id prompts.

    Args:
      model_or_params: a :class:`LlamaForCausalLM`, or a params tree (DESIGN.md; built into one).
      config: the model's config (None: take the model's).
      prompts: B prompts, each a non-empty sequence of token ids (lengths may differ).
      max_new_tokens: tokens to generate per prompt (at most; a row stops after EOS).
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_p: nucleus sampling mass in (0, 1]; 1 disables it.
      seed: PRNG seed for sampling.
      eos_token_id: id(s) that end a row; None uses ``config.eos_token_ids`` (may be empty).
      stream: called after each step with one entry per row: the new token id, or None for a
        row that has already finished.
      dtype: compute dtype when building from a params tree.
      decode_chunk: decode steps per jitted call (a ``lax.scan``; at most ``max_new_tokens - 1``).
        The tokens do not depend on it; larger chunks cut the host's per-call work (7B-shape
        decode on an H200: 1.15-1.7x faster at 16-20 steps per call than at 1, depending on the
        host; benchmarks/RESULTS.md), and ``stream``
        then sees the tokens of a chunk together. After every row has finished, at most two
        chunks of steps were computed in vain.
      attention: how decode steps attend to the KV cache: ``"auto"`` (on CUDA GPUs the Pallas
        kernel ``pallas_kernels.decode_attention_update``, RoPE and the cache write fused in, or
        ``decode_attention`` where only that applies; else XLA), ``"xla"``, ``"pallas"`` or
        ``"fused"`` (see ``jgptq.models.llama.DECODE_ATTENTION``).
      norm: how decode steps run their residual adds + RMSNorms: ``"auto"`` (on CUDA GPUs the
        one-pass kernel ``pallas_kernels.add_rms_norm``; else XLA), ``"xla"`` or ``"pallas"``
        (see ``jgptq.models.llama.DECODE_NORM``).
    Returns:
      For each prompt, the generated ids (ending with the EOS id when one was produced).
    """
    if isinstance(model_or_params, LlamaForCausalLM):
        model = model_or_params
        if config is not None and config != model.config:
            raise ValueError("config differs from the model's own config; pass config=None")
        config = model.config
    else:
        if config is None:
            raise ValueError("generate() from a params tree needs its LlamaConfig")
        model = LlamaForCausalLM.from_params(config, model_or_params, dtype=dtype)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(decode_chunk, bool) or not isinstance(decode_chunk, (int, np.integer)) or decode_chunk < 1:
        raise ValueError(f"decode_chunk must be an integer >= 1, got {decode_chunk!r}")
    if attention not in DECODE_ATTENTION:
        raise ValueError(f"attention must be one of {DECODE_ATTENTION}, got {attention!r}")
    if norm not in DECODE_NORM:
        raise ValueError(f"norm must be one of {DECODE_NORM}, got {norm!r}")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size}): {bad[:5]}")
    if eos_token_id is None:
        eos = list(config.eos_token_ids)
    else:
        eos = [int(eos_token_id)] if np.ndim(eos_token_id) == 0 else [int(e) for e in eos_token_id]
    eos_arr = jnp.asarray(eos if eos else [-1], jnp.int32)

    b = len(prompts)
    plen = bucket_length(max(len(p) for p in prompts))
    chunk = int(min(decode_chunk, max(1, max_new_tokens - 1)))
    chunks = -(-(max_new_tokens - 1) // chunk)  # decode calls; each step writes one cache slot
    slots = -(-(plen + max(max_new_tokens, chunks * chunk + 1)) // 64) * 64
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = np.full((b, plen), pad, np.int32)
    mask = np.zeros((b, plen), bool)
    for i, p in enumerate(prompts):  # left padding: every row's next token goes to slot plen
        ids[i, plen - len(p):] = p
        mask[i, plen - len(p):] = True

    leaves, treedef = jax.tree.flatten(model)
    greedy = temperature == 0
    prefill, decode = _step_fns(treedef, config, greedy, top_p < 1, chunk, attention, norm)
    cache = init_cache(config, b, slots, model.dtype)
    temp = jnp.float32(temperature if not greedy else 1.0)
    tp = jnp.float32(top_p)
    first = prefill(leaves, jnp.asarray(ids), jnp.asarray(mask), cache, jax.random.key(seed), temp, tp, eos_arr)
    cur = (*first, first[0][None], first[3][None])  # (tok, cache, rng, done, toks [n, B], dones [n, B])
    launched, produced = 0, 0
    out: list[list[int]] = [[] for _ in range(b)]
    finished = np.zeros(b, bool)
    while True:
        nxt = None
        if launched < chunks:  # dispatch the next chunk before reading this one
            nxt = decode(leaves, cur[0], cur[1], cur[2], cur[3], temp, tp, eos_arr)
            launched += 1
        toks, dones = np.asarray(cur[4]), np.asarray(cur[5])
        for tok, done in zip(toks, dones):
            if produced == max_new_tokens or finished.all():
                break
            produced += 1
            step: list[int | None] = []
            for i in range(b):
                if finished[i]:
                    step.append(None)
                else:
                    out[i].append(int(tok[i]))
                    step.append(int(tok[i]))
                    finished[i] = bool(done[i])
            if stream is not None:
                stream(step)
        if nxt is None or finished.all() or produced == max_new_tokens:
            break
        cur = nxt
    return out
