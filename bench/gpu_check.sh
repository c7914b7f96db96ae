#!/usr/bin/env bash
# The GPU checks of one lent-device session, as one command: the CUDA tests on the real GPU (slow
# cases too), SmolLM2's greedy tokens on the GPU against the CPU per cache mode, a short
# bench/gpu.py, then SmolLM2's tokens/s on each device (xqrt.run's summary line; the first cut if
# time runs out). Logs and docs/performance-gpu.md go to $OUT (or ./gpu-check).
#
# The device image has numba-cuda, torch and transformers but not gguf, and reaches no network;
# SmolLM2 (98 MB) is larger than one call's 64 MiB of carried files, so it travels in two halves.
# Here, once:
#   echo /.whl/ >> .git/info/exclude; echo /.xfer/ >> .git/info/exclude
#   pip download --no-deps gguf==0.19.0 -d .whl
#   mkdir -p .xfer && split -n 2 -d ~/.cache/xqrt/SmolLM2-135M-Instruct.Q4_1.gguf .xfer/smollm2.
# then two device calls, the second within the 30 s the machine stays warm (the second runs about
# 9.5 minutes, up to 10 with the tokens/s lines: give it timeout_s 600):
#   carry [".xfer/smollm2.00"]:          mkdir -p /tmp/xq && cp .xfer/smollm2.00 /tmp/xq/
#   carry [".xfer/smollm2.01", ".whl"]:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
model=/tmp/xq/smollm2.gguf
if [ ! -f "$model" ]; then
  cat /tmp/xq/smollm2.00 .xfer/smollm2.01 > "$model" || exit 1
fi
export XQRT_SMOLLM2=$model
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -m "slow or not slow" 2>&1 \
  | tee "$OUT/test_cuda.log"
timeout 270 python3 -m pytest -q -p no:cacheprovider tests/test_smollm2.py -k gpu 2>&1 | tee "$OUT/smollm2_gpu.log"
timeout 150 python3 bench/gpu.py --layers 4 --contexts 1024 32768 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
for device in cuda cpu; do  # SmolLM2's own tokens/s, GPU and CPU (the summary line of each)
  timeout 90 python3 -m xqrt.run "$model" -p "The capital of France is" -n 64 --temp 0 --device $device 2>&1 \
    | tail -1 | sed "s/^/$device: /" | tee -a "$OUT/smollm2_run.log"
done
