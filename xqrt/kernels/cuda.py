"""Numba CUDA kernels: the decode step on a GPU, one kernel per stage.

Weights go up once in a split layout (`upload_matrix`): a block format keeps its codes as 32-bit
words and its fp16 scales in arrays of their own, so that a lane reads a block's codes in one
16-byte load. Latent streams go up as xqrt.quant packs them (xqrt.kernels.cpu's
comment describes the layout), their fp16 scales viewed as float16.

Every reduction has two paths, fixed when this module is imported: warp shuffles on a GPU, shared
memory under NUMBA_ENABLE_CUDASIM (the simulator has no shuffles), so CI checks the same kernels.
All threads of a block reach every reduction, so the shared-memory path's barriers are uniform.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass, replace

import numpy as np
from numba import config, cuda, float32, float64
from numba.cuda import libdevice
from numba.types import float16

from .. import jit_cache
from ..gguf_model import BLOCK, Q4_0, Q4_1, Q8_0

if not hasattr(np, "row_stack"):  # numba-cuda ≤ 0.30 registers np.row_stack, which NumPy 2.5 removed
    np.row_stack = np.vstack

SHUFFLE = not config.ENABLE_CUDASIM
THREADS = 256  # threads per block of every kernel
WARPS = THREADS // 32
MAX_GROUP = 8  # query heads per kv head
MAX_HEADS = 64
HEAD_DIM = 128  # the widest head the attention kernels hold in shared memory
HEAD_LANE_VALUES = HEAD_DIM // 32  # a head's values per lane when one warp holds the head
KEY_ROW = HEAD_DIM + 1  # a rebuilt key's row in shared memory, padded: the score loop reads down a column
MAX_WIDTH = 8192  # the widest latent the value projection holds in shared memory
MAX_QUANT_GROUP = 128  # the longest quantization group the cache writes hold in registers
TILE_T = 64  # positions per block of the rebuild product …
TILE_R = 32  # … and latent channels staged per step …
TILE_THREADS = 128  # … by this many threads, 8 positions × 8 columns each: 64 FMAs per four 16-byte shared loads
LAT_ROW = TILE_T + 4  # a staged channel's positions, padded: 8 channels' 16-byte stores take distinct banks
LAT_STAGE = TILE_R * LAT_ROW  # the staged latents' shared floats, …
M_AT = LAT_STAGE  # … where the staged rows of the rebuild matrix start after them, …
STAGE = M_AT + TILE_R * HEAD_DIM  # … their end, …
TILE_STAGE = max(STAGE, TILE_T * KEY_ROW)  # … and the rebuild kernels', whose rebuilt tile then takes their place
DENSE = -1  # qtype of a matrix uploaded as float32
# Every kernel is kept in Numba's disk cache (an entry per GPU generation and argument types, in
# xqrt.jit_cache's folder): compiling a step's kernels costs a process about a second each
_KERNEL = dict(cache=True)
_FAST = dict(_KERNEL, fastmath=True)  # lets a·b + c contract to one FMA (without it, a multiply and an add)
# numba-cuda 0.14 or later: launch bounds (0.14) and aligned shared arrays (0.11); the simulator's
# jit takes neither, its kernels run as Python
NEW_ENOUGH = not SHUFFLE or "launch_bounds" in inspect.signature(cuda.jit).parameters
# The rebuild product's kernels: three blocks per SM (at most 168 registers a thread; at four, 128,
# they spill), so that one block's staging loads overlap the others' FMAs; the value sums' (up to
# 32 heads) and fp16 attention's (up to 4 query heads per kv head): two blocks of THREADS (at most
# 128 registers), which they would otherwise exceed
_THREE_PER_SM = dict(_FAST, launch_bounds=(TILE_THREADS, 3)) if SHUFFLE and NEW_ENOUGH else _FAST
_TWO_PER_SM = dict(_FAST, launch_bounds=(THREADS, 2)) if SHUFFLE and NEW_ENOUGH else _FAST


# ---- reductions ------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _warp_sum(v, buf):
    """Sum over the warp, returned to every lane. buf: shared float32[THREADS]."""
    if SHUFFLE:
        off = 16
        while off > 0:
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
            off //= 2
        return v
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = float32(0.0)
    for i in range(32):
        s += buf[t - t % 32 + i]
    cuda.syncthreads()
    return s


@cuda.jit(device=True, inline=True)
def _warp_max(v, buf):
    if SHUFFLE:
        off = 16
        while off > 0:
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, off))
            off //= 2
        return v
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = buf[t - t % 32]
    for i in range(1, 32):
        s = max(s, buf[t - t % 32 + i])
    cuda.syncthreads()
    return s


@cuda.jit(device=True, inline=True)
def _block_sum(v, buf, part):
    """Sum over the block, returned to every thread. part: shared float32[WARPS]."""
    t = cuda.threadIdx.x
    if not SHUFFLE:  # every thread adds the block's values: two barriers, the simulator's main cost
        buf[t] = v
        cuda.syncthreads()
        s = float32(0.0)
        for i in range(THREADS):
            s += buf[i]
        cuda.syncthreads()
        return s
    v = _warp_sum(v, buf)
    if t % 32 == 0:
        part[t // 32] = v
    cuda.syncthreads()
    s = float32(0.0)
    for i in range(WARPS):
        s += part[i]
    cuda.syncthreads()
    return s


@cuda.jit(device=True, inline=True)
def _block_max(v, buf, part):
    t = cuda.threadIdx.x
    if not SHUFFLE:
        buf[t] = v
        cuda.syncthreads()
        s = buf[0]
        for i in range(1, THREADS):
            s = max(s, buf[i])
        cuda.syncthreads()
        return s
    v = _warp_max(v, buf)
    if t % 32 == 0:
        part[t // 32] = v
    cuda.syncthreads()
    s = part[0]
    for i in range(1, WARPS):
        s = max(s, part[i])
    cuda.syncthreads()
    return s


# ---- weights ---------------------------------------------------------------------------------
@dataclass
class DeviceMatrix:
    """A weight matrix on the device: block codes as uint32 words (rows × words), fp16 scales d
    and minimums m (rows × blocks; m only for Q4_1), or float32 `dense` for the float formats."""
    qtype: int
    n_rows: int
    n_cols: int
    qs: object
    d: object
    m: object
    dense: object

    @property
    def args(self):
        return self.qs, self.d, self.m, self.dense, self.qtype


_WORDS = {Q4_0: 4, Q4_1: 4, Q8_0: 8}  # 32-bit code words per block of 32 weights


def split_blocks(data: np.ndarray, qtype: int):
    """Raw GGUF block rows → (codes as uint32 words, scales d, minimums m), all C-contiguous."""
    rows = data.shape[0]
    size = BLOCK[qtype][1]
    b = data.reshape(rows, -1, size)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16)[:, :, 0]
    start = 4 if qtype == Q4_1 else 2
    m = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16)[:, :, 0] if qtype == Q4_1 else np.zeros((1, 1), np.float16)
    qs = np.ascontiguousarray(b[:, :, start:]).view(np.uint32).reshape(rows, -1)
    return qs, np.ascontiguousarray(d), np.ascontiguousarray(m)


def upload_matrix(qtype: int, data: np.ndarray, n_cols: int) -> DeviceMatrix:
    """A GGUF weight (uint8 rows of blocks) onto the device; float formats as float32."""
    empty_u32, empty_f16 = np.zeros((1, 1), np.uint32), np.zeros((1, 1), np.float16)
    if qtype in _WORDS:
        qs, d, m = split_blocks(data, qtype)
        return DeviceMatrix(qtype, data.shape[0], n_cols, cuda.to_device(qs), cuda.to_device(d), cuda.to_device(m),
                            cuda.to_device(np.zeros((1, 1), np.float32)))
    from .cpu import dequantize
    dense = np.empty((data.shape[0], n_cols), np.float32)
    dequantize(data, qtype, dense)
    return DeviceMatrix(DENSE, data.shape[0], n_cols, cuda.to_device(empty_u32), cuda.to_device(empty_f16),
                        cuda.to_device(empty_f16), cuda.to_device(dense))


def rows_of(w: DeviceMatrix, r0: int, r1: int) -> DeviceMatrix:
    """Rows [r0, r1) of w, as views of its arrays (the one-row placeholders stay whole)."""
    part = lambda a: a[r0:r1] if a.shape[0] == w.n_rows else a  # noqa: E731
    return DeviceMatrix(w.qtype, r1 - r0, w.n_cols, part(w.qs), part(w.d), part(w.m), part(w.dense))


def upload_dense(w: np.ndarray) -> DeviceMatrix:
    """A float matrix (rows × cols, out = W·x) as float32 on the device."""
    e32, e16 = np.zeros((1, 1), np.uint32), np.zeros((1, 1), np.float16)
    return DeviceMatrix(DENSE, w.shape[0], w.shape[1], cuda.to_device(e32), cuda.to_device(e16), cuda.to_device(e16),
                        cuda.to_device(np.ascontiguousarray(w, np.float32)))


# The matrix-vector product gives each warp `rows` rows; each lane takes one quantization block of
# them per step, its codes in one 16-byte load, and issues the loads of STEPS steps before it uses
# any: a decode step's products are too short to hide HBM's latency by occupancy alone, so the
# bytes in flight that the bandwidth needs (bandwidth × latency: 3 TB/s × ~0.7 µs, 16 KB or more per
# H100 SM) must come from each warp (docs/performance-gpu.md counts them). Rows per warp on a GPU:
# 2 (a 4096-row matrix is 256 blocks); in the simulator, where every block costs a round of 256
# Python threads, 16: a tiny model's matrices in one block. bench/gpu.py measures the other
# choices (`matvec_kernel(rows)`).
SIM_ROWS = 16
ROWS = 2 if SHUFFLE else SIM_ROWS
STEPS = 2  # blocks per lane whose loads are in flight together


# ---- int8 activations (4-way byte dot products) and 16-byte loads ----------------------------
# x as int8 codes per block of 32 (xqrt.kernels.cpu.quantize_act's, with its exact sums and the
# codes' error), so that a product is dp4a over whole code words. PTX's dp4a on a GPU; the
# simulator runs the same sums in Python. Weight codes and x come in 16-byte loads through the
# read-only cache (ld.global.nc.v4), and the rebuild product's operands in 16-byte shared loads,
# which Numba does not emit by itself (its loads are of one element): they need rows that start on
# 16 bytes, as every block format's and x's do, and a shared array aligned to 16.
if SHUFFLE:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _dp4a_asm(ptx_types):
        @intrinsic
        def dp4a(typingctx, a, b, c):
            def codegen(context, builder, sig, args):
                i32 = ir.IntType(32)
                asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), f"dp4a.{ptx_types} $0, $1, $2, $3;",
                                   "=r,r,r,r")
                return builder.call(asm, args)
            return types.int32(types.uint32, types.uint32, types.int32), codegen
        return dp4a

    _dp4a_us, _dp4a_ss = _dp4a_asm("u32.s32"), _dp4a_asm("s32.s32")

    def _load4_codegen(context, builder, sig, args):
        """The four elements from ary[index…] on in one 16-byte load through the read-only cache,
        their address from the array's strides."""
        aryty, (ary, *index) = sig.args[0], args
        a = context.make_array(aryty)(context, builder, ary)
        i64 = ir.IntType(64)
        addr = builder.ptrtoint(a.data, i64)
        for k, (at, at_type) in enumerate(zip(index, sig.args[1:])):
            at = context.cast(builder, at, at_type, types.intp)
            addr = builder.add(addr, builder.mul(at, builder.extract_value(a.strides, k)))
        kind, reg = ("f32", "f") if aryty.dtype == types.float32 else ("u32", "r")
        elt = context.get_value_type(aryty.dtype)
        asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([elt] * 4), [i64]),
                           f"ld.global.nc.v4.{kind} {{$0, $1, $2, $3}}, [$4];", f"={reg},={reg},={reg},={reg},l")
        loaded = builder.call(asm, [addr])
        return context.make_tuple(builder, sig.return_type, [builder.extract_value(loaded, k) for k in range(4)])

    @intrinsic
    def _load4(typingctx, ary, r, c):
        """ary[r, c:c + 4] in one 16-byte load."""
        return types.UniTuple(ary.dtype, 4)(ary, r, c), _load4_codegen

    @intrinsic
    def _load4_1d(typingctx, ary, i):
        return types.UniTuple(ary.dtype, 4)(ary, i), _load4_codegen

    @intrinsic
    def _shared_base(typingctx, ary):
        """A shared array's address in the shared window, 32 bits (its data pointer is generic)."""
        def codegen(context, builder, sig, args):
            data = builder.ptrtoint(context.make_array(sig.args[0])(context, builder, args[0]).data, ir.IntType(64))
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.IntType(64)]),
                               "{ .reg .u64 t; cvta.to.shared.u64 t, $1; cvt.u32.u64 $0, t; }", "=r,l")
            return builder.call(asm, [data])
        return types.uint32(ary), codegen

    @intrinsic
    def _shared4(typingctx, ary, base, i):
        """ary[i:i + 4] of a float32 shared array aligned to 16 bytes (base: _shared_base(ary)), i a
        multiple of 4, in one load; its address in 32-bit arithmetic the compiler folds into the
        load's offset."""
        def codegen(context, builder, sig, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            at = builder.trunc(context.cast(builder, args[2], sig.args[2], types.intp), i32)
            addr = builder.add(args[1], builder.shl(at, ir.Constant(i32, 2)))
            asm = ir.InlineAsm(ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32]),
                               "ld.shared.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,r")
            loaded = builder.call(asm, [addr])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(loaded, k) for k in range(4)])
        return types.UniTuple(types.float32, 4)(ary, base, i), codegen

    @intrinsic
    def _store_shared4(typingctx, ary, base, i, values):
        """ary[i:i + 4] = values (four float32) in one store, as _shared4 loads them."""
        def codegen(context, builder, sig, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            at = builder.trunc(context.cast(builder, args[2], sig.args[2], types.intp), i32)
            addr = builder.add(args[1], builder.shl(at, ir.Constant(i32, 2)))
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [i32, f32, f32, f32, f32]),
                               "st.shared.v4.f32 [$0], {$1, $2, $3, $4};", "r,f,f,f,f", side_effect=True)
            builder.call(asm, [addr] + [builder.extract_value(args[3], k) for k in range(4)])
            return context.get_dummy_value()
        return types.void(ary, base, i, types.UniTuple(types.float32, 4)), codegen
else:
    def _dp4a(a, b, c, a_signed):
        for k in range(4):
            x, y = (int(a) >> (8 * k)) & 255, (int(b) >> (8 * k)) & 255
            c += (x - 256 if a_signed and x > 127 else x) * (y - 256 if y > 127 else y)
        return np.int32(c)

    def _dp4a_us(a, b, c):
        """c + Σ unsigned bytes of a × signed bytes of b."""
        return _dp4a(a, b, c, False)

    def _dp4a_ss(a, b, c):
        """c + Σ signed bytes of a × signed bytes of b."""
        return _dp4a(a, b, c, True)

    _OFFSETS = {}  # id(array) → (the array, its start's offset into its allocation, its strides)

    def _check_16(ary, *index):
        """A GPU's 16-byte load faults unless its address is a multiple of 16: the element's offset
        into its allocation (a device allocation starts on 256 bytes) must be one. Its address is
        plain arithmetic on the index: a negative one reads before the array, where NumPy's
        indexing in the stand-ins below would wrap around."""
        if min(index) < 0:
            raise IndexError(f"a 16-byte load at index {index}: before the array on a GPU")
        seen = _OFFSETS.get(id(ary))
        if seen is None or seen[0] is not ary:  # a launch's threads share its arguments: found once
            a = ary if isinstance(ary, np.ndarray) else object.__getattribute__(ary, "_item")._ary
            owner = a
            while isinstance(owner.base, np.ndarray):
                owner = owner.base
            if len(_OFFSETS) > 64:
                _OFFSETS.clear()
            seen = _OFFSETS[id(ary)] = ary, a.ctypes.data - owner.ctypes.data, a.strides
        offset = seen[1] + sum(i * s for i, s in zip(index, seen[2]))
        if offset % 16:
            raise ValueError(f"a 16-byte load {offset} bytes into its allocation: misaligned on a GPU")

    def _load4(ary, r, c):
        """ary[r, c:c + 4] as a tuple (a GPU loads it in one instruction)."""
        _check_16(ary, r, c)
        return ary[r, c], ary[r, c + 1], ary[r, c + 2], ary[r, c + 3]

    def _load4_1d(ary, i):
        _check_16(ary, i)
        return ary[i], ary[i + 1], ary[i + 2], ary[i + 3]

    def _shared_base(ary):
        return np.uint32(0)

    def _shared4(ary, base, i):
        _check_16(ary, i)
        return ary[i], ary[i + 1], ary[i + 2], ary[i + 3]

    def _store_shared4(ary, base, i, values):
        _check_16(ary, i)
        ary[i], ary[i + 1], ary[i + 2], ary[i + 3] = values


@cuda.jit(**_KERNEL)
def quantize_x(x, up, xq, xd, xsum, xerr):
    """cpu.quantize_act with int8 codes on the device — of silu(x)·up where `up` has elements —
    one thread per block of 32; the codes packed four to a 32-bit word of xq, in order."""
    b = cuda.grid(1)
    if b * 32 >= x.shape[0]:
        return
    vals = cuda.local.array(32, float32)
    amax = float32(0.0)
    total = float32(0.0)
    for j in range(32):
        v = x[b * 32 + j]
        if up.shape[0]:
            v = v / (float32(1.0) + math.exp(-v)) * up[b * 32 + j]
        vals[j] = v
        amax = max(amax, abs(v))
        total += v
    scale = amax / float32(127.0)
    inv = float32(1.0) / scale if scale > 0 else float32(0.0)
    n_codes = 0
    for w in range(8):
        word = np.uint32(0)
        for k in range(4):
            c = np.int32(round(vals[4 * w + k] * inv))
            n_codes += c
            word |= np.uint32(c & 255) << np.uint32(8 * k)
        xq[b * 8 + w] = word
    xd[b] = scale
    xsum[b] = total
    xerr[b] = total - scale * float32(n_codes)


@dataclass
class Int8X:
    """quantize_x's output for vectors of up to n elements (n a multiple of 32)."""
    codes: object
    scale: object
    sum: object
    err: object

    @classmethod
    def empty(cls, n):
        f32 = lambda: cuda.device_array(n // 32, np.float32)  # noqa: E731
        return cls(cuda.device_array(n // 4, np.uint32), f32(), f32(), f32())


def product_int8(w: DeviceMatrix, x, act: Int8X, out, stream=0, rows=ROWS, quantized=False, up=None):
    """out = W·x for a block format with x as int8 codes (llama.cpp's arithmetic; cpu's act_bits=8
    sums): x quantized into `act` first unless `quantized` (act holds this x already); up as in
    `product`."""
    if not quantized:
        quantize_x[_blocks(x.shape[0] // 32), THREADS, stream](x, empty((0,), np.float32) if up is None else up, act.codes,
                                                              act.scale, act.sum, act.err)
    matvec_kernel(rows)[1][_matvec_blocks(w, rows), THREADS, stream](w.qs, w.d, w.m, w.qtype, act.codes, act.scale,
                                                                    act.sum, act.err, out)


_MATVEC = {}


def matvec_kernel(rows: int = ROWS):
    """The matrix-vector product kernels for `rows` rows per warp, (float x, int8 x), compiled
    once per choice."""
    if rows not in _MATVEC:
        _MATVEC[rows] = _make_matvec(rows)
    return _MATVEC[rows]


def _matvec_blocks(w: DeviceMatrix, rows: int) -> int:
    return -(-w.n_rows // (WARPS * rows))


@cuda.jit(device=True, inline=True)
def _nibble(c, shift):
    """The 4-bit code at bit `shift` of c, a float."""
    return float32((c >> np.uint32(shift)) & np.uint32(15))


@cuda.jit(device=True, inline=True)
def _signed(c):
    """The low byte of c as a signed code, a float (xor and subtract: no branch)."""
    return float32(np.int32((c & np.uint32(255)) ^ np.uint32(128)) - np.int32(128))


@cuda.jit(device=True, inline=True)
def _first_row(rows):
    return (cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32) * rows


@cuda.jit(device=True, inline=True)
def _rows_out(acc, rows, out, r0):
    """out[r0 + i] = the warp's sum of acc[i], i < rows: by shuffles on a GPU, no barrier (warps
    never wait for others); in the simulator through shared memory, one barrier for all the rows
    (a barrier is a round of 256 Python threads there; rows ≤ SIM_ROWS)."""
    tid = cuda.threadIdx.x
    if SHUFFLE:
        for i in range(rows):
            v = _warp_sum(acc[i], acc)  # a buffer only the simulator's path of _warp_sum uses
            if tid % 32 == 0 and r0 + i < out.shape[0]:
                out[r0 + i] = v
        return
    part = cuda.shared.array((SIM_ROWS, THREADS), float32)
    for i in range(rows):
        part[i, tid] = acc[i]
    cuda.syncthreads()
    if tid % 32 == 0:
        for i in range(rows):
            if r0 + i < out.shape[0]:
                total = float32(0.0)
                for k in range(32):
                    total += part[i, tid + k]
                out[r0 + i] = total


@cuda.jit(device=True, inline=True)
def _load_blocks(qs, d, m, qtype, rows, r0, b0, codes, scale, low):
    """The codes (16 bytes a load), scales and minimums of STEPS blocks of the warp's `rows` rows
    for this lane, all loads issued before any is used. Rows past the end read the last one (their
    sums are not written), blocks past the end the last one with scale 0: no branch."""
    lane = cuda.threadIdx.x % 32
    last_row, n_blocks = d.shape[0] - 1, d.shape[1]
    for s in range(STEPS):
        past = b0 + s * 32 + lane >= n_blocks
        if not SHUFFLE and past:  # the simulator's time: the sums skip these blocks, and rows past the end
            continue
        b = min(b0 + s * 32 + lane, n_blocks - 1)
        for i in range(rows):
            if not SHUFFLE and r0 + i > last_row:
                scale[s, i] = low[s, i] = float32(0.0)
                continue
            r = min(r0 + i, last_row)
            if qtype == Q8_0:
                codes[s, i, 0], codes[s, i, 1], codes[s, i, 2], codes[s, i, 3] = _load4(qs, r, 8 * b)
                codes[s, i, 4], codes[s, i, 5], codes[s, i, 6], codes[s, i, 7] = _load4(qs, r, 8 * b + 4)
            else:
                codes[s, i, 0], codes[s, i, 1], codes[s, i, 2], codes[s, i, 3] = _load4(qs, r, 4 * b)
            scale[s, i] = float32(0.0) if past else float32(d[r, b])
            if qtype == Q4_1:
                low[s, i] = float32(0.0) if past else float32(m[r, b])


def _make_matvec(rows):
    # The kernels close over `rows` alone, a number: Numba's disk cache keys a kernel on its
    # closure's pickle, which for a captured device function differs in every process.
    @cuda.jit(**_FAST)
    def matvec(qs, d, m, dense, qtype, x, out):
        """out[r] = W[r] · x, `rows` rows per warp. Block formats: lane l takes blocks l, l + 32, …
        of the rows, x's 32 values of a block in 16-byte loads (cached: every warp reads them);
        float weights: the lanes over the row. The simulator skips the sums of blocks and rows past
        the end, which a GPU computes and drops (no branch; each skipped sum is Python work there)."""
        acc = cuda.local.array(rows, float32)
        dot = cuda.local.array(rows, float32)
        codes = cuda.local.array((STEPS, rows, 8), np.uint32)
        scale = cuda.local.array((STEPS, rows), float32)
        low = cuda.local.array((STEPS, rows), float32)
        lane = cuda.threadIdx.x % 32
        r0 = _first_row(rows)
        n_rows = out.shape[0]
        for i in range(rows):
            acc[i] = float32(0.0)
        if qtype == DENSE:
            for j in range(lane, dense.shape[1], 32):
                xj = x[j]
                for i in range(rows):
                    if r0 + i < n_rows:
                        acc[i] += dense[r0 + i, j] * xj
        else:
            n_blocks = d.shape[1]
            for b0 in range(0, n_blocks, 32 * STEPS):
                _load_blocks(qs, d, m, qtype, rows, r0, b0, codes, scale, low)
                for s in range(STEPS):
                    b = b0 + s * 32 + lane
                    if not SHUFFLE and b >= n_blocks:
                        continue
                    at = min(b, n_blocks - 1) * 32
                    for i in range(rows):
                        dot[i] = float32(0.0)
                    sx = float32(0.0)
                    if qtype == Q8_0:  # literal trip counts: codes and x stay in registers
                        for w in range(8):  # word w: elements 4w … 4w + 3
                            x0, x1, x2, x3 = _load4_1d(x, at + 4 * w)
                            for i in range(rows):
                                if SHUFFLE or r0 + i < n_rows:
                                    c = codes[s, i, w]
                                    dot[i] += _signed(c) * x0 + _signed(c >> np.uint32(8)) * x1 + \
                                        _signed(c >> np.uint32(16)) * x2 + _signed(c >> np.uint32(24)) * x3
                        for i in range(rows):
                            acc[i] += scale[s, i] * dot[i]
                    else:
                        for w in range(4):  # word w's low nibbles: elements 4w …; high ones 16 + 4w …
                            x0, x1, x2, x3 = _load4_1d(x, at + 4 * w)
                            y0, y1, y2, y3 = _load4_1d(x, at + 16 + 4 * w)
                            sx += x0 + x1 + x2 + x3 + y0 + y1 + y2 + y3
                            for i in range(rows):
                                if SHUFFLE or r0 + i < n_rows:
                                    c = codes[s, i, w]
                                    dot[i] += _nibble(c, 0) * x0 + _nibble(c, 8) * x1 + _nibble(c, 16) * x2 + \
                                        _nibble(c, 24) * x3 + _nibble(c, 4) * y0 + _nibble(c, 12) * y1 + \
                                        _nibble(c, 20) * y2 + _nibble(c, 28) * y3
                        for i in range(rows):
                            if qtype == Q4_1:
                                acc[i] += scale[s, i] * dot[i] + low[s, i] * sx
                            else:  # nibbles hold q + 8
                                acc[i] += scale[s, i] * (dot[i] - float32(8.0) * sx)
        _rows_out(acc, rows, out, r0)

    @cuda.jit(**_FAST)
    def matvec_int8(qs, d, m, qtype, xq, xd, xsum, xerr, out):
        """out[r] = W[r] · x against x's int8 codes (quantize_x), `rows` rows per warp, lane l
        taking blocks l, l + 32, …: per 32-bit code word one or two 4-way byte dot products (dp4a),
        the integer sums of xqrt.kernels.cpu's act_bits=8 path. A Q4 word's nibbles meet codes
        4w…4w+3 and 16+4w…, a Q8_0 word's bytes codes 4w…4w+3: whole words of x's codes, in order."""
        acc = cuda.local.array(rows, float32)
        codes = cuda.local.array((STEPS, rows, 8), np.uint32)
        scale = cuda.local.array((STEPS, rows), float32)
        low = cuda.local.array((STEPS, rows), float32)
        xc = cuda.local.array(8, np.uint32)
        lane = cuda.threadIdx.x % 32
        r0 = _first_row(rows)
        n_rows = out.shape[0]
        for i in range(rows):
            acc[i] = float32(0.0)
        n_blocks = d.shape[1]
        ones = np.uint32(0x01010101)
        nibbles = np.uint32(0x0F0F0F0F)
        for b0 in range(0, n_blocks, 32 * STEPS):
            _load_blocks(qs, d, m, qtype, rows, r0, b0, codes, scale, low)
            for s in range(STEPS):
                b = b0 + s * 32 + lane
                if not SHUFFLE and b >= n_blocks:
                    continue
                b = min(b, n_blocks - 1)
                xc[0], xc[1], xc[2], xc[3] = _load4_1d(xq, 8 * b)
                xc[4], xc[5], xc[6], xc[7] = _load4_1d(xq, 8 * b + 4)
                scale_x = xd[b]
                if qtype == Q8_0:
                    for i in range(rows):
                        if SHUFFLE or r0 + i < n_rows:
                            dot = np.int32(0)
                            for w in range(8):
                                dot = _dp4a_ss(codes[s, i, w], xc[w], dot)
                            acc[i] += scale[s, i] * scale_x * float32(dot)
                else:
                    n_codes = np.int32(0)
                    for w in range(8):
                        n_codes = _dp4a_us(ones, xc[w], n_codes)
                    for i in range(rows):
                        if SHUFFLE or r0 + i < n_rows:
                            dot = np.int32(0)
                            for w in range(4):
                                dot = _dp4a_us(codes[s, i, w] & nibbles, xc[w], dot)
                                dot = _dp4a_us((codes[s, i, w] >> np.uint32(4)) & nibbles, xc[4 + w], dot)
                            if qtype == Q4_0:  # nibbles hold q + 8
                                acc[i] += scale[s, i] * scale_x * float32(dot - 8 * n_codes)
                            else:  # cpu's Q4_1: d·xd·Σq·c + m·Σx + 8d·xerr
                                acc[i] += scale[s, i] * (scale_x * float32(dot) + float32(8.0) * xerr[b]) + \
                                    low[s, i] * xsum[b]
        _rows_out(acc, rows, out, r0)

    return jit_cache.lock(matvec), jit_cache.lock(matvec_int8)


def reuses_codes(before: int, after: int) -> bool:
    """Whether a product of weights in format `after` can take the int8 codes of x its product
    in `before` made: every block format reads the same codes; float weights take float x."""
    return before != DENSE and after != DENSE


def product(w: DeviceMatrix, x, xp, out, stream=0, rows=ROWS, up=None):
    """out = W·x on the device, x float (its rows starting on 16 bytes: the kernel's vector loads).
    up: the product of SwiGLU's silu(x)·up instead, written into the scratch xp (len(x) floats or
    more) first."""
    if up is not None:
        silu_mul[_blocks(x.shape[0]), THREADS, stream](x, up, xp)
        x = xp
    matvec_kernel(rows)[0][_matvec_blocks(w, rows), THREADS, stream](*w.args, x, out)


@cuda.jit(device=True, inline=True)
def _weight_at(qs, d, m, dense, qtype, r, j):
    if qtype == DENSE:
        return dense[r, j]
    b, i = j // 32, j % 32
    if qtype == Q8_0:
        q = np.int32((qs[r, 8 * b + i // 4] >> np.uint32(8 * (i % 4))) & np.uint32(255))
        return float32(d[r, b]) * float32(q - 256 if q > 127 else q)
    byte = (qs[r, 4 * b + (i % 16) // 4] >> np.uint32(8 * (i % 4))) & np.uint32(255)
    q = float32(byte & np.uint32(15)) if i < 16 else float32(byte >> np.uint32(4))
    if qtype == Q4_1:
        return float32(d[r, b]) * q + float32(m[r, b])
    return float32(d[r, b]) * (q - float32(8.0))


@cuda.jit(**_KERNEL)
def embed(qs, d, m, dense, qtype, tokens, out):
    """out[t] = row tokens[t] of W (the token embeddings), as float32; blockIdx.y is t."""
    t = cuda.blockIdx.y
    for j in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, out.shape[1],
                   cuda.gridDim.x * cuda.blockDim.x):
        out[t, j] = _weight_at(qs, d, m, dense, qtype, tokens[t], j)


# ---- the matrix-matrix product: a prompt's rows at once ----------------------------------------
MM_ROWS = 64  # weight rows per block of `matmat` …
MM_TOKENS = 32  # … rows of x (prompt positions) …
MM_K = 32  # … and columns per step: one quantization block, dequantized once into shared memory
MM_W_ROW, MM_X_ROW = MM_ROWS + 1, MM_TOKENS + 1  # rows of the staged tiles, padded: a warp's stores go down a
# column (constants of their own: a shared array's shape must be literal to Numba's CUDA target)


@cuda.jit(**_FAST)
def matmat(qs, d, m, dense, qtype, x, up, out):
    """out[t] = W · x[t] — or W · (silu(x[t])·up[t]) where `up` has rows — for every row of x
    (n × cols → n × rows). A block dequantizes a 64-row slice of W once per 32 columns into shared
    memory, where 32 rows of x meet it, 8 outputs per thread (4 rows × 2 positions): a prompt
    reads each weight once per 32 positions, where the decode step reads it once per position."""
    w_s = cuda.shared.array((MM_K, MM_W_ROW), float32)
    x_s = cuda.shared.array((MM_K, MM_X_ROW), float32)
    acc = cuda.local.array(8, float32)
    tid = cuda.threadIdx.x
    tr, tt = tid % 16, tid // 16  # rows tr + 16i, positions tt + 16j
    r0, t0 = cuda.blockIdx.x * MM_ROWS, cuda.blockIdx.y * MM_TOKENS
    n_rows, n_tok, n_cols = out.shape[1], x.shape[0], x.shape[1]
    for i in range(8):
        acc[i] = float32(0.0)
    for k0 in range(0, n_cols, MM_K):
        for u in range(MM_ROWS * MM_K // THREADS):  # consecutive threads: consecutive columns of a row
            e = tid + u * THREADS
            r, kk = e // MM_K, e % MM_K
            w = float32(0.0)
            if r0 + r < n_rows and k0 + kk < n_cols:
                w = _weight_at(qs, d, m, dense, qtype, r0 + r, k0 + kk)
            w_s[kk, r] = w
        for u in range(MM_TOKENS * MM_K // THREADS):
            e = tid + u * THREADS
            t, kk = e // MM_K, e % MM_K
            v = float32(0.0)
            if t0 + t < n_tok and k0 + kk < n_cols:
                v = x[t0 + t, k0 + kk]
                if up.shape[0]:
                    v = v / (float32(1.0) + math.exp(-v)) * up[t0 + t, k0 + kk]
            x_s[kk, t] = v
        cuda.syncthreads()
        for kk in range(MM_K):
            x0, x1 = x_s[kk, tt], x_s[kk, tt + 16]
            for i in range(4):
                w = w_s[kk, tr + 16 * i]
                acc[2 * i] += w * x0
                acc[2 * i + 1] += w * x1
        cuda.syncthreads()
    for i in range(4):
        r = r0 + tr + 16 * i
        for j in range(2):
            t = t0 + tt + 16 * j
            if r < n_rows and t < n_tok:
                out[t, r] = acc[2 * i + j]


def product_rows(w: DeviceMatrix, x, out, stream=0, up=None):
    """out = x · Wᵀ for the rows of x (n × cols; out n × rows), or of silu(x)·up (matmat)."""
    grid = (-(-w.n_rows // MM_ROWS), -(-x.shape[0] // MM_TOKENS))
    matmat[grid, THREADS, stream](*w.args, x, empty((0, 0), np.float32) if up is None else up, out)


# ---- elementwise -----------------------------------------------------------------------------
@cuda.jit(**_FAST)
def rmsnorm(x, residual, weight, eps, out):
    """x += residual (unless it has no rows), then out = x / rms(x) · weight; one block per row of
    x (rows × d). The residual add rides along because a decode step is bound by its launches."""
    buf = cuda.shared.array(THREADS, float32)
    part = cuda.shared.array(WARPS, float32)
    r = cuda.blockIdx.x
    ss = float32(0.0)
    for i in range(cuda.threadIdx.x, x.shape[1], THREADS):
        if residual.shape[0]:
            x[r, i] += residual[r, i]
        ss += x[r, i] * x[r, i]
    ss = _block_sum(ss, buf, part)
    inv = float32(1.0) / math.sqrt(ss / x.shape[1] + eps)
    for i in range(cuda.threadIdx.x, x.shape[1], THREADS):
        out[r, i] = x[r, i] * inv * weight[i]


@cuda.jit(**_FAST)
def silu_mul(gate, up, out):
    """out[:len(gate)] = silu(gate)·up (out may be longer: a scratch)."""
    for i in range(cuda.grid(1), gate.shape[0], cuda.gridsize(1)):
        g = gate[i]
        out[i] = g / (float32(1.0) + math.exp(-g)) * up[i]


@cuda.jit(**_KERNEL)
def rope(rows, head_dim, cos, sin, at):
    """Rotate the adjacent pairs of every head of each row, row t by position at[0] + t (cos/sin:
    n_ctx × pairs)."""
    n_pairs = cos.shape[1]
    per_head = head_dim // 2
    half = rows.shape[1] // 2
    pos0 = at[0]
    for i in range(cuda.grid(1), rows.shape[0] * half, cuda.gridsize(1)):
        t, pair = i // half, i % half
        p = pair % per_head
        if p < n_pairs:
            o = 2 * pair
            a, b = rows[t, o], rows[t, o + 1]
            c, s = cos[pos0 + t, p], sin[pos0 + t, p]
            rows[t, o] = a * c - b * s
            rows[t, o + 1] = a * s + b * c


@cuda.jit(**_KERNEL)
def store_kv(k, v, head_dim, cos, sin, at, k_cache, v_cache):
    """Positions at[0]… of the fp16 cache from the rows of k (rotated as `rope` rotates them) and v,
    position p in row p mod its rows (a --kv-budget window is a ring) — one launch for the three
    steps: a decode step is bound by its launches."""
    n_pairs = cos.shape[1]
    per_head = head_dim // 2
    half = k.shape[1] // 2
    pos0 = at[0]
    for i in range(cuda.grid(1), k.shape[0] * half, cuda.gridsize(1)):
        t, pair = i // half, i % half
        o, p, pos = 2 * pair, pair % per_head, pos0 + t
        a, b = k[t, o], k[t, o + 1]
        if p < n_pairs:
            c, s = cos[pos, p], sin[pos, p]
            a, b = a * c - b * s, a * s + b * c
        r = pos % k_cache.shape[0]
        k_cache[r, o], k_cache[r, o + 1] = float16(a), float16(b)
        v_cache[r, o], v_cache[r, o + 1] = float16(v[t, o]), float16(v[t, o + 1])


# ---- attention -------------------------------------------------------------------------------
# fp16 K/V rows (the fp16 cache, a prompt's rebuilt history) are read by one flash-attention kernel:
# an online softmax per warp, split over the sequence for a decode step's single query (every block
# writes its softmax state and partial sum, and `merge_parts` combines them). A latent cache's
# decode attention is three kernels: scores (keys rematerialized tile by tile, one block per run of
# positions and kv head), softmax (one block per head), values (split over positions); values are
# summed in latent space (Σⱼ aⱼ·zⱼ) and projected once, since Σⱼ aⱼ·(zⱼ·M) = (Σⱼ aⱼ·zⱼ)·M.
@cuda.jit(**_FAST)
def softmax(scores, n, span):
    """Each row of scores[:, :n] → its softmax, in place (one block per row); n is span[2] where a
    span is given (see _span)."""
    if span.shape[0]:
        n = span[2]
    buf = cuda.shared.array(THREADS, float32)
    part = cuda.shared.array(WARPS, float32)
    h = cuda.blockIdx.x
    mx = float32(-math.inf)
    for t in range(cuda.threadIdx.x, n, THREADS):
        mx = max(mx, scores[h, t])
    mx = _block_max(mx, buf, part)
    total = float32(0.0)
    for t in range(cuda.threadIdx.x, n, THREADS):
        e = math.exp(scores[h, t] - mx)
        scores[h, t] = e
        total += e
    inv = float32(1.0) / _block_sum(total, buf, part)
    for t in range(cuda.threadIdx.x, n, THREADS):
        scores[h, t] *= inv


_FLASH = {}


def flash_kernel(per_kv: int):
    """flash_attention for per_kv query heads per kv head, compiled once per power of two of them
    (so that a thread's per-head state is registers: at most 128 of them up to 4 heads)."""
    group = 1 << (per_kv - 1).bit_length()
    if group not in _FLASH:
        _FLASH[group] = _make_flash(group)
    return _FLASH[group]


def _make_flash(group):
    @cuda.jit(**(_TWO_PER_SM if group <= 4 else _FAST))
    def flash_attention(q, k, v, k_exact, v_exact, k_from, v_from, k_bound, v_bound, k_win, v_win, window, at,
                        head_dim, scale, chunk, out, part_state, part_acc):
        """out[t] = causal attention of the query row q[t], at position at[0] + t, over positions [0,
        at[0] + t]: one block per (query, kv head) for all the query heads of that kv head — a prompt's
        attention in one launch. With chunk > 0 (a decode step: one query) the n positions are split
        into parts of at least `chunk` over as many of the grid's blocks as they fill — the grid need
        not change with n, so a CUDA graph replays the launch at any position — and block x leaves
        its part's softmax state (max, sum) in part_state[x, h] and its unnormalized sum of values in
        part_acc[x, h], for merge_parts (a block past the parts: the empty state, which adds
        nothing). Query t reads position j's key from k[j] while j < k_bound[t] (always when
        k_bound is empty: one history, the fp16 cache) and from k_exact[j − k_from] above — a
        latent cache's packed and exact versions of its history, rebuilt — and its value alike; the
        last `window` positions up to it from the fp16 ring k_win (position j in row j mod its
        rows, a --kv-budget window). Each warp keeps an online softmax over every WARPS-th
        position (its lanes over the head, the dot products by warp sums), then the warps' states
        meet in shared memory. Every warp runs the same trip count, so the simulator's barriers are
        uniform."""
        buf = cuda.shared.array(THREADS, float32)
        w_max = cuda.shared.array((WARPS, MAX_GROUP), float32)
        w_sum = cuda.shared.array((WARPS, MAX_GROUP), float32)
        w_acc = cuda.shared.array((WARPS, MAX_GROUP, HEAD_DIM), float32)
        qv = cuda.local.array((group, HEAD_LANE_VALUES), float32)
        acc = cuda.local.array((group, HEAD_LANE_VALUES), float32)
        mx = cuda.local.array(group, float32)
        total = cuda.local.array(group, float32)
        k_row = cuda.local.array(HEAD_LANE_VALUES, float32)
        v_row = cuda.local.array(HEAD_LANE_VALUES, float32)
        g, tid = cuda.blockIdx.y, cuda.threadIdx.x
        t = 0 if chunk else cuda.blockIdx.x
        part = cuda.blockIdx.x if chunk else 0
        warp, lane = tid // 32, tid % 32
        n_kv_head = k.shape[1] // head_dim
        per_kv = q.shape[1] // head_dim // n_kv_head
        n = at[0] + t + 1
        lo, hi = 0, n
        if chunk:
            span = -(-n // min(cuda.gridDim.x, -(-n // chunk)))
            lo = part * span
            hi = min(n, lo + span)
        kb = k_bound[t] if k_bound.shape[0] else n
        vb = v_bound[t] if v_bound.shape[0] else n
        win_lo = n - window
        # loops over `group` heads, those past per_kv skipped: indexed by constants, a thread's
        # queries, sums and softmax states are registers (indexed by per_kv, local memory)
        for j in range(group):
            if j < per_kv:
                h = g * per_kv + j
                mx[j], total[j] = float32(-3.0e38), float32(0.0)  # finite: fastmath assumes no infinities
                for u in range(HEAD_LANE_VALUES):
                    i = lane + 32 * u
                    qv[j, u] = q[t, h * head_dim + i] * scale if i < head_dim else float32(0.0)
                    acc[j, u] = float32(0.0)
        for step in range(-(-(hi - lo) // WARPS)):
            p = lo + step * WARPS + warp
            for u in range(HEAD_LANE_VALUES):  # the position's K and V, read once for every query head
                i = lane + 32 * u
                col = g * head_dim + i
                k_row[u], v_row[u] = float32(0.0), float32(0.0)
                if p < hi and i < head_dim:
                    if p >= win_lo:
                        k_row[u] = float32(k_win[p % k_win.shape[0], col])
                        v_row[u] = float32(v_win[p % v_win.shape[0], col])
                    else:
                        k_row[u] = float32(k[p, col]) if p < kb else float32(k_exact[p - k_from, col])
                        v_row[u] = float32(v[p, col]) if p < vb else float32(v_exact[p - v_from, col])
            for j in range(group):
                if j < per_kv:
                    dot = float32(0.0)
                    for u in range(HEAD_LANE_VALUES):
                        dot += qv[j, u] * k_row[u]
                    dot = _warp_sum(dot, buf)
                    if p < hi:
                        new_max = max(mx[j], dot)
                        shrink, e = math.exp(mx[j] - new_max), math.exp(dot - new_max)
                        mx[j], total[j] = new_max, total[j] * shrink + e
                        for u in range(HEAD_LANE_VALUES):
                            acc[j, u] = acc[j, u] * shrink + e * v_row[u]
        for j in range(group):
            if j < per_kv:
                if lane == 0:
                    w_max[warp, j], w_sum[warp, j] = mx[j], total[j]
                for u in range(HEAD_LANE_VALUES):
                    if lane + 32 * u < head_dim:
                        w_acc[warp, j, lane + 32 * u] = acc[j, u]
        cuda.syncthreads()
        for e in range(tid, per_kv * head_dim, THREADS):
            j, i = e // head_dim, e % head_dim
            h = g * per_kv + j
            top = w_max[0, j]  # warp 0 always holds the block's first position
            for w in range(1, WARPS):
                top = max(top, w_max[w, j])
            norm, o = float32(0.0), float32(0.0)
            for w in range(WARPS):
                f = math.exp(w_max[w, j] - top)  # 0 for a warp that saw no position
                norm += w_sum[w, j] * f
                o += w_acc[w, j, i] * f
            if chunk:
                part_acc[part, h, i] = o
                if i == 0:
                    part_state[part, h, 0], part_state[part, h, 1] = top, norm
            else:
                out[t, h * head_dim + i] = o / norm

    return jit_cache.lock(flash_attention)


@cuda.jit(**_FAST)
def merge_parts(part_state, part_acc, n_parts, head_dim, out):
    """out[h] = the softmax-weighted values of flash_attention's parts: each part's sum rescaled from
    its own maximum to the overall one. One block per head."""
    h = cuda.blockIdx.x
    top = part_state[0, h, 0]
    for s in range(1, n_parts):
        top = max(top, part_state[s, h, 0])
    for i in range(cuda.threadIdx.x, head_dim, THREADS):
        norm, o = float32(0.0), float32(0.0)
        for s in range(n_parts):
            f = math.exp(part_state[s, h, 0] - top)
            norm += part_state[s, h, 1] * f
            o += part_acc[s, h, i] * f
        out[h * head_dim + i] = o / norm


@cuda.jit(device=True, inline=True)
def _span(n_q, lo, n, span):
    """A stream's (n_q, lo, n): its launch's own numbers, or where it has a span (a device int64
    [n_q, lo, n], a decode step's) that span's — so that a CUDA graph of the launch replays at every
    position, on a grid fixed by the longest context (the blocks past n return)."""
    if span.shape[0]:
        return span[0], span[1], span[2]
    return n_q, lo, n


@cuda.jit(device=True, inline=True)
def _latent(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, p, c):
    """Channel c of position p's latent: from the exact sinks (p < len(sink)), the packed stream
    (p < n_q; per-channel when cbits — each channel's width — is not empty, else per-token) or the
    exact tail, a ring (position p in row p mod len(tail)). Groups are 2^shift long: a shift, not a
    division, in this loop."""
    if p < sink.shape[0]:
        return sink[p, c]
    if p >= n_q:
        return float32(tail[p % tail.shape[0], c])
    word = np.uint32(0)
    if cbits.shape[0]:
        b = p >> shift
        u = p & ((1 << shift) - 1)
        cb = cbits[c]
        if cb == 8:
            q = np.uint32(codes[b, 0, off[c] + u])
        else:
            o = off[c] + (u >> 3) * cb
            for k in range(cb):
                word |= np.uint32(codes[b, 0, o + k]) << np.uint32(8 * k)
            q = (word >> np.uint32(cb * (u & 7))) & np.uint32((1 << cb) - 1)
        return float32(q) * float32(scale[b, c, 0]) + float32(zero[b, c, 0])
    if bits == 8:
        q = np.uint32(codes[p, 0, c])
    else:
        o = (c >> 3) * bits
        for k in range(bits):
            word |= np.uint32(codes[p, 0, o + k]) << np.uint32(8 * k)
        q = (word >> np.uint32(bits * (c & 7))) & np.uint32((1 << bits) - 1)
    g = c >> shift
    return float32(q) * float32(scale[p, 0, g]) + float32(zero[p, 0, g])


@cuda.jit(device=True, inline=True)
def _stage_latents(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, r0, n_r, width, lat, r_step,
                   t_step, n_t, exact_runs):
    """lat[r · r_step + t · t_step] = channel r0 + r of position p0 + t (0 past n or width), n_r
    channels × n_t positions (multiples of 8), by the block's threads whatever their number:
    channel-major for the rebuild product (TILE_R channels, r_step LAT_ROW), position-major for
    keys that are the latents themselves (a head's channels, t_step KEY_ROW) and for the value
    sums (a block's channels, t_step VAL_ROW). Each thread takes eight latents at a time — 8
    positions of a channel in a per-channel stream, 8 channels of a position in a per-token one:
    where they share one code word, from its bytes and one scale and zero; with exact_runs, where
    all eight are exact, from one run of the ring `tail`, its row found once; else one by one
    through _latent (sinks, a group's or the ring's ends). exact_runs is False in the rebuild
    product, whose sums are live around its staging: with that path too its 168 registers spilled."""
    per_channel = cbits.shape[0] > 0
    for i in range(cuda.threadIdx.x, n_r * n_t // 8, cuda.blockDim.x):
        if per_channel:  # lanes over channels: a warp's stores hit every bank once
            r, t = i % n_r, (i // n_r) * 8
        else:  # lanes over positions
            r, t = (i // n_t) * 8, i % n_t
        p, c = p0 + t, r0 + r
        at, step = r * r_step + t * t_step, t_step if per_channel else r_step  # where the eight go
        last_p, last_c = (p + 7, c) if per_channel else (p, c + 7)
        packed = shift >= 3 and p >= sink.shape[0] and last_p < min(n, n_q) and last_c < width and (
            p % 8 == 0 if per_channel else c % 8 == 0)
        if packed:
            word = np.uint64(0)
            if per_channel:
                b = p >> shift
                cb = cbits[c]
                o = off[c] + ((p & ((1 << shift) - 1)) >> 3) * cb
                for k in range(cb):
                    word |= np.uint64(codes[b, 0, o + k]) << np.uint64(8 * k)
                s, z = float32(scale[b, c, 0]), float32(zero[b, c, 0])
            else:
                cb = bits
                o = (c >> 3) * cb
                for k in range(cb):
                    word |= np.uint64(codes[p, 0, o + k]) << np.uint64(8 * k)
                s, z = float32(scale[p, 0, c >> shift]), float32(zero[p, 0, c >> shift])
            mask = np.uint64((1 << cb) - 1)
            for j in range(8):
                lat[at + j * step] = float32((word >> np.uint64(cb * j)) & mask) * s + z
        elif exact_runs and p >= max(sink.shape[0], n_q) and last_p < n and last_c < width and (
                not per_channel or (p % 8 == 0 and tail.shape[0] % 8 == 0)):  # all eight exact, in one run of the ring
            row = p % tail.shape[0]  # once for the eight: a 64-bit remainder is a long run of instructions
            for j in range(8):
                lat[at + j * step] = float32(tail[row + j, c] if per_channel else tail[row, c + j])
        else:
            for j in range(8):
                pj, cj = (p + j, c) if per_channel else (p, c + j)
                lat[at + j * step] = _latent(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, pj, cj) \
                    if pj < n and cj < width else float32(0.0)


@cuda.jit(device=True, inline=True)
def _stage_factor(m, r0, col0, n_cols, stage):
    """stage[M_AT + r · HEAD_DIM + c] = m[r0 + r, col0 + c] (0 past m's rows or n_cols), TILE_R
    rows by TILE_THREADS threads, four columns each: one 16-byte load and store where m's rows
    start on 16 bytes (m is a whole device allocation), else four of one element."""
    tid = cuda.threadIdx.x
    c = 4 * (tid % (HEAD_DIM // 4))
    quad = m.shape[1] % 4 == 0 and col0 % 4 == 0 and n_cols % 4 == 0 and c < n_cols
    base = _shared_base(stage)
    for r in range(tid // (HEAD_DIM // 4), TILE_R, TILE_THREADS // (HEAD_DIM // 4)):
        at = M_AT + r * HEAD_DIM + c
        if quad and r0 + r < m.shape[0]:
            _store_shared4(stage, base, at, _load4(m, r0 + r, col0 + c))
        else:
            for k in range(4):
                stage[at + k] = m[r0 + r, col0 + c + k] if r0 + r < m.shape[0] and c + k < n_cols else float32(0.0)


@cuda.jit(device=True, inline=True)
def _tile_col(tx, j):
    """The column of thread (·, tx)'s j-th value (j < 8) in a rebuild tile: two runs of four,
    HEAD_DIM / 2 apart, so that each is one 16-byte shared load and a warp's loads of a row are
    one piece."""
    return (j // 4) * (HEAD_DIM // 2) + 4 * tx + j % 4


@cuda.jit(device=True, inline=True)
def _rebuild_tile(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, m, col0, n_cols, stage):
    """stage[t · KEY_ROW + c] = latents of positions [p0, p0 + TILE_T) ∩ [0, n) · m[:, col0 : col0 +
    n_cols] (n_cols ≤ HEAD_DIM), by TILE_THREADS threads (the caller syncs before reading it). The latents are dequantized TILE_R
    channels at a time into shared memory (stage: TILE_R rows of LAT_ROW floats, position-major)
    beside the matching rows of m (from M_AT: TILE_R rows of HEAD_DIM); thread (ty, tx) then owns
    positions 8ty … 8ty+7 and the columns _tile_col: four 16-byte shared loads feed 64 FMAs, into
    sums indexed by constants only (registers). Flat offsets, not 2-d views: Numba's CUDA target
    cannot reshape."""
    tid = cuda.threadIdx.x
    ty, tx = tid // 16, tid % 16
    acc = cuda.local.array(64, float32)
    for i in range(64):
        acc[i] = float32(0.0)
    a = cuda.local.array(8, float32)
    w = cuda.local.array(8, float32)
    width = m.shape[0]
    base = _shared_base(stage)
    at_a, at_w = 8 * ty, M_AT + _tile_col(tx, 0)  # this thread's first latent and factor element of a row
    for r0 in range(0, width, TILE_R):
        _stage_latents(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, r0, TILE_R, width, stage,
                       LAT_ROW, 1, TILE_T, False)
        _stage_factor(m, r0, col0, n_cols, stage)
        cuda.syncthreads()
        for r4 in range(0, TILE_R, 4):  # four channels a trip, unrolled: the loads' offsets are constants
            for r in range(r4, r4 + 4):
                a[0], a[1], a[2], a[3] = _shared4(stage, base, at_a + r * LAT_ROW)
                a[4], a[5], a[6], a[7] = _shared4(stage, base, at_a + r * LAT_ROW + 4)
                w[0], w[1], w[2], w[3] = _shared4(stage, base, at_w + r * HEAD_DIM)
                w[4], w[5], w[6], w[7] = _shared4(stage, base, at_w + r * HEAD_DIM + HEAD_DIM // 2)
                for i in range(8):
                    for j in range(8):
                        acc[8 * i + j] = cuda.fma(a[i], w[j], acc[8 * i + j])
        cuda.syncthreads()
    for i in range(8):  # the staging is done with: the tile takes its place
        for j in range(8):
            stage[(8 * ty + i) * KEY_ROW + _tile_col(tx, j)] = acc[8 * i + j]


@cuda.jit(**_THREE_PER_SM)
def scores_latent(q, codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, lo, n, span, mk, cos, sin,
                  head_dim, scale_qk, scores):
    """Rematerialize-and-score: scores[h, t] = q_h · RoPE_t(z_t · mk)[kv head of h] · scale_qk for
    positions [lo, n) of a latent key stream (mk empty: the latent is the key itself). Block (x, g)
    of TILE_THREADS threads: positions lo + TILE_T·x … and kv head g; the rebuilt keys live in
    shared memory only, where the staged latents and factor rows were (all of it separately would
    pass the 48 KB a block has)."""
    if SHUFFLE:  # 16-byte aligned: the product's shared loads are of four floats (not in the simulator's API)
        stage = cuda.shared.array(TILE_STAGE, float32, alignment=16)  # the rebuild's staging, then keys
    else:
        stage = cuda.shared.array(TILE_STAGE, float32)
    q_s = cuda.shared.array((MAX_GROUP, HEAD_DIM), float32)
    tid = cuda.threadIdx.x
    n_q, lo, n = _span(n_q, lo, n, span)
    p0, g = lo + cuda.blockIdx.x * TILE_T, cuda.blockIdx.y
    if p0 >= n:
        return
    per_kv = scores.shape[0] // cuda.gridDim.y  # query heads per kv head
    col0 = g * head_dim
    c = tid % HEAD_DIM  # this thread's column in the per-position loops below
    for j in range(tid // HEAD_DIM, per_kv, TILE_THREADS // HEAD_DIM):
        if c < head_dim:
            q_s[j, c] = q[(g * per_kv + j) * head_dim + c]
    if mk.shape[0]:
        _rebuild_tile(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, mk, col0, head_dim, stage)
    else:  # the keys are the latents: the head's channels, position-major
        _stage_latents(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, col0, -(-head_dim // 8) * 8,
                       col0 + head_dim, stage, 1, KEY_ROW, TILE_T, True)
    cuda.syncthreads()
    pr = tid % (HEAD_DIM // 2)
    for t in range(tid // (HEAD_DIM // 2), TILE_T, TILE_THREADS // (HEAD_DIM // 2)):
        p = p0 + t
        if pr < cos.shape[1] and p < n:
            o = t * KEY_ROW + 2 * pr
            a, b = stage[o], stage[o + 1]
            co, si = cos[p, pr], sin[p, pr]
            stage[o] = a * co - b * si
            stage[o + 1] = a * si + b * co
    cuda.syncthreads()
    for i in range(tid, TILE_T * per_kv, TILE_THREADS):
        t, j = i % TILE_T, i // TILE_T
        p = p0 + t
        if p < n:
            dot = float32(0.0)
            for k in range(head_dim):
                dot += q_s[j, k] * stage[t * KEY_ROW + k]
            scores[g * per_kv + j, p] = dot * scale_qk


_VALUES = {}
VALUE_HEADS = 16  # the most heads a block of the value sums takes (more heads: more blocks), …
VALUES_T = 32  # … positions per stage, …
PROBS_STAGE = VALUES_T * VALUE_HEADS  # … their probabilities, a position's heads together, …
VAL_ROW = THREADS + 1  # … and their latents, a position's channels a row, padded: stores down a column
VAL_STAGE = VALUES_T * VAL_ROW


def value_sums(probs, value, width, parts, n_parts, stream=0):
    """parts = values_latent's partial sums of a latent value stream over n_parts parts of its
    positions, for every head of probs: a block takes 8 heads, or up to VALUE_HEADS, so that its
    sums are registers (at two blocks per SM), and more heads take blocks of their own, each
    staging the latents again (cheap: eight decoded per code word)."""
    n_head = probs.shape[0]
    heads = 8 if n_head <= 8 else VALUE_HEADS
    if heads not in _VALUES:
        _VALUES[heads] = _make_values(heads)
    grid = (n_parts, -(-width // THREADS), -(-n_head // heads))
    _VALUES[heads][grid, THREADS, stream](probs, *value.args, width, parts)


def _make_values(heads):
    @cuda.jit(**_TWO_PER_SM)
    def values_latent(probs, codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, lo, n, span, width,
                      parts):
        """parts[s, h, c] = Σ probs[h, t]·z_t[c] over positions [lo + s·chunk, lo + (s+1)·chunk) ∩ [lo, n)
        of a latent value stream, chunk = ⌈(n − lo) / parts⌉ (grid: parts × column tiles × groups of
        `heads` heads; each thread one channel, its group's heads — those past probs' adding zeros —
        its probabilities four heads to a 16-byte shared load; a part past n writes zeros). The
        latents are staged VALUES_T positions at a time, eight decoded per code word, as the
        rebuild's are."""
        if SHUFFLE:
            p_s = cuda.shared.array(PROBS_STAGE, float32, alignment=16)
        else:
            p_s = cuda.shared.array(PROBS_STAGE, float32)
        lat = cuda.shared.array(VAL_STAGE, float32)
        acc = cuda.local.array(heads, float32)
        n_head, h0 = probs.shape[0], cuda.blockIdx.z * heads
        tid = cuda.threadIdx.x
        c0 = cuda.blockIdx.y * THREADS
        c = c0 + tid
        n_q, lo, n = _span(n_q, lo, n, span)
        chunk = -(-(n - lo) // cuda.gridDim.x)
        t0 = lo + cuda.blockIdx.x * chunk
        t1 = min(n, t0 + chunk)
        base = _shared_base(p_s)
        for h in range(heads):
            acc[h] = float32(0.0)
        for s in range(t0, t1, VALUES_T):
            for i in range(tid, VALUES_T * heads, THREADS):
                h, j = i // VALUES_T, i % VALUES_T
                p_s[j * heads + h] = probs[h0 + h, s + j] if h0 + h < n_head and s + j < t1 else float32(0.0)
            _stage_latents(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, t1, s, c0, THREADS, width, lat,
                           1, VAL_ROW, VALUES_T, True)
            cuda.syncthreads()
            if c < width:
                for j in range(min(VALUES_T, t1 - s)):
                    z = lat[j * VAL_ROW + tid]
                    for h in range(0, heads, 4):
                        p = _shared4(p_s, base, j * heads + h)
                        for k in range(4):
                            acc[h + k] += p[k] * z
            cuda.syncthreads()
        if c < width:
            for h in range(heads):
                if h0 + h < n_head:
                    parts[cuda.blockIdx.x, h0 + h, c] = acc[h]

    return jit_cache.lock(values_latent)


@cuda.jit(**_FAST)
def project_values(parts, n_parts, width, mv, head_dim, add, out):
    """out[h] (+)= (Σₛ parts[s, h]) · mv[:, kv head of h] (mv empty: the latent is V itself; add:
    onto what out holds, the runs of a history read from two sources). One block per head."""
    u_s = cuda.shared.array(MAX_WIDTH, float32)
    h = cuda.blockIdx.x
    for c in range(cuda.threadIdx.x, width, THREADS):
        acc = float32(0.0)
        for s in range(n_parts):
            acc += parts[s, h, c]
        u_s[c] = acc
    cuda.syncthreads()
    n_kv_head = (mv.shape[1] if mv.shape[0] else width) // head_dim
    k0 = (h // (parts.shape[1] // n_kv_head)) * head_dim
    for i in range(cuda.threadIdx.x, head_dim, THREADS):
        if mv.shape[0]:
            acc = float32(0.0)
            for c in range(width):
                acc += u_s[c] * mv[c, k0 + i]
        else:
            acc = u_s[k0 + i]
        out[h * head_dim + i] = acc + (out[h * head_dim + i] if add else float32(0.0))


@cuda.jit(**_THREE_PER_SM)
def rebuild(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, lo, n, span, m, out, base, add):
    """out[p − base] (+)= z_p · m for the positions p ∈ [lo, n) of a latent stream (m empty: z_p
    itself) — a prompt's keys and values, rebuilt once for all its queries, and XQuant-CL's
    accumulator Â (add: onto what out holds; an fp16 out rounds each row as the CPU's does).
    Grid: position tiles × column tiles of HEAD_DIM, TILE_THREADS threads a block."""
    if SHUFFLE:
        stage = cuda.shared.array(TILE_STAGE, float32, alignment=16)
    else:
        stage = cuda.shared.array(TILE_STAGE, float32)
    n_q, lo, n = _span(n_q, lo, n, span)
    p0, col0 = lo + cuda.blockIdx.x * TILE_T, cuda.blockIdx.y * HEAD_DIM
    if p0 >= n:
        return
    n_cols = min(HEAD_DIM, out.shape[1] - col0)
    tid = cuda.threadIdx.x
    if m.shape[0]:  # the tile through shared memory, …
        _rebuild_tile(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, m, col0, n_cols, stage)
        cuda.syncthreads()
    for i in range(tid, TILE_T * HEAD_DIM, TILE_THREADS):  # … to rows written a warp's columns at a time
        t, c = i // HEAD_DIM, i % HEAD_DIM
        p = p0 + t
        if p < n and c < n_cols:
            v = stage[t * KEY_ROW + c] if m.shape[0] else _latent(codes, scale, zero, bits, shift, off, cbits, sink,
                                                                   tail, n_q, p, col0 + c)
            out[p - base, col0 + c] = v + (float32(out[p - base, col0 + c]) if add else float32(0.0))


@cuda.jit(**_KERNEL)
def dequantize_stream(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, lo, n, span, first, out):
    """out[p − first, c] = the latent of position p as fp16 (the input of a tensor-core rebuild
    product), zero where p is outside [lo, n): a decode step's launch covers its reach, and the rows
    past the position must add nothing to the product's sums. Block (x, y): positions first +
    TILE_T·x … and channels TILE_R·y …, staged as the fused rebuild stages them (eight latents per
    code word), then written a position's channels at a time."""
    lat = cuda.shared.array(LAT_STAGE, float32)
    n_q, lo, n = _span(n_q, lo, n, span)
    p0, r0 = first + cuda.blockIdx.x * TILE_T, cuda.blockIdx.y * TILE_R
    _stage_latents(codes, scale, zero, bits, shift, off, cbits, sink, tail, n_q, n, p0, r0, TILE_R, out.shape[1], lat,
                   LAT_ROW, 1, TILE_T, True)
    cuda.syncthreads()
    for i in range(cuda.threadIdx.x, TILE_T * TILE_R, THREADS):
        t, r = i // TILE_R, i % TILE_R
        p, c = p0 + t, r0 + r
        if p - first < out.shape[0] and c < out.shape[1]:
            out[p - first, c] = float16(lat[r * LAT_ROW + t]) if p >= lo else float16(0.0)


@cuda.jit(**_KERNEL)
def clip_span(span, first, end, out):
    """out = [0, lo, n] of a decode step's stream span, clipped to positions [first, end): the
    bounds of a piece of its keys rebuilt into rows of their own (exact, nothing packed)."""
    if cuda.threadIdx.x == 0:
        lo = max(span[1], first)
        out[0], out[1], out[2] = 0, lo, max(lo, min(span[2], end))


# ---- cache writes ----------------------------------------------------------------------------
# xqrt.quant's rounding, bit for bit: the step is the fp16 just above (hi − m)/(2ᵇ − 1), the
# minimum the fp16 just below, and q = ⌊(x − m)·(1/s) + ½⌋ with the product rounded before the
# add (on a GPU a multiply-add would be fused into one rounding unless the product is an
# explicit round-to-nearest multiply). These kernels are built without fastmath: IEEE division.
@cuda.jit(device=True, inline=True)
def _mul_rn(a, b):
    if SHUFFLE:
        return libdevice.fmul_rn(a, b)
    return a * b


@cuda.jit(device=True, inline=True)
def _half_down(v):
    """The largest fp16 value ≤ v, as float32 (xqrt.quant._f16_down). The half below a half h is
    h − δ rounded to fp16, with δ strictly between half a spacing and one (exactly half where h is
    a power of two and the spacing below it halves): h·2⁻¹¹ above zero, 1.5·|h|·2⁻¹¹ below it (away
    from zero the spacing can only grow), never under the subnormal spacing 2⁻²⁴."""
    v = max(min(v, float32(65504.0)), float32(-65504.0))
    h = float32(float16(v))
    if h <= v:
        return h
    if h == float32(0.0):
        return float32(-5.9604645e-08)  # −2⁻²⁴
    if h > float32(0.0):
        return float32(float16(h - max(h * float32(4.8828125e-4), float32(5.9604645e-08))))
    return float32(float16(h - max(h * float32(-7.32421875e-4), float32(5.9604645e-08))))


@cuda.jit(device=True, inline=True)
def _mse_range(vals, n, lo, hi, top):
    """xqrt.quant._mse_range, operation for operation: the ends of [lo, hi] moved in by multiples
    of 1/20 of it whose grid has the least squared error over vals[:n] (the sum in float64)."""
    best, best_lo, best_hi = math.inf, lo, hi
    span = hi - lo
    for a in range(6):
        for b in range(6):
            c_lo = lo + _mul_rn(float32(a / 20.0), span)
            c_hi = hi - _mul_rn(float32(b / 20.0), span)
            s = (c_hi - c_lo) / float32(top)
            if s <= float32(0.0):
                continue
            err = 0.0
            for j in range(n):
                q = float32(min(max(math.floor((vals[j] - c_lo) / s + float32(0.5)), 0), top))
                d = _mul_rn(q, s) + c_lo - vals[j]
                err += float64(_mul_rn(d, d))
            if err < best:
                best, best_lo, best_hi = err, c_lo, c_hi
    return best_lo, best_hi


@cuda.jit(device=True, inline=True)
def _quantize(vals, n, bits, codes, o, clip):
    """vals[:n] (one group) → codes[o : o + n·bits/8] as xqrt.quant.quantize_row packs them (clip:
    the range of least squared error); returns (step, minimum), both fp16 values."""
    lo = vals[0]
    hi = lo
    for j in range(n):
        lo = min(lo, vals[j])
        hi = max(hi, vals[j])
    top = (1 << bits) - 1
    if clip:
        lo, hi = _mse_range(vals, n, lo, hi, top)
    m = _half_down(lo)
    s = -_half_down(-((hi - m) / float32(top)))
    inv = float32(1.0) / s if s > float32(0.0) else float32(0.0)
    for j in range(0, n, 8):  # 8 values fill a whole number of bytes for every width
        word = np.uint64(0)
        for t in range(8):
            q = np.int64(math.floor(_mul_rn(vals[j + t] - m, inv) + float32(0.5)))
            q = min(max(q, 0), top)
            word |= np.uint64(q) << np.uint64(bits * t)
        for b in range(bits):
            codes[o + j * bits // 8 + b] = np.uint8((word >> np.uint64(8 * b)) & np.uint64(255))
    return s, m


@cuda.jit(**_KERNEL)
def store_token(z, ring, codes, scale, zero, bits, group, sink, at, quantize, clip):
    """Row t of z, the latent of position at[0] + t: rounded to fp16 into row (at[0] + t) mod len(ring)
    of the exact ring and into the sinks while the position is below len(sink), then — quantize —
    packed per token into the stream's row of that position, from the rounded values (a ring of
    no rows: from z itself, XQuant-CL's Δ), clip: in ranges of least squared error. One thread per
    group of a row; grid: groups × rows."""
    vals = cuda.local.array(MAX_QUANT_GROUP, float32)
    g, t = cuda.grid(1), cuda.blockIdx.y
    if g * group >= z.shape[1]:
        return
    pos = at[0] + t
    for j in range(min(group, z.shape[1] - g * group)):
        c = g * group + j
        h = float16(z[t, c])
        vals[j] = z[t, c]
        if ring.shape[0]:  # the exact latents are fp16, and the packed ones are quantized from them
            ring[pos % ring.shape[0], c] = h
            vals[j] = float32(h)
        if pos < sink.shape[0]:
            sink[pos, c] = float32(h)
    if quantize:
        s, m = _quantize(vals, group, bits, codes[pos, 0], g * group * bits // 8, clip)
        scale[pos, 0, g] = float16(s)
        zero[pos, 0, g] = float16(m)


@cuda.jit(**_KERNEL)
def store_channel_group(ring, codes, scale, zero, off, cbits, group, sink, at, rows, clip):
    """The per-channel groups that the `rows` positions from at[0] on complete (one per blockIdx.y;
    a block past them returns: ⌈rows / G⌉ blocks cover any start), packed from the exact ring, one
    thread per channel (xqrt.kernels.cpu._store_channel_group): sink positions, read from the sinks,
    take another position's values here and leave the group's ranges alone."""
    vals = cuda.local.array(MAX_QUANT_GROUP, float32)
    c = cuda.grid(1)
    g0 = (at[0] // group + cuda.blockIdx.y) * group
    if c >= ring.shape[1] or g0 + group > at[0] + rows:
        return
    for t in range(group):
        vals[t] = float32(ring[(g0 + t) % ring.shape[0], c])
    n_sink = max(min(sink.shape[0] - g0, group), 0)
    fill = min(n_sink, group - 1)
    for t in range(n_sink):
        vals[t] = vals[fill]
    b = g0 // group
    s, m = _quantize(vals, group, cbits[c], codes[b, 0], off[c], clip)
    scale[b, c, 0] = float16(s)
    zero[b, c, 0] = float16(m)


@cuda.jit(**_KERNEL)
def subtract_rows(x, rows, at, out):
    """out[t] = x[t] − rows[at[0] + t] (XQuant-CL: the new tokens' inputs less the accumulator's rows)."""
    width, r0 = x.shape[1], at[0]
    for i in range(cuda.grid(1), x.shape[0] * width, cuda.gridsize(1)):
        t, c = i // width, i % width
        out[t, c] = x[t, c] - float32(rows[r0 + t, c])


# ---- launching -------------------------------------------------------------------------------
def available() -> bool:
    """Whether numba-cuda sees a GPU (or the simulator stands in for one) and is new enough for
    these kernels."""
    try:
        return NEW_ENOUGH and bool(cuda.is_available())
    except Exception:  # a driver that fails to load says so as an exception, not as False
        return False


def channel_bits(off, group: int) -> np.ndarray:
    """A per-channel stream's bits per channel, from its channels' byte offsets (xqrt.quant's
    channel_offsets: G codes a channel); empty for a per-token stream (no offsets)."""
    return (np.diff(off) * 8 // group).astype(np.int64) if len(off) else np.zeros(0, np.int64)


@dataclass
class DeviceStream:
    """One latent stream on the device (xqrt.cache.Stream's arrays, scales as float16) answering
    for positions [lo, n): the first len(sink) read exact from `sink`, then packed up to n_q, then
    exact from the ring `tail` (position p in row p mod len(tail)). With a span the kernels read
    n_q, lo and n from device memory instead (see _span), and launch over every position it may
    come to: a decode step's streams, whose numbers the step writes before it runs."""
    codes: object
    scale: object
    zero: object
    bits: int
    shift: int  # log2 of the group size
    off: object  # per-channel streams: each channel's byte offset in a group …
    cbits: object  # … and its bits; else both empty
    sink: object
    tail: object
    n_q: int
    lo: int
    n: int
    span: object = None  # device int64 [n_q, lo, n], or empty (None given): the three above

    def __post_init__(self):
        if self.span is None:
            self.span = empty((0,), np.int64)

    @property
    def args(self):
        return (self.codes, self.scale, self.zero, self.bits, self.shift, self.off, self.cbits, self.sink, self.tail,
                self.n_q, self.lo, self.n, self.span)

    @property
    def width(self) -> int:
        return self.tail.shape[1]

    def extent(self, most: int) -> int:
        """Positions a launch over the stream covers: [lo, n), or with a span `most` (the step's
        reach: at least the longest the span comes to before the launch is made anew) — for an
        exact stream no more than its rows, which hold every position of [lo, n) at once."""
        if not self.span.shape[0]:
            return self.n - self.lo
        return most if self.codes.shape[0] else min(most, self.tail.shape[0])


def exact_stream(rows, lo: int = 0, n: int = 0, span=None) -> DeviceStream:
    """Positions [lo, n) of rows (position p in row p mod their number: a ring, or rows of every
    position) read as a stream: nothing packed, no sinks."""
    scale, none = empty((0, 1, 0), np.float16), empty((0,), np.int64)  # typed as real streams' arrays: one kernel
    return DeviceStream(empty((0, 1, 0), np.uint8), scale, scale, 8, 0, none, none, empty((0, 0), np.float32), rows,
                        0, lo, n, span)


def rebuild_rows(stream: DeviceStream, m, out, base: int, add: bool, cublas: Cublas | None = None, cu_stream=0,
                 reach: int = 0):
    """out[p − base] (+)= z_p · m for the positions p ∈ [lo, n) of a latent stream (m empty: z_p
    itself): the `rebuild` kernel, or with cublas the product on tensor cores. reach: the positions a
    launch over a spanned stream covers (0: every row of out)."""
    most = reach or out.shape[0]
    if cublas is not None and m.shape[0]:
        cublas.rebuild(stream, m, out, base, add, most, cu_stream)
        return
    extent = stream.extent(most)
    if extent > 0:
        grid = (-(-extent // TILE_T), -(-out.shape[1] // HEAD_DIM))
        rebuild[grid, TILE_THREADS, cu_stream](*stream.args, m, out, base, add)


CUBLAS_CHUNK = 16384  # positions per tensor-core rebuild: its fp16 scratch is a fixed size, not per position


@dataclass(frozen=True)
class Piece:
    """One tensor-core product of a stream: rows [first, end) of `run`'s latents, into a ring of
    `ring` rows (row first mod ring on), standing for positions [lo, hi) of the stream."""
    run: DeviceStream
    first: int
    end: int
    ring: int
    lo: int
    hi: int


class Cublas:
    """The rebuild product z·M through cuBLAS, by way of torch on the same device buffers (no
    copies): latents dequantized to fp16 rows by `dequantize_stream` (an fp16 ring of every position,
    XQuant-CL's Â, is read in place), M as an fp16 copy made once, fp32 sums on tensor cores, one
    rounding to the output's type. Unlike the fused kernel it writes what it rebuilds to device
    memory: a decode step's keys go to a scratch of fp16 rows, which scores_latent then reads as it
    reads a window (`keys`). Positions go through `chunk` at a time (chunks aligned to its multiples),
    so that the scratch is chunk rows at any context — 64 MB for Llama-3-8B's XQuant, where rows of
    every position would take 4 KB per position — for a few more launches per chunk after the first.
    A decode step's streams (with spans) go over every position of the step's reach, whatever their
    bounds, so that a CUDA graph of the step replays at every position below it: nothing the host
    does depends on the position. Under the simulator torch works on the host arrays behind the
    simulated ones."""

    def __init__(self, n_ctx: int, chunk: int | None = None):
        import torch
        self.torch, self.chunk = torch, max(1, min(chunk or CUBLAS_CHUNK, n_ctx))
        self._half = {}  # id of a factor matrix → (it, its fp16 copy)
        self._rows = {}  # (name, width) → fp16 scratch of at least chunk rows (device array, its tensor)
        # the bounds of a decode step's key pieces, one row per piece (scored before the next is made)
        self._spans = cuda.device_array((-(-n_ctx // self.chunk), 3), np.int64)

    def tensor(self, a):
        if config.ENABLE_CUDASIM:
            return self.torch.from_numpy(a._ary)
        return self.torch.as_tensor(a, device="cuda")

    def half(self, m):
        have = self._half.get(id(m))
        if have is None or have[0] is not m:
            have = self._half[id(m)] = (m, self.tensor(m).half())
        return have[1]

    def rows(self, name: str, width: int, count: int):
        """count rows of the fp16 scratch of a name and width (as a device array, as a tensor), made
        once with a chunk's rows, or a ring's where that is longer."""
        have = self._rows.get((name, width))
        if have is None or have[0].shape[0] < count:
            rows = cuda.device_array((max(count, self.chunk), width), np.float16)
            have = self._rows[name, width] = (rows, self.tensor(rows))
        return have[0][:count], have[1][:count]

    def pieces(self, stream: DeviceStream, most: int, rings: bool = False):
        """A stream's products, a chunk of positions at most, aligned to its multiples: of [lo, n),
        or for a spanned stream of every position of [0, extent(most)). rings: a spanned exact ring
        shorter than that (XQuant-CL's exact tail) as one product of all its rows, into a ring of as
        many: each holds the position its own row holds."""
        if not stream.span.shape[0]:
            lo, n = stream.lo, stream.n
        else:
            lo, n = 0, stream.extent(most)
            if rings and not stream.codes.shape[0] and not stream.sink.shape[0] and stream.tail.shape[0] < most:
                run = replace(stream, n_q=0, lo=0, n=n, span=None)  # its rows as positions [0, n)
                yield Piece(run, 0, n, n, 0, most)
                return
        while lo < n:
            hi = min(n, (lo // self.chunk + 1) * self.chunk)
            yield Piece(stream, lo, hi, self.chunk, lo, hi)
            lo = hi

    def latents(self, piece: Piece, cu_stream=0):
        """The piece's latents as an (end − first) × width fp16 tensor."""
        run, first, end = piece.run, piece.first, piece.end
        if not run.codes.shape[0] and not run.sink.shape[0] and run.tail.shape[0] >= end \
                and run.tail.dtype == np.float16:
            return self.tensor(run.tail)[first:end]  # rows of positions [first, end) hold them as they are
        rows, t = self.rows("z", run.width, end - first)
        dequantize_stream[(-(-(end - first) // TILE_T), -(-run.width // TILE_R)), THREADS, cu_stream](*run.args, first,
                                                                                                   rows)
        return t

    def rebuild(self, stream: DeviceStream, m, out, base: int, add: bool, most: int, cu_stream=0):
        """rebuild_rows' product, a chunk at a time. A spanned stream's rows of out past its bounds
        (up to `most`) take the product of zero latents: set to zero, or left as they are where add."""
        w, target = self.half(m), self.tensor(out)
        for piece in self.pieces(stream, most):
            self._product(self.latents(piece, cu_stream), w, target[piece.first - base:piece.end - base], add)

    def keys(self, key: DeviceStream, mk, most: int, cu_stream=0):
        """A run of keys rebuilt (before RoPE) a piece at a time into the key scratch, each piece
        yielded as a stream with nothing to rebuild: the caller scores it before asking for the
        next, which overwrites it (launches on one stream run in order)."""
        w = self.half(mk)
        for i, piece in enumerate(self.pieces(key, most, rings=True)):
            rows, target = self.rows("k", mk.shape[1], piece.ring)
            row = piece.first % piece.ring
            self._product(self.latents(piece, cu_stream), w, target[row:row + piece.end - piece.first], False)
            if not key.span.shape[0]:
                yield exact_stream(rows, piece.lo, piece.hi)
            else:
                clip_span[1, 32, cu_stream](key.span, piece.lo, piece.hi, self._spans[i])
                yield exact_stream(rows, span=self._spans[i])

    def _product(self, z, w, target, add: bool):
        """target (+)= z · w; into fp16 rows the sum with what they hold is rounded once (cuBLAS's
        β = 1), as the CPU rounds XQuant-CL's accumulator."""
        if target.dtype == self.torch.float16:
            target.addmm_(z, w, beta=1 if add else 0)
        elif add:
            target.add_(z @ w)
        else:
            target.copy_(z @ w)


@functools.cache
def empty(shape: tuple, dtype) -> object:
    """An empty device array of a shape and type, made once (on first use: a context exists by then):
    a kernel argument's "none" — no up, no bounds, no sinks, no parts."""
    return cuda.to_device(np.zeros(shape, dtype))


def position(p: int) -> object:
    """A position as the kernels that place rows take it: a device int64 array holding it (the
    decode step's is written once per step, so that its launches repeat the same arguments)."""
    return cuda.to_device(np.array([p], np.int64))


def _blocks(n: int) -> int:
    return max(1, min(-(-n // THREADS), 1024))


def splits(n: int, chunk: int = 256, most: int = 128) -> int:
    """Parts of n positions for the split value sums: enough to fill the GPU at long contexts, few
    enough that the partial sums stay small."""
    return max(1, min(most, -(-n // chunk)))


class Workspace:
    """Scratch of one decode step's attention, allocated once for the longest context."""

    def __init__(self, n_ctx: int, n_head: int, value_width: int):
        self.scores = cuda.device_array((n_head, n_ctx), np.float32)
        self.parts = cuda.device_array((splits(n_ctx), n_head, value_width), np.float32)
        self.part_state = cuda.device_array((splits(n_ctx), n_head, 2), np.float32)
        self.empty = empty((0, 0), np.float32)


def attend_f16(q, k_cache, v_cache, at, n_head, head_dim, ws: Workspace, out, stream=0, chunk=256):
    """Single-query attention of the query at position at[0] (a device int64 array) over rows [0,
    at[0]] of an fp16 K (post-RoPE) / V cache: flash attention split over the sequence (parts of at
    least `chunk` positions, on a grid fixed by the workspace), then the parts merged. No argument
    depends on the position: a CUDA graph of it replays at any."""
    n_kv_head = k_cache.shape[1] // head_dim
    n_parts = ws.parts.shape[0]
    none = empty((0,), np.int64)
    # q and out as rows, as a prompt's: one compiled kernel for both (split blocks do not write out)
    flash_kernel(n_head // n_kv_head)[(n_parts, n_kv_head), THREADS, stream](
        q.reshape(1, -1), k_cache, v_cache, k_cache, v_cache, 0, 0, none, none, k_cache, v_cache, 0, at, head_dim,
        np.float32(1.0 / math.sqrt(head_dim)), chunk, out.reshape(1, -1), ws.part_state, ws.parts)
    merge_parts[n_head, THREADS, stream](ws.part_state, ws.parts, n_parts, head_dim, out)


def attend_prompt(q, k, v, at, head_dim, out, exact=None, window=None, stream=0):
    """Causal attention of the rows of q (post-RoPE, positions at[0]…) over K (post-RoPE) / V rows
    written up to each query's position. exact: (k_exact, v_exact, k_from, v_from, k_bound,
    v_bound) — query t reads position j from k / v below its bounds and from the exact rows (of
    positions k_from… / v_from…) from them on; window: (k_win, v_win, W) — the last W positions
    up to each query from the fp16 rings (xqrt.cache.mixed_attention's rules)."""
    n_kv_head = k.shape[1] // head_dim
    if exact is None:
        none = empty((0,), np.int64)
        exact = (k, v, 0, 0, none, none)
    if window is None:
        window = (k, v, 0)
    flash_kernel(q.shape[1] // head_dim // n_kv_head)[(q.shape[0], n_kv_head), THREADS, stream](
        q, k, v, *exact, *window, at, head_dim, np.float32(1.0 / math.sqrt(head_dim)), 0, out,
        empty((0, 0, 0), np.float32), empty((0, 0, 0), np.float32))


def attend_latent(q, keys, values, cos, sin, n_kv_head, head_dim, ws: Workspace, out, stream=0, window=None,
                  cublas: Cublas | None = None, reach: int = 0):
    """Single-query attention rematerialized from latent streams. keys / values: (DeviceStream,
    rebuild matrix) runs covering [0, n) in order — one stream, or XQuant-CL's accumulator and then
    the exact tail, whose latents live in different spaces. Keys are rebuilt tile by tile (z·mk,
    RoPE, score) in shared memory; values are summed in latent space and projected through mv once
    per run. A matrix is ws.empty where the latent is K / V itself (KIVI). window: (key, value)
    streams of the last run, K (post-RoPE) and V rows of a --kv-budget window, read as they are
    (RoPE tables of no columns rotate nothing). cublas: the keys are rebuilt on tensor cores into
    device memory first, and scored from there (Cublas.keys). Streams with spans (a decode step's)
    launch over `reach` positions (0: every position the workspace holds), empty runs included, so
    that no launch depends on the position below it, cuBLAS's products included."""
    last = window[0] if window is not None else keys[-1][0]
    n_head, most = q.shape[0] // head_dim, reach or ws.scores.shape[1]
    if head_dim > HEAD_DIM or n_head // n_kv_head > MAX_GROUP or n_head > MAX_HEADS:
        raise ValueError("attention shape beyond the CUDA kernels' limits")
    scale_qk = np.float32(1.0 / math.sqrt(head_dim))

    def score(key, mk, key_cos, key_sin):
        extent = key.extent(most)
        if extent > 0:
            scores_latent[(-(-extent // TILE_T), n_kv_head), TILE_THREADS, stream](
                q, *key.args, mk, key_cos, key_sin, head_dim, scale_qk, ws.scores)
    for key, mk in keys:
        if cublas is not None and mk.shape[0]:
            for part in cublas.keys(key, mk, most, stream):
                score(part, ws.empty, cos, sin)
        else:
            score(key, mk, cos, sin)
    value_runs = list(values)
    if window is not None:  # RoPE tables of no columns rotate nothing
        score(window[0], ws.empty, ws.empty, ws.empty)
        value_runs.append((window[1], ws.empty))
    softmax[n_head, THREADS, stream](ws.scores, last.n, last.span)
    first = True
    for value, mv in value_runs:
        extent = value.extent(most)
        if extent > 0:
            n_parts, width = splits(extent), value.width
            value_sums(ws.scores, value, width, ws.parts, n_parts, stream)
            project_values[n_head, THREADS, stream](ws.parts, n_parts, width, mv, head_dim, not first, out)
            first = False


jit_cache.lock_saves(sys.modules[__name__])
