"""Every CUDA kernel compiled for a real GPU, without one: the argument types the simulator saw →
NVVM's PTX → ptxas, with each kernel's registers, spills and shared memory.

    XQRT_KERNEL_SIGNATURES=/tmp/kernels.json python -m pytest -q tests/test_cuda.py -m "slow or not slow"
    python bench/ptx_check.py /tmp/kernels.json [--arch sm_80 sm_90]

The simulator runs the kernels as Python, so it checks what they compute but not that Numba can
type and compile them, nor what they cost in registers and shared memory; this does, for the
shuffle (GPU) paths. It needs numba-cuda and NVIDIA's compiler wheels, no driver and no GPU — in
a virtual environment of its own, since numba-cuda replaces the numba.cuda the tests' simulator
runs on:

    python -m venv --system-site-packages /tmp/ptx && . /tmp/ptx/bin/activate
    pip install numba-cuda nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12

Exit code 1 when a kernel fails to compile or assemble (ptxas refuses, for one, more than 48 KB of
static shared memory per block), or spills registers to local memory: the kernels are laid out
(and the fused ones given launch bounds) to hold their values in registers, and a spill undoes that.
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
    (kc._make_matvec(rows))."""
    if module == "bench_gpu" and module not in sys.modules:  # tests load bench/gpu.py under that name
        spec = importlib.util.spec_from_file_location(module, os.path.join(ROOT, "bench", "gpu.py"))
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    mod = importlib.import_module(module)
    if ".<locals>." not in qualname:
        return getattr(mod, qualname)
    maker, name = qualname.split(".<locals>.")
    return next(k for k in getattr(mod, maker)(*closure) if k.py_func.__name__ == name)


def ptxas() -> str:
    import nvidia.cuda_nvcc
    return os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")


def assemble(ptx: str, arch: str) -> tuple[bool, str]:
    """(assembled without a spill, ptxas's resource line or its error) for one kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        run = subprocess.run([ptxas(), f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True)
    finally:
        os.unlink(f.name)
    return resources(run.returncode, run.stderr)


def resources(returncode: int, stderr: str) -> tuple[bool, str]:
    """ptxas -v's verdict: (assembled without a spill, its resource line or its error)."""
    text = re.sub(r"'_Z\w+'", "the kernel", stderr.strip())  # mangled names say nothing
    if returncode:
        return False, " ".join(line for line in text.splitlines() if "error" in line or "fatal" in line)[:300]
    used = re.search(r"Used (\d+) registers", text)
    smem = re.search(r"(\d+) bytes smem", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    spilled = int(spill[1]) if spill else 0
    return not spilled, (f"{used[1] if used else '?'} registers, {smem[1] if smem else 0} B shared, "
                         f"{spilled} B spilled")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("signatures", help="the file tests wrote with XQRT_KERNEL_SIGNATURES")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"],
                    help="the GPUs to compile for [sm_80 (A100) and sm_90 (H100, H200)]")
    args = ap.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("bench/ptx_check.py: unset NUMBA_ENABLE_CUDASIM (this compiles for the GPU itself)")
    from numba import cuda
    records = json.load(open(args.signatures))
    from xqrt.kernels import cuda as kc
    on_gpu = []
    for module, qualname, closure, arg_types in records:  # the simulator's rows per warp are not a GPU's
        if qualname.startswith("_make_matvec.") and closure == [kc.SIM_ROWS]:
            closure = [kc.ROWS]
        if [module, qualname, closure, arg_types] not in on_gpu:
            on_gpu.append([module, qualname, closure, arg_types])
    records = on_gpu
    failed = 0
    print(f"| kernel | argument types | {' | '.join(args.arch)} |")
    print("|---|---|" + "---|" * len(args.arch))
    for module, qualname, closure, arg_types in records:
        label = qualname.replace(".<locals>.", f"({', '.join(map(str, closure))}).")
        cells = []
        for arch in args.arch:
            try:
                k = dispatcher(module, qualname, closure)
                sig = tuple(numba_type(t) for t in arg_types)
                ptx, _ = cuda.compile_ptx(k.py_func, sig, fastmath=k.targetoptions.get("fastmath", False),
                                          cc=tuple(int(d) for d in arch.removeprefix("sm_")),
                                          launch_bounds=k.targetoptions.get("launch_bounds"))
                ok, what = assemble(ptx, arch)
            except Exception as e:  # noqa: BLE001 — reported in the table, the others still compiled
                lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
                ok, what = False, f"{type(e).__name__}: {' '.join(lines[:3])[:300]}"
            failed += not ok
            cells.append(("" if ok else "FAILED: ") + what)
        print(f"| {label} | {', '.join(arg_types)} | {' | '.join(cells)} |", flush=True)
    print(f"\n{len(records)} kernel signatures × {len(args.arch)} GPUs ({', '.join(args.arch)}), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
