"""Fixtures of the interop suite: the independent PyTorch reader in its own, cached virtual environment.

The reader (transformers + optimum + GPTQModel, CPU) needs a newer torch than the project's venv, so
``setup_env.sh`` builds it once at ``$JGPTQ_INTEROP_VENV`` (default ``$JGPTQ_CACHE/venv-interop``, i.e. ``~/.cache/jgptq/venv-interop``, so clean clones reuse it); later
runs reuse it. If it cannot be built the tests *fail* with the build log, they are never skipped.
Every test here carries the ``interop`` marker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from interop_client import Reader

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SETUP = HERE / "setup_env.sh"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.interop)


def interop_venv() -> Path:
    cache = Path(os.environ.get("JGPTQ_CACHE", Path.home() / ".cache" / "jgptq"))
    return Path(os.environ.get("JGPTQ_INTEROP_VENV", cache / "venv-interop"))


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


@pytest.fixture(scope="session")
def reader(interop_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Reader:
    return Reader(interop_python, tmp_path_factory.mktemp("reader"))
