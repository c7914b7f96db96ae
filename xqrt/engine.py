"""The embedding API: load a GGUF, run prefill / decode over a `Cache`, stream generated text.

    from xqrt import Engine
    eng = Engine("model.gguf", cache="fp16")
    for piece in eng.generate("Once upon a time", max_tokens=32, temperature=0):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Iterator

import numba
import numpy as np

from .cache import FP16KV, Cache, CacheOptions, file_recipe, make_cache, versus_fp16
from .errors import XQError
from .factors import stderr_log
from .gguf_model import Model, QMatrix, load_model
from .gpu import REBUILDS, DeviceCache, GpuStep, device_memory, new_device_cache, pick_device, unsupported
from .kernels import cpu
from .sampler import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    cache_bytes: int = 0
    cache_tokens: int = 0
    context_full: bool = False  # generation stopped because the cache reached the context size

    def summary(self, cache_mode: str, fp16_bytes_per_token: float) -> str:
        pp = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        tg = self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0
        per_tok = self.cache_bytes / max(self.cache_tokens, 1)
        ratio = fp16_bytes_per_token / per_tok if per_tok else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {pp:.1f} tok/s | generation: {self.generated_tokens} tokens, "
                f"{tg:.1f} tok/s | cache {cache_mode}: {self.cache_bytes} bytes for {self.cache_tokens} tokens "
                f"({per_tok:.0f} B/token, {versus_fp16(ratio)})")


_DECODE_MAX = 8  # prompts up to this many tokens go through the decode step, token by token


def kernels_compiled(device: str, cache_mode: str) -> bool:
    """Whether Numba's disk cache already holds kernels of this device's step for this cache mode
    (so start-up is fast), by the index files of a few of them."""
    try:
        if device == "cuda":
            from .kernels import cuda as kc
            kernels = (kc.rmsnorm, kc.quantize_x, kc.store_kv if cache_mode == "fp16" else kc.scores_latent)
        elif cache_mode == "fp16":
            kernels = (cpu.decode_fp16, cpu.attn_in, cpu.attn_out_ffn)
        else:
            kernels = (cpu.attn_in, cpu.attn_out_ffn, cpu.attend_latent, cpu.latent_step)
        return all(os.path.exists(k._cache._cache_file._index_path) for k in kernels)
    except AttributeError:  # a Numba without these internals, or the simulator: say nothing wrong
        return False


class Engine:
    def __init__(self, model: str | Model, ctx: int | None = None, cache: str | None = None, bits: int | None = None,
                 group: int | None = None, residual: int | None = None, base_layers: int | None = None,
                 value_bits: int | None = None, value_group: int | None = None,
                 layer_bits: tuple[int, ...] | None = None, sinks: int | None = None, rotate: bool | None = None,
                 clip: bool | None = None, balance: float | None = None, channel_bits: bool | None = None,
                 fp16_channels: int | None = None,
                 kv_budget: int = 0, device: str = "cpu", rebuild: str = "fused", cuda_graphs: bool | None = None,
                 threads: int | None = None, batch: int = 512, act_bits: int = 8, verbose: bool = False):
        """Cache settings left as None come from the GGUF's recipe when it has one (converted files
        do), else: fp16 KV; bits 4, and the rest as `CacheOptions` chooses (its fields say what
        value_bits, value_group, layer_bits, sinks, rotate, clip, balance, channel_bits and
        fp16_channels do).
        kv_budget: bytes of fp16 K/V for the most recent tokens, which a latent cache then reads
        without rematerializing (0: none; fp16 KV's own bytes per token × n: the last n tokens).

        device: "cpu", "cuda" (xqrt.gpu; every cache mode, some options CPU-only) or "auto" (CUDA
        when numba-cuda finds a GPU and the cache runs there). rebuild: on the GPU, how a latent cache
        rebuilds K and V — "fused" (Numba kernels, in shared memory) or "cublas" (the product on
        tensor cores through torch; needs a CUDA build of torch). cuda_graphs: on the GPU, replay the
        decode step as one CUDA graph (torch's capture) — True, False, or None: where torch finds
        the GPU.

        act_bits: the decode step multiplies quantized weights by activations rounded to integer
        codes per block of 32: 8 as llama.cpp does (fastest; products within ~1e-3 of float), or
        16 (about 1.3× slower matrix products, within ~1e-5: greedy text follows a float reference
        through near-ties). The output head takes 16-bit codes either way."""
        if act_bits not in (8, 16):
            raise XQError(f"act_bits must be 8 or 16, not {act_bits}")
        self.model = model if isinstance(model, Model) else load_model(str(model))
        self.config = c = self.model.config
        self.tokenizer = Tokenizer(self.model.metadata)
        self.n_ctx = int(min(c.ctx_train, 4096) if ctx is None else ctx)
        if self.n_ctx <= 0:
            raise XQError(f"context size {self.n_ctx} must be positive")
        given = dict(mode=cache, bits=bits, group=group, residual=residual, base_layers=base_layers,
                     value_bits=value_bits, value_group=value_group,
                     layer_bits=None if layer_bits is None else tuple(layer_bits), sinks=sinks, rotate=rotate,
                     clip=clip, balance=balance, channel_bits=channel_bits, fp16_channels=fp16_channels)
        recipe = file_recipe(self.model.metadata)
        chosen = {k: recipe.get(k) if v is None else v for k, v in given.items()}
        self.cache_mode = chosen.pop("mode") or "fp16"
        unset = {k for k, v in chosen.items() if v is None}  # CacheOptions' own defaults
        self.cache_options = CacheOptions(kv_budget=int(kv_budget),
                                          **{k: v for k, v in chosen.items() if k not in unset})
        self._log = stderr_log if verbose else None
        if self.n_ctx > c.ctx_train and self._log:
            self._log(f"xqrt: warning: a context of {self.n_ctx} tokens is past the {c.ctx_train} the model was trained on")
        self.device = pick_device(device, self.cache_mode, c, self.cache_options,
                                  stderr_log if verbose and device == "auto" else None)
        if rebuild not in REBUILDS:
            raise XQError(f"unknown rebuild {rebuild!r} (one of {', '.join(REBUILDS)})")
        if rebuild != "fused" and device == "cpu":
            raise XQError(f"--rebuild {rebuild} is a GPU setting (--device cuda)")
        if cuda_graphs and device == "cpu":
            raise XQError("--cuda-graphs is a GPU setting (--device cuda)")
        if verbose and not kernels_compiled(self.device, self.cache_mode):
            print("xqrt: compiling kernels (first run only, about a minute)...", file=sys.stderr, flush=True)
        self._gpu = None
        if self.device == "cuda":
            with device_memory("the model's weights"):
                self._gpu = GpuStep(self.model, self.n_ctx, act_bits, rebuild, cuda_graphs, self._log)
        self.batch = max(1, int(batch))
        if threads:
            numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        self.cache = self.new_cache()  # the session cache `generate` reuses across calls
        self._cached_ids: list[int] = []  # the tokens self.cache holds
        self.stats = Stats()
        d = c.d_model
        # Decode scratch, allocated once: the token loop allocates nothing per layer.
        self._x = np.zeros(d, np.float32)
        self._xn = np.zeros(d, np.float32)
        self._q = np.zeros(c.q_dim, np.float32)
        self._k = np.zeros(c.kv_dim, np.float32)
        self._v = np.zeros(c.kv_dim, np.float32)
        self._act = cpu.new_act(d, act_bits)  # activation codes for the block products, one per input width
        self._act_attn = cpu.new_act(c.q_dim, act_bits)
        self._act_ff = cpu.new_act(c.n_ff, act_bits)
        # The output head takes 16-bit codes whatever act_bits says: int8 there moved the logits by
        # up to 0.25 on SmolLM2 and flipped near-ties in the first token of a reply, for 1% of a step.
        self._act_head = cpu.new_act(d, 16)
        self._proj = np.zeros(d, np.float32)
        self._gate = np.zeros(c.n_ff, np.float32)
        self._up = np.zeros(c.n_ff, np.float32)
        self._hidden = np.zeros(c.n_ff, np.float32)
        self._logits = np.zeros(c.vocab_size, np.float32)
        self._dense_scratch = np.zeros(0, np.float32)
        self._attn = np.zeros(c.q_dim, np.float32)
        self._k_rot = np.zeros(c.kv_dim, np.float32)
        # The fused fp16-KV step reads every layer's matrices from one typed list.
        self._mats = numba.typed.List.empty_list(numba.types.Array(numba.types.uint8, 2, "C", readonly=True))
        for L in self.model.layers:
            for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down):
                view = w.data.view()
                view.flags.writeable = False
                self._mats.append(view)
        self._qtypes = np.array([[w.qtype for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)]
                                 for L in self.model.layers], np.int64)
        self._norms = np.stack([np.stack([L.attn_norm, L.ffn_norm]) for L in self.model.layers]).astype(np.float32)

    # ---- forward ----------------------------------------------------------------------------
    def new_cache(self, mode: str | None = None, **options) -> Cache:
        """A fresh cache; `options` override this engine's CacheOptions (bits, group, residual,
        base_layers, simulated)."""
        opts = replace(self.cache_options, **options)
        if self._gpu is not None:
            why_not = unsupported(mode or self.cache_mode, self.config, opts)
            if why_not:
                raise XQError(f"this engine runs on the GPU, where {why_not}")
            with device_memory(f"a cache of {self.n_ctx} tokens"):
                return new_device_cache(mode or self.cache_mode, self.model, self.n_ctx, opts, self._log)
        try:
            return make_cache(mode or self.cache_mode, self.model, self.n_ctx, opts, self._log)
        except MemoryError as e:  # NumPy's, for a context too long for this machine
            raise XQError(f"no memory for a cache of {self.n_ctx} tokens ({e}): a smaller --ctx") from None

    def _dense(self, m: QMatrix) -> np.ndarray:
        """W as float32 (rows × cols) in a reused buffer: prefill reuses each weight across tokens."""
        size = m.n_rows * m.n_cols
        if self._dense_scratch.size < size:
            self._dense_scratch = np.empty(size, np.float32)
        w = self._dense_scratch[:size].reshape(m.n_rows, m.n_cols)
        cpu.dequantize(m.data, m.qtype, w)
        return w

    def _matmul(self, x: np.ndarray, m: QMatrix) -> np.ndarray:
        return x @ self._dense(m).T

    def _decode(self, token: int, pos: int, cache: Cache) -> np.ndarray:
        c, m = self.config, self.model
        if self._gpu is not None:
            logits = self._gpu(token, pos, cache)
            cache.advance(1)
            return logits
        x, xn, q, k, v = self._x, self._xn, self._q, self._k, self._v
        if isinstance(cache, FP16KV):
            cpu.decode_fp16(token, pos, m.tok_embd.data, m.tok_embd.qtype, self._mats, self._qtypes, self._norms,
                            m.out_norm, m.output.data, m.output.qtype, m.rope_freqs, c.n_head, c.n_kv_head,
                            c.head_dim, c.norm_eps, cache.k, cache.v, cache.scores,
                            (x, xn, q, k, v, self._k_rot, self._proj, self._gate, self._up, self._hidden, self._attn),
                            (self._act, self._act_attn, self._act_ff, self._act_head), self._logits)
            cache.advance(1)
            return self._logits
        cpu.dequantize_row(m.tok_embd.data, m.tok_embd.qtype, token, x)
        for i, L in enumerate(m.layers):
            cpu.attn_in(x, L.attn_norm, c.norm_eps, L.wq.data, L.wq.qtype, L.wk.data, L.wk.qtype, L.wv.data,
                        L.wv.qtype, pos, m.rope_freqs, c.n_head, c.n_kv_head, c.head_dim, xn, self._act, q, k, v)
            attn = cache.attend(i, pos, xn[None], q[None], k[None], v[None])
            cpu.attn_out_ffn(x, attn[0], L.wo.data, L.wo.qtype, L.ffn_norm, c.norm_eps, L.w_gate.data,
                             L.w_gate.qtype, L.w_up.data, L.w_up.qtype, L.w_down.data, L.w_down.qtype, xn,
                             self._act, self._act_attn, self._act_ff, self._proj, self._gate, self._up,
                             self._hidden)
        cache.advance(1)
        cpu.lm_head(x, m.out_norm, c.norm_eps, m.output.data, m.output.qtype, xn, self._act_head, self._logits)
        return self._logits

    def _prefill(self, tokens: np.ndarray, pos0: int, cache: Cache, all_logits: bool) -> np.ndarray:
        c, m = self.config, self.model
        n = len(tokens)
        if self._gpu is not None:
            with device_memory(f"a prompt of {n} tokens"):
                logits = self._gpu.prefill(tokens, pos0, cache, all_logits)
            cache.advance(n)
            return logits
        x = np.empty((n, c.d_model), np.float32)
        for t, tok in enumerate(tokens):
            cpu.dequantize_row(m.tok_embd.data, m.tok_embd.qtype, int(tok), x[t])
        xn = np.empty_like(x)
        for i, L in enumerate(m.layers):
            cpu.rmsnorm_rows(x, L.attn_norm, c.norm_eps, xn)
            q = self._matmul(xn, L.wq)
            k = self._matmul(xn, L.wk)
            v = self._matmul(xn, L.wv)
            cpu.rope_rows(q, c.n_head, c.head_dim, pos0, m.rope_freqs)
            attn = cache.attend(i, pos0, xn, q, k, v)
            x += self._matmul(attn, L.wo)
            cpu.rmsnorm_rows(x, L.ffn_norm, c.norm_eps, xn)
            gate = self._matmul(xn, L.w_gate)
            cpu.silu_mul_rows(gate, self._matmul(xn, L.w_up), gate)
            x += self._matmul(gate, L.w_down)
        cache.advance(n)
        if not all_logits:
            cpu.lm_head(x[-1], m.out_norm, c.norm_eps, m.output.data, m.output.qtype, self._xn, self._act_head,
                        self._logits)
            return self._logits[None].copy()
        cpu.rmsnorm_rows(x, m.out_norm, c.norm_eps, xn)
        logits = np.empty((n, c.vocab_size), np.float32)
        # The output matrix is the largest: dequantize it a slice of the vocabulary at a time.
        step = 8192
        buf = np.empty((min(step, c.vocab_size), c.d_model), np.float32)
        for r0 in range(0, c.vocab_size, step):
            w = buf[:min(step, c.vocab_size - r0)]
            cpu.dequantize(m.output.data[r0:r0 + len(w)], m.output.qtype, w)
            logits[:, r0:r0 + len(w)] = xn @ w.T
        return logits

    def forward(self, tokens, cache: Cache, all_logits: bool = False) -> np.ndarray:
        """Append `tokens` to `cache`; logits of the last token (vocab,), or of all (n, vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise XQError("no tokens to process")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise XQError(f"token id out of range [0, {self.config.vocab_size})")
        if isinstance(cache, DeviceCache) != (self._gpu is not None):
            where = "the GPU" if self._gpu is not None else "the CPU"
            raise XQError(f"this engine runs on {where} and this cache does not (make it with engine.new_cache())")
        pos0 = cache.n_tokens
        cache.check_room(pos0, len(tokens))
        if len(tokens) <= _DECODE_MAX:  # a batch dequantizes every weight: not worth it for a few tokens
            steps = [self._decode(int(t), pos0 + i, cache).copy() for i, t in enumerate(tokens)]
            return np.stack(steps) if all_logits else steps[-1]
        chunks = []
        for s in range(0, len(tokens), self.batch):
            part = tokens[s:s + self.batch]
            last = s + self.batch >= len(tokens)
            out = self._prefill(part, cache.n_tokens, cache, all_logits)
            if all_logits:
                chunks.append(out)
            elif last:
                return out[-1]
        return np.concatenate(chunks)

    def warmup(self) -> None:
        """One decode step on the session cache, then forgotten, as llama.cpp does at start-up: the
        first step loads the compiled kernels and faults in the weights' pages, which would
        otherwise count against the first prompt's tokens/s."""
        self.forward([int(self.tokenizer.bos_id or 0)], self.cache)
        self.cache.truncate(0)
        self._cached_ids = []

    def logits(self, tokens, cache_mode: str | None = None, **options) -> np.ndarray:
        """Logits for every position of `tokens`, on a fresh cache: (n, vocab)."""
        return self.forward(tokens, self.new_cache(cache_mode, **options), all_logits=True)

    # ---- generation ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            text = self.tokenizer.apply_chat_template(prompt)
            return self.tokenizer.encode(text)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return [int(t) for t in prompt]
        if chat:
            return self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        return self.tokenizer.encode(prompt)

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, stop: tuple[str, ...] | list[str] = (), chat: bool = False) -> Iterator[str]:
        """Stream generated text. `prompt`: text, token ids, or chat messages [{role, content}].
        max_tokens < 0: until the end of text or a full context (stats.context_full says which).

        The session cache keeps the longest prefix this prompt shares with what it already holds
        (as llama.cpp's server does), so a chat that re-sends its history only processes the new turn.
        """
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed))
        ids = self.encode_prompt(prompt, chat)
        if not ids:
            raise XQError("empty prompt")
        if len(ids) >= self.n_ctx:
            raise XQError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx} tokens (raise --ctx)")
        cache = self.cache
        shared = 0
        for a, b in zip(self._cached_ids, ids[:-1]):
            if a != b:
                break
            shared += 1
        shared = cache.truncate(shared)
        self._cached_ids = list(ids)
        self.stats = st = Stats()
        t0 = time.perf_counter()
        logits = self.forward(ids[shared:], cache)
        st.prompt_tokens, st.prompt_seconds = len(ids) - shared, time.perf_counter() - t0
        out_ids, emitted, stopped = [], "", False
        stop = [s for s in stop if s]
        t0 = time.perf_counter()
        try:
            while max_tokens < 0 or len(out_ids) < max_tokens:
                if not np.isfinite(logits).all():  # broken weights or an fp16 overflow: say so, not sample noise
                    raise XQError(f"the model's logits at position {cache.n_tokens - 1} are not finite (NaN or inf): "
                                  "its weights are broken or overflow")
                tok = sampler(logits, self._cached_ids)
                if tok in self.tokenizer.end_ids:
                    break
                out_ids.append(tok)
                text = self.tokenizer.decode(out_ids, skip_special=True)
                hit = min((text.find(s) for s in stop if s in text), default=-1)
                if hit >= 0:
                    if hit > len(emitted):
                        yield text[len(emitted):hit]
                    stopped = True
                    break
                # Hold back an incomplete UTF-8 character and any tail that could start a stop string.
                safe = len(text) - (1 if text.endswith("\ufffd") else 0)
                for s in stop:
                    for j in range(min(len(s) - 1, safe), 0, -1):
                        if text[:safe].endswith(s[:j]):
                            safe -= j
                            break
                if safe > len(emitted):
                    yield text[len(emitted):safe]
                    emitted = text[:safe]
                self._cached_ids.append(tok)
                if len(out_ids) == max_tokens:  # as llama.cpp: the last token is not run (its logits go unused)
                    break
                if cache.n_tokens == self.n_ctx:
                    st.context_full = True
                    break
                logits = self.forward([tok], cache)
            if not stopped:
                text = self.tokenizer.decode(out_ids, skip_special=True)
                if len(text) > len(emitted):
                    yield text[len(emitted):]
        finally:
            del self._cached_ids[cache.n_tokens:]
            st.generated_tokens, st.generate_seconds = len(out_ids), time.perf_counter() - t0
            st.cache_bytes, st.cache_tokens = cache.nbytes(), cache.n_tokens

    def fp16_bytes_per_token(self) -> int:
        return FP16KV.bytes_per_position(self.config)
