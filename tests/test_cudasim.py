"""tests/cudasim.py runs a block as Numba's simulator does: barriers, failures, shared arrays, and conftest's
emulated warp shuffles."""
from __future__ import annotations

import os

import numpy as np
import pytest
from numba import cuda, float32

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="the simulator's")


@cuda.jit
def rotate(out, n_live, fail_at):
    """Each of the first n_live threads takes its right neighbour's value three times, through
    shared memory between barriers; the others return at once. Thread fail_at indexes past out
    before its first barrier."""
    buf = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    if t >= n_live:
        return
    v = float32(t)
    for _ in range(3):
        if t == fail_at:
            out[out.size] = v
        buf[t] = v
        cuda.syncthreads()
        v = buf[(t + 1) % n_live]
        cuda.syncthreads()
    out[t] = v


@pytest.mark.parametrize("n_live", [64, 37, 1])
def test_a_barrier_waits_for_the_live_threads(n_live):
    out = cuda.to_device(np.full(64, -1.0, np.float32))
    rotate[2, 64](out, n_live, -1)
    want = np.full(64, -1.0, np.float32)
    want[:n_live] = (np.arange(n_live) + 3) % n_live
    np.testing.assert_array_equal(out.copy_to_host(), want)


def test_a_failing_thread_is_the_error_not_a_hang():
    with pytest.raises(IndexError):
        rotate[1, 64](cuda.to_device(np.zeros(64, np.float32)), 64, 5)


@cuda.jit
def read_left_unsynced(out):
    """Thread t > 0 reads what thread t − 1 writes to shared memory, with no barrier between: a race."""
    buf = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    buf[t] = float32(t)
    out[t] = buf[t - 1] if t > 0 else float32(-1.0)


def test_a_missing_barrier_shows():
    """The block's threads start in a shuffled order: a read of another thread's write that no
    barrier orders finds it unwritten for some of them (in the order of their indices, every
    thread would find its left neighbour's write done)."""
    out = cuda.to_device(np.zeros(64, np.float32))
    read_left_unsynced[1, 64](out)
    assert (out.copy_to_host() != np.arange(64, dtype=np.float32) - 1).any()


@cuda.jit
def read_left_block(out):
    """Block b > 0 reads what block b − 1 of the same launch writes: a race on a GPU."""
    b = cuda.blockIdx.x
    if cuda.threadIdx.x == 0:
        out[b, 0] = float32(b)
        out[b, 1] = out[b - 1, 0] if b > 0 else float32(-1.0)


def test_a_launch_s_blocks_run_in_a_shuffled_order():
    """A GPU runs a launch's blocks in any order, at once: a block's read of another's write finds
    it unwritten for some of them (in the order of their indices, every block would find its left
    neighbour's write done)."""
    out = cuda.to_device(np.full((16, 2), -2.0, np.float32))
    read_left_block[16, 32](out)
    assert (out.copy_to_host()[:, 1] != np.arange(16, dtype=np.float32) - 1).any()


@cuda.jit
def read_shared(out):
    """Block 0's threads write their slots of a shared array; every block reads them back."""
    buf = cuda.shared.array(64, float32)
    t, b = cuda.threadIdx.x, cuda.blockIdx.x
    if b == 0:
        buf[t] = float32(1.0)
    cuda.syncthreads()
    out[b, t] = buf[t]


def test_shared_memory_no_thread_of_the_block_wrote_is_garbage():
    """On a GPU a block's shared memory holds anything until it writes it: here NaN, where the
    simulator gave zeros or, its arrays being a launch's, what the block before had written."""
    out = cuda.to_device(np.zeros((2, 64), np.float32))
    read_shared[2, 64](out)
    got = out.copy_to_host()
    assert (got[0] == 1).all() and np.isnan(got[1]).all()


def test_device_memory_no_kernel_wrote_is_garbage():
    """cuda.device_array, as a GPU's: NaN for floats, every bit set for integers (the simulator's
    were NumPy's fresh memory, mostly zeros, and a kernel that added into one passed)."""
    assert np.isnan(cuda.device_array((3, 5), np.float32).copy_to_host()).all()
    assert (cuda.device_array_like(np.zeros(4, np.int64)).copy_to_host() == -1).all()


@cuda.jit
def swap_neighbours(out, n_lanes):
    """Lanes below n_lanes swap their indices with their neighbours' by a warp shuffle; the rest return."""
    t = cuda.threadIdx.x
    if t < n_lanes:
        out[t] = cuda.shfl_xor_sync(0xFFFFFFFF, float32(t), 1)


@pytest.mark.parametrize("code_path", ["gpu"], indirect=True)
def test_a_shuffle_a_lane_never_reaches_fails_at_once(code_path):
    """conftest's shuffles meet at a barrier of the warp's lanes: all of them swap; where one lane has
    returned, no thread can go on, and the launch says so (on a GPU: undefined)."""
    out = cuda.to_device(np.zeros(32, np.float32))
    swap_neighbours[1, 32](out, 32)
    np.testing.assert_array_equal(out.copy_to_host(), np.arange(32) ^ 1)
    with pytest.raises(RuntimeError, match=r"^syncthreads: 31 threads of block \(0, 0, 0\) wait at a barrier"):
        swap_neighbours[1, 32](out, 31)
