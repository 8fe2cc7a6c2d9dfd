"""Hugging Face folders of float Llama-family models: read and write, without PyTorch.

A folder holds ``config.json`` and ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Safetensors files are read here directly (an 8-byte header
length, a JSON header, raw little-endian tensor bytes) through ``numpy.memmap``, so tensors stay on
the host and are only read when converted; bf16 comes back as ``ml_dtypes.bfloat16``. Every
problem (missing tensor, wrong shape, truncated file) is reported with the tensor and file name.

Hugging Face stores ``nn.Linear.weight`` as ``[out, in]``; params kernels are ``[in, out]``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from jgptq.models.config import ConfigError, LlamaConfig

__all__ = [
    "SafetensorsFile", "SafetensorsError", "load_hf", "load_hf_params", "save_hf", "write_safetensors",
    "open_checkpoint", "resolve_dtype", "hf_to_params_names", "load_tokenizer",
]


class SafetensorsError(ValueError):
    """A safetensors file or checkpoint folder that cannot be read as a model."""


_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

_DTYPE_ALIASES = {
    "fp32": np.float32, "float32": np.float32, "f32": np.float32,
    "bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16,
    "fp16": np.float16, "float16": np.float16, "f16": np.float16,
}


def resolve_dtype(dtype: Any) -> np.dtype:
    """A numpy float dtype from ``"fp32"``/``"bf16"``/``"fp16"`` (or their long names) or a dtype."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_ALIASES)}")
        return np.dtype(_DTYPE_ALIASES[dtype.lower()])
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        raise ValueError(f"model dtype must be float32, bfloat16 or float16, got {dt}")
    return dt


class SafetensorsFile:
    """Lazy reader of one ``.safetensors`` file: ``f[name]`` is a read-only memmapped ndarray."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: file is {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise SafetensorsError(
                        f"{self.path}: header claims {n} bytes but the file has {size - 8} after the length "
                        "field (truncated or not a safetensors file)")
                raw = f.read(n)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e}); is this a safetensors file?") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        data_len = size - self._start
        for name, e in header.items():
            try:
                dt = np.dtype(_ST_DTYPES[e["dtype"]])
            except KeyError:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}") from None
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} {e['dtype']} "
                    f"({int(np.prod(shape, dtype=np.int64)) * dt.itemsize} expected)")
            if end > data_len:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ends at byte {end} of the data section but the file has only "
                    f"{data_len} data bytes: the file is truncated (re-download or re-save it)")
            self._entries[name] = (dt, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def __getitem__(self, name: str) -> np.ndarray:
        dt, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self._start + begin, shape=shape)


class _Checkpoint:
    """All tensors of a folder (single file or sharded), name -> (file, array on demand)."""

    def __init__(self, folder: Path, files: dict[str, SafetensorsFile], where: dict[str, str]):
        self.folder, self._files, self._where = folder, files, where

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return self._where[name]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[self._where[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)


def open_checkpoint(folder: str | os.PathLike, base_names: tuple[str, ...] = ("model",)) -> _Checkpoint:
    """Open the safetensors weights of a folder: ``<base>.safetensors`` or ``<base>.safetensors.index.json``.

    Raises:
      SafetensorsError: no weights file, a shard listed in the index that is missing, a tensor the
        index places in a file that does not hold it, or any unreadable file.
    """
    folder = Path(folder)
    for base in base_names:
        index = folder / f"{base}.safetensors.index.json"
        single = folder / f"{base}.safetensors"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
            files: dict[str, SafetensorsFile] = {}
            for fname in sorted(set(weight_map.values())):
                if not (folder / fname).exists():
                    users = sorted(k for k, v in weight_map.items() if v == fname)[:3]
                    raise SafetensorsError(f"{folder / fname}: shard listed in {index.name} (for {users}...) is missing")
                files[fname] = SafetensorsFile(folder / fname)
            for name, fname in weight_map.items():
                if name not in files[fname]:
                    raise SafetensorsError(f"{folder / fname}: {index.name} says it holds tensor {name!r}, but it does not")
            return _Checkpoint(folder, files, dict(weight_map))
        if single.exists():
            f = SafetensorsFile(single)
            return _Checkpoint(folder, {single.name: f}, {k: single.name for k in f.keys()})
    raise SafetensorsError(
        f"{folder}: no weights found (looked for {', '.join(b + '.safetensors[.index.json]' for b in base_names)}); "
        "PyTorch .bin checkpoints are not supported, convert them to safetensors first")


def hf_to_params_names(config: LlamaConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...], bool]]:
    """Map each expected HF tensor name to ``(params path, HF shape, transpose)``.

    The params path is a tuple of keys/indices into the params tree (DESIGN.md).
    """
    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    m: dict[str, tuple[tuple[Any, ...], tuple[int, ...], bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), (v, d), False),
        "model.norm.weight": (("norm", "scale"), (d,), False),
    }
    if not c.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), (v, d), True)
    lins = {
        "self_attn.q_proj": (c.q_size, d, c.qkv_bias), "self_attn.k_proj": (c.kv_size, d, c.qkv_bias),
        "self_attn.v_proj": (c.kv_size, d, c.qkv_bias), "self_attn.o_proj": (d, c.q_size, c.o_bias),
        "mlp.gate_proj": (f, d, c.mlp_bias), "mlp.up_proj": (f, d, c.mlp_bias), "mlp.down_proj": (d, f, c.mlp_bias),
    }
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            m[pre + norm + ".weight"] = (("layers", i, norm, "scale"), (d,), False)
        for name, (out, inp, bias) in lins.items():
            mod, proj = name.split(".")
            m[pre + name + ".weight"] = (("layers", i, mod, proj, "kernel"), (out, inp), True)
            if bias:
                m[pre + name + ".bias"] = (("layers", i, mod, proj, "bias"), (out,), False)
    return m


def _empty_params(config: LlamaConfig) -> dict[str, Any]:
    p: dict[str, Any] = {"embed_tokens": {}, "norm": {}, "layers": [
        {"input_layernorm": {}, "post_attention_layernorm": {},
         "self_attn": {k: {} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
         "mlp": {k: {} for k in ("gate_proj", "up_proj", "down_proj")}}
        for _ in range(config.num_layers)]}
    if not config.tie_word_embeddings:
        p["lm_head"] = {}
    return p


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


# tensors some checkpoints carry that are not weights of the model
_SKIPPABLE_SUFFIXES = (".rotary_emb.inv_freq",)


def load_hf_params(folder: str | os.PathLike, config: LlamaConfig, dtype: Any = "float32") -> dict[str, Any]:
    """Read the float params tree (host numpy arrays in ``dtype``) of a HF folder.

    Raises:
      SafetensorsError: a missing or unexpected tensor, a wrong shape, NaN/Inf values or a bad file,
        naming the tensor and the file.
    """
    dt = resolve_dtype(dtype)
    ckpt = open_checkpoint(folder)
    expected = hf_to_params_names(config)
    missing = [n for n in expected if n not in ckpt]
    if missing:
        raise SafetensorsError(
            f"{Path(folder)}: checkpoint is missing {len(missing)} tensor(s) the config needs, e.g. "
            f"{missing[:5]} (config: {config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings})")
    extra = [n for n in ckpt.keys() if n not in expected and not n.endswith(_SKIPPABLE_SUFFIXES)
             and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if extra:
        raise SafetensorsError(
            f"{Path(folder)}: checkpoint has tensor(s) this config does not use, e.g. {extra[:5]} in "
            f"{ckpt.file_of(extra[0])}; the config and weights disagree (quantized checkpoints load "
            "through jgptq.models.load)")
    params = _empty_params(config)
    for name, (path, shape, transpose) in expected.items():
        if ckpt.shape(name) != shape:
            raise SafetensorsError(
                f"{ckpt.folder / ckpt.file_of(name)}: tensor {name!r} has shape {ckpt.shape(name)}, "
                f"expected {shape} from config.json")
        x = ckpt[name]
        if not np.issubdtype(x.dtype, np.floating) and x.dtype not in (np.dtype(ml_dtypes.bfloat16),):
            raise SafetensorsError(f"{ckpt.folder / ckpt.file_of(name)}: tensor {name!r} has dtype {x.dtype}, "
                                   "expected a float type")
        x = np.asarray(x.T if transpose else x).astype(dt)
        if not np.isfinite(x).all():
            raise SafetensorsError(f"{ckpt.folder / ckpt.file_of(name)}: tensor {name!r} contains NaN or Inf")
        _set(params, path, np.ascontiguousarray(x))
    return params


def load_tokenizer(folder: str | os.PathLike) -> Any | None:
    """``transformers.AutoTokenizer`` from the folder, or None when it has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_hf(folder: str | os.PathLike, dtype: Any = "float32", *,
            tokenizer: bool = True) -> tuple[LlamaConfig, dict[str, Any], Any | None]:
    """Load a Hugging Face float folder: ``(LlamaConfig, params of host numpy arrays, tokenizer or None)``."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    config = LlamaConfig.from_json_file(cfg_path)
    params = load_hf_params(folder, config, dtype)
    return config, params, (load_tokenizer(folder) if tokenizer else None)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file (C-order little-endian data, header padded to 8 bytes)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = {}
    for name, x in tensors.items():
        x = np.ascontiguousarray(np.asarray(x))
        if x.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {x.dtype} to safetensors")
        arrays[name] = x
        header[name] = {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for x in arrays.values():
            f.write(x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)


def save_hf(folder: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any], dtype: Any = "bfloat16",
            *, max_shard_size: int | None = None, tokenizer: Any | None = None) -> Path:
    """Write a float params tree as a Hugging Face folder transformers can load.

    Args:
      dtype: storage dtype of the float tensors.
      max_shard_size: bytes per shard; when the weights are larger, writes
        ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.
      tokenizer: optional tokenizer to ``save_pretrained`` into the folder.
    Raises:
      ValueError: the params hold quantized linears (use jgptq's GPTQ export for those).
    """
    dt = resolve_dtype(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, (path, shape, transpose) in hf_to_params_names(config).items():
        try:
            x = _get(params, path)
        except (KeyError, IndexError, TypeError):
            lin = _get(params, path[:-1]) if path[-1] == "kernel" else None
            if isinstance(lin, Mapping) and "qweight" in lin:
                raise ValueError(f"params {'.'.join(map(str, path[:-1]))} is quantized; save_hf writes float models "
                                 "only (use jgptq.export_gptq)") from None
            raise ValueError(f"params are missing {'.'.join(map(str, path))} (for {name})") from None
        x = np.asarray(x)
        x = (x.T if transpose else x).astype(dt)
        if x.shape != shape:
            raise ValueError(f"params {'.'.join(map(str, path))} gives {name} of shape {x.shape}, expected {shape}")
        tensors[name] = x
    hf_cfg = config.to_hf()
    hf_cfg["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(dt, "bfloat16")
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    total = sum(x.nbytes for x in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        write_safetensors(folder / "model.safetensors", tensors)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, x in tensors.items():
            if shards[-1] and size + x.nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][name] = x
            size += x.nbytes
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(folder / fname, shard)
            weight_map.update({k: fname for k in shard})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder

