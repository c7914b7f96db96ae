"""SmolLM2-135M-Instruct Q4_1 against transformers loading the same GGUF in float32."""
import os

import numpy as np
import pytest
import torch

from xqrt import Engine

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In a shocking finding, scientists discovered"]


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return Engine(smollm2_path, ctx=2048)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_identical(prompt, engine, hf_model):
    ids = engine.tokenizer.encode(prompt)
    # min_new_tokens makes transformers mask EOS for all 64 steps; we mask it the same way.
    eos = hf_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64)[0, len(ids):]
    cache = engine.new_cache()
    logits = engine.forward(ids, cache)
    ours = []
    for _ in range(64):
        logits[eos] = -np.inf
        tok = int(np.argmax(logits))
        ours.append(tok)
        logits = engine.forward([tok], cache)
    assert ours == ref.tolist()


def test_perplexity_first_1024_tokens_within_half_percent(engine, hf_model):
    text = open(WIKITEXT, encoding="utf-8").read()
    ids = engine.tokenizer.encode(text[:20000])[:1024]
    assert len(ids) == 1024

    def ppl(logits):
        logits = logits.astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]
        return float(np.exp(nll.mean()))

    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours, theirs = ppl(engine.logits(ids)), ppl(ref)
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)
