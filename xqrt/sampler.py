"""Next-token choice from logits: greedy, or temperature with top-k / top-p / min-p and a
repetition penalty, in llama.cpp's order (penalty → top-k → top-p → min-p → temperature)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import XQError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # tokens the penalty looks back over: 0 none, -1 all (llama.cpp's)
    seed: int | None = None  # None or negative: a fresh one each run (llama.cpp's -1)

    def validate(self):
        """One error line naming the first parameter out of its range (by its command-line flag);
        comparisons written so that NaN fails them too."""
        for flag, value, ok, rule in (
                ("--temp", self.temperature, self.temperature >= 0, "must be >= 0 (0 is greedy)"),
                ("--top-k", self.top_k, self.top_k >= 0, "must be >= 0 (0 keeps every token)"),
                ("--top-p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]"),
                ("--min-p", self.min_p, 0 <= self.min_p <= 1, "must be in [0, 1]"),
                ("--repeat-penalty", self.repeat_penalty, self.repeat_penalty > 0, "must be > 0 (1 is off)"),
                ("--repeat-last-n", self.repeat_last_n, self.repeat_last_n >= -1, "must be >= -1 (-1: all, 0: none)")):
            if not ok:
                raise XQError(f"{flag} {value} {rule}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(None if params.seed is None or params.seed < 0 else params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        logits = logits.astype(np.float64)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
            seen = np.unique(np.asarray(recent, dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            ids = ids[:p.top_k]
        kept = logits[ids]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, kept, probs = ids[:cut], kept[:cut], probs[:cut]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            ids, kept = ids[keep], kept[keep]
        scaled = np.exp((kept - kept[0]) / p.temperature)
        return int(self.rng.choice(ids, p=scaled / scaled.sum()))
