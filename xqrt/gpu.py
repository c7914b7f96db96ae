"""The decode step on a GPU (`Engine(device="cuda")`, `--device cuda`): the weights uploaded once,
the cache in device memory, per step a token id in and its logits out. With --act-bits 8 (the
default) the block-format products meet x as int8 codes through dp4a, the same integer sums as
the CPU's; with 16 they take float x. A prompt (`GpuStep.prefill`) takes its weight products as
matrix-matrix products over all its rows, and the cache stores and attends its rows at once (a
latent cache rebuilds the layer's K/V of the history once for them, as the CPU's prefill does).

Every cache mode runs here. fp16 keeps post-RoPE K/V rows; KIVI*, XQuant and XQuant-CL keep
xqrt.cache's format itself — the same packed bytes, exact rings, sinks and XQuant-CL accumulator —
written token by token by device kernels and read by the fused rematerializing attention (or, with
`rebuild="cublas"`, keys rebuilt on tensor cores through torch, then scored). What
runs on the CPU only: fp16 key channels, unquantized (16/32-bit)
latents, simulated caches. Kernels are launched from Python (about 40 µs each), which bounds a
small model's step; with torch on the GPU the step is captured once as a CUDA graph and replayed
per token (`StepGraph`; --no-cuda-graphs launches one by one): its launches read the token and
position, and a latent cache's stream bounds, from device memory written before each step, and
cover a reach of positions fixed between doublings of the context (--rebuild cublas's products
too: they span the reach, the rows past the position zero).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from .cache import Cache, CacheOptions, FP16KV, LatentCache, XQuantCL, check_recipe, make_cache
from .errors import XQError
from .gguf_model import Model, ModelConfig

DEVICES = ("auto", "cpu", "cuda")
REBUILDS = ("fused", "cublas")


def unsupported(cache_mode: str, config: ModelConfig, options: CacheOptions) -> str | None:
    """Why this cache cannot run on the GPU, or None when it can."""
    from .kernels import cuda as kc
    c = config
    if c.head_dim > kc.HEAD_DIM or c.n_head > kc.MAX_HEADS or c.n_head // c.n_kv_head > kc.MAX_GROUP:
        return f"the CUDA attention kernels take heads of at most {kc.HEAD_DIM}, {kc.MAX_GROUP} query heads per " \
               f"kv head and {kc.MAX_HEADS} heads"
    if cache_mode == "fp16":
        return None
    if config.d_model > kc.MAX_WIDTH:
        return f"the CUDA value projection takes latents of at most {kc.MAX_WIDTH} channels"
    check_recipe(cache_mode, config, options)
    o = options
    if o.simulated:
        return "simulated caches run on the CPU only"
    if o.fp16_channels:
        return "--fp16-channels runs on the CPU only"
    if any(b > 8 for b in (o.bits, o.value_bits or 0, *(o.layer_bits or ()))):
        return "unquantized latents (16/32 bits) run on the CPU only"
    group, _ = LatentCache.resolve(config, o)
    for flag, g in (("--group", group), ("--value-group", o.value_group or group)):
        if g & (g - 1) or g > kc.MAX_QUANT_GROUP:
            return f"the CUDA cache writes take power-of-two groups of at most {kc.MAX_QUANT_GROUP}, not {flag} {g}"
    return None


def pick_device(device: str, cache_mode: str, config: ModelConfig, options: CacheOptions, log=None) -> str:
    """'cpu' or 'cuda' for a --device choice; auto takes CUDA when numba-cuda finds a GPU and the
    cache runs there, and says which it took."""
    if device not in DEVICES:
        raise XQError(f"unknown device {device!r} (one of {', '.join(DEVICES)})")
    if device == "cpu":
        return "cpu"
    from .kernels import cuda as kc
    found = kc.available()
    why_not = unsupported(cache_mode, config, options)
    if device == "cuda":
        if not found:
            raise XQError("--device cuda: numba-cuda finds no CUDA GPU (a driver and numba-cuda ≥ 0.14 are needed; "
                          "--device cpu runs without)")
        if why_not:
            raise XQError(f"--device cuda: {why_not} (use --device cpu)")
        return "cuda"
    chosen = "cuda" if found and not why_not else "cpu"
    if log:
        log(f"xqrt: device {chosen} ({device_name() if chosen == 'cuda' else why_not or 'no CUDA GPU found'})")
    return chosen


@contextmanager
def device_memory(what: str):
    """The driver's out-of-memory error while `what` is allocated on the GPU, as one XQError line."""
    from numba.cuda.cudadrv.driver import CudaAPIError
    try:
        yield
    except CudaAPIError as e:
        code = getattr(e, "code", None)  # an int, or with NVIDIA's bindings a CUresult
        if code != 2 and getattr(code, "name", "") != "CUDA_ERROR_OUT_OF_MEMORY":
            raise
        raise XQError(f"--device cuda: the GPU has no room for {what} (a smaller --ctx, or --device cpu)") from None


class DeviceCache(Cache):
    """A cache in device memory: only the GPU step reads or writes it, through attend_device."""
    needs_kv = True  # whether the step computes the layer's k and v for it
    reach = 0  # positions the decode step's grids are sized for (set_position); 0: the same at every position

    def attend(self, layer, pos0, xn, q, k, v):
        raise XQError("a device cache is read by the GPU step only")

    def set_position(self, pos: int):
        """Before a decode step at pos: what its launches read of the position beside the step's own
        device copy (s.pos_at), written to device memory, so that one CUDA graph of the step replays at
        every position of its reach."""

    def attend_device(self, step: GpuStep, layer: int, pos: int):
        """Store position pos of `layer` from the step's xn / k (pre-RoPE) / v and leave the
        attention of its q (post-RoPE) over [0, pos] in step.attn."""
        raise NotImplementedError

    def attend_prompt(self, prompt: Prompt, layer: int):
        """attend_device for every row of a prompt at once: each query reads what decode would."""
        raise NotImplementedError


class DeviceFP16KV(DeviceCache):
    """Post-RoPE K and V as fp16, one (n_ctx × kv_dim) pair per layer."""
    mode = "fp16"

    def __init__(self, model: Model, n_ctx: int, options: CacheOptions = CacheOptions()):
        super().__init__(model, n_ctx, options)
        from numba import cuda

        from .kernels import cuda as kc
        c = self.config
        shape = (n_ctx, c.kv_dim)
        self.k = [cuda.device_array(shape, np.float16) for _ in range(c.n_layer)]
        self.v = [cuda.device_array(shape, np.float16) for _ in range(c.n_layer)]
        self.ws = kc.Workspace(n_ctx, c.n_head, c.head_dim)

    def attend_device(self, s: GpuStep, layer, pos):
        kc, c, T = s.kc, self.config, s.kc.THREADS
        kc.store_kv[kc._blocks(c.kv_dim // 2), T, s.stream](s.k_row, s.v_row, c.head_dim, s.cos, s.sin, s.pos_at,
                                                            self.k[layer], self.v[layer])
        kc.attend_f16(s.q, self.k[layer], self.v[layer], s.pos_at, c.n_head, c.head_dim, self.ws, s.attn, s.stream)

    def attend_prompt(self, p, layer):
        """All the prompt's K/V rows in one launch, then its causal attention in one more."""
        kc, c, T, n = p.step.kc, self.config, p.step.kc.THREADS, p.q.shape[0]
        kc.store_kv[kc._blocks(n * c.kv_dim // 2), T](p.k, p.v, c.head_dim, p.step.cos, p.step.sin, p.at(p.pos0),
                                                      self.k[layer], self.v[layer])
        kc.attend_prompt(p.q, self.k[layer], self.v[layer], p.at(p.pos0), c.head_dim, p.attn)

    def nbytes(self):
        return FP16KV.bytes_per_position(self.config) * self.n_tokens


@dataclass
class _DeviceLayer:
    """One layer's part of a device latent cache (xqrt.cache._Layer's, uploaded)."""
    uk: object  # DeviceMatrix of x → key latent; None: the latent is k (KIVI) or x itself (`from_x`)
    uv: object  # … x → value latent; None: v (KIVI) or, `shared`, the key latent
    from_x: bool
    shared: bool
    mk: object  # latent → K / V (float32, latent width × kv_dim), or empty: the identity
    mv: object
    zk: object  # the new token's latents (float32 scratch, 1 × width) …
    zv: object
    zk_vec: object  # … and the same as vectors, the decode products' output
    zv_vec: object
    ring_k: object  # the exact latents of recent positions, fp16 (position t in row t mod its rows)
    ring_v: object
    key: object  # DeviceStream of the packed history, or None (XQuant-CL's delta layers)
    value: object
    per_channel: bool
    delta: object = None  # XQuant-CL: the packed Δ̂ stream …
    ukv: object = None  # … Δ's projection (DeviceMatrix, r × d: its dense array rebuilds Â) …
    seed: bool = False
    wk: object = None  # … and the accumulator's rebuild matrices (d × kv_dim)
    wv: object = None
    x_less_acc: object = None  # scratch: x − Â, and Δ (1 × width, and as vectors)
    dz: object = None
    x_less_acc_vec: object = None
    dz_vec: object = None
    runs: dict = None  # the streams a decode step reads, by name, with their spans (DeviceLatentCache.SPANS)


class DeviceLatentCache(DeviceCache):
    """KIVI*, XQuant and XQuant-CL with their history in device memory, in xqrt.cache's format.

    The layout — factors, rotations, channel widths, group sizes, rings, bounds — comes from the
    CPU cache of the same options (`plan`, whose own arrays stay untouched), so both hold the
    same bytes for the same latents; the packed streams' bytes are counted by its rules. The
    device rings hold `prompt_rows` rows more than the plan's, so that a prompt's rows at a time
    can be written before their queries read the exact ones."""
    prompt_rows = 128  # prompt rows stored and attended at a time
    least_reach = 256  # a decode step's grids cover the next power of two of positions, at least this many
    # a decode step's stream bounds [n_q, lo, n] (set_position): packed keys per channel, packed
    # streams per token, the window, XQuant-CL's accumulator, its exact latents, and its Δ̂
    SPANS = ("per_channel", "per_token", "window", "acc", "exact", "delta")

    def __init__(self, model: Model, n_ctx: int, mode: str, options: CacheOptions = CacheOptions(), log=None):
        super().__init__(model, n_ctx, options)
        from numba import cuda

        from .kernels import cuda as kc
        why_not = unsupported(mode, model.config, options)
        if why_not:
            raise XQError(f"the GPU step cannot run this cache: {why_not}")
        self.mode = mode
        self.plan = plan = make_cache(mode, model, n_ctx, options, log)
        self.window = plan.window
        self.needs_kv = mode == "kivi" or bool(self.window)  # a window keeps K and V themselves
        c = self.config
        self.group, self.ring_size = plan.group, plan.ring_size
        f32 = lambda m: cuda.to_device(np.ascontiguousarray(m, np.float32))  # noqa: E731
        empty = kc.empty((0, 0), np.float32)
        self.layers = []
        widest = c.kv_dim
        ring_rows = self.ring_size + self.prompt_rows
        for i, L in enumerate(plan.layers):
            wk, wv = plan.latent_widths(L)
            ring_k = cuda.to_device(np.zeros((ring_rows, wk), np.float16))
            ring_v = ring_k if L.shared else cuda.to_device(np.zeros((ring_rows, wv), np.float16))
            zk, zv = cuda.device_array((1, wk), np.float32), cuda.device_array((1, wv), np.float32)
            D = _DeviceLayer(
                uk=None if L.uk is None else kc.upload_dense(L.uk.T), from_x=L.shared and L.uk is None,
                uv=None if L.uv is None or L.shared else kc.upload_dense(L.uv.T), shared=L.shared,
                mk=empty if L.mk is None else f32(L.mk), mv=empty if L.mv is None else f32(L.mv),
                zk=zk, zv=zv, zk_vec=zk.reshape(-1), zv_vec=zv.reshape(-1), ring_k=ring_k, ring_v=ring_v,
                key=None if L.key is None else self._upload(L.key, ring_k),
                value=None if L.value is None else self._upload(L.value, ring_v),
                per_channel=L.key_per_channel)
            if L.shared:
                D.value = D.key
            widest = max(widest, wv)
            if L.delta is not None:
                ukv_t = plan.ukv_t[i] if plan.ukv_t[i].size else np.eye(c.d_model, dtype=np.float32)
                D.delta = self._upload(L.delta, kc.empty((0, L.delta.width), np.float16))
                D.ukv, D.seed, D.wk, D.wv = kc.upload_dense(ukv_t), L.seed, f32(L.wk), f32(L.wv)
                D.x_less_acc = cuda.device_array((1, c.d_model), np.float32)
                D.dz = cuda.device_array((1, ukv_t.shape[0]), np.float32)
                D.x_less_acc_vec, D.dz_vec = D.x_less_acc.reshape(-1), D.dz.reshape(-1)
                widest = max(widest, c.d_model)
            self.layers.append(D)
        if isinstance(plan, XQuantCL):
            self.acc = cuda.to_device(np.zeros((n_ctx, c.d_model), np.float16))  # Â for every position
        if self.window:  # K (post-RoPE) and V of the last W positions, fp16 rings of prompt_rows more rows
            rows = self.window + self.prompt_rows
            self.win_k = [cuda.to_device(np.zeros((rows, c.kv_dim), np.float16)) for _ in range(c.n_layer)]
            self.win_v = [cuda.to_device(np.zeros((rows, c.kv_dim), np.float16)) for _ in range(c.n_layer)]
        self.ws = kc.Workspace(n_ctx, c.n_head, widest)
        self._prompt_scratch = {}
        self.spans_host = np.zeros((len(self.SPANS), 3), np.int64)
        self.spans = cuda.to_device(self.spans_host)
        for i, D in enumerate(self.layers):
            D.runs = self._decode_runs(kc, i, D)

    def _upload(self, stream, ring):
        """An (empty) xqrt.cache.Stream's arrays on the device, its exact ring as the tail."""
        from numba import cuda

        from .kernels import cuda as kc
        off = stream.channel_off
        return kc.DeviceStream(cuda.to_device(stream.codes), cuda.to_device(stream.scale.view(np.float16)),
                               cuda.to_device(stream.zero.view(np.float16)), stream.bits,
                               stream.group.bit_length() - 1, cuda.to_device(off),
                               cuda.to_device(kc.channel_bits(off, stream.group)),
                               cuda.to_device(stream.sink), ring, 0, 0, 0)

    def set_position(self, pos):
        """The spans of the streams, and the step's reach: a launch over a spanned stream has blocks
        for `reach` positions, those past the position returning at once, so that a CUDA graph of the
        step replays at every position below it (step_reach: a graph per doubling of the context, then
        per tensor-core piece of it)."""
        from .kernels import cuda as kc
        self.reach = step_reach(pos, self.n_ctx, self.least_reach, kc.CUBLAS_CHUNK)
        n = pos + 1
        w0 = n - min(self.window, n) if self.window else n  # positions from w0 on are read from the window
        ch, tok = (min(int(self.plan.bound(pos, per_channel)), w0) for per_channel in (True, False))
        self.spans_host[:] = (ch, 0, w0), (tok, 0, w0), (0, w0, n), (0, 0, tok), (0, tok, w0), (n, 0, n)
        self.spans.copy_to_device(self.spans_host)

    def _decode_runs(self, kc, layer, D) -> dict:
        """The streams of `layer` that a decode step reads, each with its row of the spans."""
        def span(name):
            i = self.SPANS.index(name)
            return dict(span=self.spans[i])
        runs = {}
        if D.key is None:
            runs["acc"] = kc.exact_stream(self.acc, **span("acc"))
            runs["exact_k"], runs["exact_v"] = (kc.exact_stream(ring, **span("exact")) for ring in (D.ring_k, D.ring_v))
            runs["delta"] = replace(D.delta, **span("delta"))
        else:
            runs["key"] = replace(D.key, **span("per_channel" if D.per_channel else "per_token"))
            runs["value"] = replace(D.value, **span("per_token"))
        if self.window:
            runs["win_k"], runs["win_v"] = (kc.exact_stream(rows[layer], **span("window"))
                                            for rows in (self.win_k, self.win_v))
        return runs

    def attend_device(self, s, layer, pos):
        """No launch depends on pos (None while a CUDA graph is captured): the packing of the
        per-channel key groups is launched at every step where the step may be captured (its blocks
        return unless the position completes a group), so that the step launched before a capture
        has compiled it (a capture must not load a module); else where a group completes."""
        kc, c, D, st = s.kc, self.config, self.layers[layer], s.stream
        runs = D.runs
        if D.uk is not None:
            kc.product(D.uk, s.xn_vec, s.xp, D.zk_vec, st)
        if D.uv is not None:
            kc.product(D.uv, s.xn_vec, s.xp, D.zv_vec, st)
        zk = s.xn if D.from_x else s.k_row if D.uk is None else D.zk
        zv = zk if D.shared else s.v_row if D.uv is None else D.zv
        self._write(kc, D, zk, zv, s.pos_at, pos is None or s.graphs or (pos + 1) % self.group == 0, st)
        window = None
        if self.window:
            kc.store_kv[kc._blocks(c.kv_dim // 2), kc.THREADS, st](s.k_row, s.v_row, c.head_dim, s.cos, s.sin,
                                                                    s.pos_at, self.win_k[layer], self.win_v[layer])
            window = runs["win_k"], runs["win_v"]
        if D.key is None:
            x = s.xn_vec if D.seed else D.x_less_acc_vec
            self._write_delta(s, D, s.pos_at, s.xn, D.x_less_acc, D.dz,
                              lambda: kc.product(D.ukv, x, s.xp, D.dz_vec, st), runs["delta"], st)
            keys = [(runs["acc"], D.wk), (runs["exact_k"], D.mk)]
            values = [(runs["acc"], D.wv), (runs["exact_v"], D.mv)]
        else:
            keys, values = [(runs["key"], D.mk)], [(runs["value"], D.mv)]
        kc.attend_latent(s.q, keys, values, s.cos, s.sin, c.n_kv_head, c.head_dim, self.ws, s.attn, st, window=window,
                         cublas=s.cublas, reach=self.reach)

    def attend_prompt(self, prompt, layer):
        """A prompt's rows, prompt_rows at a time: their latents stored as decode stores them, then
        the layer's keys and values rebuilt once — from the packed latents below the rows' bounds,
        from the exact ones above — for every query of the rows to read (xqrt.cache's prefill)."""
        kc, c, D = prompt.step.kc, self.config, self.layers[layer]
        for p in prompt.parts(self.prompt_rows):
            n, pos0 = p.q.shape[0], p.pos0
            end = pos0 + n
            zk = p.xn if D.from_x else p.k if D.uk is None else self._product(kc, D.uk, p.xn, "zk")
            zv = zk if D.shared else p.v if D.uv is None else self._product(kc, D.uv, p.xn, "zv")
            self._write(kc, D, zk, zv, p.at(pos0), end // self.group > pos0 // self.group)
            window = None
            if self.window:
                kc.store_kv[kc._blocks(n * c.kv_dim // 2), kc.THREADS](p.k, p.v, c.head_dim, p.step.cos, p.step.sin,
                                                                        p.at(pos0), self.win_k[layer], self.win_v[layer])
                window = self.win_k[layer], self.win_v[layer], self.window
            if D.key is None:
                x_less_acc, dz = self._scratch("x_less_acc", n, c.d_model), self._scratch("dz", n, D.dz.shape[1])
                acc_from = 0 if pos0 == prompt.pos0 else pos0  # the rows below hold this layer's Â: earlier parts
                self._write_delta(p.step, D, p.at(pos0), p.xn, x_less_acc, dz,
                                  lambda: kc.product_rows(D.ukv, p.xn if D.seed else x_less_acc, dz),
                                  replace(D.delta, n_q=end, lo=acc_from, n=end))
                bk = bv = p.bounds(self.plan, False)
                acc = kc.exact_stream(self.acc, 0, bk.highest)
                packed_k, packed_v = (acc, D.wk), (acc, D.wv)
                exact_k, exact_v = self._exact(kc, D, bk.lowest, bv.lowest, end)
            else:
                bk, bv = p.bounds(self.plan, D.per_channel), p.bounds(self.plan, False)
                packed_k = replace(D.key, n_q=bk.highest, n=bk.highest), D.mk
                packed_v = replace(D.value, n_q=bv.highest, n=bv.highest), D.mv
                exact_k, exact_v = replace(D.key, n_q=0, lo=bk.lowest, n=end), replace(D.value, n_q=0, lo=bv.lowest,
                                                                                      n=end)
            k, k_exact = self._rebuild_both(p.step, "k", *packed_k, exact_k, D.mk)
            v, v_exact = self._rebuild_both(p.step, "v", *packed_v, exact_v, D.mv)
            for rows, first in ((k, 0), (k_exact, bk.lowest)):
                if rows.shape[0]:
                    kc.rope[kc._blocks(rows.size // 2), kc.THREADS](rows, c.head_dim, p.step.cos, p.step.sin,
                                                                     p.at(first))
            kc.attend_prompt(p.q, k, v, p.at(pos0), c.head_dim, p.attn,
                             exact=(k_exact, v_exact, bk.lowest, bv.lowest, bk.dev, bv.dev), window=window)

    def _product(self, kc, w, x, name):
        out = self._scratch(name, x.shape[0], w.n_rows)
        kc.product_rows(w, x, out)
        return out

    def _rebuild_both(self, step, name, packed, m, exact, m_exact):
        """K (or V) rows of positions [0, packed.n) from the packed latents and of [exact.lo,
        exact.n) from the exact ones, into scratch."""
        out = []
        for part, src, mat in (("", packed, m), ("_exact", exact, m_exact)):
            rows = self._scratch(name + part, src.n - src.lo, self.config.kv_dim)
            step.kc.rebuild_rows(src, mat, rows, src.lo, False, step.cublas)
            out.append(rows)
        return out

    def _scratch(self, name, rows, width):
        """A (rows × width) float32 scratch of the prompt path, grown as needed and kept (per width:
        layers' latents may differ in width)."""
        from numba import cuda
        have = self._prompt_scratch.get((name, width))
        if have is None or have.shape[0] < rows:
            size = min(max(rows, 2 * (0 if have is None else have.shape[0]), 64), max(rows, self.n_ctx))
            have = self._prompt_scratch[name, width] = cuda.device_array((size, width), np.float32)
        return have[:rows]

    def _exact(self, kc, D, lo_k, lo_v, n):
        """XQuant-CL's delta layer: its own exact latents of positions [lo, n), in the ring."""
        return kc.exact_stream(D.ring_k, lo_k, n), kc.exact_stream(D.ring_v, lo_v, n)

    def _write(self, kc, D, zk, zv, at, completes: bool, st=0):
        """The latents of the rows at positions at[0]… into their rings, packed at once where a stream
        is per-token, and each per-channel key group they complete packed from the ring (launched where
        `completes` says one may be)."""
        key, value = D.key, D.value
        if key is None:  # XQuant-CL's delta layer: its exact latents go to the ring only
            self._store(kc, zk, D.ring_k, D.delta, self.group, None, at, False, st)
            if not D.shared:
                self._store(kc, zv, D.ring_v, D.delta, self.group, None, at, False, st)
            return
        self._store(kc, zk, D.ring_k, key, self.group if D.per_channel else 1 << key.shift, key.sink, at,
                    not D.per_channel, st)
        if not D.shared:
            self._store(kc, zv, D.ring_v, value, 1 << value.shift, value.sink, at, True, st)
        if D.per_channel and completes:
            rows = zk.shape[0]
            kc.store_channel_group[(kc._blocks(key.width), -(-rows // self.group)), kc.THREADS, st](
                D.ring_k, key.codes, key.scale, key.zero, key.off, key.cbits, self.group, key.sink, at, rows,
                self.options.clip)

    def _store(self, kc, z, ring, stream, group, sink, at, quantize, st=0):
        """store_token: one thread per group of each row of z (sink None: no sinks)."""
        if sink is None:
            sink = kc.empty((0, z.shape[1]), np.float32)
        threads = 32
        kc.store_token[(-(-z.shape[1] // (group * threads)), z.shape[0]), threads, st](
            z, ring, stream.codes, stream.scale, stream.zero, stream.bits, group, sink, at, quantize,
            self.options.clip)

    def _write_delta(self, step, D, at, x, x_less_acc, dz, project, acc_run, st=0):
        """XQuant-CL from its seed layer on: Δ = (x − Â)·ukv of the rows at positions at[0]… (project
        computes it into dz from x, or from x_less_acc past the seed), packed per token; then Â ← Â
        + Δ̂·ukvᵀ over acc_run, a run of the Δ̂ stream ending at the rows' end (the rows below its lo
        hold this layer's Â already: an earlier part of the prompt added them), which the layer's K/V
        are rebuilt from — and from its own exact latents for the recent positions the residual rule
        reads exactly."""
        kc = step.kc
        if not D.seed:
            kc.subtract_rows[kc._blocks(x.size), kc.THREADS, st](x, self.acc, at, x_less_acc)
        project()
        delta = D.delta
        self._store(kc, dz, delta.tail, delta, 1 << delta.shift, delta.sink, at, True, st)
        kc.rebuild_rows(acc_run, D.ukv.dense, self.acc, 0, not D.seed, step.cublas, st, self.reach)

    # ---- bookkeeping: the plan's rules, at this cache's length ------------------------------------
    def truncate(self, n_tokens):
        self.plan.n_tokens = self.n_tokens
        self.n_tokens = self.plan.truncate(n_tokens)
        return self.n_tokens

    def nbytes(self):
        self.plan.n_tokens = self.n_tokens
        return self.plan.nbytes()

    def working_nbytes(self):
        self.plan.n_tokens = self.n_tokens
        return self.plan.working_nbytes()

    def describe(self):
        return self.plan.describe()


def step_reach(pos: int, n_ctx: int, least: int, granule: int) -> int:
    """Positions a decode step at pos sizes its grids for, at most the context: the power of two at
    or above pos + 1 (at least `least`), or past `granule` the multiple of it at or above. So under
    twice the positions the step reads, and past the granule — where a doubling's idle work,
    --rebuild cublas's products of zero rows, would cost most — under a granule more."""
    reach = max(least, 1 << pos.bit_length())
    if reach > granule:
        reach = -(-(pos + 1) // granule) * granule
    return min(n_ctx, reach)


def new_device_cache(mode: str, model: Model, n_ctx: int, options: CacheOptions, log=None) -> DeviceCache:
    if mode == "fp16":
        return DeviceFP16KV(model, n_ctx, options)
    return DeviceLatentCache(model, n_ctx, mode, options, log)


@dataclass(frozen=True)
class Bounds:
    """Where each row of a prompt starts reading its history exactly (xqrt.cache.LatentCache.bound)."""
    dev: object  # one per row, on the device
    lowest: int
    highest: int


@dataclass
class Prompt:
    """A prompt's rows at positions pos0… as a DeviceCache reads them: xn, q (post-RoPE), k
    (pre-RoPE) and v in, attn out (n × width each)."""
    step: GpuStep
    pos0: int
    xn: object
    q: object
    k: object
    v: object
    attn: object
    memo: dict = field(default_factory=dict)  # what every layer reads alike, made once: views cost host time

    def parts(self, rows: int) -> list[Prompt]:
        """The prompt as consecutive prompts of at most `rows` rows."""
        n = self.q.shape[0]
        if n <= rows:
            return [self]
        if ("parts", rows) not in self.memo:
            cut = lambda a, t: a[t:t + rows]  # noqa: E731
            self.memo["parts", rows] = [Prompt(self.step, self.pos0 + t, cut(self.xn, t), cut(self.q, t),
                                               cut(self.k, t), cut(self.v, t), cut(self.attn, t))
                                        for t in range(0, n, rows)]
        return self.memo["parts", rows]

    def at(self, pos: int):
        """pos as the kernels take a position (kc.position), made once per prompt."""
        if ("at", pos) not in self.memo:
            self.memo["at", pos] = self.step.kc.position(pos)
        return self.memo["at", pos]

    def bounds(self, cache: LatentCache, per_channel: bool) -> Bounds:
        if ("bounds", per_channel) not in self.memo:
            from numba import cuda
            b = cache.bound(np.arange(self.pos0, self.pos0 + self.q.shape[0]), per_channel).astype(np.int64)
            self.memo["bounds", per_channel] = Bounds(cuda.to_device(b), int(b[0]), int(b[-1]))
        return self.memo["bounds", per_channel]


def tensor_cores(n_ctx: int):
    """kc.Cublas for --rebuild cublas, or one error line saying what it lacks."""
    from numba import config

    from .kernels import cuda as kc
    try:
        import torch
    except ImportError:
        raise XQError("--rebuild cublas: torch is not installed (a CUDA build of torch is needed)") from None
    if not config.ENABLE_CUDASIM and not torch.cuda.is_available():
        raise XQError("--rebuild cublas: torch finds no CUDA GPU (a CUDA build of torch is needed)")
    return kc.Cublas(n_ctx)


def graph_support() -> str | None:
    """Why the decode step cannot be captured as a CUDA graph here, or None when it can: the capture
    is torch's, of the Numba kernels launched onto its stream."""
    from numba import config
    if config.ENABLE_CUDASIM:
        return "the simulator has no CUDA graphs"
    try:
        import torch
    except ImportError:
        return "torch is not installed (a CUDA build of it is needed)"
    return None if torch.cuda.is_available() else "torch finds no CUDA GPU (a CUDA build of it is needed)"


class StepGraph:
    """A decode step's launches (GpuStep.launches) captured once as a CUDA graph and replayed for
    every token after: one launch from Python where the step makes about 15 per layer, at some 40 µs
    each — what bounds a small model's step (bench/gpu.py measures both). Kernel arguments are fixed
    at capture, so the step reads its token and position from device memory (GpuStep.at)."""

    def __init__(self, step: GpuStep, cache: DeviceCache):
        import torch
        from numba import cuda
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(self.graph):
                step.stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
                step.launches(cache, None)
        finally:
            step.stream = 0

    def replay(self):
        self.graph.replay()


class GpuStep:
    """The model's weights on the device and the scratch of one decode step. rebuild: how a latent
    cache's keys and values are rebuilt — "fused", the Numba kernels that rebuild and score in
    shared memory, or "cublas", the rebuild product on tensor cores through torch (kc.Cublas).
    graphs: replay the step as one CUDA graph — True, False, or None: where torch can capture one."""

    def __init__(self, model: Model, n_ctx: int, act_bits: int = 8, rebuild: str = "fused", graphs: bool | None = None,
                 log=None):
        from numba import cuda

        from .kernels import cpu, cuda as kc
        self.kc, c = kc, model.config
        self.config = c
        self.cublas = tensor_cores(n_ctx) if rebuild == "cublas" else None
        why_not = graph_support() if graphs is not False else None
        if graphs and why_not:
            raise XQError(f"--cuda-graphs: {why_not}")
        self.graphs, self.log = graphs is not False and not why_not, log
        if why_not and log:
            log(f"xqrt: no CUDA graphs ({why_not}): the decode step launches its kernels one by one")
        self._graphs = None  # (the cache they were captured for, {its reach: StepGraph})
        self._warm = None  # the cache of the last step launched one by one: its kernels are compiled
        # (compiling loads a module, which a capture must not see)
        self.stream = 0  # where the step's launches go: a capture's stream while one is made
        self.at = cuda.device_array(2, np.int64)  # the step's token and position
        self.token_at, self.pos_at = self.at[0:1], self.at[1:2]
        up = lambda m: kc.upload_matrix(m.qtype, m.data, m.n_cols)  # noqa: E731
        vec = lambda a: cuda.to_device(np.ascontiguousarray(a, np.float32))  # noqa: E731
        self.tok_embd, self.output = up(model.tok_embd), up(model.output)

        def stacked(*ms):
            """The rows of matrices that one x meets as one device matrix (one launch for them all in
            the decode step) and each as a view of it; None and each alone where formats differ."""
            if len({(m.qtype, m.n_cols) for m in ms}) > 1:
                return None, [up(m) for m in ms]
            w = kc.upload_matrix(ms[0].qtype, np.concatenate([m.data for m in ms]), ms[0].n_cols)
            ends = np.cumsum([0] + [m.n_rows for m in ms])
            return w, [kc.rows_of(w, int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

        self.layers = []
        for L in model.layers:
            wqkv, (wq, wk, wv) = stacked(L.wq, L.wk, L.wv)
            w_gate_up, (w_gate, w_up) = stacked(L.w_gate, L.w_up)
            self.layers.append(dict(attn_norm=vec(L.attn_norm), ffn_norm=vec(L.ffn_norm), wqkv=wqkv, wq=wq, wk=wk,
                                    wv=wv, wo=up(L.wo), w_gate_up=w_gate_up, w_gate=w_gate, w_up=w_up,
                                    w_down=up(L.w_down)))
        # act_bits 8: block formats meet x as int8 codes (dp4a), the CPU's integer sums; 16: float x
        self.int8 = act_bits == 8
        same = lambda a, b: kc.reuses_codes(a.qtype, b.qtype)  # noqa: E731
        for L in self.layers:  # products of one x quantize it once
            L["same_x"] = (same(L["wk"], L["wq"]), same(L["wv"], L["wk"]), same(L["w_up"], L["w_gate"]))
        self.out_norm = vec(model.out_norm)
        cos, sin = cpu.rope_table(model.rope_freqs, n_ctx)
        self.cos, self.sin = cuda.to_device(cos), cuda.to_device(sin)
        vector = lambda n: cuda.device_array(n, np.float32)  # noqa: E731 — unwritten: kernels fill them whole
        self.qkv, self.gate_up = vector(c.q_dim + 2 * c.kv_dim), vector(2 * c.n_ff)  # the stacked products' outputs
        self.q, self.k, self.v = self.qkv[:c.q_dim], self.qkv[c.q_dim:c.q_dim + c.kv_dim], self.qkv[c.q_dim + c.kv_dim:]
        self.gate, self.up = self.gate_up[:c.n_ff], self.gate_up[c.n_ff:]
        self.x = vector(c.d_model)
        self.xn = cuda.device_array((1, c.d_model), np.float32)
        self.x_row, self.xn_vec = self.x.reshape(1, -1), self.xn.reshape(-1)  # views made once: each costs host time
        self.q_row, self.k_row, self.v_row = self.q.reshape(1, -1), self.k.reshape(1, -1), self.v.reshape(1, -1)
        self.attn, self.proj = vector(c.q_dim), vector(c.d_model)
        self.proj_row, self.no_rows = self.proj.reshape(1, -1), cuda.device_array((0, c.d_model), np.float32)
        self.logits_dev = vector(c.vocab_size)
        self.logits = np.zeros(c.vocab_size, np.float32)
        self.xp = vector(max(c.d_model, c.n_ff, c.q_dim))  # silu(gate)·up for a float product
        self.act = kc.Int8X.empty(-(-max(c.d_model, c.n_ff, c.q_dim) // 32) * 32)
        self.eps = np.float32(c.norm_eps)

    def __call__(self, token: int, pos: int, cache: DeviceCache) -> np.ndarray:
        """Logits of `token` at position `pos`, stored into the cache's layers."""
        self.at.copy_to_device(np.array([token, pos], np.int64))
        cache.set_position(pos)
        graph = self._graph_for(cache)
        if graph is None:
            self.launches(cache, pos)
            self._warm = cache
        else:
            graph.replay()
        self.logits_dev.copy_to_host(self.logits)
        return self.logits

    def _graph_for(self, cache: DeviceCache) -> StepGraph | None:
        """The step's CUDA graph for this cache at its reach (captured at the first step there after
        one launched one by one on the cache, which compiled its kernels), or None: launch one by
        one. A capture that fails says why once and leaves the step launching."""
        if not (self.graphs and self._warm is cache):
            return None
        if self._graphs is None or self._graphs[0] is not cache:
            self._graphs = cache, {}  # one cache's graphs at a time: a new cache's buffers need new ones
        graphs = self._graphs[1]
        if cache.reach not in graphs:
            try:
                graphs[cache.reach] = StepGraph(self, cache)
            except Exception as e:  # noqa: BLE001 — any failure of the capture leaves the step as it was
                self.graphs, self._graphs = False, None
                if self.log:
                    self.log(f"xqrt: CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); "
                             "launching kernels one by one")
                return None
        return graphs[cache.reach]

    def launches(self, cache: DeviceCache, pos: int | None):
        """A decode step's kernels, on self.stream, leaving its logits in logits_dev; the token and
        position come from self.at and cache.set_position's copies (pos: the position where the
        launches are not being captured, for those a latent cache may skip)."""
        kc, c, T, st = self.kc, self.config, self.kc.THREADS, self.stream
        blocks = kc._blocks
        xn = self.xn_vec
        kc.embed[(blocks(c.d_model), 1), T, st](*self.tok_embd.args, self.token_at, self.x_row)
        residual = self.no_rows  # each norm adds the sublayer output before it into x
        for i, L in enumerate(self.layers):
            kc.rmsnorm[1, T, st](self.x_row, residual, L["attn_norm"], self.eps, self.xn)
            if cache.needs_kv and L["wqkv"] is not None:
                self.product(L["wqkv"], xn, self.qkv)
            else:
                self.product(L["wq"], xn, self.q)
                if cache.needs_kv:
                    self.product(L["wk"], xn, self.k, again=L["same_x"][0])
                    self.product(L["wv"], xn, self.v, again=L["same_x"][1])
            kc.rope[blocks(c.q_dim // 2), T, st](self.q_row, c.head_dim, self.cos, self.sin, self.pos_at)
            cache.attend_device(self, i, pos)
            self.product(L["wo"], self.attn, self.proj)
            kc.rmsnorm[1, T, st](self.x_row, self.proj_row, L["ffn_norm"], self.eps, self.xn)
            if L["w_gate_up"] is not None:
                self.product(L["w_gate_up"], xn, self.gate_up)
            else:
                self.product(L["w_gate"], xn, self.gate)
                self.product(L["w_up"], xn, self.up, again=L["same_x"][2])
            self.product(L["w_down"], self.gate, self.proj, up=self.up)  # silu(gate)·up on the way
            residual = self.proj_row
        kc.rmsnorm[1, T, st](self.x_row, residual, self.out_norm, self.eps, self.xn)
        self.head(xn)

    def prefill(self, tokens, pos0: int, cache: DeviceCache, all_logits: bool) -> np.ndarray:
        """Logits of a prompt's tokens at positions pos0…, stored into the cache: the last one's
        (1 × vocab), or every one's (n × vocab). The weight products take all n rows at once
        (matmat: each weight read once per 32 positions, as the CPU's prefill reads it once per
        batch) with float x, as the CPU's prefill takes it; the cache stores and attends the rows
        (DeviceCache.attend_prompt), every query reading what it reads in decode."""
        from numba import cuda
        kc, c, T = self.kc, self.config, self.kc.THREADS
        n = len(tokens)
        rows = lambda width: cuda.device_array((n, width), np.float32)  # noqa: E731
        x, xn, q, k, v, attn = rows(c.d_model), rows(c.d_model), rows(c.q_dim), rows(c.kv_dim), rows(c.kv_dim), \
            rows(c.q_dim)
        proj, gate, up = rows(c.d_model), rows(c.n_ff), rows(c.n_ff)
        prompt = Prompt(self, pos0, xn, q, k, v, attn)
        kc.embed[(kc._blocks(c.d_model), n), T](*self.tok_embd.args, cuda.to_device(np.asarray(tokens, np.int64)), x)
        residual = self.no_rows
        for i, L in enumerate(self.layers):
            kc.rmsnorm[n, T](x, residual, L["attn_norm"], self.eps, xn)
            kc.product_rows(L["wq"], xn, q)
            if cache.needs_kv:
                kc.product_rows(L["wk"], xn, k)
                kc.product_rows(L["wv"], xn, v)
            kc.rope[kc._blocks(n * c.q_dim // 2), T](q, c.head_dim, self.cos, self.sin, prompt.at(pos0))
            cache.attend_prompt(prompt, i)
            kc.product_rows(L["wo"], attn, proj)
            kc.rmsnorm[n, T](x, proj, L["ffn_norm"], self.eps, xn)
            kc.product_rows(L["w_gate"], xn, gate)
            kc.product_rows(L["w_up"], xn, up)
            kc.product_rows(L["w_down"], gate, proj, up=up)
            residual = proj
        if not all_logits:  # the last position only, through the decode step's own lm head
            kc.rmsnorm[1, T](x[n - 1:], residual[n - 1:], self.out_norm, self.eps, self.xn)
            self.head(self.xn_vec)
            return self.logits_dev.copy_to_host()[None]
        kc.rmsnorm[n, T](x, residual, self.out_norm, self.eps, xn)
        logits = rows(c.vocab_size)
        kc.product_rows(self.output, xn, logits)
        return logits.copy_to_host()

    def head(self, xn):
        """The logits: the output matrix meets float x whatever act_bits says, as the CPU's head
        takes 16-bit codes — int8 there flipped near-ties at a cost of 1% of the step."""
        self.kc.product(self.output, xn, self.xp, self.logits_dev, self.stream)

    def product(self, w, x, out, again=False, up=None):
        """out = w·x (or w·(silu(x)·up)); again: the product before quantized this same x, so its
        int8 codes stand."""
        if self.int8 and w.qtype != self.kc.DENSE:
            self.kc.product_int8(w, x, self.act, out, self.stream, quantized=again, up=up)
        else:
            self.kc.product(w, x, self.xp, out, self.stream, up=up)


def device_name() -> str:
    from numba import cuda
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)
