"""Hugging Face Llama-family checkpoint → GGUF, with the XQuant factors computed offline.

    python convert/hf_to_gguf_xq.py HF_DIR [-o OUT.gguf] [--outtype f32|f16|bf16|q8_0|q4_0|q4_1]
                                   [--no-xq] [--cache MODE] [--bits B] [--group G] [--base-layers N]
    python convert/hf_to_gguf_xq.py --add-xq IN.gguf -o OUT.gguf
    ... [--calibrate TEXT [--ratio R] [--calib-windows N] [--calib-ctx T]]

HF_DIR holds config.json (LlamaForCausalLM or MistralForCausalLM), model.safetensors or shards
listed in model.safetensors.index.json (float32 / float16 / bfloat16), and tokenizer.json
(byte-level BPE → the `gpt2` vocabulary, merges and pre-tokenizer name) or tokenizer.model
(SentencePiece → `llama` tokens, scores and types). Tensor names and the Q/K row permutation are
llama.cpp's, so xqrt and the llama.cpp ecosystem read the same files.

XQuant: for a GQA model each layer gets blk.N.xq_{uk,mk,uv,mv,ukv} (see xqrt/factors.py), from
an SVD of Wk and Wv *as written* (after --outtype rounding), so rebuilding K and V from them is
exact when the cache does not quantize. MHA models need no factors. The xquant.* keys give the
factor format version, rank and layers, and the default cache recipe (xquant.cache.*) that
`python -m xqrt.run OUT.gguf` uses without flags. --no-xq writes a plain GGUF: no factors, no
recipe. --add-xq adds factors and recipe to an existing GGUF (llama.cpp's included), copying
every other key and tensor byte for byte. --calibrate measures, on the written file and windows
of TEXT, each key latent channel's weight (blk.N.xq_kw, kv_dim float32: the runtime spreads 2- and
3-bit key latents' bits over channels by it) and, with --ratio R, which layers can drop to the next
narrower width for the cache to be R× smaller than fp16 KV, stored as bits per layer in the recipe
(xqrt.calibrate; the file is rewritten once or twice).

Tensors stream one at a time, so peak memory stays near the largest tensor. The output appears
only when complete: it is written under a temporary name and renamed, and removed on any error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from xqrt.cache import RECIPE_KEYS, RECIPE_TYPES, CacheOptions, check_recipe, default_group  # noqa: E402
from xqrt.errors import XQError, cli_exit_code  # noqa: E402
from xqrt.factors import (FACTOR_NAMES, FORMAT_VERSION, KEY_LAYERS, KEY_RANK, KEY_VERSION,  # noqa: E402
                          compute_factors, dense_kv, factor_shapes, needs_factors)
from xqrt.gguf_model import ModelConfig, load_model  # noqa: E402
from xqrt.tokenizer import CONTROL, USER_DEFINED, pre_tokenizer_name  # noqa: E402

OUTTYPES = {"f32": (T.F32, gguf.LlamaFileType.ALL_F32), "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
            "q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0), "q4_1": (T.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1)}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
DEFAULT_RECIPE = {"mode": "xquant", "bits": 3, "rotate": True, "sinks": 4}  # group: default_group of the model
KEY_GROUP_GQA = 128  # GQA: key latents in groups of 128 positions, values in the model's default group (the recipes
# measured in docs/quality-recipes.md: on SmolLM2 the longer key groups cost fewer scale bytes than they lose)
# transformers module → llama.cpp tensor role, per layer
LAYER_ROLES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_CHUNK_ROWS = 2048  # rows converted at a time: bounds the float32 temporaries of big matrices


# ---- the checkpoint ------------------------------------------------------------------------
@dataclass
class HFModel:
    config: ModelConfig
    tied: bool
    rope_freq_factors: np.ndarray | None  # Llama 3's per-frequency RoPE factors, written as rope_freqs


def read_config(hf_dir: Path) -> HFModel:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise XQError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        hp = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XQError(f"{path}: not valid JSON ({e})") from None
    archs = hp.get("architectures") or [hp.get("model_type", "?")]
    if archs[0] not in ARCHITECTURES:
        raise XQError(f"unsupported architecture {archs[0]!r} (supported: {', '.join(ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if hp.get(flag):
            raise XQError(f"unsupported: {flag} is set in config.json (xqrt's Llama has no biases)")
    if hp.get("hidden_act", "silu") != "silu":
        raise XQError(f"unsupported activation {hp['hidden_act']!r} (Llama uses silu)")
    try:
        n_head = int(hp["num_attention_heads"])
        d = int(hp["hidden_size"])
        head_dim = int(hp.get("head_dim") or d // n_head)
        rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", hp.get("rope_theta", 10000.0)))
        cfg = ModelConfig(
            arch="llama", n_layer=int(hp["num_hidden_layers"]), d_model=d, n_ff=int(hp["intermediate_size"]),
            n_head=n_head, n_kv_head=int(hp.get("num_key_value_heads") or n_head), head_dim=head_dim,
            rope_dim=head_dim, rope_base=theta, rope_scale=1.0, norm_eps=float(hp.get("rms_norm_eps", 1e-6)),
            vocab_size=int(hp["vocab_size"]), ctx_train=int(hp.get("max_position_embeddings", 4096)),
            name=str(hp.get("_name_or_path") or hp.get("_model_name_or_path") or hf_dir.name))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise XQError(f"{path}: missing or bad hyperparameter ({type(e).__name__}: {e})") from None
    if problem := cfg.problem():
        raise XQError(f"{path}: the hyperparameters do not fit together: {problem}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    factors = None
    if kind == "linear":
        cfg.rope_scale = float(rope["factor"])
    elif kind == "llama3":
        factors = llama3_rope_factors(cfg, rope)
    elif kind != "default":
        raise XQError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")
    window = hp.get("sliding_window")
    if window and window < cfg.ctx_train:
        print(f"warning: sliding window attention ({window} tokens) is not implemented; outputs are exact "
              f"for contexts up to {window} tokens", file=sys.stderr)
    return HFModel(cfg, bool(hp.get("tie_word_embeddings", False)), factors)


def llama3_rope_factors(cfg: ModelConfig, rope: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling as per-frequency divisors (GGUF rope_freqs):
    long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    inv = 1.0 / cfg.rope_base ** (np.arange(0, cfg.rope_dim, 2, dtype=np.float64) / cfg.rope_dim)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


class Checkpoint:
    """The safetensors tensors of a checkpoint (one file or index + shards), memory-mapped lazily."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise XQError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (hf_dir / f).is_file():
                    raise XQError(f"{hf_dir}: shard {f} listed in {index.name} is missing")
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            if not files:
                other = [p.name for p in hf_dir.glob("*.bin")]
                raise XQError(f"{hf_dir}: no *.safetensors weights" + (f" ({other[0]} is a PyTorch pickle; "
                              "re-save with save_pretrained(safe_serialization=True))" if other else ""))
        self.tensors = {}
        for f in files:
            path = hf_dir / f
            try:
                found = gguf.utility.SafetensorsLocal(path).tensors
            except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise XQError(f"{path}: corrupt safetensors header ({e})") from None
            size = path.stat().st_size
            for name, t in found.items():
                if t.dtype not in SAFETENSORS_DTYPES:
                    raise XQError(f"{path}: tensor {name!r} has dtype {t.dtype} (supported: F32, F16, BF16)")
                r, itemsize = t.data_range, np.dtype(SAFETENSORS_DTYPES[t.dtype]).itemsize
                if r.offset + r.size > size or r.size != math.prod(t.shape) * itemsize:
                    raise XQError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupt shard)")
                self.tensors[name] = t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows [r0, r1) as float32 (the whole tensor for 1-D ones). Plain reads, not a memory
        map: mapped pages would count as resident until the whole tensor was unmapped."""
        t = self.tensors[name]
        dtype = np.dtype(SAFETENSORS_DTYPES[t.dtype])
        rows = t.shape[0]
        r1 = rows if r1 is None else min(r1, rows)
        row_elems = math.prod(t.shape[1:])
        raw = np.fromfile(t.data_range.filename, dtype, count=(r1 - r0) * row_elems,
                          offset=t.data_range.offset + r0 * row_elems * dtype.itemsize)
        raw = raw.reshape((r1 - r0, *t.shape[1:]))
        if t.dtype == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False)


def hf_name(gguf_name: str) -> str:
    """transformers' parameter name of a GGUF weight (the inverse of the converter's naming)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, i, role, _ = gguf_name.split(".")
    module = next(hf for hf, r in LAYER_ROLES.items() if r == role)
    return f"model.layers.{i}.{module}.weight"


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, HF's rotate-half pairs (i, i + hd/2) become
    adjacent rows (2i, 2i+1), the pairwise RoPE layout GGUF files use."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rows: GGUF's Q/K rows back in HF's order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- what gets written ---------------------------------------------------------------------
@dataclass
class Planned:
    """One output tensor: its numpy shape (rows, cols) and ggml type, and how to make its data."""
    name: str
    shape: tuple[int, ...]
    qtype: T
    make: Callable[[], np.ndarray]

    @property
    def stored_shape(self) -> tuple[int, ...]:  # as GGUFWriter takes it: bytes per row for block types
        if self.qtype in (T.F32, T.F16):
            return self.shape
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block * size)

    @property
    def dtype(self):
        return {T.F32: np.float32, T.F16: np.float16}.get(self.qtype, np.uint8)

    @property
    def nbytes(self) -> int:
        return math.prod(self.stored_shape) * np.dtype(self.dtype).itemsize


def encode(rows: np.ndarray, qtype: T) -> np.ndarray:
    """float32 rows in the output format (the array GGUFWriter writes)."""
    if qtype == T.F32:
        return rows
    if qtype == T.F16:
        return rows.astype(np.float16)
    return gguf.quantize(rows, qtype)


def decode(data: np.ndarray, qtype: T, shape) -> np.ndarray:
    """The float32 values a reader sees in `data` (what the factors must reproduce)."""
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32)
    return gguf.dequantize(data, qtype).reshape(shape).astype(np.float32)


def tensor_type(name: str, shape: tuple[int, ...], outtype: T) -> T:
    if len(shape) == 1:
        return T.F32  # norms: small, and llama.cpp keeps them exact
    if outtype in (T.Q4_0, T.Q4_1) and name in ("token_embd.weight", "output.weight"):
        outtype = T.Q8_0  # like llama.cpp's quantize, the embedding/output stay near lossless
    block = gguf.GGML_QUANT_SIZES[outtype][0]
    return outtype if shape[-1] % block == 0 else T.F16  # rows that do not fill blocks stay F16


def expected_shapes(m: HFModel) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model must have, with its shape (rows = output features)."""
    c = m.config
    d, q, kv = c.d_model, c.q_dim, c.kv_dim
    per_layer = {"input_layernorm": (d,), "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
                 "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q), "post_attention_layernorm": (d,),
                 "mlp.gate_proj": (c.n_ff, d), "mlp.up_proj": (c.n_ff, d), "mlp.down_proj": (d, c.n_ff)}
    out = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(c.n_layer):
        out.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return out


def check_tensors(ckpt: Checkpoint, m: HFModel):
    want = expected_shapes(m)
    if not m.tied and "lm_head.weight" in ckpt.tensors:
        want["lm_head.weight"] = (m.config.vocab_size, m.config.d_model)
    elif not m.tied:
        m.tied = True  # no lm_head: the embedding is the output (llama.cpp does the same)
    for name, shape in want.items():
        if name not in ckpt.tensors:
            raise XQError(f"checkpoint has no tensor {name!r}")
        if ckpt.shape(name) != shape:
            raise XQError(f"tensor {name!r} has shape {list(ckpt.shape(name))}, but config.json implies {list(shape)}")
    for name in ckpt.tensors:
        if name not in want and not name.endswith("rotary_emb.inv_freq") and name != "lm_head.weight":
            raise XQError(f"unexpected tensor {name!r} (not part of a Llama model)")


def plan_weights(ckpt: Checkpoint, m: HFModel, outtype: T, with_factors: bool) -> list[Planned]:
    """The output tensors in file order, each layer followed by its factors. A layer's factors
    are computed from its K/V weights as encoded, which the closures hand over in `written`."""
    c = m.config
    written: dict[str, tuple[np.ndarray, T]] = {}

    def weight(gguf_name: str, src: str, shape, qtype: T, n_head: int | None = None):
        def make():
            if n_head is not None:  # Q/K: permute whole (these are at most d × d)
                data = encode(permute_rows(ckpt.read(src), n_head), qtype)
            elif len(shape) == 1:
                data = ckpt.read(src)
            else:
                data = None
                for r in range(0, shape[0], _CHUNK_ROWS):
                    part = encode(ckpt.read(src, r, r + _CHUNK_ROWS), qtype)
                    if data is None:
                        data = np.empty((shape[0], part.shape[1]), part.dtype)
                    data[r:r + len(part)] = part
            if gguf_name.endswith(("attn_k.weight", "attn_v.weight")) and with_factors:
                written[gguf_name] = data, qtype
            return data
        return Planned(gguf_name, shape, qtype, make)

    def factor(i: int, name: str, shape):
        def make():
            if name == FACTOR_NAMES[0]:
                wk = decode(*written.pop(f"blk.{i}.attn_k.weight"), (c.kv_dim, c.d_model)).T
                wv = decode(*written.pop(f"blk.{i}.attn_v.weight"), (c.kv_dim, c.d_model)).T
                written["factors"] = compute_factors(np.ascontiguousarray(wk), np.ascontiguousarray(wv))
            f = written["factors"]
            return f.pop(name)
        return Planned(f"blk.{i}.xq_{name}", shape, T.F32, make)

    def put(gguf_name, src, n_head=None):
        shape = ckpt.shape(src)
        return weight(gguf_name, src, shape, tensor_type(gguf_name, shape, outtype), n_head)

    plan = [put("token_embd.weight", "model.embed_tokens.weight")]
    if m.rope_freq_factors is not None:
        plan.append(Planned("rope_freqs.weight", m.rope_freq_factors.shape, T.F32, lambda: m.rope_freq_factors))
    for i in range(c.n_layer):
        for hf, role in LAYER_ROLES.items():
            heads = {"attn_q": c.n_head, "attn_k": c.n_kv_head}.get(role)
            plan.append(put(f"blk.{i}.{role}.weight", f"model.layers.{i}.{hf}.weight", heads))
        if with_factors:
            plan += [factor(i, n, s) for n, s in factor_shapes(c).items()]
    plan.append(put("output_norm.weight", "model.norm.weight"))
    if not m.tied:
        plan.append(put("output.weight", "lm_head.weight"))
    return plan


# ---- the tokenizer ---------------------------------------------------------------------------
def add_tokenizer(w: gguf.GGUFWriter, hf_dir: Path, n_vocab: int):
    """Vocabulary, merges or scores, special ids, BOS/EOS flags and chat template, as llama.cpp's
    converter writes them; the vocabulary is padded to the model's rows with unused tokens."""
    if (hf_dir / "tokenizer.model").is_file():
        try:
            vocab = gguf.vocab.SentencePieceVocab(hf_dir)
        except RuntimeError as e:  # sentencepiece missing
            raise XQError(f"tokenizer.model needs the sentencepiece package ({e}): pip install sentencepiece") from None
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text.decode("utf-8", errors="replace"))
            scores.append(score)
            types.append(int(kind))
        model, merges = "llama", False
    elif (hf_dir / "tokenizer.json").is_file():
        tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        bpe = tok.get("model") or {}
        decoder = (tok.get("decoder") or {}).get("type")
        if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or decoder != "ByteLevel":
            raise XQError(f"{hf_dir}/tokenizer.json is not a byte-level BPE tokenizer (supported: byte-level "
                          "BPE tokenizer.json, SentencePiece tokenizer.model)")
        pre = pre_tokenizer_name(tok.get("pre_tokenizer"))
        if pre is None:
            raise XQError(f"{hf_dir}/tokenizer.json: pre-tokenizer {json.dumps(tok.get('pre_tokenizer'))[:200]} "
                          "is none that xqrt knows (gpt2, smollm, llama-bpe, qwen2)")
        by_id = {i: t for t, i in bpe["vocab"].items()}
        added = {a["id"]: a for a in tok.get("added_tokens", [])}
        by_id.update({i: a["content"] for i, a in added.items()})
        if set(by_id) != set(range(len(by_id))):
            raise XQError(f"{hf_dir}/tokenizer.json: token ids are not contiguous from 0")
        tokens = [by_id[i] for i in range(len(by_id))]
        types = [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added else int(gguf.TokenType.NORMAL)
                 for i in range(len(tokens))]
        scores, model, merges = None, "gpt2", True
        w.add_tokenizer_pre(pre)
    else:
        raise XQError(f"{hf_dir}: no tokenizer.json or tokenizer.model")
    if len(tokens) > n_vocab:
        raise XQError(f"tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    pad = n_vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [int(gguf.TokenType.UNUSED)] * pad
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores + [-1000.0] * pad)
    special = gguf.vocab.SpecialVocab(hf_dir, load_merges=merges, n_vocab=n_vocab)
    special.add_special_token.setdefault("bos", model == "llama")  # what each vocabulary kind implies
    if model == "gpt2":
        w.add_add_space_prefix(False)
    special.add_to_gguf(w, quiet=True)


# ---- writing -----------------------------------------------------------------------------------
def write_gguf(out: Path, arch: str, add_keys: Callable[[gguf.GGUFWriter], None], plan: list[Planned],
               alignment: int | None = None):
    """Header, then each tensor as it is made; `out` appears only when complete."""
    from tqdm import tqdm
    if out.is_dir():
        raise XQError(f"output {out} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        if alignment:
            w.data_alignment = alignment
        add_keys(w)
        for t in plan:
            w.add_tensor_info(t.name, t.stored_shape, np.dtype(t.dtype), t.nbytes,
                              raw_dtype=None if t.qtype in (T.F32, T.F16) else t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc=f"writing {out.name}",
                  file=sys.stderr, disable=None) as bar:
            for t in plan:
                data = np.ascontiguousarray(t.make())
                if data.nbytes != t.nbytes or data.dtype != np.dtype(t.dtype):
                    raise XQError(f"internal: tensor {t.name} came out as {data.dtype} {data.shape}, "
                                  f"planned {np.dtype(t.dtype)} {t.stored_shape}")
                w.write_tensor_data(data)
                bar.update(data.nbytes)
                del data
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def add_xquant_keys(w: gguf.GGUFWriter, cfg: ModelConfig, args, factors: bool):
    """xquant.version / rank / layers, and the cache recipe (flags given, else DEFAULT_RECIPE)."""
    recipe = {**DEFAULT_RECIPE, "group": default_group(cfg)}
    if needs_factors(cfg) and getattr(args, "group", None) is None:  # a --group given sets both, as on xqrt.run
        recipe.update(group=KEY_GROUP_GQA, value_group=default_group(cfg))
    for k in RECIPE_KEYS:
        if getattr(args, "cache" if k == "mode" else k, None) is not None:
            recipe[k] = getattr(args, "cache" if k == "mode" else k)
    options = CacheOptions(**{k: v for k, v in recipe.items() if k != "mode"})
    check_recipe(recipe["mode"], cfg, options)
    w.add_uint32(KEY_VERSION, FORMAT_VERSION)
    if factors:
        w.add_uint32(KEY_RANK, cfg.kv_dim)
        w.add_array(KEY_LAYERS, list(range(cfg.n_layer)))
    w.add_string(RECIPE_KEYS["mode"], recipe.pop("mode"))
    for k, v in recipe.items():
        kind = RECIPE_TYPES.get(k, int)
        if kind is bool:
            w.add_bool(RECIPE_KEYS[k], bool(v))
        elif kind is float:
            w.add_float32(RECIPE_KEYS[k], float(v))
        elif kind is tuple:
            w.add_array(RECIPE_KEYS[k], [int(b) for b in v])
        else:
            w.add_uint32(RECIPE_KEYS[k], int(v))


def convert(hf_dir: Path, out: Path | None, outtype: str, xq: bool = True, args=None) -> Path:
    if not hf_dir.is_dir():
        raise XQError(f"checkpoint directory not found: {hf_dir}")
    if outtype not in OUTTYPES:
        raise XQError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    qtype, file_type = OUTTYPES[outtype]
    m = read_config(hf_dir)
    c = m.config
    ckpt = Checkpoint(hf_dir)
    check_tensors(ckpt, m)
    out = out or hf_dir / f"{hf_dir.name}-{outtype}.gguf"
    with_factors = xq and needs_factors(c)
    plan = plan_weights(ckpt, m, qtype, with_factors)

    def keys(w: gguf.GGUFWriter):
        w.add_name(c.name)
        w.add_file_type(file_type)
        if qtype not in (T.F32, T.F16, T.BF16):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(c.ctx_train)
        w.add_embedding_length(c.d_model)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.n_ff)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        if c.head_dim != c.d_model // c.n_head:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.rope_dim)
        w.add_rope_freq_base(c.rope_base)
        if c.rope_scale != 1.0:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scale)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        add_tokenizer(w, hf_dir, c.vocab_size)
        if xq:
            add_xquant_keys(w, c, args, with_factors)

    write_gguf(out, "llama", keys, plan)
    return out


def add_xq(src: Path, out: Path, args=None, keep_factors: bool = False, key_weights=None) -> Path:
    """Copy `src` with the XQuant factors of its own weights (or, keep_factors, the ones it holds)
    and a cache recipe added; `out` may be `src` itself, which is replaced when the copy is done.
    key_weights (n_layer × kv_dim) replaces the key channel weights."""
    model = load_model(str(src))  # validates the file as the runtime will read it
    c = model.config
    reader = model.reader
    plan = [Planned(t.name, tuple(t.data.shape), T(int(t.tensor_type)), (lambda t=t: np.asarray(t.data)))
            for t in reader.tensors if (keep_factors or ".xq_" not in t.name)
            and not (key_weights is not None and t.name.endswith(".xq_kw"))]
    for p in plan:  # GGUF's byte shape back to elements, so Planned.stored_shape reproduces it
        if p.qtype not in (T.F32, T.F16):
            block, size = gguf.GGML_QUANT_SIZES[p.qtype]
            p.shape = (*p.shape[:-1], p.shape[-1] // size * block)
    with_factors = needs_factors(c)
    if with_factors and not keep_factors:
        done: dict[int, dict] = {}

        def factor(i, name):
            def make():
                if i not in done:
                    done[i] = compute_factors(*dense_kv(model.layers[i]))
                return done[i].pop(name)
            return make
        plan += [Planned(f"blk.{i}.xq_{n}", s, T.F32, factor(i, n))
                 for i in range(c.n_layer) for n, s in factor_shapes(c).items()]
    if key_weights is not None:
        plan += [Planned(f"blk.{i}.xq_kw", (c.kv_dim,), T.F32, (lambda w=w: np.asarray(w, np.float32)))
                 for i, w in enumerate(key_weights)]

    def keys(w: gguf.GGUFWriter):
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith(("GGUF.", "xquant.")):
                continue
            kind = f.types[0]
            sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), kind, sub_type=sub)
        add_xquant_keys(w, c, args, with_factors)

    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    write_gguf(out, c.arch, keys, plan, alignment=alignment.contents() if alignment else None)
    return out


def calibrate(out: Path, args) -> None:
    """Key channel weights and, with --ratio, bits per layer, measured on the file just written
    and stored in it."""
    from xqrt import Engine
    from xqrt.calibrate import calibrate as allocate
    from xqrt.calibrate import key_channel_weights
    from xqrt.perplexity import windows
    with open(args.calibrate, encoding="utf-8") as f:
        text = f.read()
    engine = Engine(str(out), ctx=args.calib_ctx)
    if engine.cache_mode not in ("xquant", "xquant-cl", "kivi"):
        raise XQError("--calibrate needs a quantized cache recipe (not --no-xq or --cache fp16)")
    wins = windows(engine.tokenizer.encode(text), args.calib_ctx, None)
    if args.calib_windows < 1 or len(wins) < args.calib_windows:
        raise XQError(f"--calib-windows {args.calib_windows}: the calibration text holds {len(wins)} window(s) "
                      f"of {args.calib_ctx} tokens")
    if needs_factors(engine.config):
        group = engine.new_cache().group
        weights = key_channel_weights(engine, wins[:args.calib_windows], group, engine.cache_options.sinks)
        del engine
        add_xq(out, out, args, keep_factors=True, key_weights=weights)
        engine = Engine(str(out), ctx=args.calib_ctx)
    if args.ratio is not None:
        args.layer_bits = allocate(engine, text, args.ratio, args.calib_windows, args.calib_ctx)
        args.bits = engine.cache_options.bits
        print(f"--layer-bits {','.join(map(str, args.layer_bits))}", file=sys.stderr)
        del engine
        add_xq(out, out, args, keep_factors=True)


def build_parser() -> argparse.ArgumentParser:
    from xqrt.run import add_cache_args
    ap = argparse.ArgumentParser(prog="convert/hf_to_gguf_xq.py", description=__doc__.split("\n")[0])
    ap.add_argument("hf_dir", nargs="?", type=Path, help="Hugging Face checkpoint directory")
    ap.add_argument("-o", "--outfile", type=Path, help="output GGUF (default: HF_DIR/NAME-OUTTYPE.gguf)")
    ap.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                    help="weight format (default f16; q4_0/q4_1 keep the embedding and output at q8_0)")
    ap.add_argument("--no-xq", action="store_true", help="a plain GGUF: no XQuant factors, no cache recipe")
    ap.add_argument("--add-xq", type=Path, metavar="IN.gguf",
                    help="add XQuant factors and a cache recipe to an existing GGUF (weights copied as they are)")
    add_cache_args(ap, defaults=f"{DEFAULT_RECIPE['mode']}, {DEFAULT_RECIPE['bits']} bits, rotation, "
                                f"{DEFAULT_RECIPE['sinks']} sinks, and otherwise ")
    g = ap.add_argument_group("calibration", "key channel weights and per-layer bits (see xqrt/calibrate.py)")
    g.add_argument("--calibrate", type=Path, metavar="TEXT",
                   help="calibration text (keep it apart from any text you evaluate on)")
    g.add_argument("--ratio", type=float, help="also bits per layer: the cache this many times smaller than fp16 KV")
    g.add_argument("--calib-windows", type=int, default=2, metavar="N", help="windows of TEXT measured [2]")
    g.add_argument("--calib-ctx", type=int, default=1024, metavar="T", help="window length in tokens [1024]")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        t0 = time.perf_counter()
        if args.calibrate and (args.no_xq or args.layer_bits):
            raise XQError("--calibrate chooses the layer bits itself: it takes neither --no-xq nor --layer-bits")
        if args.calibrate and not args.calibrate.is_file():
            raise XQError(f"calibration text not found: {args.calibrate}")
        if args.add_xq:
            if args.hf_dir or not args.outfile:
                raise XQError("--add-xq IN.gguf takes no checkpoint directory and needs -o OUT.gguf")
            if args.outfile.resolve() == args.add_xq.resolve():
                raise XQError("--add-xq writes a new file: give an -o different from the input")
            out = add_xq(args.add_xq, args.outfile, args)
        elif args.hf_dir is None:
            raise XQError("give a checkpoint directory (or --add-xq IN.gguf -o OUT.gguf)")
        else:
            out = convert(args.hf_dir, args.outfile, args.outtype, not args.no_xq, args)
        if args.calibrate:
            try:
                calibrate(out, args)
            except BaseException:
                out.unlink(missing_ok=True)  # the file asked for is a calibrated one
                raise
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; "
              f"peak memory {peak:.0f} MiB", file=sys.stderr)
        return 0
    return cli_exit_code(run, prog="hf_to_gguf_xq")


if __name__ == "__main__":
    sys.exit(main())
