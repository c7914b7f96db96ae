"""Attention history for one sequence: the `Cache` interface and its storage modes.

A cache receives, per layer, the new tokens' normalized input `xn` (what XQuant stores) and
their post-RoPE `k`, pre-RoPE-free `v`, stores what its mode keeps, and answers attention for the
new queries over everything stored so far. The engine never sees the storage format.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from . import quant
from .errors import XQError
from .factors import block_hadamard, layer_factors
from .gguf_model import Model, ModelConfig
from .kernels import cpu


def mixed_attention(q, pos0, k_quant, v_quant, k_exact, v_exact, bound_k, bound_v, n_head, n_kv_head,
                    window: int = 0, k_win=None, v_win=None):
    """Prefill-shaped attention (NumPy BLAS) where each query sees up to three versions of the history.

    q: (n, n_head·hd) post-RoPE, for positions pos0 … pos0+n−1. Query i at position p reads
    position j from the window rows k_win[j − e_w] / v_win[j − e_w] when p − j < window (they end
    at pos0+n−1, e = end − len(rows)); otherwise from k_quant[j] / v_quant[j] when
    j < bound_k[i] / bound_v[i], else from the exact rows k_exact[j − e_k] / v_exact[j − e_v].
    Keys are post-RoPE. A plain cache passes everything as "quant" with bounds at j ≤ i.
    """
    n, end = q.shape[0], pos0 + q.shape[0]
    hd = q.shape[1] // n_head
    group = n_head // n_kv_head
    qh = q.reshape(n, n_kv_head, group, hd).transpose(1, 2, 0, 3).reshape(n_kv_head, group * n, hd)
    pos = pos0 + np.arange(n)
    win_lo = pos + 1 - window  # the first position each query reads from the window
    scale = np.float32(1.0 / np.sqrt(hd))

    def scores_of(keys):
        kh = keys.reshape(len(keys), n_kv_head, hd).transpose(1, 2, 0)
        return (np.matmul(qh, kh) * scale).reshape(n_kv_head, group, n, len(keys))

    s = np.full((n_kv_head, group, n, end), -np.inf, np.float32)
    hq, ek = len(k_quant), end - len(k_exact)
    if hq:
        cols = np.arange(hq)
        use = (cols[None, :] < bound_k[:, None]) & (cols[None, :] < win_lo[:, None])
        s[..., :hq] = np.where(use, scores_of(k_quant), -np.inf)
    if len(k_exact):
        cols = np.arange(ek, end)
        use = (cols[None, :] >= bound_k[:, None]) & (cols[None, :] <= pos[:, None]) & (cols[None, :] < win_lo[:, None])
        s[..., ek:] = np.where(use, scores_of(k_exact), s[..., ek:])
    ew = end - (0 if k_win is None else len(k_win))
    if ew < end:
        cols = np.arange(ew, end)
        use = (cols[None, :] >= win_lo[:, None]) & (cols[None, :] <= pos[:, None])
        s[..., ew:] = np.where(use, scores_of(k_win), s[..., ew:])
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    out = np.zeros((n_kv_head, group * n, hd), np.float32)

    def add(weights, values):
        vh = values.reshape(len(values), n_kv_head, hd).transpose(1, 0, 2)
        out[...] += np.matmul(weights.reshape(n_kv_head, group * n, len(values)), vh)

    hv, ev = len(v_quant), end - len(v_exact)
    if hv:
        cols = np.arange(hv)[None, :]
        add(np.where((cols < bound_v[:, None]) & (cols < win_lo[:, None]), s[..., :hv], 0.0), v_quant)
    if len(v_exact):
        cols = np.arange(ev, end)[None, :]
        add(np.where((cols >= bound_v[:, None]) & (cols < win_lo[:, None]), s[..., ev:], 0.0), v_exact)
    if ew < end:
        add(np.where(np.arange(ew, end)[None, :] >= win_lo[:, None], s[..., ew:], 0.0), v_win)
    return out.reshape(n_kv_head, group, n, hd).transpose(2, 0, 1, 3).reshape(n, n_head * hd)


@dataclass(frozen=True)
class CacheOptions:
    """How a quantized cache stores its history (fp16 ignores all of it)."""
    bits: int = 4  # 2, 3, 4, 8; 16 / 32 store floats ("quantization off")
    group: int | None = None  # G; None: the largest power of two ≤ 128 dividing the cached widths
    residual: int | None = None  # R: recent tokens kept exact, a multiple of G (None: G; 0: none)
    base_layers: int | None = None  # XQuant-CL: layers at ≥ 4 bits, the last seeding Â (None: 3)
    simulated: bool = False  # evaluation only: every K/V read from the quantized cache, no tail
    kv_budget: int = 0  # bytes of fp16 K/V (all layers) for the most recent tokens, read without remat
    value_bits: int | None = None  # bits of the per-token value latents (GQA XQuant / KIVI); None: bits
    layer_bits: tuple[int, ...] | None = None  # per layer, instead of bits (value_bits still wins for values)
    value_group: int | None = None  # group of the per-token value latents (GQA XQuant / KIVI); None: G
    clip: bool = False  # each group's range of least squared error instead of its min/max
    rotate: bool = True  # per-token latents (and deltas) through a Hadamard transform per group
    balance: float = 0.0  # value latents scaled by σ^balance (σ: the SVD's), the rebuild by σ^-balance
    sinks: int = 4  # the first positions' latents also kept exact (fp16, counted), at most G
    channel_bits: bool = True  # 2/3-bit key latents: bits spread over channels by the file's calibration
    fp16_channels: int = 0  # GQA XQuant: the first key latent channels (the SVD's largest, where the outliers
    # sit: the paper's appendix B) stored as fp16 in their per-channel groups, counted in the bytes

    def __post_init__(self):
        for flag, b in (("--bits", self.bits), ("--value-bits", self.value_bits),
                        *(("--layer-bits", b) for b in self.layer_bits or ())):
            if b is not None and b not in quant.BITS:
                raise XQError(f"{flag} {b} is not supported (choose from 2, 3, 4, 8; 16/32 store floats)")
        if self.kv_budget < 0:
            raise XQError(f"--kv-budget {self.kv_budget} must be 0 or more bytes")
        if self.fp16_channels < 0:
            raise XQError(f"--fp16-channels {self.fp16_channels} must be 0 or more")


def versus_fp16(ratio: float) -> str:
    """A cache's size next to fp16 KV's, from fp16's bytes per token over its own: a cache that is
    larger (a tiny model's latents can be) says so, not "0.57x smaller"; fp16 KV itself is "the size"."""
    if f"{ratio:.2f}" == "1.00":
        return "the size of fp16 KV"
    if ratio >= 1:
        return f"{ratio:.2f}x smaller than fp16 KV"
    return f"{1 / ratio:.2f}x larger than fp16 KV" if ratio > 0 else "no positions to compare with fp16 KV"


def default_group(config: ModelConfig) -> int:
    g = 128
    while g > 8 and (config.d_model % g or config.kv_dim % g):
        g //= 2
    return g


class Cache:
    """One sequence's attention state. Subclasses decide what is stored and how it is read."""
    mode = ""

    def __init__(self, model: Model, n_ctx: int, options: CacheOptions = CacheOptions()):
        self.config = model.config
        self.inv_freq = model.rope_freqs
        self.n_ctx = n_ctx
        self.options = options
        self.n_tokens = 0  # positions [0, n_tokens) are stored
        self.scores = np.zeros((self.config.n_head, n_ctx), np.float32)  # attention scratch (the fused step too)

    def check_room(self, pos0: int, n: int):
        if pos0 != self.n_tokens:
            raise XQError(f"cache holds {self.n_tokens} tokens; cannot append at position {pos0}")
        if pos0 + n > self.n_ctx:
            raise XQError(f"context full: {pos0 + n} tokens exceed the context size {self.n_ctx} (raise --ctx)")

    def attend(self, layer: int, pos0: int, xn, q, k, v) -> np.ndarray:
        """Store the new tokens of `layer` and return attention outputs (n, q_dim).

        xn: the layer's normalized input (what XQuant stores); q: post-RoPE; k: pre-RoPE; v."""
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

    def working_nbytes(self) -> int:
        """The part of nbytes() that is per-step working memory rather than stored history."""
        return 0

    def describe(self) -> str:
        return self.mode


class FP16KV(Cache):
    """The baseline: post-RoPE K and V as IEEE half floats."""
    mode = "fp16"

    def __init__(self, model, n_ctx, options=CacheOptions()):
        super().__init__(model, n_ctx, options)
        shape = (self.config.n_layer, n_ctx, self.config.kv_dim)
        # np.zeros maps pages lazily: memory is committed as the context fills.
        self.k = np.zeros(shape, np.uint16)
        self.v = np.zeros(shape, np.uint16)
        self._step_out = np.zeros((1, self.config.q_dim), np.float32)
        self._k_rot = np.zeros(self.config.kv_dim, np.float32)

    def attend(self, layer, pos0, xn, q, k, v):
        c, n = self.config, q.shape[0]
        end = pos0 + n
        if n == 1:  # the decode step: one compiled call, into a reused buffer
            cpu.attend_f16_step(q[0], k[0], v[0], self.k[layer], self.v[layer], pos0, self.inv_freq, c.n_head,
                                c.n_kv_head, c.head_dim, self._k_rot, self.scores, self._step_out[0])
            return self._step_out
        k = k.copy()
        cpu.rope_rows(k, c.n_kv_head, c.head_dim, pos0, self.inv_freq)
        cpu.to_f16(k, self.k[layer, pos0:end])
        cpu.to_f16(v, self.v[layer, pos0:end])
        keys = self.k[layer, :end].view(np.float16).astype(np.float32)
        values = self.v[layer, :end].view(np.float16).astype(np.float32)
        bound = np.arange(pos0, end) + 1
        empty = keys[:0]
        return mixed_attention(q, pos0, keys, values, empty, empty, bound, bound, c.n_head, c.n_kv_head)

    @staticmethod
    def bytes_per_position(c: ModelConfig) -> int:
        return 2 * 2 * c.kv_dim * c.n_layer

    def nbytes(self):
        return self.bytes_per_position(self.config) * self.n_tokens


class Stream:
    """Packed latent vectors of one layer, one per position (xqrt.quant's format).

    per_channel: groups run along G consecutive positions of each channel (KIVI's keys; a group is
    written once its G positions exist), and `channel_bits` may give each channel a width of its
    own (xqrt.quant.CHANNEL_BITS; `bits` is then their mean). Otherwise along the vector, one
    token at a time.
    sinks: the first positions (attention sinks: few, with outsized activations) are also kept
    exact, as fp16, and read from there; a per-channel group quantizes without them, so their
    outliers do not set its channels' ranges.
    """

    def __init__(self, n_ctx: int, width: int, bits: int, group: int, per_channel: bool, clip: bool = False,
                 sinks: int = 0, channel_bits=None):
        self.width, self.bits, self.group, self.per_channel, self.clip = width, bits, group, per_channel, clip
        self.sink = np.zeros((sinks if bits <= 8 else 0, width), np.float32)
        quantized = bits <= 8
        self.channel_off = np.zeros(0, np.int64)
        if per_channel:
            n_groups = -(-n_ctx // group)
            self.channel_off = quant.channel_offsets([bits] * width if channel_bits is None else channel_bits, group)
            self.codes = np.zeros((n_groups, 1, self.channel_off[-1]), np.uint8)
            self.scale = np.zeros((n_groups, width, int(quantized)), np.uint16)
        else:
            self.codes = np.zeros((n_ctx, 1, quant.row_bytes(width, bits)), np.uint8)
            self.scale = np.zeros((n_ctx, 1, quant.n_scales(width, bits, group)), np.uint16)
        self.zero = np.zeros_like(self.scale)

    def write(self, pos0: int, rows: np.ndarray):
        """Per-token: quantize rows for positions pos0…. Per-channel: rows are the positions of
        one group starting at pos0 (a multiple of G); fewer than G only in simulated mode."""
        rows = np.ascontiguousarray(rows, np.float32)
        n_sink = max(min(len(self.sink) - pos0, len(rows)), 0)
        if n_sink:
            self.sink[pos0:pos0 + n_sink] = rows[:n_sink].astype(np.float16)
        if self.per_channel:
            g = pos0 // self.group
            block = np.empty((self.group, self.width), np.float32)
            fill = rows[min(n_sink, len(rows) - 1)]  # leaves the min/max of the other rows as they are
            block[:len(rows)] = rows
            block[len(rows):] = fill
            block[:n_sink] = fill  # the sinks are read from self.sink
            quant.quantize_channels(np.ascontiguousarray(block.T), self.channel_off, self.group, self.codes[g, 0],
                                    self.scale[g], self.zero[g], self.clip)
        else:
            end = pos0 + len(rows)
            quant.quantize_rows(rows, self.bits, self.group, self.codes[pos0:end, 0], self.scale[pos0:end, 0],
                                self.zero[pos0:end, 0], self.clip)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Dequantized rows of positions [lo, hi), float32."""
        if not self.per_channel:
            out = np.empty((hi - lo, self.width), np.float32)
            quant.dequantize_rows(self.codes[lo:hi, 0], self.scale[lo:hi, 0], self.zero[lo:hi, 0], self.bits,
                                  self.group, out)
        else:
            g0, g1 = lo // self.group, -(-hi // self.group)
            cols = np.empty((g1 - g0, self.width, self.group), np.float32)
            for g in range(g0, g1):
                quant.dequantize_channels(self.codes[g, 0], self.scale[g], self.zero[g], self.channel_off,
                                          self.group, cols[g - g0])
            out = cols.transpose(0, 2, 1).reshape(-1, self.width)[lo - g0 * self.group:hi - g0 * self.group]
        n_sink = max(min(len(self.sink), hi) - lo, 0)
        out[:n_sink] = self.sink[lo:lo + n_sink]
        return out

    def nbytes(self, n_positions: int) -> int:
        """Bytes held for n written positions (per-channel: its complete groups), sinks as fp16."""
        sinks = min(len(self.sink), n_positions) * self.width * 2
        n_rows = n_positions // self.group if self.per_channel else n_positions
        return sinks + n_rows * (self.codes[0].nbytes + self.scale[0].nbytes + self.zero[0].nbytes)

    def kernel_args(self):
        return self.codes, self.scale, self.zero, self.bits, self.sink, self.channel_off


@dataclass
class _Layer:
    """How one layer turns its inputs into latents and latents back into K and V.

    Latents: KIVI's are K (pre-RoPE) and V themselves; XQuant's are x·uk and x·uv (GQA) or x·uk
    for both (MHA, `shared`: uk is None, or a rotation). K = z_k·mk, V = z_v·mv (None: the identity).
    """
    uk: np.ndarray | None
    uv: np.ndarray | None
    mk: np.ndarray | None
    mv: np.ndarray | None
    shared: bool
    key: Stream | None = None  # quantized latents (KIVI / XQuant layers)
    value: Stream | None = None
    delta: Stream | None = None  # XQuant-CL layers: Q(Δ) instead, read through the accumulator
    ukv: np.ndarray | None = None  # d × r, None: Δ is taken in x space (MHA)
    seed: bool = False  # the delta is taken against zero: this layer seeds the accumulator
    wk: np.ndarray | None = None  # accumulator → K / V (XQuant-CL)
    wv: np.ndarray | None = None

    def latents(self, xn, k, v):
        if self.uk is None and not self.shared:
            return k, v
        if self.shared:
            z = matmul(xn, self.uk)
            return z, z
        return matmul(xn, self.uk), matmul(xn, self.uv)

    def keys(self, z):
        return matmul(z, self.mk)

    def values(self, z):
        return matmul(z, self.mv)

    @property
    def key_per_channel(self):
        return self.key is not None and self.key.per_channel


_EMPTY = np.zeros((0, 0), np.float32)


def _or_empty(m):
    return _EMPTY if m is None else m


def matmul(x: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """x · m (m None: x). A decode step's few rows go through one serial Numba product, not BLAS:
    BLAS threads left spinning after a call would take the cores from the next Numba kernel, and
    a parallel region costs more than this product."""
    if m is None:
        return x
    if len(x) > 4:
        return x @ m
    out = np.empty((len(x), m.shape[1]), np.float32)
    cpu.rebuild(np.ascontiguousarray(x, np.float32), len(x), np.ascontiguousarray(m, np.float32), out)
    return out


class LatentCache(Cache):
    """KIVI* and XQuant: each layer's history as packed latents, K/V rebuilt when attended.

    A token's latents are quantized as soon as they are complete (per-token streams at once,
    per-channel groups when G positions exist), and kept exact in a small ring while they are
    among the recent ones the residual rule shows exactly: query t reads position j quantized
    when j < bound(t) and exact otherwise, with
        bound(t) = G·max(⌊t/G⌋ − (R/G − 1), 0)   (R ≥ G: the recent groups exact)
        bound(t) = t + 1 for per-token streams when R = 0 (everything quantized at once),
    and bound(t) = t + 1 for every stream in simulated mode.
    """

    def __init__(self, model, n_ctx, options=CacheOptions(), log=None):
        super().__init__(model, n_ctx, options)
        c = self.config
        o = options
        self.bits = o.bits
        self.group, self.residual = G, R = self.resolve(c, o)  # before any SVD is computed
        self.simulated = o.simulated
        self.rotated = False  # set by _layer where a rotation applies (not KIVI: no factors to fold it into)
        self.channel_allocated = False  # set by _layer where key latent channels got bits of their own
        self.layers = self._plan(model, log)
        self.ring_size = max(R, G)
        # The exact tail is fp16, as KIVI keeps it; float32 only when quantization is off.
        self._tail_dtype = np.float32 if self.bits == 32 else np.float16
        self._ring = [self._new_ring(L) for L in self.layers]
        self._n_threads = numba.get_num_threads()
        self._rope_cos, self._rope_sin = cpu.rope_table(self.inv_freq, n_ctx)  # keys are rotated as rebuilt
        # --kv-budget: the last W positions' K (post-RoPE) and V also as fp16, in a ring (position
        # t in row t mod W), read as they are; only older positions are rematerialized.
        self.window = 0 if self.simulated else min(o.kv_budget // FP16KV.bytes_per_position(c), n_ctx)
        self._win_k = np.zeros((c.n_layer, self.window, c.kv_dim), np.uint16)
        self._win_v = np.zeros_like(self._win_k)
        self._k_rot = np.zeros(c.kv_dim, np.float32)
        self._step_out = np.zeros((1, c.q_dim), np.float32)
        self._steps = [self._step_state(i) for i in range(c.n_layer)]

    @property
    def value_group(self) -> int:
        return self.group if self.options.value_group is None else int(self.options.value_group)

    @property
    def _rotation_block(self) -> int:
        """The Hadamard order: the largest power of two dividing G (blocks never straddle groups)."""
        return self.group & -self.group

    @classmethod
    def resolve(cls, c: ModelConfig, o: CacheOptions) -> tuple[int, int]:
        """(G, R) for these options on this model; any option that does not fit fails here."""
        G = default_group(c) if o.group is None else int(o.group)
        R = G if o.residual is None else int(o.residual)
        if G <= 0:
            raise XQError(f"--group {G} must be positive")
        for w in sorted(cls._token_widths(c)):
            if w % G or G % 8:
                raise XQError(f"--group {G} does not fit this model: it must be a multiple of 8 dividing the "
                              f"cached width {w} (default: {default_group(c)})")
        if R < 0 or R % G:
            raise XQError(f"--residual {R} must be 0 or a multiple of the group size {G}")
        flag, Gv = ("--group", G) if o.value_group is None else ("--value-group", int(o.value_group))
        wv = cls._value_width(c)
        if wv and (Gv <= 0 or Gv % 8 or wv % Gv):
            raise XQError(f"{flag} {Gv} does not fit this model: it must be a multiple of 8 dividing the "
                          f"value width {wv} (default: {default_group(c)})")
        if o.layer_bits is not None and len(o.layer_bits) != c.n_layer:
            raise XQError(f"--layer-bits has {len(o.layer_bits)} entries; the model has {c.n_layer} layers")
        if not 0 <= o.sinks <= G:
            raise XQError(f"--sinks {o.sinks} must be between 0 and the group size {G}")
        return G, R

    @staticmethod
    def _token_widths(c: ModelConfig) -> set[int]:
        """Widths of the per-token streams grouped by G (groups run along them: G must divide them)."""
        return {c.d_model} if c.n_kv_head == c.n_head else set()

    @staticmethod
    def _value_width(c: ModelConfig) -> int | None:
        """Width of the per-token value stream, grouped by value_group (None: there is none)."""
        return None if c.n_kv_head == c.n_head else c.kv_dim

    def _plan(self, model, log):
        c = self.config
        if c.n_kv_head == c.n_head:
            f = layer_factors(model)
            return [self._layer(None, None, f[i].wk, f[i].wv, True, self.layer_bits(i)) for i in range(c.n_layer)]
        f = layer_factors(model, log)
        return [self._layer(L.uk, L.uv, L.mk, L.mv, False, self.layer_bits(i), key_weight=L.kw)
                for i, L in enumerate(f)]

    def layer_bits(self, i: int) -> int:
        return self.bits if self.options.layer_bits is None else int(self.options.layer_bits[i])

    def _layer(self, uk, uv, mk, mv, shared, bits, with_streams=True, key_weight=None) -> _Layer:
        """A layer's latents; `rotate` turns its per-token stream (X̂, or the value latents) by a
        block Hadamard H, undone in the rebuild matrices: (x·u·H)·(Hᵀ·m) = x·u·m. key_weight (the
        file's calibration, per key latent channel) spreads the key latents' bits over channels."""
        o = self.options
        self.rotated = self.rotated or (o.rotate and (shared or uv is not None))
        if o.rotate and shared:
            h = block_hadamard(mk.shape[0], self._rotation_block)
            uk, mk, mv = h, h.T @ mk, h.T @ mv
        if o.balance and uv is not None:
            s = np.maximum(np.linalg.norm(mv, axis=1), np.float32(1e-30)) ** np.float32(o.balance)
            uv, mv = uv * s[None, :], mv / s[:, None]
        if o.rotate and uv is not None and not shared:
            h = block_hadamard(uv.shape[1], self.value_group & -self.value_group)
            uv, mv = uv @ h, h.T @ mv
        L = _Layer(*(None if m is None else cpu.aligned(m) for m in (uk, uv, mk, mv)), shared)
        if with_streams:
            wk, wv = self.latent_widths(L)
            channel_bits = None
            widths = quant.CHANNEL_BITS
            n_exact = min(o.fp16_channels, wk) if L.uk is not None and not shared and bits <= 8 else 0
            if o.channel_bits and key_weight is not None and widths[0] < bits < widths[-1]:
                channel_bits = quant.allocate_channel_bits(key_weight[n_exact:], bits)
                self.channel_allocated = True
            if n_exact:
                rest = np.full(wk - n_exact, bits, np.int64) if channel_bits is None else channel_bits
                channel_bits = np.concatenate([np.full(n_exact, 16, np.int64), rest])
            L.key = Stream(self.n_ctx, wk, bits, self.group, per_channel=not shared, clip=o.clip, sinks=o.sinks,
                           channel_bits=channel_bits)
            value_bits = bits if o.value_bits is None or bits == 32 else o.value_bits
            L.value = L.key if shared else Stream(self.n_ctx, wv, value_bits, self.value_group, per_channel=False,
                                                  clip=o.clip, sinks=o.sinks)
        return L

    def latent_widths(self, L: _Layer):
        if L.shared:
            return self.config.d_model, self.config.d_model
        kv = self.config.kv_dim
        return (kv if L.uk is None else L.uk.shape[1]), (kv if L.uv is None else L.uv.shape[1])

    def _new_ring(self, L: _Layer):
        wk, wv = self.latent_widths(L)
        rk = np.zeros((self.ring_size, wk), self._tail_dtype)
        return (rk, rk) if L.shared else (rk, np.zeros((self.ring_size, wv), self._tail_dtype))

    def _step_state(self, layer: int):
        """What cpu.latent_step needs of a layer besides the token, allocated once; None where the
        layer's decode step stays on the batched path (XQuant-CL's delta layers, float32 tails)."""
        L, ring = self.layers[layer], self._ring[layer]
        if L.delta is not None or L.key is None or self._tail_dtype is not np.float16 or self.simulated:
            return None
        wk, wv = self.latent_widths(L)
        f32 = lambda m: np.ascontiguousarray(_or_empty(m), np.float32)  # noqa: E731
        zk = np.zeros(wk, np.float32)
        zv = zk if L.shared else np.zeros(wv, np.float32)
        k_tail = np.zeros((self.ring_size, wk), np.float32)
        v_tail = k_tail if L.shared else np.zeros((self.ring_size, wv), np.float32)
        block = np.zeros((wk, self.group) if L.key.per_channel else (0, 0), np.float32)
        key, value = L.key, L.value
        streams = (key.codes, key.scale, key.zero, key.bits, key.channel_off, key.sink, f32(L.mk),
                   value.codes, value.scale, value.zero, value.bits, value.group, value.sink, f32(L.mv))
        return (f32(L.uk), f32(L.uv), L.shared, zk, zv, ring[0].view(np.uint16), ring[1].view(np.uint16),
                *streams), (k_tail, v_tail, block, self._win_k[layer], self._win_v[layer])

    def _decode_step(self, layer, pos, xn, q, k, v):
        c = self.config
        state, scratch = self._steps[layer]
        cpu.latent_step(q, xn, k, v, pos, *state, self.group, self.residual, self.options.clip, *scratch,
                        self._k_rot, self.inv_freq, self._rope_cos, self._rope_sin, c.n_head, c.n_kv_head,
                        c.head_dim, self._n_threads, self.scores, self._step_out[0])
        return self._step_out

    # ---- which positions a query reads exactly -------------------------------------------------
    def bound(self, t, per_channel: bool):
        t = np.asarray(t)
        G, R = self.group, self.residual
        if self.simulated or (R == 0 and not per_channel):
            return t + 1
        return G * np.maximum(t // G - max(R // G - 1, 0), 0)

    def _keep_from(self, L: _Layer, end: int) -> int:
        """Lowest position whose exact latents a later query (or an unfinished group) needs."""
        lo = min(int(self.bound(end, L.key_per_channel)), int(self.bound(end, False)))
        if L.key_per_channel:
            lo = min(lo, end // self.group * self.group)
        return min(lo, end)

    # ---- storage -------------------------------------------------------------------------------
    def _ring_rows(self, ring, lo, hi):
        idx = np.arange(lo, hi) % self.ring_size
        return ring[idx].astype(np.float32)

    def _store(self, layer, pos0, zk, zv):
        """Quantize the new latents, keep the exact ones the bounds need; returns the exact latents
        of positions [lo, end) (old ring rows + new) and lo."""
        L = self.layers[layer]
        rk, rv = self._ring[layer]
        end = pos0 + len(zk)
        zk = zk.astype(self._tail_dtype).astype(np.float32)
        zv = zk if L.shared else zv.astype(self._tail_dtype).astype(np.float32)
        lo = min(self._keep_from(L, pos0), pos0)
        ek = np.concatenate([self._ring_rows(rk, lo, pos0), zk])
        ev = ek if L.shared else np.concatenate([self._ring_rows(rv, lo, pos0), zv])
        self._quantize(L, layer, pos0, end, lo, ek, ev, zk, zv)
        keep = max(self._keep_from(L, end), end - self.ring_size)
        idx = np.arange(keep, end) % self.ring_size
        rk[idx] = ek[keep - lo:]
        if not L.shared:
            rv[idx] = ev[keep - lo:]
        return lo, ek, ev

    def _quantize(self, L, layer, pos0, end, lo, ek, ev, zk, zv):
        if L.key.per_channel:
            G = self.group
            last = end if self.simulated else end // G * G
            for g0 in range(pos0 // G * G, last, G):
                L.key.write(g0, ek[g0 - lo:min(g0 + G, end) - lo])
        else:
            L.key.write(pos0, zk)
        if not L.shared:
            L.value.write(pos0, zv)

    # ---- attention -----------------------------------------------------------------------------
    def _store_window(self, layer, pos0, k, v):
        """Put the new positions' K (rotated) and V into the fp16 window ring. A batch also gets
        back the window rows its queries read, positions [max(pos0 − W + 1, 0), end), as float32
        (a decode step's kernel reads the ring itself)."""
        c, W, n = self.config, self.window, len(k)
        if n == 1:  # the decode step: one compiled call, no parallel region for a single row
            cpu.store_kv_f16(k[0], v[0], pos0, self.inv_freq, c.n_kv_head, c.head_dim, self._k_rot,
                             self._win_k[layer, pos0 % W], self._win_v[layer, pos0 % W])
            return None, None
        k = np.array(k, np.float32)
        cpu.rope_rows(k, c.n_kv_head, c.head_dim, pos0, self.inv_freq)
        keep = max(pos0, pos0 + n - W)  # the new positions that stay in the ring
        new_k, new_v = np.empty((n, c.kv_dim), np.uint16), np.empty((n, c.kv_dim), np.uint16)
        cpu.to_f16(k, new_k)
        cpu.to_f16(np.ascontiguousarray(v, np.float32), new_v)
        old = np.arange(max(pos0 - W + 1, 0), pos0) % W
        rows_k = np.concatenate([self._win_k[layer, old], new_k])
        rows_v = np.concatenate([self._win_v[layer, old], new_v])
        self._win_k[layer, np.arange(keep, pos0 + n) % W] = new_k[keep - pos0:]
        self._win_v[layer, np.arange(keep, pos0 + n) % W] = new_v[keep - pos0:]
        return rows_k.view(np.float16).astype(np.float32), rows_v.view(np.float16).astype(np.float32)

    def attend(self, layer, pos0, xn, q, k, v):
        if q.shape[0] == 1 and self._steps[layer] is not None:
            return self._decode_step(layer, pos0, xn[0], q[0], k[0], v[0])
        L = self.layers[layer]
        zk, zv = L.latents(xn, k, v)
        lo, ek, ev = self._store(layer, pos0, zk, zv)
        k_win, v_win = self._store_window(layer, pos0, k, v) if self.window else (None, None)
        n, end = q.shape[0], pos0 + q.shape[0]
        c = self.config
        if n == 1 and not self.simulated:
            return self._attend_one(layer, L, pos0, q, lo, ek, ev)
        pos = np.arange(pos0, end)
        bk, bv = self.bound(pos, L.key_per_channel), self.bound(pos, False)
        hk, hv = int(bk[-1]), int(bv[-1])
        kq, vq = self._quantized_kv(layer, L, hk, hv)
        kq = np.array(kq, np.float32)
        cpu.rope_rows(kq, c.n_kv_head, c.head_dim, 0, self.inv_freq)
        lk, lv = int(bk[0]), int(bv[0])
        ke = np.array(L.keys(ek[lk - lo:]), np.float32)
        cpu.rope_rows(ke, c.n_kv_head, c.head_dim, lk, self.inv_freq)
        ve = L.values(ev[lv - lo:])
        return mixed_attention(q, pos0, kq, vq, ke, ve, bk, bv, c.n_head, c.n_kv_head, self.window, k_win, v_win)

    def _quantized_kv(self, layer, L, hk, hv):
        """Pre-RoPE keys of positions [0, hk) and values of [0, hv) from the quantized latents."""
        return L.keys(L.key.read(0, hk)), L.values(L.value.read(0, hv))

    def _attend_one(self, layer, L, pos, q, lo, ek, ev):
        c = self.config
        w0 = pos + 1 - min(self.window, pos + 1)  # positions from w0 on are read from the fp16 window
        bk, bv = int(self.bound(pos, L.key_per_channel)), int(self.bound(pos, False))
        k_tail = ek[bk - lo:w0 - lo] if bk < w0 else ek[:0]
        v_tail = ev[bv - lo:w0 - lo] if bv < w0 else ev[:0]
        bk, bv = min(bk, w0), min(bv, w0)
        key, value, mk, mv = self._kernel_streams(L)
        out = np.empty((1, c.q_dim), np.float32)
        kc, ks, kz, kb, k_sink, k_off = key.kernel_args()
        vc, vs, vz, vb, v_sink, _ = value.kernel_args()
        cpu.attend_latent(q[0], pos, kc, ks, kz, kb, k_off, key.width, k_sink, mk, bk,
                          vc, vs, vz, vb, value.width, value.group, v_sink, mv, bv, self.group,
                          np.ascontiguousarray(k_tail), _or_empty(L.mk), np.ascontiguousarray(v_tail), _or_empty(L.mv),
                          self._win_k[layer], self._win_v[layer], self._rope_cos, self._rope_sin, c.n_head,
                          c.n_kv_head, c.head_dim, self._n_threads, self.scores, out[0])
        return out

    def _kernel_streams(self, L):
        """The streams the decode kernel rebuilds from, with their rebuild matrices."""
        return L.key, L.value, _or_empty(L.mk), _or_empty(L.mv)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def truncate(self, n_tokens):
        """Cut back to a group boundary whose exact tail the ring still holds (else to 0)."""
        n_tokens = min(self.n_tokens, n_tokens)
        if n_tokens == self.n_tokens:
            return n_tokens
        cut = n_tokens // self.group * self.group
        held = [max(self._keep_from(L, self.n_tokens), self.n_tokens - self.ring_size) for L in self.layers]
        ok = all(self._keep_from(L, cut) >= lo for L, lo in zip(self.layers, held))
        ok = ok and not self.window  # later positions have overwritten the window rows before the cut
        self.n_tokens = cut if ok else 0
        return self.n_tokens

    def _ring_bytes(self, L, end):
        wk, wv = self.latent_widths(L)
        rows = end - self._keep_from(L, end)
        return rows * np.dtype(self._tail_dtype).itemsize * (wk if L.shared else wk + wv)

    def nbytes(self):
        n = self.n_tokens
        total = min(n, self.window) * FP16KV.bytes_per_position(self.config)
        for L in self.layers:
            for s in {id(x): x for x in (L.key, L.value, L.delta) if x is not None}.values():
                total += s.nbytes(n)
            total += self._ring_bytes(L, n)
        return total

    def describe(self):
        o = self.options
        bits = f"{self.bits}-bit" if o.layer_bits is None else \
            f"{'/'.join(map(str, sorted(set(o.layer_bits), reverse=True)))}-bit per layer"
        parts = [f"{self.mode} {bits}", f"group {self.group}"]
        if o.value_bits is not None and o.value_bits != self.bits:
            parts.append(f"values {o.value_bits}-bit")
        if self.value_group != self.group and self._value_width(self.config):
            parts.append(f"value group {self.value_group}")
        parts.append("no tail (simulated)" if self.simulated else f"residual {self.residual}")
        parts += [f"{o.sinks} sinks"] * bool(o.sinks and self.bits <= 8) + ["rotated"] * self.rotated
        parts += ["key bits per channel"] * self.channel_allocated
        parts += ["clipped"] * o.clip + [f"value balance {o.balance:g}"] * bool(o.balance)
        parts += [f"fp16 window {self.window}"] * bool(self.window)
        return ", ".join(parts)


class KIVI(LatentCache):
    """KIVI*: keys per-channel before RoPE (groups of G positions), values per-token."""
    mode = "kivi"

    @staticmethod
    def _token_widths(c):
        return set()

    @staticmethod
    def _value_width(c):
        return c.kv_dim

    def _plan(self, model, log):
        return [self._layer(None, None, None, None, False, self.layer_bits(i)) for i in range(self.config.n_layer)]


class XQuant(LatentCache):
    """XQuant: X̂ per-token (MHA), or the SVD latents x·uk per-channel and x·uv per-token (GQA)."""
    mode = "xquant"


class XQuantCL(LatentCache):
    """XQuant-CL: the first base layers as XQuant at ≥ 4 bits; from the last of them on, each
    layer stores Q((x − Â)·ukv) per-token and the accumulator Â ← Â + Δ̂·ukvᵀ (MHA: no ukv)
    rebuilds K and V. Â is working memory for all positions (fp16; float32 when bits = 32), and
    counted in nbytes."""
    mode = "xquant-cl"

    @staticmethod
    def _token_widths(c):
        return LatentCache._token_widths(c) | {c.d_model if c.n_kv_head == c.n_head else min(c.d_model, 2 * c.kv_dim)}

    @classmethod
    def resolve(cls, c, o):
        n_base = cls.n_base_layers(c, o)
        if not 1 <= n_base <= c.n_layer:
            raise XQError(f"--base-layers {n_base} must be between 1 and {c.n_layer}")
        return super().resolve(c, o)

    @staticmethod
    def n_base_layers(c, o) -> int:
        return min(3, c.n_layer) if o.base_layers is None else int(o.base_layers)

    def _plan(self, model, log):
        c = self.config
        self.base_layers = n_base = self.n_base_layers(c, self.options)
        gqa = c.n_kv_head < c.n_head
        f = layer_factors(model, log if gqa else None)
        base_bits = max(4, self.bits)
        layers = []
        for i, F in enumerate(f):
            if gqa:
                L = self._layer(F.uk, F.uv, F.mk, F.mv, False, base_bits, with_streams=i < n_base - 1)
            else:
                L = self._layer(None, None, F.wk, F.wv, True, base_bits, with_streams=i < n_base - 1)
            if i >= n_base - 1:
                L.ukv = F.ukv if gqa else None
                if self.options.rotate:
                    L.ukv = block_hadamard(c.d_model, self._rotation_block) if L.ukv is None else L.ukv @ block_hadamard(
                        L.ukv.shape[1], self._rotation_block)
                width = c.d_model if L.ukv is None else L.ukv.shape[1]
                bits = base_bits if i == n_base - 1 else self.layer_bits(i)
                L.delta = Stream(self.n_ctx, width, bits, self.group, per_channel=False, clip=self.options.clip,
                                 sinks=self.options.sinks)
                L.seed = i == n_base - 1
                L.wk, L.wv = cpu.aligned(F.wk), cpu.aligned(F.wv)
            layers.append(L)
        self.acc = Stream(self.n_ctx, c.d_model, 32 if self.bits == 32 else 16, self.group, per_channel=False)
        self.ukv_t = [_EMPTY if L.ukv is None else cpu.aligned(L.ukv.T) for L in layers]
        return layers

    def _quantize(self, L, layer, pos0, end, lo, ek, ev, zk, zv):
        if L.delta is None:
            return super()._quantize(L, layer, pos0, end, lo, ek, ev, zk, zv)
        # the new tokens' Δ against the accumulator as it stands after the previous layer
        x = self._xn
        if not L.seed:
            x = x - self.acc.read(pos0, end)
        L.delta.write(pos0, matmul(x, L.ukv))
        self._accumulate(layer, L, end)

    def _accumulate(self, layer, L, end):
        dc, ds, dz, db, d_sink, _ = L.delta.kernel_args()
        ac, _, _, ab, _, _ = self.acc.kernel_args()
        cpu.accumulate(ac, ab, dc, ds, dz, db, L.delta.width, d_sink, self.group, self.ukv_t[layer], end, L.seed)

    def attend(self, layer, pos0, xn, q, k, v):
        self._xn = xn
        return super().attend(layer, pos0, xn, q, k, v)

    def _quantized_kv(self, layer, L, hk, hv):
        if L.delta is None:
            return super()._quantized_kv(layer, L, hk, hv)
        a = self.acc.read(0, max(hk, hv))
        return a[:hk] @ L.wk, a[:hv] @ L.wv

    def _kernel_streams(self, L):
        if L.delta is None:
            return super()._kernel_streams(L)
        return self.acc, self.acc, L.wk, L.wv

    def _keep_from(self, L, end):
        if L.delta is not None:
            return min(int(self.bound(end, False)), end)
        return super()._keep_from(L, end)

    def nbytes(self):
        return super().nbytes() + self.acc.nbytes(self.n_tokens)

    def working_nbytes(self):
        return self.acc.nbytes(self.n_tokens)


CACHE_MODES = {"fp16": FP16KV, "kivi": KIVI, "xquant": XQuant, "xquant-cl": XQuantCL}


# The cache recipe a converted GGUF carries (convert/hf_to_gguf_xq.py writes it) so that running
# the file needs no flags; arguments given explicitly override it key by key.
RECIPE_KEYS = {k: f"xquant.cache.{k}" for k in ("mode", "bits", "group", "residual", "base_layers", "value_bits",
                                                 "value_group", "layer_bits", "sinks", "rotate", "clip", "balance",
                                                 "channel_bits", "fp16_channels")}
RECIPE_TYPES = {"mode": str, "rotate": bool, "clip": bool, "channel_bits": bool, "balance": float,
                "layer_bits": tuple}  # the rest: int


def file_recipe(metadata: dict) -> dict:
    """The cache settings (RECIPE_KEYS) the GGUF records."""
    recipe = {k: metadata[key] for k, key in RECIPE_KEYS.items() if key in metadata}
    for k, v in recipe.items():
        kind = RECIPE_TYPES.get(k, int)
        if kind is str:
            ok = v in CACHE_MODES
        elif kind is bool:
            ok = isinstance(v, bool)
        elif kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 4
        elif kind is tuple:
            v = np.asarray(v).reshape(-1)
            ok = v.dtype.kind in "iu" and len(v) < 1 << 12 and all(int(b) in quant.QUANT_BITS for b in v)
            recipe[k] = tuple(int(b) for b in v) if ok else v
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 20
        if not ok:
            raise XQError(f"GGUF metadata {RECIPE_KEYS[k]} = {v!r} is not a valid cache setting")
    return recipe


def check_recipe(mode: str, config: ModelConfig, options: CacheOptions):
    """Fails with the message `make_cache` would give, without building anything."""
    if mode not in CACHE_MODES:
        raise XQError(f"unknown cache mode {mode!r} (choose from: {', '.join(CACHE_MODES)})")
    if mode != "fp16":
        CACHE_MODES[mode].resolve(config, options)


def make_cache(mode: str, model: Model, n_ctx: int, options: CacheOptions = CacheOptions(), log=None) -> Cache:
    check_recipe(mode, model.config, options)
    if mode == "fp16":
        return FP16KV(model, n_ctx, options)
    return CACHE_MODES[mode](model, n_ctx, options, log)
