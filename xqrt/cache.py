"""Attention history for one sequence: the `Cache` interface and its storage modes.

A cache receives, per layer, the new tokens' normalized input `xn` (what XQuant stores) and
their post-RoPE `k`, pre-RoPE-free `v`, stores what its mode keeps, and answers attention for the
new queries over everything stored so far. The engine never sees the storage format.
"""
from __future__ import annotations

import numpy as np

from .errors import XQError
from .gguf_model import ModelConfig
from .kernels import cpu


def causal_attention(q, k, v, pos0, n_head, n_kv_head):
    """Reference-shaped prefill attention with NumPy BLAS.

    q: (n, n_head·hd) for positions pos0..pos0+n-1; k, v: (pos0+n, n_kv·hd) float32.
    """
    n, n_ctx = q.shape[0], k.shape[0]
    hd = q.shape[1] // n_head
    group = n_head // n_kv_head
    qh = q.reshape(n, n_kv_head, group, hd).transpose(1, 2, 0, 3).reshape(n_kv_head, group * n, hd)
    kh = k.reshape(n_ctx, n_kv_head, hd).transpose(1, 2, 0)
    vh = v.reshape(n_ctx, n_kv_head, hd).transpose(1, 0, 2)
    scores = np.matmul(qh, kh) * np.float32(1.0 / np.sqrt(hd))  # (n_kv, group·n, n_ctx)
    scores = scores.reshape(n_kv_head, group, n, n_ctx)
    future = np.arange(n_ctx)[None, :] > (pos0 + np.arange(n))[:, None]
    scores[:, :, future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores.reshape(n_kv_head, group * n, n_ctx), vh)  # (n_kv, group·n, hd)
    return out.reshape(n_kv_head, group, n, hd).transpose(2, 0, 1, 3).reshape(n, n_head * hd)


class Cache:
    """One sequence's attention state. Subclasses decide what is stored and how it is read."""
    mode = ""

    def __init__(self, config: ModelConfig, n_ctx: int):
        self.config = config
        self.n_ctx = n_ctx
        self.n_tokens = 0  # positions [0, n_tokens) are stored
        self._scores = np.zeros((config.n_head, n_ctx), np.float32)

    def check_room(self, pos0: int, n: int):
        if pos0 != self.n_tokens:
            raise XQError(f"cache holds {self.n_tokens} tokens; cannot append at position {pos0}")
        if pos0 + n > self.n_ctx:
            raise XQError(f"context full: {pos0 + n} tokens exceed the context size {self.n_ctx} (raise --ctx)")

    def attend(self, layer: int, pos0: int, xn, q, k, v) -> np.ndarray:
        """Store the new tokens of `layer` and return attention outputs (n, q_dim)."""
        raise NotImplementedError

    def advance(self, n: int):
        """Called once all layers have stored the n new tokens."""
        self.n_tokens += n

    def truncate(self, n_tokens: int) -> int:
        """Forget positions ≥ n_tokens (a prompt sharing a prefix reuses the rest); returns how
        many are kept, which a mode may round down to what it can cut exactly."""
        self.n_tokens = min(self.n_tokens, n_tokens)
        return self.n_tokens

    def nbytes(self) -> int:
        """Bytes held for the tokens stored so far."""
        raise NotImplementedError

    def bytes_per_token(self) -> float:
        return self.nbytes() / max(self.n_tokens, 1)


class FP16KV(Cache):
    """The baseline: post-RoPE K and V as IEEE half floats."""
    mode = "fp16"

    def __init__(self, config: ModelConfig, n_ctx: int):
        super().__init__(config, n_ctx)
        shape = (config.n_layer, n_ctx, config.kv_dim)
        # np.zeros maps pages lazily: memory is committed as the context fills.
        self.k = np.zeros(shape, np.uint16)
        self.v = np.zeros(shape, np.uint16)

    def attend(self, layer, pos0, xn, q, k, v):
        c, n = self.config, q.shape[0]
        end = pos0 + n
        cpu.to_f16(k, self.k[layer, pos0:end])
        cpu.to_f16(v, self.v[layer, pos0:end])
        if n == 1:
            out = np.empty((1, c.q_dim), np.float32)
            cpu.attend_f16(q[0], self.k[layer], self.v[layer], end, c.n_head, c.n_kv_head, c.head_dim,
                           self._scores, out[0])
            return out
        keys = self.k[layer, :end].view(np.float16).astype(np.float32)
        values = self.v[layer, :end].view(np.float16).astype(np.float32)
        return causal_attention(q, keys, values, pos0, c.n_head, c.n_kv_head)

    def nbytes(self):
        c = self.config
        return 2 * 2 * c.kv_dim * c.n_layer * self.n_tokens


CACHE_MODES = {"fp16": FP16KV}


def make_cache(mode: str, config: ModelConfig, n_ctx: int) -> Cache:
    if mode not in CACHE_MODES:
        raise XQError(f"unknown cache mode {mode!r} (choose from: {', '.join(CACHE_MODES)})")
    return CACHE_MODES[mode](config, n_ctx)
