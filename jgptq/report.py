"""The quantization report: per-module losses, damping and timings, totals, JSON and a summary table.

Loss definition (used for both GPTQ and the RTN comparison, so the two are directly comparable):

    loss(Q) = tr((W - Q)ᵀ Σ (W - Q)) / T = (1 / T) Σ_t ‖(W - Q)ᵀ x_t‖²

where ``W, Q`` are ``[in, out]`` (float and dequantized quantized weight), ``x_t`` runs over the ``T``
unmasked calibration tokens that reach the linear, and ``Σ = Σ_t x_t x_tᵀ``.  It is the mean over
calibration tokens of the squared output error summed over output features — the quantity GPTQ
minimizes, measured on the *undamped* Hessian.  In terms of the reference's Hessian
``H = (2 / N) Σ_t x_t x_tᵀ`` (``N`` samples of ``S`` tokens) it is ``½ tr(ΔWᵀ H ΔW) · N / T``, i.e. the
reference ``Losses.sum()`` divided by the sequence length (up to damping, which the reference loss
includes and this one does not).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

REPORT_FILENAME = "quantization_report.json"


@dataclasses.dataclass
class ModuleReport:
    """What happened to one linear layer.

    Attributes:
      name: Hugging Face module name, e.g. ``"model.layers.3.self_attn.q_proj"``.
      layer: decoder block index (``-1`` for modules outside the blocks, e.g. ``lm_head``).
      shape: ``(in_features, out_features)``.
      method: ``"gptq"``, ``"rtn"`` or ``"skip"`` (left in float by a ``dynamic`` rule).
      bits, group_size, sym, desc_act: the effective settings after ``dynamic`` overrides.
      loss: output-error loss of the returned weight (module docstring); ``None`` if not measured.
      rtn_loss: the same loss for round-to-nearest with the same settings; ``None`` if not measured.
      damp: damping fraction of ``mean(diag(H))`` actually used (after any automatic increase).
      time_s: seconds spent quantizing this module (a shared-Hessian group's time is split between
        its modules in proportion to their output width).
      hessian: name of the captured input the module's Hessian came from (``"attn_in"`` ...).
      tokens: number of unmasked calibration tokens in that Hessian.
    """

    name: str
    layer: int
    shape: tuple[int, int]
    method: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    desc_act: bool | None = None
    loss: float | None = None
    rtn_loss: float | None = None
    damp: float | None = None
    time_s: float = 0.0
    hessian: str | None = None
    tokens: int | None = None

    @property
    def gain(self) -> float | None:
        """``rtn_loss / loss`` (> 1 means GPTQ beat RTN), ``None`` when either is missing or zero."""
        if self.loss is None or self.rtn_loss is None or self.loss <= 0:
            return None
        return self.rtn_loss / self.loss


@dataclasses.dataclass
class QuantizationReport:
    """Report of one ``jgptq.quantize`` run; saved as JSON next to the checkpoint.

    Attributes:
      modules: one entry per linear layer, in processing order.
      config: the base ``GPTQConfig`` as a dict, plus the ``dynamic`` rules under ``"dynamic"``.
      calibration: ``{"nsamples", "seqlen", "tokens", "batch_size", ...}``.
      timings: wall seconds per phase (``"capture"``, ``"hessian"``, ``"quantize"``, ``"forward"``,
        ``"pack"``, ``"total"``; compile time is included unless reported separately).
      environment: JAX version, backend, device kind.
      extra: anything the caller adds (model name, perplexities, checkpoint path ...).
    """

    modules: list[ModuleReport] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def totals(self) -> dict[str, Any]:
        """Aggregates over the quantized modules.

        Returns a dict with ``modules`` (count quantized), ``skipped``, ``loss`` and ``rtn_loss``
        (sums over modules where both were measured), ``mean_gain`` (geometric mean of
        ``rtn_loss / loss``), ``beats_rtn`` (modules with ``loss < rtn_loss``), ``compared``,
        ``max_damp`` and ``time_s`` (sum of module times).
        """
        quantized = [m for m in self.modules if m.method != "skip"]
        compared = [m for m in quantized if m.gain is not None]
        damps = [m.damp for m in quantized if m.damp is not None]
        log_gains = [math.log(m.gain) for m in compared if m.gain > 0]
        return {
            "modules": len(quantized),
            "skipped": len(self.modules) - len(quantized),
            "loss": float(sum(m.loss for m in compared)) if compared else None,
            "rtn_loss": float(sum(m.rtn_loss for m in compared)) if compared else None,
            "mean_gain": float(math.exp(sum(log_gains) / len(log_gains))) if log_gains else None,
            "beats_rtn": sum(1 for m in compared if m.loss < m.rtn_loss),
            "compared": len(compared),
            "max_damp": max(damps) if damps else None,
            "time_s": float(sum(m.time_s for m in quantized)),
        }

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready dict without per-module entries: totals, config, calibration, timings,
        environment and ``extra`` (what goes into a checkpoint's ``quantization_config.meta``)."""
        return {"totals": self.totals(), "config": self.config, "calibration": self.calibration,
                "timings": self.timings, "environment": self.environment, "extra": self.extra}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (module entries as dicts, plus ``"totals"``)."""
        out = dataclasses.asdict(self)
        out["totals"] = self.totals()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantizationReport":
        """Inverse of :meth:`to_dict` (``"totals"`` is recomputed, not read)."""
        fields = {f.name for f in dataclasses.fields(ModuleReport)}
        modules = []
        for m in data.get("modules", []):
            unknown = set(m) - fields
            if unknown:
                raise ValueError(f"report module entry has unknown keys {sorted(unknown)}; "
                                 "was it written by a newer jgptq?")
            m = dict(m)
            m["shape"] = tuple(m["shape"])
            modules.append(ModuleReport(**m))
        return cls(modules=modules,
                   **{k: data.get(k, {}) for k in ("config", "calibration", "timings",
                                                  "environment", "extra")})

    def save(self, path: str | os.PathLike) -> str:
        """Write the report as JSON to ``path`` (a file, or a directory ⇒ ``REPORT_FILENAME`` in it).

        Written to a temporary file and renamed, so a crash never leaves a truncated report.
        Returns the file path written.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILENAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizationReport":
        """Read a report written by :meth:`save` (a file or the directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILENAME)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def summary_table(self, *, per_layer: bool = True) -> str:
        """A plain-text table: one row per decoder block (or per module) and a totals line.

        Columns: modules, GPTQ loss, RTN loss, RTN/GPTQ (geometric mean of per-module ratios),
        modules that beat RTN, max damp and seconds.
        """
        rows: list[tuple[str, list[ModuleReport]]] = []
        if per_layer:
            by_layer: dict[int, list[ModuleReport]] = {}
            for m in self.modules:
                by_layer.setdefault(m.layer, []).append(m)
            for layer, ms in sorted(by_layer.items()):
                rows.append((f"layer {layer}" if layer >= 0 else "other", ms))
        else:
            rows = [(m.name, [m]) for m in self.modules]
        lines = [f"{'':>14} {'mods':>4} {'loss':>11} {'rtn_loss':>11} {'rtn/loss':>8} "
                 f"{'<rtn':>5} {'damp':>6} {'time_s':>7}"]
        for label, ms in rows:
            sub = QuantizationReport(modules=ms).totals()
            lines.append(_table_row(label[-14:], sub))
        lines.append("-" * len(lines[0]))
        lines.append(_table_row("total", self.totals()))
        return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table_row(label: str, t: dict[str, Any]) -> str:
    beats = f"{t['beats_rtn']}/{t['compared']}" if t["compared"] else "-"
    return (f"{label:>14} {t['modules']:>4} {_fmt(t['loss'], '11.4g')} {_fmt(t['rtn_loss'], '11.4g')} "
            f"{_fmt(t['mean_gain'], '8.3f')} {beats:>5} {_fmt(t['max_damp'], '6.3f')} "
            f"{t['time_s']:7.2f}")


def _json_default(obj: Any) -> Any:
    # numpy scalars / arrays and tuples that slipped into `extra`
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON serializable: {obj!r}")
