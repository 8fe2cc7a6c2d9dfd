"""Load GPTQ checkpoint folders written by AutoGPTQ, GPTQModel, optimum/transformers, vLLM tooling or jgptq.

:func:`load_gptq_folder` reads a folder holding ``config.json`` and one or more safetensors files
(``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` + index, or AutoGPTQ's
``gptq_model-4bit-128g.safetensors``), with the quantization settings in ``quantize_config.json``,
``quant_config.json`` and/or ``config.json["quantization_config"]``. It returns the params pytree of
DESIGN.md (quantized linears as packed LIN dicts with *true* zero points), ready for
:class:`jgptq.models.llama.LlamaForCausalLM`.

Nothing is trusted blindly: every tensor's dtype and shape is checked against the model config,
``g_idx`` against the group count, float tensors for NaN/Inf, and zero points against the declared
convention. GPTQ v1 (``checkpoint_format`` ``"gptq"`` or absent) stores ``zero - 1`` and is decoded as
``(stored + 1) mod 2^bits`` like the AutoGPTQ/vLLM kernels; v2 (``"gptq_v2"``) stores the true zero.
A symmetric checkpoint must store ``2^(bits-1) - 1`` (v1) or ``2^(bits-1)`` (v2) everywhere; the
other value means the file is mislabelled (such files are published) and is reported as an error
that names the fix (``checkpoint_format=`` override). Anything else unreadable is a
:class:`GPTQFolderError` naming the file, the tensor, what was seen and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jgptq import pack
from jgptq.config import GPTQConfig, resolve_dynamic
from jgptq.models.config import ConfigError, LlamaConfig
from jgptq.models.hf import SafetensorsError, hf_to_params_names, load_tokenizer, open_checkpoint, resolve_dtype

__all__ = [
    "GPTQFolderError",
    "GPTQInfo",
    "QUANT_CONFIG_FILES",
    "find_weight_files",
    "module_config",
    "is_gptq_folder",
    "load_gptq_folder",
    "read_quant_config",
]

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
# Tensors some writers add that carry no weights (recomputed by every reader).
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_FORMATS = {"gptq": "gptq", "gptq_v2": "gptq_v2"}


class GPTQFolderError(ValueError):
    """A GPTQ folder that cannot be read correctly; the message names the file/tensor and the fix."""


@dataclasses.dataclass(frozen=True)
class GPTQInfo:
    """What a GPTQ folder declared and what the loader found.

    Attributes:
      quant_config: the settings as a :class:`jgptq.GPTQConfig` (``bits``, ``group_size``, ``sym``,
        ``desc_act``, ``static_groups``, ``damp_percent``, ``true_sequential``).
      checkpoint_format: the zero-point convention used to decode (``"gptq"`` = v1, ``"gptq_v2"``).
      declared_format: what the files declared (``None`` when absent, which means v1).
      quantizer: ``meta.quantizer`` entries (e.g. ``["gptqmodel:7.7.0"]``), empty if absent.
      lm_head_quantized: whether ``lm_head`` is a GPTQ linear.
      weight_files: the safetensors files read, in order.
      config_sources: which files provided the quantization config.
      warnings: things worth knowing that do not prevent a correct load.
      raw: the quantization config dict as read (``raw.get("dynamic")`` holds per-module rules).
    """

    quant_config: GPTQConfig
    checkpoint_format: str
    declared_format: str | None
    quantizer: tuple[str, ...]
    lm_head_quantized: bool
    weight_files: tuple[str, ...]
    config_sources: tuple[str, ...]
    warnings: tuple[str, ...]
    raw: Mapping[str, Any]

    @property
    def bits(self) -> int:
        return self.quant_config.bits

    @property
    def group_size(self) -> int:
        return self.quant_config.group_size

    @property
    def sym(self) -> bool:
        return self.quant_config.sym

    @property
    def desc_act(self) -> bool:
        return self.quant_config.desc_act


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GPTQFolderError(f"{path} is not valid JSON ({e}); the file is truncated or corrupt") from e


def is_gptq_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder whose config declares ``quant_method: gptq`` (in any config file)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        _, sources = read_quant_config(path)
    except GPTQFolderError:
        return True  # it claims to be one; loading it will explain what is wrong
    return bool(sources)


def read_quant_config(path: str | os.PathLike) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The quantization config dict of a folder and the files it came from.

    Looks in ``quantize_config.json``, ``quant_config.json`` (GPTQModel's order) and
    ``config.json["quantization_config"]``. When several exist, the keys that change how weights
    decode (``bits``, ``group_size``, ``sym``, format) must agree, else :class:`GPTQFolderError`.
    Returns ``({}, ())`` when none exists.
    """
    path = Path(path)
    found: list[tuple[str, dict[str, Any]]] = []
    for name in QUANT_CONFIG_FILES:
        if (path / name).is_file():
            d = _read_json(path / name)
            if not isinstance(d, dict):
                raise GPTQFolderError(f"{path / name} must hold a JSON object, got {type(d).__name__}")
            found.append((name, d))
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if q is not None:
            if not isinstance(q, dict):
                raise GPTQFolderError(f"{path / 'config.json'}: quantization_config must be an object")
            found.append(("config.json:quantization_config", q))
    if not found:
        return {}, ()

    def key_view(d: Mapping[str, Any]) -> dict[str, Any]:
        fmt = d.get("checkpoint_format", d.get("format"))
        return {"bits": d.get("bits", d.get("w_bit")), "group_size": d.get("group_size", d.get("q_group_size")),
                "sym": d.get("sym"), "format": fmt}

    base_name, base = found[0]
    for name, d in found[1:]:
        a, b = key_view(base), key_view(d)
        diff = {k: (a[k], b[k]) for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]}
        if diff:
            raise GPTQFolderError(
                f"{path}: {base_name} and {name} disagree on {diff}; the checkpoint's configs are inconsistent. "
                "Fix the file that does not match the tensors (or delete the stale one)")
    merged: dict[str, Any] = {}
    for _, d in reversed(found):  # earlier files (GPTQModel's priority) win
        merged.update(d)
    return merged, tuple(n for n, _ in found)


def _parse_quant_config(path: Path, q: Mapping[str, Any], override_format: str | None
                        ) -> tuple[GPTQConfig, str, str | None, tuple[str, ...], bool, list[str]]:
    notes: list[str] = []
    method = str(q.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise GPTQFolderError(f"{path}: quant_method={q.get('quant_method')!r}; this loader reads GPTQ checkpoints "
                              "('gptq') only")
    declared = q.get("checkpoint_format", q.get("format"))
    if q.get("is_marlin_format") or declared == "marlin":
        raise GPTQFolderError(f"{path}: Marlin-packed checkpoint (checkpoint_format='marlin'); its tensors are not "
                              "in the GPTQ layout. Convert it to 'gptq' with GPTQModel first")
    if declared is not None and declared not in _FORMATS:
        raise GPTQFolderError(f"{path}: checkpoint_format={declared!r} is not supported; readable: "
                              f"{sorted(_FORMATS)} (v1 'gptq', v2 'gptq_v2')")
    if q.get("pack_dtype", "int32") != "int32":
        raise GPTQFolderError(f"{path}: pack_dtype={q.get('pack_dtype')!r}; only int32-packed GPTQ checkpoints "
                              "are supported (the format vLLM/transformers read)")
    dynamic = q.get("dynamic") or None
    if dynamic is not None and not isinstance(dynamic, Mapping):
        raise GPTQFolderError(f"{path}: 'dynamic' must be an object of regex -> overrides, got {dynamic!r}")
    if "sym" not in q:
        notes.append("quantization config has no 'sym'; assuming sym=True (AutoGPTQ's default)")
    meta = q.get("meta") or {}
    quantizer = meta.get("quantizer", []) if isinstance(meta, Mapping) else []
    if isinstance(quantizer, str):
        quantizer = [quantizer]
    try:
        qc = GPTQConfig.from_dict({k: v for k, v in q.items() if k != "dynamic"})
        for pattern, overrides in (dynamic or {}).items():
            re.compile(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern)
            qc.replace(**dict(overrides or {}))
    except re.error as e:
        raise GPTQFolderError(f"{path}: a 'dynamic' rule is not a valid regex: {e}") from e
    except (ValueError, TypeError) as e:
        raise GPTQFolderError(f"{path}: the quantization config is not understood: {e}") from e
    fmt = override_format or _FORMATS.get(declared or "gptq")
    if override_format is not None and override_format not in _FORMATS:
        raise GPTQFolderError(f"checkpoint_format override must be one of {sorted(_FORMATS)}, got {override_format!r}")
    if override_format is not None and override_format != (declared or "gptq"):
        notes.append(f"zero points decoded as {override_format!r} (override) although the files declare "
                     f"{declared or 'gptq'!r}")
    return qc, fmt, declared, tuple(str(x) for x in quantizer), bool(q.get("lm_head", False)), notes


def module_config(name: str, qc: GPTQConfig, dynamic: Mapping[str, Any] | None) -> GPTQConfig | None:
    """The settings of module ``name`` (``model.layers.0.mlp.down_proj``) under GPTQModel ``dynamic``
    rules: :func:`jgptq.config.resolve_dynamic` (first matching rule wins; ``"-:regex"`` = not
    quantized, None)."""
    return resolve_dynamic(name, qc, dynamic)


def find_weight_files(path: str | os.PathLike, base_names: tuple[str, ...] = ()) -> str:
    """The base name of a folder's safetensors weights (``<base>.safetensors[.index.json]``).

    Tried in order: ``base_names`` (e.g. AutoGPTQ's ``model_file_base_name`` and its default
    ``gptq_model-{bits}bit-{group_size}g``), ``model``, then the only ``*.safetensors.index.json`` or the
    only ``*.safetensors`` of the folder. Raises :class:`GPTQFolderError` when none or several fit.
    """
    path = Path(path)
    for base in (*base_names, "model"):
        if (path / f"{base}.safetensors.index.json").is_file() or (path / f"{base}.safetensors").is_file():
            return base
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0].name[: -len(".safetensors.index.json")]
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0].stem
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (found PyTorch pickles {bins}; convert them to safetensors first: loading pickles runs code)"
                if bins else "")
        raise GPTQFolderError(f"{path}: no safetensors weights found{hint}")
    raise GPTQFolderError(f"{path}: several safetensors files {[f.name for f in files]} and no index saying which "
                          "belong to the model; add model.safetensors.index.json or remove the extra files")


def _float(name: str, arr: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise GPTQFolderError(f"tensor {name!r} has dtype {arr.dtype}, expected a float type")
    if tuple(arr.shape) != shape:
        raise GPTQFolderError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {shape} from config.json")
    a32 = arr.astype(np.float32)
    if not np.isfinite(a32).all():
        raise GPTQFolderError(f"tensor {name!r} holds {int((~np.isfinite(a32)).sum())} NaN/Inf values; the "
                              "checkpoint is broken")
    return np.array(arr, dtype=dtype)


def _quantized(name: str, t: Any, n_in: int, n_out: int, qc: GPTQConfig, fmt: str,
               stats: dict[str, int]) -> dict[str, np.ndarray]:
    bits, maxq = qc.bits, (1 << qc.bits) - 1
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        if f"{name}.{key}" not in t:
            raise GPTQFolderError(f"quantized linear {name!r} has no {key!r} tensor; a GPTQ checkpoint needs "
                                  "qweight, qzeros, scales and g_idx for every quantized linear")
    qweight, qzeros = t[f"{name}.qweight"], t[f"{name}.qzeros"]
    scales, g_idx = t[f"{name}.scales"], t[f"{name}.g_idx"]
    gs = n_in if qc.group_size == -1 else qc.group_size
    n_groups = -(-n_in // gs)
    if (n_in * bits) % 32:
        raise GPTQFolderError(f"{name}: in_features={n_in} cannot be {bits}-bit packed into int32 rows")
    checks = (("qweight", qweight, (n_in * bits // 32, n_out), ("int32",)),
              ("qzeros", qzeros, (n_groups, n_out * bits // 32), ("int32",)),
              ("scales", scales, (n_groups, n_out), ("float16", "bfloat16", "float32")),
              ("g_idx", g_idx, (n_in,), ("int32", "int64")))
    for key, arr, shape, dtypes in checks:
        if arr.dtype.name not in dtypes:
            raise GPTQFolderError(f"{name}.{key} has dtype {arr.dtype}, expected {' or '.join(dtypes)}")
        if tuple(arr.shape) != shape:
            raise GPTQFolderError(
                f"{name}.{key} has shape {tuple(arr.shape)}, expected {shape} for [in={n_in}, out={n_out}], "
                f"bits={bits}, group_size={qc.group_size}; the file does not match its config")
    if (n_out * bits) % 32:
        raise GPTQFolderError(f"{name}: out_features={n_out} cannot be {bits}-bit packed into int32 qzeros")
    g = g_idx.astype(np.int64)
    if g.min() < 0 or g.max() >= n_groups:
        raise GPTQFolderError(f"{name}.g_idx spans [{g.min()}, {g.max()}], outside [0, {n_groups}); the file is corrupt")
    if not np.array_equal(g, np.arange(n_in) // gs):
        stats["act_order"] += 1
        if not qc.desc_act:
            stats["act_order_undeclared"] += 1
    s32 = scales.astype(np.float32)
    if not np.isfinite(s32).all():
        raise GPTQFolderError(f"{name}.scales holds NaN/Inf values; the checkpoint is broken")
    scales16 = scales.astype(np.float16)
    if scales.dtype != np.float16 and not np.array_equal(scales16.astype(np.float32), s32):
        raise GPTQFolderError(f"{name}.scales ({scales.dtype}) are not exactly representable in float16")
    stored = np.asarray(pack.unpack_cols(qzeros, bits, n_out)).astype(np.int64)
    if qc.sym:
        mid = 1 << (bits - 1)
        expect = mid - 1 if fmt == "gptq" else mid
        if not np.all(stored == expect):
            other = mid if fmt == "gptq" else mid - 1
            if np.all(stored == other):
                right = "gptq_v2" if fmt == "gptq" else "gptq"
                raise GPTQFolderError(
                    f"{name}: the checkpoint is mislabelled: sym {bits}-bit zeros are stored as {other} everywhere, "
                    f"which is the {right!r} convention, but it is read as {fmt!r} (which stores {expect}). Decoding "
                    f"it as labelled would shift every weight by one step. If you trust the tensors, load with "
                    f"checkpoint_format={right!r}; better, fix 'checkpoint_format' in the folder's configs")
            vals = np.unique(stored)
            raise GPTQFolderError(
                f"{name}: sym=True but the stored zero points take the values {vals[:8].tolist()} instead of "
                f"{expect} everywhere; symmetric kernels ignore qzeros, so this file decodes differently in "
                "different engines. It is probably asymmetric: set sym=false in its configs")
    if fmt == "gptq":
        wrapped = int(np.sum(stored == maxq))
        if wrapped:
            stats["v1_wrapped"] += wrapped
        zeros = (stored + 1) & maxq
    else:
        zeros = stored
    return {"qweight": np.array(qweight), "scales": scales16, "zeros": zeros.astype(np.uint8),
            "g_idx": g_idx.astype(np.int32)}


def load_gptq_folder(path: str | os.PathLike, dtype: Any = None, *, tokenizer: bool = True,
                     checkpoint_format: str | None = None) -> tuple[LlamaConfig, dict[str, Any], Any, GPTQInfo]:
    """Load a GPTQ checkpoint folder as ``(LlamaConfig, params, tokenizer_or_None, GPTQInfo)``.

    Args:
      path: the folder (``config.json`` + safetensors + quantization config).
      dtype: dtype of the float arrays (embeddings, norms, float linears, biases); default float32.
        Packed tensors keep their types: ``qweight`` int32, ``scales`` float16, ``zeros`` uint8,
        ``g_idx`` int32.
      tokenizer: load the folder's tokenizer with ``transformers.AutoTokenizer`` when its files exist.
      checkpoint_format: force the zero-point convention (``"gptq"`` or ``"gptq_v2"``) for a file whose
        label is known to be wrong; default: what the folder declares (absent = ``"gptq"``).

    Returns:
      ``params`` as in DESIGN.md; ``GPTQInfo`` says what was declared and found.

    Raises:
      GPTQFolderError: missing/corrupt files, inconsistent configs, a tensor with the wrong dtype or
        shape, ``g_idx`` out of range, mislabelled or inconsistent zero points, NaN/Inf values.
    """
    path = Path(path)
    try:
        dtype = resolve_dtype("float32" if dtype is None else dtype)
    except ValueError as e:
        raise GPTQFolderError(str(e)) from None
    if not path.is_dir():
        raise GPTQFolderError(f"{path} is not a folder; a GPTQ checkpoint is a folder with config.json and "
                              "safetensors files")
    if not (path / "config.json").is_file():
        raise GPTQFolderError(f"{path} has no config.json (the model architecture); copy it from the original model")
    hf = _read_json(path / "config.json")
    q, sources = read_quant_config(path)
    if not sources:
        raise GPTQFolderError(f"{path} declares no quantization (no quantize_config.json and no "
                              "config.json quantization_config); load it as a float model")
    qc, fmt, declared, quantizer, lm_head_q, notes = _parse_quant_config(path, q, checkpoint_format)
    dynamic = q.get("dynamic") or None
    hf_model = {k: v for k, v in hf.items() if k != "quantization_config"}
    try:
        config = LlamaConfig.from_hf(hf_model)
    except ConfigError as e:
        raise GPTQFolderError(f"{path / 'config.json'}: {e}") from e
    bases = tuple(b for b in (q.get("model_file_base_name"), f"gptq_model-{qc.bits}bit-{qc.group_size}g") if b)
    base = find_weight_files(path, bases)
    try:
        t = open_checkpoint(path, (base,))
    except SafetensorsError as e:
        raise GPTQFolderError(f"{e}; the checkpoint is truncated or corrupt") from e
    tensor_names = set(t.keys())
    weight_files = tuple(sorted(set(t.file_of(k) for k in tensor_names)))
    used: set[str] = set()
    stats = {"act_order": 0, "act_order_undeclared": 0, "v1_wrapped": 0, "float_linears": 0}
    params: dict[str, Any] = {"layers": [{} for _ in range(config.num_layers)]}
    for name, (ppath, shape, transpose) in hf_to_params_names(config).items():
        node: Any = params
        for key in ppath[:-2]:
            node = node[key] if isinstance(key, int) else node.setdefault(key, {})
        node = node.setdefault(ppath[-2], {})
        prefix = name.rsplit(".", 1)[0]
        if ppath[-1] == "kernel" and f"{prefix}.qweight" in t:
            mc = module_config(prefix, qc, dynamic)
            if mc is None:
                raise GPTQFolderError(f"{path}: {prefix} is stored quantized but the 'dynamic' rules say it is not "
                                      "quantized; the config does not match the weights")
            node.update(_quantized(prefix, t, shape[1], shape[0], mc, fmt, stats))
            used.update(f"{prefix}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx"))
            continue
        if ppath[-1] == "kernel" and name not in t:
            raise GPTQFolderError(f"{path}: linear {prefix!r} has neither '.qweight' (GPTQ) nor '.weight' (float); "
                                  "the checkpoint is incomplete or for another architecture")
        if name not in t:
            raise GPTQFolderError(f"{path}: tensor {name!r} is missing (expected shape {shape}); the checkpoint "
                                  "is incomplete or for another architecture")
        used.add(name)
        value = _float(name, t[name], shape, dtype)
        if ppath[-1] == "kernel":
            value = np.ascontiguousarray(value.T)
            stats["float_linears"] += ppath[0] == "layers" and module_config(prefix, qc, dynamic) is not None
        node[ppath[-1]] = value
    if config.tie_word_embeddings and "lm_head.weight" in tensor_names:
        used.add("lm_head.weight")  # transformers ignores it too when the embeddings are tied
    layers = params["layers"]
    lm_head_found = isinstance(params.get("lm_head"), dict) and "qweight" in params["lm_head"]
    unused = sorted(k for k in tensor_names - used if not _IGNORABLE.search(k))
    if unused:
        raise GPTQFolderError(f"{path}: tensors this loader does not understand: {unused[:6]}"
                              f"{' ...' if len(unused) > 6 else ''}; refusing rather than dropping them")
    n_q = sum(1 for lp in layers for m in ("self_attn", "mlp") for lin in lp[m].values() if "qweight" in lin)
    if n_q == 0:
        raise GPTQFolderError(f"{path}: declares GPTQ quantization but holds no quantized linear (.qweight)")
    if lm_head_q != lm_head_found:
        notes.append(f"config says lm_head={lm_head_q} but lm_head is {'' if lm_head_found else 'not '}quantized "
                     "in the weights; the weights were used")
    if stats["act_order_undeclared"]:
        notes.append(f"{stats['act_order_undeclared']} linear(s) have a non-trivial g_idx although desc_act=False; "
                     "jgptq honours g_idx, but engines that drop g_idx when desc_act is False (vLLM's exllama path) "
                     "will decode them differently")
    if stats["v1_wrapped"]:
        notes.append(f"{stats['v1_wrapped']} v1 zero point(s) are stored as {(1 << qc.bits) - 1}, which decodes to 0 "
                     "(the v1 'zero - 1' wraparound); if the writer let the subtraction borrow across fields, the "
                     "neighbouring zeros are off by one as well — re-export as gptq_v2")
    if stats["float_linears"]:
        notes.append(f"{stats['float_linears']} decoder linear(s) are stored in float although no 'dynamic' "
                     "rule excludes them from quantization; engines may expect them quantized")
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)

    tok = None
    if tokenizer:
        try:
            tok = load_tokenizer(path)
        except Exception as e:  # noqa: BLE001 -- a broken tokenizer must not hide good weights
            notes.append(f"tokenizer files exist but could not be loaded ({type(e).__name__}: {e})")
            warnings.warn(f"{path}: {notes[-1]}", stacklevel=2)
    info = GPTQInfo(quant_config=qc, checkpoint_format=fmt, declared_format=declared, quantizer=quantizer,
                    lm_head_quantized=lm_head_found, weight_files=weight_files,
                    config_sources=sources, warnings=tuple(notes), raw=dict(q))
    return config, params, tok, info
