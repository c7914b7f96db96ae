"""`python -m xqrt.run [MODEL.gguf] -p PROMPT`: generate text, llama.cpp-style.

Errors the user can fix (bad file, bad flag, prompt too long) end in one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import sys

from .errors import cli_exit_code


def byte_size(text: str) -> int:
    """'65536', '512K', '64M', '1.5G' (powers of 1024) → bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 65536, 512K, 64M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"byte size must not be negative: {text!r}")
    return int(value * units[unit])


def bit_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of bit widths") from None


def add_compute_args(ap: argparse.ArgumentParser):
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--act-bits", type=int, default=8, choices=(8, 16),
                    help="integer activations in quantized-weight products: 8 as llama.cpp (fastest), 16 (closer to "
                         "float, ~1.3x slower products) [8]")


def add_cache_args(ap: argparse.ArgumentParser, defaults: str = "the GGUF's recipe if it has one, else "):
    """The cache flags; each left unset (None) falls back to `defaults` + the value named in its help."""
    from .cache import CACHE_MODES
    g = ap.add_argument_group("cache", f"unset flags take {defaults}the value in brackets")
    g.add_argument("--cache", default=None, metavar="MODE", help=f"cache mode: {', '.join(CACHE_MODES)} [fp16]")
    g.add_argument("--bits", type=int, default=None, metavar="B",
                   help="bits per cached value: 2, 3, 4, 8 (16/32: floats, quantization off) [4]")
    g.add_argument("--group", type=int, default=None, metavar="G",
                   help="quantization group size [the largest power of two <= 128 dividing the model's widths]")
    g.add_argument("--residual", type=int, default=None, metavar="R",
                   help="recent tokens kept exact, 0 or a multiple of G [G]")
    g.add_argument("--base-layers", type=int, default=None, metavar="N",
                   help="xquant-cl: first layers stored at >= 4 bits, the last seeding the accumulator [3]")
    g.add_argument("--value-bits", type=int, default=None, metavar="B",
                   help="bits of the value latents (GQA xquant / kivi) when they differ from --bits [--bits]")
    g.add_argument("--value-group", type=int, default=None, metavar="G",
                   help="group of the value latents (GQA xquant / kivi), along each token's vector [--group]")
    g.add_argument("--layer-bits", type=bit_list, default=None, metavar="B,B,...",
                   help="bits per layer, one entry per layer, instead of --bits [--bits everywhere]")
    g.add_argument("--sinks", type=int, default=None, metavar="N",
                   help="the first N positions' latents also kept exact, at most G (attention sinks) [4]")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="turn the per-token latents by a Hadamard transform per group, folded into the "
                        "factors: outlier channels stop setting the groups' ranges [on]")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="each group's range of least squared error instead of its min/max [off]")
    g.add_argument("--channel-bits", action=argparse.BooleanOptionalAction, default=None,
                   help="2/3-bit GQA key latents: bits spread over channels by the file's calibration weights "
                        "(convert/hf_to_gguf_xq.py --calibrate stores them) [on where the file has them]")
    g.add_argument("--fp16-channels", type=int, default=None, metavar="N",
                   help="GQA xquant: the first N key latent channels (the SVD's largest, where the outliers sit) "
                        "kept as fp16 [0]")
    g.add_argument("--balance", type=float, default=None, metavar="A",
                   help="scale the value latents by sigma^A of their SVD (0: as the paper) [0]")
    g.add_argument("--kv-budget", type=byte_size, default=0, metavar="BYTES",
                   help="kivi/xquant/xquant-cl: also keep the most recent tokens' K/V in fp16 within BYTES "
                        "(e.g. 64M; all layers), read without rematerialization: between fastest (all fp16) "
                        "and smallest (0) [0]")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xqrt.run", description="Run a GGUF model with an XQuant cache.")
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    ap.add_argument("-p", "--prompt", default="Once upon a time", help="prompt text")
    ap.add_argument("-f", "--file", help="read the prompt from this file")
    ap.add_argument("-n", "--n-predict", type=int, default=128,
                    help="tokens to generate (-1: until the end of text or a full context)")
    ap.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    ap.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalty looks back over (0 = none, -1 = all)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (unset or -1 = a fresh one each run)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("-c", "--ctx", type=int, default=None, help="context size in tokens (default: min(train, 4096))")
    add_compute_args(ap)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                    help="where the model runs: cuda (every cache mode; --fp16-channels and 16/32-bit latents are "
                         "CPU-only), or auto: CUDA when numba-cuda finds a GPU and the cache runs there, else the "
                         "CPU, saying which [cpu]")
    ap.add_argument("--rebuild", default="fused", choices=("fused", "cublas"),
                    help="on the GPU, how a latent cache rebuilds K and V: fused (Numba kernels, in shared memory) "
                         "or cublas (the product on tensor cores through torch, a CUDA build of it) [fused]")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="on the GPU, replay the decode step as one CUDA graph instead of launching its kernels one "
                         "by one (torch's capture, a CUDA build of it) [where torch finds the GPU]")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one decode step before the prompt, then forgotten, as llama.cpp: the kernels load and the "
                         "weights page in outside the prompt's time [on]")
    add_cache_args(ap)
    ap.add_argument("--chat", action="store_true", help="interactive chat with the model's template")
    ap.add_argument("--system", default=None, help="system message for --chat")
    return ap


def _generate(engine, args, prompt, chat=False):
    for piece in engine.generate(prompt, max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                                 top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                 repeat_last_n=args.repeat_last_n, seed=args.seed, stop=args.stop, chat=chat):
        print(piece, end="", flush=True)
        yield piece


def _summary(engine):
    full = f"xqrt: the context of {engine.n_ctx} tokens is full: generation stopped (raise --ctx)\n" \
        if engine.stats.context_full else ""
    print(f"\n{full}xqrt: {engine.stats.summary(engine.cache.describe(), engine.fp16_bytes_per_token())}",
          file=sys.stderr)


def engine_from_args(args, ctx):
    """The Engine the model and cache flags describe (the default model when none is given)."""
    from .default_model import default_model_path
    from .engine import Engine
    return Engine(args.model or default_model_path(), ctx=ctx, cache=args.cache, bits=args.bits, group=args.group,
                  residual=args.residual, base_layers=args.base_layers, value_bits=args.value_bits,
                  value_group=args.value_group, layer_bits=args.layer_bits, sinks=args.sinks,
                  rotate=args.rotate, clip=args.clip, balance=args.balance, channel_bits=args.channel_bits,
                  fp16_channels=args.fp16_channels,
                  kv_budget=args.kv_budget, device=getattr(args, "device", "cpu"),
                  rebuild=getattr(args, "rebuild", "fused"), cuda_graphs=getattr(args, "cuda_graphs", None),
                  threads=args.threads,
                  act_bits=args.act_bits, verbose=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli_exit_code(lambda: _run(args))


def _run(args) -> int:
    engine = engine_from_args(args, args.ctx)
    if args.warmup:
        engine.warmup()
    if not args.chat:
        prompt = open(args.file, encoding="utf-8").read() if args.file else args.prompt
        for _ in _generate(engine, args, prompt):
            pass
        _summary(engine)
        return 0
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("xqrt chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = "".join(_generate(engine, args, messages))
        messages.append({"role": "assistant", "content": reply})
        _summary(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
