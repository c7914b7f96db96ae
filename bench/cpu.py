"""CPU speed, side by side in one run: xqrt's cache modes, llama.cpp and transformers on one GGUF.

    python bench/cpu.py [MODEL.gguf] [--threads 2] [--contexts 128 1024 4096 8192] [--gen-tokens 16]
                        [--modes fp16 kivi:4 kivi:2 xquant:4 xquant:3 xquant:2 xquant-cl:3 xquant-cl:2]
                        [--devices cpu cuda cuda-launched cuda-cublas cuda-cublas-launched]
                        [--prompt-tokens 512] [--ctx N]
                        [--budget-curve xquant:3] [--budget-fractions 0 0.125 0.25 0.5 1]
                        [--llama-cpp f16 q8_0 q4_0] [--no-transformers] [--out docs/performance.md]

Measured per engine: prompt processing (a --prompt-tokens prompt, 512, on an empty cache), generation tokens/s
with the cache filled to each context (WikiText-2 text, then --gen-tokens greedy steps), cache bytes
per token, and peak resident memory. Each engine runs in a child process of its own, one after the
other, so memory is its own and no engine's threads compete with another's; run it on an otherwise
idle machine. The compute yardstick is NumPy's float32 matmul (its BLAS, same thread count).

llama.cpp runs through llama-cpp-python (`--llama-cpp TYPES`, its KV cache types; quantized V
needs flash attention, which is then on for every type). Install it from source so it is built
for this CPU: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python.
transformers runs the same GGUF dequantized to float32, its only way to read it.

--devices runs each xqrt mode on each device: `cpu`, `cuda` (the engine's GPU step, replayed as
one CUDA graph where torch finds the GPU) and `cuda-launched` (--no-cuda-graphs:
every kernel launched from Python) — what the graph saves, side by side; `cuda-cublas` and
`cuda-cublas-launched` the same with --rebuild cublas (latent modes only). The other engines run on
the CPU. A device's first steps (kernel compilation, a graph's capture) are not timed: each context
takes one untimed step before its timed ones. --ctx sets xqrt's context (default: the
largest of --contexts and the prompt, plus the generated tokens): a short context in a long one
is the case where a GPU step's grids, sized for the positions it reaches, save launched blocks.

Ratios: prompt and generation speeds against llama.cpp with an f16 KV cache when it ran, else
against xqrt's fp16 KV. Rematerialization: the FLOPs a step spends rebuilding K (and, for
XQuant-CL, the accumulator) from the cache, divided by the step time it adds over fp16 KV and by
the step time added from one context to the next, next to the matmul yardstick. The --kv-budget curve: one latent mode at the largest context with fp16
windows of each fraction of the context (budget = fraction × context × fp16 bytes per token), generation
speed against cache bytes per token. Writes the tables and plots (tokens/s against context; the
budget curve) to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
BASE_ENV = dict(os.environ)  # before xqrt's import sets its thread-spin defaults: those are for its child only
KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per K or V element, llama.cpp's types


def text_tokens(tokenize, n: int) -> list[int]:
    """n tokens of WikiText-2, or of this repository's README where the data is not there (a lent
    GPU's copy of the checkout has no ../shared): speed does not depend on the text."""
    text = open(TEXT if os.path.exists(TEXT) else os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ids = tokenize(text[:n * 8])
    while len(ids) < n:  # the file is long enough for any sensible context; repeat if not
        ids = ids + ids
    return ids[:n]


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- one engine per child process ------------------------------------------------------------------
def run_xqrt(spec: dict) -> dict:
    from xqrt import Engine  # noqa: I001 first: it sets thread-spin defaults that numpy's BLAS reads when it loads
    import numpy as np
    mode, bits = spec["mode"], spec["bits"]
    contexts, n_gen, n_pp = spec["contexts"], spec["gen_tokens"], spec["prompt_tokens"]
    device = spec.get("device", "cpu")
    on_gpu = dict(rebuild="cublas" if "cublas" in device else "fused",
                  cuda_graphs=False if device.endswith("launched") else None) if device != "cpu" else {}
    eng = Engine(spec["model"], ctx=max(spec.get("ctx") or 0, max(max(contexts), n_pp, 66) + n_gen + 9), cache=mode,
                 bits=bits, kv_budget=spec.get("kv_budget", 0), threads=spec["threads"], device=device.split("-")[0],
                 **on_gpu)
    ids = text_tokens(lambda s: eng.tokenizer.encode(s, add_bos=False), max(max(contexts), 66) + n_pp)
    warm = eng.new_cache()  # load the compiled prefill and decode kernels, compute factors: untimed
    eng.forward(ids[:64], warm)
    eng.forward(ids[64:66], warm)
    cache = eng.new_cache()
    t0 = time.perf_counter()
    eng.forward(ids[:n_pp], cache)
    pp = n_pp / (time.perf_counter() - t0)
    cache, tg, step = eng.new_cache(), {}, {}
    for c in contexts:
        logits = eng.forward(ids[cache.n_tokens:c], cache)
        logits = eng.forward([int(np.argmax(logits))], cache)  # untimed: a new cache's graph is captured here
        t0 = time.perf_counter()
        for _ in range(n_gen):
            logits = eng.forward([int(np.argmax(logits))], cache)
        dt = time.perf_counter() - t0
        tg[c], step[c] = n_gen / dt, dt / n_gen
    name = "xqrt fp16 KV" if mode == "fp16" else f"xqrt {mode} {bits}-bit"
    if getattr(cache, "window", 0):
        name += f" + fp16 window {cache.window}"
    if device != "cpu":
        name += " on cuda" + (", tensor-core rebuild" if "cublas" in device else "") + \
            (", launched" if device.endswith("launched") else "")
    return {"name": name, "device": device, "pp": pp, "tg": tg,
            "step_s": step, "bytes_per_token": cache.nbytes() / cache.n_tokens, "describe": cache.describe(),
            "remat_flops_per_token": remat_flops_per_position(cache)}


def remat_flops_per_position(cache) -> float:
    """FLOPs a decode step spends per cached position rebuilding keys (latent × fused matrix; for
    XQuant-CL the accumulator Â·Wk and its update Δ̂·Ukvᵀ); values are summed in latent space."""
    c = cache.config
    if cache.mode in ("fp16", "kivi"):
        return 0.0
    gqa = c.n_kv_head < c.n_head
    xquant_layer = 2.0 * (c.kv_dim if gqa else c.d_model) * c.kv_dim
    if cache.mode == "xquant":
        return xquant_layer * c.n_layer
    n_plain = cache.base_layers - 1  # the seed layer and all after it read the accumulator
    update = 2.0 * min(c.d_model, 2 * c.kv_dim) * c.d_model if gqa else 0.0
    return xquant_layer * n_plain + (2.0 * c.d_model * c.kv_dim + update) * (c.n_layer - n_plain)


def run_llama_cpp(spec: dict) -> dict:
    from llama_cpp import Llama
    kv = spec["kv_type"]
    ggml_type = {"f16": 1, "q8_0": 8, "q4_0": 2}[kv]
    contexts, n_gen, n_pp = spec["contexts"], spec["gen_tokens"], spec["prompt_tokens"]
    llm = Llama(spec["model"], n_ctx=max(max(contexts), n_pp) + n_gen + 8, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_batch=512, type_k=ggml_type, type_v=ggml_type,
                flash_attn=True, verbose=False)
    ids = text_tokens(lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False), max(contexts) + n_pp)
    llm.eval(ids[:64])
    llm.eval(ids[64:66])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids[:n_pp])
    pp = n_pp / (time.perf_counter() - t0)
    llm.reset()
    tg, step = {}, {}
    for c in contexts:
        llm.eval(ids[llm.n_tokens:c])
        t0 = time.perf_counter()
        for _ in range(n_gen):  # the next text token: llama-cpp-python keeps no logits past its batch
            llm.eval([ids[llm.n_tokens]])
        dt = time.perf_counter() - t0
        tg[c], step[c] = n_gen / dt, dt / n_gen
    m = llm.metadata
    arch = m.get("general.architecture", "llama")
    n_layer, n_kv, n_head = (int(m[f"{arch}.{k}"]) for k in ("block_count", "attention.head_count_kv",
                                                              "attention.head_count"))
    kv_dim = n_kv * int(m[f"{arch}.embedding_length"]) // n_head
    return {"name": f"llama.cpp {kv} KV", "pp": pp, "tg": tg, "step_s": step,
            "bytes_per_token": 2 * kv_dim * n_layer * KV_TYPE_BYTES[kv], "remat_flops_per_token": 0.0}


def run_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    torch.set_num_threads(spec["threads"])
    path = spec["model"]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    from xqrt.gguf_model import read_gguf
    from xqrt.tokenizer import Tokenizer
    tok = Tokenizer(read_gguf(path)[1])
    contexts, n_gen, n_pp = spec["contexts"], spec["gen_tokens"], spec["prompt_tokens"]
    ids = text_tokens(lambda s: tok.encode(s, add_bos=False), max(contexts) + n_pp)
    with torch.no_grad():
        warm = model(torch.tensor([ids[:16]]), use_cache=True)
        model(torch.tensor([ids[16:17]]), past_key_values=warm.past_key_values, use_cache=True)
        t0 = time.perf_counter()
        model(torch.tensor([ids[:n_pp]]))
        pp = n_pp / (time.perf_counter() - t0)
        past, n, tg, step = DynamicCache(), 0, {}, {}
        for c in contexts:
            for s in range(n, c, 512):
                out = model(torch.tensor([ids[s:min(c, s + 512)]]), past_key_values=past, use_cache=True)
            n = c
            t0 = time.perf_counter()
            for _ in range(n_gen):
                out = model(out.logits[:, -1:].argmax(-1), past_key_values=past, use_cache=True)
            dt = time.perf_counter() - t0
            n += n_gen
            tg[c], step[c] = n_gen / dt, dt / n_gen
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"name": "transformers fp32", "pp": pp, "tg": tg, "step_s": step,
            "bytes_per_token": 2 * 4 * cfg.num_key_value_heads * head_dim * cfg.num_hidden_layers,
            "remat_flops_per_token": 0.0}


def run_numpy(spec: dict) -> dict:
    import numpy as np
    n = 2048
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return {"name": "numpy matmul", "gflops": 2 * n ** 3 / best / 1e9}


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


CHILDREN = {"xqrt": run_xqrt, "llama.cpp": run_llama_cpp, "transformers": run_transformers, "numpy": run_numpy}


def child(spec: dict) -> dict:
    threads = str(spec["threads"])
    env = dict(BASE_ENV, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               NUMBA_NUM_THREADS=threads)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {spec['kind']} {spec.get('mode', spec.get('kv_type', ''))}: failed ({tail})", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ------------------------------------------------------------------------------------------
def report(results: list[dict], yardstick: float, args) -> str:
    contexts = args.contexts
    anchor = next((r for r in results if r["name"] == "llama.cpp f16 KV"), None) or \
        next((r for r in results if r["name"] == "xqrt fp16 KV"), results[0])
    fp16 = next((r for r in results if r["name"].startswith("xqrt fp16 KV")), None)
    lines = [f"Model `{os.path.basename(args.model)}`, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
             f"{args.gen_tokens} generated tokens per context; ratios against **{anchor['name']}** (same run). "
             f"NumPy float32 matmul: {yardstick:.1f} GFLOP/s.", "",
             "| engine | prompt tok/s | " + " | ".join(f"gen @{c} tok/s" for c in contexts)
             + " | cache B/token | × smaller than fp16 | peak RSS MiB |",
             "|---" * (5 + len(contexts)) + "|"]
    fp16_bytes = fp16["bytes_per_token"] if fp16 else anchor["bytes_per_token"]
    for r in results:
        cells = [f"{r['pp']:.1f} ({r['pp'] / anchor['pp']:.2f}×)"]
        cells += [f"{r['tg'][c]:.1f} ({r['tg'][c] / anchor['tg'][c]:.2f}×)" for c in contexts]
        cells += [f"{r['bytes_per_token']:.0f}", f"{fp16_bytes / r['bytes_per_token']:.2f}", f"{r['peak_rss_mib']:.0f}"]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if fp16:
        lines += ["", "Rematerialization: FLOPs per step spent rebuilding from the cache, and the rate they run "
                  "at two ways: against the step time the mode adds over xqrt's fp16 KV on the same device (\"over fp16\"), and "
                  "against the step time added since the previous context (\"marginal\": everything that grows "
                  "with the context, dequantization, scores and values included, counts as rebuild time):", "",
                  "| engine | " + " | ".join(f"@{c}: GFLOP/step; GFLOP/s over fp16, marginal (% of matmul)"
                                              for c in contexts) + " |",
                  "|---" * (1 + len(contexts)) + "|"]

        def rate(flops, seconds):
            if seconds <= 0:
                return "n/a"
            gflops = flops / seconds / 1e9
            return f"{gflops:.1f} ({100 * gflops / yardstick:.0f}%)"

        for r in results:
            base = next((f for f in results if f["name"].startswith("xqrt fp16 KV") and f["device"] == r.get("device")),
                        None)  # the same device's fp16 KV
            if not r.get("remat_flops_per_token") or base is None:
                continue
            cells, previous = [], None
            for c in contexts:
                flops = r["remat_flops_per_token"] * c
                cell = f"{flops / 1e9:.2f}; {rate(flops, r['step_s'][c] - base['step_s'][c])}"
                if previous is not None:
                    cell += ", " + rate(r["remat_flops_per_token"] * (c - previous), r["step_s"][c] - r["step_s"][previous])
                cells.append(cell)
                previous = c
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_report(curve: list[dict], fp16: dict | None, context: int) -> str:
    lines = [f"`--kv-budget` at {context} tokens of context: the last W tokens' K/V in fp16, older ones rematerialized "
             "(ratios against xqrt's fp16 KV at the same context):", "",
             "| engine | budget MiB | gen tok/s | cache B/token | × smaller than fp16 |", "|---|---|---|---|---|"]
    for r in curve:
        speed = f"{r['tg'][context]:.1f}" + (f" ({r['tg'][context] / fp16['tg'][context]:.2f}×)" if fp16 else "")
        ratio = f"{fp16['bytes_per_token'] / r['bytes_per_token']:.2f}" if fp16 else ""
        lines.append(f"| {r['name']} | {r['kv_budget'] / 2 ** 20:.1f} | {speed} | {r['bytes_per_token']:.0f} | {ratio} |")
    return "\n".join(lines)


def plot_budget(curve: list[dict], fp16: dict | None, context: int, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["bytes_per_token"] for r in curve], [r["tg"][context] for r in curve], marker="o",
            label=curve[0]["name"].split(" + ")[0] + " + fp16 window")
    if fp16:
        ax.plot([fp16["bytes_per_token"]], [fp16["tg"][context]], marker="s", linestyle="", label="xqrt fp16 KV")
    ax.set_xlabel("cache bytes per token")
    ax.set_ylabel(f"generation tokens/s at {context} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(results: list[dict], contexts, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        ax.plot(contexts, [r["tg"][c] for c in contexts], marker="o", label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("filled context (tokens)")
    ax.set_ylabel("generation tokens/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gpu_name() -> str:
    try:
        from xqrt.gpu import device_name
        return device_name()
    except Exception:  # noqa: BLE001 — a title only: the xqrt children have said what failed
        return "the GPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 8192])
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="the prompt whose processing is timed [512]")
    ap.add_argument("--modes", nargs="+", default=["fp16", "kivi:4", "kivi:2", "xquant:4", "xquant:3", "xquant:2",
                                                  "xquant-cl:3", "xquant-cl:2"], help="xqrt modes as MODE[:BITS]")
    ap.add_argument("--budget-curve", default="xquant:3", metavar="MODE:BITS",
                    help="latent mode whose --kv-budget curve is measured at the largest context ('' to skip)")
    ap.add_argument("--budget-fractions", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--devices", nargs="+", default=["cpu"],
                    choices=("cpu", "cuda", "cuda-launched", "cuda-cublas", "cuda-cublas-launched"),
                    help="where the xqrt modes run: cpu, cuda (CUDA graphs where they apply), cuda-launched; "
                         "cuda-cublas(-launched): with --rebuild cublas, latent modes only [cpu]")
    ap.add_argument("--ctx", type=int, default=0,
                    help="xqrt's context (default: the longest context measured, plus the tokens generated)")
    ap.add_argument("--llama-cpp", nargs="*", default=None, metavar="TYPE",
                    help="also run llama.cpp with these KV cache types (default when given alone: f16 q8_0 q4_0)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = CHILDREN[spec["kind"]](spec)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    from xqrt.default_model import default_model_path
    args.model = args.model or default_model_path()
    base = {"model": args.model, "threads": args.threads, "contexts": args.contexts, "gen_tokens": args.gen_tokens,
            "prompt_tokens": args.prompt_tokens, "ctx": args.ctx}
    specs = [dict(base, kind="xqrt", mode=m.split(":")[0], bits=int(m.split(":")[1]) if ":" in m else 4, device=d)
             for m in args.modes for d in args.devices if not (m == "fp16" and "cublas" in d)]
    if args.llama_cpp is not None:
        specs += [dict(base, kind="llama.cpp", kv_type=t) for t in (args.llama_cpp or ["f16", "q8_0", "q4_0"])]
    if not args.no_transformers:
        specs.append(dict(base, kind="transformers"))
    curve_specs = []
    if args.budget_curve:
        from xqrt.cache import FP16KV
        from xqrt.gguf_model import load_model
        fp16_per_token = FP16KV.bytes_per_position(load_model(args.model).config)
        mode, _, bits = args.budget_curve.partition(":")
        c = max(args.contexts)
        curve_specs = [dict(base, kind="xqrt", mode=mode, bits=int(bits or 4), contexts=[c], curve=True,
                            kv_budget=int(f * c * fp16_per_token)) for f in args.budget_fractions]
    t_start = time.perf_counter()
    yardstick = child(dict(base, kind="numpy"))["gflops"]
    results, curve = [], []
    for spec in specs + curve_specs:
        print(f"running {spec['kind']} {spec.get('mode', spec.get('kv_type', ''))} {spec.get('device', '')} ...",
              file=sys.stderr, flush=True)
        r = child(spec)
        if r:
            r["tg"] = {int(k): v for k, v in r["tg"].items()}
            r["step_s"] = {int(k): v for k, v in r["step_s"].items()}
            r["kv_budget"] = spec.get("kv_budget", 0)
            (curve if spec.get("curve") else results).append(r)
            print(f"  {r['name']}: prompt {r['pp']:.1f} tok/s, generation "
                  + ", ".join(f"{v:.1f} @{c}" for c, v in r["tg"].items()), file=sys.stderr, flush=True)
    if not results:
        sys.exit("bench/cpu.py: every engine failed (their errors are above)")
    text = report(results, yardstick, args)
    plots = importlib.util.find_spec("matplotlib") is not None  # the figures only (a GPU image may lack it)
    png = os.path.splitext(args.out)[0] + ".png"
    figures = ""
    if plots:
        plot(results, args.contexts, png)
        figures = f"![tokens/s against context]({os.path.basename(png)})"
    if curve:
        fp16 = next((r for r in results if r["name"] == "xqrt fp16 KV"), None)
        text += "\n\n" + budget_report(curve, fp16, max(args.contexts))
        budget_png = os.path.splitext(args.out)[0] + "-kv-budget.png"
        if plots:
            plot_budget(curve, fp16, max(args.contexts), budget_png)
            figures += f"\n\n![tokens/s against cache bytes per token, --kv-budget]({os.path.basename(budget_png)})"
    print(text)
    with open(args.out, "w", encoding="utf-8") as f:
        title = "CPU performance" if args.devices == ["cpu"] else "Performance: the CPU and " + gpu_name()
        f.write(f"# {title}\n\nWritten by `python bench/cpu.py " + shlex.join(sys.argv[1:]) + "` in "
                f"{time.perf_counter() - t_start:.0f} s.\n\n{text}\n\n" + (f"{figures}\n\n" if figures else "") +
                "GPU figures: [performance-gpu.md](performance-gpu.md), written by `bench/gpu.py`.\n")


if __name__ == "__main__":
    main()
