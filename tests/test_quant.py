"""The cache's storage format (xqrt.quant) against a NumPy reference of the same layout."""
import numpy as np
import pytest

from xqrt import quant

rng = np.random.default_rng(0)


def pack_reference(q, bits):
    """Codes (rows × W, values < 2^bits) packed as DESIGN.md says: little-endian, 8 values →
    `bits` bytes, value t of each 8 at bit offset bits·t."""
    rows, w = q.shape
    words = (q.reshape(rows, w // 8, 8).astype(np.uint64) << (bits * np.arange(8, dtype=np.uint64))).sum(-1)
    out = (words[..., None] >> (8 * np.arange(bits, dtype=np.uint64))) & 255
    return out.reshape(rows, w * bits // 8).astype(np.uint8)


def run_quantize(x, bits, group):
    rows, w = x.shape
    codes = np.zeros((rows, quant.row_bytes(w, bits)), np.uint8)
    ns = quant.n_scales(w, bits, group)
    scale, zero = np.zeros((rows, ns), np.uint16), np.zeros((rows, ns), np.uint16)
    quant.quantize_rows(x, bits, group, codes, scale, zero)
    out = np.zeros_like(x)
    quant.dequantize_rows(codes, scale, zero, bits, group, out)
    return codes, scale, zero, out


@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_packing_matches_reference_and_round_trips(bits):
    group, w = 32, 128
    x = (rng.standard_normal((6, w)) * rng.uniform(0.01, 100, (6, 1)) + rng.uniform(-50, 50, (6, 1))).astype(np.float32)
    codes, scale, zero, out = run_quantize(x, bits, group)
    s = scale.view(np.float16).astype(np.float32).repeat(group, 1)
    m = zero.view(np.float16).astype(np.float32).repeat(group, 1)
    q = np.clip(np.floor((x - m) / s + 0.5), 0, 2 ** bits - 1).astype(np.int64)
    np.testing.assert_array_equal(codes, pack_reference(q, bits))
    np.testing.assert_allclose(out, q * s + m, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    # every value within half a step of its input (the fp16 min is rounded down, the step up)
    assert np.all(np.abs(out - x) <= 0.5 * s * (1 + 1e-5) + 1e-6 * np.abs(m))
    assert np.all(m <= x.reshape(6, -1, group).min(-1).repeat(group, 1))


@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_constant_and_tiny_range_groups(bits):
    x = np.full((2, 64), 3.14159, np.float32)
    x[1, 32:] = np.linspace(-1e-4, 1e-4, 32) + 1000.0
    _, scale, _, out = run_quantize(x, bits, 32)
    s = scale.view(np.float16).astype(np.float32).repeat(32, 1)
    assert np.all(np.abs(out - x) <= 0.5 * s + 1e-6 * np.abs(x))


@pytest.mark.parametrize("bits,dtype", [(16, np.float16), (32, np.float32)])
def test_float_storage(bits, dtype):
    x = rng.standard_normal((3, 40)).astype(np.float32)
    codes, scale, _, out = run_quantize(x, bits, 8)
    assert scale.shape[1] == 0
    np.testing.assert_array_equal(codes.view(dtype), x.astype(dtype))
    np.testing.assert_array_equal(out, x.astype(dtype).astype(np.float32))


def test_bytes_formula():
    for bits in quant.QUANT_BITS:
        assert quant.row_bytes(192, bits) + 4 * quant.n_scales(192, bits, 64) == bits * 192 // 8 + 4 * 192 // 64
