"""Numba's CUDA simulator, made fast enough for the kernels' tests without changing what it runs.

The simulator runs each CUDA thread of a block as an OS thread, and its costs were not the
kernels' own:
- a block starts and joins 256 threads (about 20 ms here);
- `syncthreads` is a poll: the launching thread loops over the block's threads, holding the GIL
  for Python's switch interval at a time, until all of them wait (about 38 ms a barrier; woken
  through a condition variable instead, still 6-10 ms: each thread waits its turn for the GIL);
- `cuda.shared.array` finds its caller with `traceback.extract_stack`, which formats the whole
  stack (deep under pytest) once per thread per array: about 0.3 ms a call, 256 calls a block.
Here a block's threads are greenlets on the launching thread, run in turn (in an order shuffled
per block, so that a missing barrier shows whichever thread runs first; a grid's blocks, one at a
time, in a shuffled order too): each runs until it waits at a barrier or returns, and a barrier's
last thread makes the others ready again (a block and a barrier then cost microseconds per
thread), and a shared array's caller is one frame up (the same (file, line) key). As in the
simulator, a barrier counts the block's live threads: a thread that has returned no longer holds
one up; the first failure is re-raised. Where no thread can go on — threads wait at a barrier
that a live one never reaches — the launch fails at once (on a GPU: a hang).
"""
from __future__ import annotations

import random
import sys
import threading
from collections import deque

import greenlet
import numpy as np
from numba import cuda
from numba.core.types import Type
from numba.cuda.simulator import kernel as sim_kernel
from numba.cuda.simulator import kernelapi
from numba.cuda.simulator.kernelapi import Dim3, FakeCUDALocal, FakeCUDAShared
from numba.np import numpy_support

simulator_shared_array = FakeCUDAShared.array
simulator_device_array = cuda.device_array
_ready: deque = deque()  # the running block's threads that may go on (blocks run one at a time)
_order = random.Random(0)  # the order a block's threads start in: shuffled, the same every run
_launch_shared = [{}]  # the running launch's shared arrays by (file, line): refilled before each block


def garbage(array):
    """`array` filled as a GPU leaves memory a kernel has not written: with anything. Here every
    byte 0xFF, which makes a float NaN, so that a read of it shows in the results (NumPy's fresh
    memory is mostly zeros, and a launch's blocks share the simulator's shared arrays: a block
    found the last one's values)."""
    bits = np.dtype(f"u{array.dtype.itemsize}")
    array.view(bits)[...] = np.iinfo(bits).max
    return array


def shared_array(self, shape, dtype, alignment=None):
    """One array per line of the kernel that asks for it, as the simulator's own; it also takes
    the GPU's `alignment` (numba-cuda ≥ 0.11), which a NumPy array does not need."""
    if shape == 0:  # dynamic shared memory: the simulator's one buffer
        return simulator_shared_array(self, shape, dtype)
    frame = sys._getframe(1)
    caller = frame.f_code.co_filename, frame.f_lineno
    array = self._allocations.get(caller)
    if array is None:  # first asked for in a launch's first block: a launch's arrays are its own
        _launch_shared[0] = self._allocations
        dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, Type) else dtype
        array = self._allocations[caller] = garbage(np.empty(shape, dtype))
    return array


def device_array(*args, **kwargs):
    """cuda.device_array: memory no kernel has written, garbage as a GPU's."""
    array = simulator_device_array(*args, **kwargs)
    garbage(array._ary)
    return array


def device_array_like(ary, stream=0):
    return device_array(ary.shape, ary.dtype, stream=stream)


def local_array(self, shape, dtype):
    dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, Type) else dtype
    return garbage(np.empty(shape, dtype))


def current_thread():
    """The simulated CUDA thread running (what the simulator's kernel API asks threading for)."""
    running = greenlet.getcurrent()
    return running if isinstance(running, SimThread) else threading.current_thread()


class Barrier:
    """n threads meet: each that arrives goes back to the block's loop, until the n-th arrives and
    makes them all ready again; `leave` takes a thread off n (the block's barrier: one that returned)."""

    def __init__(self, n):
        self.n, self.waiting = n, []

    def wait(self):
        if len(self.waiting) + 1 >= self.n:
            self._release()
            return
        me = greenlet.getcurrent()
        self.waiting.append(me)
        me.parent.switch()

    def leave(self):
        self.n -= 1
        if self.waiting and len(self.waiting) >= self.n:
            self._release()

    def _release(self):
        _ready.extend(self.waiting)
        self.waiting = []


class SimThread(greenlet.greenlet):
    """One CUDA thread of a block, running `body`: with the attributes the kernel API reads of a
    simulator BlockThread."""

    def __init__(self, body, manager, grid_point, point):
        super().__init__(body)
        self._manager, self.blockIdx, self.threadIdx = manager, Dim3(*grid_point), Dim3(*point)
        x, y, _ = manager._block_dim
        self.thread_id = point[0] + x * (point[1] + y * point[2])

    def syncthreads(self):
        self._manager.barrier.wait()


def run_block(self, grid_point, *args):
    """BlockManager.run: the block's threads as greenlets, each run until it waits or returns, in
    turn, until none can go on; the first failure re-raised."""
    for array in _launch_shared[0].values():  # what the last block left is not this block's to read
        garbage(array)
    points = list(np.ndindex(*self._block_dim))
    _order.shuffle(points)  # a race between threads shows whichever of them would run first
    self.barrier = Barrier(len(points))
    errors = []

    def body():
        try:
            self._f(*args)
        except Exception as e:  # noqa: BLE001 — re-raised by the launch, after the block
            errors.append(e)
        finally:
            self.barrier.leave()

    threads = [SimThread(body, self, grid_point, point) for point in points]
    _ready.extend(threads)
    try:
        while _ready:
            _ready.popleft().switch()
    finally:
        stuck = [t for t in threads if not t.dead]
        for t in stuck:  # ended here (GreenletExit), not when a later block collects them
            t.throw()
        _ready.clear()
    if errors:
        raise errors[0]
    if stuck:
        raise RuntimeError(f"syncthreads: {len(stuck)} threads of block {grid_point} wait at a barrier that no "
                           "other live thread reaches (on a GPU: a hang)")


class _GridOrder:
    """NumPy as the simulator's launch sees it, but for ndindex: a grid's blocks in a shuffled order.
    A GPU runs them in any order and at once, so a kernel whose block reads what another block of
    the same launch writes is wrong there, and would pass here if the blocks kept their order."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def ndindex(*shape):
        points = list(np.ndindex(*shape))
        _order.shuffle(points)
        return points


class _Threading:
    """The `threading` of the simulator's kernel API: its current thread is the simulated one."""
    current_thread = staticmethod(current_thread)

    def __getattr__(self, name):
        return getattr(threading, name)


def install():
    FakeCUDAShared.array = shared_array
    FakeCUDALocal.array = local_array
    cuda.device_array, cuda.device_array_like = device_array, device_array_like
    sim_kernel.BlockManager.run = run_block
    sim_kernel.np = _GridOrder()
    kernelapi.threading = _Threading()
