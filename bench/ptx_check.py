"""Every CUDA kernel compiled for a real GPU, without one: the argument types the simulator saw →
NVVM's PTX → ptxas, with each kernel's registers, shared memory, stack frame (local arrays the
compiler could not keep in registers: indexed by a variable) and spills; and whether the next
process will load it from Numba's disk cache.

    XQRT_KERNEL_SIGNATURES=/tmp/kernels.json python -m pytest -q tests/test_cuda.py -m "slow or not slow"
    python bench/ptx_check.py /tmp/kernels.json [--arch sm_80 sm_90]

The simulator runs the kernels as Python, so it checks what they compute but not that Numba can
type and compile them, nor what they cost in registers and shared memory; this does, for the
shuffle (GPU) paths. It needs numba-cuda and NVIDIA's compiler wheels, no driver and no GPU — in
a virtual environment of its own, since numba-cuda replaces the numba.cuda the tests' simulator
runs on:

    python -m venv --system-site-packages /tmp/ptx && . /tmp/ptx/bin/activate
    pip install numba-cuda nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12        # CUDA 12, as CI
    pip install "numba-cuda[cu13]" "nvidia-cuda-nvcc==13.*"                     # or CUDA 13

`--sass KERNEL` also prints the instruction mix of that kernel's busiest loop (the basic block
with the most FFMAs) from NVIDIA's disassembler (`pip install nvidia-cuda-nvdisasm`): how many of
a product loop's instructions are its FMAs, counted without a GPU.

Exit code 1 when a kernel fails to compile or assemble (ptxas refuses, for one, more than 48 KB of
static shared memory per block), or spills registers to local memory: the kernels are laid out
(and the fused ones given launch bounds) to hold their values in registers, and a spill undoes that.
Also when one of xqrt's kernels would miss the disk cache in every process (cache_problem), and
when a GPU would refuse to launch a kernel with the threads a block the tests launched it with:
past its launch bounds, or more registers than a block may have (launch_problem).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def numba_type(name: str):
    from numba import types
    array = re.fullmatch(r"array\((\w+), (\d+)d, (\w)\)", name)
    if array:
        return types.Array(getattr(types, array[1]), int(array[2]), array[3])
    return types.boolean if name == "bool" else getattr(types, name)


def dispatcher(module: str, qualname: str, closure):
    """The kernel a recorded launch ran: a module's own, or one a maker function builds per setting
    (kc._make_matvec(rows), kc._make_values(heads), kc._make_flash(group))."""
    if module == "bench_gpu" and module not in sys.modules:  # tests load bench/gpu.py under that name
        spec = importlib.util.spec_from_file_location(module, os.path.join(ROOT, "bench", "gpu.py"))
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    mod = importlib.import_module(module)
    if ".<locals>." not in qualname:
        return getattr(mod, qualname)
    maker, name = qualname.split(".<locals>.")
    made = getattr(mod, maker)(*closure)
    return next(k for k in (made if isinstance(made, tuple) else (made,)) if k.py_func.__name__ == name)


def ptxas() -> str:
    return _tool("ptxas", "nvidia-cuda-nvcc-cu12, or nvidia-cuda-nvcc for CUDA 13")


def nvdisasm() -> str:
    return _tool("nvdisasm", "nvidia-cuda-nvdisasm")


def _tool(name: str, wheel: str) -> str:
    """An NVIDIA tool from the toolkit's wheels (CUDA 12 and 13 lay them out differently) or a
    CUDA install, as numba-cuda finds its own."""
    from cuda.pathfinder import find_nvidia_binary_utility
    found = find_nvidia_binary_utility(name)
    if not found:
        sys.exit(f"bench/ptx_check.py: no {name} (pip install {wheel})")
    return found


def assemble(ptx: str, arch: str, sass: bool = False) -> tuple[bool, str]:
    """(assembled without a spill, ptxas's resource line or its error) for one kernel's PTX; sass:
    its busiest loop's instruction mix after that line."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas(), f"-arch={arch}", "-v", src, "-o", cubin], capture_output=True, text=True)
        ok, what = resources(run.returncode, run.stderr)
        if sass and not run.returncode:
            listing = subprocess.run([nvdisasm(), "-c", cubin], capture_output=True, text=True, check=True).stdout
            what += "; " + busiest_loop(listing)
    return ok, what


def busiest_loop(listing: str) -> str:
    """The basic block of a disassembly with the most FFMAs: its instructions, by opcode."""
    blocks, block = [], Counter()
    for line in listing.splitlines():
        if re.match(r"\s*\.L_x_\d+:", line):
            blocks.append(block)
            block = Counter()
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if op:
            block[op[1]] += 1
    blocks.append(block)
    top = max(blocks, key=lambda b: b["FFMA"])
    mix = ", ".join(f"{n} {op}" for op, n in top.most_common(6))
    return f"busiest loop: {top['FFMA']} FFMA in {sum(top.values())} instructions ({mix})"


def cache_problem(kernel) -> str:
    """Why a kernel would be compiled again by the next process, not loaded from Numba's disk
    cache ('' where it would be): not cached; or closing over more than plain values — the cache
    keys a kernel on its closure's pickle, and a captured device function's differs in every
    process, so each run would miss and add one more entry. Also that its saves take
    xqrt.jit_cache's lock."""
    from xqrt import jit_cache
    cache = getattr(kernel, "_cache", None)
    if type(cache).__name__ != "CUDACache":
        return "FAILED: not cached (cache=True)"
    captured = [type(c.cell_contents).__name__ for c in kernel.py_func.__closure__ or ()
                if type(c.cell_contents) not in (int, float, bool, str)]
    if captured:
        return f"FAILED: closes over {', '.join(captured)}: a cache key of its own in every process"
    if not isinstance(cache._cache_file, jit_cache.LockedSaves):
        return "FAILED: saves without xqrt.jit_cache's lock"
    return ""


def resources(returncode: int, stderr: str) -> tuple[bool, str]:
    """ptxas -v's verdict: (assembled without a spill, its resource line or its error)."""
    text = re.sub(r"'_Z\w+'", "the kernel", stderr.strip())  # mangled names say nothing
    if returncode:
        return False, " ".join(line for line in text.splitlines() if "error" in line or "fatal" in line)[:300]
    used = re.search(r"Used (\d+) registers", text)
    smem = re.search(r"(\d+) bytes smem", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    stack = re.search(r"(\d+) bytes stack frame", text)  # local arrays indexed by variables live there
    spilled = int(spill[1]) if spill else 0
    return not spilled, (f"{used[1] if used else '?'} registers, {smem[1] if smem else 0} B shared, "
                         f"{stack[1] if stack else 0} B stack, {spilled} B spilled")


REGISTERS_PER_BLOCK = 65536  # sm_80 and sm_90 alike …
REGISTER_UNIT = 256  # … allocated to a warp in units of this many


def launch_problem(registers: int, threads: int, launch_bounds) -> str:
    """Why a GPU would refuse to launch a kernel with this many threads a block ('' where it would
    not): more than 1024, more than its launch bounds were compiled for, or more registers than a
    block may hold ("too many resources requested for launch"). The simulator launches any size."""
    if threads > 1024:
        return f"{threads} threads a block (1024 at most)"
    if launch_bounds and threads > launch_bounds[0]:
        return f"launched with {threads} threads, compiled for {launch_bounds[0]} (launch bounds)"
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    need = per_warp * -(-threads // 32)
    if need > REGISTERS_PER_BLOCK:
        return f"{threads} threads of {registers} registers need {need} registers, a block has {REGISTERS_PER_BLOCK}"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("signatures", help="the file tests wrote with XQRT_KERNEL_SIGNATURES")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"],
                    help="the GPUs to compile for [sm_80 (A100) and sm_90 (H100, H200)]")
    ap.add_argument("--sass", metavar="KERNEL", help="also print this kernel's busiest loop, disassembled")
    args = ap.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("bench/ptx_check.py: unset NUMBA_ENABLE_CUDASIM (this compiles for the GPU itself)")
    from numba import cuda
    records = json.load(open(args.signatures))
    from xqrt.kernels import cuda as kc
    on_gpu = {}  # (module, qualname, closure, argument types) → the most threads a block it was launched with
    for module, qualname, closure, arg_types, threads in records:
        if qualname.startswith("_make_matvec.") and closure == [kc.SIM_ROWS]:  # the simulator's rows per warp
            closure = [kc.ROWS]
        key = module, qualname, tuple(closure), tuple(arg_types)
        on_gpu[key] = max(on_gpu.get(key, 0), threads)
    failed = 0
    print(f"| kernel | argument types | {' | '.join(args.arch)} | disk cache |")
    print("|---|---|" + "---|" * (len(args.arch) + 1))
    for (module, qualname, closure, arg_types), threads in on_gpu.items():
        label = qualname.replace(".<locals>.", f"({', '.join(map(str, closure))}).")
        cells, k = [], None
        for arch in args.arch:
            try:
                k = dispatcher(module, qualname, closure)
                sig = tuple(numba_type(t) for t in arg_types)
                ptx, _ = cuda.compile_ptx(k.py_func, sig, fastmath=k.targetoptions.get("fastmath", False),
                                          cc=tuple(int(d) for d in arch.removeprefix("sm_")),
                                          launch_bounds=k.targetoptions.get("launch_bounds"))
                ok, what = assemble(ptx, arch, sass=qualname.rsplit(".", 1)[-1] == args.sass)
                if ok:  # its resource line, registers first
                    registers = int(re.match(r"(\d+) registers", what)[1])
                    problem = launch_problem(registers, threads, k.targetoptions.get("launch_bounds"))
                    ok, what = not problem, f"{what}, {threads} threads" + (f": {problem}" if problem else "")
            except Exception as e:  # noqa: BLE001 — reported in the table, the others still compiled
                lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
                ok, what = False, f"{type(e).__name__}: {' '.join(lines[:3])[:300]}"
            failed += not ok
            cells.append(("" if ok else "FAILED: ") + what)
        if not module.startswith("xqrt."):
            cells.append("bench only")
        elif k is not None:  # (a kernel that did not build has failed already)
            problem = cache_problem(k)
            failed += bool(problem)
            cells.append(problem or "yes")
        else:
            cells.append("?")
        print(f"| {label} | {', '.join(arg_types)} | {' | '.join(cells)} |", flush=True)
    print(f"\n{len(on_gpu)} kernel signatures × {len(args.arch)} GPUs ({', '.join(args.arch)}), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
