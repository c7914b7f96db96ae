"""Per-layer matrices the XQuant caches project through, from the GGUF or computed once at load.

Notation (DESIGN.md): Wk is d × kv_dim with x·Wk = k (the transpose of the GGUF rows, still in
GGUF's permuted RoPE row order). For a GQA model the thin SVD Wk = U·Σ·Bᵀ (rank kv_dim) gives

    uk = U          (d × kv_dim)  the key latent is x·uk
    mk = Σ·Bᵀ       (kv_dim × kv_dim)  the rebuild: k = (x·uk)·mk

and likewise uv, mv for Wv, and ukv (d × 2·kv_dim) from the SVD of [Wk | Wv] for XQuant-CL's
deltas. With quantization off every path is exact up to float32 round-off.

Stored form (written by convert/hf_to_gguf_xq.py): tensors blk.N.xq_uk, blk.N.xq_mk, blk.N.xq_uv,
blk.N.xq_mv, blk.N.xq_ukv, float32 with the shapes above (ggml lists them column count first), and
the keys xquant.version (FORMAT_VERSION), xquant.rank (kv_dim) and xquant.layers (the layers that
carry factors). MHA models need none: their caches project through Wk and Wv themselves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .errors import XQError
from .gguf_model import float_tensor
from .kernels import cpu

FACTOR_NAMES = ("uk", "mk", "uv", "mv", "ukv")
FORMAT_VERSION = 1
KEY_VERSION, KEY_RANK, KEY_LAYERS = "xquant.version", "xquant.rank", "xquant.layers"


@dataclass
class LayerFactors:
    wk: np.ndarray  # d × kv_dim float32 (dequantized weight, transposed)
    wv: np.ndarray
    uk: np.ndarray | None = None  # GQA only
    mk: np.ndarray | None = None
    uv: np.ndarray | None = None
    mv: np.ndarray | None = None
    ukv: np.ndarray | None = None
    kw: np.ndarray | None = None  # per key latent channel: error cost × mean squared range (calibration)


def _dense_t(m) -> np.ndarray:
    w = np.empty((m.n_rows, m.n_cols), np.float32)
    cpu.dequantize(m.data, m.qtype, w)
    return _c32(w.T)


def thin_svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w (d × r) = u·m with u orthonormal (d × min(d, r)) and m = Σ·Bᵀ; singular values descending.

    Through the eigenvectors of the float64 Gram matrix wᵀw (3× faster than an SVD at these
    shapes) unless w is near rank-deficient, where that loses the small directions."""
    w64 = w.astype(np.float64)
    if w.shape[1] <= w.shape[0]:
        eig, b = np.linalg.eigh(w64.T @ w64)
        eig, b = eig[::-1], b[:, ::-1]
        if eig[-1] > 1e-10 * eig[0]:
            s = np.sqrt(eig)
            return _c32(w64 @ b / s), _c32(s[:, None] * b.T)
    u, s, bt = np.linalg.svd(w64, full_matrices=False)
    return _c32(u), _c32(s[:, None] * bt)


def block_hadamard(width: int, group: int) -> np.ndarray:
    """width × width orthonormal: a Sylvester Hadamard matrix of order `group` (a power of two) on
    each group of `group` channels. Turning a latent by it spreads an outlier channel over its
    group, so the group's min/max range stops being set by that one value."""
    h = np.ones((1, 1))
    while len(h) < group:
        h = np.block([[h, h], [h, -h]])
    return _c32(np.kron(np.eye(width // group), h / np.sqrt(group)))


def _c32(a: np.ndarray) -> np.ndarray:
    """float32, row-major (the kernels' inner loops run along rows and vectorize only there), on a
    cache line (cpu.aligned)."""
    return cpu.aligned(np.ascontiguousarray(a, dtype=np.float32))


def needs_factors(config) -> bool:
    """GQA models cache SVD latents; MHA models cache X itself."""
    return config.n_kv_head < config.n_head


def factor_shapes(config) -> dict[str, tuple[int, int]]:
    d, kv = config.d_model, config.kv_dim
    return {"uk": (d, kv), "mk": (kv, kv), "uv": (d, kv), "mv": (kv, kv), "ukv": (d, min(d, 2 * kv))}


def compute_factors(wk: np.ndarray, wv: np.ndarray) -> dict[str, np.ndarray]:
    """One layer's factors from its dense d × kv_dim key and value weights."""
    uk, mk = thin_svd(wk)
    uv, mv = thin_svd(wv)
    ukv, _ = thin_svd(np.concatenate([wk, wv], axis=1))
    return {"uk": uk, "mk": mk, "uv": uv, "mv": mv, "ukv": ukv}


def dense_kv(layer) -> tuple[np.ndarray, np.ndarray]:
    """A layer's Wk and Wv as d × kv_dim float32, exactly as the kernels read the file's blocks."""
    return _dense_t(layer.wk), _dense_t(layer.wv)


def layer_factors(model, log=None) -> list[LayerFactors]:
    """The factors for every layer, cached on the model; SVDs are computed only when the file
    does not carry them."""
    if getattr(model, "_xq_factors", None) is not None:
        return model._xq_factors
    c = model.config
    version = model.metadata.get(KEY_VERSION, FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise XQError(f"{model.path}: XQuant factors of format version {version!r}; this xqrt reads "
                      f"version {FORMAT_VERSION} (re-add them: convert/hf_to_gguf_xq.py --add-xq)")
    shapes = factor_shapes(c)
    out, computed = [], False
    for i, L in enumerate(model.layers):
        f = LayerFactors(*dense_kv(L))
        if needs_factors(c):
            have = {n: float_tensor(model, f"blk.{i}.xq_{n}", shapes[n]) for n in FACTOR_NAMES}
            if any(v is None for v in have.values()):
                if not computed and log:
                    log(f"xqrt: computing XQuant SVD factors for {c.n_layer} layers (not stored in this GGUF; "
                        "convert/hf_to_gguf_xq.py --add-xq stores them)...")
                computed = True
                have = compute_factors(f.wk, f.wv)
            f.uk, f.mk, f.uv, f.mv, f.ukv = (have[n] for n in FACTOR_NAMES)
            f.kw = None if computed else float_tensor(model, f"blk.{i}.xq_kw", (c.kv_dim,))
        out.append(f)
    model._xq_factors = out
    return out


def stderr_log(msg: str):
    print(msg, file=sys.stderr, flush=True)
