"""Quality of every cache mode at equal bytes per token, on SmolLM2 and WikiText-2.

    python bench/quality.py [--windows 8] [--ctx 1024] [MODEL.gguf]

fp16 / kivi / xquant / xquant-cl × 4, 3, 2 bits, in both evaluation modes (`decode`: what
generation sees, exact recent tail included; `simulated`: every K/V quantized, the paper's
setup). Writes docs/quality.md and docs/quality.png (Δppl % against bytes/token).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xqrt import Engine  # noqa: E402
from xqrt.default_model import default_model_path  # noqa: E402
from xqrt.perplexity import evaluate, reference_logits, windows  # noqa: E402

TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
MODES = ("kivi", "xquant", "xquant-cl")
BITS = (4, 3, 2)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = ap.parse_args()
    eng = Engine(args.model or default_model_path(), ctx=args.ctx, verbose=True)
    tokens = eng.tokenizer.encode(open(TEXT, encoding="utf-8").read())
    wins = windows(tokens, args.ctx, args.windows)
    t0 = time.time()
    ref = reference_logits(eng, wins)
    results = [(evaluate(eng, wins, "fp16", reference=ref), None)]
    for eval_mode in ("decode", "simulated"):
        for mode in MODES:
            for bits in BITS:
                r = evaluate(eng, wins, mode, eval_mode, reference=ref, bits=bits)
                print(f"{eval_mode:9s} {mode:9s} {bits}-bit: {r.summary()}", flush=True)
                results.append((r, bits))
    c = eng.config
    head = f"""# Cache quality: SmolLM2-135M-Instruct (Q4_1), WikiText-2 test

Written by `python bench/quality.py --windows {args.windows} --ctx {args.ctx}` ({time.time() - t0:.0f} s).
Text: `wiki.test.raw`, {len(tokens)} tokens; the first {len(wins)} non-overlapping windows of {args.ctx}
tokens, every token but each window's first scored ({len(wins) * (args.ctx - 1)} scored tokens).
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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("\n".join(body))
    plot(results, os.path.join(args.out, "quality.png"))
    print(f"wrote {args.out}/quality.md and quality.png")


if __name__ == "__main__":
    main()
