"""convert/hf_to_gguf_xq.py: HF checkpoints written by the tests → GGUF → xqrt, against transformers."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import convert, save_checkpoint, tiny_llama
from hf_to_gguf_xq import main as convert_main

from xqrt import Engine
from xqrt.factors import FACTOR_NAMES, layer_factors
from xqrt.gguf_model import load_model, read_gguf

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CHECKPOINTS = {  # name → (tiny_llama arguments, save options)
    "mha": (dict(n_head=4, n_kv_head=4, seed=1), {}),
    "gqa": (dict(n_head=4, n_kv_head=2, seed=2), {}),
    "gqa-sharded": (dict(n_head=8, n_kv_head=2, seed=3), {"max_shard_size": "100KB"}),
    "mistral-bf16": (dict(n_head=4, n_kv_head=1, seed=4, cls="Mistral"), {}),
    "llama3-rope-headdim-tied": (dict(n_head=4, n_kv_head=2, seed=5, head_dim=48, rope_parameters=LLAMA3_ROPE,
                                      tie_word_embeddings=True), {}),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def leftovers(directory):
    return [p for p in os.listdir(directory) if p.endswith(".gguf") or ".partial-" in p]


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def converted(request, tmp_path_factory):
    kwargs, save = CHECKPOINTS[request.param]
    model = tiny_llama(**kwargs)
    if request.param.endswith("bf16"):
        model = model.to(torch.bfloat16)
    d = tmp_path_factory.mktemp(request.param)
    hf_dir = save_checkpoint(model, d / "hf", **save)
    return request.param, model.float(), hf_dir, convert(hf_dir, d / "model.gguf", "--outtype", "f32")


def test_tiny_checkpoints_convert_and_match_transformers(converted):
    name, model, hf_dir, path = converted
    if name == "gqa-sharded":
        assert len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]) > 1
    eng = Engine(path, ctx=128)
    ids = list(np.random.default_rng(0).integers(3, eng.config.vocab_size, 48))
    ref = hf_logits(model, ids)
    assert rel(eng.logits(ids, "fp16"), ref) < 1e-3
    assert rel(eng.logits(ids, "xquant", bits=32), ref) < 1e-4  # float32 K/V: the weights alone
    md = eng.model.metadata
    gqa = model.config.num_key_value_heads < model.config.num_attention_heads
    assert md["xquant.version"] == 1 and md["xquant.cache.mode"] == "xquant" and md["xquant.cache.bits"] == 3
    assert md["xquant.cache.rotate"] is True and md["xquant.cache.sinks"] == 4
    assert ("blk.0.xq_uk" in eng.model.extra_tensors) == gqa
    assert list(md.get("xquant.layers", [])) == (list(range(model.config.num_hidden_layers)) if gqa else [])


def test_svd_factors_reproduce_wk_and_wv(tmp_path):
    """‖Uk·(Σk·Bkᵀ) − Wk‖/‖Wk‖ < 1e-5 against the weights as written, quantized ones included."""
    hf_dir = save_checkpoint(tiny_llama(n_head=8, n_kv_head=2, seed=7), tmp_path / "hf")
    for outtype in ("f32", "q8_0"):
        model = load_model(convert(hf_dir, tmp_path / f"{outtype}.gguf", "--outtype", outtype))
        said = []
        for f in layer_factors(model, log=said.append):
            wkv = np.concatenate([f.wk, f.wv], axis=1)
            for u, m, w in ((f.uk, f.mk, f.wk), (f.uv, f.mv, f.wv), (f.ukv, f.ukv.T @ wkv, wkv)):
                assert np.linalg.norm(u @ m - w) / np.linalg.norm(w) < 1e-5
                np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)
        assert said == []  # read from the file, not computed


def test_recipe_makes_flags_unnecessary(tmp_path, capsys):
    from xqrt.run import main as run_main
    hf_dir = save_checkpoint(tiny_llama(seed=8), tmp_path / "hf")
    plain = convert(hf_dir, tmp_path / "plain.gguf", "--no-xq")
    kivi = convert(hf_dir, tmp_path / "kivi.gguf", "--cache", "kivi", "--bits", "3", "--group", "32")
    assert not [k for k in read_gguf(plain)[1] if k.startswith("xquant.")]
    assert Engine(plain, ctx=64).cache.describe().startswith("fp16")
    assert Engine(kivi, ctx=64).cache.describe() == "kivi 3-bit, group 32, residual 32, 4 sinks"
    assert Engine(kivi, ctx=64, bits=2).cache.describe() == "kivi 2-bit, group 32, residual 32, 4 sinks"  # flags win
    layered = convert(hf_dir, tmp_path / "layered.gguf", "--bits", "3", "--layer-bits", "3,2", "--value-group", "8",
                      "--no-rotate", "--clip", "--balance", "0.5")
    eng = Engine(layered, ctx=64)
    assert eng.cache_options.layer_bits == (3, 2) and eng.cache_options.value_group == 8
    assert eng.cache.describe() == ("xquant 3/2-bit per layer, group 128, value group 8, residual 128, 4 sinks, "
                                    "clipped, value balance 0.5")  # GQA files: key groups of 128 by default
    assert run_main([kivi, "-p", "the", "-n", "3", "--temp", "0"]) == 0
    assert "cache kivi 3-bit" in capsys.readouterr().err


def test_add_xq_keeps_weights_and_metadata(tiny_gqa, tmp_path, capsys):
    _, plain = tiny_gqa
    out = tmp_path / "xq.gguf"
    assert convert_main(["--add-xq", plain, "-o", str(out), "--bits", "3"]) == 0
    (r0, md0), (r1, md1) = read_gguf(plain), read_gguf(str(out))
    copied = {t.name: t for t in r1.tensors}
    for t in r0.tensors:
        assert copied[t.name].tensor_type == t.tensor_type
        np.testing.assert_array_equal(np.asarray(copied[t.name].data), np.asarray(t.data))
    for k, v in md0.items():
        if not k.startswith("GGUF."):
            assert np.array_equal(md1[k], v) if isinstance(v, np.ndarray) else md1[k] == v, k
    assert md1["xquant.cache.bits"] == 3
    assert sorted(set(copied) - {t.name for t in r0.tensors}) == sorted(
        f"blk.{i}.xq_{n}" for i in range(2) for n in FACTOR_NAMES)


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_plain_gguf_computes_factors_at_load_and_says_so(tmp_path, n_kv_head):
    hf_dir = save_checkpoint(tiny_llama(n_kv_head=n_kv_head, seed=9), tmp_path / "hf")
    said = []
    layer_factors(load_model(convert(hf_dir, tmp_path / "p.gguf", "--no-xq")), log=said.append)
    assert len(said) == (1 if n_kv_head < 4 else 0) and all("computing XQuant SVD factors" in s for s in said)


def test_sentencepiece_tokenizer(tmp_path):
    """tokenizer.model → the `llama` vocabulary: our tokenizer agrees with sentencepiece's on a
    model trained here with Llama's settings."""
    spm = pytest.importorskip("sentencepiece")
    text = open(__file__, encoding="utf-8").read() * 3
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   # Llama's normalizer: text as it is (llama.cpp implements no other)
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    hf_dir = tmp_path / "hf"
    tiny_llama(n_vocab=sp.vocab_size(), seed=10).save_pretrained(hf_dir)
    os.replace(tmp_path / "tokenizer.model", hf_dir / "tokenizer.model")
    eng = Engine(convert(hf_dir, tmp_path / "spm.gguf", "--no-xq"), ctx=64)
    assert eng.tokenizer.add_bos and eng.tokenizer.bos_id == sp.bos_id()
    for s in ["Hello world", "def hf_logits(model, ids):", "  two  spaces", "naïve café 日本"]:
        assert eng.tokenizer.encode(s, add_bos=False) == sp.encode(s)
        assert eng.tokenizer.decode(sp.encode(s)) == s


# ---- bad input: one error line, exit 1, nothing left behind ----------------------------------
@pytest.fixture()
def checkpoint(tmp_path):
    return save_checkpoint(tiny_llama(seed=11), tmp_path / "hf", max_shard_size="100KB")


def expect_failure(capsys, args, match, directory):
    capsys.readouterr()
    assert convert_main([str(a) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf_to_gguf_xq: error:") and match in err[0], err
    assert leftovers(directory) == []


def edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def test_missing_directory(capsys, tmp_path):
    expect_failure(capsys, [tmp_path / "nope", "-o", tmp_path / "o.gguf"], "not found", tmp_path)


def test_unsupported_architecture(capsys, checkpoint, tmp_path):
    edit_config(checkpoint, architectures=["GPT2LMHeadModel"])
    expect_failure(capsys, [checkpoint, "-o", tmp_path / "o.gguf"], "unsupported architecture 'GPT2LMHeadModel'",
                   tmp_path)


def test_missing_shard(capsys, checkpoint, tmp_path):
    shard = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(checkpoint, shard))
    expect_failure(capsys, [checkpoint, "-o", tmp_path / "o.gguf"], f"shard {shard}", tmp_path)


def test_shapes_inconsistent_with_config(capsys, checkpoint, tmp_path):
    edit_config(checkpoint, intermediate_size=512)
    expect_failure(capsys, [checkpoint, "-o", tmp_path / "o.gguf"], "config.json implies", tmp_path)


def test_truncated_shard(capsys, checkpoint, tmp_path):
    shard = os.path.join(checkpoint, sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    expect_failure(capsys, [checkpoint, "-o", tmp_path / "o.gguf"], "truncated", tmp_path)


def test_bad_recipe_fails_before_writing(capsys, checkpoint, tmp_path):
    expect_failure(capsys, [checkpoint, "-o", tmp_path / "o.gguf", "--bits", "5"], "--bits 5", tmp_path)
    expect_failure(capsys, [checkpoint, "-o", tmp_path / "o.gguf", "--group", "48"], "--group 48", tmp_path)


def test_error_while_writing_leaves_no_partial_file(checkpoint, tmp_path, monkeypatch):
    import hf_to_gguf_xq
    real = hf_to_gguf_xq.compute_factors

    def fail(*a):
        real(*a)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hf_to_gguf_xq, "compute_factors", fail)
    assert convert_main([checkpoint, "-o", str(tmp_path / "o.gguf")]) == 1
    assert leftovers(tmp_path) == []


def test_add_xq_on_a_missing_file(capsys, tmp_path):
    expect_failure(capsys, ["--add-xq", tmp_path / "none.gguf", "-o", tmp_path / "o.gguf"], "not found", tmp_path)


# ---- real weights: SmolLM2's HF checkpoint → GGUF → xqrt, against transformers -------------------
WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_hf, tmp_path_factory):
    return convert(smollm2_hf, tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf", "--outtype", "f32")


@pytest.fixture(scope="module")
def smollm2_hf_model(smollm2_hf):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


def test_smollm2_vocabulary_as_llama_cpp_writes_it(smollm2_f32, smollm2_path):
    ours, theirs = read_gguf(smollm2_f32)[1], read_gguf(smollm2_path)[1]
    for key in [k for k in theirs if k.startswith("tokenizer.")] + ["llama.rope.freq_base", "llama.context_length"]:
        a, b = ours[key], theirs[key]
        assert (np.array_equal(a, b) if isinstance(b, (list, np.ndarray)) else a == b), key


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_round_trip_greedy_identical(prompt, smollm2_f32, smollm2_hf_model):
    eng = Engine(smollm2_f32, ctx=256, cache="fp16")
    ids = eng.tokenizer.encode(prompt)
    eos = smollm2_hf_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    with torch.no_grad():
        ref = smollm2_hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                        min_new_tokens=64)[0, len(ids):].tolist()
    cache = eng.new_cache()
    logits, ours = eng.forward(ids, cache), []
    for _ in range(64):
        logits[eos] = -np.inf  # min_new_tokens masks EOS in transformers
        ours.append(int(np.argmax(logits)))
        logits = eng.forward([ours[-1]], cache)
    assert ours == ref


def test_smollm2_round_trip_logits(smollm2_f32, smollm2_hf_model):
    eng = Engine(smollm2_f32, ctx=256)
    ids = eng.tokenizer.encode(open(WIKITEXT, encoding="utf-8").read()[:3000])[:200]
    ref = hf_logits(smollm2_hf_model, ids)
    assert rel(eng.logits(ids, "fp16"), ref) < 1e-3  # K/V rounded to fp16
    assert rel(eng.logits(ids, "xquant", bits=32), ref) < 1e-4  # K/V exact: the weights alone


@pytest.mark.slow
def test_smollm2_q8_0_perplexity_within_1pct_of_f32(smollm2_hf, smollm2_f32, tmp_path):
    """WikiText-2 test, the first 4096 tokens as 4 windows of 1024, fp16 KV."""
    from xqrt.perplexity import evaluate, windows
    q8 = convert(smollm2_hf, tmp_path / "smollm2-q8_0.gguf", "--outtype", "q8_0")
    ppl = {}
    for name, path in (("f32", smollm2_f32), ("q8_0", q8)):
        eng = Engine(path, ctx=1024)
        wins = windows(eng.tokenizer.encode(open(WIKITEXT, encoding="utf-8").read()[:40000]), 1024, 4)
        assert sum(map(len, wins)) == 4096
        ppl[name] = evaluate(eng, wins, "fp16", progress=False).ppl
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01, ppl


# ---- calibration: per-layer bits measured on the written file, stored in its recipe ------------
def test_calibration_stores_layer_bits_that_fit_the_ratio(tiny_gqa, tmp_path, capsys):
    _, plain = tiny_gqa
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(3000)))
    first = tmp_path / "xq.gguf"
    assert convert_main(["--add-xq", plain, "-o", str(first), "--bits", "3"]) == 0
    eng = Engine(str(first), ctx=128)

    def size(layer_bits):
        cache = eng.new_cache(layer_bits=layer_bits)
        cache.n_tokens = 128
        return cache.bytes_per_token()
    ratio = eng.fp16_bytes_per_token() / ((size((3, 3)) + size((3, 2))) / 2)  # one layer has to go down
    out = tmp_path / "calibrated.gguf"
    assert convert_main(["--add-xq", plain, "-o", str(out), "--bits", "3", "--calibrate", str(text),
                         "--ratio", f"{ratio}", "--calib-ctx", "128", "--calib-windows", "1"]) == 0
    assert "--layer-bits" in capsys.readouterr().err
    (r0, _), (r1, md1) = read_gguf(str(first)), read_gguf(str(out))
    assert sorted(md1["xquant.cache.layer_bits"]) == [2, 3] and md1["xquant.cache.bits"] == 3
    stored = {t.name: np.asarray(t.data) for t in r1.tensors}
    for t in r0.tensors:  # factors and weights kept as written
        np.testing.assert_array_equal(stored[t.name], np.asarray(t.data))
    assert size(tuple(int(b) for b in md1["xquant.cache.layer_bits"])) <= eng.fp16_bytes_per_token() / ratio
    assert Engine(str(out), ctx=128).cache_options.layer_bits == tuple(md1["xquant.cache.layer_bits"])
    assert all(f"blk.{i}.xq_kw" in stored for i in range(eng.config.n_layer))


def test_calibration_alone_stores_key_channel_weights(tiny_gqa, tmp_path):
    _, plain = tiny_gqa
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(3000)))
    out = tmp_path / "calibrated.gguf"
    assert convert_main(["--add-xq", plain, "-o", str(out), "--bits", "2", "--calibrate", str(text),
                         "--calib-ctx", "128", "--calib-windows", "1"]) == 0
    reader, md = read_gguf(str(out))
    assert "xquant.cache.layer_bits" not in md
    weights = [t for t in reader.tensors if t.name.endswith(".xq_kw")]
    eng = Engine(str(out), ctx=128)
    assert len(weights) == eng.config.n_layer
    assert "key bits per channel" in eng.new_cache().describe()
    assert "key bits per channel" not in Engine(str(out), ctx=128, channel_bits=False).new_cache().describe()


def test_calibration_text_too_short_leaves_no_file(capsys, tiny_gqa, tmp_path):
    _, plain = tiny_gqa
    text = tmp_path / "calib.txt"
    text.write_text("too short")
    expect_failure(capsys, ["--add-xq", plain, "-o", tmp_path / "o.gguf", "--calibrate", text], "fewer than one window",
                   tmp_path)
    assert not (tmp_path / "o.gguf").exists()
    expect_failure(capsys, ["--add-xq", plain, "-o", tmp_path / "o.gguf", "--calibrate", tmp_path / "none.txt"],
                   "calibration text not found", tmp_path)
