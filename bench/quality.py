"""Quality of every cache mode at equal bytes per token, on SmolLM2 and WikiText-2.

    python bench/quality.py [--windows 8] [--ctx 1024] [--sections grid recipes] [MODEL.gguf]

grid: fp16 / kivi / xquant / xquant-cl × 4, 3, 2 bits as the paper describes them, in both
evaluation modes (`decode`: what generation sees, exact recent tail included; `simulated`: every
K/V quantized, the paper's setup) → docs/quality.md, docs/quality.png.

recipes: the quality switches (rotation, sinks, clipping, value balance, key group, key bits per
channel, key channel 0 in fp16) each alone on XQuant 3-bit, and combined, in `decode` and `simulated` mode on the first
--ablation-windows windows; the shipped recipes at their budgets with key channel weights and
per-layer bits calibrated on the last --calib-windows windows of the file (never among the
evaluated ones, which are the first); KIVI* and llama.cpp's quantized
KV cache types (through llama-cpp-python on the same token windows, against its own f16 KV) at
theirs → docs/quality-recipes.md, docs/quality-recipes.png.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xqrt import Engine  # noqa: E402
from xqrt.calibrate import allocate_bits, key_channel_weights  # noqa: E402
from xqrt.factors import layer_factors  # noqa: E402
from xqrt.default_model import default_model_path  # noqa: E402
from xqrt.perplexity import Scores, evaluate, reference_logits, windows  # noqa: E402

TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
MODES = ("kivi", "xquant", "xquant-cl")
BITS = (4, 3, 2)
PAPER = dict(rotate=False, sinks=0, clip=False, balance=0.0, channel_bits=False)  # the method as published
SWITCHES = [("rotation", dict(rotate=True)), ("4 sinks", dict(sinks=4)), ("clipping", dict(clip=True)),
            ("value balance 1", dict(balance=1.0)), ("key group 128", dict(group=128, value_group=64)),
            ("key bits per channel", dict(channel_bits=True)), ("key channel 0 in fp16", dict(fp16_channels=1))]
COMBINED = dict(rotate=True, sinks=4, clip=False, balance=0.0, group=128, value_group=64, channel_bits=True)
# The shipped recipes: (name, smallest ratio to fp16 KV, options); where the options' bits do not
# fit the ratio, layers are calibrated down from `bits` to bits − 1 until they do.
RECIPES = [("4-bit", 3.5, dict(COMBINED, bits=4)), ("5x", 5.0, dict(COMBINED, bits=3)),
           ("6.5x", 6.5, dict(COMBINED, bits=2, clip=True))]
LLAMA_KV_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}  # ggml type, bytes per element


def table(results, eval_mode):
    rows = ["| mode | bits | B/token | of which working | × smaller than fp16 | ppl ± se | Δppl % | KLD "
            "| same top-1 % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r, bits in results:
        if r.eval_mode != eval_mode and r.mode != "fp16":
            continue
        rows.append(f"| {r.mode} | {bits or '-'} | {r.bytes_per_token:.0f} | {r.working_bytes_per_token:.0f} | "
                    f"{r.ratio:.2f} | {r.ppl:.3f} ± {r.ppl_se:.3f} | {r.delta_ppl_pct:+.2f} | {r.kld:.4f} | "
                    f"{100 * r.top1:.2f} |")
    return "\n".join(rows)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, eval_mode in zip(axes, ("decode", "simulated")):
        for mode, marker in zip(MODES, "os^"):
            pts = sorted((r.bytes_per_token, r.delta_ppl_pct, b) for r, b in results
                         if r.mode == mode and r.eval_mode == eval_mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode)
            for x, y, b in pts:
                ax.annotate(f"{b}b", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("cache bytes per token (fp16 KV: 23040)")
        ax.set_title(f"{eval_mode} evaluation")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ perplexity vs fp16 KV, %")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def llama_cpp_scores(model_path: str, wins, kv_type: str, reference, threads: int | None):
    """llama.cpp with its quantized KV cache on the same token windows; `reference` are its own
    logits with an f16 KV cache (None: this run is that reference, returned as well)."""
    from llama_cpp import Llama
    ggml_type, per_element = LLAMA_KV_TYPES[kv_type]
    llm = Llama(model_path, n_ctx=len(wins[0]), n_batch=len(wins[0]), logits_all=True, type_k=ggml_type,
                type_v=ggml_type, flash_attn=True, n_threads=threads, verbose=False)
    m = llm.metadata
    arch = m.get("general.architecture", "llama")
    n_layer, n_head, n_kv = (int(m[f"{arch}.{k}"]) for k in ("block_count", "attention.head_count",
                                                              "attention.head_count_kv"))
    kv_dim = n_kv * int(m[f"{arch}.embedding_length"]) // n_head
    scores, own = Scores(), []
    for w, ids in enumerate(wins):
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], np.float32)
        own.append(logits if reference is None else None)
        scores.add(ids, logits, logits if reference is None else reference[w], 2 * kv_dim * n_layer * per_element)
    return scores.result(f"llama.cpp {kv_type}", f"llama.cpp {kv_type} KV cache", "decode",
                         2 * kv_dim * n_layer * 2.0), own


def recipes_section(eng, wins, calib, ablation_wins, args):
    """Rows on the evaluated windows (baselines and shipped recipes), the switch ablation on the
    first few of them in both evaluation modes, the calibrated allocations, llama.cpp's rows."""
    ref = reference_logits(eng, wins)
    fp16 = eng.fp16_bytes_per_token()
    rows = [("fp16 KV", evaluate(eng, wins, "fp16", reference=ref), "")]
    # what `hf_to_gguf_xq.py --calibrate` stores in a file, from the calibration windows
    for factors, weight in zip(layer_factors(eng.model), key_channel_weights(eng, calib, COMBINED["group"])):
        factors.kw = weight

    def run(name, mode, eval_mode="decode", on=wins, **options):
        r = evaluate(eng, on, mode, eval_mode, reference=ref[:len(on)], **options)
        print(f"{name:40s} {eval_mode:9s} {r.summary()}", flush=True)
        return r

    for bits in BITS if args.baselines else ():
        rows.append((f"KIVI* {bits}-bit", run(f"kivi {bits}", "kivi", bits=bits, **PAPER), "paper"))
    for bits in BITS[1:] if args.baselines else ():
        rows.append((f"XQuant {bits}-bit", run(f"xquant {bits}", "xquant", bits=bits, **PAPER), "paper"))
    allocations = []
    for name, ratio, opts in RECIPES:
        opts = dict(opts)
        cache = eng.new_cache("xquant", **opts)
        cache.n_tokens = len(wins[0])
        if cache.bytes_per_token() > fp16 / ratio and opts["bits"] > 2:  # 2 bits: the smallest there is
            bits = opts.pop("bits")
            layer_bits, sensitivity = allocate_bits(eng, calib, "xquant", fp16 / ratio, bits, bits - 1, **opts)
            allocations.append((name, opts, layer_bits, sensitivity))
            opts["layer_bits"] = layer_bits
        rows.append((f"xqrt recipe {name}", run(name, "xquant", **opts), "recipe"))
    ablation = {}
    for eval_mode in ("decode", "simulated") if ablation_wins else ():
        ablation[eval_mode] = [("XQuant 3-bit", run("xquant 3", "xquant", eval_mode, ablation_wins, bits=3, **PAPER))]
        for name, switch in SWITCHES + [("rotation + 4 sinks + key group 128 + key bits per channel", COMBINED)]:
            ablation[eval_mode].append((f"+ {name}", run(name, "xquant", eval_mode, ablation_wins, bits=3,
                                                          **dict(PAPER, **switch))))
    llama = []
    if args.llama_cpp:
        f16, own = llama_cpp_scores(eng.model.path, wins, "f16", None, args.threads)
        llama.append(("llama.cpp f16 KV", f16))
        for kv in args.llama_cpp:
            llama.append((f"llama.cpp {kv} KV", llama_cpp_scores(eng.model.path, wins, kv, own, args.threads)[0]))
            print(f"llama.cpp {kv}: {llama[-1][1].summary()}", flush=True)
    return rows, ablation, allocations, llama


def recipes_report(rows, ablation, allocations, llama, args, n_wins, n_ablation, n_calib, seconds) -> str:
    def line(name, r):
        return (f"| {name} | {r.bytes_per_token:.0f} | {r.ratio:.2f} | {r.ppl:.3f} | {r.delta_ppl_pct:+.2f} | "
                f"{r.kld:.4f} | {100 * r.top1:.2f} |")
    head = "| cache | B/token | × smaller than fp16 | ppl | Δppl % | KLD | same top-1 % |\n|---|---|---|---|---|---|---|"
    out = [f"""# Cache recipes beyond the paper: SmolLM2-135M-Instruct (Q4_1), WikiText-2 test

Written by `python {shlex.join(["bench/quality.py", *sys.argv[1:]])}` ({seconds:.0f} s).
`decode` evaluation on the first {n_wins} non-overlapping windows of {args.ctx} tokens ({n_wins * (args.ctx - 1)}
scored tokens). Per-layer bits are calibrated on the file's last {n_calib} windows, which no evaluated window
overlaps. B/token counts everything the cache holds after a full window (sinks and scales included).
Switches: rotation = a Hadamard transform per group on the value latents, folded into the SVD factors;
sinks = the first positions' latents also kept in fp16, and left out of their key group's ranges;
clipping = each group's least-squares range; value balance = value latents scaled by the SVD's σ;
key group 128 = per-channel key groups of 128 positions (values keep groups of 64); key bits per channel =
2/3-bit key latents' bits spread over their channels (1–4 each, same bytes) by weights calibrated on the same
windows as the layer bits; key channel 0 in fp16 = the key latent's first channel (the SVD's largest, where
the outliers sit) stored as fp16 in its groups.

## decode evaluation
""", head]
    out += [line(name, r) for name, r, _ in rows]
    out += [line(name, r) for name, r in llama]
    out += [f"\nllama.cpp rows: its own f16 KV run is their reference (Δppl, KLD); its f16 perplexity is "
            f"{llama[0][1].ppl:.3f} against xqrt's {rows[0][1].ppl:.3f}." if llama else ""]
    for eval_mode, results in ablation.items():
        out += [f"\n## the switches one at a time on XQuant 3-bit: {eval_mode} evaluation, first {n_ablation} "
                "windows\n", head]
        out += [line(name, r) for name, r in results]
    out += ["\n## the shipped recipes as flags\n"]
    for name, _, opts in RECIPES:
        alloc = [a for a in allocations if a[0] == name]
        opts = dict(opts, **({"layer_bits": ",".join(map(str, alloc[0][2]))} if alloc else {}))
        opts.pop("bits") if alloc else None
        flags = " ".join((f"--{k.replace('_', '-')}" if v else f"--no-{k}") if isinstance(v, bool)
                         else f"--{k.replace('_', '-')} {v}" for k, v in opts.items() if v or isinstance(v, bool))
        out.append(f"- {name}: `--cache xquant {flags}`")
        if alloc:
            out.append(f"  - KLD each layer adds alone at the lower width (calibration windows): "
                       f"{', '.join(f'{x:.4f}' for x in alloc[0][3])}")
    out.append("\n![Δppl against bytes per token](quality-recipes.png)\n")
    return "\n".join(out)


def plot_recipes(rows, llama, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {"KIVI*": [r for n, r, _ in rows if n.startswith("KIVI")],
              "XQuant (paper)": [r for n, r, k in rows if n.startswith("XQuant ") and k == "paper"],
              "xqrt recipes": [r for n, r, k in rows if k == "recipe"],
              "llama.cpp KV": [r for n, r in llama[1:]]}
    for (label, rs), marker in zip(groups.items(), "osD^"):
        pts = sorted((r.bytes_per_token, r.delta_ppl_pct) for r in rs)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
    ax.set_xlabel("cache bytes per token (fp16 KV: 23040)")
    ax.set_ylabel("Δ perplexity vs fp16 KV, %")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def grid_section(eng, wins, tokens, args) -> None:
    t0 = time.time()
    ref = reference_logits(eng, wins)
    results = [(evaluate(eng, wins, "fp16", reference=ref), None)]
    for eval_mode in ("decode", "simulated"):
        for mode in MODES:
            for bits in BITS:
                r = evaluate(eng, wins, mode, eval_mode, reference=ref, bits=bits, **PAPER)
                print(f"{eval_mode:9s} {mode:9s} {bits}-bit: {r.summary()}", flush=True)
                results.append((r, bits))
    c = eng.config
    head = f"""# Cache quality: SmolLM2-135M-Instruct (Q4_1), WikiText-2 test

Written by `python bench/quality.py --sections grid --windows {args.windows} --ctx {args.ctx}` ({time.time() - t0:.0f} s).
Text: `wiki.test.raw`, {len(tokens)} tokens; the first {len(wins)} non-overlapping windows of {args.ctx}
tokens, every token but each window's first scored ({len(wins) * (args.ctx - 1)} scored tokens).
Every mode as the paper describes it (no rotation, sinks, clipping or balance: see quality-recipes.md).
Group G = {eng.new_cache('xquant').group} (the largest power of two ≤ 128 dividing d = {c.d_model} and
kv_dim = {c.kv_dim}); residual R = G; XQuant-CL: 3 base layers at 4 bits, the third seeding the
accumulator. KLD is KL(fp16 KV ‖ mode) per token in nats; "same top-1" is how often both pick the
same most likely token. B/token is everything the cache holds after a full window, scales and zeros
included; "of which working" is XQuant-CL's fp16 accumulator Â (d·2 bytes per token), which has to
exist during a decode step for every position and is counted.
"""
    body = [head, "## decode evaluation (what generation sees: quantized groups + the exact fp16 tail)\n",
            table(results, "decode"), "\n## simulated evaluation (every K/V quantized, no tail: the paper's setup)\n",
            table(results, "simulated"), "\n![Δppl against bytes per token](quality.png)\n"]
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("\n".join(body))
    plot(results, os.path.join(args.out, "quality.png"))
    print(f"wrote {args.out}/quality.md and quality.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--windows", type=int, default=8, help="evaluated windows, from the start of the file")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--sections", nargs="+", choices=("grid", "recipes"), default=["grid", "recipes"])
    ap.add_argument("--ablation-windows", type=int, default=8, help="recipes: windows of the switch ablation")
    ap.add_argument("--calib-windows", type=int, default=2, help="recipes: calibration windows, from the end")
    ap.add_argument("--no-baselines", dest="baselines", action="store_false",
                    help="recipes: skip the paper's KIVI* and XQuant rows")
    ap.add_argument("--llama-cpp", nargs="*", default=["q8_0", "q4_0"], metavar="TYPE",
                    help="recipes: llama.cpp KV cache types to compare (none: skip llama.cpp)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = ap.parse_args()
    eng = Engine(args.model or default_model_path(), ctx=args.ctx, threads=args.threads, verbose=True)
    tokens = eng.tokenizer.encode(open(TEXT, encoding="utf-8").read())
    wins = windows(tokens, args.ctx, args.windows)
    os.makedirs(args.out, exist_ok=True)
    if "grid" in args.sections:
        grid_section(eng, wins, tokens, args)
    if "recipes" in args.sections:
        t0 = time.time()
        calib = windows(tokens, args.ctx, None)[-args.calib_windows:]
        if len(wins) + args.calib_windows > len(tokens) // args.ctx:
            raise SystemExit("the evaluated and calibration windows would overlap: ask for fewer")
        ablation_wins = wins[:args.ablation_windows]
        rows, ablation, allocations, llama = recipes_section(eng, wins, calib, ablation_wins, args)
        report = recipes_report(rows, ablation, allocations, llama, args, len(wins), len(ablation_wins), len(calib),
                                time.time() - t0)
        with open(os.path.join(args.out, "quality-recipes.md"), "w") as f:
            f.write(report)
        plot_recipes(rows, llama, os.path.join(args.out, "quality-recipes.png"))
        print(f"wrote {args.out}/quality-recipes.md and quality-recipes.png")


if __name__ == "__main__":
    main()
