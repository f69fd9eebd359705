#!/usr/bin/env bash
# The prepared GPU session for the memory-efficient blocks: every check and timing, once.
#   bash benchmarks/gpu.sh            (from the repository root, on a machine with a CUDA GPU)
# Needs python3 with torch >= 2.4 (CUDA), torchvision, numpy and rich; nothing is installed.
# 1. benchmarks/gpu_check.py: float64 parity plain vs memory-efficient on the GPU, bf16 accuracy.
# 2. benchmarks/run.py --device cuda: the four implementations side by side, per-measurement JSON
#    under benchmarks/results/<gpu>/; stopped after BENCH_SECONDS (default 420) so that the whole
#    script fits a 10-minute call; a second call resumes where the first stopped.
# Results land in $OUT when set (the device tool's folder), else in benchmarks/results/:
# gpu_check.json, <gpu>.json, benchmarks_gpu.md, gpu.log, results_gpu.tgz (every measurement).
# Back here, `python benchmarks/report.py <gpu>.json` writes the GPU tables into the docs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST" benchmarks/results
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  python3 benchmarks/gpu_check.py --json "$DEST/gpu_check.json"
  check=$?
  # stop measuring after BENCH_SECONDS (SIGINT: run.py ends its child too; stored measurements
  # survive), then write the tables
  timeout -s INT -k 30 "${BENCH_SECONDS:-420}" python3 benchmarks/run.py --device cuda ${QUICK:+--quick} \
    --out benchmarks/results --docs "$DEST/benchmarks_gpu.md"
  bench=$?
  python3 benchmarks/run.py --device cuda ${QUICK:+--quick} --render-only \
    --out benchmarks/results --docs "$DEST/benchmarks_gpu.md" > /dev/null
  cp benchmarks/results/*.json "$DEST/" 2>/dev/null || true
  tar czf "$DEST/results_gpu.tgz" -C benchmarks/results . 2>/dev/null || true
  echo "gpu_check exit $check, benchmark exit $bench"
} 2>&1 | tee "$DEST/gpu.log"
