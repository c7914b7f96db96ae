"""`python -m xqrt.perplexity MODEL -f TEXT --ctx N --cache MODE --bits B`: quality of a cache.

The text is tokenized once and cut into non-overlapping windows of N tokens from its start; in
each window every token but the first is scored. Each window also runs with the fp16 KV cache,
and the report gives the KL divergence KL(fp16 ‖ mode) and how often both pick the same top token.

Two evaluation modes:
  decode     each scored token sees the cache exactly as generation would have left it: the
             quantized groups plus the exact recent tail (the batched pass reproduces step-by-step
             decoding; tests check that).
  simulated  every K/V, the current token's own included, is read from the quantized cache and
             there is no exact tail; per-channel groups are quantized over the whole window.
             This is the paper's (and KIVI's) evaluation setup.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np

from .cache import versus_fp16
from .errors import XQError, cli_exit_code


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


@dataclass
class Result:
    mode: str
    description: str
    eval_mode: str
    n_windows: int
    n_ctx: int
    scored: int
    ppl: float
    ppl_se: float
    ref_ppl: float
    kld: float
    kld_se: float
    top1: float
    bytes_per_token: float  # everything the cache holds, working memory included
    working_bytes_per_token: float  # of which per-step working memory (XQuant-CL's accumulator)
    fp16_bytes_per_token: float

    @property
    def delta_ppl_pct(self) -> float:
        return 100.0 * (self.ppl / self.ref_ppl - 1.0)

    @property
    def ratio(self) -> float:
        return self.fp16_bytes_per_token / self.bytes_per_token

    def summary(self) -> str:
        return (f"ppl = {self.ppl:.4f} ± {self.ppl_se:.4f} | fp16-KV ppl = {self.ref_ppl:.4f} | "
                f"Δppl = {self.delta_ppl_pct:+.2f}% | KLD = {self.kld:.5f} ± {self.kld_se:.5f} | "
                f"same top token = {100 * self.top1:.2f}% | cache {self.bytes_per_token:.0f} B/token "
                f"({versus_fp16(self.ratio)})")


def check_windows(n_ctx: int, n_chunks: int | None):
    """The window flags' ranges, before a model is loaded: a window's first token is not scored."""
    if n_ctx < 2:
        raise XQError(f"--ctx {n_ctx}: a window needs 2 tokens or more (its first is not scored)")
    if n_chunks is not None and n_chunks < 1:
        raise XQError(f"--chunks {n_chunks} must be 1 or more")


def windows(tokens: list[int], n_ctx: int, n_chunks: int | None) -> list[list[int]]:
    check_windows(n_ctx, n_chunks)
    n = len(tokens) // n_ctx
    if n == 0:
        raise XQError(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}")
    if n_chunks is not None:
        n = min(n, n_chunks)
    return [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n)]


def window_scores(logits: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs of the next tokens, log-softmax) for positions 0…n−2."""
    lp = log_softmax(logits[:-1].astype(np.float64))
    return lp[np.arange(len(ids) - 1), np.asarray(ids[1:])], lp


class Scores:
    """Per-window statistics of one cache against a reference, accumulated window by window (a
    window's logits are vocab × ctx floats: they are not kept)."""

    def __init__(self):
        self.nll, self.ref_nll, self.kld, self.same, self.sizes, self.working = [], [], [], [], [], []

    def add(self, ids, logits, ref, bytes_per_token: float, working_bytes_per_token: float = 0.0):
        tok_lp, lp = window_scores(logits, ids)
        ref_tok_lp, ref_lp = window_scores(ref, ids)
        self.nll.append(-tok_lp)
        self.ref_nll.append(-ref_tok_lp)
        self.kld.append((np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1))
        self.same.append(ref_lp.argmax(-1) == lp.argmax(-1))
        self.sizes.append(bytes_per_token)
        self.working.append(working_bytes_per_token)

    def result(self, mode: str, description: str, eval_mode: str, fp16_bytes_per_token: float) -> Result:
        nll, kld, same = np.concatenate(self.nll), np.concatenate(self.kld), np.concatenate(self.same)
        ppl, ref_ppl = math.exp(nll.mean()), math.exp(np.concatenate(self.ref_nll).mean())
        se = lambda a: float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0  # noqa: E731
        return Result(mode=mode, description=description, eval_mode=eval_mode, n_windows=len(self.nll),
                      n_ctx=len(self.nll[0]) + 1, scored=len(nll), ppl=ppl, ppl_se=ppl * se(nll), ref_ppl=ref_ppl,
                      kld=float(kld.mean()), kld_se=se(kld), top1=float(same.mean()),
                      bytes_per_token=float(np.mean(self.sizes)), working_bytes_per_token=float(np.mean(self.working)),
                      fp16_bytes_per_token=fp16_bytes_per_token)


def evaluate(engine, wins, mode: str, eval_mode: str = "decode", reference=None, progress=True, **options) -> Result:
    """Score `wins` with `mode`; `reference` (a list of fp16-KV logits per window) is computed
    when not given and can be shared across calls."""
    from tqdm import tqdm
    if eval_mode not in ("decode", "simulated"):
        raise XQError(f"unknown evaluation mode {eval_mode!r} (decode or simulated)")
    scores, cache = Scores(), None
    for w, ids in enumerate(tqdm(wins, desc=f"{mode} ({eval_mode})", disable=not progress, unit="window",
                                 file=sys.stderr)):
        ref = reference[w] if reference is not None else engine.logits(ids, "fp16")
        cache = engine.new_cache(mode, simulated=eval_mode == "simulated", **options)
        logits = ref if mode == "fp16" else engine.forward(ids, cache, all_logits=True)
        cache.n_tokens = len(ids)  # the fp16 reference ran on a cache of its own
        scores.add(ids, logits, ref, cache.bytes_per_token(), cache.working_nbytes() / cache.n_tokens)
    return scores.result(mode, cache.describe(), eval_mode, engine.fp16_bytes_per_token())


def reference_logits(engine, wins, progress=True) -> list[np.ndarray]:
    from tqdm import tqdm
    bar = tqdm(wins, desc="fp16 reference", disable=not progress, unit="window", file=sys.stderr)
    return [engine.logits(ids, "fp16") for ids in bar]


def build_parser() -> argparse.ArgumentParser:
    from .run import add_cache_args, add_compute_args
    ap = argparse.ArgumentParser(prog="python -m xqrt.perplexity", description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    ap.add_argument("-f", "--file", required=True, help="text file (e.g. wiki.test.raw)")
    ap.add_argument("-c", "--ctx", type=int, default=1024, help="window length in tokens")
    ap.add_argument("--chunks", type=int, default=None, help="score only the first K windows")
    ap.add_argument("--eval", choices=("decode", "simulated"), default="decode", dest="eval_mode")
    add_compute_args(ap)
    add_cache_args(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli_exit_code(lambda: _run(args))


def _run(args) -> int:
    from .run import engine_from_args
    check_windows(args.ctx, args.chunks)
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    engine = engine_from_args(args, args.ctx)
    tokens = engine.tokenizer.encode(text)
    wins = windows(tokens, args.ctx, args.chunks)
    print(f"xqrt perplexity: {len(tokens)} tokens in {args.file}; {len(wins)} windows of {args.ctx} "
          f"(non-overlapping, from the start), {len(wins) * (args.ctx - 1)} scored tokens; "
          f"cache {engine.new_cache().describe()}; eval {args.eval_mode}", file=sys.stderr)
    res = evaluate(engine, wins, engine.cache_mode, args.eval_mode, reference=reference_logits(engine, wins))
    print(res.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
