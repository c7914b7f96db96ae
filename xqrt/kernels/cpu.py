"""Numba CPU kernels: products on quantized weight blocks, norms, RoPE, SwiGLU, attention.

Weights arrive as raw block bytes (`uint8[rows, row_bytes]`) plus their ggml type id, so one
kernel serves every format through a branch on the type. Numba has no float16 on the CPU: half
values travel as uint16 and are widened by LLVM's own `fpext` (vectorized F16C on x86).
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange

from ..gguf_model import BF16, F16, Q4_0, Q4_1, Q8_0
from ..quant import dequantize_row as dequantize_latent, quantize_row as quantize_latent
from . import simd
from .bits import f16_to_f32, f32_to_f16, u32_as_f32

# Start Numba's thread pool now. A cached kernel compiled against a parallel kernel that was itself
# loaded from the cache does not record that it needs the pool (numba#8578), and called first in a
# later process it segfaults; with the pool running every kernel finds it.
get_num_threads()

# error_model numpy: a division by zero gives inf/NaN, as in C, not a ZeroDivisionError (and no branch)
_OPT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")
_BAND = 32  # rows per parallel work item
_KEY_ROWS = 64  # positions per work item of the key rebuild (a group of G splits into several)
_VALUE_ROWS = 64  # positions per block of the latent value sums


@njit(inline="always", **_OPT)
def _half_at(row, o):
    return f16_to_f32(np.uint16(row[o]) | (np.uint16(row[o + 1]) << np.uint16(8)))


@njit(inline="always", **_OPT)
def _f32_at(row, o):
    bits = (np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8)) | (np.uint32(row[o + 2]) << np.uint32(16))
            | (np.uint32(row[o + 3]) << np.uint32(24)))
    return u32_as_f32(bits)


@njit(**_OPT)
def quantize_act(x, act):
    """act = (xd, xsum, xerr, codes) for the integer block products: per block of 32, x as integer
    codes (int8 or int16, the array's dtype) with scale xd, the exact float sum xsum, and
    xerr = xsum − xd·Σcodes, the part of the sum the codes miss. Q4_1's minimum multiplies the
    exact sum and its nibbles count as centred on 8 (q − 8), so the codes' rounding meets weights of
    half the size."""
    xd, xsum, xerr, codes = act
    qmax = np.float32(127.0) if codes.itemsize == 1 else np.float32(32767.0)
    for b in range(x.shape[0] // 32):
        amax = np.float32(0.0)
        s = np.float32(0.0)
        for j in range(32):
            v = x[b * 32 + j]
            amax = max(amax, abs(v))
            s += v
        d = amax / qmax
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = np.int32(0)
        for j in range(32):
            c = np.int32(round(x[b * 32 + j] * inv))
            codes[b * 32 + j] = c
            total += c
        xd[b] = d
        xsum[b] = s
        xerr[b] = s - d * np.float32(total)


def new_act(n: int, act_bits: int = 8):
    """Scratch for quantize_act of a vector of n floats, with int8 or int16 codes."""
    nb = max(n // 32, 1)
    codes = np.zeros(max(n, 32), np.int8 if act_bits == 8 else np.int16)
    return np.zeros(nb, np.float32), np.zeros(nb, np.float32), np.zeros(nb, np.float32), codes


@njit(inline="always", **_OPT)
def _half_in(w, r, o):
    """The half float at byte o of row r (no row view: a view per row costs reference counting)."""
    return f16_to_f32(np.uint16(w[r, o]) | (np.uint16(w[r, o + 1]) << np.uint16(8)))


@njit(inline="always", **_OPT)
def _block_step(acc, rest, w, r, qtype, b, xd, xsum, xerr, codes):
    """Block b of row r in a block format against quantize_act's codes: the codes' product into
    the lanes acc, the float terms into rest."""
    if qtype == Q4_1:  # d·q + m = d·(q − 8) + (m + 8d): the codes meet q − 8, the sums the rest
        o = b * 20
        d = _half_in(w, r, o)
        return (simd.nibble_dot(acc, w, r * w.shape[1] + o + 4, codes, b * 32, d * xd[b]),
                rest + (_half_in(w, r, o + 2) * xsum[b] + np.float32(8.0) * d * xerr[b]))
    if qtype == Q4_0:  # nibbles hold q + 8: subtract 8·Σx̂, the sum the codes saw
        o = b * 18
        d = _half_in(w, r, o)
        return (simd.nibble_dot(acc, w, r * w.shape[1] + o + 2, codes, b * 32, d * xd[b]),
                rest - np.float32(8.0) * d * (xsum[b] - xerr[b]))
    o = b * 34  # Q8_0
    return simd.byte_dot(acc, w, r * w.shape[1] + o + 2, codes, b * 32, _half_in(w, r, o) * xd[b]), rest


@njit(inline="always", **_OPT)
def _block_rows(w, qtype, size, act, out, r0, r1):
    """out[r] = W[r] · x for a block format (qtype a constant, so no branch runs per block).
    Two independent accumulator pairs: one chain of dependent FMAs through every block would bound
    the loop at the FMA latency rather than at its instruction throughput."""
    xd, xsum, xerr, codes = act
    n_blocks = w.shape[1] // size
    for r in range(r0, r1):
        acc0 = acc1 = simd.lanes_zero()
        rest0 = rest1 = np.float32(0.0)
        for i in range(n_blocks // 2):
            acc0, rest0 = _block_step(acc0, rest0, w, r, qtype, 2 * i, xd, xsum, xerr, codes)
            acc1, rest1 = _block_step(acc1, rest1, w, r, qtype, 2 * i + 1, xd, xsum, xerr, codes)
        if n_blocks % 2:
            acc0, rest0 = _block_step(acc0, rest0, w, r, qtype, n_blocks - 1, xd, xsum, xerr, codes)
        out[r] = simd.lanes_sum(simd.lanes_add(acc0, acc1)) + (rest0 + rest1)


@njit(inline="always", **_OPT)
def _float_dot_row(row, qtype, x):
    acc = np.float32(0.0)
    if qtype == F16:
        for j in range(x.shape[0]):
            acc += _half_at(row, 2 * j) * x[j]
    elif qtype == BF16:
        for j in range(x.shape[0]):
            bits = (np.uint32(row[2 * j]) << np.uint32(16)) | (np.uint32(row[2 * j + 1]) << np.uint32(24))
            acc += u32_as_f32(bits) * x[j]
    else:  # F32
        for j in range(x.shape[0]):
            acc += _f32_at(row, 4 * j) * x[j]
    return acc


@njit(**_OPT)
def _matvec_rows(w, qtype, x, act, out, r0, r1):
    """Rows [r0, r1) of W · x; act = quantize_act(x) for the block formats."""
    if qtype == Q4_1:
        _block_rows(w, Q4_1, 20, act, out, r0, r1)
    elif qtype == Q4_0:
        _block_rows(w, Q4_0, 18, act, out, r0, r1)
    elif qtype == Q8_0:
        _block_rows(w, Q8_0, 34, act, out, r0, r1)
    else:
        for r in range(r0, r1):
            out[r] = _float_dot_row(w[r], qtype, x)


@njit(inline="always", **_OPT)
def dequant_row(row, qtype, out):
    n = out.shape[0]
    if qtype == Q4_1 or qtype == Q4_0:
        nb = 20 if qtype == Q4_1 else 18
        for b in range(n // 32):
            o = b * nb
            d = _half_at(row, o)
            m = _half_at(row, o + 2) if qtype == Q4_1 else np.float32(-8.0) * d
            q0 = o + nb - 16
            for j in range(16):
                q = row[q0 + j]
                out[b * 32 + j] = np.float32(q & 15) * d + m
                out[b * 32 + 16 + j] = np.float32(q >> 4) * d + m
    elif qtype == Q8_0:
        for b in range(n // 32):
            o = b * 34
            d = _half_at(row, o)
            for j in range(32):
                out[b * 32 + j] = np.float32(np.int8(row[o + 2 + j])) * d
    elif qtype == F16:
        for j in range(n):
            out[j] = _half_at(row, 2 * j)
    elif qtype == BF16:
        for j in range(n):
            out[j] = u32_as_f32((np.uint32(row[2 * j]) << np.uint32(16)) | (np.uint32(row[2 * j + 1]) << np.uint32(24)))
    else:
        for j in range(n):
            out[j] = _f32_at(row, 4 * j)


@njit(parallel=True, **_OPT)
def matvec(w, qtype, x, act, out):
    """out[r] = W[r] · x, one contiguous band of rows per thread.

    The row loop lives in its own function: inside a prange body Numba's outlining keeps LLVM
    from vectorizing the block loops.
    """
    n = w.shape[0]
    for c in prange((n + _BAND - 1) // _BAND):
        _matvec_rows(w, qtype, x, act, out, c * _BAND, min(n, (c + 1) * _BAND))


@njit(parallel=True, **_OPT)
def matvec_n(ws, qtypes, x, act, outs):
    """outs[i] = ws[i]·x for several matrices in one parallel region (Q/K/V; gate/up): one launch
    instead of several, and the threads share the bands of all of them."""
    n_bands = 0
    for w in ws:
        n_bands += (w.shape[0] + _BAND - 1) // _BAND
    for c in prange(n_bands):
        i, r0 = 0, c * _BAND  # find the matrix band c falls in, without a table (no allocation per call)
        while r0 >= (ws[i].shape[0] + _BAND - 1) // _BAND * _BAND:
            r0 -= (ws[i].shape[0] + _BAND - 1) // _BAND * _BAND
            i += 1
        _matvec_rows(ws[i], qtypes[i], x, act, outs[i], r0, min(ws[i].shape[0], r0 + _BAND))


@njit(parallel=True, **_OPT)
def dequantize(w, qtype, out):
    """Rows of W as float32 (out: rows × cols), for products that reuse each weight many times."""
    for r in prange(w.shape[0]):
        dequant_row(w[r], qtype, out[r])


@njit(**_OPT)
def dequantize_row(w, qtype, r, out):
    dequant_row(w[r], qtype, out)


@njit(inline="always", **_OPT)
def expf(x):
    """e^x in float32 without a libm call, so loops over it vectorize (softmax over thousands of
    positions, SiLU): Cephes' expf, 2^n · e^r with |r| ≤ ln2/2, relative error about 1e-7."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.0))  # 2^n stays a normal float
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * u32_as_f32(np.uint32((np.int32(n) + 127) << 23))


@njit(inline="always", **_OPT)
def rmsnorm(x, weight, eps, out):
    ss = np.float32(0.0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.float32(math.sqrt(ss / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * inv * weight[i]


@njit(parallel=True, **_OPT)
def rmsnorm_rows(x, weight, eps, out):
    for t in prange(x.shape[0]):
        rmsnorm(x[t], weight, eps, out[t])


@njit(inline="always", **_OPT)
def _rotate_pairs(vec, n_heads, head_dim, i, c, s):
    """Pair i of every head turned by the angle whose cosine and sine are c, s."""
    for h in range(n_heads):
        o = h * head_dim + 2 * i
        a = vec[o]
        b = vec[o + 1]
        vec[o] = a * c - b * s
        vec[o + 1] = a * s + b * c


@njit(inline="always", **_OPT)
def rope(vec, n_heads, head_dim, pos, inv_freq):
    """Rotate adjacent pairs (GGUF's layout: llama.cpp permutes Q/K rows at conversion)."""
    for i in range(inv_freq.shape[0]):
        angle = pos * inv_freq[i]
        _rotate_pairs(vec, n_heads, head_dim, i, np.float32(math.cos(angle)), np.float32(math.sin(angle)))


@njit(inline="always", **_OPT)
def rope_at(vec, n_heads, head_dim, cos, sin):
    """rope() with the angles' cosines and sines looked up (rope_table): a decode step rotates
    every rebuilt key, and two libm calls per pair per key would cost more than the product.
    Heads outside, pairs inside: the inner loop then walks memory in order (3× faster)."""
    for h in range(n_heads):
        o = h * head_dim
        for i in range(cos.shape[0]):
            a = vec[o + 2 * i]
            b = vec[o + 2 * i + 1]
            vec[o + 2 * i] = a * cos[i] - b * sin[i]
            vec[o + 2 * i + 1] = a * sin[i] + b * cos[i]


def rope_table(inv_freq: np.ndarray, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of pos · θᵢ for every position (n_ctx × rope_dim/2 each), as rope() computes them."""
    angles = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@njit(parallel=True, **_OPT)
def rope_rows(x, n_heads, head_dim, pos0, inv_freq):
    for t in prange(x.shape[0]):
        rope(x[t], n_heads, head_dim, np.float64(pos0 + t), inv_freq)


@njit(inline="always", **_OPT)
def silu_mul(gate, up, out):
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + expf(-g)) * up[i]


@njit(parallel=True, **_OPT)
def silu_mul_rows(gate, up, out):
    for t in prange(gate.shape[0]):
        silu_mul(gate[t], up[t], out[t])


@njit(**_OPT)
def attn_in(x, norm_w, eps, wq, tq, wk, tk, wv, tv, pos, inv_freq, n_head, n_kv_head, head_dim,
            xn, act, q, k, v):
    """Decode step, attention half-entry: xn = RMSNorm(x); q, k, v = xn·W; RoPE on q (the cache
    rotates k: KIVI stores it unrotated)."""
    rmsnorm(x, norm_w, eps, xn)
    quantize_act(xn, act)
    matvec_n((wq, wk, wv), (tq, tk, tv), xn, act, (q, k, v))
    rope(q, n_head, head_dim, np.float64(pos), inv_freq)


@njit(**_OPT)
def attn_out_ffn(x, attn, wo, to, ffn_norm, eps, w_gate, tg, w_up, tu, w_down, td,
                 xn, act, act_attn, act_ff, proj, gate, up, hidden):
    """Decode step, the rest of the layer: x += attn·Wo; x += W_down·(silu(W_gate·n) ⊙ W_up·n)."""
    quantize_act(attn, act_attn)
    matvec(wo, to, attn, act_attn, proj)
    for i in range(x.shape[0]):
        x[i] += proj[i]
    rmsnorm(x, ffn_norm, eps, xn)
    quantize_act(xn, act)
    matvec_n((w_gate, w_up), (tg, tu), xn, act, (gate, up))
    silu_mul(gate, up, hidden)
    quantize_act(hidden, act_ff)
    matvec(w_down, td, hidden, act_ff, proj)
    for i in range(x.shape[0]):
        x[i] += proj[i]


@njit(**_OPT)
def lm_head(x, norm_w, eps, w, qtype, xn, act, logits):
    rmsnorm(x, norm_w, eps, xn)
    quantize_act(xn, act)
    matvec(w, qtype, xn, act, logits)


@njit(**_OPT)
def decode_fp16(token, pos, tok_embd, tok_type, mats, qtypes, norms, out_norm, w_out, t_out, inv_freq, n_head,
                n_kv_head, head_dim, eps, k_cache, v_cache, scores, bufs, acts, logits):
    """A whole decode step over an fp16 KV cache in one compiled call (no Python between layers).
    mats: per layer Wq, Wk, Wv, Wo, W_gate, W_up, W_down (7·i + j), their types in qtypes[i, j]."""
    x, xn, q, k, v, k_rot, proj, gate, up, hidden, attn = bufs
    act, act_attn, act_ff, act_head = acts
    dequantize_row(tok_embd, tok_type, token, x)
    for i in range(qtypes.shape[0]):
        t, j = qtypes[i], 7 * i
        attn_in(x, norms[i, 0], eps, mats[j], t[0], mats[j + 1], t[1], mats[j + 2], t[2], pos, inv_freq, n_head,
                n_kv_head, head_dim, xn, act, q, k, v)
        attend_f16_step(q, k, v, k_cache[i], v_cache[i], pos, inv_freq, n_head, n_kv_head, head_dim, k_rot, scores,
                        attn)
        attn_out_ffn(x, attn, mats[j + 3], t[3], norms[i, 1], eps, mats[j + 4], t[4], mats[j + 5], t[5],
                     mats[j + 6], t[6], xn, act, act_attn, act_ff, proj, gate, up, hidden)
    lm_head(x, out_norm, eps, w_out, t_out, xn, act_head, logits)


@njit(**_OPT)
def _attend_head_f16(q, k_cache, v_cache, n_ctx, kv0, scale, scores, out):
    """One head: softmax(q·Kᵀ·scale)·V over rows [0, n_ctx), K/V columns kv0:kv0+len(q)."""
    hd = q.shape[0]
    mx = np.float32(-np.inf)
    for t in range(n_ctx):
        row = k_cache[t, kv0:kv0 + hd]
        acc = np.float32(0.0)
        for d in range(hd):
            acc += q[d] * f16_to_f32(row[d])
        acc *= scale
        scores[t] = acc
        mx = max(mx, acc)
    total = np.float32(0.0)
    for t in range(n_ctx):
        e = expf(scores[t] - mx)
        scores[t] = e
        total += e
    out[:] = 0.0
    for t in range(n_ctx):
        p = scores[t] / total
        row = v_cache[t, kv0:kv0 + hd]
        for d in range(hd):
            out[d] += p * f16_to_f32(row[d])


@njit(parallel=True, **_OPT)
def attend_f16(q, k_cache, v_cache, n_ctx, n_head, n_kv_head, head_dim, scores, out):
    """Single-query attention over an fp16 cache (uint16 bits, rows = positions [0, n_ctx))."""
    group = n_head // n_kv_head
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for h in prange(n_head):
        q0 = h * head_dim
        _attend_head_f16(q[q0:q0 + head_dim], k_cache, v_cache, n_ctx, (h // group) * head_dim, scale,
                         scores[h], out[q0:q0 + head_dim])


@njit(**_OPT)
def attend_f16_step(q, k, v, k_cache, v_cache, pos, inv_freq, n_head, n_kv_head, head_dim, k_rot, scores, out):
    """A decode step on an fp16 cache in one call: store position `pos` (K rotated, V), then
    attend over [0, pos]. k is pre-RoPE and left as it is; k_rot is scratch of its size."""
    store_kv_f16(k, v, pos, inv_freq, n_kv_head, head_dim, k_rot, k_cache[pos], v_cache[pos])
    attend_f16(q, k_cache, v_cache, pos + 1, n_head, n_kv_head, head_dim, scores, out)


@njit(**_OPT)
def store_kv_f16(k, v, pos, inv_freq, n_kv_head, head_dim, k_rot, k_row, v_row):
    """One position's K, rotated for `pos`, and V as fp16 bits into k_row / v_row (k_rot: scratch
    of k's size; k itself is left pre-RoPE)."""
    k_rot[:] = k
    rope(k_rot, n_kv_head, head_dim, np.float64(pos), inv_freq)
    for j in range(k_rot.shape[0]):
        k_row[j] = f32_to_f16(k_rot[j])
        v_row[j] = f32_to_f16(v[j])


@njit(**_OPT)
def to_f16(x, out):
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[t, j] = f32_to_f16(x[t, j])


# ---- XQuant / KIVI caches: rematerialize inside attention ---------------------------------------
# A latent stream holds one vector per position, packed by xqrt.quant, as a 3-D code array:
#   per-token:   codes[pos, 0, :]  (scales [pos, 0, :])   — groups run along the vector;
#   per-channel: codes[blk, 0, off[ch]:off[ch + 1]] (scales [blk, ch, :]) — channel ch of G
#                positions per group, each channel in its own width (xqrt.quant.channel_offsets).
# The rebuild matrix m turns latent rows into K or V rows (an empty m means the latent is K or V).


@njit(inline="always", **_OPT)
def _latent_rows(codes, scale, zero, bits, group, channel_off, sink, t0, t1, column, lat):
    """Latents of positions [t0, t1) → lat[:t1 - t0]. A per-channel stream (channel_off not empty:
    xqrt.quant.channel_offsets) reads inside one group of G positions (t0 and t1 on multiples of
    8 there), each channel in its own width; a per-token one reads any positions, G being the
    group along the vector. The first len(sink) positions are read exact from `sink`."""
    if channel_off.shape[0]:
        b = t0 // group
        j0, n = t0 - b * group, t1 - t0  # j0 and n multiples of 8: whole code words
        for c in range(lat.shape[1]):
            o0, o1 = channel_off[c], channel_off[c + 1]
            bits_c = (o1 - o0) * 8 // group
            lo = o0 + j0 * bits_c // 8
            # positions j0… of the group as a group of their own: the same scale and zero
            dequantize_latent(codes[b, 0, lo:lo + n * bits_c // 8], scale[b, c], zero[b, c], bits_c, n, column[:n])
            for t in range(n):
                lat[t, c] = column[t]
    else:
        for t in range(t0, t1):
            dequantize_latent(codes[t, 0], scale[t, 0], zero[t, 0], bits, group, lat[t - t0])
    for t in range(t0, min(t1, sink.shape[0])):
        lat[t - t0] = sink[t]


_W = simd.WIDE  # floats per vector register of the rebuild's tiles
_ALIGN = 64  # bytes: a cache line, and a 16-float register


def aligned(a: np.ndarray) -> np.ndarray:
    """a as C-contiguous float32 starting on a cache line (a itself where it already is). The
    rebuild's tiles load their matrix a register at a time, and a 16-float load that straddles two
    lines costs two: rebuild of 64 rows by 192 × 192 took 35 µs off the line against 28 on it."""
    if a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % _ALIGN == 0:
        return a
    buf = np.empty(a.size + _ALIGN // 4, np.float32)
    o = (-buf.ctypes.data % _ALIGN) // 4
    out = buf[o:o + a.size].reshape(a.shape)
    out[...] = a
    return out


@njit(inline="always", **_OPT)
def _aligned_empty(rows, cols):
    """np.empty((rows, cols), float32) starting on a cache line (Numba's own start on 32 bytes)."""
    buf = np.empty(rows * cols + _ALIGN // 4, np.float32)
    o = (-buf.ctypes.data % _ALIGN) // 4
    return buf[o:o + rows * cols].reshape((rows, cols))


@njit(inline="always", **_OPT)
def _tile_6x2(lat, t, m, c0, out):
    """out[t:t+6, c0:c0+2W] = lat[t:t+6] · m[:, c0:c0+2W] in twelve vector accumulators: each
    loaded row piece of m feeds six FMAs, and twelve independent chains keep both FMA pipes busy
    through the FMA latency (the classic AVX2 micro-kernel shape, 6 × 16; 4 × 16 and 4 × 24
    measured 15–20% slower)."""
    cols, oc = m.shape[1], out.shape[1]
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = a4 = b4 = a5 = b5 = simd.wide_zero()
    for r in range(m.shape[0]):
        o = r * cols + c0
        x0, x1, x2 = lat[t, r], lat[t + 1, r], lat[t + 2, r]
        x3, x4, x5 = lat[t + 3, r], lat[t + 4, r], lat[t + 5, r]
        a0, b0 = simd.fma_wide(a0, x0, m, o), simd.fma_wide(b0, x0, m, o + _W)
        a1, b1 = simd.fma_wide(a1, x1, m, o), simd.fma_wide(b1, x1, m, o + _W)
        a2, b2 = simd.fma_wide(a2, x2, m, o), simd.fma_wide(b2, x2, m, o + _W)
        a3, b3 = simd.fma_wide(a3, x3, m, o), simd.fma_wide(b3, x3, m, o + _W)
        a4, b4 = simd.fma_wide(a4, x4, m, o), simd.fma_wide(b4, x4, m, o + _W)
        a5, b5 = simd.fma_wide(a5, x5, m, o), simd.fma_wide(b5, x5, m, o + _W)
    o = t * oc + c0
    for a, b in ((a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5)):
        simd.wide_store(a, out, o)
        simd.wide_store(b, out, o + _W)
        o += oc


@njit(inline="always", **_OPT)
def _tile_4x2(lat, t, m, c0, out):
    cols, oc = m.shape[1], out.shape[1]
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = simd.wide_zero()
    for r in range(m.shape[0]):
        o = r * cols + c0
        x0, x1, x2, x3 = lat[t, r], lat[t + 1, r], lat[t + 2, r], lat[t + 3, r]
        a0, b0 = simd.fma_wide(a0, x0, m, o), simd.fma_wide(b0, x0, m, o + _W)
        a1, b1 = simd.fma_wide(a1, x1, m, o), simd.fma_wide(b1, x1, m, o + _W)
        a2, b2 = simd.fma_wide(a2, x2, m, o), simd.fma_wide(b2, x2, m, o + _W)
        a3, b3 = simd.fma_wide(a3, x3, m, o), simd.fma_wide(b3, x3, m, o + _W)
    o = t * oc + c0
    for a, b in ((a0, b0), (a1, b1), (a2, b2), (a3, b3)):
        simd.wide_store(a, out, o)
        simd.wide_store(b, out, o + _W)
        o += oc


@njit(inline="always", **_OPT)
def _tile_1x6(lat, t, m, c0, out):
    """One row, 6W columns: six chains (a decode step's x·U is a single row)."""
    cols = m.shape[1]
    a0 = a1 = a2 = a3 = a4 = a5 = simd.wide_zero()
    for r in range(m.shape[0]):
        o = r * cols + c0
        x = lat[t, r]
        a0, a1, a2 = simd.fma_wide(a0, x, m, o), simd.fma_wide(a1, x, m, o + _W), simd.fma_wide(a2, x, m, o + 2 * _W)
        a3, a4 = simd.fma_wide(a3, x, m, o + 3 * _W), simd.fma_wide(a4, x, m, o + 4 * _W)
        a5 = simd.fma_wide(a5, x, m, o + 5 * _W)
    o = t * out.shape[1] + c0
    for a in (a0, a1, a2, a3, a4, a5):
        simd.wide_store(a, out, o)
        o += _W


@njit(inline="always", **_OPT)
def _tile_1x1(lat, t, m, c0, out):
    a = simd.wide_zero()
    for r in range(m.shape[0]):
        a = simd.fma_wide(a, lat[t, r], m, r * m.shape[1] + c0)
    simd.wide_store(a, out, t * out.shape[1] + c0)


@njit(**_OPT)
def _rows_6x2(lat, n6, m, c2, out):
    """The bulk of rebuild in a function of its own: inlined among the edge cases, LLVM
    allocates its registers worse (measured 8% slower)."""
    for t in range(0, n6, 6):
        for c0 in range(0, c2, 2 * _W):
            _tile_6x2(lat, t, m, c0, out)


@njit(**_OPT)
def rebuild(lat, n, m, out):
    """out[:n] = lat[:n] · m (or lat itself when m is empty; m and out C-contiguous).

    Register-blocked: a tile of 6 rows × 2 vector registers of out (tiles named in rows × registers
    of W = simd.WIDE floats) lives in accumulators while the shared dimension streams past, and
    nothing is stored until the tile is done (a row at a time, the stores would bound it at one FMA
    per cycle). Smaller tiles take the edges."""
    if m.shape[0] == 0:
        for t in range(n):
            for c in range(out.shape[1]):
                out[t, c] = lat[t, c]
        return
    cols = m.shape[1]
    c2, c1 = cols - cols % (2 * _W), cols - cols % _W
    n6 = n - n % 6
    n4 = n6 + (n - n6) // 4 * 4
    _rows_6x2(lat, n6, m, c2, out)
    for t in range(n6, n4, 4):
        for c0 in range(0, c2, 2 * _W):
            _tile_4x2(lat, t, m, c0, out)
    c6 = cols - cols % (6 * _W)
    for t in range(n4, n):
        for c0 in range(0, c6, 6 * _W):
            _tile_1x6(lat, t, m, c0, out)
        for c0 in range(c6, c2, _W):
            _tile_1x1(lat, t, m, c0, out)
    for t in range(n):
        for c0 in range(c2, c1, _W):
            _tile_1x1(lat, t, m, c0, out)
        for c in range(c1, cols):
            acc = np.float32(0.0)
            for r in range(m.shape[0]):
                acc += lat[t, r] * m[r, c]
            out[t, c] = acc


@njit(inline="always", **_OPT)
def _score_rows(q, keys, n, pos0, rope_cos, rope_sin, n_head, n_kv_head, head_dim, scale, scores):
    """RoPE the pre-RoPE key rows keys[:n] (positions pos0…) and write their scores."""
    group = n_head // n_kv_head
    for t in range(n):
        rope_at(keys[t], n_kv_head, head_dim, rope_cos[pos0 + t], rope_sin[pos0 + t])
        for h in range(n_head):
            k0 = (h // group) * head_dim
            key = keys[t, k0:k0 + head_dim]
            qh = q[h * head_dim:(h + 1) * head_dim]
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += qh[d] * key[d]
            scores[h, pos0 + t] = acc * scale


@njit(inline="always", **_OPT)
def _add_projected(u, m, k0, out):
    """out += u · m[:, k0:k0+len(out)] (m empty: u's own slice). The sum runs in a local array:
    accumulated straight into `out`, which might alias m, each step is a store and a reload (5×
    slower)."""
    if m.shape[0] == 0:
        for d in range(out.shape[0]):
            out[d] += u[k0 + d]
        return
    acc = np.zeros(out.shape[0], np.float32)
    for r in range(m.shape[0]):
        a = u[r]
        row = m[r, k0:k0 + out.shape[0]]
        for d in range(out.shape[0]):
            acc[d] += a * row[d]
    for d in range(out.shape[0]):
        out[d] += acc[d]


@njit(inline="always", **_OPT)
def _window_scores(q, k_win, k0, w0, n, scale, scores):
    """scores[t] for positions [w0, n) from the fp16 window ring (position t in row t mod W)."""
    hd = q.shape[0]
    slot = w0 % max(k_win.shape[0], 1)
    for t in range(w0, n):
        row = k_win[slot, k0:k0 + hd]
        acc = np.float32(0.0)
        for d in range(hd):
            acc += q[d] * f16_to_f32(row[d])
        scores[t] = acc * scale
        slot = slot + 1 if slot + 1 < k_win.shape[0] else 0


@njit(inline="always", **_OPT)
def _window_values(p, v_win, k0, w0, n, out):
    """out += Σ p[t]·V[t] over positions [w0, n) of the fp16 window ring."""
    hd = out.shape[0]
    acc = np.zeros(hd, np.float32)
    slot = w0 % max(v_win.shape[0], 1)
    for t in range(w0, n):
        row = v_win[slot, k0:k0 + hd]
        a = p[t]
        for d in range(hd):
            acc[d] += a * f16_to_f32(row[d])
        slot = slot + 1 if slot + 1 < v_win.shape[0] else 0
    for d in range(hd):
        out[d] += acc[d]


@njit(parallel=True, **_OPT)
def attend_latent(q, pos, kc, ks, kz, k_bits, k_channel_off, k_width, k_sink, mk, n_qk,
                  vc, vs, vz, v_bits, v_width, v_group, v_sink, mv, n_qv, group, k_tail, mk_tail, v_tail, mv_tail,
                  k_win, v_win, rope_cos, rope_sin, n_head, n_kv_head, head_dim, n_threads, scores, out):
    """Single-query attention over a latent cache, for the token at `pos` (rope_table gives the
    rotations).

    The last positions up to W = len(k_win) come from an fp16 window of post-RoPE K and V (a ring:
    position t in row t mod W); the older ones, [0, w0), are rematerialized. Keys of [0, n_qk) are
    rebuilt block by block from the packed key latents (dequantize → ·mk → RoPE → score); those of
    [n_qk, w0) from the exact tail latents k_tail (·mk_tail). The first len(k_sink) / len(v_sink)
    positions (attention sinks) are read from those exact latents instead of the packed ones. Values use the absorbed form:
    Σⱼ aⱼ·v̂ⱼ is summed in latent space and projected once through mv (and the tail's through
    mv_tail). No K/V history exists beyond one block.
    """
    kv_dim = n_kv_head * head_dim
    n = pos + 1
    n_win = min(k_win.shape[0], n)
    w0 = n - n_win
    scale = np.float32(1.0 / math.sqrt(head_dim))
    rows = _KEY_ROWS if group % _KEY_ROWS == 0 else group
    for b in prange((n_qk + rows - 1) // rows):
        t0 = b * rows
        t1 = min(t0 + rows, n_qk)
        lat = np.empty((rows, k_width), np.float32)
        keys = np.empty((rows, kv_dim), np.float32)
        column = np.empty(rows, np.float32)
        _latent_rows(kc, ks, kz, k_bits, group, k_channel_off, k_sink, t0, t1, column, lat)
        rebuild(lat, t1 - t0, mk, keys)
        _score_rows(q, keys, t1 - t0, t0, rope_cos, rope_sin, n_head, n_kv_head, head_dim, scale, scores)
    keys = np.empty((w0 - n_qk, kv_dim), np.float32)
    rebuild(k_tail, w0 - n_qk, mk_tail, keys)
    _score_rows(q, keys, w0 - n_qk, n_qk, rope_cos, rope_sin, n_head, n_kv_head, head_dim, scale, scores)
    group_h = n_head // n_kv_head
    for h in prange(n_head):
        _window_scores(q[h * head_dim:(h + 1) * head_dim], k_win, (h // group_h) * head_dim, w0, n, scale, scores[h])
    for h in prange(n_head):
        mx = np.float32(-np.inf)
        for t in range(n):
            mx = max(mx, scores[h, t])
        total = np.float32(0.0)
        for t in range(n):
            e = expf(scores[h, t] - mx)
            scores[h, t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(n):
            scores[h, t] *= inv
    rows = _VALUE_ROWS
    n_blocks = (n_qv + rows - 1) // rows
    n_parts = max(1, min(n_threads, n_blocks))
    parts = np.zeros((n_parts, n_head, v_width), np.float32)
    for p in prange(n_parts):
        lat = _aligned_empty(rows, v_width)  # the matrix of the weights' product below
        column = np.empty(rows, np.float32)
        weights = np.zeros((n_head, rows), np.float32)
        u = np.empty((n_head, v_width), np.float32)
        for b in range(p, n_blocks, n_parts):
            t0 = b * rows
            t1 = min(t0 + rows, n_qv)
            _latent_rows(vc, vs, vz, v_bits, v_group, k_channel_off[:0], v_sink, t0, t1, column, lat)
            lat[t1 - t0:] = 0.0  # a last, partial block: rows past t1 hold an earlier block's
            for h in range(n_head):
                weights[h, :t1 - t0] = scores[h, t0:t1]
            rebuild(weights, n_head, lat, u)  # the block's Σₜ aₕₜ·latₜ for every head at once
            for h in range(n_head):
                for c in range(v_width):
                    parts[p, h, c] += u[h, c]
    # The tail's latents share the packed ones' matrix except in XQuant-CL's accumulator layers:
    # then they are summed together and projected once.
    tail_shares_mv = mv_tail.shape == mv.shape and mv_tail.ctypes.data == mv.ctypes.data
    for h in prange(n_head):
        o = out[h * head_dim:(h + 1) * head_dim]
        k0 = (h // group_h) * head_dim
        o[:] = 0.0
        for p in range(1, n_parts):
            for c in range(v_width):
                parts[0, h, c] += parts[p, h, c]
        u_tail = parts[0, h] if tail_shares_mv else np.zeros(v_tail.shape[1], np.float32)
        for t in range(w0 - n_qv):
            a = scores[h, n_qv + t]
            for c in range(u_tail.shape[0]):
                u_tail[c] += a * v_tail[t, c]
        _add_projected(parts[0, h], mv, k0, o)
        if not tail_shares_mv:
            _add_projected(u_tail, mv_tail, k0, o)
        _window_values(scores[h], v_win, k0, w0, n, o)


@njit(inline="always", **_OPT)
def _bound_at(t, group, residual, per_channel):
    """The first position query t reads exactly (cache.LatentCache's residual rule)."""
    if residual == 0 and not per_channel:
        return t + 1
    return group * max(t // group - max(residual // group - 1, 0), 0)


@njit(inline="always", **_OPT)
def _to_ring(z, ring, slot):
    """z rounded to fp16 into ring row `slot` (its bits); z keeps the rounded values, which are
    what the cache stores and quantizes."""
    for c in range(z.shape[0]):
        h = f32_to_f16(z[c])
        ring[slot, c] = h
        z[c] = f16_to_f32(h)


@njit(inline="always", **_OPT)
def _ring_rows(ring, t0, t1, out):
    """Positions [t0, t1) of an fp16 ring (position t in row t mod len) → out[:t1 − t0]."""
    for t in range(t0, t1):
        r = t % ring.shape[0]
        for c in range(out.shape[1]):
            out[t - t0, c] = f16_to_f32(ring[r, c])


@njit(inline="always", **_OPT)
def _store_token(z, codes, scale, zero, bits, group, sink, clip, pos):
    quantize_latent(z, bits, group, codes[pos, 0], scale[pos, 0], zero[pos, 0], clip)
    if pos < sink.shape[0]:
        sink[pos] = z


@njit(inline="always", **_OPT)
def _store_channel_group(ring, codes, scale, zero, channel_off, group, sink, clip, g0, block):
    """Quantize the per-channel group of positions [g0, g0 + G) from the exact ring (block:
    width × G scratch). Sink positions are read from `sink`, so they take another position's
    values here and leave the group's ranges alone."""
    n_sink = max(min(sink.shape[0] - g0, group), 0)
    fill = min(n_sink, group - 1)
    for t in range(group):
        r = (g0 + t) % ring.shape[0]
        for c in range(block.shape[0]):
            block[c, t] = f16_to_f32(ring[r, c])
    for t in range(n_sink):
        for c in range(block.shape[0]):
            sink[g0 + t, c] = block[c, t]
            block[c, t] = block[c, fill]
    b = g0 // group
    for c in range(block.shape[0]):
        o0, o1 = channel_off[c], channel_off[c + 1]
        quantize_latent(block[c], (o1 - o0) * 8 // group, group, codes[b, 0, o0:o1], scale[b, c], zero[b, c], clip)


@njit(**_OPT)
def latent_step(q, xn, k, v, pos, uk, uv, shared, zk, zv, ring_k, ring_v,
                kc, ks, kz, k_bits, k_channel_off, k_sink, mk,
                vc, vs, vz, v_bits, v_group, v_sink, mv, group, residual, clip, k_tail, v_tail, block,
                k_win, v_win, k_rot, inv_freq, rope_cos, rope_sin, n_head, n_kv_head, head_dim, n_threads,
                scores, out):
    """A decode step of one layer of a latent cache in one call: the token's latents (x·uk and
    x·uv; KIVI's k and v when uk is empty; for MHA one shared x·uk, or x itself, where zv is zk
    and ring_v / v_tail are ring_k / k_tail), rounded to fp16 into the exact
    rings, quantized into their streams (a per-channel key group once its G positions exist),
    the --kv-budget window row, then attend_latent over [0, pos] with the exact tail read from
    the rings. The same arithmetic as the cache's batched path, token by token."""
    if shared or uk.shape[0]:
        if uk.shape[0]:
            rebuild(xn.reshape((1, xn.shape[0])), 1, uk, zk.reshape((1, zk.shape[0])))
        else:
            zk[:] = xn
        if not shared:
            rebuild(xn.reshape((1, xn.shape[0])), 1, uv, zv.reshape((1, zv.shape[0])))
    else:  # KIVI: the latents are k and v themselves
        zk[:] = k
        zv[:] = v
    slot = pos % ring_k.shape[0]
    _to_ring(zk, ring_k, slot)
    per_channel = k_channel_off.shape[0] > 0
    if per_channel:
        if (pos + 1) % group == 0:
            _store_channel_group(ring_k, kc, ks, kz, k_channel_off, group, k_sink, clip, pos + 1 - group, block)
    else:
        _store_token(zk, kc, ks, kz, k_bits, group, k_sink, clip, pos)
    if not shared:
        _to_ring(zv, ring_v, slot)
        _store_token(zv, vc, vs, vz, v_bits, v_group, v_sink, clip, pos)
    if k_win.shape[0]:
        w = pos % k_win.shape[0]
        store_kv_f16(k, v, pos, inv_freq, n_kv_head, head_dim, k_rot, k_win[w], v_win[w])
    w0 = pos + 1 - min(k_win.shape[0], pos + 1)  # from w0 on, the window answers
    bk = min(_bound_at(pos, group, residual, per_channel), w0)
    bv = min(_bound_at(pos, group, residual, False), w0)
    _ring_rows(ring_k, bk, w0, k_tail)
    if not shared:
        _ring_rows(ring_v, bv, w0, v_tail)
    attend_latent(q, pos, kc, ks, kz, k_bits, k_channel_off, zk.shape[0], k_sink, mk, bk,
                  vc, vs, vz, v_bits, zv.shape[0], v_group, v_sink, mv, bv, group, k_tail, mk, v_tail, mv,
                  k_win, v_win, rope_cos, rope_sin, n_head, n_kv_head, head_dim, n_threads, scores, out)


@njit(parallel=True, **_OPT)
def accumulate(acc, acc_bits, dc, ds, dz, d_bits, d_width, d_sink, group, ukv_t, n, reset):
    """XQuant-CL: accumulator rows [0, n) += Δ̂ rows · ukv_t (ukv_t empty: the identity; the
    first len(d_sink) rows of Δ exact from d_sink); `reset` starts from zero (the seed layer).
    The accumulator is itself a per-token stream. Blocks of rows go through rebuild's register
    tiles: every step updates every position, the largest product XQuant-CL runs."""
    width = acc.shape[2] * 8 // acc_bits
    rows = _VALUE_ROWS
    for b in prange((n + rows - 1) // rows):
        t0 = b * rows
        t1 = min(n, t0 + rows)
        a = np.empty((rows, width), np.float32)
        delta = np.empty((rows, d_width), np.float32)
        column = np.empty(rows, np.float32)
        prev = np.empty(width, np.float32)
        _latent_rows(dc, ds, dz, d_bits, group, np.zeros(0, np.int64), d_sink, t0, t1, column, delta)
        rebuild(delta, t1 - t0, ukv_t, a)
        for t in range(t0, t1):
            row = a[t - t0]
            if not reset:
                dequantize_latent(acc[t, 0], ds[t, 0, :0], ds[t, 0, :0], acc_bits, group, prev)
                for c in range(width):
                    row[c] += prev[c]
            quantize_latent(row, acc_bits, group, acc[t, 0], ds[t, 0, :0], ds[t, 0, :0])
