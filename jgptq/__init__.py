"""jgptq: GPTQ post-training quantization in JAX/XLA.

The public surface is re-exported here lazily, so that ``import jgptq`` stays cheap (the command
line starts fast) and so that each layer is only imported when it is used:

- core math (pure, jit-compiled, knows nothing of files or models): ``GPTQConfig``, ``gptq``,
  ``rtn``, ``QuantizedWeight``, ``hessian_init``, ``hessian_update``, ``damped_cholesky_inverse``
- model-level driver: ``quantize``
- checkpoint exchange: ``export_gptq``, ``load_gptq``
- subpackages: ``jgptq.models`` (Flax NNX models), ``jgptq.pallas_kernels`` (Pallas kernels),
  ``jgptq.evaluate``, ``jgptq.data``
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GPTQConfig": "jgptq.config",
    "QuantizedWeight": "jgptq.quantized",
    "gptq": "jgptq.solver",
    "rtn": "jgptq.solver",
    "hessian_init": "jgptq.hessian",
    "hessian_update": "jgptq.hessian",
    "damped_cholesky_inverse": "jgptq.linalg",
    "CholeskyError": "jgptq.linalg",
    "quantize": "jgptq.driver",
    "export_gptq": "jgptq.checkpoint",
    "load_gptq": "jgptq.checkpoint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jgptq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
