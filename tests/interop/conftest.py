"""Fixtures of the interop suite: the independent PyTorch reader in its own, cached virtual environment.

The reader (transformers + optimum + GPTQModel, CPU) needs a newer torch than the project's venv, so
``setup_env.sh`` builds it once at ``$JGPTQ_INTEROP_VENV`` (default ``<repo>/.venv-interop``); later
runs reuse it. If it cannot be built the tests *fail* with the build log, they are never skipped.
Every test here carries the ``interop`` marker.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SETUP = HERE / "setup_env.sh"
READER = HERE / "reader.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.interop)


def interop_venv() -> Path:
    return Path(os.environ.get("JGPTQ_INTEROP_VENV", REPO / ".venv-interop"))


@pytest.fixture(scope="session")
def interop_python() -> Path:
    """Path of the reader venv's python, building the venv on first use (minutes, once)."""
    env = dict(os.environ, JGPTQ_INTEROP_VENV=str(interop_venv()))
    try:
        r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, env=env, timeout=3600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"building the interop reader venv with {SETUP} timed out after {e.timeout} s")
    if r.returncode != 0:
        log = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "is ignored" not in line)
        pytest.fail(f"building the interop reader venv at {interop_venv()} failed (exit {r.returncode}); "
                    f"this is a test failure, not a skip. Log tail:\n{log[-4000:]}")
    py = interop_venv() / "bin" / "python"
    assert py.is_file(), f"{SETUP} succeeded but {py} does not exist"
    return py


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
        env.update(GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        r = subprocess.run([str(self.python), str(READER), str(job)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(self.workdir))
        if r.returncode != 0:
            err = "\n".join(line for line in r.stderr.splitlines() if "is ignored" not in line)
            raise AssertionError(f"the PyTorch reader failed (exit {r.returncode}):\n{err[-6000:]}")
        return json.loads(report.read_text())


@pytest.fixture(scope="session")
def reader(interop_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Reader:
    return Reader(interop_python, tmp_path_factory.mktemp("reader"))


def save_ids(path: Path, ids: np.ndarray) -> str:
    np.save(path, np.asarray(ids, dtype=np.int64))
    return str(path)


__all__ = ["Reader", "save_ids"]
