"""Fixtures: tiny random Llama checkpoints converted to GGUF by convert/hf_to_gguf_xq.py, and the\nreal SmolLM2 file."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

# No GPU here: the CUDA kernels run in Numba's simulator (set before Numba is first imported).
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import cudasim
    cudasim.install()

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "convert"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import hf_to_gguf_xq  # noqa: E402

SMOLLM2_ENV = "XQRT_SMOLLM2"  # optional path override for the SmolLM2 GGUF
SMOLLM2_HF_ENV = "XQRT_SMOLLM2_HF"  # optional: an existing HF-format copy (models/smollm2_hf.py)


def byte_vocab():
    """A byte-level vocabulary: the 256 byte symbols, a few merges, and chat control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    bytes_to_unicode = sorted(alphabet, key=lambda ch: ord(ch))
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bytes_to_unicode
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens += ["Ġt", "he", "Ġthe", "in", "an"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


def save_checkpoint(model, out_dir, vocab=None, max_shard_size=None):
    """An HF checkpoint directory as `save_pretrained` writes it, with a byte-level BPE
    tokenizer.json (llama.cpp's `smollm` pre-tokenizer: digits one by one) for `vocab`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tokens, merges, types = vocab or byte_vocab()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    vocab_ids = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab_ids, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": tokens[1], "eos_token": tokens[2], "add_bos_token": False,
                   "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}, f)
    return str(out_dir)


def convert(hf_dir, out, *flags):
    """convert/hf_to_gguf_xq.py, in process; the output path."""
    code = hf_to_gguf_xq.main([str(hf_dir), "-o", str(out), *flags])
    assert code == 0, f"conversion of {hf_dir} failed"
    return str(out)


def write_llama_gguf(tmp_dir, model, outtype="f32", *flags):
    """A tiny model as a plain GGUF (no XQuant keys: the caches compute their factors at load)."""
    hf_dir = save_checkpoint(model, os.path.join(tmp_dir, f"hf-{outtype}"))
    return convert(hf_dir, os.path.join(tmp_dir, f"{outtype}.gguf"), "--outtype", outtype, "--no-xq", *flags)


def tiny_llama(n_head=4, n_kv_head=2, hidden=128, layers=2, ff=256, n_vocab=None, seed=0, cls="Llama", **config):
    """A random LlamaForCausalLM (or Mistral…); `config` adds or overrides LlamaConfig fields."""
    import torch
    import transformers
    torch.manual_seed(seed)
    fields = dict(vocab_size=n_vocab or len(byte_vocab()[0]), hidden_size=hidden, intermediate_size=ff,
                  num_hidden_layers=layers, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
    fields.update(config)
    cfg = getattr(transformers, f"{cls}Config")(**fields)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # random init is too tame: give the norms some spread
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    model = tiny_llama(n_head=4, n_kv_head=2)
    return model, write_llama_gguf(tmp_path_factory.mktemp("gqa"), model)


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory):
    model = tiny_llama(n_head=4, n_kv_head=4, seed=1)
    return model, write_llama_gguf(tmp_path_factory.mktemp("mha"), model)


@pytest.fixture(scope="session")
def smollm2_path():
    path = os.environ.get(SMOLLM2_ENV)
    if path:
        return path
    from xqrt.default_model import default_model_path
    return default_model_path(quiet=True)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path, tmp_path_factory):
    """SmolLM2 as an HF checkpoint, made offline from the GGUF (about a minute)."""
    path = os.environ.get(SMOLLM2_HF_ENV)
    if path:
        return path
    import smollm2_hf
    return smollm2_hf.make(str(tmp_path_factory.mktemp("smollm2_hf")))


@pytest.fixture
def code_path(request, monkeypatch):
    """Which of xqrt.kernels.cuda's two code paths the kernels take (parametrize indirectly; the
    default is the simulator's). "gpu" runs a GPU's — warp-shuffle reductions, libdevice's
    round-to-nearest product — in the simulator, which has neither: NumPy's float32 product, and
    lanes that swap values through a barrier of their warp's own, so that a shuffle a lane of the
    warp does not reach (undefined on a GPU) fails the test, not a GPU run."""
    path = getattr(request, "param", "simulator")
    if path == "simulator":
        return path
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("on a GPU every test takes the GPU's path")
    import cudasim
    from numba.cuda import libdevice
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    from xqrt.kernels import cuda as kc

    def shfl_xor_sync(self, mask, value, lane_mask):
        assert mask == 0xFFFFFFFF, "the kernels shuffle whole warps"
        thread = cudasim.current_thread()
        block = thread._manager  # one per block: the simulator runs a grid's blocks one at a time
        warp, lane = divmod(thread.thread_id, 32)
        warps = block.__dict__.setdefault("warps", {})
        if warp not in warps:
            lanes = min(32, int(np.prod(block._block_dim)) - 32 * warp)
            warps[warp] = cudasim.Barrier(lanes), [[None] * 32, [None] * 32], [0] * 32
        barrier, values, calls = warps[warp]
        # two buffers, alternate shuffles: a lane can write one again only after every lane has
        # passed the next barrier, so after every lane has read it
        buf = values[calls[lane] % 2]
        calls[lane] += 1
        buf[lane] = value
        barrier.wait()  # a lane of the warp that never comes: no thread can go on, the launch fails
        return type(value)(buf[lane ^ lane_mask])

    monkeypatch.setattr(FakeCUDAModule, "shfl_xor_sync", shfl_xor_sync, raising=False)
    monkeypatch.setattr(libdevice, "fmul_rn", lambda a, b: np.float32(a) * np.float32(b))
    monkeypatch.setattr(kc, "SHUFFLE", True)
    return path


def launch_types(args) -> tuple:
    """The Numba type names of a simulated kernel launch's arguments: the signature the kernel would
    be compiled for on a GPU."""
    import numba
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return tuple(str(numba.typeof(a._ary if isinstance(a, FakeCUDAArray) else a)).replace("readonly ", "")
                 for a in args)


def pytest_configure(config):
    """XQRT_KERNEL_SIGNATURES=FILE: note the argument types of every CUDA kernel the simulator runs,
    and its threads per block, for bench/ptx_check.py to compile them for a real GPU and check that
    the GPU can launch them so (the simulator runs them as Python, types nothing and has no
    registers to run out of)."""
    path = os.environ.get("XQRT_KERNEL_SIGNATURES")
    if not path or os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    import atexit

    from numba.cuda.simulator.kernel import FakeCUDAKernel
    seen = set()
    launch = FakeCUDAKernel.__call__

    def recording(self, *args):
        if not self._device and self.fn.__module__.startswith(("xqrt.", "bench_gpu")):  # not a test's own
            closure = tuple(c.cell_contents for c in self.fn.__closure__ or () if type(c.cell_contents) is int)
            threads = self.block_dim[0] * self.block_dim[1] * self.block_dim[2]
            seen.add((self.fn.__module__, self.fn.__qualname__, closure, launch_types(args), threads))
        return launch(self, *args)

    FakeCUDAKernel.__call__ = recording
    atexit.register(lambda: open(path, "w").write(json.dumps(sorted(seen), indent=0)))
