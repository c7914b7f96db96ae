"""GPU benchmark of the CUDA kernels on a Llama-3-8B-shaped model with random weights.

    python bench/gpu.py [--layers 32] [--contexts 1024 8192 32768] [--out docs]

One run on one GPU prints and writes `docs/performance-gpu.md`:
- the two ceilings, measured: a device-to-device copy (bytes read + written per second) and an
  fp32 FMA-bound kernel (FLOP/s);
- the weight matrix-vector product's GB/s per block format and rows per warp, rotating over more
  matrices than the L2 cache holds;
- the prompt's matrix-matrix product (512 rows) in TFLOP/s, next to cuBLAS fp32 and fp16 on the
  same weights;
- decode step time and tokens/s at each context for fp16 KV, KIVI*, XQuant and XQuant-CL at 2/3/4
  bits, with each mode's attention alone against its roofline max(bytes / copy bandwidth,
  FLOPs / fp32 peak), plus XQuant and XQuant-CL with the engine's --rebuild cublas (kc.Cublas:
  fp16 latents × fused factors through cuBLAS, via torch on the same device buffers);
- cache bytes per token and the largest context that fits 16 GB of cache per mode, and of cache
  plus the step's working memory (`working_bytes`);
- the issue's four targets against these figures, met or not, at the longest context and 3 bits
  (or the first of --bits);
- where the time goes there: the GPU's own time per kernel of one layer's attention and of the
  whole step, per mode (torch's profiler).

Weights and cache contents are random (speed does not depend on them). A step writes the new
token as the engine does — fp16 KV its K/V row, the latent modes their latents into the exact ring
and, per token, packed — but over the last position, so the context stays fixed; the once-per-G
packing of a per-channel key group is left out. Needs numba-cuda and torch with CUDA.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from numba import cuda, float32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from xqrt.gguf_model import Q4_0, Q4_1, Q8_0  # noqa: E402
from xqrt.kernels import cuda as kc  # noqa: E402

LLAMA3_8B = dict(d=4096, n_head=32, n_kv_head=8, head_dim=128, n_ff=14336, vocab=128256, n_layer=32)
GROUP = 128  # quantization group (keys: G positions per channel; values: G channels per token)
BUDGET = 16 * 10 ** 9  # bytes of cache for the "largest context" column


STREAM = [0]  # where every launch goes: 0, or the stream a CUDA graph is being captured on


def launch(kernel, grid, *args):
    kernel[grid, kc.THREADS, STREAM[0]](*args)


def seconds(fn, least=0.3, most=50):
    """Mean wall time of fn() (GPU work finished), repeated until `least` seconds or `most` calls."""
    fn()
    cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < most and (n < 2 or time.perf_counter() - t0 < least):
        fn()
        n += 1
    cuda.synchronize()
    return (time.perf_counter() - t0) / n


DEVICE = "cuda"  # torch's device for the random weights and cache contents ("cpu": Numba's simulator, in tests)


def dev(t: torch.Tensor):
    """t as a Numba device array: the same memory on a GPU, a copy in the simulator."""
    t = t.detach()
    return cuda.as_cuda_array(t) if t.is_cuda else cuda.to_device(t.numpy())


# ---- ceilings -----------------------------------------------------------------------------------
@cuda.jit(fastmath=True)
def fma_chain(out, n_iter):
    i = cuda.grid(1)
    a0, a1, a2, a3 = float32(i) * float32(1e-9), float32(1.0), float32(2.0), float32(3.0)
    a4, a5, a6, a7 = float32(4.0), float32(5.0), float32(6.0), float32(7.0)
    for _ in range(n_iter):  # eight independent chains: enough in flight to hide the FMA latency
        a0 = cuda.fma(a0, float32(0.9999), float32(1e-4))
        a1 = cuda.fma(a1, float32(0.9999), float32(1e-4))
        a2 = cuda.fma(a2, float32(0.9999), float32(1e-4))
        a3 = cuda.fma(a3, float32(0.9999), float32(1e-4))
        a4 = cuda.fma(a4, float32(0.9999), float32(1e-4))
        a5 = cuda.fma(a5, float32(0.9999), float32(1e-4))
        a6 = cuda.fma(a6, float32(0.9999), float32(1e-4))
        a7 = cuda.fma(a7, float32(0.9999), float32(1e-4))
    out[i] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7


def ceilings():
    a = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    copy_bw = 2 * a.numel() * 4 / seconds(lambda: b.copy_(a))
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    n_threads, n_iter = sms * 16 * kc.THREADS, 4096
    out = cuda.device_array(n_threads, np.float32)
    flops = 2 * 8 * n_iter * n_threads / seconds(lambda: fma_chain[sms * 16, kc.THREADS](out, n_iter))
    torch.backends.cuda.matmul.allow_tf32 = False  # cuBLAS's fp32 product: a second fp32 ceiling
    m = torch.randn(8192, 8192, device="cuda")
    flops = max(flops, 2 * 8192 ** 3 / seconds(lambda: m @ m))
    empty = cuda.device_array(1, np.float32)
    per_launch = seconds(lambda: kc.silu_mul[1, 32](empty, empty, empty), most=2000)
    return copy_bw, flops, per_launch


# ---- weights --------------------------------------------------------------------------------------
def random_matrix(rows, cols, qtype) -> kc.DeviceMatrix:
    words = kc._WORDS[qtype] * (cols // 32)
    qs = dev(torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, words), dtype=torch.int32, device=DEVICE)).view(np.uint32)
    d = dev(torch.rand(rows, cols // 32, device=DEVICE).half() * 0.01)
    m = dev(-torch.rand(rows, cols // 32, device=DEVICE).half() * 0.05) if qtype == Q4_1 else \
        dev(torch.zeros(1, 1, dtype=torch.float16, device=DEVICE))
    return kc.DeviceMatrix(qtype, rows, cols, qs, d, m, dev(torch.zeros(1, 1, device=DEVICE)))


def matrix_bytes(w: kc.DeviceMatrix) -> int:
    return w.qs.nbytes + w.d.nbytes + (w.m.nbytes if w.qtype == Q4_1 else 0)


XP = []  # matvec's scratch (silu(x)·up, int8 codes), big enough for any row


INT8 = [True]  # x as int8 codes (the engine's act_bits 8, its default) or float (act_bits 16)


def matvec(w: kc.DeviceMatrix, x, out, rows=kc.ROWS, quantized=False, up=None, int8=None):
    """The engine's product on shared scratch (quantized: the product before quantized the same x,
    so its int8 codes stand)."""
    if not XP:
        n = LLAMA3_8B["n_ff"]
        XP.extend([cuda.device_array(n, np.float32), kc.Int8X.empty(n)])
    if INT8[0] if int8 is None else int8:
        kc.product_int8(w, x, XP[1], out, STREAM[0], rows, quantized, up)
    else:
        kc.product(w, x, XP[0], out, STREAM[0], rows, up)


ROWS_PER_WARP = (1, 2, 4)  # the product's rows per warp, measured side by side (the engine's: kc.ROWS)


def rotating_seconds(mats, x, out, rows, int8):
    """GPU seconds per product, one after another over all of mats (so none is read from L2)."""
    def run():
        for w in mats:
            matvec(w, x, out, rows, int8=int8)
    t = graph_seconds(run)
    return float("nan") if isinstance(t, str) else t / len(mats)


def matvec_bandwidth(s, qtype):
    """(shape, x, rows per warp, bytes, seconds) of the product over the model's matrix shapes,
    cycling through 256 MiB of matrices (five times H100's L2)."""
    out = []
    for r, c in ((s["d"], s["d"]), (s["n_ff"], s["d"]), (s["d"], s["n_ff"])):
        one = r * c // 32 * (kc._WORDS[qtype] * 4 + (4 if qtype == Q4_1 else 2))
        mats = [random_matrix(r, c, qtype) for _ in range(max(2, -(-256 * 2 ** 20 // one)))]
        x = cuda.to_device(np.random.default_rng(0).standard_normal(c).astype(np.float32))
        for int8 in (False, True):
            for rows in ROWS_PER_WARP:
                t = rotating_seconds(mats, x, cuda.device_array(r, np.float32), rows, int8)
                out.append((f"{r}×{c}", "int8" if int8 else "float", rows, matrix_bytes(mats[0]), t))
        del mats
    return out


PROMPT = 512  # rows of the prompt products (the engine's default --batch)


def prompt_products(s):
    """(shape, seconds of kc.product_rows on Q4_0, of cuBLAS fp32 on the same weights as float32
    (TF32 off), of cuBLAS fp16 on tensor cores) for PROMPT rows of x, per model matrix shape."""
    out = []
    x = torch.randn(PROMPT, max(s["d"], s["n_ff"]), device="cuda")
    for r, c in ((s["d"], s["d"]), (s["n_ff"], s["d"]), (s["d"], s["n_ff"])):
        w = random_matrix(r, c, Q4_0)
        dense = torch.empty(r, c, device="cuda")
        launch(dequantize_rows, (r, -(-c // kc.THREADS)), *w.args, dev(dense))
        xs, y = x[:, :c].contiguous(), torch.empty(PROMPT, r, device="cuda")
        xs_dev, y_dev = dev(xs), dev(y)
        t_numba = seconds(lambda: kc.product_rows(w, xs_dev, y_dev))
        t_fp32 = seconds(lambda: torch.matmul(xs, dense.T, out=y))
        xh, wh = xs.half(), dense.half()
        t_fp16 = seconds(lambda: xh @ wh.T)
        out.append((f"{r}×{c}", t_numba, t_fp32, t_fp16))
    return out


@cuda.jit
def dequantize_rows(qs, d, m, dense, qtype, out):
    r, j = cuda.blockIdx.x, cuda.blockIdx.y * kc.THREADS + cuda.threadIdx.x
    if j < out.shape[1]:
        out[r, j] = kc._weight_at(qs, d, m, dense, qtype, r, j)


# ---- the decode step ------------------------------------------------------------------------------
class Model:
    """Llama-3-8B-shaped random weights in Q4_0 (the factors in Q8_0 / float32) and the step's
    activations; per layer what each cache mode reads."""

    def __init__(self, s, n_ctx):
        self.s = s
        d, kv, ff = s["d"], s["n_kv_head"] * s["head_dim"], s["n_ff"]
        self.layers = []
        for _ in range(s["n_layer"]):
            # q/k/v and gate/up stacked as xqrt.gpu stacks them, each also a view
            wqkv, w_gate_up = random_matrix(d + 2 * kv, d, Q4_0), random_matrix(2 * ff, d, Q4_0)
            self.layers.append(dict(
                wqkv=wqkv, wq=kc.rows_of(wqkv, 0, d), wk=kc.rows_of(wqkv, d, d + kv),
                wv=kc.rows_of(wqkv, d + kv, d + 2 * kv),
                wo=random_matrix(d, d, Q4_0), w_gate_up=w_gate_up, w_gate=kc.rows_of(w_gate_up, 0, ff),
                w_up=kc.rows_of(w_gate_up, ff, 2 * ff), w_down=random_matrix(d, ff, Q4_0),
                uk=random_matrix(kv, d, Q8_0), uv=random_matrix(kv, d, Q8_0), ukv=random_matrix(2 * kv, d, Q8_0),
                norm=dev(torch.ones(d, device=DEVICE)),
            ))
        self.output = random_matrix(s["vocab"], d, Q4_0)
        # Fused rebuild factors are per layer in a real model; one set serves every layer here (read from L2
        # either way: the product, not their bytes, bounds the rebuild).
        mk = torch.randn(kv, kv, device=DEVICE) * 0.03
        self.mk, self.mv = dev(mk), dev(torch.randn(kv, kv, device=DEVICE) * 0.03)
        self.ukv_t = dev(torch.randn(2 * kv, d, device=DEVICE) * 0.02)  # XQuant-CL: Δ latent → x space
        self.wk_t = dev(torch.randn(d, kv, device=DEVICE) * 0.02)  # accumulator → K / V
        self.wv_t = dev(torch.randn(d, kv, device=DEVICE) * 0.02)
        inv_freq = 500000.0 ** (-np.arange(0, s["head_dim"], 2) / s["head_dim"])
        ang = np.arange(n_ctx + 1)[:, None] * inv_freq[None]
        self.cos, self.sin = cuda.to_device(np.cos(ang).astype(np.float32)), cuda.to_device(np.sin(ang).astype(np.float32))
        self.x = dev(torch.randn(d, device=DEVICE))  # the residual stream: each step adds to it
        self.xn = cuda.device_array((1, d), np.float32)
        self.x_row, self.xn_vec = self.x.reshape(1, -1), self.xn.reshape(-1)  # views made once: each costs host time
        self.qkv = cuda.device_array(d + 2 * kv, np.float32)
        self.q, self.k, self.v = self.qkv[:d], self.qkv[d:d + kv], self.qkv[d + kv:]
        self.q_row, self.k_row, self.v_row = self.q.reshape(1, -1), self.k.reshape(1, -1), self.v.reshape(1, -1)
        self.z = cuda.device_array(2 * kv, np.float32)
        self.z_row = self.z.reshape(1, -1)
        self.attn = cuda.device_array(d, np.float32)
        self.proj = cuda.device_array(d, np.float32)
        self.proj_row, self.no_rows = self.proj.reshape(1, -1), cuda.device_array((0, d), np.float32)
        self.gate_up = cuda.device_array(2 * ff, np.float32)
        self.gate, self.up = self.gate_up[:ff], self.gate_up[ff:]
        self.logits = cuda.device_array(s["vocab"], np.float32)
        self.ws = kc.Workspace(n_ctx + 1, s["n_head"], d)
        self.at = cuda.device_array(1, np.int64)  # the step's position (run_mode sets it)

    def step(self, attend, needs_kv):
        """One decode step at the position in self.at; attend(layer index, L, xn) leaves the attention output in
        self.attn (needs_kv: k and v come with q, from the stacked product)."""
        s, m = self.s, self
        elems = lambda n: kc._blocks(n)  # noqa: E731
        residual = self.no_rows  # as xqrt.gpu.GpuStep: each norm adds the sublayer output before it
        for i, L in enumerate(self.layers):
            launch(kc.rmsnorm, 1, self.x_row, residual, L["norm"], np.float32(1e-5), self.xn)
            xn = self.xn_vec
            if needs_kv:
                matvec(L["wqkv"], xn, m.qkv)
            else:
                matvec(L["wq"], xn, m.q)
            launch(kc.rope, elems(s["d"] // 2), m.q_row, s["head_dim"], m.cos, m.sin, m.at)
            attend(i, L, xn)
            matvec(L["wo"], m.attn, m.proj)
            launch(kc.rmsnorm, 1, self.x_row, self.proj_row, L["norm"], np.float32(1e-5), self.xn)
            matvec(L["w_gate_up"], xn, m.gate_up)
            matvec(L["w_down"], m.gate, m.proj, up=m.up)
            residual = self.proj_row
        launch(kc.rmsnorm, 1, self.x_row, residual, self.layers[0]["norm"], np.float32(1e-5), self.xn)
        matvec(self.output, self.xn_vec, self.logits)


def prompt_seconds(model):
    """Seconds of one fp16-KV prefill of PROMPT tokens through every layer, as xqrt.gpu's prefill
    runs it (matmat products, K/V rows stored and attended in one launch each), launched from Python."""
    s = model.s
    d, kv, ff, hd = s["d"], s["n_kv_head"] * s["head_dim"], s["n_ff"], s["head_dim"]
    rows = lambda w: cuda.device_array((PROMPT, w), np.float32)  # noqa: E731
    x, xn, q, k, v, attn, proj, gate, up = (rows(w) for w in (d, d, d, kv, kv, d, d, ff, ff))
    caches = [(cuda.device_array((PROMPT, kv), np.float16), cuda.device_array((PROMPT, kv), np.float16))
              for _ in model.layers]
    eps = np.float32(1e-5)
    first = kc.position(0)

    def run():
        residual = model.no_rows
        for L, (k_cache, v_cache) in zip(model.layers, caches):
            launch(kc.rmsnorm, PROMPT, x, residual, L["norm"], eps, xn)
            for w, out in ((L["wq"], q), (L["wk"], k), (L["wv"], v)):
                kc.product_rows(w, xn, out)
            launch(kc.rope, kc._blocks(PROMPT * d // 2), q, hd, model.cos, model.sin, first)
            launch(kc.store_kv, kc._blocks(PROMPT * kv // 2), k, v, hd, model.cos, model.sin, first, k_cache, v_cache)
            kc.attend_prompt(q, k_cache, v_cache, first, hd, attn)
            kc.product_rows(L["wo"], attn, proj)
            launch(kc.rmsnorm, PROMPT, x, proj, L["norm"], eps, xn)
            kc.product_rows(L["w_gate"], xn, gate)
            kc.product_rows(L["w_up"], xn, up)
            kc.product_rows(L["w_down"], gate, proj, up=up)
            residual = proj
    x.copy_to_device(np.zeros((PROMPT, d), np.float32))
    return seconds(run, least=1.0, most=5)


def random_streams(s, n, bits, per_channel_keys: bool, width: int, n_layer: int):
    """Per layer: a per-channel key stream and a per-token value stream of n positions (KIVI /
    XQuant layouts), random codes and scales; positions past the last full key group are exact."""
    n_q = n // GROUP * GROUP
    out = []
    for _ in range(n_layer):
        pair = []
        for per_channel in (per_channel_keys, False):
            if per_channel:
                n_rows, row_bytes, n_scale = n_q // GROUP, width * bits * GROUP // 8, width
                off = np.arange(width + 1, dtype=np.int64) * bits * GROUP // 8
                cbits = np.full(width, bits, np.int64)
            else:
                n_rows, row_bytes, n_scale = n, width * bits // 8, width // GROUP
                off = cbits = np.zeros(0, np.int64)
            codes = torch.randint(0, 256, (max(n_rows, 1), 1, row_bytes), dtype=torch.uint8, device=DEVICE)
            shape = (max(n_rows, 1), n_scale, 1) if per_channel else (max(n_rows, 1), 1, n_scale)
            scale = torch.rand(shape, device=DEVICE).half() * 0.1
            zero = -torch.rand(shape, device=DEVICE).half()
            ring = torch.randn(GROUP if per_channel else 1, width, device=DEVICE)  # exact rows, p mod G
            pair.append(kc.DeviceStream(dev(codes), dev(scale), dev(zero), bits, GROUP.bit_length() - 1,
                                        cuda.to_device(off), cuda.to_device(cbits),
                                        cuda.to_device(np.zeros((0, width), np.float32)), dev(ring),
                                        n_q if per_channel else n, 0, n))
        out.append(pair)
    return out


def store(stream, z, at, per_channel):
    """The new position's latent (a 1-row z; its position at[0], in device memory) into its stream as
    the engine writes it: into the exact ring, and packed at once where the stream is per-token (a
    per-channel group is packed once per G steps)."""
    group = GROUP if per_channel else 1 << stream.shift
    launch_grid = -(-z.shape[1] // (group * 32))
    kc.store_token[launch_grid, 32, STREAM[0]](z, stream.tail, stream.codes, stream.scale, stream.zero,
                                               stream.bits, group, stream.sink, at, not per_channel, False)


def bytes_per_token(mode, bits, s):
    kv = s["n_kv_head"] * s["head_dim"]
    per_layer = {"fp16": 4 * kv,
                 "kivi": 2 * (bits * kv // 8 + 4 * kv // GROUP),
                 "xquant": 2 * (bits * kv // 8 + 4 * kv // GROUP),
                 "xquant-cl": bits * 2 * kv // 8 + 4 * 2 * kv // GROUP}[mode]
    return per_layer * s["n_layer"]


def working_bytes(mode, s, tensor_cores=False) -> tuple[int, int]:
    """Device memory a decode step needs beside the cache, one layer's at a time, as (bytes per
    position, bytes at any context): the latent attention's scores (float32 per query head) and
    XQuant-CL's accumulator Â (fp16, d wide) per position; --rebuild cublas's fp16 scratch of
    kc.CUBLAS_CHUNK rows, the rebuilt keys (kv_dim wide) and the dequantized latents they come from
    (XQuant's key latents, kv_dim wide; XQuant-CL's deltas, 2·kv_dim: its keys come from Â, read in
    place). fp16 KV's flash attention needs neither."""
    if mode == "fp16":
        return 0, 0
    kv = s["n_kv_head"] * s["head_dim"]
    per_position = 4 * s["n_head"] + (2 * s["d"] if mode == "xquant-cl" else 0)
    fixed = 2 * kc.CUBLAS_CHUNK * (kv + (2 * kv if mode == "xquant-cl" else kv)) if tensor_cores else 0
    return per_position, fixed


def attention_cost(mode, bits, s, n):
    """(bytes, FLOPs) of one layer's attention at context n (the rebuild's products counted)."""
    kv, hd, nh = s["n_kv_head"] * s["head_dim"], s["head_dim"], s["n_head"]
    b = bytes_per_token(mode, bits, s) / s["n_layer"] * n
    if mode == "fp16":
        return b, 4 * n * nh * hd
    if mode == "kivi":
        return b, 4 * n * nh * hd
    if mode == "xquant":
        return b, 2 * n * kv * kv + 4 * n * nh * hd + 2 * n * nh * kv
    d = s["d"]  # xquant-cl: accumulate Δ̂·Ukvᵀ, then K from Â (x space); V summed in x space
    # Â (fp16) read and written by the update, then read for K and for V
    return b + 4 * 2 * n * d, 2 * n * 2 * kv * d + 2 * n * d * kv + 4 * n * nh * hd + 2 * n * nh * d


def mode_calls(model, mode, bits, n, tensor_cores=False):
    """(one layer's attention, the whole decode step) of one mode at context n, as calls of no
    arguments; tensor_cores: the engine's --rebuild cublas (kc.Cublas)."""
    s, kv = model.s, model.s["n_kv_head"] * model.s["head_dim"]
    cublas = kc.Cublas(n + 1) if tensor_cores else None
    model.at.copy_to_device(np.array([n], np.int64))  # the step's position: n positions before it
    last = kc.position(n - 1)  # where the latent modes store the new token (their streams hold n positions)
    nh, hd, nkv = s["n_head"], s["head_dim"], s["n_kv_head"]
    empty = model.ws.empty
    if mode == "fp16":
        caches = [(dev(torch.randn(n + 1, kv, device=DEVICE).half()), dev(torch.randn(n + 1, kv, device=DEVICE).half()))
                  for _ in range(s["n_layer"])]

        def attend(i, L, xn):
            launch(kc.store_kv, kc._blocks(kv // 2), model.k_row, model.v_row, hd, model.cos, model.sin, model.at,
                   caches[i][0], caches[i][1])
            kc.attend_f16(model.q, caches[i][0], caches[i][1], model.at, nh, hd, model.ws, model.attn, STREAM[0])
        one = lambda: kc.attend_f16(model.q, caches[0][0], caches[0][1], model.at, nh, hd, model.ws, model.attn,  # noqa
                                    STREAM[0])
    elif mode in ("kivi", "xquant"):
        streams = random_streams(s, n, bits, True, kv, s["n_layer"])
        mk, mv = (empty, empty) if mode == "kivi" else (model.mk, model.mv)

        def one_layer(i):
            key, value = streams[i]
            kc.attend_latent(model.q, [(key, mk)], [(value, mv)], model.cos, model.sin, nkv, hd, model.ws,
                             model.attn, STREAM[0], cublas=cublas)

        def attend(i, L, xn):
            if mode == "xquant":  # the factors are Q8_0: int8 codes as wq's Q4_0, quantized again
                matvec(L["uk"], xn, model.k)
                matvec(L["uv"], xn, model.v, quantized=True)
            store(streams[i][0], model.k_row, last, True)
            store(streams[i][1], model.v_row, last, False)
            one_layer(i)
        one = lambda: one_layer(0)  # noqa: E731
    else:  # xquant-cl
        deltas = [random_streams(s, n, bits, False, 2 * kv, 1)[0][1] for _ in range(s["n_layer"])]
        acc = cuda.device_array((n, s["d"]), np.float16)  # Â, fp16 as the engine keeps it
        acc_stream = kc.exact_stream(acc, 0, n)

        def one_layer(i):
            kc.rebuild_rows(deltas[i], model.ukv_t, acc, 0, i != 0, cublas, STREAM[0])
            kc.attend_latent(model.q, [(acc_stream, model.wk_t)], [(acc_stream, model.wv_t)], model.cos, model.sin,
                             nkv, hd, model.ws, model.attn, STREAM[0], cublas=cublas)

        def attend(i, L, xn):
            matvec(L["ukv"], xn, model.z)
            store(deltas[i], model.z_row, last, False)
            one_layer(i)
        one = lambda: one_layer(s["n_layer"] - 1)  # noqa: E731 — past the seed, where Â is added to
    needs_kv = mode in ("fp16", "kivi")
    return one, lambda: model.step(attend, needs_kv)


def run_mode(one, step):
    """(step seconds launched from Python, as a CUDA graph, attention seconds per layer) of
    mode_calls' two calls."""
    t_attn = graph_seconds(one)
    if isinstance(t_attn, str):
        t_attn = seconds(one, least=0.3, most=20)
    t_step = seconds(step, least=0.5, most=5)
    if t_step > 1.0:  # launch overhead is noise here: spare the device time of a capture
        return t_step, float("nan"), t_attn
    return t_step, graph_seconds(step), t_attn


def graph_seconds(step):
    """Seconds per replay of `step` captured as one CUDA graph (torch's capture; the Numba kernels
    launched onto the capturing stream), or the reason it could not be captured."""
    if DEVICE != "cuda":
        return "no CUDA graphs without a GPU"
    side = torch.cuda.Stream()
    try:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            STREAM[0] = cuda.external_stream(side.cuda_stream)
            step()  # warm-up off the default stream, as capture requires
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            STREAM[0] = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
            step()
        STREAM[0] = 0
        return seconds(graph.replay, least=0.5, most=50)
    except Exception as e:  # noqa: BLE001 — reported in the table
        STREAM[0] = 0
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {str(e)[:80]}"


def kernel_name(name: str) -> str:
    """A kernel's name without its namespaces, ABI tags and arguments: Numba's mangled names
    (_ZN6cudapy4xqrt7kernels4cuda13scores_latentB2v1…) as the profiler may demangle them or not."""
    if name.startswith("_ZN"):
        parts, i = [], 3
        while i < len(name) and name[i].isdigit():
            j = i
            while j < len(name) and name[j].isdigit():
                j += 1
            i = j + int(name[i:j])
            if i > len(name):
                break
            parts.append(name[j:i])
        return parts[-1] if parts else name[:70]
    name = name.removeprefix("void ").split("(")[0].split("[")[0]
    base, template = (name.split("<", 1) + [""])[:2]
    return (base.rsplit("::", 1)[-1] + ("<" + template if template else ""))[:70]


def by_kernel(durations, calls: int):
    """[(kernel, launches per call, µs per call)] of (name, µs) pairs seen over `calls` calls,
    the most time first."""
    total = {}
    for name, us in durations:
        name = kernel_name(name)
        launches, sum_us = total.get(name, (0, 0.0))
        total[name] = (launches + 1, sum_us + us)
    rows = [(k, launches / calls, us / calls) for k, (launches, us) in total.items()]
    return sorted(rows, key=lambda row: -row[2])


def kernel_times(fn, calls=5):
    """by_kernel of `calls` calls of fn: the GPU's own time per kernel, Numba's launches and cuBLAS's
    alike (CUPTI, through torch's profiler), or the reason there is none."""
    if DEVICE != "cuda":
        return "no profiler without a GPU"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            cuda.synchronize()
        seen = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception as e:  # noqa: BLE001 — reported in place of the table
        return f"{type(e).__name__}: {str(e)[:80]}"
    return by_kernel(seen, calls) if seen else "the profiler saw no kernels"


def profile_section(title: str, one, step) -> list[str]:
    """Markdown of kernel_times for one layer's attention and for the whole step (printed at once:
    a run cut off before its end still shows it in its log)."""
    lines = []
    for what, fn, calls in (("one layer's attention", one, 5), ("the decode step", step, 2)):
        lines += ["", f"### {title}: {what}", ""]
        rows = kernel_times(fn, calls)
        if isinstance(rows, str):
            lines.append(f"no table: {rows}")
            continue
        total = sum(us for _, _, us in rows)
        lines += [f"{total:.0f} µs in all.", "", "| kernel | launches | µs | share |", "|---|---|---|---|"]
        lines += [f"| {name} | {launches:g} | {us:.1f} | {us / total:.0%} |" for name, launches, us in rows]
    print("\n".join(lines), flush=True)
    return lines[1:]


def fraction_range(values) -> str:
    return f"{min(values):.0%}–{max(values):.0%}" if len(values) > 1 else f"{values[0]:.0%}"


def targets(copy_bw, matvec_rows, decode, longest, x_kind, bits=3) -> list[str]:
    """The issue's four targets against this run's figures, as a markdown table. matvec_rows:
    (format, shape, x, rows per warp, bytes, seconds); decode: (label, bits, context) → that row's
    figures (bpt, fit, fit_working, best, ratio, attn, roof). Read at the longest context and `bits`;
    a figure the run lacks (a failed mode, a context not run) is said to be missing."""
    lines = ["| target | measured | met? |", "|---|---|---|"]
    engine = [(fmt, nbytes / t / copy_bw) for fmt, _, x, rows, nbytes, t in matvec_rows
              if x == x_kind and rows == kc.ROWS and math.isfinite(t)]
    if engine:
        per_format = {}
        for fmt, f in engine:
            per_format.setdefault(fmt, []).append(f)
        met = sum(f >= 0.7 for _, f in engine)
        verdict = "yes" if met == len(engine) else "no" if not met else f"on {met} of {len(engine)} shapes"
        lines.append(f"| weight matrix-vector product ≥ 70% of copy bandwidth ({x_kind} x, {kc.ROWS} rows per warp) | "
                     + ", ".join(f"{fmt} {fraction_range(fs)}" for fmt, fs in per_format.items())
                     + f" of {copy_bw / 1e9:.0f} GB/s | {verdict} |")
    else:
        lines.append("| weight matrix-vector product ≥ 70% of copy bandwidth | not measured | — |")
    fused = decode.get(("xquant", bits, longest))
    if fused:
        x = fused["attn"] / fused["roof"]
        lines.append(f"| fused XQuant attention at {longest} within 2× of its roofline ({bits}-bit) | "
                     f"{fused['attn'] * 1e3:.3f} ms per layer against {fused['roof'] * 1e3:.3f} ms: {x:.1f}× | "
                     f"{'yes' if x <= 2 else 'no'} |")
    else:
        lines.append(f"| fused XQuant attention at {longest} within 2× of its roofline | not measured | — |")
    fp16, tc = decode.get(("fp16", 16, longest)), decode.get(("xquant (tensor cores)", bits, longest))
    if fp16 and tc:
        smaller = fp16["bpt"] / tc["bpt"]
        step_ok, cache_ok = tc["ratio"] <= 2, smaller >= 4
        lines.append(f"| tensor-core XQuant {bits}-bit step at {longest} ≤ 2× fp16 KV's, cache ≥ 4× smaller | "
                     f"{tc['best'] * 1e3:.2f} ms against {fp16['best'] * 1e3:.2f} ms: {tc['ratio']:.2f}×; cache "
                     f"{smaller:.2f}× smaller | {'yes' if step_ok and cache_ok else 'no'}"
                     f"{'' if step_ok == cache_ok else ' (step)' if cache_ok else ' (cache)'} |")
    else:
        lines.append(f"| tensor-core XQuant {bits}-bit step ≤ 2× fp16 KV's | not measured | — |")
    cl = decode.get(("xquant-cl", bits, longest))
    if fp16 and cl:
        alone, working = cl["fit"] / fp16["fit"], cl["fit_working"] / fp16["fit"]
        lines.append(f"| largest context in 16 GB ≥ 4× fp16 KV's, XQuant-CL {bits}-bit | {cl['fit']} against "
                     f"{fp16['fit']} tokens: {alone:.2f}×; with the step's working memory {cl['fit_working']}: "
                     f"{working:.2f}× | {'yes' if working >= 4 else 'cache alone only' if alone >= 4 else 'no'} |")
    else:
        lines.append(f"| largest context ≥ 4× fp16 KV's, XQuant-CL {bits}-bit | not measured | — |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["n_layer"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--act-bits", type=int, choices=(8, 16), default=8,
                    help="the decode step's activations, as the engine's --act-bits: int8 codes or float [8]")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = ap.parse_args()
    if not cuda.is_available() or not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU visible to numba-cuda and torch")

    def stopped(*_):
        sys.exit("bench/gpu.py: stopped (SIGTERM: a time limit?); the figures measured so far are written")
    signal.signal(signal.SIGTERM, stopped)
    s = dict(LLAMA3_8B, n_layer=args.layers)
    INT8[0] = args.act_bits == 8
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else name
    lines = [f"# GPU performance ({name})", "",
             f"`python bench/gpu.py --layers {args.layers} --contexts {' '.join(map(str, args.contexts))} "
             f"--act-bits {args.act_bits}`: "
             f"a Llama-3-8B-shaped model (d {s['d']}, {s['n_head']}/{s['n_kv_head']} heads of {s['head_dim']}, "
             f"ffn {s['n_ff']}, vocab {s['vocab']}, {s['n_layer']} layers), random Q4_0 weights, random cache "
             f"contents, group {GROUP}. Times are wall-clock, GPU work included: launched one kernel at a time from "
             "Python, or replayed as one CUDA graph (the kernels' own time; products and attention are timed that "
             "way).", ""]

    os.makedirs(args.out, exist_ok=True)
    report = open(os.path.join(args.out, "performance-gpu.md"), "w")  # written as it goes: a cut-off run keeps its rows
    report.write("\n".join(lines) + "\n")

    def say(line=""):
        print(line, flush=True)
        report.write(line + "\n")
        report.flush()

    copy_bw, peak, launch_s = ceilings()
    say("## Ceilings")
    say(f"- device-to-device copy: {copy_bw / 1e9:.0f} GB/s (bytes read + written)")
    say(f"- fp32 peak: {peak / 1e12:.1f} TFLOP/s (the higher of an FMA-bound Numba kernel and cuBLAS's fp32 "
        "8192³ product, TF32 off)")
    say(f"- one Numba kernel launch from Python: {launch_s * 1e6:.1f} µs")
    say()
    say("## Weight matrix-vector product")
    say("x: float, or int8 codes with dp4a (quantize_x's launch included). "
        f"The engine's rows per warp: {kc.ROWS}.")
    say()
    say("| format | shape | x | rows per warp | bytes | µs | GB/s | of copy bandwidth |")
    say("|---|---|---|---|---|---|---|---|")
    matvec_rows = []
    for qtype, label in ((Q4_0, "Q4_0"), (Q4_1, "Q4_1"), (Q8_0, "Q8_0")):
        for shape, x_kind, rows, nbytes, t in matvec_bandwidth(s, qtype):
            matvec_rows.append((label, shape, x_kind, rows, nbytes, t))
            say(f"| {label} | {shape} | {x_kind} | {rows} | {nbytes / 1e6:.1f} MB | {t * 1e6:.1f} | "
                f"{nbytes / t / 1e9:.0f} | {nbytes / t / copy_bw:.0%} |")
    say()
    say(f"## Prompt products ({PROMPT} rows of x)")
    say("The engine's prefill product (kc.product_rows: Q4_0 blocks dequantized into shared memory, fp32 FMAs) "
        "next to cuBLAS on the same weights as float32 (TF32 off) and as fp16 (tensor cores).")
    say()
    say("| shape | Numba ms | TFLOP/s | of fp32 peak | cuBLAS fp32 ms | cuBLAS fp16 ms |")
    say("|---|---|---|---|---|---|")
    try:
        for shape, t_numba, t_fp32, t_fp16 in prompt_products(s):
            r, c = map(int, shape.split("×"))
            flops = 2 * PROMPT * r * c
            say(f"| {shape} | {t_numba * 1e3:.2f} | {flops / t_numba / 1e12:.1f} | {flops / t_numba / peak:.0%} | "
                f"{t_fp32 * 1e3:.2f} | {t_fp16 * 1e3:.2f} |")
    except Exception as e:  # noqa: BLE001 — report and go on to the decode step
        say(f"| failed: {type(e).__name__}: {str(e)[:120]} |")
    say()
    n_ctx = max(args.contexts)
    model = Model(s, max(n_ctx, PROMPT))
    try:
        t = prompt_seconds(model)
        say(f"A {PROMPT}-token prompt through all {s['n_layer']} layers (fp16 KV, the lm head left out): "
            f"{t * 1e3:.1f} ms, {PROMPT / t:.0f} tokens/s.")
    except Exception as e:  # noqa: BLE001
        say(f"The {PROMPT}-token prompt failed: {type(e).__name__}: {str(e)[:120]}")
    say()
    fp16_step, decode = {}, {}
    say("## Decode step")
    say("Largest context: 16 GB of cache alone, and of cache plus the step's working memory "
        "(bench/gpu.py's working_bytes: the scores and XQuant-CL's Â per position, --rebuild cublas's "
        "scratch of a fixed size).")
    say()
    say("| mode | bits | context | cache B/token | largest context in 16 GB | with working memory "
        "| step ms (launched from Python) | step ms (CUDA graph) | tokens/s | × fp16-KV step | attention ms/layer "
        "| its roofline ms | × roofline |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    # what the targets read first: a run cut short by its time limit has them
    plan = [("fp16", 16, False)] + [(m, b, tc) for m, tc in (("xquant", False), ("xquant", True), ("xquant-cl", False),
                                                            ("kivi", False), ("xquant-cl", True)) for b in args.bits]
    profiled_bits = 3 if 3 in args.bits else args.bits[0]
    profiles = []  # a section per mode at the longest context, written after the table
    try:
        decode_table(model, plan, args.contexts, profiled_bits, copy_bw, peak, s, say, decode, fp16_step, profiles)
    finally:  # a time limit's SIGTERM too: the verdicts on what was measured
        say()
        say(f"## Against the targets (computed from the tables above, {profiled_bits} bits, context {n_ctx})")
        say()
        say("\n".join(targets(copy_bw, matvec_rows, decode, n_ctx, "int8" if INT8[0] else "float", profiled_bits)))
        say()
    say(f"A step launches 14 (fp16 KV) to about 20 (latent caches) kernels per layer from Python "
        f"({launch_s * 1e6:.0f} µs each when the GPU keeps up): that overhead is part of every step time above.")
    say()
    say(f"## Where the time goes, by kernel ({profiled_bits} bits, context {n_ctx})")
    say("The GPU's own time per kernel (CUPTI, through torch's profiler) over a few calls launched from Python: "
        "launch gaps are not counted, so the sum can be below the step times above.")
    for section in profiles:
        say()
        say("\n".join(section))
    report.close()


def decode_table(model, plan, contexts, profiled_bits, copy_bw, peak, s, say, decode, fp16_step, profiles):
    """The decode step's rows, mode by mode, into `say`; each row's figures into `decode`, fp16 KV's
    step times into `fp16_step`, the profiles at the longest context into `profiles`."""
    n_ctx = max(contexts)
    for mode, bits, tc in plan:
        for n in contexts:
            label = mode + (" (tensor cores)" if tc else "")
            try:
                one, step = mode_calls(model, mode, bits, n, tc)
                t_step, t_graph, t_attn = run_mode(one, step)
                if n == n_ctx and bits in (16, profiled_bits):
                    profiles.append(profile_section(f"{label}, {bits} bits, context {n}", one, step))
            except Exception as e:  # noqa: BLE001 — report and go on: one mode's failure says nothing of the others
                say(f"| {label} | {bits} | {n} | failed: {type(e).__name__}: {str(e)[:120]} |")
                continue
            if isinstance(t_graph, str):
                say(f"<!-- {mode} {bits} {n}: graph capture failed: {t_graph} -->")
                t_graph = float("nan")
            if mode == "fp16":
                fp16_step[n] = t_step if math.isnan(t_graph) else t_graph
            bpt = bytes_per_token(mode, bits, s)
            per_position, fixed = working_bytes(mode, s, tc)
            nbytes, flops = attention_cost(mode, bits, s, n)
            roof = max(nbytes / copy_bw, flops / peak)
            best = t_step if math.isnan(t_graph) else t_graph
            ratio = best / fp16_step[n] if n in fp16_step else float("nan")
            fit, fit_working = BUDGET // bpt, (BUDGET - fixed) // (bpt + per_position)
            decode[label, bits, n] = dict(bpt=bpt, fit=fit, fit_working=fit_working, best=best, ratio=ratio,
                                          attn=t_attn, roof=roof)
            say(f"| {label} | {bits} | {n} | {bpt} | {fit} | {fit_working} | "
                f"{t_step * 1e3:.2f} | {t_graph * 1e3:.2f} | {1 / best:.1f} | {ratio:.2f} | "
                f"{t_attn * 1e3:.3f} | {roof * 1e3:.3f} | {t_attn / roof:.1f} |")


if __name__ == "__main__":
    main()
