"""The decode step on a GPU (`Engine(device="cuda")`, `--device cuda`): the weights uploaded once,
an fp16 K/V cache in device memory, per step a token id in and its logits out.

So far the fp16-KV cache only: the latent caches' attention kernels exist
(xqrt.kernels.cuda.attend_latent, timed by bench/gpu.py), but not yet the device-side writes that
pack each new token's latents. Every kernel is launched from Python (about 40 µs each), which bounds
a small model's step; bench/gpu.py shows what replaying the step as one CUDA graph saves.
"""
from __future__ import annotations

import numpy as np

from .cache import Cache, CacheOptions, FP16KV
from .errors import XQError
from .gguf_model import Model

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str, cache_mode: str, log=None) -> str:
    """'cpu' or 'cuda' for a --device choice; auto takes CUDA when numba-cuda finds a GPU and the
    cache mode runs there, and says which it took."""
    if device not in DEVICES:
        raise XQError(f"unknown device {device!r} (one of {', '.join(DEVICES)})")
    if device == "cpu":
        return "cpu"
    from .kernels import cuda as kc
    found = kc.available()
    if device == "cuda":
        if not found:
            raise XQError("--device cuda: numba-cuda finds no CUDA GPU (a driver and numba-cuda are needed; "
                          "--device cpu runs without)")
        if cache_mode != "fp16":
            raise XQError(f"--device cuda runs the fp16 cache so far, not {cache_mode} (use --device cpu)")
        return "cuda"
    chosen = "cuda" if found and cache_mode == "fp16" else "cpu"
    if log:
        why = device_name() if chosen == "cuda" else \
            ("no CUDA GPU found" if not found else f"the {cache_mode} cache runs on the CPU only so far")
        log(f"xqrt: device {chosen} ({why})")
    return chosen


class DeviceFP16KV(Cache):
    """Post-RoPE K and V as fp16 in device memory, one (n_ctx × kv_dim) pair per layer; only the
    GPU step reads or writes them."""
    mode = "fp16"

    def __init__(self, model: Model, n_ctx: int, options: CacheOptions = CacheOptions()):
        super().__init__(model, n_ctx, options)
        from numba import cuda
        shape = (n_ctx, self.config.kv_dim)
        self.k = [cuda.device_array(shape, np.float16) for _ in range(self.config.n_layer)]
        self.v = [cuda.device_array(shape, np.float16) for _ in range(self.config.n_layer)]

    def attend(self, layer, pos0, xn, q, k, v):
        raise XQError("a device cache is read by the GPU step only")

    def nbytes(self):
        return FP16KV.bytes_per_position(self.config) * self.n_tokens


class GpuStep:
    """The model's weights on the device and the scratch of one decode step."""

    def __init__(self, model: Model, n_ctx: int):
        from numba import cuda

        from .kernels import cpu, cuda as kc
        self.kc, c = kc, model.config
        self.config = c
        up = lambda m: kc.upload_matrix(m.qtype, m.data, m.n_cols)  # noqa: E731
        vec = lambda a: cuda.to_device(np.ascontiguousarray(a, np.float32))  # noqa: E731
        self.tok_embd, self.output = up(model.tok_embd), up(model.output)
        self.layers = [dict(attn_norm=vec(L.attn_norm), ffn_norm=vec(L.ffn_norm), wq=up(L.wq), wk=up(L.wk),
                            wv=up(L.wv), wo=up(L.wo), w_gate=up(L.w_gate), w_up=up(L.w_up), w_down=up(L.w_down))
                       for L in model.layers]
        self.out_norm = vec(model.out_norm)
        cos, sin = cpu.rope_table(model.rope_freqs, n_ctx)
        self.cos, self.sin = cuda.to_device(cos), cuda.to_device(sin)
        zeros = lambda n: cuda.device_array(n, np.float32)  # noqa: E731
        self.x, self.q, self.k, self.v = zeros(c.d_model), zeros(c.q_dim), zeros(c.kv_dim), zeros(c.kv_dim)
        self.xn = cuda.device_array((1, c.d_model), np.float32)
        self.x_row, self.xn_vec = self.x.reshape(1, -1), self.xn.reshape(-1)  # views made once: each costs host time
        self.attn, self.proj = zeros(c.q_dim), zeros(c.d_model)
        self.gate, self.up = zeros(c.n_ff), zeros(c.n_ff)
        self.logits_dev = zeros(c.vocab_size)
        self.logits = np.zeros(c.vocab_size, np.float32)
        self.xp = zeros(kc.permuted_size(max(c.d_model, c.n_ff, c.q_dim)))
        self.ws = kc.Workspace(n_ctx, c.n_head, c.head_dim)
        self.eps = np.float32(c.norm_eps)

    def __call__(self, token: int, pos: int, cache: DeviceFP16KV) -> np.ndarray:
        """Logits of `token` at position `pos`, its K/V appended to the cache's layers."""
        kc, c, T = self.kc, self.config, self.kc.THREADS
        blocks = kc._blocks
        x, xn = self.x, self.xn_vec
        kc.embed[blocks(c.d_model), T](*self.tok_embd.args, token, x)
        for i, L in enumerate(self.layers):
            kc.rmsnorm[1, T](self.x_row, L["attn_norm"], self.eps, self.xn)
            kc.product(L["wq"], xn, self.xp, self.q)
            kc.product(L["wk"], xn, self.xp, self.k)
            kc.product(L["wv"], xn, self.xp, self.v)
            kc.rope[blocks(c.q_dim // 2), T](self.q, c.head_dim, self.cos, self.sin, pos)
            kc.rope[blocks(c.kv_dim // 2), T](self.k, c.head_dim, self.cos, self.sin, pos)
            kc.store_f16[blocks(c.kv_dim), T](self.k, cache.k[i], pos)
            kc.store_f16[blocks(c.kv_dim), T](self.v, cache.v[i], pos)
            kc.attend_f16(self.q, cache.k[i], cache.v[i], pos + 1, c.n_head, c.head_dim, self.ws, self.attn)
            kc.product(L["wo"], self.attn, self.xp, self.proj)
            kc.add[blocks(c.d_model), T](x, self.proj)
            kc.rmsnorm[1, T](self.x_row, L["ffn_norm"], self.eps, self.xn)
            kc.product(L["w_gate"], xn, self.xp, self.gate)
            kc.product(L["w_up"], xn, self.xp, self.up)
            kc.silu_mul[blocks(c.n_ff), T](self.gate, self.up, self.gate)
            kc.product(L["w_down"], self.gate, self.xp, self.proj)
            kc.add[blocks(c.d_model), T](x, self.proj)
        kc.rmsnorm[1, T](self.x_row, self.out_norm, self.eps, self.xn)
        kc.product(self.output, xn, self.xp, self.logits_dev)
        self.logits_dev.copy_to_host(self.logits)
        return self.logits


def device_name() -> str:
    from numba import cuda
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)
