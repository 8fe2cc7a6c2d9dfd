"""Test-side client of the independent reader: runs ``reader.py`` tasks in the interop venv."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

READER = Path(__file__).resolve().parent / "reader.py"


class Reader:
    """Runs batches of reader tasks (see ``reader.py``) in one subprocess of the interop venv."""

    def __init__(self, python: Path, workdir: Path):
        self.python = python
        self.workdir = workdir
        self.calls = 0

    def run(self, tasks: list[dict[str, Any]], timeout: float = 1800) -> list[dict[str, Any]]:
        self.calls += 1
        job = self.workdir / f"job{self.calls}.json"
        report = self.workdir / f"report{self.calls}.json"
        job.write_text(json.dumps({"tasks": tasks, "report": str(report)}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        # GPTQModel JIT-builds C++ CPU kernels on first use (minutes, once; cached in ~/.cache/gptqmodel).
        # TORCHDYNAMO_DISABLE: GPTQModel torch.compile()s every kernel's dequantize on each load (seconds
        # per tiny model); the eager function computes the same weights.
        env.update(GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TORCHDYNAMO_DISABLE="1")
        r = subprocess.run([str(self.python), str(READER), str(job)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(self.workdir))
        if r.returncode != 0:
            err = "\n".join(line for line in r.stderr.splitlines() if "is ignored" not in line)
            raise AssertionError(f"the PyTorch reader failed (exit {r.returncode}):\n{err[-6000:]}")
        return json.loads(report.read_text())


def save_ids(path: Path, ids: np.ndarray) -> str:
    np.save(path, np.asarray(ids, dtype=np.int64))
    return str(path)
