"""SmolLM2-135M-Instruct Q4_1 against transformers loading the same GGUF in float32."""
import os

import numpy as np
import pytest
import torch

from xqrt import Engine

WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In a shocking finding, scientists discovered"]
LONG_PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
               "combined movable metal type, oil-based ink and a wooden press. Within fifty years")


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return Engine(smollm2_path, ctx=2048)


@pytest.fixture(scope="module")
def engine_act16(smollm2_path):
    return Engine(smollm2_path, ctx=2048, act_bits=16)


def greedy(engine, hf_model, prompt, n=64):
    """Our greedy tokens, transformers' and the gap between its top two logits at each step."""
    ids = engine.tokenizer.encode(prompt)
    # min_new_tokens makes transformers mask EOS for all n steps; we mask it the same way.
    eos = hf_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    with torch.no_grad():
        full = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        ref_logits = hf_model(full).logits[0, len(ids) - 1:-1].numpy()
    ref_logits[:, eos] = -np.inf
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    cache = engine.new_cache()
    logits = engine.forward(ids, cache)
    ours = []
    for _ in range(n):
        logits[eos] = -np.inf
        tok = int(np.argmax(logits))
        ours.append(tok)
        logits = engine.forward([tok], cache)
    return ours, full[0, len(ids):].tolist(), top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_identical_with_16_bit_activations(prompt, engine_act16, hf_model):
    ours, ref, _ = greedy(engine_act16, hf_model, prompt)
    assert ours == ref


@pytest.mark.parametrize("prompt", PROMPTS)
def test_8_bit_activations_pick_the_reference_token_unless_nearly_tied(prompt, engine, hf_model):
    """int8 activation codes (llama.cpp's arithmetic) move logits by up to a few tenths, so free
    greedy text may part from the float reference at a near-tie and then differ. Teacher-forced on
    the reference's own 64 tokens, our top token must be its top token wherever its top two
    logits are 0.5 or more apart, and almost everywhere else."""
    ids = engine.tokenizer.encode(prompt)
    _, ref, margin = greedy(engine, hf_model, prompt)
    cache = engine.new_cache()
    ours = [engine.forward(ids, cache).copy()] + [engine.forward([t], cache).copy() for t in ref[:-1]]
    eos = hf_model.generation_config.eos_token_id
    ours = np.array(ours)
    ours[:, [eos] if isinstance(eos, int) else list(eos)] = -np.inf
    agree = ours.argmax(1) == np.array(ref)
    assert agree[margin >= 0.5].all() and agree.mean() >= 0.9, (np.flatnonzero(~agree), margin[~agree])


def test_a_chat_reply_starts_with_the_reference_token(engine, hf_model):
    """The prompt's own last logits come from the output head alone after the float prefill: its
    16-bit codes keep a near-tie (0.08 apart here) as the reference has it, where int8 codes
    answered "L'Étoile…" instead of "The capital of France is Paris." """
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    assert int(engine.forward(ids, engine.new_cache()).argmax()) == int(ref.argmax())


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


def greedy_alone(engine, prompt, n=64):
    """Our greedy tokens, EOS masked as in greedy()."""
    cache = engine.new_cache()
    logits = engine.forward(engine.tokenizer.encode(prompt), cache)
    out = []
    for _ in range(n):
        logits[list(engine.tokenizer.end_ids)] = -np.inf
        out.append(int(np.argmax(logits)))
        logits = engine.forward([out[-1]], cache)
    return out


@pytest.mark.skipif(not os.path.exists("/dev/nvidia0"), reason="needs a GPU (the simulator is too slow for SmolLM2)")
@pytest.mark.parametrize("mode, act_bits, length", [
    ("fp16", 8, "short"), ("kivi", 8, "short"), ("xquant", 8, "short"), ("xquant-cl", 8, "short"),
    ("fp16", 16, "short"), ("fp16", 8, "long"), ("xquant-cl", 8, "long")])
def test_gpu_greedy_64_tokens_match_the_cpu(mode, act_bits, length, smollm2_path):
    """The GPU step against the CPU's per cache mode: with int8 activation codes both sum the same
    integers; with 16 bits the GPU multiplies float activations. A short prompt goes through the
    decode step; the long one through the prefill (float x on both, matrix-matrix products)."""
    prompt = PROMPTS[0] if length == "short" else LONG_PROMPT
    gpu = Engine(smollm2_path, ctx=256, cache=mode, device="cuda", act_bits=act_bits)
    cpu = Engine(smollm2_path, ctx=256, cache=mode, act_bits=act_bits)
    assert greedy_alone(gpu, prompt) == greedy_alone(cpu, prompt)


@pytest.mark.skipif(not os.path.exists("/dev/nvidia0"), reason="needs a GPU (the simulator is too slow for SmolLM2)")
@pytest.mark.parametrize("mode", ["xquant", "xquant-cl"])
def test_gpu_tensor_core_rebuild_follows_the_cpu(mode, smollm2_path):
    """--rebuild cublas (fp16 latents and factors) decoding along the CPU's greedy tokens, one step
    each: the CPU's top token wherever its top two are more than 0.25 apart, every logit within 1
    (a misplaced run or an unrounded accumulator moves them by several)."""
    cpu = Engine(smollm2_path, ctx=256, cache=mode)
    gpu = Engine(smollm2_path, ctx=256, cache=mode, device="cuda", rebuild="cublas")
    on_cpu, on_gpu = cpu.new_cache(), gpu.new_cache()
    ids = cpu.tokenizer.encode(PROMPTS[0])
    expected, got = cpu.forward(ids, on_cpu), gpu.forward(ids, on_gpu)
    worst = 0.0
    for step, token in enumerate(greedy_alone(cpu, PROMPTS[0])):
        top_two = np.sort(expected)[-2:]
        if top_two[1] - top_two[0] > 0.25:
            assert np.argmax(got) == np.argmax(expected), f"step {step}"
        worst = max(worst, float(np.abs(got - expected).max()))
        expected, got = cpu.forward([token], on_cpu), gpu.forward([token], on_gpu)
    assert worst < 1.0, worst
