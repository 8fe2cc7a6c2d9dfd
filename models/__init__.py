"""Flax NNX models (the Llama family) that run float or packed GPTQ weights.

Public names are imported lazily (``import jgptq.models`` stays cheap):
``load``, ``LoadedModel``, ``LlamaConfig``, ``LlamaForCausalLM``, ``load_hf``, ``save_hf``
(generation: ``from jgptq.models.generate import generate``).
Submodules: ``config``, ``llama`` (pure functions + NNX modules), ``quant_linear``, ``hf``,
``generate``, ``loading``, ``gguf``, ``gptq_folder``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "jgptq.models.loading",
    "LoadedModel": "jgptq.models.loading",
    "LlamaConfig": "jgptq.models.config",
    "LlamaForCausalLM": "jgptq.models.llama",
    "load_hf": "jgptq.models.hf",
    "save_hf": "jgptq.models.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jgptq.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
