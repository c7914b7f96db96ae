"""Numba's CUDA simulator, made fast enough for the kernels' tests without changing what it runs.

Two of its costs are not the kernels' own:
- `cuda.shared.array` finds its caller with `traceback.extract_stack`, which formats the whole
  stack (deep under pytest) once per thread per array: about 0.3 ms a call, 256 calls a block;
- `syncthreads` is a poll: the launching thread loops over the block's threads, holding the GIL
  for Python's switch interval at a time, until all of them wait: about 38 ms a barrier.
Here the caller is one frame up (the same (file, line) key), and a barrier is a condition
variable its last thread releases (about 7 ms). As the simulator's, a barrier counts the block's
live threads: a thread that has returned no longer holds one up.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
from numba.core.types import Type
from numba.cuda.simulator import kernel as sim_kernel
from numba.cuda.simulator.kernelapi import FakeCUDAShared
from numba.np import numpy_support

simulator_shared_array = FakeCUDAShared.array


def shared_array(self, shape, dtype, alignment=None):
    """One array per line of the kernel that asks for it, as the simulator's own; it also takes
    the GPU's `alignment` (numba-cuda ≥ 0.11), which a NumPy array does not need."""
    if shape == 0:  # dynamic shared memory: the simulator's one buffer
        return simulator_shared_array(self, shape, dtype)
    frame = sys._getframe(1)
    caller = frame.f_code.co_filename, frame.f_lineno
    array = self._allocations.get(caller)
    if array is None:  # setdefault: a thread that lost the race takes the winner's array
        dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, Type) else dtype
        array = self._allocations.setdefault(caller, np.empty(shape, dtype))
    return array


class BlockBarrier:
    """syncthreads for one block: released when every live thread waits (a thread that returns or
    fails leaves the count); an error after a minute's wait (on a GPU: a hang)."""

    def __init__(self, n_threads):
        self.cond = threading.Condition()
        self.live, self.waiting, self.generation = n_threads, 0, 0

    def wait(self):
        with self.cond:
            generation = self.generation
            self.waiting += 1
            if self.waiting == self.live:
                self._release()
            elif not self.cond.wait_for(lambda: generation != self.generation, timeout=60):
                self.waiting -= 1
                raise RuntimeError("syncthreads: a live thread of the block has not come for a minute")

    def leave(self):
        with self.cond:
            self.live -= 1
            if self.waiting and self.waiting == self.live:
                self._release()

    def _release(self):
        self.waiting = 0
        self.generation += 1
        self.cond.notify_all()


def run_block(self, grid_point, *args):
    """BlockManager.run: the block's threads, started and joined; the first failure re-raised."""
    barrier = self.barrier = BlockBarrier(int(np.prod(self._block_dim)))

    def thread_body():
        try:
            self._f(*args)
        finally:
            barrier.leave()

    threads = [sim_kernel.BlockThread(thread_body, self, grid_point, point, self._debug)
               for point in np.ndindex(*self._block_dim)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = next((t for t in threads if t.exception), None)
    if failed:
        raise failed.exception[0].with_traceback(failed.exception[1])


def syncthreads(self):
    self._manager.barrier.wait()


def install():
    FakeCUDAShared.array = shared_array
    sim_kernel.BlockManager.run = run_block
    sim_kernel.BlockThread.syncthreads = syncthreads
