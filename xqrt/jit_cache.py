"""Numba's on-disk kernel cache: one folder per version of the compiled sources, saved into safely
by processes that compile at the same time, and the folders of versions no longer run removed."""
import functools
import hashlib
import itertools
import os
import re
import shutil
import sys
import time

STALE_DAYS = 30  # a version's folder unused this long is removed
_STAMP = "last-used"
_DIGEST = re.compile(r"[0-9a-f]{16}")


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


def prune_stale(folder: str, now: float | None = None) -> None:
    """Mark `folder` used, and remove its sibling version folders unused for STALE_DAYS. Each
    version compiles some 15 MB of kernels, and every upgrade or edit of the kernel sources starts a
    new folder. A folder's use is the mtime of its stamp file (touched at most daily), or of the
    folder itself where an older xqrt left no stamp; another install still run within the window
    keeps its folder. A folder is renamed before it is deleted, so no two processes delete one."""
    now = time.time() if now is None else now
    stamp = os.path.join(folder, _STAMP)
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(stamp) or now - os.path.getmtime(stamp) > 86400:
            with open(stamp, "a"):
                pass
            os.utime(stamp, (now, now))
        parent = os.path.dirname(folder)
        names = os.listdir(parent)
    except OSError:  # a read-only or vanished cache: nothing to tidy
        return
    for name in names:
        path = os.path.join(parent, name)
        leftover = ".stale." in name  # a removal an earlier process did not finish
        if path == folder or not (leftover or _DIGEST.fullmatch(name)):
            continue
        try:
            its_stamp = os.path.join(path, _STAMP)
            used = os.path.getmtime(its_stamp if os.path.exists(its_stamp) else path)
            if not leftover and now - used < STALE_DAYS * 86400:
                continue
            doomed = path if leftover else f"{path}.stale.{os.getpid()}"
            if not leftover:
                os.rename(path, doomed)
        except OSError:  # another process got there first
            continue
        shutil.rmtree(doomed, ignore_errors=True)


if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = kernel_cache_dir()
    prune_stale(os.environ["NUMBA_CACHE_DIR"])
    if "numba" in sys.modules:
        # Numba reads its environment when it is imported and picks each cached kernel's folder when
        # the kernel is defined: imported before xqrt, it would keep the unkeyed __pycache__ folders.
        from numba.core.config import reload_config
        reload_config()

try:
    import fcntl
except ImportError:  # not POSIX: saves stay Numba's own
    fcntl = None


class LockedSaves:
    """Numba's index of a kernel's overloads, saved under a lock on the folder, data first. Numba
    reads the index, numbers a new overload's data file and rewrites both unlocked: two processes
    compiling different overloads of one kernel at once both took number 1, and the index one wrote
    then named the machine code the other wrote, for other argument types (measured: an int64 call
    answered 3.0). Loads need no lock: each file is replaced whole, and an index entry now appears
    only once its data is there. Mixed into the index file class of Numba's CPU and CUDA caches
    alike (numba-cuda has a copy of its own)."""

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


@functools.cache
def _locked(index_file_class):
    return type(f"Locked{index_file_class.__name__}", (LockedSaves, index_file_class), {})


def lock(kernel):
    """`kernel` (a cached Numba dispatcher, CPU or CUDA) saves through LockedSaves; returned."""
    cache_file = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
    if fcntl is not None and type(cache_file).__name__ == "IndexDataCacheFile":
        cache_file.__class__ = _locked(type(cache_file))
    return kernel


def lock_saves(*modules) -> None:
    """Every cached Numba kernel defined in `modules` saves through LockedSaves."""
    for module in modules:
        for kernel in vars(module).values():
            lock(kernel)
