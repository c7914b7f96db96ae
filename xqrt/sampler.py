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
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self):
        if self.temperature < 0 or not (0 < self.top_p <= 1) or not (0 <= self.min_p <= 1) or self.top_k < 0 \
                or self.repeat_penalty <= 0:
            raise XQError(f"invalid sampling parameters: {self}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        logits = logits.astype(np.float64)
        if p.repeat_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
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
