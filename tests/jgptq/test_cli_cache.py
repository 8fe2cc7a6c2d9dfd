"""The command line's on-disk XLA compilation cache (``JGPTQ_XLA_CACHE``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(env_value: str, tmp_path) -> str:
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jgptq.cli import enable_compilation_cache
        got = enable_compilation_cache()
        print("RESULT", got, jax.config.jax_compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
    """)
    env = {"JGPTQ_XLA_CACHE": env_value, "JGPTQ_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if line.startswith("RESULT")][0]


def test_cache_defaults_to_the_artifact_cache_and_is_written(tmp_path):
    line = _run("", tmp_path)
    folder = tmp_path / "cache" / "xla"
    assert line.split()[1] == str(folder)
    assert folder.is_dir() and any(folder.iterdir()), "a compiled program should have been stored"


def test_cache_can_be_turned_off(tmp_path):
    line = _run("off", tmp_path)
    assert line.split()[1] == "None"
    assert not (tmp_path / "cache" / "xla").exists()
