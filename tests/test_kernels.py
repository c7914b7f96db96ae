"""Each CPU kernel against a NumPy reference."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, dequantize, quantize

from xqrt.cache import mixed_attention
from xqrt.kernels import cpu

rng = np.random.default_rng(0)


def blocks(w, qtype):
    """W (rows × cols float32) in a ggml format, as the loader hands it to the kernels."""
    if qtype == T.F32:
        return w.view(np.uint8)
    if qtype == T.F16:
        return w.astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return quantize(w, qtype)


def reference(data, qtype, shape):
    if qtype == T.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return dequantize(data, qtype).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1])
def test_matvec_and_dequantize(qtype, act_bits):
    w = rng.standard_normal((70, 96)).astype(np.float32)
    data = np.ascontiguousarray(blocks(w, qtype))
    ref = reference(data, qtype, w.shape)
    x = rng.standard_normal(96).astype(np.float32)
    act = cpu.new_act(96, act_bits)
    cpu.quantize_act(x, act)
    out = np.zeros(70, np.float32)
    cpu.matvec(data, int(qtype), x, act, out)
    assert_within_act_rounding(out, ref, data, qtype, x, act)
    dense = np.zeros_like(w)
    cpu.dequantize(data, int(qtype), dense)
    np.testing.assert_array_equal(dense, ref)


def assert_within_act_rounding(out, w, data, qtype, x, act):
    """The block formats multiply int8 activations: each x_j is off by at most half its block's
    step, so |out − w·x| ≤ |c|·(step/2) plus float32 round-off, where c is the weight the codes
    stand for: w itself, or for Q4_1 d·(q − 8) (its minimum and 8d meet the exact block sums)."""
    codes = w
    if qtype == T.Q4_1:
        d, m = np.ascontiguousarray(data.reshape(len(w), -1, 20)[:, :, :4]).view(np.float16).astype(np.float32).transpose(2, 0, 1)
        codes = w - np.repeat(m + 8 * d, 32, axis=1)
    step = np.repeat(act[0], 32)[:x.size]
    bound = np.abs(codes) @ (step / 2) * 1.001 + 1e-5 * (np.abs(w) @ np.abs(x))
    assert np.all(np.abs(out - w @ x) <= bound)


def test_block_products_without_avx2_match():
    """The generic-vector IR computes the same sums as the AVX2 instructions (compiled for Ivy
    Bridge: AVX and F16C, no AVX2)."""
    script = """
import numpy as np, sys
from gguf import GGMLQuantizationType as T, quantize
from xqrt.kernels import cpu
rng = np.random.default_rng(1)
w, x = rng.standard_normal((40, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
outs = []
for t in (T.Q4_1, T.Q4_0, T.Q8_0):
    for bits in (8, 16):
        act = cpu.new_act(64, bits)
        cpu.quantize_act(x, act)
        out = np.zeros(40, np.float32)
        cpu.matvec(np.ascontiguousarray(quantize(w, t)), int(t), x, act, out)
        outs.append(out)
np.save(sys.argv[1], np.array(outs))
"""
    import os
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for name, cpu_name in (("host", ""), ("ivybridge", "ivybridge")):
            env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, name))
            if cpu_name:
                env["NUMBA_CPU_NAME"] = cpu_name
            out = os.path.join(tmp, name + ".npy")
            subprocess.run([sys.executable, "-c", script, out], env=env, check=True)
            results.append(np.load(out))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_version_folders_unused_for_a_month_are_removed(tmp_path):
    """Every change of the kernel sources starts a new ~15 MB cache folder; importing xqrt removes
    the sibling folders whose last use (their stamp, else their own mtime) is older than
    jit_cache.STALE_DAYS, keeps recent ones and anything that is not a version folder, and stamps
    its own."""
    import os
    import subprocess
    import sys
    import time
    from xqrt import jit_cache
    base = tmp_path / "xqrt" / "numba"
    day = 86400
    now = 1e9
    folders = {"0123456789abcdef": 40, "1111111111111111": 10, "2222222222222222": 40, "notes": 40}
    for name, age in folders.items():
        (base / name / "sub").mkdir(parents=True)
        os.utime(base / name, (now - age * day,) * 2)
    (base / "2222222222222222" / "last-used").touch()
    os.utime(base / "2222222222222222" / "last-used", (now - 5 * day,) * 2)  # used 5 days ago
    (base / "3333333333333333.stale.77" / "sub").mkdir(parents=True)  # an interrupted removal
    current = base / "ffffffffffffffff"
    jit_cache.prune_stale(str(current), now=now)
    assert sorted(os.listdir(base)) == ["1111111111111111", "2222222222222222", "ffffffffffffffff", "notes"]
    assert os.path.getmtime(current / "last-used") == now

    # and on import, against the clock
    home = tmp_path / "home"
    for name, age in (("4444444444444444", 40), ("5555555555555555", 10)):
        (home / "xqrt" / "numba" / name).mkdir(parents=True)
        os.utime(home / "xqrt" / "numba" / name, (time.time() - age * day,) * 2)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(home)
    script = "import os, xqrt, numba\nprint(numba.config.CACHE_DIR)"
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    own = r.stdout.strip()
    assert sorted(os.listdir(home / "xqrt" / "numba")) == sorted(["5555555555555555", os.path.basename(own)])
    assert os.path.exists(os.path.join(own, "last-used"))


def test_kernels_are_cached_in_the_keyed_folder_when_numba_is_imported_first(tmp_path):
    """An embedder's script may import numba before xqrt; the kernels still go to
    ~/.cache/xqrt/numba/<sources digest>/, not to unkeyed __pycache__ folders that outlive a change
    to the helpers they inline."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    script = ("import numba, numpy as np, xqrt\nfrom xqrt import quant\n"
              "codes, scale = np.zeros(8, np.uint8), np.zeros(1, np.uint16)\n"
              "quant.quantize_row(np.ones(16, np.float32), 4, 16, codes, scale, scale.copy())\n"
              "print(numba.config.CACHE_DIR)")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    folder = r.stdout.strip()
    assert folder.startswith(str(tmp_path / "xqrt" / "numba")), folder
    assert any(name.startswith("quant.quantize_row") for _, _, names in os.walk(folder) for name in names)


def test_the_compiling_notice_is_for_the_kernels_the_engine_runs(tiny_gqa, tmp_path):
    """'compiling kernels (first run only …)' shows while the cache lacks the step of the engine's
    own mode: an fp16 KV run does not compile the latent caches' kernels, and was told so again
    on every later run."""
    import os
    import subprocess
    import sys
    script = ("import sys, xqrt\nmodes = sys.argv[2:]\nfor mode in modes:\n"
              "    engine = xqrt.Engine(sys.argv[1], cache=mode, verbose=True)\n    print(mode, file=sys.stderr)\n"
              "    if modes == ['fp16']:  # the first run: its step compiles fp16 KV's kernels\n"
              "        engine.warmup()")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    notices = []
    for modes in (["fp16"], ["fp16", "xquant"]):
        r = subprocess.run([sys.executable, "-c", script, str(tiny_gqa[1]), *modes], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-500:]
        notices += [line.split(":")[0] for line in r.stderr.splitlines() if "compiling" in line or line in modes]
    assert notices == ["xqrt", "fp16", "fp16", "xqrt", "xquant"]


def test_processes_compiling_one_kernels_overloads_at_once_keep_each_its_own(tmp_path):
    """Two processes save an int64 and a float64 overload of one cached kernel at once, timed so
    that with Numba's own saving both number theirs 1 and the index left names the other's code (a
    third process's int64 call then answered 3.0). Saved through jit_cache.LockedSaves, both
    overloads load and answer in their own types."""
    import os
    import subprocess
    import sys
    (tmp_path / "kernels.py").write_text("from numba import njit\n@njit(cache=True)\ndef f(x):\n    return x * 2 + 1\n")
    save = ("import os, sys, time\nfrom numba.core.caching import IndexDataCacheFile as F\n"
            "index_delay, data_delay = map(float, sys.argv[2:])\n"
            "save_index, save_data = F._save_index, F._save_data\n"
            "F._save_index = lambda self, o: (time.sleep(index_delay), save_index(self, o))\n"
            "F._save_data = lambda self, n, d: (time.sleep(data_delay), save_data(self, n, d))\n"
            "import kernels\nfrom xqrt import jit_cache\njit_cache.lock_saves(kernels)\n"
            "kernels.f(eval(sys.argv[1]))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))
    # the int64 process writes its index last, the float64 one its data last
    procs = [subprocess.Popen([sys.executable, "-c", save, arg, *delays], env=env)
             for arg, delays in (("1", ("0.5", "0")), ("1.5", ("0.2", "1.0")))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    load = "import kernels\nprint(repr(kernels.f(1)), repr(kernels.f(1.5)), sum(kernels.f.stats.cache_hits.values()))"
    r = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["3", "4.0", "2"], r.stdout + r.stderr[-500:]


def test_a_cached_kernel_calling_a_parallel_one_runs_first_in_a_fresh_process(tmp_path):
    """numba#8578: compiled against a parallel callee loaded from the cache, a cached kernel
    forgets to start the thread pool, and called first in a later process it segfaults. Importing
    xqrt starts the pool."""
    import os
    import subprocess
    import sys
    (tmp_path / "kernels.py").write_text(
        "import numpy as np\nfrom numba import njit, prange\n"
        "@njit(parallel=True, cache=True)\ndef inner(n):\n    out = np.zeros(n)\n"
        "    for i in prange(n):\n        out[i] = i\n    return out\n"
        "@njit(cache=True)\ndef outer(n):\n    return inner(n).sum()\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))
    for call in ("kernels.inner(8)", "kernels.outer(8)", "print(kernels.outer(8))"):  # compile, link, load
        r = subprocess.run([sys.executable, "-c", f"import xqrt, kernels; {call}"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (call, r.returncode, r.stderr[-500:])
    assert r.stdout.strip() == "28.0"


def test_quantize_act_codes():
    x = rng.standard_normal(64).astype(np.float32) * np.repeat([1e-3, 50.0], 32).astype(np.float32)
    x[40:48] = 0.0
    xd, xsum, xerr, x8 = act = cpu.new_act(64)
    cpu.quantize_act(x, act)
    np.testing.assert_allclose(xsum, x.reshape(2, 32).sum(1), rtol=1e-5)
    np.testing.assert_allclose(xd, np.abs(x).reshape(2, 32).max(1) / 127, rtol=1e-6)
    np.testing.assert_array_equal(x8, np.round(x / np.repeat(xd, 32)).astype(np.int8))
    np.testing.assert_allclose(xerr, xsum - xd * x8.reshape(2, 32).sum(1), rtol=1e-5, atol=1e-6 * np.abs(x).max())


def test_matvec_n_runs_several_products_of_mixed_types_in_one_region():
    shapes, types = [(70, 96), (33, 96), (129, 96)], [T.Q4_1, T.Q8_0, T.F16]
    ws = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    data = [np.ascontiguousarray(blocks(w, t)) for w, t in zip(ws, types)]
    x = rng.standard_normal(96).astype(np.float32)
    act = cpu.new_act(96)
    cpu.quantize_act(x, act)
    outs = tuple(np.zeros(s[0], np.float32) for s in shapes)
    cpu.matvec_n(tuple(data), tuple(int(t) for t in types), x, act, outs)
    for d, t, w, out in zip(data, types, ws, outs):
        assert_within_act_rounding(out, reference(d, t, w.shape), d, t, x, act)


@pytest.mark.parametrize("n, width, cols", [(7, 192, 192), (5, 40, 24), (4, 16, 16), (11, 64, 60), (1, 576, 200), (3, 8, 0)])
def test_rebuild_register_blocked_product(n, width, cols):
    lat = rng.standard_normal((n, width)).astype(np.float32)
    m = rng.standard_normal((width, cols)).astype(np.float32)
    out = np.zeros((n, cols or width), np.float32)
    cpu.rebuild(lat, n, m if cols else np.zeros((0, 0), np.float32), out)
    np.testing.assert_allclose(out, lat @ m if cols else lat, rtol=1e-5, atol=1e-6 * width)  # float32 sums of width terms


def test_expf_matches_numpy():
    from numba import njit
    x = np.concatenate([np.linspace(-90, 90, 20001), rng.standard_normal(1000) * 5]).astype(np.float32)
    got = njit(lambda v: np.array([cpu.expf(e) for e in v], np.float32))(x)
    want = np.exp(np.clip(x, -87.3, 88.0).astype(np.float64))
    assert np.all(np.abs(got / want - 1) < 3e-7)


def test_half_conversions_round_to_nearest_even():
    x = (rng.standard_normal(10000) * 1000).astype(np.float32)
    out = np.zeros((1, x.size), np.uint16)
    cpu.to_f16(x[None], out)
    np.testing.assert_array_equal(out[0], x.astype(np.float16).view(np.uint16))


def test_rmsnorm_rope_silu():
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    out = np.zeros_like(x)
    cpu.rmsnorm_rows(x, w, 1e-5, out)
    np.testing.assert_allclose(out, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-5)

    inv = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    q = x.copy()
    cpu.rope_rows(q, 4, 16, 5, inv)
    pairs = x.reshape(3, 4, 8, 2)
    ang = (5 + np.arange(3))[:, None, None] * inv[None, None, :]
    ref = np.stack([pairs[..., 0] * np.cos(ang) - pairs[..., 1] * np.sin(ang),
                    pairs[..., 0] * np.sin(ang) + pairs[..., 1] * np.cos(ang)], -1).reshape(3, 64)
    np.testing.assert_allclose(q, ref, rtol=1e-4, atol=1e-5)

    g = np.zeros_like(x)
    cpu.silu_mul_rows(x, w[None].repeat(3, 0), g)
    np.testing.assert_allclose(g, x / (1 + np.exp(-x)) * w, rtol=1e-5, atol=1e-6)


def test_decode_attention_matches_prefill_attention():
    n_head, n_kv, hd, n = 6, 2, 16, 37
    q = rng.standard_normal((n, n_head * hd)).astype(np.float32)
    k = rng.standard_normal((n, n_kv * hd)).astype(np.float32).astype(np.float16)
    v = rng.standard_normal((n, n_kv * hd)).astype(np.float32).astype(np.float16)
    bound = np.arange(n) + 1  # every query reads positions ≤ its own from the one history
    kf, vf = k.astype(np.float32), v.astype(np.float32)
    ref = mixed_attention(q, 0, kf, vf, kf[:0], vf[:0], bound, bound, n_head, n_kv)
    # direct softmax reference for the last row, one head
    s = q[-1, :hd] @ k[:, :hd].astype(np.float32).T / np.sqrt(hd)
    p = np.exp(s - s.max()); p /= p.sum()
    np.testing.assert_allclose(ref[-1, :hd], p @ v[:, :hd].astype(np.float32), rtol=1e-5, atol=1e-6)
    out = np.zeros(n_head * hd, np.float32)
    cpu.attend_f16(q[-1], k.view(np.uint16), v.view(np.uint16), n, n_head, n_kv, hd,
                   np.zeros((n_head, n), np.float32), out)
    np.testing.assert_allclose(out, ref[-1], rtol=1e-5, atol=1e-6)


def test_k_quant_tensor_is_converted_to_q8_0_at_load(tmp_path):
    """K-quants are not read natively: the loader re-blocks them into Q8_0, a slice of rows at a time."""
    import gguf
    from xqrt.gguf_model import Q8_0, _to_native
    n_rows, n_cols = 8, 512
    raw = rng.integers(0, 256, (n_rows, n_cols // 256 * 144), dtype=np.uint8)
    raw[:, 0:4] = np.array([0.01, 0.002], np.float16).view(np.uint8)  # sane d and dmin in every block
    raw[:, 144:148] = raw[:, 0:4]
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("w", raw, raw_dtype=T.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tensor = gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors[0]
    m = _to_native(tensor)
    assert m.qtype == Q8_0 and m.data.shape == (n_rows, n_cols // 32 * 34)
    dense = np.zeros((n_rows, n_cols), np.float32)
    cpu.dequantize(m.data, m.qtype, dense)
    ref = dequantize(raw, T.Q4_K).reshape(n_rows, n_cols)
    np.testing.assert_allclose(dense, ref, atol=np.abs(ref).max() / 100)


def test_block_hadamard_is_orthonormal_and_spreads_an_outlier():
    from xqrt.factors import block_hadamard
    h = block_hadamard(24, 8)
    np.testing.assert_allclose(h @ h.T, np.eye(24), atol=1e-6)
    spike = np.zeros(24, np.float32)
    spike[3] = 8.0
    np.testing.assert_allclose(np.abs(spike @ h)[:8], np.full(8, 8.0 / np.sqrt(8)), rtol=1e-6)
    assert np.all((spike @ h)[8:] == 0)


def test_aligned_copies_onto_a_cache_line_only_when_needed():
    a = rng.standard_normal((7, 24)).astype(np.float32)
    off = np.empty(a.size + 32, np.float32)
    start = (-off.ctypes.data % 64) // 4 + 4  # 16 bytes past a line
    unaligned = off[start:start + a.size].reshape(a.shape)
    unaligned[...] = a
    got = cpu.aligned(unaligned)
    assert got.ctypes.data % 64 == 0 and got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(got, a)
    assert cpu.aligned(got) is got
    np.testing.assert_array_equal(cpu.aligned(a.T.astype(np.float64)), a.T)
