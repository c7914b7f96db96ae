"""Numba's on-disk kernel cache: one folder per version of the compiled sources, saved into safely
by processes that compile at the same time."""
import hashlib
import itertools
import os
import sys


def kernel_cache_dir() -> str:
    """Numba invalidates a cached function only when its own file changes, not the helpers it
    inlines from other files (bits.py, simd.py, quant.py): a stale entry then runs old machine code
    against new callers, and the process can crash. Keying the folder on every compiled file's
    contents rules that out."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for rel in ("quant.py", "kernels/bits.py", "kernels/simd.py", "kernels/cpu.py"):
        with open(os.path.join(here, rel), "rb") as f:
            digest.update(f.read())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xqrt", "numba", digest.hexdigest()[:16])


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = kernel_cache_dir()
    if "numba" in sys.modules:
        # Numba reads its environment when it is imported and picks each cached kernel's folder when
        # the kernel is defined: imported before xqrt, it would keep the unkeyed __pycache__ folders.
        from numba.core.config import reload_config
        reload_config()

from numba.core.caching import IndexDataCacheFile  # noqa: E402
from numba.core.dispatcher import Dispatcher  # noqa: E402

try:
    import fcntl
except ImportError:  # not POSIX: saves stay Numba's own
    fcntl = None


class LockedCacheFile(IndexDataCacheFile):
    """Numba's index of a kernel's overloads, saved under a lock on the folder, data first. Numba
    reads the index, numbers a new overload's data file and rewrites both unlocked: two processes
    compiling different overloads of one kernel at once both took number 1, and the index one wrote
    then named the machine code the other wrote, for other argument types (measured: an int64 call
    answered 3.0). Loads need no lock: each file is replaced whole, and an index entry now appears
    only once its data is there."""

    def save(self, key, data):
        with open(os.path.join(self._cache_path, "xqrt.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            overloads = self._load_index()
            name = overloads.get(key)
            if name is None:
                taken = set(overloads.values())
                name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            self._save_data(name, data)
            if key not in overloads:
                overloads[key] = name
                self._save_index(overloads)


def lock_saves(*modules) -> None:
    """Every cached Numba kernel defined in `modules` saves through LockedCacheFile."""
    if fcntl is None:
        return
    for module in modules:
        for kernel in vars(module).values():
            cache_file = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
            if isinstance(kernel, Dispatcher) and type(cache_file) is IndexDataCacheFile:
                cache_file.__class__ = LockedCacheFile
