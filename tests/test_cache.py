"""The quantized cache modes: exactness with quantization off, decode = batched evaluation,
bytes = formula, and the residual rule reading what it claims to read."""
import numpy as np
import pytest
import torch

from xqrt import Engine, XQError
from xqrt.cache import Stream, mixed_attention

MODES = ("kivi", "xquant", "xquant-cl")
rng = np.random.default_rng(0)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("window", [0, 3])
def test_mixed_attention_per_query_reference(window):
    rng = np.random.default_rng(window)  # its own draws: the module's stay as the other tests expect
    n_head, n_kv, hd, pos0, n = 4, 2, 8, 5, 6
    end = pos0 + n
    q = rng.standard_normal((n, n_head * hd)).astype(np.float32)
    kq, vq, ke, ve, kw, vw = (rng.standard_normal((end, n_kv * hd)).astype(np.float32) for _ in range(6))
    bk, bv = np.array([0, 2, 2, 4, 8, 11]), np.array([1, 1, 3, 9, 10, 11])
    w0 = pos0 + 1 - window  # the window rows the batch needs start here
    out = mixed_attention(q, pos0, kq[:bk.max()], vq[:bv.max()], ke[bk.min():], ve[bv.min():], bk, bv, n_head, n_kv,
                          window, kw[w0:], vw[w0:])
    for i in range(n):
        t = pos0 + i
        in_window = (t - np.arange(t + 1) < window)[:, None]
        keys = np.where(in_window, kw[:t + 1], np.where((np.arange(t + 1) < bk[i])[:, None], kq[:t + 1], ke[:t + 1]))
        vals = np.where(in_window, vw[:t + 1], np.where((np.arange(t + 1) < bv[i])[:, None], vq[:t + 1], ve[:t + 1]))
        for h in range(n_head):
            g = h // (n_head // n_kv)
            s = keys[:, g * hd:(g + 1) * hd] @ q[i, h * hd:(h + 1) * hd] / np.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(out[i, h * hd:(h + 1) * hd], p @ vals[:, g * hd:(g + 1) * hd], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("mode", MODES)
def test_quantization_off_is_exact(fixture, mode, request):
    """bits=32 stores float32 latents: the SVD / X / delta paths reproduce transformers' logits."""
    model, path = request.getfixturevalue(fixture)
    eng = Engine(path, ctx=256)
    ids = list(rng.integers(0, eng.config.vocab_size, 150))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert rel(eng.logits(ids, mode, bits=32, base_layers=1), ref) < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("residual", [None, 0])
def test_decode_steps_equal_batched_evaluation(fixture, mode, residual, request):
    """Token by token through the decode kernel = one batched pass (what `decode` eval runs)."""
    _, path = request.getfixturevalue(fixture)
    eng = Engine(path, ctx=256)
    ids = list(rng.integers(0, eng.config.vocab_size, 150))
    opts = dict(bits=3, residual=residual, base_layers=1)
    batched = eng.logits(ids, mode, **opts)
    cache = eng.new_cache(mode, **opts)
    eng.forward(ids[:70], cache)
    steps = np.array([eng.forward([t], cache) for t in ids[70:]])
    # BLAS and the kernel round float32 differently, which may flip a code by one step (and
    # XQuant-CL's fp16 accumulator by one ulp, feeding later deltas): tolerate that, not more
    assert rel(steps, batched[70:]) < 5e-3
    median_tol = 1e-3  # a code flipped in a per-channel key group reaches every position of it
    assert np.median(np.abs(steps - batched[70:])) < median_tol * np.abs(batched).max()


RECIPE = dict(rotate=True, sinks=4, clip=True, balance=0.5)  # every quality switch at once


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("mode", ["xquant", "xquant-cl"])
def test_rotation_and_balance_are_exact_with_quantization_off(fixture, mode, request):
    """The Hadamard turn and the σ scaling are folded into the factors: undone exactly."""
    model, path = request.getfixturevalue(fixture)
    eng = Engine(path, ctx=256)
    ids = list(rng.integers(0, eng.config.vocab_size, 150))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert rel(eng.logits(ids, mode, bits=32, base_layers=1, **RECIPE), ref) < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("mode", MODES)
def test_decode_steps_equal_batched_evaluation_with_recipe(fixture, mode, request):
    """As above with every switch on, 2-bit values: the kernel reads sinks, rotated latents and
    split bit widths as the batched path does."""
    _, path = request.getfixturevalue(fixture)
    eng = Engine(path, ctx=256)
    ids = list(rng.integers(0, eng.config.vocab_size, 150))
    opts = dict(bits=3, value_bits=2, base_layers=1, **RECIPE)
    batched = eng.logits(ids, mode, **opts)
    cache = eng.new_cache(mode, **opts)
    eng.forward(ids[:70], cache)
    steps = np.array([eng.forward([t], cache) for t in ids[70:]])
    assert rel(steps, batched[70:]) < 5e-3
    assert np.median(np.abs(steps - batched[70:])) < 1e-3 * np.abs(batched).max()


@pytest.mark.parametrize("per_channel", [True, False])
def test_sinks_are_exact_and_leave_their_group_alone(per_channel):
    """A sink's outlier is read back exact (fp16) and does not widen its group's ranges."""
    from xqrt.cache import Stream
    G, w = 16, 24
    rows = rng.standard_normal((G, w)).astype(np.float32)
    rows[0] *= 1000.0
    plain, sunk = (Stream(G, w, 3, 8 if not per_channel else G, per_channel, sinks=s) for s in (0, 1))
    for st in (plain, sunk):
        st.write(0, rows) if per_channel else [st.write(t, rows[t:t + 1]) for t in range(G)]
    np.testing.assert_array_equal(sunk.read(0, G)[0], rows[0].astype(np.float16).astype(np.float32))
    err = lambda st: np.abs(st.read(0, G)[1:] - rows[1:]).max()  # noqa: E731
    if per_channel:
        assert err(sunk) < 0.1 * err(plain)  # plain: the rows collapse onto the min of an outlier range
    else:
        assert err(sunk) == err(plain)
    assert sunk.nbytes(G) == plain.nbytes(G) + w * 2


def formula(eng, mode, n, bits, G, base=3, sinks=4):
    """Bytes after n tokens from DESIGN.md's table: b·w/8 + 4·w/G per stored vector, complete
    per-channel groups only, the fp16 tail of recent tokens, XQuant-CL's fp16 accumulator, and
    each stream's first `sinks` positions again in fp16."""
    c = eng.config
    d, kv = c.d_model, c.kv_dim
    gqa = c.n_kv_head < c.n_head
    vec = lambda w, b: b * w // 8 + 4 * w // G  # noqa: E731
    sunk = min(sinks, n) * 2  # bytes per channel of a stream
    full, tail = n // G * G, n - n // G * G
    if mode == "kivi" or (mode == "xquant" and gqa):
        return c.n_layer * (full * vec(kv, bits) + n * vec(kv, bits) + tail * 2 * kv * 2 + sunk * 2 * kv)
    if mode == "xquant":
        return c.n_layer * (n * vec(d, bits) + tail * d * 2 + sunk * d)
    r = min(d, 2 * kv) if gqa else d
    total = 0
    for i in range(c.n_layer):
        if i < base - 1:
            b = max(4, bits)
            total += ((full * vec(kv, b) + n * vec(kv, b) + tail * 2 * kv * 2 + sunk * 2 * kv) if gqa
                      else n * vec(d, b) + tail * d * 2 + sunk * d)
        else:
            total += n * vec(r, max(4, bits) if i == base - 1 else bits) + tail * (2 * kv if gqa else d) * 2 + sunk * r
    return total + n * d * 2


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    # 16-bit activation codes: the decode step's products then match the batched float products
    # to ~1e-5, so comparing the two paths sees the cache, not the int8 activations' ~1e-2.
    return Engine(smollm2_path, ctx=512, act_bits=16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_measured_bytes_equal_formula(smollm2, mode, bits):
    eng = smollm2
    cache = eng.new_cache(mode, bits=bits)
    n = 150  # two full groups of 64 and a tail of 22
    eng.forward(eng.tokenizer.encode(open(__file__).read())[:n], cache)
    assert cache.n_tokens == n
    assert cache.nbytes() == formula(eng, mode, n, bits, 64)
    for L in getattr(cache, "layers", []):  # and the arrays are really that size per position
        for s in (L.key, L.value, L.delta):
            if s is not None and not s.per_channel:
                assert s.codes[0].nbytes + 2 * s.scale[0].nbytes == s.bits * s.width // 8 + 4 * s.width // 64


def test_smollm2_exact_paths_and_residual_rule(smollm2):
    """On the real GQA model: with quantization off the SVD paths give the fp16-KV logits; a
    prompt of several groups really reads quantized groups (residual 0 and 3-bit change the
    last logits) while exact storage does not."""
    eng = smollm2
    text = open(__file__).read()
    ids = eng.tokenizer.encode(text)[:200]  # three groups of 64 and a tail
    exact = eng.forward(ids, eng.new_cache("kivi", bits=32))  # float32 K/V: the exact reference
    fp16 = eng.forward(ids, eng.new_cache("fp16"))
    assert rel(fp16, exact) < 2e-3  # fp16 KV itself rounds K/V
    for mode in ("xquant", "xquant-cl"):
        assert rel(eng.forward(ids, eng.new_cache(mode, bits=32)), exact) < 1e-4
        assert rel(eng.forward(ids, eng.new_cache(mode, bits=32, residual=0)), exact) < 1e-4
        default = eng.forward(ids, eng.new_cache(mode, bits=3))
        no_tail = eng.forward(ids, eng.new_cache(mode, bits=3, residual=0))
        assert rel(default, exact) > 1e-3  # groups before the tail are read quantized
        assert rel(no_tail, default) > 1e-3  # and with R = 0 the tail is too


def test_bad_options(tiny_gqa):
    _, path = tiny_gqa
    eng = Engine(path, ctx=64)
    for kwargs, msg in [(dict(bits=5), "--bits 5"), (dict(group=100), "--group 100"),
                        (dict(group=48), "does not fit"), (dict(group=4), "multiple of 8"), (dict(residual=10), "--residual 10"),
                        (dict(base_layers=7), "--base-layers 7"), (dict(value_bits=5), "--value-bits 5"),
                        (dict(sinks=65), "--sinks 65")]:
        with pytest.raises(XQError, match=msg):
            eng.new_cache("xquant-cl", **kwargs)
    with pytest.raises(XQError, match="unknown cache mode"):
        eng.new_cache("bogus")


@pytest.mark.parametrize("mode", MODES)
def test_prompt_prefix_reuse(tiny_gqa, mode):
    """generate() keeps the shared prefix (cut back to a group boundary) and gives the same text."""
    _, path = tiny_gqa
    a = [int(t) for t in rng.integers(3, 200, 150)]
    b = a + [int(t) for t in rng.integers(3, 200, 60)]
    fresh = Engine(path, ctx=400, cache=mode, bits=3, base_layers=1)
    want = list(fresh.generate(b, max_tokens=5, temperature=0))
    eng = Engine(path, ctx=400, cache=mode, bits=3, base_layers=1)
    list(eng.generate(a, max_tokens=5, temperature=0))
    assert list(eng.generate(b, max_tokens=5, temperature=0)) == want
    assert eng.stats.prompt_tokens == len(b) - 128  # two groups of 64 kept


def test_key_bits_per_channel_decode_equals_batched_and_bytes_stay(tiny_gqa):
    """Key channel weights give 2-bit key latents a mix of widths: same bytes as uniform 2 bits,
    and the decode kernel reads the mixed group layout as the batched path does."""
    from xqrt.factors import layer_factors
    _, path = tiny_gqa
    eng = Engine(path, ctx=256)
    for L in layer_factors(eng.model):
        L.kw = rng.lognormal(0, 3, eng.config.kv_dim).astype(np.float32)
    ids = list(rng.integers(0, eng.config.vocab_size, 150))
    opts = dict(bits=2, **RECIPE)
    cache = eng.new_cache("xquant", **opts)
    assert "key bits per channel" in cache.describe()
    widths = np.diff(cache.layers[0].key.channel_off) * 8 // cache.group
    assert len(set(widths)) > 1 and widths.mean() == 2
    batched = eng.logits(ids, "xquant", **opts)
    eng.forward(ids[:70], cache)
    steps = np.array([eng.forward([t], cache) for t in ids[70:]])
    assert rel(steps, batched[70:]) < 5e-3
    assert np.median(np.abs(steps - batched[70:])) < 1e-3 * np.abs(batched).max()
    uniform = eng.new_cache("xquant", channel_bits=False, **opts)
    assert "key bits per channel" not in uniform.describe()
    eng.forward(ids, uniform)
    assert uniform.nbytes() == cache.nbytes()
    assert rel(eng.logits(ids, "xquant", channel_bits=False, **opts), batched) > 1e-4  # the widths differ


def test_factors_read_from_file_when_stored(tiny_gqa, tmp_path):
    """A GGUF carrying blk.N.xq_* tensors (--add-xq) is used as is: no SVD at load, same logits."""
    from hf_to_gguf_xq import main as convert_main
    from xqrt.factors import layer_factors
    from xqrt.gguf_model import load_model
    _, path = tiny_gqa
    computed = layer_factors(load_model(path))
    out = tmp_path / "with_xq.gguf"
    assert convert_main(["--add-xq", path, "-o", str(out)]) == 0
    said = []
    stored = layer_factors(load_model(str(out)), log=said.append)
    assert said == []
    np.testing.assert_array_equal(stored[1].ukv, computed[1].ukv)
    ids = list(range(3, 140))
    same = dict(bits=3, group=64, value_group=64)  # the file's recipe has GQA's key group of 128: not under test
    np.testing.assert_allclose(Engine(str(out), ctx=256).logits(ids, "xquant", **same),
                               Engine(path, ctx=256).logits(ids, "xquant", **same), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["xquant", "xquant-cl"])
def test_smollm2_decode_steps_equal_batched_evaluation(smollm2, mode):
    """The same on the real model across a group boundary. 8 bits: at 3 bits the two paths'
    float32 differences flip codes often enough over 30 layers to move logits by ~1e-2."""
    eng = smollm2
    ids = eng.tokenizer.encode(open(__file__).read())[:160]
    batched = eng.logits(ids, mode, bits=8)
    cache = eng.new_cache(mode, bits=8)
    eng.forward(ids[:120], cache)  # the steps cross the group boundary at 128
    steps = np.array([eng.forward([t], cache) for t in ids[120:]])
    assert rel(steps, batched[120:]) < 3e-3


@pytest.mark.parametrize("mode", ["kivi", "xquant", "xquant-cl"])
@pytest.mark.parametrize("residual, window", [(None, 0), (0, 0), (128, 0), (None, 40), (0, 300)])
def test_cache_steps_equal_one_batch_on_identical_inputs(tiny_mha, mode, residual, window):
    """Cache level, no model in between: the same latents stored one token at a time (decode
    kernel) or all at once (batched path) give the same attention outputs, 3-bit. On an MHA model
    KIVI's and XQuant's latents are the inputs themselves, so both paths quantize identical
    values: this pins the residual rule, the ring and the fp16 window exactly."""
    from xqrt.cache import FP16KV, CacheOptions, make_cache
    from xqrt.gguf_model import load_model
    model = load_model(tiny_mha[1])
    c = model.config
    n = 150
    r = np.random.default_rng(3)
    inputs = [[r.standard_normal((n, w)).astype(np.float32) for w in (c.d_model, c.q_dim, c.kv_dim, c.kv_dim)]
              for _ in range(c.n_layer)]
    opts = CacheOptions(bits=3, residual=residual, base_layers=1, kv_budget=window * FP16KV.bytes_per_position(c))
    whole = make_cache(mode, model, 256, opts)
    want = [whole.attend(i, 0, *inputs[i]) for i in range(c.n_layer)]
    step = make_cache(mode, model, 256, opts)
    for t in range(n):
        for i in range(c.n_layer):
            xn, q, k, v = (a[t:t + 1] for a in inputs[i])
            got = step.attend(i, t, xn, q, k, v)
            np.testing.assert_allclose(got[0], want[i][t], rtol=1e-4, atol=1e-4)
        step.advance(1)


@pytest.mark.parametrize("mode", MODES)
def test_kv_budget_window(tiny_gqa, mode):
    """--kv-budget: a budget for every position reads fp16 K/V only (fp16 KV's logits); a smaller
    one keeps the last W = budget / (fp16 bytes per position) tokens in fp16 and counts them."""
    from xqrt.cache import FP16KV
    _, path = tiny_gqa
    eng = Engine(path, ctx=256)
    ids = list(rng.integers(0, eng.config.vocab_size, 100))
    per = FP16KV.bytes_per_position(eng.config)

    def decode(cache_mode, **opts):
        cache = eng.new_cache(cache_mode, bits=2, base_layers=1, **opts)
        eng.forward(ids[:60], cache)
        return np.array([eng.forward([t], cache) for t in ids[60:]]), cache

    fp16, _ = decode("fp16")
    everything, _ = decode(mode, kv_budget=256 * per)
    assert rel(everything, fp16) < 1e-5
    none, plain = decode(mode)
    some, windowed = decode(mode, kv_budget=30 * per + per // 2)
    assert windowed.window == 30 and windowed.describe().endswith("fp16 window 30")
    assert windowed.nbytes() == plain.nbytes() + 30 * per
    mean_err = lambda a: float(np.abs(a - fp16).mean())  # noqa: E731
    assert mean_err(some) < mean_err(none)  # the recent positions are read exact
    assert windowed.truncate(64) == 0  # the window rows before a cut are gone: start over


def test_kv_budget_flag_sizes():
    from xqrt.run import build_parser
    parse = lambda v: build_parser().parse_args(["m.gguf", "--kv-budget", v]).kv_budget  # noqa: E731
    assert (parse("65536"), parse("512K"), parse("64M"), parse("1.5GiB")) == (65536, 512 << 10, 64 << 20, 3 << 29)
    with pytest.raises(SystemExit):
        parse("lots")


def test_file_recipe_reads_every_key_and_rejects_bad_values():
    from xqrt.cache import file_recipe
    good = {"xquant.cache.mode": "xquant", "xquant.cache.bits": 3, "xquant.cache.layer_bits": np.array([3, 2], np.int32),
            "xquant.cache.rotate": False, "xquant.cache.sinks": 4, "xquant.cache.balance": 0.5}
    assert file_recipe(good) == {"mode": "xquant", "bits": 3, "layer_bits": (3, 2), "rotate": False, "sinks": 4,
                                 "balance": 0.5}
    for key, bad in [("mode", "bogus"), ("bits", -1), ("bits", True), ("layer_bits", np.array(["3"])),
                     ("layer_bits", np.array([5])), ("rotate", 1), ("balance", 1e9), ("sinks", 1 << 30)]:
        with pytest.raises(XQError, match=f"xquant.cache.{key}"):
            file_recipe({f"xquant.cache.{key}": bad})


def test_fp16_key_channels_are_exact_and_counted(tiny_gqa):
    """--fp16-channels N: the first N key latent channels go through their per-channel groups as fp16
    (read back to fp16 precision), every other channel as before, the extra bytes counted; the
    decode kernel reads that layout as the batched path does."""
    _, path = tiny_gqa
    eng = Engine(path, ctx=256)
    ids = list(rng.integers(0, eng.config.vocab_size, 150))
    opts = dict(bits=3, group=64, channel_bits=False)
    plain, exact = eng.new_cache("xquant", **opts), eng.new_cache("xquant", fp16_channels=2, **opts)
    widths = np.diff(exact.layers[0].key.channel_off) * 8 // exact.group
    assert list(widths[:3]) == [16, 16, 3] and (widths[2:] == 3).all()
    eng.forward(ids, plain)
    eng.forward(ids[:70], exact)
    steps = np.array([eng.forward([t], exact) for t in ids[70:]])
    groups = 150 // 64  # complete key groups per layer
    assert exact.nbytes() - plain.nbytes() == eng.config.n_layer * groups * 2 * (16 - 3) * 64 // 8
    stream = Stream(128, 8, 3, 64, per_channel=True, channel_bits=[16, 3, 3, 3, 3, 3, 3, 3])
    rows = rng.standard_normal((64, 8)).astype(np.float32)
    stream.write(0, rows)
    back = stream.read(0, 64)
    np.testing.assert_array_equal(back[:, 0], rows[:, 0].astype(np.float16))
    assert 0 < np.abs(back[:, 1:] - rows[:, 1:]).max() < 0.5
    batched = eng.logits(ids, "xquant", fp16_channels=2, **opts)
    assert rel(steps, batched[70:]) < 5e-3
    with pytest.raises(XQError, match="fp16-channels"):
        eng.new_cache("xquant", fp16_channels=-1)


@pytest.mark.parametrize("fixture", ["tiny_gqa", "tiny_mha"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", [dict(bits=3), dict(bits=2, residual=0, rotate=False, sinks=0),
                                  dict(bits=3, value_bits=2, group=16, residual=32, clip=True, kv_budget=10)])
def test_compiled_decode_step_equals_the_batched_path(fixture, mode, opts, request):
    """cpu.latent_step (store + attend of one layer in one call) against the same token sent
    through the batched path (`_steps` cleared): identical stored bytes, and outputs equal but for
    float32 rounding (LLVM may order a compiled sum differently)."""
    from xqrt.cache import FP16KV, CacheOptions, make_cache
    from xqrt.gguf_model import load_model
    model = load_model(request.getfixturevalue(fixture)[1])
    c = model.config
    o = CacheOptions(base_layers=2, **{**opts, "kv_budget": opts.get("kv_budget", 0) * FP16KV.bytes_per_position(c)})
    fused, plain = make_cache(mode, model, 256, o), make_cache(mode, model, 256, o)
    plain._steps = [None] * c.n_layer
    assert any(s is not None for s in fused._steps)
    r = np.random.default_rng(5)
    for t in range(140):  # crosses per-channel group boundaries (G = 64 or 16)
        for i in range(c.n_layer):
            xn, q, k, v = (r.standard_normal((1, w)).astype(np.float32) for w in (c.d_model, c.q_dim, c.kv_dim, c.kv_dim))
            np.testing.assert_allclose(fused.attend(i, t, xn, q, k, v), plain.attend(i, t, xn, q, k, v),
                                       rtol=1e-5, atol=1e-6)
        fused.advance(1)
        plain.advance(1)
    for a, b in zip(fused.layers, plain.layers):
        for s, u in ((a.key, b.key), (a.value, b.value)):
            if s is not None:
                for name in ("codes", "scale", "zero", "sink"):
                    np.testing.assert_array_equal(getattr(s, name), getattr(u, name))
    assert fused.nbytes() == plain.nbytes()


def test_size_next_to_fp16_says_larger_when_larger():
    from xqrt.cache import versus_fp16
    assert versus_fp16(4.0) == "4.00x smaller than fp16 KV"
    assert versus_fp16(0.5) == "2.00x larger than fp16 KV"
    assert versus_fp16(1.0) == versus_fp16(0.999) == "the size of fp16 KV"
