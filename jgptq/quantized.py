"""``QuantizedWeight``: the result of quantizing one linear layer, and its checkpoint forms.

Contract (DESIGN.md): a registered pytree whose array leaves are

| field    | dtype / shape       | meaning                                                        |
|----------|---------------------|----------------------------------------------------------------|
| `codes`  | uint8 `[in, out]`   | integer codes in `[0, 2^bits - 1]`, original input order       |
| `scales` | float16 `[G, out]`  | `G = ceil(in / gs)` (`gs = in` when `group_size == -1`)        |
| `zeros`  | uint8 `[G, out]`    | true zero points: `W = scales[g] * (codes - zeros[g])`         |
| `g_idx`  | int32 `[in]`        | group of each input channel (non-monotone with act-order)      |
| `loss`   | float32 `[]`        | layer loss as the reference reports it (NaN when unknown)      |
| `damp`   | float32 `[]`        | damping fraction actually used (NaN when unknown)              |

and whose static (hashable) fields are ``bits``, ``group_size`` and ``sym``.

Checkpoint forms:

- ``to_params()`` / ``from_params()``: the packed LIN dict the models consume
  (``qweight`` int32 ``[in*bits/32, out]`` GPTQ row packing, ``scales``, ``zeros`` uint8 unpacked,
  ``g_idx``), JAX arrays.
- ``to_gptq_tensors()`` / ``from_gptq_tensors()``: the tensors of a GPTQ checkpoint
  (``shared/reference/gptq.md`` §1.2-1.5) as NumPy arrays: ``qweight`` int32, ``qzeros`` int32
  packed along ``out``, ``scales`` float16, ``g_idx`` int32.  ``checkpoint_format="gptq"`` (v1)
  stores ``zero - 1``; ``"gptq_v2"`` stores the true zero.  v1 cannot represent a zero point of 0
  (it would underflow into the neighbouring field): the writer raises ``ValueError`` instead of
  corrupting the file -- write ``gptq_v2`` for asymmetric weights, or quantize with zeros kept >= 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jgptq import pack

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _num_groups(in_features: int, group_size: int) -> int:
    gs = in_features if group_size == -1 else group_size
    return -(-in_features // gs)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A GPTQ/RTN-quantized kernel ``[in, out]``; see the module docstring for the fields."""

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    g_idx: jax.Array
    loss: jax.Array
    damp: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True), default=4)
    group_size: int = dataclasses.field(metadata=dict(static=True), default=128)
    sym: bool = dataclasses.field(metadata=dict(static=True), default=True)

    # ----------------------------------------------------------------------------- shapes
    @property
    def in_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])

    def validate(self) -> "QuantizedWeight":
        """Check shapes, dtypes and static fields; returns ``self`` (raises ``ValueError``)."""
        pack._check_bits(self.bits)
        if self.codes.ndim != 2:
            raise ValueError(f"codes must be [in, out], got shape {tuple(self.codes.shape)}")
        n_in, n_out = self.codes.shape
        if self.group_size != -1 and not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ValueError(f"group_size must be -1 or a positive int, got {self.group_size!r}")
        g = _num_groups(n_in, self.group_size)
        for name, arr, shape, dtype in (
            ("scales", self.scales, (g, n_out), np.float16),
            ("zeros", self.zeros, (g, n_out), np.uint8),
            ("g_idx", self.g_idx, (n_in,), np.int32),
        ):
            if tuple(arr.shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for codes {(n_in, n_out)} and group_size "
                    f"{self.group_size}, got {tuple(arr.shape)}")
            if np.dtype(arr.dtype) != np.dtype(dtype):
                raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {arr.dtype}")
        if np.dtype(self.codes.dtype) != np.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        return self

    # ----------------------------------------------------------------------------- math
    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dequantized kernel ``[in, out]``: ``scales[g_idx] * (codes - zeros[g_idx])`` (float32 math)."""
        g_idx = jnp.asarray(self.g_idx)
        s = jnp.take(jnp.asarray(self.scales).astype(jnp.float32), g_idx, axis=0)
        z = jnp.take(jnp.asarray(self.zeros).astype(jnp.float32), g_idx, axis=0)
        return (s * (jnp.asarray(self.codes).astype(jnp.float32) - z)).astype(dtype)

    def split(self, sizes: list[int] | tuple[int, ...], losses: Any = None) -> list["QuantizedWeight"]:
        """Split along ``out`` into parts of ``sizes`` columns (undo a concatenation of weights).

        ``losses`` optionally gives the per-output-column loss ``[out]`` so each part gets its own
        loss; otherwise each part's loss is NaN (unknown).
        """
        if sum(sizes) != self.out_features:
            raise ValueError(f"sizes {list(sizes)} sum to {sum(sizes)}, expected out_features "
                             f"{self.out_features}")
        parts = []
        start = 0
        for n in sizes:
            sl = slice(start, start + n)
            loss = (jnp.sum(jnp.asarray(losses)[sl]).astype(jnp.float32) if losses is not None
                    else jnp.asarray(jnp.nan, jnp.float32))
            parts.append(dataclasses.replace(
                self, codes=self.codes[:, sl], scales=self.scales[:, sl], zeros=self.zeros[:, sl],
                loss=loss))
            start += n
        return parts

    # ----------------------------------------------------------------------------- model params
    def to_params(self, bias: Any = None) -> dict[str, jax.Array]:
        """Packed LIN dict for the models: ``qweight`` int32 ``[in*bits/32, out]``, ``scales``
        float16 ``[G, out]``, ``zeros`` uint8 ``[G, out]``, ``g_idx`` int32 ``[in]`` (+ ``bias``)."""
        lin = {
            "qweight": pack.pack_rows(jnp.asarray(self.codes), self.bits),
            "scales": jnp.asarray(self.scales),
            "zeros": jnp.asarray(self.zeros),
            "g_idx": jnp.asarray(self.g_idx),
        }
        if bias is not None:
            lin["bias"] = jnp.asarray(bias)
        return lin

    @classmethod
    def from_params(cls, lin: Mapping[str, Any], *, group_size: int | None = None,
                    sym: bool | None = None) -> "QuantizedWeight":
        """Inverse of :meth:`to_params` (``bias`` is ignored; ``loss``/``damp`` become NaN).

        ``bits`` comes from the shapes. ``group_size`` defaults to the size of group 0 (``-1`` when
        there is a single group); ``sym`` defaults to "every zero equals ``2^(bits-1)``". Both
        defaults read concrete values, so pass them explicitly under ``jit``.
        """
        bits = pack.bits_of(lin)
        g_idx = jnp.asarray(lin["g_idx"])
        codes = pack.unpack_rows(jnp.asarray(lin["qweight"]), bits, g_idx.shape[0])
        zeros = jnp.asarray(lin["zeros"])
        scales = jnp.asarray(lin["scales"])
        if group_size is None:
            group_size = _infer_group_size(np.asarray(g_idx), scales.shape[0])
        if sym is None:
            sym = bool(np.all(np.asarray(zeros) == (1 << (bits - 1))))
        nan = jnp.asarray(jnp.nan, jnp.float32)
        return cls(codes=codes, scales=scales.astype(jnp.float16), zeros=zeros.astype(jnp.uint8),
                   g_idx=g_idx.astype(jnp.int32), loss=nan, damp=nan, bits=bits,
                   group_size=group_size, sym=sym).validate()

    # ----------------------------------------------------------------------------- checkpoints
    def to_gptq_tensors(self, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
        """GPTQ checkpoint tensors (NumPy): ``qweight`` int32 ``[in*bits/32, out]``, ``qzeros``
        int32 ``[G, out*bits/32]``, ``scales`` float16 ``[G, out]``, ``g_idx`` int32 ``[in]``.

        ``checkpoint_format="gptq"`` (v1) stores ``zero - 1`` and raises ``ValueError`` if any zero
        point is 0 (unrepresentable in v1); ``"gptq_v2"`` stores the true zero.
        """
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got "
                             f"{checkpoint_format!r}")
        self.validate()
        n_in, n_out = self.codes.shape
        _check_packable(n_in, n_out, self.bits)
        codes = np.asarray(self.codes)
        zeros = np.asarray(self.zeros).astype(np.int64)
        if checkpoint_format == "gptq":
            bad = zeros == 0
            if bad.any():
                g, n = np.argwhere(bad)[0]
                raise ValueError(
                    f"{int(bad.sum())} zero point(s) equal 0 (first at group {g}, output {n}); GPTQ v1 "
                    "stores zero-1 and cannot represent 0 (readers would decode a corrupted "
                    "value). Write checkpoint_format='gptq_v2', or quantize so that zeros stay >= 1")
            zeros = zeros - 1
        return {
            "qweight": pack.pack_rows(codes, self.bits),
            "qzeros": pack.pack_cols(zeros.astype(np.uint8), self.bits),
            "scales": np.asarray(self.scales).astype(np.float16),
            "g_idx": np.asarray(self.g_idx).astype(np.int32),
        }

    @classmethod
    def from_gptq_tensors(cls, tensors: Mapping[str, Any], *, bits: int, group_size: int,
                          sym: bool, checkpoint_format: str = "gptq") -> "QuantizedWeight":
        """Read GPTQ checkpoint tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``).

        v1 zeros are decoded as ``(stored + 1) mod 2^bits`` like the AutoGPTQ/vLLM kernels; v2 as
        stored. ``g_idx`` may be absent, then it is ``k // group_size``. ``loss``/``damp`` are NaN.
        """
        pack._check_bits(bits)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got "
                             f"{checkpoint_format!r}")
        for key in ("qweight", "qzeros", "scales"):
            if key not in tensors:
                raise KeyError(f"GPTQ tensors are missing {key!r}; got {sorted(tensors)}")
        qweight = np.asarray(tensors["qweight"])
        qzeros = np.asarray(tensors["qzeros"])
        scales = np.asarray(tensors["scales"])
        if qweight.dtype != np.int32 or qzeros.dtype != np.int32:
            raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
        n_out = qweight.shape[1]
        n_in = qweight.shape[0] * 32 // bits
        if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
            raise ValueError(f"group_size must be -1 or a positive int, got {group_size!r}")
        g = _num_groups(n_in, group_size)
        if scales.shape != (g, n_out):
            raise ValueError(
                f"scales has shape {scales.shape}, expected {(g, n_out)} for qweight "
                f"{qweight.shape} at {bits} bits and group_size {group_size}")
        codes = pack.unpack_rows(qweight, bits, n_in)
        stored = pack.unpack_cols(qzeros, bits, n_out)
        if stored.shape != (g, n_out):
            raise ValueError(f"qzeros unpacks to {stored.shape}, expected {(g, n_out)}")
        if checkpoint_format == "gptq":
            zeros = ((stored.astype(np.int64) + 1) & ((1 << bits) - 1)).astype(np.uint8)
        else:
            zeros = stored
        if tensors.get("g_idx") is not None:
            g_idx = np.asarray(tensors["g_idx"]).astype(np.int32)
            if g_idx.shape != (n_in,):
                raise ValueError(f"g_idx has shape {g_idx.shape}, expected {(n_in,)}")
            if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= g):
                raise ValueError(f"g_idx values must lie in [0, {g}), got [{g_idx.min()}, "
                                 f"{g_idx.max()}]")
        else:
            gs = n_in if group_size == -1 else group_size
            g_idx = (np.arange(n_in) // gs).astype(np.int32)
        nan = np.float32(np.nan)
        return cls(codes=jnp.asarray(codes), scales=jnp.asarray(scales.astype(np.float16)),
                   zeros=jnp.asarray(zeros), g_idx=jnp.asarray(g_idx), loss=jnp.asarray(nan),
                   damp=jnp.asarray(nan), bits=bits, group_size=group_size, sym=sym).validate()


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["codes", "scales", "zeros", "g_idx", "loss", "damp"],
    meta_fields=["bits", "group_size", "sym"],
)


def _infer_group_size(g_idx: np.ndarray, num_groups: int) -> int:
    if num_groups <= 1:
        return -1
    return int(np.sum(g_idx == 0))


def _check_packable(n_in: int, n_out: int, bits: int) -> None:
    rl = pack.run_length(bits)
    if n_in % rl or n_out % rl:
        raise ValueError(
            f"a [{n_in}, {n_out}] layer cannot be stored in the GPTQ format at {bits} bits: "
            f"in_features and out_features must both be multiples of {rl} (qweight packs along in, "
            "qzeros along out); keep this layer in float or use another bit width")
