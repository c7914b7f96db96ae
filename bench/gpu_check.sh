#!/usr/bin/env bash
# The GPU checks of one lent-device session, in two commands, each given the seconds it may take.
# `model-free`: a short bench/gpu.py (its random Llama-3-8B-shaped model), then the CUDA tests on
# the real GPU (slow cases too). Then, SmolLM2 whole: its greedy tokens on the GPU against the CPU
# per cache mode; its tokens/s with and without the CUDA graph, with the tensor-core rebuild and on
# the CPU (bench/cpu.py --devices); its start-up with Numba's disk cache empty and filled. Logs,
# docs/performance-gpu.md and performance-engine.md go to $OUT (or ./gpu-check).
#
# The device image has numba-cuda, torch and transformers but not gguf, and reaches no network;
# SmolLM2 (98 MB) is larger than one call's 64 MiB of carried files, so it travels in two halves.
# Here, once:
#   echo /.whl/ >> .git/info/exclude; echo /.xfer/ >> .git/info/exclude
#   pip download --no-deps gguf==0.19.0 -d .whl
#   mkdir -p .xfer && split -n 2 -d ~/.cache/xqrt/SmolLM2-135M-Instruct.Q4_1.gguf .xfer/smollm2.
# A task's device time (15 minutes at present) counts the machine's start (a minute or more), the
# transfers and the 30 s between calls, so the two commands get about 12 minutes between them; the
# second must follow within the 30 s the machine stays warm. Each command's last argument is the
# seconds its stages may take; give the call's timeout_s 15 more:
#   carry [".xfer/smollm2.00", ".whl"]:  bash bench/gpu_check.sh model-free 300
#   carry [".xfer/smollm2.01", ".whl"]:  bash bench/gpu_check.sh 390   (or what status leaves, less 60)
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
[ "${1:-}" = model-free ] && { part=model-free; shift; } || part=smollm2
end=$((SECONDS + ${1:-600}))

# Stages go most needed first, each under its own cap and what is left of the command's seconds.
stage() {  # stage CAP LOG COMMAND...: the command's output to the console and $OUT/LOG; its status
  local cap=$1 log=$2 left=$((end - SECONDS - 5))
  shift 2
  if [ "$left" -lt 20 ]; then
    echo "skipped, no time left: $*" | tee -a "$OUT/$log"
    return 125
  fi
  timeout $((cap < left ? cap : left)) "$@" 2>&1 | tee -a "$OUT/$log"
}

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import importlib.metadata as m; print('numba-cuda', m.version('numba-cuda'))" | tee -a "$OUT/gpu.txt"  # ≥ 0.14

if [ $part = model-free ]; then
  mkdir -p /tmp/xq && cp .xfer/smollm2.00 /tmp/xq/ || exit 1
  stage 240 bench.log python3 bench/gpu.py --layers 4 --contexts 1024 32768 --bits 3 --out "$OUT"
  stage 240 test_cuda.log python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -m "slow or not slow"
  exit 0
fi

model=/tmp/xq/smollm2.gguf
if [ ! -f "$model" ]; then
  cat /tmp/xq/smollm2.00 .xfer/smollm2.01 > "$model" || exit 1
fi
export XQRT_SMOLLM2=$model
stage 200 smollm2_gpu.log python3 -m pytest -q -p no:cacheprovider tests/test_smollm2.py -k gpu
# SmolLM2's own tokens/s in its full 8192-token context: the step as a CUDA graph, launched kernel by
# kernel, with the tensor-core rebuild (XQuant), on the CPU
stage 140 engine.log python3 bench/cpu.py "$model" --modes fp16 xquant:3 --devices cuda cuda-launched cpu cuda-cublas \
  --contexts 128 1024 --ctx 8192 --gen-tokens 16 --budget-curve "" --no-transformers --out "$OUT/performance-engine.md"
# Start-up: a new process's first tokens with every kernel compiled (Numba's disk cache empty),
# then loaded (the cache as that run left it) — the same tokens both times
kernels=$(mktemp -d) statuses=
for cache in empty filled; do
  t0=$(date +%s.%N)
  NUMBA_CACHE_DIR=$kernels stage 90 "start_$cache.log" python3 -m xqrt.run "$model" --device cuda \
    -p "The capital of France is" -n 16 --temp 0 > /dev/null
  status=$?
  statuses+=$status
  took=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  echo "SmolLM2 on the GPU, 16 tokens, Numba's cache $cache: $took s (exit status $status)" >> "$OUT/startup.txt"
done
if [ "$statuses" = 00 ]; then
  diff <(grep -v "^xqrt:" "$OUT/start_empty.log") <(grep -v "^xqrt:" "$OUT/start_filled.log") > /dev/null \
    && echo "same tokens" >> "$OUT/startup.txt" || echo "TOKENS DIFFER" >> "$OUT/startup.txt"
fi
cat "$OUT/startup.txt"
