"""``jgptq.models.load``: one entry point for every model source.

* a ``.gguf`` file → ``jgptq.models.gguf.load_gguf``
* a Hugging Face folder whose ``config.json`` has a GPTQ ``quantization_config`` (or that holds a
  ``quantize_config.json``) → ``jgptq.models.gptq_folder.load_gptq_folder``
* any other Hugging Face folder → the float loader :func:`jgptq.models.hf.load_hf`

Loaders are imported lazily, so loading one kind never imports the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

from jgptq.models.config import ConfigError, LlamaConfig

__all__ = ["load", "LoadedModel", "model_kind"]


@dataclasses.dataclass
class LoadedModel:
    """What :func:`load` returns; unpacks as ``config, params, tokenizer = load(path)``.

    Attributes:
      config: the :class:`LlamaConfig`.
      params: the params tree (DESIGN.md): host numpy arrays, float or packed GPTQ LINs.
      tokenizer: a transformers tokenizer, or None when the source has none.
      kind: ``"hf"``, ``"gptq"`` or ``"gguf"``.
      quant_info: what the GPTQ loader reports about the checkpoint (None for float models).
    """

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer: Any | None
    kind: str
    quant_info: Any | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.config, self.params, self.tokenizer))


def model_kind(path: str | os.PathLike) -> str:
    """``"gguf"``, ``"gptq"`` or ``"hf"`` for a model path, with a clear error for anything else."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise ValueError(f"{p}: a model file must be a .gguf; for Hugging Face models pass the folder "
                         "that holds config.json")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such model file or folder")
    cfg = p / "config.json"
    if not cfg.exists():
        raise ConfigError(f"{p}: no config.json (is this a Hugging Face model folder?)")
    try:
        hf = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg} is not valid JSON: {e}") from None
    qc = hf.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method", "gptq")
        if method != "gptq":
            raise ConfigError(f"{cfg}: quantization_config.quant_method={method!r} is not supported; "
                              "jgptq reads float models and GPTQ checkpoints")
        return "gptq"
    if (p / "quantize_config.json").exists() or (p / "quant_config.json").exists():
        return "gptq"
    return "hf"


def load(path: str | os.PathLike, dtype: Any = "float32", *, tokenizer: bool = True) -> LoadedModel:
    """Load a model from a GGUF file or a Hugging Face folder (float or GPTQ).

    Args:
      path: ``.gguf`` file or Hugging Face folder.
      dtype: float dtype of the returned float tensors (``"float32"``/``"bfloat16"`` or a dtype).
      tokenizer: also load the tokenizer (``AutoTokenizer``) for float HF folders.
    Returns:
      :class:`LoadedModel` (unpacks as ``config, params, tokenizer``).
    """
    from jgptq.models.hf import load_hf, resolve_dtype

    kind = model_kind(path)
    dtype = resolve_dtype(dtype)
    if kind == "gguf":
        from jgptq.models.gguf import load_gguf

        config, params, tok = load_gguf(path, dtype=dtype, tokenizer=tokenizer)
        return LoadedModel(config, params, tok, kind)
    if kind == "gptq":
        from jgptq.models.gptq_folder import load_gptq_folder

        config, params, tok, info = load_gptq_folder(path, dtype=dtype, tokenizer=tokenizer)
        return LoadedModel(config, params, tok, kind, info)
    config, params, tok = load_hf(path, dtype=dtype, tokenizer=tokenizer)
    return LoadedModel(config, params, tok, kind)
