#!/usr/bin/env bash
# The prepared GPU session: every CUDA check and timing, once, inside one 10-minute call.
#   bash benchmarks/gpu.sh            (from the repository root, on a machine with a CUDA GPU)
# Needs python3 with torch >= 2.4 (CUDA), torchvision, numpy, scikit-learn, matplotlib and rich;
# nothing is installed. Each step has its own time limit, so one that hangs costs only its share.
# 1. benchmarks/gpu_check.py: float64 parity plain vs memory-efficient on the GPU, bf16 accuracy.
# 2. The CLI end to end on CUDA: train digits (bf16 + channels-last + memory-efficient, fp16
#    with the gradient scaler, CUDA graphs), eval, and a torchrun/NCCL run, each checked for its
#    accuracy.
# 3. benchmarks/gpu_profile.py: where a step's GPU time goes, ours against torchvision's.
# 4. benchmarks/run.py --device cuda: the four implementations side by side (plus ours
#    memory-efficient and torchvision plain replayed as CUDA graphs), per-measurement JSON
#    under benchmarks/results/<gpu>/; stopped after BENCH_SECONDS (default: what is left of GPU_SECONDS=540 for
#    the whole script); a second call
#    resumes where the first stopped.
# Results land in $OUT when set (the device tool's folder), else in benchmarks/results/:
# gpu_check.json, cli.log, profile.txt, <gpu>.json, benchmarks_gpu.md, gpu.log, results_gpu.tgz.
# Back here, `python benchmarks/report.py <gpu>.json` writes the GPU tables into the docs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEST="${OUT:-benchmarks/results}"
RUNS="$(mktemp -d)"
mkdir -p "$DEST" benchmarks/results

# the digits CLI on CUDA: each run must reach 95% test accuracy (the CPU recipe gets 99%)
cli() {
  local dt="python3 -m densenets" DEV="${CLI_DEVICE:-cuda}"
  $dt train --device "$DEV" --amp bf16 --channels-last --memory-efficient --epochs 8 \
    --out "$RUNS/bf16" || return 1
  $dt train --device "$DEV" --amp fp16 --epochs 8 --out "$RUNS/fp16" || return 1
  $dt train --device "$DEV" --amp bf16 --channels-last --memory-efficient --cuda-graphs \
    --epochs 8 --out "$RUNS/graphs" || return 1
  torchrun --standalone --nproc_per_node=1 -m densenets train --device "$DEV" --epochs 8 \
    --memory-efficient --out "$RUNS/ddp" || return 1
  for run in bf16 fp16 graphs ddp; do
    $dt eval "$RUNS/$run" --device "$DEV" --json > "$RUNS/$run.eval.json" || return 1
    python3 - "$run" "$RUNS/$run.eval.json" <<'EOF' || return 1
import json, sys
r = json.load(open(sys.argv[2]))
acc = r["top1_acc"]
print(f"eval {sys.argv[1]}: {acc:.2f}% test accuracy", "ok" if acc >= 95 else "FAIL")
sys.exit(0 if acc >= 95 else 1)
EOF
  done
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  timeout -k 10 90 python3 benchmarks/gpu_check.py --json "$DEST/gpu_check.json"
  check=$?
  timeout -k 10 150 bash -c "$(declare -f cli); RUNS=$RUNS; cli" > "$DEST/cli.log" 2>&1
  cli_rc=$?
  tail -n 25 "$DEST/cli.log"
  timeout -k 10 90 python3 benchmarks/gpu_profile.py --out "$DEST/profile.txt" > /dev/null 2>&1
  prof=$?
  cat "$DEST/profile.txt" 2>/dev/null
  # stop measuring after BENCH_SECONDS (SIGINT: run.py ends its child too; stored measurements
  # survive), then write the tables
  left=$(( ${GPU_SECONDS:-540} - SECONDS - 30 ))
  timeout -s INT -k 20 "${BENCH_SECONDS:-$left}" python3 benchmarks/run.py --device cuda \
    ${QUICK:+--quick} --out benchmarks/results --docs "$DEST/benchmarks_gpu.md"
  bench=$?
  python3 benchmarks/run.py --device cuda ${QUICK:+--quick} --render-only \
    --out benchmarks/results --docs "$DEST/benchmarks_gpu.md" > /dev/null
  cp benchmarks/results/*.json "$DEST/" 2>/dev/null || true
  tar czf "$DEST/results_gpu.tgz" -C benchmarks/results . 2>/dev/null || true
  echo "gpu_check exit $check, cli exit $cli_rc, profile exit $prof, benchmark exit $bench"
  date -u
} 2>&1 | tee "$DEST/gpu.log"
