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


@pytest.mark.parametrize("bits", sorted({1, *quant.QUANT_BITS}))
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


def mse_range_reference(x, top):
    """NumPy form of the clipping search: the candidate range of least squared error."""
    lo, hi = x.min(), x.max()
    best = None
    for a in range(6):
        for b in range(6):
            c_lo, c_hi = lo + np.float32(a / 20) * (hi - lo), hi - np.float32(b / 20) * (hi - lo)
            s = (c_hi - c_lo) / np.float32(top)
            err = ((np.clip(np.floor((x - c_lo) / s + 0.5), 0, top) * s + c_lo - x) ** 2).sum()
            if best is None or err < best[0]:
                best = (err, c_lo, c_hi)
    return best


@pytest.mark.parametrize("bits", quant.QUANT_BITS)
def test_clipping_finds_the_least_squares_range(bits):
    group = 32
    x = rng.standard_normal((5, 128)).astype(np.float32)
    x[:, 7] *= 20.0  # one outlier per first group
    codes, scale, zero = (np.zeros((5, quant.row_bytes(128, bits)), np.uint8), np.zeros((5, 4), np.uint16),
                          np.zeros((5, 4), np.uint16))
    quant.quantize_rows(x, bits, group, codes, scale, zero, True)
    clipped = np.zeros_like(x)
    quant.dequantize_rows(codes, scale, zero, bits, group, clipped)
    *_, plain = run_quantize(x, bits, group)
    err = lambda out: ((out - x) ** 2).reshape(5, -1, group).sum(-1)  # noqa: E731
    want = np.array([[mse_range_reference(g, 2 ** bits - 1)[0] for g in row.reshape(-1, group)] for row in x])
    assert np.all(err(clipped) <= err(plain) * (1 + 1e-3))  # never worse than min/max
    # the searched range; fp16 narrowing of its ends moves 8-bit errors (tiny) by more
    np.testing.assert_allclose(err(clipped), want, rtol=0.05 if bits < 8 else 0.25)
    if bits == 2:  # Gaussian groups: their tails are not worth 2-bit levels
        assert err(clipped)[:, 1:].sum() < 0.8 * err(plain)[:, 1:].sum()


def test_channels_each_in_their_own_width():
    """A per-channel group: channel c's codes at offsets[c]:offsets[c+1], each as a row of its
    own width would be (the reference: quantize_rows one channel at a time)."""
    group, width = 32, 12
    channel_bits = rng.choice(quant.CHANNEL_BITS, width)
    x = (rng.standard_normal((width, group)) * rng.uniform(0.01, 10, (width, 1))).astype(np.float32)
    offsets = quant.channel_offsets(channel_bits, group)
    assert offsets[-1] == channel_bits.sum() * group // 8
    codes = np.zeros(offsets[-1], np.uint8)
    scale, zero = np.zeros((width, 1), np.uint16), np.zeros((width, 1), np.uint16)
    quant.quantize_channels(x, offsets, group, codes, scale, zero)
    out = np.zeros_like(x)
    quant.dequantize_channels(codes, scale, zero, offsets, group, out)
    for c, b in enumerate(channel_bits):
        ref_codes, ref_scale, ref_zero, ref_out = run_quantize(x[c:c + 1], int(b), group)
        np.testing.assert_array_equal(codes[offsets[c]:offsets[c + 1]], ref_codes[0])
        assert (scale[c], zero[c]) == (ref_scale[0], ref_zero[0])
        np.testing.assert_array_equal(out[c], ref_out[0])


def test_channel_bit_allocation():
    """The mean is kept, a heavier channel never gets fewer bits, and the greedy choice is the
    cheapest one an exhaustive search over a few channels finds."""
    import itertools
    weight = rng.lognormal(0, 3, 64)
    for bits in (2, 3):
        b = quant.allocate_channel_bits(weight, bits)
        assert b.sum() == bits * 64 and set(b) <= set(quant.CHANNEL_BITS)
        order = np.argsort(weight)
        assert np.all(np.diff(b[order]) >= 0)
    np.testing.assert_array_equal(quant.allocate_channel_bits(weight, 8), np.full(64, 8))
    w = np.array([5.0, 0.3, 40.0, 1.0])
    cost = lambda b: (w / (2.0 ** np.asarray(b) - 1) ** 2).sum()  # noqa: E731
    best = min((b for b in itertools.product(quant.CHANNEL_BITS, repeat=4) if sum(b) == 8), key=cost)
    assert cost(quant.allocate_channel_bits(w, 2)) == pytest.approx(cost(best))
