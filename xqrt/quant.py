"""The cache's storage format: asymmetric min/max group quantization, bit-packed.

A row of W values is cut into groups of G (G divides W and is a multiple of 8). Each group keeps
its minimum m and step s = (max − m)/(2ᵇ − 1) as fp16 (4 bytes per group), and each value
q = round((x − m)/s) in b bits:

    b = 2: four values per byte, b = 3: eight values per three bytes (a little-endian 24-bit
    word), b = 4: two per byte (low nibble first), b = 8: one per byte.

m is rounded down and s up when they are narrowed to fp16, so every value lies inside the grid
and x̂ = q·s + m is within half a step of x. With clipping on, each group's range is the one of
least squared error instead (values past it are clamped to its ends); the format is the same. b = 16 and b = 32 store the values themselves as
IEEE half / single floats with no scales: "quantization off", and the XQuant-CL accumulator.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kernels.bits import f16_to_f32, f32_as_u32, f32_to_f16, u32_as_f32
from .kernels.simd import unpack8

_OPT = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")  # rounding must not depend on reassociation
BITS = (2, 3, 4, 8, 16, 32)
QUANT_BITS = (2, 3, 4, 8)
CHANNEL_BITS = (1, 2, 3, 4)  # the widths a per-channel stream gives its channels one by one


def row_bytes(width: int, bits: int) -> int:
    return width * bits // 8


def n_scales(width: int, bits: int, group: int) -> int:
    return width // group if bits <= 8 else 0


@njit(inline="always", **_OPT)
def _f16_down(v):
    """fp16 bits of the largest half ≤ v (v clamped to the finite halves first)."""
    v = np.float32(max(min(v, 65504.0), -65504.0))
    h = f32_to_f16(v)
    if f16_to_f32(h) > v:
        if h == 0:
            h = np.uint16(0x8001)
        elif h & np.uint16(0x8000):
            h += np.uint16(1)
        else:
            h -= np.uint16(1)
    return h


@njit(inline="always", **_OPT)
def _f16_up(v):
    return _f16_down(-v) ^ np.uint16(0x8000)


_CLIP_STEPS = 6  # each end of a group's range may move in by 0, 1/20, …, 5/20 of it


@njit(inline="always", **_OPT)
def _mse_range(x, lo, hi, top):
    """The [lo', hi'] inside [lo, hi] (ends moved in by multiples of 1/20 of the range) whose grid
    gives the least squared error over x, values beyond it clamped: a few outliers otherwise
    spend most of a 2-bit group's levels on themselves."""
    best, best_lo, best_hi = np.inf, lo, hi
    span = hi - lo
    for a in range(_CLIP_STEPS):
        for b in range(_CLIP_STEPS):
            c_lo = lo + np.float32(a / 20.0) * span
            c_hi = hi - np.float32(b / 20.0) * span
            s = (c_hi - c_lo) / np.float32(top)
            if s <= 0:
                continue
            err = 0.0
            for v in x:
                q = min(max(np.floor((v - c_lo) / s + np.float32(0.5)), np.float32(0.0)), np.float32(top))
                d = q * s + c_lo - v
                err += d * d
            if err < best:
                best, best_lo, best_hi = err, c_lo, c_hi
    return best_lo, best_hi


@njit(**_OPT)
def quantize_row(x, bits, group, codes, scale, zero, clip=False):
    """x (W,) float32 → codes (W·bits/8,) uint8 and, for bits ≤ 8, scale/zero (W/G,) fp16 bits.
    clip: each group's range from `_mse_range` instead of its min/max."""
    n = x.shape[0]
    if bits == 16:
        for j in range(n):
            h = f32_to_f16(x[j])
            codes[2 * j] = np.uint8(h & np.uint16(255))
            codes[2 * j + 1] = np.uint8(h >> np.uint16(8))
        return
    if bits == 32:
        for j in range(n):
            w = f32_as_u32(x[j])
            for b in range(4):
                codes[4 * j + b] = np.uint8((w >> np.uint32(8 * b)) & np.uint32(255))
        return
    top = (1 << bits) - 1
    for g in range(n // group):
        lo = x[g * group]
        hi = lo
        for j in range(g * group, (g + 1) * group):
            lo = min(lo, x[j])
            hi = max(hi, x[j])
        if clip:
            lo, hi = _mse_range(x[g * group:(g + 1) * group], lo, hi, top)
        zb = _f16_down(lo)
        m = f16_to_f32(zb)
        sb = _f16_up((hi - m) / np.float32(top))
        s = f16_to_f32(sb)
        zero[g] = zb
        scale[g] = sb
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        base = g * group * bits // 8
        for j in range(0, group, 8):  # 8 values fill a whole number of bytes for every width
            word = np.uint32(0)
            for t in range(8):
                q = np.int32(np.floor((x[g * group + j + t] - m) * inv + np.float32(0.5)))
                q = min(max(q, 0), top)
                word |= np.uint32(q) << np.uint32(bits * t)
            o = base + j * bits // 8
            for b in range(bits):
                codes[o + b] = np.uint8((word >> np.uint32(8 * b)) & np.uint32(255))


@njit(inline="always", **_OPT)
def dequantize_row(codes, scale, zero, bits, group, out):
    """Inverse of quantize_row: out (W,) float32."""
    n = out.shape[0]
    if bits == 16:
        for j in range(n):
            out[j] = f16_to_f32(np.uint16(codes[2 * j]) | (np.uint16(codes[2 * j + 1]) << np.uint16(8)))
        return
    if bits == 32:
        for j in range(n):
            w = np.uint32(0)
            for b in range(4):
                w |= np.uint32(codes[4 * j + b]) << np.uint32(8 * b)
            out[j] = u32_as_f32(w)
        return
    # A literal bit width per branch: the shifts and byte counts become constants (2× faster).
    if bits == 1:
        _unpack(codes, scale, zero, 1, group, out)
    elif bits == 2:
        _unpack(codes, scale, zero, 2, group, out)
    elif bits == 3:
        _unpack(codes, scale, zero, 3, group, out)
    elif bits == 4:
        _unpack(codes, scale, zero, 4, group, out)
    else:
        _unpack(codes, scale, zero, 8, group, out)


@njit(inline="always", **_OPT)
def _unpack(codes, scale, zero, bits, group, out):
    mask = np.uint32((1 << bits) - 1)
    for g in range(out.shape[0] // group):
        s = f16_to_f32(scale[g])
        m = f16_to_f32(zero[g])
        base = g * group * bits // 8
        for j in range(0, group, 8):
            o = base + j * bits // 8
            word = np.uint32(0)
            for b in range(bits):
                word |= np.uint32(codes[o + b]) << np.uint32(8 * b)
            if bits <= 4:
                unpack8(word, bits, s, m, out, g * group + j)
            else:
                for t in range(8):
                    out[g * group + j + t] = np.float32((word >> np.uint32(bits * t)) & mask) * s + m


@njit(parallel=True, **_OPT)
def quantize_rows(x, bits, group, codes, scale, zero, clip=False):
    for r in prange(x.shape[0]):
        quantize_row(x[r], bits, group, codes[r], scale[r], zero[r], clip)


@njit(parallel=True, **_OPT)
def dequantize_rows(codes, scale, zero, bits, group, out):
    for r in prange(out.shape[0]):
        dequantize_row(codes[r], scale[r], zero[r], bits, group, out[r])


# ---- per-channel streams: each channel a row of its own width --------------------------------------
# A per-channel group holds G positions of every channel; channel c's codes lie at
# offsets[c]:offsets[c + 1] of the group's bytes, in (offsets[c + 1] − offsets[c])·8/G bits, so
# channels that matter more to the keys can hold more bits than others in the same bytes.
def channel_offsets(channel_bits, group: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(channel_bits, np.int64) * group // 8)]).astype(np.int64)


def allocate_channel_bits(weight: np.ndarray, bits: int) -> np.ndarray:
    """Widths from CHANNEL_BITS averaging `bits`, of least expected weighted squared error.

    weight[c]: how much an error in channel c costs, times its mean squared group range (a group's
    error variance is range²/(2ᵇ − 1)²/12). Every channel starts at 1 bit; each further bit goes
    where it removes the most cost — greedy is optimal here, the gains shrinking bit by bit."""
    weight = np.maximum(np.asarray(weight, np.float64), 0.0)
    lo, hi = CHANNEL_BITS[0], CHANNEL_BITS[-1]
    if not lo <= bits <= hi:
        return np.full(len(weight), bits, np.int64)
    b = np.full(len(weight), lo, np.int64)
    cost = lambda n: weight / (2.0 ** n - 1) ** 2  # noqa: E731
    for _ in range((bits - lo) * len(weight)):
        gain = np.where(b < hi, cost(b) - cost(np.minimum(b + 1, hi)), -1.0)
        b[int(np.argmax(gain))] += 1
    return b


@njit(parallel=True, **_OPT)
def quantize_channels(x, offsets, group, codes, scale, zero, clip=False):
    """x (W, G): G positions of each channel → codes (offsets[-1],), scale/zero (W, 1)."""
    for c in prange(x.shape[0]):
        o0, o1 = offsets[c], offsets[c + 1]
        quantize_row(x[c], (o1 - o0) * 8 // group, group, codes[o0:o1], scale[c], zero[c], clip)


@njit(parallel=True, **_OPT)
def dequantize_channels(codes, scale, zero, offsets, group, out):
    """Inverse of quantize_channels: out (W, G) float32."""
    for c in prange(out.shape[0]):
        o0, o1 = offsets[c], offsets[c + 1]
        dequantize_row(codes[o0:o1], scale[c], zero[c], (o1 - o0) * 8 // group, group, out[c])
