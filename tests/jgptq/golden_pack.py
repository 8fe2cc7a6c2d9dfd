"""Independent float64/NumPy transcription of the GPTQ checkpoint layout, plus byte-level golden words.

Written from ``shared/reference/gptq.md`` §1 only (not from jgptq's code), so tests can check jgptq's
writer and reader against it:

- every bit width packs each run of 32 consecutive values into ``bits`` int32 words as one continuous
  little-endian bit stream, value ``j`` at bit ``bits * j`` (for 2/4/8 bits that is "value ``j`` of a
  word at bits ``[b*j, b*j+b)``"; for 3 bits the 10-1-10-1-10 straddling layout);
- ``qweight`` packs the input dimension (rows), ``qzeros`` the output dimension (columns);
- v1 stores ``zero - 1``, v2 stores ``zero``;
- ``W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.

The helpers use Python integers for the bit stream, a different algorithm from any vectorized packer.
"""

from __future__ import annotations

import numpy as np

BITS = (2, 3, 4, 8)

# Hand-computed words (hex written out by hand from the spec, not by running a packer).
# 4-bit: codes 0..15 then 15..0 along one packed run of 32 values -> 4 words.
GOLDEN_4BIT_CODES = list(range(16)) + list(range(15, -1, -1))
GOLDEN_4BIT_WORDS = [0x76543210, 0xFEDCBA98, 0x89ABCDEF, 0x01234567]
# 8-bit: codes 0x01, 0x23, ... four per word, value j at byte j (little-endian).
GOLDEN_8BIT_CODES = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF] * 4
GOLDEN_8BIT_WORDS = [0x67452301, 0xEFCDAB89] * 4
# 2-bit: codes 0,1,2,3 repeated -> each word 0b11100100 repeated = 0xE4E4E4E4.
GOLDEN_2BIT_CODES = [0, 1, 2, 3] * 8
GOLDEN_2BIT_WORDS = [0xE4E4E4E4, 0xE4E4E4E4]
# 3-bit: value 10 = 0b101 (straddles words 0/1), value 21 = 0b110 (straddles words 1/2), all others 0.
#   word0 bits 30-31 = low two bits of value 10 = 0b01 -> 0x40000000
#   word1 bit 0 = bit 2 of value 10 = 1; bit 31 = low bit of value 21 = 0 -> 0x00000001
#   word2 bits 0-1 = high two bits of value 21 = 0b11 -> 0x00000003
GOLDEN_3BIT_CODES = [0] * 10 + [5] + [0] * 10 + [6] + [0] * 10
GOLDEN_3BIT_WORDS = [0x40000000, 0x00000001, 0x00000003]
# 3-bit: values 0..9 = 7 (bits 0-29 of word0 all set) -> 0x3FFFFFFF; value 11 = 1 at word1 bit 1 -> 0x2.
GOLDEN_3BIT_CODES_B = [7] * 10 + [0, 1] + [0] * 20
GOLDEN_3BIT_WORDS_B = [0x3FFFFFFF, 0x00000002, 0x00000000]
# Symmetric v1 zero-point words: stored zero - 1 = 2^(b-1) - 1 in every field.
SYM_V1_QZERO_WORD = {2: 0x55555555, 4: 0x77777777, 8: 0x7F7F7F7F}
GOLDEN = {
    2: (GOLDEN_2BIT_CODES, GOLDEN_2BIT_WORDS),
    3: (GOLDEN_3BIT_CODES, GOLDEN_3BIT_WORDS),
    4: (GOLDEN_4BIT_CODES, GOLDEN_4BIT_WORDS),
    8: (GOLDEN_8BIT_CODES, GOLDEN_8BIT_WORDS),
}


def as_int32(words: list[int]) -> np.ndarray:
    """Reinterpret unsigned 32-bit words as the int32 values a checkpoint stores."""
    return np.array(words, dtype=np.uint32).view(np.int32)


def pack_run(codes: list[int], bits: int) -> list[int]:
    """Pack 32 codes (each in ``[0, 2^bits)``) into ``bits`` unsigned 32-bit words via one Python int."""
    assert len(codes) == 32, len(codes)
    stream = 0
    for j, c in enumerate(codes):
        assert 0 <= int(c) < (1 << bits), (c, bits)
        stream |= int(c) << (bits * j)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(bits)]


def unpack_run(words: list[int], bits: int) -> list[int]:
    """Inverse of :func:`pack_run`: ``bits`` words -> 32 codes."""
    stream = 0
    for w, word in enumerate(words):
        stream |= (int(word) & 0xFFFFFFFF) << (32 * w)
    return [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(32)]


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[in, out]`` -> int32 ``[in * bits / 32, out]`` packed along the input dimension (qweight)."""
    n_in, n_out = codes.shape
    assert n_in % 32 == 0, n_in
    out = np.zeros((n_in // 32 * bits, n_out), dtype=np.uint32)
    for r in range(n_in // 32):
        for n in range(n_out):
            out[r * bits:(r + 1) * bits, n] = pack_run(list(codes[r * 32:(r + 1) * 32, n]), bits)
    return out.view(np.int32)


def pack_cols(values: np.ndarray, bits: int) -> np.ndarray:
    """Values ``[G, out]`` -> int32 ``[G, out * bits / 32]`` packed along the output dimension (qzeros)."""
    return pack_rows(values.T, bits).T.copy()


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``[in * bits / 32, out]`` -> codes ``[in, out]`` (int64)."""
    rows, n_out = packed.shape
    words = packed.view(np.uint32)
    out = np.zeros((rows // bits * 32, n_out), dtype=np.int64)
    for r in range(rows // bits):
        for n in range(n_out):
            out[r * 32:(r + 1) * 32, n] = unpack_run(list(words[r * bits:(r + 1) * bits, n]), bits)
    return out


def unpack_cols(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``[G, out * bits / 32]`` -> values ``[G, out]`` (int64)."""
    return unpack_rows(packed.T.copy(), bits).T


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
               checkpoint_format: str) -> np.ndarray:
    """Checkpoint tensors -> float64 ``[in, out]`` weight (``y = x @ W``), per reference §1.3."""
    q = unpack_rows(qweight, bits)
    stored = unpack_cols(qzeros, bits)
    if checkpoint_format == "gptq":
        zeros = (stored + 1) & ((1 << bits) - 1)
    elif checkpoint_format == "gptq_v2":
        zeros = stored
    else:
        raise ValueError(checkpoint_format)
    g = np.asarray(g_idx, dtype=np.int64)
    return scales.astype(np.float64)[g] * (q - zeros[g]).astype(np.float64)


def random_quantized(rng: np.random.Generator, n_in: int, n_out: int, bits: int, group_size: int, sym: bool,
                     act_order: bool) -> dict[str, np.ndarray]:
    """A random quantized linear in jgptq's params form (codes unpacked; true zeros), for tests.

    Returns ``codes`` ``[in, out]`` uint8, ``scales`` float16 ``[G, out]``, ``zeros`` uint8 ``[G, out]``
    (``2^(bits-1)`` when ``sym``; otherwise uniform in ``[0, 2^bits)``, so zero = 0 does occur),
    ``g_idx`` int32 ``[in]`` (a random permutation's groups when ``act_order``).
    """
    gs = n_in if group_size == -1 else group_size
    n_groups = -(-n_in // gs)
    maxq = (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, size=(n_in, n_out)).astype(np.uint8)
    scales = rng.uniform(0.002, 0.05, size=(n_groups, n_out)).astype(np.float16)
    if sym:
        zeros = np.full((n_groups, n_out), 1 << (bits - 1), dtype=np.uint8)
    else:
        zeros = rng.integers(0, maxq + 1, size=(n_groups, n_out)).astype(np.uint8)
    if act_order:
        perm = rng.permutation(n_in)
        invperm = np.argsort(perm)
        g_idx = (invperm // gs).astype(np.int32)
    else:
        g_idx = (np.arange(n_in) // gs).astype(np.int32)
    return {"codes": codes, "scales": scales, "zeros": zeros, "g_idx": g_idx}
