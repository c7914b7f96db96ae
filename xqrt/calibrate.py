"""Calibration on a text: how a latent cache spends its bits.

Key channel weights (GQA XQuant): per layer and key latent channel c, what an error there costs
the attention scores, Σₕ Σₚ E|qₕ,ₚ|²·|mk[c, p]|² over heads h and RoPE pairs p (RoPE turns a pair but
keeps its length), times the channel's mean squared range over groups of G positions (its
quantization error is range²/(2ᵇ − 1)²/12). The runtime gives 2- and 3-bit key latents' bits to
channels by these weights (xqrt.quant.allocate_channel_bits); the converter stores them.

Per-layer bits: each layer's sensitivity is the KL divergence from the fp16-KV logits that appears when that layer
alone drops from `high` to `low` bits, everything else at `high`. Layers are then demoted in order
of least divergence until the cache fits the budget. The windows are scored as in
`decode` evaluation, so the allocation sees the quantized groups and exact tail generation sees.
"""
from __future__ import annotations

import sys

import numpy as np

from .cache import CacheOptions, XQuant
from .errors import XQError
from .perplexity import check_windows, log_softmax, windows

NARROWER = {8: 4, 4: 3, 3: 2}  # the width a layer is demoted to


def mean_kld(engine, wins, ref_logp, mode: str, **options) -> float:
    total = 0.0
    for ids, ref in zip(wins, ref_logp):
        logp = log_softmax(engine.forward(ids, engine.new_cache(mode, **options), all_logits=True)[:-1]
                           .astype(np.float64))
        total += float((np.exp(ref) * (ref - logp)).sum(-1).mean())
    return total / len(wins)


class _KeyStatistics(XQuant):
    """An unquantized XQuant cache that keeps each layer's key latents and queries' pair energies."""

    def __init__(self, model, n_ctx):
        super().__init__(model, n_ctx, CacheOptions(bits=32, sinks=0, rotate=False))
        c = self.config
        self.latents = [[] for _ in range(c.n_layer)]
        self.q_energy = np.zeros((c.n_layer, c.n_head, c.head_dim // 2))
        self.n_queries = np.zeros(c.n_layer)

    def attend(self, layer, pos0, xn, q, k, v):
        c = self.config
        self.latents[layer].append((pos0, xn @ self.layers[layer].uk))
        self.q_energy[layer] += (q.reshape(len(q), c.n_head, c.head_dim // 2, 2).astype(np.float64) ** 2).sum((0, 3))
        self.n_queries[layer] += len(q)
        return super().attend(layer, pos0, xn, q, k, v)


def key_channel_weights(engine, wins, group: int, sinks: int = 4) -> np.ndarray:
    """(n_layer, kv_dim) float32: each key latent channel's weight (module docstring), from the
    windows' complete groups of `group` positions (the first `sinks` positions left out)."""
    c = engine.config
    if c.n_kv_head == c.n_head:
        raise XQError("key channel weights are for GQA models (an MHA model's XQuant caches X per token)")
    stats = [_KeyStatistics(engine.model, len(wins[0])) for _ in wins]
    for ids, cache in zip(wins, stats):
        engine.forward(ids, cache)
    out = np.zeros((c.n_layer, c.kv_dim), np.float32)
    for i in range(c.n_layer):
        ranges = []
        for cache in stats:
            z = np.concatenate([zk for _, zk in sorted(cache.latents[i], key=lambda p: p[0])])
            for g0 in range(0, len(z) - group + 1, group):
                block = z[max(g0, sinks):g0 + group]
                ranges.append(block.max(0) - block.min(0))
        if not ranges:
            raise XQError(f"the calibration windows hold no complete group of {group} positions")
        range2 = (np.asarray(ranges, np.float64) ** 2).mean(0)
        q_energy = sum(s.q_energy[i] for s in stats) / sum(s.n_queries[i] for s in stats)  # head × pair
        mk = stats[0].layers[i].mk.reshape(c.kv_dim, c.n_kv_head, c.head_dim // 2, 2).astype(np.float64)
        pair = (mk ** 2).sum(-1)  # channel × kv head × pair
        heads = np.arange(c.n_head) // (c.n_head // c.n_kv_head)
        cost = np.einsum("hp,chp->c", q_energy, pair[:, heads])
        out[i] = cost * range2
    return out


def allocate_bits(engine, wins, mode: str, budget: float, high: int = 3, low: int = 2, progress=True,
                  **options) -> tuple[tuple[int, ...], list[float]]:
    """(bits per layer, sensitivity per layer) for a cache of at most `budget` bytes per token
    (measured on the calibration windows, everything the cache holds counted)."""
    c = engine.config
    ref_logp = [log_softmax(engine.logits(ids, "fp16")[:-1].astype(np.float64)) for ids in wins]

    def size(layer_bits):  # what the cache holds after a window (nothing needs to run for that)
        cache = engine.new_cache(mode, layer_bits=layer_bits, **options)
        cache.n_tokens = len(wins[0])
        return cache.bytes_per_token()

    bits = [high] * c.n_layer
    if size(tuple(bits)) <= budget:
        return tuple(bits), []
    if size(tuple([low] * c.n_layer)) > budget:
        raise XQError(f"{budget:.0f} B/token is below what {low} bits in every layer take")
    base = mean_kld(engine, wins, ref_logp, mode, layer_bits=tuple(bits), **options)
    sensitivity = []
    for i in range(c.n_layer):
        trial = list(bits)
        trial[i] = low
        sensitivity.append(mean_kld(engine, wins, ref_logp, mode, layer_bits=tuple(trial), **options) - base)
        if progress:
            print(f"  layer {i}: KLD +{sensitivity[-1]:.5f} at {low} bits", file=sys.stderr, flush=True)
    for i in np.argsort(sensitivity, kind="stable"):
        if size(tuple(bits)) <= budget:
            break
        bits[i] = low
    return tuple(bits), sensitivity


def check_args(ratio: float, n_windows: int, ctx: int) -> None:
    """The flags' ranges, before a model is loaded."""
    if not ratio > 1:
        raise XQError(f"--ratio {ratio} must be above 1 (times smaller than fp16 KV)")
    if n_windows < 1:
        raise XQError(f"calibration needs at least one window, not {n_windows}")
    check_windows(ctx, None)


def calibrate(engine, text: str, ratio: float, n_windows: int = 2, ctx: int = 1024, from_end: bool = False,
              high: int | None = None, low: int | None = None, progress=True) -> tuple[int, ...]:
    """Bits per layer that make the engine's latent cache `ratio`× smaller than fp16 KV, measured
    on windows of `text` (high: the recipe's bits; low: the next narrower width)."""
    check_args(ratio, n_windows, ctx)
    mode = engine.cache_mode if engine.cache_mode != "fp16" else "xquant"
    high = engine.cache_options.bits if high is None else high
    low = NARROWER.get(high) if low is None else low
    if low is None or low >= high:
        raise XQError(f"no narrower width to calibrate {high}-bit layers down to (2 bits is the narrowest)")
    wins = windows(engine.tokenizer.encode(text), ctx, None)
    if len(wins) < n_windows:
        raise XQError(f"the calibration text holds {len(wins)} window(s) of {ctx} tokens, fewer than {n_windows}")
    wins = wins[-n_windows:] if from_end else wins[:n_windows]
    options = {k: v for k, v in vars(engine.cache_options).items() if k not in ("bits", "layer_bits")}
    bits, _ = allocate_bits(engine, wins, mode, engine.fp16_bytes_per_token() / ratio, high, low, progress, **options)
    return bits


def build_parser():
    import argparse

    from .run import add_cache_args, add_compute_args
    ap = argparse.ArgumentParser(prog="python -m xqrt.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    ap.add_argument("-f", "--file", required=True, help="calibration text (keep it apart from evaluation text)")
    ap.add_argument("--from-end", action="store_true", help="take the windows from the end of the file")
    ap.add_argument("-c", "--ctx", type=int, default=1024, help="window length in tokens")
    ap.add_argument("--windows", type=int, default=2, help="calibration windows")
    ap.add_argument("--ratio", type=float, required=True, help="the cache must be this many times smaller than fp16 KV")
    ap.add_argument("--high", type=int, default=None, help="bits of the layers that keep more (default: --bits)")
    ap.add_argument("--low", type=int, default=None, help="bits of the demoted layers (default: the next narrower)")
    add_compute_args(ap)
    add_cache_args(ap)
    return ap


def main(argv=None) -> int:
    from .errors import cli_exit_code
    args = build_parser().parse_args(argv)

    def run() -> int:
        from .run import engine_from_args
        check_args(args.ratio, args.windows, args.ctx)
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
        engine = engine_from_args(args, args.ctx)
        bits = calibrate(engine, text, args.ratio, args.windows, args.ctx, args.from_end, args.high, args.low)
        print(f"--layer-bits {','.join(map(str, bits))}")
        return 0
    return cli_exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
