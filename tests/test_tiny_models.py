"""End to end on tiny random Llama checkpoints: our logits against transformers'.

The fp16 KV cache rounds K and V to half precision, so logits agree to ~1e-4 of their range,
not to float32 round-off.
"""
import numpy as np
import pytest
import torch

from xqrt import Engine


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
def test_prefill_and_decode_match_transformers(fixture, request):
    model, path = request.getfixturevalue(fixture)
    eng = Engine(path, ctx=128)
    ids = list(np.random.default_rng(0).integers(0, eng.config.vocab_size, 40))
    ref = hf_logits(model, ids)
    ours = eng.logits(ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    cache = eng.new_cache()
    eng.forward(ids[:20], cache)
    for t in range(20, 40):  # decode one token at a time over the prefilled cache
        step = eng.forward([ids[t]], cache)
        np.testing.assert_allclose(step, ref[t], rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_batched_prefill_chunks_agree(tiny_gqa):
    _, path = tiny_gqa
    ids = list(range(3, 60))
    whole = Engine(path, ctx=128, batch=512).logits(ids)
    chunked = Engine(path, ctx=128, batch=7).logits(ids)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_1", "f16", "bf16"])
def test_quantized_files_match_their_dequantized_weights(outtype, tmp_path):
    """A quantized GGUF runs on the raw blocks; transformers sees the same weights dequantized."""
    from conftest import tiny_llama, write_llama_gguf
    from gguf import GGUFReader, dequantize
    from hf_to_gguf_xq import hf_name, unpermute_rows
    model = tiny_llama()
    path = write_llama_gguf(tmp_path, model, outtype)
    sd = model.state_dict()
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    with torch.no_grad():  # load the dequantized weights back into the reference
        for t in GGUFReader(path).tensors:
            w = dequantize(t.data, t.tensor_type).reshape([int(s) for s in reversed(t.shape)])
            role = t.name.split(".")[-2]
            if role in heads:
                w = unpermute_rows(w, heads[role])
            sd[hf_name(t.name)].copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
    ids = list(range(5, 37))
    ref = hf_logits(model, ids)
    ours = Engine(path, ctx=64).logits(ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["fp16", "xquant"])
def test_warmup_leaves_no_trace(tiny_gqa, mode):
    """The start-up step (`--warmup`, llama.cpp's) is forgotten: the same greedy text, the same cache."""
    _, path = tiny_gqa
    runs = []
    for warm in (False, True):
        eng = Engine(path, ctx=96, cache=mode, bits=4, group=16)
        if warm:
            eng.warmup()
        text = "".join(eng.generate("the cat", max_tokens=20, temperature=0))
        runs.append((text, eng.stats.prompt_tokens, eng.stats.cache_tokens, eng.stats.cache_bytes))
    assert runs[0] == runs[1]


def test_bench_latent_step_runs(tiny_gqa):
    """bench/latent_step.py wraps the engine's kernels by name: it still finds them all."""
    import os
    import subprocess
    import sys
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "latent_step.py")
    r = subprocess.run([sys.executable, bench, tiny_gqa[1], "--ctx", "16", "--steps", "2", "--modes", "fp16", "xquant:3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1000:]
    assert "decode_fp16" in r.stdout and "latent_step" in r.stdout and "after a 64 MB sweep by one" in r.stdout, r.stdout
