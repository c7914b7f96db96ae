"""CUDA kernels against NumPy references on tiny shapes (in Numba's simulator without a GPU)."""
from __future__ import annotations

import math
import types
from dataclasses import replace

import numpy as np
import pytest

from xqrt import quant
from xqrt.gguf_model import Q4_0, Q4_1, Q8_0
from xqrt.kernels import cpu, cuda as kc
from numba import cuda

rng = np.random.default_rng(0)


def blocks(qtype, rows, cols):
    """Random GGUF block rows of a format, and the matrix they hold."""
    nb = cols // 32
    size = {Q4_0: 18, Q4_1: 20, Q8_0: 34}[qtype]
    raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
    raw[:, :, 0:2] = rng.uniform(0.001, 0.02, (rows, nb)).astype(np.float16)[..., None].view(np.uint8)
    if qtype == Q4_1:
        raw[:, :, 2:4] = rng.uniform(-0.1, 0.0, (rows, nb)).astype(np.float16)[..., None].view(np.uint8)
    data = raw.reshape(rows, nb * size)
    dense = np.empty((rows, cols), np.float32)
    cpu.dequantize(data, qtype, dense)
    return data, dense


def device_weights(qtype, rows, cols):
    """A random matrix on the device in a block format (None: float32), and the matrix it holds."""
    if qtype is None:
        dense = rng.standard_normal((rows, cols)).astype(np.float32)
        return kc.upload_dense(dense), dense
    data, dense = blocks(qtype, rows, cols)
    return kc.upload_matrix(qtype, data, cols), dense


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0, None])
@pytest.mark.parametrize("cols", [96, 2336])  # one staged chunk of x, and more than one
def test_matvec_and_embed(qtype, cols):
    rows = 19
    w, dense = device_weights(qtype, rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    out = cuda.device_array(rows, np.float32)
    kc.product(w, cuda.to_device(x), cuda.device_array(cols, np.float32), out)
    np.testing.assert_allclose(out.copy_to_host(), dense @ x, rtol=1e-4, atol=1e-4)
    rows = cuda.device_array((2, cols), np.float32)
    kc.embed[(1, 2), kc.THREADS](*w.args, cuda.to_device(np.array([7, 2])), rows)
    np.testing.assert_allclose(rows.copy_to_host(), dense[[7, 2]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows_per_warp, code_path", [(1, "simulator"), (4, "simulator"), (2, "gpu")],
                         indirect=["code_path"])
def test_matvec_rows_per_warp(rows_per_warp, code_path):
    """The rows-per-warp variants bench/gpu.py measures compute the same product, float x and int8
    codes alike — over a part-filled last block of rows and of the lanes' blocks (73 = 64 + 9)."""
    rows, cols = 19, 2336
    for qtype in (Q4_0, Q4_1, Q8_0):
        data, dense = blocks(qtype, rows, cols)
        w = kc.upload_matrix(qtype, data, cols)
        x = rng.standard_normal(cols).astype(np.float32)
        out = cuda.device_array(rows, np.float32)
        kc.product(w, cuda.to_device(x), cuda.device_array(cols, np.float32), out, rows=rows_per_warp)
        np.testing.assert_allclose(out.copy_to_host(), dense @ x, rtol=1e-4, atol=1e-4)
        ref = np.empty(rows, np.float32)
        act = cpu.new_act(cols, 8)
        cpu.quantize_act(x, act)
        cpu.matvec(data, qtype, x, act, ref)
        kc.product_int8(w, cuda.to_device(x), kc.Int8X.empty(cols), out, rows=rows_per_warp)
        np.testing.assert_allclose(out.copy_to_host(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_a_misaligned_x_is_an_error_as_on_a_gpu():
    """The product's 16-byte loads of x fault on a GPU unless x starts on 16 bytes; the simulator
    fails too, so a test of every caller's x would catch one that does not."""
    w, _ = device_weights(Q4_0, 3, 96)
    x = cuda.to_device(np.zeros(100, np.float32))
    kc.product(w, x[4:], cuda.device_array(96, np.float32), cuda.device_array(3, np.float32))
    with pytest.raises(ValueError, match="4 bytes into its allocation: misaligned on a GPU"):
        kc.product(w, x[1:97], cuda.device_array(96, np.float32), cuda.device_array(3, np.float32))


@pytest.mark.parametrize("qtype", [Q4_1, None])
def test_product_of_swiglu(qtype):
    """product(..., up=u) multiplies silu(x)·u, written to the scratch first."""
    cols = 256
    w, dense = device_weights(qtype, 19, cols)
    x, u = rng.standard_normal((2, cols)).astype(np.float32)
    out = cuda.device_array(19, np.float32)
    kc.product(w, cuda.to_device(x), cuda.device_array(cols, np.float32), out, up=cuda.to_device(u))
    np.testing.assert_allclose(out.copy_to_host(), dense @ (x / (1 + np.exp(-x)) * u), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
@pytest.mark.parametrize("swiglu", [False, True])
def test_int8_product_is_the_cpus_act_bits_8(qtype, swiglu):
    """product_int8 (x as int8 codes, dp4a sums) against xqrt.kernels.cpu.matvec with int8
    activations: the same codes and integer sums, so the same result up to float summation order."""
    rows, cols = 19, 2336
    data, _ = blocks(qtype, rows, cols)
    x, u = rng.standard_normal((2, cols)).astype(np.float32)
    act_input = x / (1 + np.exp(-x)) * u if swiglu else x
    ref = np.empty(rows, np.float32)
    act = cpu.new_act(cols, 8)
    cpu.quantize_act(act_input.astype(np.float32), act)
    cpu.matvec(data, qtype, act_input.astype(np.float32), act, ref)
    out = cuda.device_array(rows, np.float32)
    kc.product_int8(kc.upload_matrix(qtype, data, cols), cuda.to_device(x), kc.Int8X.empty(cols), out,
                    up=cuda.to_device(u) if swiglu else None)
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0, None])
def test_matmat(qtype):
    """product_rows: a prompt's rows through one pass over W, against x · Wᵀ — across the edges
    of a block's 64 rows × 32 positions, and with SwiGLU's silu(x)·up taken on the way."""
    rows, cols, n = 70, 96, 35
    w, dense = device_weights(qtype, rows, cols)
    x, u = rng.standard_normal((2, n, cols)).astype(np.float32)
    out = cuda.device_array((n, rows), np.float32)
    kc.product_rows(w, cuda.to_device(x), out)
    np.testing.assert_allclose(out.copy_to_host(), x @ dense.T, rtol=1e-5, atol=1e-5)
    kc.product_rows(w, cuda.to_device(x), out, up=cuda.to_device(u))
    np.testing.assert_allclose(out.copy_to_host(), (x / (1 + np.exp(-x)) * u) @ dense.T, rtol=1e-5, atol=1e-5)


def test_which_products_reuse_x():
    """int8 codes serve any block format after any other; float weights take float x."""
    D = kc.DENSE
    assert kc.reuses_codes(Q4_0, Q8_0) and kc.reuses_codes(Q8_0, Q4_1)
    assert not kc.reuses_codes(D, Q4_0) and not kc.reuses_codes(Q4_0, D)


@pytest.mark.parametrize("code_path", ["simulator", "gpu"], indirect=True)
def test_elementwise(code_path):
    d = 80
    x = rng.standard_normal((2, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    out = cuda.device_array((2, d), np.float32)
    kc.rmsnorm[2, kc.THREADS](cuda.to_device(x), cuda.to_device(np.zeros((0, d), np.float32)), cuda.to_device(w),
                              np.float32(1e-5), out)
    ref = x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-5)
    residual = rng.standard_normal((2, d)).astype(np.float32)
    x_dev = cuda.to_device(x)
    kc.rmsnorm[2, kc.THREADS](x_dev, cuda.to_device(residual), cuda.to_device(w), np.float32(1e-5), out)
    s = x + residual
    np.testing.assert_allclose(x_dev.copy_to_host(), s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.copy_to_host(), s / np.sqrt((s * s).mean(1, keepdims=True) + 1e-5) * w,
                               rtol=1e-5, atol=1e-5)

    g, u = x[0], x[1]
    h = cuda.device_array(d, np.float32)
    kc.silu_mul[1, kc.THREADS](cuda.to_device(g), cuda.to_device(u), h)
    np.testing.assert_allclose(h.copy_to_host(), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)

    inv_freq = (1e4 ** (-np.arange(0, 16, 2) / 16)).astype(np.float32)
    cos, sin = cpu.rope_table(inv_freq, 8)
    two = x[:, :64].copy()  # positions 5 and 6
    dv = cuda.to_device(two)
    kc.rope[1, kc.THREADS](dv, 16, cuda.to_device(cos), cuda.to_device(sin), kc.position(5))
    ref = two.copy()
    cpu.rope_rows(ref, 4, 16, 5, inv_freq)
    np.testing.assert_allclose(dv.copy_to_host(), ref, rtol=1e-5, atol=1e-5)
    vec, ref = x[0, :64].copy(), ref[0]

    k_cache, v_cache = cuda.device_array((8, 64), np.float16), cuda.device_array((8, 64), np.float16)
    kc.store_kv[1, kc.THREADS](cuda.to_device(vec[None]), cuda.to_device(x[1:2, :64].copy()), 16, cuda.to_device(cos),
                               cuda.to_device(sin), kc.position(5), k_cache, v_cache)
    np.testing.assert_allclose(k_cache.copy_to_host()[5].astype(np.float32), ref.astype(np.float16), rtol=1e-3)
    np.testing.assert_array_equal(v_cache.copy_to_host()[5], x[1, :64].astype(np.float16))


def attention_ref(q, keys, values, n_head, head_dim):
    """Single-query attention: q (n_head·hd), keys/values (n, kv_dim) post-RoPE."""
    n_kv = keys.shape[1] // head_dim
    out = np.empty(n_head * head_dim, np.float32)
    for h in range(n_head):
        k0 = (h // (n_head // n_kv)) * head_dim
        s = keys[:, k0:k0 + head_dim] @ q[h * head_dim:(h + 1) * head_dim] / math.sqrt(head_dim)
        p = np.exp(s - s.max())
        out[h * head_dim:(h + 1) * head_dim] = (p / p.sum()) @ values[:, k0:k0 + head_dim]
    return out


@pytest.mark.parametrize("chunk, code_path", [(256, "simulator"), (16, "simulator"), (16, "gpu")],
                         indirect=["code_path"])
def test_attend_f16(chunk, code_path):
    """Flash attention over an fp16 cache on a grid of 4 parts: one part used, or three (13, 13 and
    11 positions) merged — the blocks past them add nothing — at two positions through the same
    arguments (the position in device memory), as a CUDA graph replays them."""
    n_head, n_kv, hd, n = 4, 2, 16, 37
    q = rng.standard_normal(n_head * hd).astype(np.float32)
    k = rng.standard_normal((48, n_kv * hd)).astype(np.float16)
    v = rng.standard_normal((48, n_kv * hd)).astype(np.float16)
    ws = kc.Workspace(1024, n_head, n_kv * hd)  # room for 4 parts
    out = cuda.device_array(n_head * hd, np.float32)
    at, args = cuda.device_array(1, np.int64), (cuda.to_device(q), cuda.to_device(k), cuda.to_device(v))
    for n in (n, 21):
        at.copy_to_device(np.array([n - 1]))
        kc.attend_f16(*args, at, n_head, hd, ws, out, chunk=chunk)
        ref = attention_ref(q, k[:n].astype(np.float32), v[:n].astype(np.float32), n_head, hd)
        np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_head, n_kv, hd, code_path", [(4, 2, 16, "simulator"), (3, 1, 48, "simulator"),
                                                      (3, 1, 48, "gpu")],  # 48: lanes past the head's end
                         indirect=["code_path"])
def test_attend_prompt(n_head, n_kv, hd, code_path):
    """A prompt's causal attention in one launch: query row t (position pos0 + t) over rows [0,
    pos0 + t], fewer or more positions than a block's warps — of one fp16 history, and of two
    (packed below each query's bounds, exact from them on) against xqrt.cache.mixed_attention."""
    from xqrt.cache import mixed_attention
    pos0, n_q = 3, 6
    end = pos0 + n_q
    q = rng.standard_normal((n_q, n_head * hd)).astype(np.float32)
    k = rng.standard_normal((16, n_kv * hd)).astype(np.float16)
    v = rng.standard_normal((16, n_kv * hd)).astype(np.float16)
    out = cuda.device_array((n_q, n_head * hd), np.float32)
    kc.attend_prompt(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), kc.position(pos0), hd, out)
    for t in range(n_q):
        n = pos0 + t + 1
        ref = attention_ref(q[t], k[:n].astype(np.float32), v[:n].astype(np.float32), n_head, hd)
        np.testing.assert_allclose(out.copy_to_host()[t], ref, rtol=1e-4, atol=1e-5, err_msg=f"row {t}")
    bound_k, bound_v = np.array([0, 0, 4, 4, 4, 8]), pos0 + np.arange(n_q) + 1  # groups of 4 / per token
    k_q, v_q = (rng.standard_normal((b[-1], n_kv * hd)).astype(np.float32) for b in (bound_k, bound_v))
    k_e, v_e = (rng.standard_normal((end - b[0], n_kv * hd)).astype(np.float32) for b in (bound_k, bound_v))
    dev = cuda.to_device
    exact = (dev(k_e), dev(v_e), int(bound_k[0]), int(bound_v[0]), dev(bound_k), dev(bound_v))
    ref = mixed_attention(q, pos0, k_q, v_q, k_e, v_e, bound_k, bound_v, n_head, n_kv)
    kc.attend_prompt(dev(q), dev(k_q), dev(v_q), kc.position(pos0), hd, out, exact=exact)
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-4, atol=1e-5)
    # and a --kv-budget window of the last 3 positions, from fp16 rings (position p in row p mod 11)
    window, ring_rows = 3, 11
    k_w, v_w = (rng.standard_normal((end - (pos0 - window + 1), n_kv * hd)).astype(np.float16) for _ in "kv")
    ring_k, ring_v = (np.zeros((ring_rows, n_kv * hd), np.float16) for _ in "kv")
    rows = np.arange(pos0 - window + 1, end) % ring_rows
    ring_k[rows], ring_v[rows] = k_w, v_w
    ref = mixed_attention(q, pos0, k_q, v_q, k_e, v_e, bound_k, bound_v, n_head, n_kv, window,
                          k_w.astype(np.float32), v_w.astype(np.float32))
    kc.attend_prompt(dev(q), dev(k_q), dev(v_q), kc.position(pos0), hd, out, exact=exact,
                     window=(dev(ring_k), dev(ring_v), window))
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-4, atol=1e-5)


def device_stream(codes, scale, zero, bits, group, off, sink, tail, n_q) -> kc.DeviceStream:
    """Host arrays as xqrt.cache.Stream holds them (scales as fp16 bits; `off` the channel offsets
    of a per-channel stream, else empty) and the exact rows of positions n_q … (None: none) → a
    DeviceStream of positions [0, n_q + len(tail)), as xqrt.gpu uploads a cache's."""
    off = np.asarray(off, np.int64)
    as_f16 = lambda a: cuda.to_device(np.ascontiguousarray(a).view(np.float16))  # noqa: E731
    tail = np.zeros((0, sink.shape[1]), np.float32) if tail is None else tail
    ring = np.zeros((max(len(tail), 1), sink.shape[1]), np.float32)
    ring[(n_q + np.arange(len(tail))) % len(ring)] = tail
    return kc.DeviceStream(cuda.to_device(np.ascontiguousarray(codes)), as_f16(scale), as_f16(zero), int(bits),
                           int(group).bit_length() - 1, cuda.to_device(off),
                           cuda.to_device(kc.channel_bits(off, group)),
                           cuda.to_device(np.ascontiguousarray(sink, np.float32)), cuda.to_device(ring), int(n_q), 0,
                           int(n_q) + len(tail))


def key_stream(z, bits, group, n_sink, channel_bits):
    """Per-channel packing of latents z (n, width) as xqrt.cache.Stream does: complete groups packed,
    the rest an exact tail; returns the stream's arrays and what the kernel should read."""
    n, width = z.shape
    n_q = n // group * group
    off = quant.channel_offsets(channel_bits, group)
    codes = np.zeros((max(n_q // group, 1), 1, off[-1]), np.uint8)
    scale = np.zeros((codes.shape[0], width, 1), np.uint16)
    zero = np.zeros_like(scale)
    seen = z.copy()
    for b in range(n_q // group):
        quant.quantize_channels(np.ascontiguousarray(z[b * group:(b + 1) * group].T), off, group, codes[b, 0],
                                scale[b], zero[b])
        cols = np.empty((width, group), np.float32)
        quant.dequantize_channels(codes[b, 0], scale[b], zero[b], off, group, cols)
        seen[b * group:(b + 1) * group] = cols.T
    sink = z[:n_sink].copy()
    seen[:n_sink] = sink
    return device_stream(codes, scale, zero, bits, group, off, sink, z[n_q:].copy(), n_q), seen


def value_stream(z, bits, group, n_sink):
    n, width = z.shape
    codes = np.zeros((n, 1, quant.row_bytes(width, bits)), np.uint8)
    scale = np.zeros((n, 1, width // group), np.uint16)
    zero = np.zeros_like(scale)
    quant.quantize_rows(z, bits, group, codes[:, 0], scale[:, 0], zero[:, 0])
    seen = np.empty_like(z)
    quant.dequantize_rows(codes[:, 0], scale[:, 0], zero[:, 0], bits, group, seen)
    seen[:n_sink] = z[:n_sink]
    return device_stream(codes, scale, zero, bits, group, np.zeros(0, np.int64), z[:n_sink].copy(), None, n), seen


@pytest.mark.parametrize("rebuild, tensor_cores, n_head, code_path", [
    (True, False, 4, "simulator"), (False, False, 4, "simulator"), (True, True, 4, "simulator"),
    (True, False, 24, "simulator"), (True, False, 4, "gpu")], indirect=["code_path"])
def test_attend_latent(rebuild, tensor_cores, n_head, code_path):
    """XQuant's GQA path (latents · fused factors) and KIVI's (the latent is K / V), against
    dequantize → rebuild → RoPE → attention in NumPy; tensor_cores: the keys rebuilt by kc.Cublas
    (fp16 latents and factors, within fp16's rounding) and read back, 16 positions at a time; 24
    heads: the value sums in two blocks of 16 heads, eight of the second's summing zeros. Then the
    streams with spans, as a decode step's: the same launches at 70 positions (two tiles) and at
    30, only the spans' device copies and the step's reach (the grids; with tensor cores the
    products too, over every position of the reach) changed."""
    n_kv, hd, group, n = 2 if n_head <= 16 else 4, 16, 32, 70
    kv_dim = n_kv * hd
    width = 32
    z_k = rng.standard_normal((n, width)).astype(np.float32)
    z_v = rng.standard_normal((n, width)).astype(np.float32)
    mk = rng.standard_normal((width, kv_dim)).astype(np.float32) if rebuild else np.zeros((0, 0), np.float32)
    mv = rng.standard_normal((width, kv_dim)).astype(np.float32) if rebuild else np.zeros((0, 0), np.float32)
    channel_bits = quant.allocate_channel_bits(rng.random(width), 2)  # mixed 1–4-bit channels
    key, k_seen = key_stream(z_k, 2, group, 2, channel_bits)
    value, v_seen = value_stream(z_v, 3, 16, 2)
    inv_freq = (1e4 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    cos, sin = cpu.rope_table(inv_freq, 128)
    q = rng.standard_normal(n_head * hd).astype(np.float32)
    keys = k_seen @ mk if rebuild else k_seen.copy()
    cpu.rope_rows(keys, n_kv, hd, 0, inv_freq)
    ref = attention_ref(q, keys, v_seen @ mv if rebuild else v_seen, n_head, hd)
    ws = kc.Workspace(128, n_head, width)
    out = cuda.device_array(n_head * hd, np.float32)
    mk_dev = cuda.to_device(mk)
    cublas = kc.Cublas(128, chunk=16) if tensor_cores else None
    # with tensor cores the keys as two runs, the second from position 20: its first chunk starts mid-chunk
    key_runs = [(replace(key, n=20), mk_dev), (replace(key, lo=20), mk_dev)] if tensor_cores else [(key, mk_dev)]
    kc.attend_latent(cuda.to_device(q), key_runs, [(value, cuda.to_device(mv))],
                     cuda.to_device(cos), cuda.to_device(sin), n_kv, hd, ws, out,
                     cublas=cublas)
    tol = 2e-2 if tensor_cores else 2e-4
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=tol, atol=tol)
    spans_host = np.zeros((2, 3), np.int64)
    spans = cuda.to_device(spans_host)
    with_span = lambda stream, i: replace(stream, span=spans[i])  # noqa: E731
    args = (cuda.to_device(q), [(with_span(key, 0), mk_dev)], [(with_span(value, 1), cuda.to_device(mv))],
            cuda.to_device(cos), cuda.to_device(sin), n_kv, hd, ws, out)
    for upto, reach in ((n, 128), (30, 32)):  # packed keys below min(n_q, upto): 30 is inside the first group
        spans_host[:] = (min(key.n_q, upto), 0, upto), (upto, 0, upto)
        spans.copy_to_device(spans_host)
        kc.attend_latent(*args, cublas=cublas, reach=reach)
        ref = attention_ref(q, keys[:upto], (v_seen @ mv if rebuild else v_seen)[:upto], n_head, hd)
        np.testing.assert_allclose(out.copy_to_host(), ref, rtol=tol, atol=tol)
    lat = cuda.device_array((n, width), np.float16)
    kc.dequantize_stream[(2, 1), kc.THREADS](*key.args, 0, lat)  # 70 rows in two tiles of positions
    np.testing.assert_allclose(lat.copy_to_host(), k_seen.astype(np.float16))
    kc.dequantize_stream[(1, 1), kc.THREADS](*replace(key, lo=32, n=35).args, 30, lat[:8])  # positions 30-37
    want = np.zeros((8, width), np.float16)
    want[2:5] = k_seen[32:35]  # positions outside [lo, n) are zero rows
    np.testing.assert_allclose(lat.copy_to_host()[:8], want)


def test_tensor_core_keys_of_a_ring():
    """kc.Cublas over a decode step's spanned runs, as XQuant-CL's: the keys of positions [0, 20)
    from rows of every position (fp32: dequantized, 16 positions at a time over the reach of 32,
    those past 20 zero), then of [20, 27) from an fp16 ring of 8 rows (in place, all its rows at
    once: each holds the position its own row holds) — the same attention as the fused kernels'."""
    n_head, n_kv, hd, width, n, ring_rows, reach = 4, 2, 16, 32, 27, 8, 32
    z = rng.standard_normal((reach, width)).astype(np.float32)
    ring = np.zeros((ring_rows, width), np.float16)
    ring[np.arange(20, n) % ring_rows] = z[20:n]
    z[20:n] = ring[np.arange(20, n) % ring_rows]  # what the ring holds
    mk, mv = (rng.standard_normal((width, n_kv * hd)).astype(np.float32) for _ in range(2))
    spans = cuda.to_device(np.array([(0, 0, 20), (0, 20, n)], np.int64))
    runs = [kc.exact_stream(cuda.to_device(z), span=spans[0]), kc.exact_stream(cuda.to_device(ring), span=spans[1])]
    inv_freq = (1e4 ** (-np.arange(0, hd, 2) / hd)).astype(np.float32)
    cos, sin = cpu.rope_table(inv_freq, reach)
    q = rng.standard_normal(n_head * hd).astype(np.float32)
    keys = z[:n] @ mk
    cpu.rope_rows(keys, n_kv, hd, 0, inv_freq)
    ref = attention_ref(q, keys, z[:n] @ mv, n_head, hd)
    ws = kc.Workspace(reach, n_head, width)
    for cublas, tol in ((None, 2e-4), (kc.Cublas(reach, chunk=16), 2e-2)):
        out = cuda.device_array(n_head * hd, np.float32)
        mk_dev, mv_dev = cuda.to_device(mk), cuda.to_device(mv)
        kc.attend_latent(cuda.to_device(q), [(r, mk_dev) for r in runs], [(r, mv_dev) for r in runs],
                         cuda.to_device(cos), cuda.to_device(sin), n_kv, hd, ws, out, cublas=cublas, reach=reach)
        np.testing.assert_allclose(out.copy_to_host(), ref, rtol=tol, atol=tol)
    assert [(p.first, p.end, p.ring, p.lo, p.hi) for p in cublas.pieces(runs[0], reach, rings=True)] == \
        [(0, 16, 16, 0, 16), (16, 32, 16, 16, 32)]
    assert [(p.first, p.end, p.ring, p.lo, p.hi) for p in cublas.pieces(runs[1], reach, rings=True)] == \
        [(0, ring_rows, ring_rows, 0, reach)]
    bounds = cuda.device_array(3, np.int64)  # a piece's: nothing packed, its positions only, none past its run's
    for first, end, want in ((0, 16, [0, 0, 16]), (16, 32, [0, 16, 20]), (24, 32, [0, 24, 24])):
        kc.clip_span[1, 32](cuda.to_device(np.array([5, 0, 20], np.int64)), first, end, bounds)
        assert bounds.copy_to_host().tolist() == want


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_rebuild(tensor_cores):
    """z·m rows of a stream's positions [lo, n) at out[p − base]; m empty: z itself; add: XQuant-CL's
    accumulator, acc = Δ̂ · ukvᵀ (the seed), then acc += Δ̂' · ukvᵀ, into fp16 rows; tensor_cores:
    through kc.Cublas (fp16 latents and factors), whose fp16 Â is also read in place, 16 positions at
    a time (from lo = 5: a first chunk of 11)."""
    n, width, d = 70, 32, 136  # two position tiles, two column tiles
    ukv_t = rng.standard_normal((width, d)).astype(np.float32)
    acc = cuda.to_device(np.full((n, d), np.nan, np.float16))
    total = np.zeros((n, d), np.float32)
    cublas = kc.Cublas(n, chunk=16) if tensor_cores else None
    tol = 2e-2 if tensor_cores else 2e-3
    for add in (False, True):
        delta, seen = value_stream(rng.standard_normal((n, width)).astype(np.float32), 2, 16, 0)
        kc.rebuild_rows(delta, cuda.to_device(ukv_t), acc, 0, add, cublas)
        if add:  # a first sum the two sides round to neighbouring halves stays one half's spacing apart
            step = np.spacing(np.abs(total).astype(np.float16)).astype(np.float32)
        total = (total + seen @ ukv_t).astype(np.float16).astype(np.float32)
    got = acc.copy_to_host().astype(np.float32)
    assert (np.abs(got - total) <= tol + tol * np.abs(total) + step).all()
    lo = 5
    out = cuda.device_array((n - lo, width), np.float32)
    kc.rebuild_rows(replace(delta, lo=lo), cuda.to_device(np.zeros((0, 0), np.float32)), out, lo, False, cublas)
    np.testing.assert_array_equal(out.copy_to_host(), seen[lo:])
    # K from Â (float32 rows at out[p − lo]); rows of 18 floats do not start on 16 bytes, so the fused
    # kernel stages this factor an element at a time (ukv_t's rows four at a time)
    wk = rng.standard_normal((d, 18)).astype(np.float32)
    out = cuda.device_array((n - lo, 18), np.float32)
    kc.rebuild_rows(kc.exact_stream(acc, lo, n), cuda.to_device(wk), out, lo, False, cublas)
    np.testing.assert_allclose(out.copy_to_host(), acc.copy_to_host()[lo:].astype(np.float32) @ wk, rtol=tol,
                               atol=tol * 10)


@pytest.mark.parametrize("bits, group, n_sink, clip, code_path", [
    (2, 8, 0, False, "simulator"), (2, 8, 0, True, "simulator"), (3, 16, 2, True, "simulator"),
    (4, 32, 4, False, "simulator"), (8, 8, 1, False, "simulator"), (3, 16, 2, True, "gpu")], indirect=["code_path"])
def test_cache_writes_are_xqrt_quant_bit_for_bit(bits, group, n_sink, clip, code_path):
    """store_token (per-token rows, sinks, the fp16 ring) and store_channel_group (the per-channel
    groups of mixed 1-4-bit channels that a launch's rows complete — none for a row inside a group,
    two for G + 1 rows from a group's last position — read from the ring, sinks left out of their
    ranges) write the bytes xqrt.cache.Stream.write does — with clip, in the ranges of least squared
    error."""
    from xqrt.cache import Stream
    width, n = 32, 2 * group
    z = (rng.standard_normal((n, width)) * rng.uniform(0.01, 50, width)).astype(np.float32)
    z16 = z.astype(np.float16).astype(np.float32)
    channel_bits = [bits] * width if bits == 8 else quant.allocate_channel_bits(rng.random(width), min(bits, 3))
    token, channel, unclipped = (Stream(n, width, bits, group, per_channel=per_channel, sinks=n_sink, clip=c,
                                        channel_bits=channel_bits if per_channel else None)
                                 for per_channel, c in ((False, clip), (True, clip), (False, False)))
    for stream in (token, unclipped):
        stream.write(0, z16)
    for g0 in range(0, n, group):
        channel.write(g0, z16[g0:g0 + group])
    assert (token.scale != unclipped.scale).any() == clip  # clipping moved some ranges
    dev = lambda a: cuda.to_device(np.ascontiguousarray(a))  # noqa: E731
    codes, scale, zero = dev(np.zeros_like(token.codes)), dev(np.zeros_like(token.scale).view(np.float16)), \
        dev(np.zeros_like(token.zero).view(np.float16))
    sink = dev(np.zeros_like(token.sink))
    ring = dev(np.zeros((group, width), np.float16))
    c_codes, c_scale = dev(np.zeros_like(channel.codes)), dev(np.zeros_like(channel.scale).view(np.float16))
    c_zero, c_sink = dev(np.zeros_like(channel.zero).view(np.float16)), dev(np.zeros_like(channel.sink))
    off = dev(channel.channel_off)
    cbits = dev(kc.channel_bits(channel.channel_off, group))
    at = kc.position
    kc.store_token[(1, 3), 32](dev(z[:3]), ring, codes, scale, zero, bits, group, sink, at(0), True, clip)  # rows at once
    for pos in range(3, n):
        kc.store_token[1, 32](dev(z[pos:pos + 1]), ring, codes, scale, zero, bits, group, sink, at(pos), True, clip)
    ring_2 = dev(np.zeros((n, width), np.float16))  # both groups, from a ring that holds them
    kc.store_token[(1, n), 32](dev(z), ring_2, codes, scale, zero, bits, group, c_sink, at(0), False, clip)
    for pos in (0, group - 2):  # rows that complete no group: nothing packed
        kc.store_channel_group[(1, 1), 32](ring_2, c_codes, c_scale, c_zero, off, cbits, group, c_sink, at(pos), 1,
                                           clip)
    assert not c_codes.copy_to_host().any() and not c_scale.copy_to_host().any()
    kc.store_channel_group[(1, 2), 32](ring_2, c_codes, c_scale, c_zero, off, cbits, group, c_sink, at(group - 1),
                                       group + 1, clip)
    np.testing.assert_array_equal(codes.copy_to_host(), token.codes)
    np.testing.assert_array_equal(scale.copy_to_host().view(np.uint16), token.scale)
    np.testing.assert_array_equal(zero.copy_to_host().view(np.uint16), token.zero)
    np.testing.assert_array_equal(sink.copy_to_host(), token.sink)
    np.testing.assert_array_equal(ring.copy_to_host(), z16[group:].astype(np.float16))  # the last G positions
    np.testing.assert_array_equal(c_codes.copy_to_host(), channel.codes)
    np.testing.assert_array_equal(c_scale.copy_to_host().view(np.uint16), channel.scale)
    np.testing.assert_array_equal(c_zero.copy_to_host().view(np.uint16), channel.zero)
    np.testing.assert_array_equal(c_sink.copy_to_host(), channel.sink)


def device_step(model, n_ctx, tensor_cores=False):
    """What DeviceCache.attend_device reads of a GpuStep: its vectors (and their 1-row views),
    scratch, RoPE tables, position (pos_at, the caller's to set), stream, how it rebuilds, and
    that it is not captured."""
    from types import SimpleNamespace
    c = model.config
    cos, sin = cpu.rope_table(model.rope_freqs, n_ctx)
    xn, k, v = (cuda.device_array((1, w), np.float32) for w in (c.d_model, c.kv_dim, c.kv_dim))
    return SimpleNamespace(kc=kc, xn=xn, xn_vec=xn.reshape(-1), k_row=k, k=k.reshape(-1), v_row=v, v=v.reshape(-1),
                           q=cuda.device_array(c.q_dim, np.float32),
                           xp=cuda.device_array(c.d_model, np.float32), cos=cuda.to_device(cos),
                           sin=cuda.to_device(sin), attn=cuda.device_array(c.q_dim, np.float32),
                           pos_at=cuda.device_array(1, np.int64), stream=0, graphs=False,
                           cublas=kc.Cublas(n_ctx, chunk=4) if tensor_cores else None)


@pytest.fixture(scope="module")
def three_layer_models(tmp_path_factory):
    """Tiny GQA and MHA models of three layers: an XQuant-CL cache with two base layers holds one
    plain XQuant layer, its seed layer and one delta layer."""
    from conftest import tiny_llama, write_llama_gguf
    return {kind: write_llama_gguf(tmp_path_factory.mktemp(kind), tiny_llama(n_head=4, n_kv_head=n_kv, hidden=64,
                                                                             layers=3, ff=128))
            for kind, n_kv in (("gqa", 2), ("mha", 4))}


# The simulator runs a block's threads as greenlets (tests/cudasim.py); a position of three layers
# still takes 1–4 s here: XQuant-CL (its base layers plain XQuant) and KIVI in the default run.
@pytest.mark.parametrize("kind, mode, options, n_ctx", [
    ("gqa", "xquant-cl", dict(bits=2, base_layers=2, clip=True, window=3), 9),
    ("gqa", "kivi", dict(bits=2, clip=True), 9),
    pytest.param("gqa", "xquant", dict(bits=3, value_bits=4, residual=16, rotate=False), 17, marks=pytest.mark.slow),
    pytest.param("gqa", "xquant", dict(bits=3, window=5), 17, marks=pytest.mark.slow),
    pytest.param("mha", "xquant-cl", dict(bits=3, base_layers=2), 9, marks=pytest.mark.slow),
    pytest.param("mha", "kivi", dict(bits=4, sinks=0), 9, marks=pytest.mark.slow),
    pytest.param("gqa", "xquant-cl", dict(bits=3, base_layers=2, tensor_cores=True), 9, marks=pytest.mark.slow),
])
def test_device_cache_steps_match_the_cpu_cache(three_layer_models, kind, mode, options, n_ctx):
    """Decode steps of every layer through DeviceLatentCache against xqrt.cache's own, past the
    first per-channel group (positions read packed, from the rings and from the sinks): the same
    attention outputs and the same packed bytes — all of them for KIVI, whose latents are k and v
    themselves; nearly all where the latents are products the two sides sum in other orders.
    window: a --kv-budget of that many positions' fp16 K/V; tensor_cores: keys and Â rebuilt through
    kc.Cublas, in fp16 (outputs within its rounding)."""
    from xqrt.cache import FP16KV, CacheOptions, make_cache
    from xqrt.gguf_model import load_model
    from xqrt.gpu import DeviceLatentCache
    model = load_model(three_layer_models[kind])
    c = model.config
    options = dict(options)
    window, tensor_cores = options.pop("window", 0), options.pop("tensor_cores", False)
    opts = CacheOptions(**{"group": 8, "sinks": 2, "kv_budget": window * FP16KV.bytes_per_position(c), **options})
    host, device = make_cache(mode, model, n_ctx, opts), DeviceLatentCache(model, n_ctx, mode, opts)
    step = device_step(model, n_ctx, tensor_cores)
    tol = 3e-2 if tensor_cores else 1e-3
    for pos in range(n_ctx):
        step.pos_at.copy_to_device(np.array([pos]))
        device.set_position(pos)
        for layer in range(c.n_layer):
            xn, q = rng.standard_normal(c.d_model).astype(np.float32), rng.standard_normal(c.q_dim).astype(np.float32)
            k, v = rng.standard_normal(c.kv_dim).astype(np.float32), rng.standard_normal(c.kv_dim).astype(np.float32)
            ref = host.attend(layer, pos, xn[None], q[None], k[None], v[None])[0]
            for name, a in (("xn_vec", xn), ("q", q), ("k", k), ("v", v)):
                getattr(step, name).copy_to_device(a)
            device.attend_device(step, layer, pos)
            np.testing.assert_allclose(step.attn.copy_to_host(), ref, rtol=tol, atol=tol,
                                       err_msg=f"position {pos}, layer {layer}")
        host.advance(1)
        device.advance(1)
    assert device.nbytes() == host.nbytes() and device.describe() == host.describe()
    same = total = 0
    for D, L in zip(device.layers, host.layers):
        for d, h in ((D.key, L.key), (D.value, L.value), (D.delta, L.delta)):
            if h is not None:
                codes = d.codes.copy_to_host()
                same, total = same + (codes == h.codes).sum(), total + codes.size
                if mode == "kivi":
                    np.testing.assert_array_equal(codes, h.codes)
                    np.testing.assert_array_equal(d.scale.copy_to_host().view(np.uint16), h.scale)
                    np.testing.assert_array_equal(d.sink.copy_to_host(), h.sink)
    assert same >= 0.99 * total


def test_engine_on_the_gpu_matches_the_cpu(tmp_path):
    """Decode steps of a tiny one-layer GQA model through the GPU step (fp16 K/V, and XQuant's
    latents, in device memory) against the CPU engine with the same activation codes: 16 bits
    (the GPU's float x), 8 bits (both int8 codes and integer block sums); q/k/v and gate/up as one
    stacked product each, and one by one; and XQuant's keys rebuilt on tensor cores (--rebuild cublas,
    within fp16's rounding)."""
    from conftest import tiny_llama, write_llama_gguf

    from xqrt import Engine
    from xqrt.errors import XQError
    # Q4_0 layers (embedding and output Q8_0): products of one x share its int8 codes
    path = write_llama_gguf(tmp_path, tiny_llama(n_head=2, n_kv_head=1, hidden=64, layers=1, ff=128), "q4_0")
    ids = [5, 17]
    for mode, act_bits, stacked, rebuild in (("fp16", 16, True, "fused"), ("fp16", 8, False, "fused"),
                                             ("xquant", 8, True, "fused"), ("xquant", 8, True, "cublas")):
        gpu = Engine(path, ctx=8, cache=mode, device="cuda", act_bits=act_bits, rebuild=rebuild)
        for L in gpu._gpu.layers:
            assert L["wqkv"] is not None and L["w_gate_up"] is not None  # one format: stacked at upload
            if not stacked:  # q/k/v and gate/up one product each, as where their formats differ
                L["wqkv"] = L["w_gate_up"] = None
        tol = 1e-4 if rebuild == "fused" else 2e-2
        np.testing.assert_allclose(gpu.logits(ids), Engine(path, ctx=8, cache=mode, act_bits=act_bits).logits(ids),
                                   rtol=tol, atol=tol, err_msg=f"{mode} {rebuild}")
    assert gpu._gpu.cublas is not None
    with pytest.raises(XQError, match=r"^--rebuild cublas is a GPU setting \(--device cuda\)$"):
        Engine(path, ctx=8, cache="xquant", rebuild="cublas")
    with pytest.raises(XQError, match="unknown rebuild 'tensor'"):
        Engine(path, ctx=8, cache="xquant", device="cuda", rebuild="tensor")
    with pytest.raises(XQError, match="on the GPU, where --fp16-channels"):
        gpu.new_cache(fp16_channels=2)
    with pytest.raises(XQError, match="runs on the GPU and this cache does not"):
        gpu.forward(ids, Engine(path, ctx=8).new_cache())


# The simulator takes about 1 s a decode step here; the case that is never captured is left to the
# slow run.
@pytest.mark.parametrize("mode, options", [
    ("fp16", {}),
    ("xquant", dict(group=16, bits=3)),  # the key group of positions 0-15 packed at 15, read packed at 16
    ("kivi", dict(group=8, kv_budget=5 * 128)),  # a window of 5 positions
    ("xquant-cl", dict(group=8, base_layers=1)),  # the seed and a delta layer
    ("xquant", dict(group=8, rebuild="cublas")),  # products of 8 positions, 2 then 3 per reach
])
def test_cuda_graph_replays_the_step(tmp_path, monkeypatch, mode, options):
    """cuda_graphs: the step's launches recorded once — as a CUDA graph captures them: kernels,
    grids and arguments, all on the capture's stream, nothing run, nothing allocated or copied —
    then replayed for each later token give the logits of launching them one by one, through a
    13-token prompt and decode steps at positions 13 (launched), 14 (captured), 15 and 16: no
    argument changes with the token or position but their device copies (the step's GpuStep.at, a
    latent cache's spans). A latent cache's step is captured again where its reach (its grids'
    positions, here at least 8) doubles: 16 from position 15 on, then the context's 24 at 16. The
    capture launches no kernel for argument types that nothing launched before it (on a GPU it would
    compile there, which a capture must not do). A new cache is captured anew. With rebuild cublas
    the capture records the tensor-core products (torch's work on the capture's stream) as well."""
    from conftest import launch_types, tiny_llama, write_llama_gguf
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    from xqrt import Engine, gpu
    from xqrt.errors import XQError

    def signature(kernel, args):
        return kernel.fn, launch_types(args)
    compiled, launch, product = set(), FakeCUDAKernel.__call__, kc.Cublas._product

    def noting(kernel, *args):
        if not kernel._device:  # a kernel's launch, not a device function's call within one
            compiled.add(signature(kernel, args))
        return launch(kernel, *args)
    monkeypatch.setattr(FakeCUDAKernel, "__call__", noting)

    class Recorded:
        made = 0

        def __init__(self, step, cache):
            self.launches = []
            capture_stream = object()

            def configure(kernel, launch):
                kernel.grid_dim, kernel.block_dim = launch[0], launch[1]
                kernel.on_stream = launch[2] if len(launch) > 2 else 0
                return kernel

            def record(kernel, *args):
                assert kernel.on_stream is capture_stream, f"{kernel.fn.__name__} launched off the capture's stream"
                assert signature(kernel, args) in compiled, f"{kernel.fn.__name__} would compile in the capture"
                grid, block = kernel.grid_dim, kernel.block_dim
                self.launches.append(lambda: kernel[grid, block](*args))

            def record_product(cublas, *args):
                self.launches.append(lambda: product(cublas, *args))

            def no(*args, **kwargs):
                raise AssertionError("a capture allocates or copies nothing")
            with monkeypatch.context() as m:
                m.setattr(FakeCUDAKernel, "__getitem__", configure)
                m.setattr(FakeCUDAKernel, "__call__", record)
                m.setattr(kc.Cublas, "_product", record_product)
                for name in ("to_device", "device_array", "synchronize"):
                    m.setattr(cuda, name, no)
                m.setattr(FakeCUDAArray, "copy_to_host", no)
                m.setattr(FakeCUDAArray, "copy_to_device", no)
                step.stream = capture_stream
                try:
                    step.launches(cache, None)
                finally:
                    step.stream = 0
            Recorded.made += 1

        def replay(self):
            for launch_ in self.launches:
                launch_()

    layers = 2 if mode == "xquant-cl" else 1
    path = write_llama_gguf(tmp_path, tiny_llama(n_head=2, n_kv_head=1, hidden=64, layers=layers, ff=128), "q4_0")
    options = dict(options)
    rebuild = options.pop("rebuild", "fused")
    if mode == "fp16":
        with pytest.raises(XQError, match=r"^--cuda-graphs: the simulator has no CUDA graphs$"):
            Engine(path, ctx=24, device="cuda", cuda_graphs=True)
        with pytest.raises(XQError, match=r"^--cuda-graphs is a GPU setting \(--device cuda\)$"):
            Engine(path, ctx=24, cuda_graphs=True)
    monkeypatch.setattr(gpu, "graph_support", lambda: None)
    monkeypatch.setattr(gpu, "StepGraph", Recorded)
    monkeypatch.setattr(gpu.DeviceLatentCache, "least_reach", 8)
    monkeypatch.setattr(kc, "CUBLAS_CHUNK", 8)
    graphed, launched = (Engine(path, ctx=24, cache=mode, device="cuda", cuda_graphs=on, rebuild=rebuild, **options)
                         for on in (True, False))
    on_graph, one_by_one = graphed.new_cache(), launched.new_cache()
    for tokens in (list(range(5, 5 + 13 * 7, 7)), [11, 12, 13, 14]):  # a prefill, then four decode steps
        np.testing.assert_array_equal(graphed.forward(tokens, on_graph, True),
                                      launched.forward(tokens, one_by_one, True))
    reaches = [0] if mode == "fp16" else [16, 24]
    assert Recorded.made == len(reaches) and launched._gpu._graphs is None
    assert list(graphed._gpu._graphs[1]) == reaches
    graphed.forward([11, 12], graphed.new_cache())  # a new cache's first step is launched, then captured
    assert Recorded.made == len(reaches) + 1


@pytest.mark.parametrize("mode, options", [
    ("fp16", {}),
    ("xquant-cl", dict(group=8, base_layers=1)),  # two layers: the seed, and a delta layer after it
    ("kivi", dict(group=8, kv_budget=5 * 128)),  # a window of 5 positions
    ("xquant", dict(group=8, residual=16, bits=3)),
    pytest.param("xquant-cl", dict(group=8, base_layers=1, rebuild="cublas"), marks=pytest.mark.slow),
])
def test_prompt_on_the_gpu_matches_the_cpu(tmp_path, monkeypatch, mode, options):
    """A prompt longer than the decode step takes (9 tokens) through the GPU's prefill — matrix-
    matrix products, the cache's rows stored and attended at once — against the CPU's batched
    prefill: every position's logits (both float x), then a second prompt on the same cache, whose
    queries read the first's history, its last logits alone (the lm head: the CPU's 16-bit codes
    against the GPU's float x, within 1e-4).
    Groups of 8 positions, so per-channel key groups fill during the prompts; a latent cache takes
    4 rows at a time, so a prompt comes in parts and the rings wrap within it. rebuild cublas: K, V
    and Â rebuilt on tensor cores (within fp16's rounding)."""
    from conftest import tiny_llama, write_llama_gguf

    from xqrt import Engine
    from xqrt.gpu import DeviceLatentCache
    monkeypatch.setattr(DeviceLatentCache, "prompt_rows", 4)
    layers = 2 if mode == "xquant-cl" else 1
    path = write_llama_gguf(tmp_path, tiny_llama(n_head=2, n_kv_head=1, hidden=64, layers=layers, ff=128), "q4_0")
    ids = list(range(5, 5 + 9 * 7, 7))
    options = dict(options)
    rebuild = options.pop("rebuild", "fused")
    gpu, host = Engine(path, ctx=24, cache=mode, device="cuda", rebuild=rebuild, **options), \
        Engine(path, ctx=24, cache=mode, **options)
    on_gpu, on_host = gpu.new_cache(), host.new_cache()
    for prompt, all_logits in ((ids, True), (ids[::-1], False)):
        tol = 2e-2 if rebuild == "cublas" else 1e-5 if all_logits else 1e-4
        np.testing.assert_allclose(gpu.forward(prompt, on_gpu, all_logits), host.forward(prompt, on_host, all_logits),
                                   rtol=tol, atol=tol)


def test_out_of_device_memory_is_one_error_line(tmp_path, monkeypatch):
    """The driver's out-of-memory error (a cache too long for the GPU) becomes an XQError; another
    driver error stays what it is."""
    from conftest import tiny_llama, write_llama_gguf
    from numba.cuda.cudadrv.driver import CudaAPIError

    from xqrt import Engine
    from xqrt.errors import XQError
    path = write_llama_gguf(tmp_path, tiny_llama(n_head=2, n_kv_head=1, hidden=64, layers=1, ff=128), "q4_0")

    def failing(code):
        def allocate(*args):
            e = CudaAPIError(code, "from the driver")
            e.code = code  # the simulator's class keeps no code of its own
            raise e
        return allocate
    monkeypatch.setattr(kc.Workspace, "__init__", failing(2))  # CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(XQError, match=r"^--device cuda: the GPU has no room for a cache of 100000 tokens \(a smaller"):
        Engine(path, ctx=100000, device="cuda")
    monkeypatch.setattr(kc.Workspace, "__init__", failing(700))  # CUDA_ERROR_ILLEGAL_ADDRESS
    with pytest.raises(CudaAPIError):
        Engine(path, ctx=8, device="cuda")


def test_step_reach():
    """A decode step's grids cover the power of two at or above its positions, from `least` up to the
    granule, then the multiple of the granule at or above them, at most the context: never fewer
    positions than the step reads, under twice as many above `least`, under a granule more past it."""
    from xqrt import gpu
    reaches = [gpu.step_reach(pos, 280, 16, 64) for pos in range(280)]
    for pos, reach in enumerate(reaches):
        assert pos < reach <= 280
        if reach <= 64:
            assert reach & (reach - 1) == 0 and (reach == 16 or reach < 2 * (pos + 1))
        else:
            assert reach == 280 or reach % 64 == 0 and reach < pos + 1 + 64
    assert sorted(set(reaches)) == [16, 32, 64, 128, 192, 256, 280]
    assert gpu.step_reach(40000, 131072, 256, 16384) == 49152 and gpu.step_reach(100, 131072, 256, 16384) == 256


def test_stream_extent():
    """A launch covers a stream's [lo, n), or with a span the step's reach — an exact stream's no more
    than its rows (a ring of them holds every position it reads at once)."""
    span = cuda.to_device(np.array([0, 90, 100], np.int64))
    ring = cuda.device_array((40, 8), np.float16)
    assert kc.exact_stream(ring, 90, 100).extent(128) == 10
    assert kc.exact_stream(ring, span=span).extent(128) == 40
    assert kc.exact_stream(ring, span=span).extent(32) == 32
    packed, _ = value_stream(rng.standard_normal((100, 8)).astype(np.float32), 4, 8, 0)
    assert replace(packed, span=span).extent(128) == 128


def test_device_choice(monkeypatch):
    from xqrt.errors import XQError
    from xqrt.cache import CacheOptions
    from xqrt.gguf_model import ModelConfig
    from xqrt.gpu import pick_device
    config = ModelConfig(arch="llama", n_layer=2, d_model=96, n_ff=128, n_head=4, n_kv_head=2, head_dim=24,
                         rope_dim=24, rope_base=1e4, rope_scale=1.0, norm_eps=1e-5, vocab_size=300, ctx_train=512)
    plain, cpu_only = CacheOptions(), CacheOptions(fp16_channels=2)
    said = []
    assert pick_device("cpu", "xquant", config, plain) == "cpu"
    assert pick_device("auto", "xquant-cl", config, plain) == "cuda"  # the simulator stands in for a GPU
    assert pick_device("auto", "xquant", config, cpu_only, said.append) == "cpu"
    assert said == ["xqrt: device cpu (--fp16-channels runs on the CPU only)"]
    with pytest.raises(XQError, match="--device cuda: the CUDA cache writes take power-of-two groups"):
        pick_device("cuda", "kivi", config, CacheOptions(group=24))
    monkeypatch.setattr(kc, "available", lambda: False)
    with pytest.raises(XQError, match="finds no CUDA GPU"):
        pick_device("cuda", "fp16", config, plain)
    assert pick_device("auto", "fp16", config, plain) == "cpu"
    with pytest.raises(XQError, match="unknown device"):
        pick_device("tpu", "fp16", config, plain)


def bench_gpu():
    """bench/gpu.py as a module (bench_gpu, the name bench/ptx_check.py finds its kernels by)."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "bench_gpu", os.path.join(os.path.dirname(__file__), "..", "bench", "gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_gpu_kernels():
    """bench/gpu.py's own two kernels, the fp32 ceiling's FMA chains and the prompt products' Q4_0
    → float32 weights, on tiny shapes (so that CI also compiles them for a GPU)."""
    bench = bench_gpu()
    out = cuda.device_array(64, np.float32)
    bench.fma_chain[2, 32](out, 3)
    a = np.array([np.float32(i) * np.float32(1e-9) for i in range(64)], np.float32)[:, None]
    a = np.concatenate([a, np.broadcast_to(np.arange(1, 8, dtype=np.float32), (64, 7))], axis=1)
    for _ in range(3):
        a = a * np.float32(0.9999) + np.float32(1e-4)
    np.testing.assert_allclose(out.copy_to_host(), a.sum(1), rtol=1e-6)
    data, dense = blocks(Q4_0, 3, 288)
    w, got = kc.upload_matrix(Q4_0, data, 288), cuda.device_array((3, 288), np.float32)
    bench.dequantize_rows[(3, 2), kc.THREADS](*w.args, got)
    np.testing.assert_array_equal(got.copy_to_host(), dense)


def test_bench_gpu_runs(monkeypatch):
    """bench/gpu.py's fp16 prefill and its decode step of every mode (and of --rebuild cublas), on a
    tiny shape with random contents made by CPU torch: what a lent GPU's few minutes would otherwise
    find broken (a kernel signature the bench did not follow). Each timing runs its step once."""
    bench = bench_gpu()
    shape = dict(d=64, n_head=4, n_kv_head=2, head_dim=16, n_ff=128, vocab=96, n_layer=1)
    for name, value in (("DEVICE", "cpu"), ("GROUP", 16), ("PROMPT", 8), ("LLAMA3_8B", shape),
                        ("seconds", lambda fn, least=0, most=0: (fn(), 1.0)[1])):
        monkeypatch.setattr(bench, name, value)
    n = 40  # two per-channel key groups packed, eight positions exact
    model = bench.Model(shape, n)
    assert bench.prompt_seconds(model) == 1.0
    run_mode = bench.run_mode

    def checked(one, step):
        t_step, t_graph, t_attn = run_mode(one, step)
        assert (t_step, t_attn) == (1.0, 1.0) and t_graph == "no CUDA graphs without a GPU"
        assert np.isfinite(model.attn.copy_to_host()).all()
        return t_step, t_graph, t_attn
    monkeypatch.setattr(bench, "run_mode", checked)
    plan = [("fp16", 16, False), ("kivi", 2, False), ("kivi", 4, False), ("xquant", 3, False), ("xquant-cl", 3, False),
            ("xquant", 3, True), ("xquant-cl", 2, True)]
    rows, decode, fp16_step, profiles = [], {}, {}, []
    bench.decode_table(model, plan, [n], 3, 3e12, 5e13, shape, rows.append, decode, fp16_step, profiles)
    rows = [row for row in rows if row.startswith("|")]  # not the notes of graphs not captured
    assert not [row for row in rows if "failed" in row] and len(decode) == len(plan) == len(rows)
    assert fp16_step == {n: 1.0} and len(profiles) == 4  # fp16 KV's and the 3-bit modes' (at the longest context)
    assert profiles[0][-1] == "no table: no profiler without a GPU"
    table = bench.targets(3e12, [], decode, n, "int8")
    assert "not measured" not in "".join(table[3:])


def test_bench_gpu_targets():
    """bench/gpu.py's verdicts on the issue's four targets, from a run's figures (the H100 run's),
    the engine's product configuration alone counted; a figure the run lacks is said to be missing."""
    bench = bench_gpu()
    copy_bw = 3e12
    at = lambda fraction: 1e6 / (fraction * copy_bw)  # noqa: E731 — seconds for 1 MB at a fraction of copy
    matvec = [("Q4_0", "a", "int8", kc.ROWS, 1e6, at(0.8)), ("Q4_0", "b", "int8", kc.ROWS, 1e6, at(0.75)),
              ("Q8_0", "a", "int8", kc.ROWS, 1e6, at(0.6)), ("Q8_0", "a", "float", kc.ROWS, 1e6, at(0.1)),
              ("Q8_0", "a", "int8", kc.ROWS + 1, 1e6, at(0.05))]
    decode = {("fp16", 16, 32768): dict(bpt=131072, fit=122070, best=0.0322, ratio=1.0),
              ("xquant", 3, 32768): dict(attn=0.0104, roof=0.00138),
              ("xquant (tensor cores)", 3, 32768): dict(bpt=26624, best=0.0698, ratio=2.17),
              ("xquant-cl", 3, 32768): dict(fit=600961, fit_working=457875)}
    table = bench.targets(copy_bw, matvec, decode, 32768, "int8")
    assert table[2].endswith("Q4_0 75%–80%, Q8_0 60% of 3000 GB/s | on 2 of 3 shapes |")
    assert table[3].endswith("10.400 ms per layer against 1.380 ms: 7.5× | no |")
    assert table[4].endswith("69.80 ms against 32.20 ms: 2.17×; cache 4.92× smaller | no (step) |")
    assert table[5].endswith("600961 against 122070 tokens: 4.92×; with the step's working memory 457875: 3.75× "
                             "| cache alone only |")
    del decode["xquant (tensor cores)", 3, 32768]
    assert bench.targets(copy_bw, [], decode, 32768, "int8")[2::2] == [
        "| weight matrix-vector product ≥ 70% of copy bandwidth | not measured | — |",
        "| tensor-core XQuant 3-bit step ≤ 2× fp16 KV's | not measured | — |"]


def test_bench_gpu_kernel_table():
    """The per-kernel table's names: Numba's mangled names as the profiler gives them, or demangled,
    and cuBLAS's; summed per kernel over the calls."""
    bench = bench_gpu()
    numba = ("_ZN6cudapy4xqrt7kernels4cuda12_make_matvec12_3clocals_3e11matvec_int8B2v1B92cw51cXTLSUwv1sDUaKthqa"
             "E5ArrayIfLi1E1A7mutable7alignedE")
    assert bench.kernel_name(numba) == "matvec_int8"
    assert bench.kernel_name("_ZN6cudapy12") == "cudapy"  # cut short: what is there, no error
    assert bench.kernel_name("cudapy::xqrt::kernels::cuda::scores_latent[abi:v1][abi:cw51c](Array<float, 1, A, "
                             "mutable, aligned>, long long)") == "scores_latent"
    assert bench.kernel_name("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_f16_128x128_32x5_tn_align8>"
                             "(cutlass_80_tensorop_f16_s16816gemm_f16_128x128_32x5_tn_align8::Params)") \
        == "Kernel2<cutlass_80_tensorop_f16_s16816gemm_f16_128x128_32x5_tn_align8>"
    assert bench.kernel_name("sm90_xmma_gemm_f16f16_f16f32_f32_nn_n_kernel") == "sm90_xmma_gemm_f16f16_f16f32_f32_nn_n_kernel"
    seen = [("cudapy::a::softmax[abi:v1](x)", 1.0), (numba, 4.0), ("cudapy::a::softmax[abi:v1](x)", 2.0), (numba, 6.0)]
    assert bench.by_kernel(seen, 2) == [("matvec_int8", 1.0, 5.0), ("softmax", 1.0, 1.5)]


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_bench_gpu_kernel_times_reads_the_profiler(monkeypatch):
    """kernel_times through torch's profiler as on a GPU, with the host's operations standing in
    for the device's kernels (CPU torch has none): the profiler's API as the bench calls it."""
    import torch
    from torch.autograd import DeviceType
    bench = bench_gpu()
    monkeypatch.setattr(bench, "DEVICE", "cuda")
    monkeypatch.setattr(torch.autograd, "DeviceType", types.SimpleNamespace(CUDA=DeviceType.CPU))
    a = torch.ones(64, 64)
    rows = bench.kernel_times(lambda: a @ a, calls=3)
    assert ("mm", 1.0) in [(name, launches) for name, launches, _ in rows]
    assert all(us >= 0 for _, _, us in rows)


def load_ptx_check():
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "ptx_check", os.path.join(os.path.dirname(__file__), "..", "bench", "ptx_check.py"))
    ptx_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ptx_check)
    return ptx_check


def test_ptx_check_fails_a_kernel_the_disk_cache_would_miss():
    """bench/ptx_check.py's cache check (its CI run applies it to every kernel numba-cuda builds):
    a kernel must be cached, save under xqrt.jit_cache's lock, and close over plain values only —
    Numba keys a cached kernel on its closure's pickle, and a captured device function pickles
    differently in every process (measured: the matrix-vector kernels' keys did), so each run would
    compile it again and add an entry."""
    from xqrt import jit_cache
    ptx_check = load_ptx_check()

    class CUDACache:
        def __init__(self, cache_file):
            self._cache_file = cache_file

    def kernel(captured, cache_file=jit_cache.LockedSaves()):
        def launch():
            return captured
        return types.SimpleNamespace(_cache=CUDACache(cache_file), py_func=launch)

    assert ptx_check.cache_problem(kernel(4)) == ""
    assert ptx_check.cache_problem(kernel(len)) == \
        "FAILED: closes over builtin_function_or_method: a cache key of its own in every process"
    assert ptx_check.cache_problem(kernel(4, cache_file=object())) == "FAILED: saves without xqrt.jit_cache's lock"
    assert ptx_check.cache_problem(types.SimpleNamespace(py_func=len)) == "FAILED: not cached (cache=True)"


def test_ptx_check_fails_a_spill():
    """bench/ptx_check.py's reading of ptxas -v: a kernel that spills registers fails as one that
    does not assemble does; one that holds its values passes, with its resource line."""
    ptx_check = load_ptx_check()
    head = "ptxas info    : Compiling entry function '_ZN6cudapy4xqrt1kE' for 'sm_90'\n"
    clean = head + ("ptxas info    : Function properties for _ZN6cudapy4xqrt1kE\n"
                    "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                    "ptxas info    : Used 62 registers, 8704 bytes smem, 384 bytes cmem[0]\n")
    assert ptx_check.resources(0, clean) == (True, "62 registers, 8704 B shared, 0 B stack, 0 B spilled")
    local = clean.replace("0 bytes stack frame", "512 bytes stack frame")  # a local array: reported, not failed
    assert ptx_check.resources(0, local) == (True, "62 registers, 8704 B shared, 512 B stack, 0 B spilled")
    spilling = local.replace("0 bytes spill stores", "96 bytes spill stores").replace("62 registers", "255 registers")
    assert ptx_check.resources(0, spilling) == (False, "255 registers, 8704 B shared, 512 B stack, 96 B spilled")
    refused = head + "ptxas error   : Entry function '_ZN6cudapy4xqrt1kE' uses too much shared data\n"
    assert ptx_check.resources(255, refused) == (
        False, "ptxas error   : Entry function the kernel uses too much shared data")


def test_ptx_check_fails_a_launch_the_gpu_would_refuse():
    """bench/ptx_check.py's launch check, which the simulator cannot make (it launches any block):
    registers are allocated to a warp 256 at a time and a block has 65536 of them; a kernel with
    launch bounds runs no more threads a block than it was compiled for."""
    ptx_check = load_ptx_check()
    assert ptx_check.launch_problem(168, 128, (128, 3)) == ""
    assert ptx_check.launch_problem(255, 256, None) == ""  # 8 warps of 8192 (255 a thread, allocated as 256)
    assert ptx_check.launch_problem(168, 256, (128, 3)) == \
        "launched with 256 threads, compiled for 128 (launch bounds)"
    assert ptx_check.launch_problem(169, 384, None) == \
        "384 threads of 169 registers need 67584 registers, a block has 65536"  # 176 a thread, as allocated
    assert ptx_check.launch_problem(32, 2048, None) == "2048 threads a block (1024 at most)"


def test_ptx_check_finds_the_busiest_loop():
    """bench/ptx_check.py --sass: the basic block of nvdisasm's listing with the most FFMAs, counted
    by opcode (predicated instructions too), not the block that merely has the most instructions."""
    ptx_check = load_ptx_check()
    line = "        /*{:04x}*/                   {} ;"
    listing = "\n".join([
        "        .text._ZN6cudapy4xqrt1kE:",
        *(line.format(16 * i, "IMAD R2, R3, R4, R5") for i in range(6)),
        ".L_x_7:",
        line.format(0x100, "LDS.128 R8, [R2+0x40]"),
        line.format(0x110, "FFMA R12, R8, R9, R12"),
        line.format(0x120, "FFMA R13, R8, R10, R13"),
        line.format(0x130, "@P0 BRA `(.L_x_7)"),
        ".L_x_8:",
        line.format(0x140, "FFMA R1, R1, R1, R1"),
        line.format(0x150, "EXIT"),
    ])
    assert ptx_check.busiest_loop(listing) == "busiest loop: 2 FFMA in 4 instructions (2 FFMA, 1 LDS, 1 BRA)"
