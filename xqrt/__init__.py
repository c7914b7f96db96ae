"""xqrt: a llama.cpp-style inference runtime whose cache stores quantized activations (XQuant)."""
import os

# numpy's OpenBLAS threads spin for ~0.1 s after each call, and libgomp's (numba's parallel kernels)
# after each parallel region. The prefill alternates the two, so with few cores they steal each other's:
# on 2 cores the prefill ran 2.5x slower and the first ~8 decode steps after it 2x slower. Short spins
# keep back-to-back kernels hot without that. Each library reads these once, when it loads: this only
# takes effect where xqrt is imported before numpy (the command lines; embedders, see README).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from . import jit_cache  # first: it sets NUMBA_CACHE_DIR, which the kernels read when they are defined
from .engine import Engine
from .errors import XQError
from .gguf_model import load_model
from . import quant
from .kernels import cpu

jit_cache.lock_saves(quant, cpu)

__all__ = ["Engine", "XQError", "load_model"]
__version__ = "0.1.0"
