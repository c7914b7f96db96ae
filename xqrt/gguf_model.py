"""GGUF file → `ModelConfig` + weights kept in their block format (memory-mapped).

Parsing is gguf-py's `GGUFReader`; this module validates what it found (a hostile or truncated
file must end in one `XQError`, never a traceback or a huge allocation) and maps llama.cpp's
tensor names onto a `Model`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import XQError

# ggml type ids of the formats the kernels read directly.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
# (elements per block, bytes per block) of the formats the kernels read directly
BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}
SUPPORTED_ARCHS = ("llama", "mistral")
# K-quants and friends are converted once at load into Q8_0 (8.5 bits: no visible loss).
_CONVERT_ROWS = 1024  # rows per conversion chunk: bounds the float32 temporary


@dataclass
class ModelConfig:
    arch: str
    n_layer: int
    d_model: int
    n_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_scale: float  # linear position scaling (positions divided by it)
    norm_eps: float
    vocab_size: int
    ctx_train: int
    name: str = ""

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    def problem(self) -> str | None:
        """What makes these hyperparameters unusable, in words, or None."""
        sizes = dict(n_layer=self.n_layer, d_model=self.d_model, n_ff=self.n_ff, n_head=self.n_head,
                     n_kv_head=self.n_kv_head, head_dim=self.head_dim, vocab_size=self.vocab_size)
        for name, v in sizes.items():
            if not 0 < v <= 1 << 20:
                return f"{name} {v} is not in [1, 2^20]"
        if self.n_head % self.n_kv_head:
            return f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}"
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            return f"rope_dim {self.rope_dim} is not even and at most head_dim {self.head_dim}"
        return None


@dataclass
class QMatrix:
    """A weight matrix in its file format: `data[r]` holds row r's blocks as raw bytes."""
    data: np.ndarray  # uint8 (n_rows, row_bytes)
    qtype: int
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: QMatrix
    wk: QMatrix
    wv: QMatrix
    wo: QMatrix
    ffn_norm: np.ndarray
    w_gate: QMatrix
    w_up: QMatrix
    w_down: QMatrix


@dataclass
class Model:
    config: ModelConfig
    tok_embd: QMatrix
    layers: list[Layer]
    out_norm: np.ndarray
    output: QMatrix  # the embedding itself when tied
    rope_freqs: np.ndarray  # float32 (rope_dim/2,) inverse frequencies, scaling applied
    metadata: dict = field(default_factory=dict)  # scalar/str keys; arrays only for the tokenizer
    path: str = ""
    extra_tensors: dict = field(default_factory=dict)  # tensors not named above (e.g. blk.N.xq_*), as read
    reader: object = None  # gguf-py's GGUFReader over the file (tools that copy it reuse its mapping)


def _field_value(f):
    """A GGUF key's value as a Python object (str, number, bool, list)."""
    from gguf import GGUFValueType
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        sub = f.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return np.concatenate([f.parts[i] for i in f.data]) if f.data else np.zeros(0)
    if t == GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode("utf-8", errors="replace")
    return f.parts[-1][0].item()


def _reader_class():
    from gguf import GGUFReader

    class Reader(GGUFReader):
        # GGUFReader slices a np.memmap once per field; memmap's per-slice bookkeeping makes a
        # 49k-token vocabulary take seconds. A plain ndarray view of the same mapping does not.
        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)
            return super()._get(offset, dtype, count, override_order)
    return Reader


def read_gguf(path: str):
    """(GGUFReader, metadata dict) with every failure turned into an XQError."""
    if not os.path.exists(path):
        raise XQError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise XQError(f"{path} is a directory, not a GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise XQError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        reader = _reader_class()(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise XQError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {str(e)[:120]})") from None
    metadata = {}
    for name, f in reader.fields.items():
        try:
            metadata[name] = _field_value(f)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise XQError(f"{path}: corrupt metadata value for {name!r} ({e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise XQError(f"{path}: tensor {t.name!r} lies beyond the end of the file (truncated or corrupt)")
    return reader, metadata


def _get(md: dict, key: str, default=None, required=True):
    if key in md:
        return md[key]
    if required and default is None:
        raise XQError(f"GGUF is missing required metadata key {key!r}")
    return default


def parse_config(md: dict) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise XQError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    p = f"{arch}."
    n_head = int(_get(md, p + "attention.head_count"))
    d_model = int(_get(md, p + "embedding_length"))
    n_kv_head = int(_get(md, p + "attention.head_count_kv", n_head))
    head_dim = int(_get(md, p + "attention.key_length", d_model // max(n_head, 1)))
    scaling = md.get(p + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise XQError(f"unsupported rope scaling type {scaling!r} (supported: none, linear, rope_freqs)")
    cfg = ModelConfig(
        arch=arch,
        n_layer=int(_get(md, p + "block_count")),
        d_model=d_model,
        n_ff=int(_get(md, p + "feed_forward_length")),
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        rope_dim=int(_get(md, p + "rope.dimension_count", head_dim)),
        rope_base=float(_get(md, p + "rope.freq_base", 10000.0)),
        rope_scale=float(md.get(p + "rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        norm_eps=float(_get(md, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=int(md.get(p + "vocab_size", len(md.get("tokenizer.ggml.tokens", [])))),
        ctx_train=int(_get(md, p + "context_length", 4096)),
        name=str(md.get("general.name", "")),
    )
    if problem := cfg.problem():
        raise XQError(f"GGUF's hyperparameters do not fit together: {problem}")
    return cfg


def _to_native(t) -> QMatrix | np.ndarray:
    """A reader tensor as the runtime holds it: 1-D tensors as float32, matrices as QMatrix."""
    from gguf import dequantize, quantize, GGMLQuantizationType
    qtype = int(t.tensor_type)
    shape = [int(s) for s in t.shape]  # ggml order: shape[0] is the contiguous (column) dim
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        if qtype == F32:
            return np.asarray(t.data, dtype=np.float32).reshape(-1)
        if qtype == F16:
            return np.asarray(t.data).astype(np.float32).reshape(-1)
        return dequantize(np.asarray(t.data), GGMLQuantizationType(qtype)).astype(np.float32).reshape(-1)
    if len(shape) != 2:
        raise XQError(f"tensor {t.name!r} has unsupported rank {len(shape)}")
    n_cols, n_rows = shape
    raw = np.asarray(t.data)
    if qtype in BLOCK:
        block, block_bytes = BLOCK[qtype]
        if n_cols % block:
            raise XQError(f"tensor {t.name!r}: {n_cols} columns is not a multiple of the block size {block}")
        data = raw.view(np.uint8).reshape(n_rows, n_cols // block * block_bytes)
        return QMatrix(data, qtype, n_cols)
    try:
        gtype = GGMLQuantizationType(qtype)
        if n_cols % 32:
            raise XQError(f"tensor {t.name!r} of type {gtype.name}: {n_cols} columns cannot be re-blocked")
        raw = raw.reshape(n_rows, -1)
        out = np.empty((n_rows, n_cols // 32 * 34), np.uint8)
        for r0 in range(0, n_rows, _CONVERT_ROWS):
            rows = dequantize(raw[r0:r0 + _CONVERT_ROWS], gtype).astype(np.float32)
            out[r0:r0 + _CONVERT_ROWS] = quantize(rows, GGMLQuantizationType.Q8_0).reshape(len(rows), -1)
    except (NotImplementedError, ValueError) as e:
        name = getattr(t.tensor_type, "name", qtype)
        raise XQError(f"tensor {t.name!r} has unsupported type {name} ({e})") from None
    out.flags.writeable = False  # the same (read-only) array type as the mapped tensors, for the kernels
    return QMatrix(out, Q8_0, n_cols)


def rope_inv_freqs(cfg: ModelConfig, freq_factors: np.ndarray | None) -> np.ndarray:
    """θ_i = base^(-2i/rope_dim) / scale / factor_i (Llama-3 stores per-frequency factors)."""
    i = np.arange(0, cfg.rope_dim, 2, dtype=np.float64)
    inv = 1.0 / (cfg.rope_base ** (i / cfg.rope_dim)) / cfg.rope_scale
    if freq_factors is not None:
        if freq_factors.shape != inv.shape:
            raise XQError(f"rope_freqs has {freq_factors.shape[0]} entries, expected {inv.shape[0]}")
        inv = inv / freq_factors.astype(np.float64)
    return inv.astype(np.float32)


_LAYER_ROLE = re.compile(r"blk\.\d+\.(attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down)\.weight")


def float_tensor(model: Model, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """An extra tensor as float32 of exactly `shape` (None when absent), validated."""
    t = model.extra_tensors.get(name)
    if t is None:
        return None
    got = tuple(int(s) for s in reversed(t.shape))
    if got != tuple(shape):
        raise XQError(f"{model.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    if int(t.tensor_type) not in (F32, F16):
        raise XQError(f"{model.path}: tensor {name!r} must be F32 or F16")
    return np.asarray(t.data).astype(np.float32).reshape(shape)


def load_model(path: str) -> Model:
    reader, md = read_gguf(path)
    cfg = parse_config(md)
    tensors = {t.name: t for t in reader.tensors}

    def need(name, shape=None):
        t = tensors.get(name)
        if t is None:
            raise XQError(f"{path}: missing tensor {name!r}")
        if shape is not None and [int(s) for s in t.shape[:len(shape)]] != list(shape):
            raise XQError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return _to_native(t)

    d, kv = cfg.d_model, cfg.kv_dim
    tok_embd = need("token_embd.weight", (d,))
    cfg.vocab_size = tok_embd.n_rows
    layers = []
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        layers.append(Layer(
            attn_norm=need(b + "attn_norm.weight", (d,)),
            wq=need(b + "attn_q.weight", (d, cfg.q_dim)),
            wk=need(b + "attn_k.weight", (d, kv)),
            wv=need(b + "attn_v.weight", (d, kv)),
            wo=need(b + "attn_output.weight", (cfg.q_dim, d)),
            ffn_norm=need(b + "ffn_norm.weight", (d,)),
            w_gate=need(b + "ffn_gate.weight", (d, cfg.n_ff)),
            w_up=need(b + "ffn_up.weight", (d, cfg.n_ff)),
            w_down=need(b + "ffn_down.weight", (cfg.n_ff, d)),
        ))
    output = need("output.weight", (d,)) if "output.weight" in tensors else tok_embd
    freq_factors = need("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    known = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    return Model(
        config=cfg, tok_embd=tok_embd, layers=layers, out_norm=need("output_norm.weight", (d,)), output=output,
        rope_freqs=rope_inv_freqs(cfg, freq_factors), metadata=md, path=path, reader=reader,
        extra_tensors={n: t for n, t in tensors.items() if n not in known and not _LAYER_ROLE.fullmatch(n)},
    )
