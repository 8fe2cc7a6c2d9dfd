"""Bit packing and QuantizedWeight checkpoint forms, against an independent big-integer packer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgptq import pack
from jgptq.quantized import QuantizedWeight

BITS = (2, 3, 4, 8)


def ref_pack_axis0(values: np.ndarray, bits: int) -> np.ndarray:
    """Independent packer: each run of values is one Python big integer, value j at bit bits*j
    (gptq.md §1.4), cut into 32-bit little-endian words."""
    run = 32 if bits == 3 else 32 // bits
    n, m = values.shape
    words_per_run = run * bits // 32
    out = np.zeros((n * bits // 32, m), dtype=np.uint32)
    for col in range(m):
        for r in range(n // run):
            stream = 0
            for j in range(run):
                stream |= int(values[r * run + j, col]) << (bits * j)
            for w in range(words_per_run):
                out[r * words_per_run + w, col] = (stream >> (32 * w)) & 0xFFFFFFFF
    return out.view(np.int32)


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_bitstream_reference(bits):
    rng = np.random.default_rng(100 + bits)
    codes = rng.integers(0, 2**bits, size=(96, 5)).astype(np.uint8)
    got = pack.pack_rows(codes, bits)
    assert got.dtype == np.int32 and got.shape == (96 * bits // 32, 5)
    np.testing.assert_array_equal(got, ref_pack_axis0(codes, bits))
    np.testing.assert_array_equal(pack.unpack_rows(got, bits, 96), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_cols_matches_bitstream_reference(bits):
    rng = np.random.default_rng(200 + bits)
    z = rng.integers(0, 2**bits, size=(3, 64)).astype(np.uint8)
    got = pack.pack_cols(z, bits)
    assert got.dtype == np.int32 and got.shape == (3, 64 * bits // 32)
    np.testing.assert_array_equal(got, ref_pack_axis0(z.T, bits).T)
    np.testing.assert_array_equal(pack.unpack_cols(got, bits, 64), z)


def test_3bit_straddling_layout_explicit():
    # value 10 = 0b101 straddles word0/word1, value 21 = 0b110 straddles word1/word2 (gptq.md §1.4)
    vals = np.zeros((32, 1), np.uint8)
    vals[10, 0] = 0b101
    vals[21, 0] = 0b110
    vals[0, 0] = 7
    vals[31, 0] = 3
    words = pack.pack_rows(vals, 3).view(np.uint32)[:, 0]
    assert words[0] == (7 | (0b01 << 30))          # value 0 at bits 0-2, low 2 bits of v10 at 30-31
    assert words[1] == 0b1                           # bit 2 of v10 at bit 0; low bit of v21 (0) at 31
    assert words[2] == (0b11 | (3 << 29))            # high 2 bits of v21 at 0-1, value 31 at bits 29-31


def test_sym_zero_words_are_the_well_known_constants():
    for bits, word in ((4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)):
        stored = np.full((2, 32), 2 ** (bits - 1) - 1, np.uint8)
        packed = pack.pack_cols(stored, bits)
        assert np.all(packed.view(np.uint32) == word)


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_jittable_and_matches_numpy(bits):
    rng = np.random.default_rng(300 + bits)
    codes = rng.integers(0, 2**bits, size=(64, 8)).astype(np.uint8)
    packed = jax.jit(lambda c: pack.pack_rows(c, bits))(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(packed), pack.pack_rows(codes, bits))
    back = jax.jit(lambda q: pack.unpack_rows(q, bits, 64))(packed)
    np.testing.assert_array_equal(np.asarray(back), codes)


def test_pack_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack.pack_rows(np.zeros((48, 4), np.uint8), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack.pack_rows(np.zeros((12, 4), np.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack.pack_rows(np.full((8, 1), 16, np.uint8), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack.pack_rows(np.zeros((32, 1), np.uint8), 5)
    with pytest.raises(ValueError, match="need 4"):
        pack.unpack_rows(np.zeros((3, 2), np.int32), 4, 32)


def _random_qweight(rng, n_in, n_out, bits, gs, act_order=False, sym=False):
    g = -(-n_in // (n_in if gs == -1 else gs))
    codes = rng.integers(0, 2**bits, size=(n_in, n_out)).astype(np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(g, n_out)).astype(np.float16)
    if sym:
        zeros = np.full((g, n_out), 2 ** (bits - 1), np.uint8)
    else:
        zeros = rng.integers(0, 2**bits, size=(g, n_out)).astype(np.uint8)
    base = np.arange(n_in) // (n_in if gs == -1 else gs)
    g_idx = base[rng.permutation(n_in)] if act_order else base
    return QuantizedWeight(codes=jnp.asarray(codes), scales=jnp.asarray(scales),
                           zeros=jnp.asarray(zeros), g_idx=jnp.asarray(g_idx.astype(np.int32)),
                           loss=jnp.float32(1.5), damp=jnp.float32(0.01), bits=bits,
                           group_size=gs, sym=sym)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_params_and_tensor_roundtrip(bits, act_order):
    rng = np.random.default_rng(400 + bits + 10 * act_order)
    qw = _random_qweight(rng, 128, 64, bits, 32, act_order=act_order)
    # float64 reference of the dequantized weight
    c = np.asarray(qw.codes, np.float64)
    s = np.asarray(qw.scales, np.float64)[np.asarray(qw.g_idx)]
    z = np.asarray(qw.zeros, np.float64)[np.asarray(qw.g_idx)]
    ref = s * (c - z)
    np.testing.assert_allclose(np.asarray(qw.dequantize()), ref, rtol=1e-6, atol=1e-7)

    lin = qw.to_params()
    assert lin["qweight"].dtype == jnp.int32 and lin["qweight"].shape == (128 * bits // 32, 64)
    assert pack.bits_of(lin) == bits
    np.testing.assert_allclose(np.asarray(jax.jit(pack.dequantize_linear)(lin)), ref, rtol=1e-6,
                               atol=1e-7)
    back = QuantizedWeight.from_params(lin, group_size=32, sym=False)
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qw.codes))
    assert QuantizedWeight.from_params(lin).group_size == 32

    t = qw.to_gptq_tensors("gptq_v2")
    assert t["qweight"].dtype == np.int32 and t["qzeros"].dtype == np.int32
    assert t["qzeros"].shape == (4, 64 * bits // 32) and t["scales"].dtype == np.float16
    np.testing.assert_array_equal(t["qzeros"], ref_pack_axis0(np.asarray(qw.zeros).T, bits).T)
    rd = QuantizedWeight.from_gptq_tensors(t, bits=bits, group_size=32, sym=False,
                                           checkpoint_format="gptq_v2")
    for f in ("codes", "scales", "zeros", "g_idx"):
        np.testing.assert_array_equal(np.asarray(getattr(rd, f)), np.asarray(getattr(qw, f)))


@pytest.mark.parametrize("bits", BITS)
def test_v1_stores_zero_minus_one_and_refuses_zero(bits):
    rng = np.random.default_rng(500 + bits)
    qw = _random_qweight(rng, 64, 32, bits, 32)
    z = np.asarray(qw.zeros).copy()
    z[z == 0] = 1
    ok = QuantizedWeight(**{**qw.__dict__, "zeros": jnp.asarray(z)})
    t = ok.to_gptq_tensors("gptq")
    np.testing.assert_array_equal(t["qzeros"], ref_pack_axis0((z - 1).T, bits).T)
    rd = QuantizedWeight.from_gptq_tensors(t, bits=bits, group_size=32, sym=False)
    np.testing.assert_array_equal(np.asarray(rd.zeros), z)
    z[1, 3] = 0
    bad = QuantizedWeight(**{**qw.__dict__, "zeros": jnp.asarray(z)})
    with pytest.raises(ValueError, match="gptq_v2"):
        bad.to_gptq_tensors("gptq")


def test_sym_v1_checkpoint_has_0x77777777_zeros():
    qw = _random_qweight(np.random.default_rng(7), 64, 16, 4, 32, sym=True)
    t = qw.to_gptq_tensors("gptq")
    assert np.all(t["qzeros"] == 0x77777777)
    assert QuantizedWeight.from_params(qw.to_params()).sym is True


def test_quantized_weight_is_a_pytree_with_static_fields():
    qw = _random_qweight(np.random.default_rng(8), 32, 8, 4, -1)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 6
    doubled = jax.jit(lambda q: q.dequantize() * 2)(qw)
    np.testing.assert_allclose(np.asarray(doubled), 2 * np.asarray(qw.dequantize()))
    assert qw.num_groups == 1 and qw.validate() is qw


def test_split_along_out():
    qw = _random_qweight(np.random.default_rng(9), 32, 24, 4, 16)
    losses = np.arange(24, dtype=np.float32)
    a, b = qw.split([8, 16], losses=losses)
    np.testing.assert_array_equal(np.asarray(b.codes), np.asarray(qw.codes)[:, 8:])
    assert float(a.loss) == pytest.approx(losses[:8].sum())
    with pytest.raises(ValueError, match="sum to"):
        qw.split([8, 8])


def test_checkpoint_shape_errors():
    qw = _random_qweight(np.random.default_rng(10), 64, 20, 3, 32)
    with pytest.raises(ValueError, match="multiples of 32"):
        qw.to_gptq_tensors("gptq_v2")
    with pytest.raises(ValueError, match="checkpoint_format"):
        qw.to_gptq_tensors("gptq_v3")
    good = _random_qweight(np.random.default_rng(11), 64, 32, 4, 32).to_gptq_tensors("gptq_v2")
    with pytest.raises(ValueError, match="scales has shape"):
        QuantizedWeight.from_gptq_tensors(good, bits=4, group_size=16, sym=False)
