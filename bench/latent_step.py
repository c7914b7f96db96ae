"""Where a latent cache's decode step goes at short context: memory or arithmetic.

    python bench/latent_step.py [MODEL.gguf] [--ctx 128] [--steps 40] [--modes fp16 xquant:3 kivi:4]

Per mode, in one run: the decode step's time with the cache filled to --ctx, and how much of it each
compiled kernel the step calls takes (fp16 KV: one call for the whole step; a latent cache: per
layer attn_in, latent_step, attn_out_ffn, then lm_head). Then one middle layer's latent_step call
timed alone: back to back (its factors and cache in the CPU's caches); after both cores sweep 64
MB (its data cold, as a layer finds it after the other layers' weights, the thread pool awake);
and after one thread sweeps them (the pool asleep as well); next to the bytes of the layer's
float32 factors; and its key rebuild product alone on one thread, in GFLOP/s, under the one-core
fp32 FMA peak printed first (at simd.WIDE lanes, as the product's tiles). Run it on an otherwise
idle machine.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xqrt import Engine  # noqa: E402  (first: it sets thread-spin defaults before numpy loads)
from xqrt.kernels import cpu, simd  # noqa: E402
from xqrt.default_model import default_model_path  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")


@njit(parallel=True)
def parallel_sum(a):
    total = 0.0
    for i in prange(a.shape[0]):
        total += a[i]
    return total


@njit
def _fma_chains(m, n):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = simd.wide_zero()
    x = np.float32(0.999)
    for _ in range(n):
        a0, a1, a2 = simd.fma_wide(a0, x, m, 0), simd.fma_wide(a1, x, m, 0), simd.fma_wide(a2, x, m, 0)
        a3, a4, a5 = simd.fma_wide(a3, x, m, 0), simd.fma_wide(a4, x, m, 0), simd.fma_wide(a5, x, m, 0)
        a6, a7, a8 = simd.fma_wide(a6, x, m, 0), simd.fma_wide(a7, x, m, 0), simd.fma_wide(a8, x, m, 0)
        a9, a10, a11 = simd.fma_wide(a9, x, m, 0), simd.fma_wide(a10, x, m, 0), simd.fma_wide(a11, x, m, 0)
    out = np.empty(12 * simd.WIDE, np.float32)  # stored, so that no chain is dead code
    for i, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11)):
        simd.wide_store(a, out, i * simd.WIDE)
    return out.sum()


def fma_peak() -> float:
    """GFLOP/s of twelve independent vector FMA chains on one core: the ceiling of rebuild's tiles."""
    m = np.ones(simd.WIDE, np.float32)
    _fma_chains(m, 10)
    n = 2_000_000
    best = np.inf
    for _ in range(5):
        t = time.perf_counter()
        _fma_chains(m, n)
        best = min(best, time.perf_counter() - t)
    return 2 * 12 * simd.WIDE * n / best / 1e9


def rebuild_gflops(n: int, m: np.ndarray) -> float:
    lat = np.random.default_rng(0).standard_normal((n, m.shape[0])).astype(np.float32)
    out = np.empty((n, m.shape[1]), np.float32)
    cpu.rebuild(lat, n, m, out)
    best = min(_timed(lambda: cpu.rebuild(lat, n, m, out)) for _ in range(50))
    return 2 * n * m.shape[0] * m.shape[1] / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def percentiles_us(times) -> str:
    return f"p10 {1e6 * np.percentile(times, 10):.0f} µs, median {1e6 * np.median(times):.0f} µs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["fp16", "xquant:3", "kivi:4"])
    args = ap.parse_args()
    text = open(TEXT if os.path.exists(TEXT) else os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    kernels = {name: getattr(cpu, name)
               for name in ("decode_fp16", "attn_in", "latent_step", "attn_out_ffn", "lm_head")}
    latent_step, calls, spent = cpu.latent_step, [], {}

    def timed(name, kernel):
        def call(*kernel_args):
            t = time.perf_counter()
            kernel(*kernel_args)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            if kernel is latent_step:
                calls.append(kernel_args)
        return call
    peak = fma_peak()
    print(f"fp32 FMA peak of one core at {simd.WIDE} lanes: {peak:.0f} GFLOP/s (one kernel, twelve chains)", flush=True)
    sweep = np.ones(16 << 20, np.float32)  # 64 MB: more than this machine's L2, the layers' data in between
    parallel_sum(sweep)
    for spec in args.modes:
        mode, _, bits = spec.partition(":")
        eng = Engine(args.model or default_model_path(), ctx=args.ctx + args.steps + 2, cache=mode,
                     bits=int(bits) if bits else None)
        ids = eng.tokenizer.encode(text[:args.ctx * 8])[:args.ctx]
        cache = eng.new_cache()
        eng.forward(ids, cache)
        # Untimed, with the kernels as they are: one that calls another compiles against cpu's globals.
        eng.forward(ids[-1:], cache)
        steps = []
        spent.clear()
        for name, kernel in kernels.items():
            setattr(cpu, name, timed(name, kernel))
        try:
            for _ in range(args.steps):
                t = time.perf_counter()
                eng.forward(ids[-1:], cache)
                steps.append(time.perf_counter() - t)
        finally:
            for name, kernel in kernels.items():
                setattr(cpu, name, kernel)
        per_kernel = ", ".join(f"{name} {1e3 * total / args.steps:.2f}" for name, total in spent.items())
        print(f"{spec}: decode step at {args.ctx} tokens {1e3 * np.median(steps):.2f} ms (median of {args.steps}); "
              f"ms per step in {per_kernel}", flush=True)
        if not calls:
            continue
        layer = calls[len(calls) // 2]  # a middle layer's arguments; a replay rewrites the same slot
        calls.clear()
        cold = {}
        for name, before in (("back to back", lambda: None),
                             ("after a 64 MB sweep by both cores", lambda: parallel_sum(sweep)),
                             ("after a 64 MB sweep by one", lambda: sweep.sum())):
            times = []
            for _ in range(100):
                before()
                t = time.perf_counter()
                latent_step(*layer)
                times.append(time.perf_counter() - t)
            cold[name] = percentiles_us(times)
        named = dict(zip(inspect.signature(latent_step.py_func).parameters, layer))
        factor_bytes = sum(named[name].nbytes for name in ("uk", "uv", "mk", "mv"))
        print(f"  one layer's latent_step ({factor_bytes / 1e6:.2f} MB of float32 factors): "
              + "; ".join(f"{name} {value}" for name, value in cold.items()), flush=True)
        mk = named["mk"]
        if mk.shape[0]:
            print(f"  its key rebuild alone, one thread: {rebuild_gflops(args.ctx, mk):.0f} GFLOP/s "
                  f"({args.ctx} × {mk.shape[0]} latents · {mk.shape[0]} × {mk.shape[1]})", flush=True)


if __name__ == "__main__":
    main()
