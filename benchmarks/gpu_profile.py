"""Where a training step's GPU time goes: our memory-efficient blocks against torchvision plain.

    python benchmarks/gpu_profile.py [--out PATH]

For each configuration, three profiled training steps after warm-up: GPU time and host (launch)
time per step, kernels launched per step, and the kernels that take the most GPU time. A step
whose host time exceeds its GPU time is bound by kernel launches, not by the card; the kernel
list says which passes to fuse first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from densenets.analysis.bench import BenchConfig, TrainStep  # noqa: E402

# DenseNet-121 first: its profile (bound by GPU work, not launches) was cut off the first time
CASES = [("densenet121", 128), ("densenet-bc-100-k12", 64)]
IMPLS = [("torchvision", False), ("densenets", True), ("densenets", False)]
STEPS = 3


def profile_case(model: str, batch: int, impl: str, me: bool) -> str:
    cfg = BenchConfig(model=model, impl=impl, memory_efficient=me, batch_size=batch, amp=True,
                      channels_last=True, device="cuda")
    step = TrainStep(cfg)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = sum(step() for _ in range(STEPS)) / STEPS
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.self_device_time_total for e in kernels) / STEPS
    launches = sum(e.count for e in kernels) / STEPS
    lines = [f"## {model} batch {batch} bf16 CL, {cfg.label}",
             f"wall {wall * 1e3:.1f} ms/step, GPU busy {gpu_us / 1e3:.1f} ms/step, "
             f"{launches:.0f} kernels/step"]
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    for e in top:
        lines.append(f"  {e.self_device_time_total / STEPS / 1e3:8.2f} ms  "
                     f"x{e.count // STEPS:<5d} {e.key[:110]}")
    del step
    torch.cuda.empty_cache()
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    torch.backends.cudnn.benchmark = True
    parts = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for model, batch in CASES:
        for impl, me in IMPLS:
            t0 = time.perf_counter()
            try:
                parts.append(profile_case(model, batch, impl, me))
            except (RuntimeError, ValueError) as e:  # report and go on to the next case
                parts.append(f"## {model} {impl} me={me}: FAILED {str(e)[-300:]}")
            print(parts[-1], f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.out:
                args.out.write_text("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
