"""Calibration (xqrt.calibrate) on a tiny model. Per-layer bits: the budget holds, the layer whose
demotion costs most keeps its bits, and the command line prints a flag the engine accepts. Key
channel weights: one per layer and channel."""
import numpy as np
import pytest

from xqrt import Engine
from xqrt.calibrate import allocate_bits
from xqrt.calibrate import main as calibrate_main
from xqrt.errors import XQError


def test_allocation_fits_the_budget_and_keeps_the_most_sensitive_layer(tiny_gqa):
    _, path = tiny_gqa
    eng = Engine(path, ctx=256)
    rng = np.random.default_rng(3)
    wins = [list(rng.integers(0, eng.config.vocab_size, 192)) for _ in range(2)]

    def size(layer_bits):
        cache = eng.new_cache("xquant", layer_bits=layer_bits)
        cache.n_tokens = 192
        return cache.bytes_per_token()

    n = eng.config.n_layer
    budget = (size((3,) * n) + size((3,) * (n - 1) + (2,))) / 2  # one layer has to go down
    bits, sensitivity = allocate_bits(eng, wins, "xquant", budget, progress=False)
    assert size(bits) <= budget and sorted(bits) == [2] + [3] * (n - 1)
    assert bits[int(np.argmax(sensitivity))] == 3


def test_command_line_prints_layer_bits(tiny_gqa, tmp_path, capsys):
    _, path = tiny_gqa
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(3000)))
    assert calibrate_main([path, "-f", str(text), "--ctx", "128", "--windows", "1", "--ratio", "4.5",
                           "--bits", "3"]) == 0
    flag = capsys.readouterr().out.strip().split()
    assert flag[0] == "--layer-bits"
    assert Engine(path, ctx=128, cache="xquant", layer_bits=tuple(int(b) for b in flag[1].split(",")))


def test_key_channel_weights(tiny_gqa, tiny_mha):
    """One non-negative weight per layer and key latent channel; MHA models have none."""
    from xqrt.calibrate import key_channel_weights
    eng = Engine(tiny_gqa[1], ctx=256)
    wins = [list(np.random.default_rng(w).integers(0, eng.config.vocab_size, 256)) for w in range(2)]
    weights = key_channel_weights(eng, wins, group=64)
    assert weights.shape == (eng.config.n_layer, eng.config.kv_dim)
    assert np.all(weights >= 0) and np.all(weights.std(1) > 0)
    with pytest.raises(XQError, match="GQA"):
        key_channel_weights(Engine(tiny_mha[1], ctx=256), wins, group=64)
