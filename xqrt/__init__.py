"""xqrt: a llama.cpp-style inference runtime whose cache stores quantized activations (XQuant)."""
import os
import sys

# numpy's OpenBLAS threads spin for ~0.1 s after each call, and libgomp's (numba's parallel kernels)
# after each parallel region. The prefill alternates the two, so with few cores they steal each other's:
# on 2 cores the prefill ran 2.5x slower and the first ~8 decode steps after it 2x slower. Short spins
# keep back-to-back kernels hot without that. Each library reads these once, when it loads: this only
# takes effect where xqrt is imported before numpy (the command lines; embedders, see README).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("GOMP_SPINCOUNT", "30000")


def _kernel_cache_dir() -> str:
    """Numba's on-disk cache, one folder per version of the compiled sources. Numba invalidates a
    cached function only when its own file changes, not the helpers it inlines from other files
    (bits.py, simd.py, quant.py): a stale entry then runs old machine code against new callers, and
    the process can crash. Keying the folder on every compiled file's contents rules that out."""
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for rel in ("quant.py", "kernels/bits.py", "kernels/simd.py", "kernels/cpu.py"):
        with open(os.path.join(here, rel), "rb") as f:
            digest.update(f.read())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xqrt", "numba", digest.hexdigest()[:16])


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = _kernel_cache_dir()
    if "numba" in sys.modules:
        # Numba reads its environment when it is imported and picks each cached kernel's folder when
        # the kernel is defined: imported before xqrt, it would keep the unkeyed __pycache__ folders.
        from numba.core.config import reload_config
        reload_config()

from .engine import Engine
from .errors import XQError
from .gguf_model import load_model

__all__ = ["Engine", "XQError", "load_model"]
__version__ = "0.1.0"
