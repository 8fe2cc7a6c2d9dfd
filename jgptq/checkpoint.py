"""Checkpoint exchange with the PyTorch GPTQ ecosystem: GPTQ folder export, float Hugging Face export.

A folder written by :func:`export_gptq` loads unchanged in transformers (+ optimum + GPTQModel),
GPTQModel and vLLM. Its layout (see the GPTQ checkpoint format: AutoGPTQ / GPTQModel / HF):

- ``config.json``: the Hugging Face model config plus ``"quantization_config"``;
- ``quantize_config.json``: the same quantization dict (AutoGPTQ / GPTQModel / optimum read it first);
- ``model.safetensors`` or, above ``max_shard_size``, ``model-0000i-of-0000n.safetensors`` shards with
  ``model.safetensors.index.json``; per quantized linear ``<prefix>.qweight`` int32 ``[in*b/32, out]``,
  ``.qzeros`` int32 ``[G, out*b/32]``, ``.scales`` float16 ``[G, out]``, ``.g_idx`` int32 ``[in]`` and
  ``.bias``; embeddings, norms and a float ``lm_head`` under their Hugging Face names (``.weight``);
- the tokenizer files, ``generation_config.json`` where known.

Zero points: jgptq's params carry *true* zeros. ``checkpoint_format="gptq"`` (v1) stores ``zero - 1``,
so a zero of 0 cannot be written; jgptq refuses rather than write the wrapped value every v1 reader
misreads. ``"auto"`` writes v1 when every zero is representable (always for sym) and ``"gptq_v2"``
(true zeros) otherwise.

Every folder is written atomically: into a hidden sibling directory that is renamed into place only
once complete, so a crash never leaves a folder that looks like a finished checkpoint.

:func:`load_gptq` is the reader's entry point (it lives with the models: ``jgptq.models.gptq_folder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKPOINT_FORMATS",
    "CheckpointError",
    "DEFAULT_MAX_SHARD_SIZE",
    "TOKENIZER_FILES",
    "atomic_folder",
    "export_gptq",
    "export_hf",
    "gptq_tensors",
    "hf_tensors",
    "load_gptq",
    "parse_size",
    "quantization_config_dict",
    "write_json",
    "write_safetensors_folder",
    "write_tokenizer",
]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # bytes; transformers' save_pretrained default ("5GB")
# Files a Hugging Face tokenizer folder may hold; copied verbatim when the tokenizer is given as a path.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32")


class CheckpointError(ValueError):
    """A checkpoint cannot be written (or read) as asked; the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# Shared writing helpers
# ---------------------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (decimal/binary units)."""
    if isinstance(size, (int, np.integer)):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot parse size {size!r}; use an integer number of bytes or e.g. '5GB', '500MB'")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * factor)
    if value <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with a trailing newline (Hugging Face style)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out_dir`` only if the block completes.

    The temporary directory is a hidden sibling (same filesystem, so the final ``rename`` is atomic).
    On an exception it is removed and ``out_dir`` is left untouched. An existing ``out_dir`` is an
    error unless ``overwrite``; then it is replaced (moved aside, new folder renamed in, old removed).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output folder {out_dir} already exists; choose another path or pass overwrite=True "
                              "(--overwrite on the command line)")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        for name in os.listdir(tmp):
            _fsync_file(tmp / name)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        with contextlib.suppress(OSError):
            fd = os.open(out_dir.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors_folder(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                             max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                             metadata: Mapping[str, str] | None = None,
                             base_name: str = "model") -> list[str]:
    """Write ``tensors`` as ``<base_name>.safetensors``, or as shards plus ``<base_name>.safetensors.index.json``.

    Tensors are placed in the given order; a shard is closed when the next tensor would push it past
    ``max_shard_size`` bytes (a single larger tensor gets a shard of its own). Every file carries the
    safetensors header metadata ``{"format": "pt", **metadata}`` (accelerate requires ``format``).
    Returns the file names written.
    """
    from jgptq.models.hf import write_safetensors

    folder = Path(folder)
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if len(shards) == 1:
        fname = f"{base_name}.safetensors"
        write_safetensors(folder / fname, shards[0], metadata=meta)
        return [fname]
    n = len(shards)
    names = [f"{base_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        write_safetensors(folder / fname, shard, metadata=meta)
        weight_map.update({k: fname for k in shard})
    index = f"{base_name}.safetensors.index.json"
    write_json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [index]


def write_tokenizer(folder: str | os.PathLike, tokenizer: Any) -> list[str]:
    """Write tokenizer files into ``folder``; returns the file names written.

    ``tokenizer`` may be a transformers tokenizer (anything with ``save_pretrained``), a
    ``tokenizers.Tokenizer`` (saved as ``tokenizer.json``), or a path to a folder (its tokenizer files,
    :data:`TOKENIZER_FILES`, are copied) or to a ``tokenizer.json`` file.
    """
    folder = Path(folder)
    before = set(os.listdir(folder))
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if src.is_file():
            shutil.copyfile(src, folder / "tokenizer.json")
        elif src.is_dir():
            found = [n for n in TOKENIZER_FILES if (src / n).is_file()]
            if not found:
                raise CheckpointError(f"tokenizer folder {src} holds none of {list(TOKENIZER_FILES)}")
            for n in found:
                shutil.copyfile(src / n, folder / n)
        else:
            raise CheckpointError(f"tokenizer path {src} does not exist")
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    elif hasattr(tokenizer, "to_str") and hasattr(tokenizer, "save"):  # tokenizers.Tokenizer
        tokenizer.save(str(folder / "tokenizer.json"))
    else:
        raise CheckpointError(f"cannot save a tokenizer of type {type(tokenizer).__name__}; pass a transformers "
                              "tokenizer, a tokenizers.Tokenizer, or a path to tokenizer files")
    return sorted(set(os.listdir(folder)) - before)


# ---------------------------------------------------------------------------------------------------
# Params pytree -> Hugging Face tensors
# ---------------------------------------------------------------------------------------------------


def _is_quantized_lin(node: Any) -> bool:
    return isinstance(node, Mapping) and "qweight" in node


def _finite(name: str, arr: np.ndarray) -> None:
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            bad = int(np.size(a) - np.isfinite(a).sum())
            raise CheckpointError(f"{name} holds {bad} NaN/Inf value(s); refusing to write a broken checkpoint "
                                  "(check the quantization report for the layer that diverged)")


def _cast_float(name: str, arr: Any, dtype: str | None) -> np.ndarray:
    a = np.asarray(arr)
    _finite(name, a)
    if dtype is None:
        return np.ascontiguousarray(a)
    if dtype == "float16":
        big = float(np.max(np.abs(a.astype(np.float32)))) if a.size else 0.0
        if big > 65504.0:
            raise CheckpointError(f"{name} has |value| up to {big:g}, beyond float16's 65504; export with "
                                  "dtype='bfloat16' or 'float32'")
    import ml_dtypes

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return np.ascontiguousarray(a.astype(target))


def _lin_bits(name: str, lin: Mapping[str, Any]) -> int:
    from jgptq import pack

    qweight = np.asarray(lin["qweight"])
    if qweight.dtype != np.int32:
        raise CheckpointError(f"{name}.qweight has dtype {qweight.dtype}, expected int32 (GPTQ row packing)")
    try:
        return pack.bits_of({"qweight": qweight, "g_idx": np.asarray(lin["g_idx"])})
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None


def gptq_tensors(name: str, lin: Mapping[str, Any], *, checkpoint_format: str, bits: int, group_size: int,
                 sym: bool, desc_act: bool) -> dict[str, np.ndarray]:
    """One quantized LIN dict -> its checkpoint tensors ``{name.qweight, .qzeros, .scales, .g_idx}``.

    ``lin`` is jgptq's quantized linear (``qweight`` int32 ``[in*b/32, out]``, ``scales`` ``[G, out]``,
    ``zeros`` uint8 true zeros ``[G, out]``, ``g_idx`` int32 ``[in]``; a bias is written by the caller).
    Validates shapes, the group layout against ``group_size``/``desc_act``, sym zeros, and that v1 can
    represent every zero; raises :class:`CheckpointError` naming the module otherwise.
    """
    from jgptq import pack

    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    missing = [k for k in ("qweight", "scales", "zeros", "g_idx") if k not in lin]
    if missing:
        raise CheckpointError(f"{name}: quantized linear lacks {missing}; expected the LIN dict of DESIGN.md")
    if _lin_bits(name, lin) != bits:
        raise CheckpointError(f"{name} holds {_lin_bits(name, lin)}-bit codes but the quantization config says "
                              f"{bits} bits for it; pass the GPTQConfig (and dynamic rules) used to quantize")
    qweight = np.asarray(lin["qweight"])
    g_idx = np.asarray(lin["g_idx"])
    scales = np.asarray(lin["scales"])
    zeros = np.asarray(lin["zeros"])
    n_in, n_out = g_idx.shape[0], qweight.shape[1]
    gs = n_in if group_size == -1 else group_size
    n_groups = -(-n_in // gs)
    if g_idx.dtype.kind not in "iu":
        raise CheckpointError(f"{name}.g_idx has dtype {g_idx.dtype}, expected int32")
    if scales.shape != (n_groups, n_out) or zeros.shape != (n_groups, n_out):
        raise CheckpointError(f"{name}: scales {scales.shape} / zeros {zeros.shape} do not match "
                              f"[G={n_groups}, out={n_out}] for in={n_in}, group_size={group_size}")
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise CheckpointError(f"{name}.g_idx spans [{g_idx.min()}, {g_idx.max()}], outside [0, {n_groups})")
    counts = np.bincount(g_idx, minlength=n_groups)
    trivial = np.array_equal(g_idx, np.arange(n_in) // gs)
    if not trivial and (not desc_act or np.any(counts > gs)):
        raise CheckpointError(
            f"{name}.g_idx is not arange(in) // {gs} " + ("but desc_act=False: readers such as vLLM drop g_idx "
            "when desc_act is False, so export with desc_act=True" if not desc_act else
            f"and puts up to {counts.max()} channels in one group of size {gs}"))
    maxq = (1 << bits) - 1
    if zeros.size and int(zeros.max()) > maxq:
        raise CheckpointError(f"{name}: zero points up to {int(zeros.max())} exceed the {bits}-bit range [0, {maxq}]")
    if sym and not np.all(zeros == (1 << (bits - 1))):
        raise CheckpointError(f"{name}: sym=True requires every zero point = {1 << (bits - 1)} (Marlin-style readers "
                              f"ignore qzeros for sym checkpoints) but zeros span [{zeros.min()}, {zeros.max()}]; "
                              "export with sym=False")
    if n_out % 32 if bits == 3 else n_out % (32 // bits):
        raise CheckpointError(f"{name}: out_features={n_out} cannot be packed into {bits}-bit qzeros (needs a multiple "
                              f"of {32 if bits == 3 else 32 // bits})")
    if checkpoint_format == "gptq":
        if zeros.size and int(zeros.min()) == 0:
            raise CheckpointError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1); "
                                  "write checkpoint_format='gptq_v2' (or 'auto')")
        stored = zeros.astype(np.int64) - 1
    else:
        stored = zeros.astype(np.int64)
    scales = _cast_float(f"{name}.scales", scales, "float16")
    if np.any(scales.astype(np.float32) == 0):
        raise CheckpointError(f"{name}.scales has zeros; scales must be positive finite float16 values")
    out = {
        f"{name}.qweight": np.ascontiguousarray(qweight),
        f"{name}.qzeros": np.ascontiguousarray(np.asarray(pack.pack_cols(stored.astype(np.uint8), bits),
                                                          dtype=np.int32)),
        f"{name}.scales": scales,
        f"{name}.g_idx": np.ascontiguousarray(g_idx.astype(np.int32)),
    }
    return out


def _lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def hf_tensors(config: Any, params: Mapping[str, Any], *, float_dtype: str | None = "float16",
               quant: Callable[[str], Mapping[str, Any] | None] | None = None) -> dict[str, np.ndarray]:
    """The params pytree (DESIGN.md) -> Hugging Face state-dict names and NumPy arrays.

    Names and shapes come from the model config (``jgptq.models.hf.hf_to_params_names``): a float LIN
    ``kernel [in, out]`` becomes ``.weight [out, in]``; a quantized LIN becomes its GPTQ tensors
    (``quant(hf_module_name)`` gives that module's ``checkpoint_format``, ``bits``, ``group_size``, ``sym``,
    ``desc_act``, or None when it must stay float; required when the params hold quantized linears). ``float_dtype=None`` keeps each array's dtype. Raises
    :class:`CheckpointError` for a missing, misshaped or non-finite tensor.
    """
    from jgptq.models.hf import hf_to_params_names

    if float_dtype is not None and float_dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"dtype must be one of {_FLOAT_DTYPES} or None, got {float_dtype!r}")
    out: dict[str, np.ndarray] = {}
    for name, (path, shape, transpose) in hf_to_params_names(config).items():
        where = ".".join(map(str, path))
        if path[-1] == "kernel":
            lin = _lookup(params, path[:-1])
            prefix = name.rsplit(".", 1)[0]
            settings = quant(prefix) if quant is not None else None
            if _is_quantized_lin(lin):
                if quant is None:
                    raise CheckpointError(f"params {where[:-7]} is quantized; write GPTQ checkpoints with export_gptq")
                if settings is None:
                    raise CheckpointError(f"params {where[:-7]} is quantized but the dynamic rules leave {prefix} "
                                          "in float; pass the rules used to quantize")
                out.update(gptq_tensors(prefix, lin, **settings))
                if (int(np.asarray(lin["g_idx"]).shape[0]), int(np.asarray(lin["qweight"]).shape[1])) != shape[::-1]:
                    raise CheckpointError(f"params {where[:-7]} is a [{np.asarray(lin['g_idx']).shape[0]}, "
                                          f"{np.asarray(lin['qweight']).shape[1]}] (in, out) linear, expected "
                                          f"{list(shape[::-1])} from the config")
                continue
            if settings is not None and path[0] == "layers":
                raise CheckpointError(f"params {where[:-7]} is float but the quantization config quantizes {prefix}: "
                                      "readers would look for its qweight. Pass the dynamic rules that skipped it "
                                      "(GPTQModel style, e.g. {'-:.*down_proj': {}})")
        value = _lookup(params, path)
        if value is None:
            raise CheckpointError(f"params are missing {where} (written as {name})")
        arr = np.asarray(value)
        arr = arr.T if transpose else arr
        if arr.shape != shape:
            raise CheckpointError(f"params {where} gives {name} of shape {arr.shape}, expected {shape} from the config")
        out[name] = _cast_float(name, arr, float_dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------


def _config_get(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def quantization_config_dict(quant_config: Any, *, checkpoint_format: str, lm_head: bool = False,
                             report: Any = None, dynamic: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` / ``quantize_config.json`` dict for a jgptq ``GPTQConfig`` (or mapping).

    Carries the keys every reader needs (``quant_method``, ``bits``, ``group_size``, ``desc_act``,
    ``sym``, ``checkpoint_format`` and GPTQModel's alias ``format``), AutoGPTQ's classic keys, and
    ``meta.quantizer = ["jgptq:<version>"]``.
    """
    from jgptq import __version__

    bits = int(_config_get(quant_config, "bits", 4))
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"bits={bits} cannot be written as GPTQ; supported: {SUPPORTED_BITS}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    meta: dict[str, Any] = {
        "quantizer": [f"jgptq:{__version__}"],
        "uri": "https://github.com/jgptq/jgptq",
        "damp_percent": float(_config_get(quant_config, "damp_percent", 0.01)),
        "static_groups": bool(_config_get(quant_config, "static_groups", False)),
        "true_sequential": bool(_config_get(quant_config, "true_sequential", True)),
    }
    if report is not None:
        summary = _report_summary(report)
        if summary:
            meta["jgptq_report"] = summary
    d = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": int(_config_get(quant_config, "group_size", 128)),
        "desc_act": bool(_config_get(quant_config, "desc_act", False)),
        "sym": bool(_config_get(quant_config, "sym", True)),
        "static_groups": bool(_config_get(quant_config, "static_groups", False)),
        "true_sequential": bool(_config_get(quant_config, "true_sequential", True)),
        "damp_percent": float(_config_get(quant_config, "damp_percent", 0.01)),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": bool(lm_head),
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "meta": meta,
    }
    if dynamic:
        d["dynamic"] = {str(k): dict(v or {}) for k, v in dynamic.items()}
    return d


def _report_summary(report: Any) -> dict[str, Any]:
    """A small JSON-able summary of a driver report (or a mapping/dataclass); unknown shapes give {}."""
    if hasattr(report, "summary") and callable(report.summary):
        report = report.summary()
    elif hasattr(report, "to_dict") and callable(report.to_dict):
        report = report.to_dict()
    elif dataclasses.is_dataclass(report) and not isinstance(report, type):
        report = dataclasses.asdict(report)
    if not isinstance(report, Mapping):
        return {}
    try:
        return json.loads(json.dumps(report, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    except (TypeError, ValueError):
        return {}


def _llama_config(config: Any) -> Any:
    from jgptq.models.config import ConfigError, LlamaConfig

    if isinstance(config, LlamaConfig):
        return config
    if isinstance(config, Mapping):
        try:
            return LlamaConfig.from_hf({k: v for k, v in config.items() if k != "quantization_config"})
        except ConfigError as e:
            raise CheckpointError(f"the model config cannot be exported: {e}") from e
    raise CheckpointError(f"config must be a jgptq.models LlamaConfig or a Hugging Face config dict, got "
                          f"{type(config).__name__}")


def _generation_config(config: Any, generation_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    hf = config.to_hf()
    out = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    if generation_config:
        out.update(generation_config)
    return out or None


def _quantized_lins(tree: Any, prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(dotted params path, LIN)`` for every quantized linear of a params tree."""
    if _is_quantized_lin(tree):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, child in tree.items():
            yield from _quantized_lins(child, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, child in enumerate(tree):
            yield from _quantized_lins(child, f"{prefix}.{i}")


def _gptq_config(quant_config: Any) -> Any:
    from jgptq.config import GPTQConfig

    if isinstance(quant_config, GPTQConfig):
        return quant_config
    if isinstance(quant_config, Mapping):
        try:
            return GPTQConfig.from_dict(quant_config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"quant_config is not a valid GPTQ config: {e}") from e
    raise CheckpointError(f"quant_config must be a jgptq.GPTQConfig or a dict, got {type(quant_config).__name__}")


def _choose_format(lins: list[tuple[str, Mapping[str, Any]]], checkpoint_format: str) -> str:
    if checkpoint_format in CHECKPOINT_FORMATS:
        return checkpoint_format
    if checkpoint_format != "auto":
        raise CheckpointError(f"checkpoint_format must be 'auto' or one of {CHECKPOINT_FORMATS}, got "
                              f"{checkpoint_format!r}")
    for _, lin in lins:
        zeros = np.asarray(lin["zeros"])
        if zeros.size and int(zeros.min()) == 0:
            return "gptq_v2"
    return "gptq"


# ---------------------------------------------------------------------------------------------------
# Public exports
# ---------------------------------------------------------------------------------------------------


def export_gptq(out_dir: str | os.PathLike, config: Any, params: Mapping[str, Any], quant_config: Any, *,
                tokenizer: Any = None, report: Any = None, checkpoint_format: str = "auto",
                dtype: str = "float16", generation_config: Mapping[str, Any] | None = None,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                dynamic: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write a GPTQ checkpoint folder that transformers / optimum / GPTQModel / vLLM load unchanged.

    Args:
      out_dir: folder to create (atomically; must not exist unless ``overwrite``).
      config: the model's ``LlamaConfig`` (or a Hugging Face config dict, converted strictly).
      params: the params pytree of DESIGN.md whose decoder linears are quantized LIN dicts (as returned
        by ``jgptq.quantize``); a float LIN stays float (``.weight``).
      quant_config: the ``GPTQConfig`` used (``bits``, ``group_size``, ``sym``, ``desc_act``, ...); every
        quantized linear is checked against it.
      tokenizer: optional tokenizer to save alongside (see :func:`write_tokenizer`).
      report: optional driver report; its summary goes into ``quantization_config.meta.jgptq_report``.
      checkpoint_format: ``"gptq"`` (v1, zero - 1 stored), ``"gptq_v2"`` (true zeros) or ``"auto"``
        (v1 when every zero is >= 1, always the case for sym; else v2).
      dtype: storage dtype of the float tensors (embeddings, norms, float lm_head, biases):
        ``"float16"`` (the ecosystem default), ``"bfloat16"`` or ``"float32"``. Scales are always fp16.
      generation_config: extra ``generation_config.json`` fields (bos/eos/pad ids come from ``config``).
      max_shard_size: shard the weights above this many bytes (int or e.g. ``"2GB"``).
      overwrite: replace an existing ``out_dir``.
      dynamic: the GPTQModel-style per-module rules used to quantize (``jgptq.quantize(dynamic=...)``;
        ``"-:regex"`` = left in float, ``"+:regex": {"bits": 8}`` = overrides). Written into the configs
        (GPTQModel and vLLM honour it) and used to check each module.

    Returns:
      The folder path.

    Raises:
      CheckpointError: nothing quantized, a module whose bit width or float/quantized state disagrees
        with ``quant_config``/``dynamic``, a linear that disagrees with
        ``quant_config`` (group layout, sym zeros), zero points v1 cannot store, NaN/Inf, fp16 overflow,
        or an existing ``out_dir``.
    """
    from jgptq import __version__

    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}")
    config = _llama_config(config)
    lins = list(_quantized_lins(params))
    if not lins:
        raise CheckpointError("params hold no quantized linear (no 'qweight'); use export_hf for float models")
    qc = _gptq_config(quant_config)
    fmt = _choose_format(lins, checkpoint_format)
    lm_head_q = _is_quantized_lin(params.get("lm_head"))

    def settings(module: str) -> dict[str, Any] | None:
        from jgptq.driver import resolve_dynamic

        if module == "lm_head" and not lm_head_q:
            return None
        mc = resolve_dynamic(module, qc, dynamic) if dynamic else qc
        if mc is None:
            return None
        return {"checkpoint_format": fmt, "bits": mc.bits, "group_size": mc.group_size, "sym": mc.sym,
                "desc_act": mc.desc_act}

    bits = qc.bits
    group_size, desc_act = qc.group_size, qc.desc_act
    qdict = quantization_config_dict(qc, checkpoint_format=fmt, lm_head=lm_head_q, report=report, dynamic=dynamic)
    tensors = hf_tensors(config, params, float_dtype=dtype, quant=settings)
    ragged = sorted({int(np.asarray(lin["g_idx"]).shape[0]) for _, lin in lins
                     if qc.group_size != -1 and np.asarray(lin["g_idx"]).shape[0] % qc.group_size})
    if ragged:
        warnings.warn(f"in_features {ragged} are not multiples of group_size={qc.group_size}: the last group is "
                      "shorter. transformers/GPTQModel's torch kernels read this, but vLLM and GPTQModel's "
                      "Marlin/AVX512 kernels refuse it; choose a group size that divides every layer's input "
                      "width for those engines", stacklevel=2)
    hf_config = config.to_hf()
    hf_config.update(torch_dtype=dtype, dtype=dtype, quantization_config=qdict)
    st_meta = {"quantizer": f"jgptq:{__version__}", "gptq_bits": str(bits), "gptq_group_size": str(group_size),
               "gptq_desc_act": str(desc_act), "gptq_checkpoint_format": fmt, "gptq_quant_method": "gptq"}
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_folder(tmp, tensors, max_shard_size=max_shard_size, metadata=st_meta)
        write_json(tmp / "quantize_config.json", qdict)
        gen = _generation_config(config, generation_config)
        if gen is not None:
            write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer)
        write_json(tmp / "config.json", hf_config)
    return Path(out_dir)


def export_hf(out_dir: str | os.PathLike, config: Any, params: Mapping[str, Any], *, tokenizer: Any = None,
              dtype: str | None = None, generation_config: Mapping[str, Any] | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write a float params pytree as a Hugging Face ``save_pretrained``-style safetensors folder.

    ``dtype`` = ``"float16"``/``"bfloat16"``/``"float32"``, or ``None`` to keep the arrays' dtype (that
    of the embedding table; an exact round trip). The folder holds ``config.json``,
    ``model.safetensors`` (sharded above ``max_shard_size``), tokenizer files and
    ``generation_config.json`` where known; it is written atomically.

    Raises:
      CheckpointError: quantized linears (use :func:`export_gptq`), a missing or misshaped tensor,
        NaN/Inf, fp16 overflow, or an existing ``out_dir``.
    """
    config = _llama_config(config)
    if any(True for _ in _quantized_lins(params)):
        raise CheckpointError("params hold quantized linears; write them with export_gptq (or dequantize first)")
    if dtype is None:
        emb = _lookup(params, ("embed_tokens", "embedding"))
        dtype = str(np.asarray(emb).dtype) if emb is not None else "float32"
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"dtype must be one of {_FLOAT_DTYPES} or None, got {dtype!r}")
    tensors = hf_tensors(config, params, float_dtype=dtype)
    hf_config = config.to_hf()
    hf_config.update(torch_dtype=dtype, dtype=dtype)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_folder(tmp, tensors, max_shard_size=max_shard_size)
        gen = _generation_config(config, generation_config)
        if gen is not None:
            write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer)
        write_json(tmp / "config.json", hf_config)
    return Path(out_dir)


def load_gptq(path: str | os.PathLike, **kwargs: Any):
    """Load a GPTQ checkpoint folder; see :func:`jgptq.models.gptq_folder.load_gptq_folder`.

    Returns ``(LlamaConfig, params, tokenizer_or_None, GPTQInfo)``.
    """
    from jgptq.models.gptq_folder import load_gptq_folder

    return load_gptq_folder(path, **kwargs)
