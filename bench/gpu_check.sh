#!/usr/bin/env bash
# The GPU checks of one lent-device session, in two commands. `model-free`: a short bench/gpu.py
# (its random Llama-3-8B-shaped model) and the CUDA tests on the real GPU (slow cases too). Then,
# SmolLM2 whole: its greedy tokens on the GPU against the CPU per cache mode; its start-up with
# Numba's disk cache empty and filled; its tokens/s with and without the CUDA graph, with the
# tensor-core rebuild and on the CPU (bench/cpu.py --devices). Logs, docs/performance-gpu.md and
# performance-engine.md go to $OUT (or ./gpu-check).
#
# The device image has numba-cuda, torch and transformers but not gguf, and reaches no network;
# SmolLM2 (98 MB) is larger than one call's 64 MiB of carried files, so it travels in two halves.
# Here, once:
#   echo /.whl/ >> .git/info/exclude; echo /.xfer/ >> .git/info/exclude
#   pip download --no-deps gguf==0.19.0 -d .whl
#   mkdir -p .xfer && split -n 2 -d ~/.cache/xqrt/SmolLM2-135M-Instruct.Q4_1.gguf .xfer/smollm2.
# then two device calls, the second within the 30 s the machine stays warm (each runs about 8
# minutes at most: give them timeout_s 560):
#   carry [".xfer/smollm2.00", ".whl"]:  bash bench/gpu_check.sh model-free
#   carry [".xfer/smollm2.01", ".whl"]:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import importlib.metadata as m; print('numba-cuda', m.version('numba-cuda'))" | tee -a "$OUT/gpu.txt"  # ≥ 0.14

# Each stage under a timeout, most needed first: the device time of a task (15 minutes at
# present, the machine's start included) may not run to the last.
if [ "${1:-}" = model-free ]; then
  mkdir -p /tmp/xq && cp .xfer/smollm2.00 /tmp/xq/ || exit 1
  timeout 240 python3 bench/gpu.py --layers 4 --contexts 1024 32768 --bits 3 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -m "slow or not slow" 2>&1 \
    | tee "$OUT/test_cuda.log"
  exit 0
fi

model=/tmp/xq/smollm2.gguf
if [ ! -f "$model" ]; then
  cat /tmp/xq/smollm2.00 .xfer/smollm2.01 > "$model" || exit 1
fi
export XQRT_SMOLLM2=$model
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_smollm2.py -k gpu 2>&1 | tee "$OUT/smollm2_gpu.log"
# Start-up: a new process's first tokens with every kernel compiled (Numba's disk cache empty),
# then loaded (the cache as that run left it) — the same tokens both times
kernels=$(mktemp -d)
TIMEFORMAT="%R s"
for cache in empty filled; do
  echo -n "SmolLM2 on the GPU, 16 tokens, Numba's cache $cache: " >> "$OUT/startup.txt"
  { time NUMBA_CACHE_DIR=$kernels timeout 120 python3 -m xqrt.run "$model" --device cuda -p "The capital of France is" \
      -n 16 --temp 0 > "$OUT/start_$cache.log" 2>&1; } 2>> "$OUT/startup.txt"
done
diff <(grep -v "^xqrt:" "$OUT/start_empty.log") <(grep -v "^xqrt:" "$OUT/start_filled.log") > /dev/null \
  && echo "same tokens" >> "$OUT/startup.txt" || echo "TOKENS DIFFER" >> "$OUT/startup.txt"
cat "$OUT/startup.txt"
# SmolLM2's own tokens/s in its full 8192-token context: the step as a CUDA graph, launched kernel by
# kernel, with the tensor-core rebuild (XQuant), on the CPU
timeout 140 python3 bench/cpu.py "$model" --modes fp16 xquant:3 --devices cuda cuda-launched cpu cuda-cublas \
  --contexts 128 1024 --ctx 8192 --gen-tokens 16 --budget-curve "" --no-transformers \
  --out "$OUT/performance-engine.md" 2>&1 | tee "$OUT/engine.log"
