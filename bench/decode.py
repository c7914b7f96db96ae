"""Prompt and generation tokens/s of xqrt next to transformers, same machine, same run.

    python bench/decode.py [MODEL.gguf] [--prompt-tokens 512] [--gen-tokens 64] [--threads N]
                           [--modes fp16 kivi:3 xquant:3 xquant-cl:3]

transformers runs the same GGUF dequantized to float32 (its only way to read it); xqrt reads the
quantized blocks. Both are greedy, both start from an empty cache.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from xqrt import Engine  # noqa: E402
from xqrt.default_model import default_model_path  # noqa: E402

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")


def xqrt_speed(eng, prompt, n_gen, mode="fp16", bits=4):
    cache = eng.new_cache(mode, bits=bits)
    t0 = time.perf_counter()
    logits = eng.forward(prompt, cache)
    t_prompt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_gen):
        logits = eng.forward([int(np.argmax(logits))], cache)
    return len(prompt) / t_prompt, n_gen / (time.perf_counter() - t0)


def hf_speed(model, prompt, n_gen):
    import torch
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t_prompt = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return len(prompt) / t_prompt, n_gen / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["fp16"], help="xqrt cache modes as MODE[:BITS]")
    args = ap.parse_args()
    path = args.model or default_model_path()
    eng = Engine(path, ctx=args.prompt_tokens + args.gen_tokens + 8, threads=args.threads)
    prompt = eng.tokenizer.encode(open(WIKITEXT, encoding="utf-8").read()[:20000])[:args.prompt_tokens]
    modes = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else 4) for m in args.modes]
    for mode, bits in modes:  # warm-up: load compiled kernels, compute SVD factors
        xqrt_speed(eng, prompt[:80], 4, mode, bits)

    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    hf_speed(hf, prompt[:16], 4)

    rows = []
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both
        for mode, bits in modes:
            name = "xqrt fp16 KV" if mode == "fp16" else f"xqrt {mode} {bits}-bit"
            rows.append((name,) + xqrt_speed(eng, prompt, args.gen_tokens, mode, bits))
        rows.append(("transformers fp32",) + hf_speed(hf, prompt, args.gen_tokens))
    best = {}
    for name, pp, tg in rows:
        b = best.setdefault(name, [0.0, 0.0])
        b[0], b[1] = max(b[0], pp), max(b[1], tg)
    anchor = best["transformers fp32"]
    print(f"model {os.path.basename(path)}, threads {args.threads}, prompt {len(prompt)} tokens, "
          f"generation {args.gen_tokens} tokens, best of {args.repeats}")
    print(f"{'engine':<20} {'prompt tok/s':>13} {'ratio':>7} {'gen tok/s':>10} {'ratio':>7}")
    for name, (pp, tg) in best.items():
        print(f"{name:<20} {pp:>13.1f} {pp / anchor[0]:>6.2f}x {tg:>10.1f} {tg / anchor[1]:>6.2f}x")


if __name__ == "__main__":
    main()
