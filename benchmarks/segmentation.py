"""FC-DenseNet training, plain against memory-efficient: step speed and training memory.

    python benchmarks/segmentation.py                 # both configurations, this machine
    python benchmarks/segmentation.py --steps 2       # fewer timed steps (CPU: seconds each)
    python benchmarks/segmentation.py --only 3d
    python benchmarks/segmentation.py --only depth  # memory against depth alone

The paper's FC-DenseNet103 at 224x224, batch 3 (its CamVid crops), and a 3D FC-DenseNet56 on
64^3 volumes (one channel), batch 1; 11 classes, fp32, pixel-wise cross-entropy, SGD with
momentum. Speed: the two modes take turns step by step in one process (the same weights and
data), so a busy machine slows them alike; the median step counts. Memory: each figure from a
fresh process (analysis.bench's measures: peak RSS on CPU, max_memory_allocated on CUDA); the
training memory is the peak minus what the process held with the model and batch built, so the
~700 MiB of torch's own import does not dilute the ratio (the peak itself is recorded too).
Memory against depth: an FC-DenseNet with four pools, k = 12 and L layers in every dense block
(L = 4, 8, 12, 16: 9L dense layers), 96x96, batch 4, each mode and depth in its own process,
three times (the median counts: a CPU's peak memory includes what the allocator keeps, which
moves from run to run); a line and a parabola fitted to each curve (linear when the parabola
fits no better).
Results go to benchmarks/results/segmentation.json and print as markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from densenets import create_model  # noqa: E402
from densenets.analysis.bench import (  # noqa: E402
    current_memory_mib,
    environment,
    fit_line_and_parabola,
    median_run,
    peak_memory_mib,
    resolve_device,
    time_alternating,
)

# name -> (model, overrides, input side, batch): the targets' two rows
CONFIGS = {
    "2d": ("fcdensenet103", dict(num_classes=11), 224, 3),
    "3d": ("fcdensenet56", dict(num_classes=11, in_channels=1, spatial_dims=3), 64, 1),
}
TARGETS = {"memory": 0.5, "speed": 1.0}  # efficient/plain memory at most, speed at least
DEPTH_LAYERS = (4, 8, 12, 16)  # layers per dense block in the depth sweep
DEPTH_REPEATS = 3  # fresh processes per point of the sweep; the median counts


def depth_config(layers: int) -> tuple[str, dict, int, int]:
    """The sweep's FC-DenseNet with ``layers`` layers in each of its 9 dense blocks."""
    return ("fcdensenet56", dict(num_classes=11, growth_rate=12, down_blocks=(layers,) * 4,
                                 bottleneck_layers=layers), 96, 4)


def config(key: str) -> tuple[str, dict, int, int]:
    """(model, overrides, side, batch) of a configuration key: "2d", "3d" or "depth-L"."""
    return depth_config(int(key.split("-")[1])) if key.startswith("depth-") else CONFIGS[key]


class SegStep:
    """One training step of an FC-DenseNet on fixed random data; calling it returns seconds."""

    def __init__(self, key: str, memory_efficient: bool, device: torch.device) -> None:
        name, overrides, side, batch = config(key)
        torch.manual_seed(0)
        self.model = create_model(name, memory_efficient=memory_efficient,
                                  **overrides).to(device).train()
        c, dims = self.model.config.in_channels, self.model.config.spatial_dims
        self.x = torch.randn(batch, c, *[side] * dims, device=device)
        self.y = torch.randint(0, self.model.num_classes, (batch, *[side] * dims), device=device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def measure_memory(key: str, memory_efficient: bool, steps: int, device: str) -> dict:
    """In this (fresh) process: the peak over ``steps`` training steps, and what was held
    before the first."""
    dev = resolve_device(device)
    step = SegStep(key, memory_efficient, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = current_memory_mib(dev)
    times = [step() for _ in range(steps)]
    peak = peak_memory_mib(dev)
    return {"peak_mib": peak, "before_mib": before, "training_mib": peak - before,
            "step_s": times}


def memory_in_subprocess(key: str, memory_efficient: bool, steps: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child",
           json.dumps([key, memory_efficient, steps, device])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory of {key} (memory_efficient={memory_efficient}) failed: "
                           + " | ".join(tail))
    return json.loads(lines[-1])


def measure(key: str, steps: int, warmup: int, device: str) -> dict:
    dev = resolve_device(device)
    runs = {mode: SegStep(key, mode == "memory_efficient", dev)
            for mode in ("plain", "memory_efficient")}
    runs["memory_efficient"].model.load_state_dict(runs["plain"].model.state_dict())
    times = time_alternating(runs, steps, warmup)
    del runs
    memory = {mode: memory_in_subprocess(key, mode == "memory_efficient", max(1, warmup) + 1,
                                         device) for mode in ("plain", "memory_efficient")}
    median = {m: statistics.median(t) for m, t in times.items()}
    name, overrides, side, batch = config(key)
    return {
        "model": name, "overrides": overrides, "input_side": side, "batch_size": batch,
        "step_s": times, "median_step_s": median, "memory": memory,
        "speed_ratio": median["plain"] / median["memory_efficient"],
        "memory_ratio": memory["memory_efficient"]["training_mib"]
        / memory["plain"]["training_mib"],
        "peak_ratio": memory["memory_efficient"]["peak_mib"] / memory["plain"]["peak_mib"],
    }


def depth_sweep(steps: int, device: str) -> dict:
    """Training memory of both modes at every depth of the sweep, each in its own process."""
    out: dict = {"layers_per_block": list(DEPTH_LAYERS),
                 "dense_layers": [9 * n for n in DEPTH_LAYERS]}
    for mode in ("plain", "memory_efficient"):
        efficient = mode == "memory_efficient"
        points = [median_run(partial(memory_in_subprocess, f"depth-{n}", efficient, steps,
                                     device), "training_mib", DEPTH_REPEATS)
                  for n in DEPTH_LAYERS]
        mibs = [p["training_mib"] for p in points]
        out[mode] = {"training_mib": mibs, "runs_mib": [p["runs_training_mib"] for p in points],
                     "fit": fit_line_and_parabola(out["dense_layers"], mibs)}
    return out


def depth_table(sweep: dict) -> str:
    rows = ["| dense layers | " + " | ".join(str(d) for d in sweep["dense_layers"]) +
            " | line R^2 | parabola R^2 |", "|---" * (len(sweep["dense_layers"]) + 3) + "|"]
    for mode in ("plain", "memory_efficient"):
        s = sweep[mode]
        rows.append(f"| {mode.replace('_', '-')} | " +
                    " | ".join(f"{m:.0f}" for m in s["training_mib"]) +
                    f" | {s['fit']['line']['r2']:.4f} | {s['fit']['parabola']['r2']:.4f} |")
    return "\n".join(rows)


def table(results: dict) -> str:
    rows = ["| model | input, batch | step plain / efficient (s) | speed | training memory "
            "plain / efficient (MiB) | memory | peak RSS plain / efficient (MiB) |",
            "|---|---|---|---|---|---|---|"]
    for r in results.values():
        dims = r["overrides"].get("spatial_dims", 2)
        m, s = r["memory"], r["median_step_s"]
        ok_s = "meets" if r["speed_ratio"] >= TARGETS["speed"] else "misses"
        ok_m = "meets" if r["memory_ratio"] <= TARGETS["memory"] else "misses"
        rows.append(
            f"| {r['model']} | {'x'.join([str(r['input_side'])] * dims)}, {r['batch_size']} | "
            f"{s['plain']:.2f} / {s['memory_efficient']:.2f} | {r['speed_ratio']:.2f}x "
            f"({ok_s} >= 1.0x) | {m['plain']['training_mib']:.0f} / "
            f"{m['memory_efficient']['training_mib']:.0f} | {r['memory_ratio']:.2f}x "
            f"({ok_m} <= 0.5x) | {m['plain']['peak_mib']:.0f} / "
            f"{m['memory_efficient']['peak_mib']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--only", choices=[*sorted(CONFIGS), "depth"],
                   help="one configuration, or the depth sweep")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                   "segmentation.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure_memory(*json.loads(args.child))))
        return 0
    keys = [args.only] if args.only else [*CONFIGS, "depth"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for k in keys:  # each configuration written as soon as it is measured
        if k == "depth":
            results[k] = depth_sweep(max(1, args.warmup) + 1, args.device)
            print(depth_table(results[k]), flush=True)
        else:
            results[k] = measure(k, args.steps, args.warmup, args.device)
            print(table({k: results[k]}), flush=True)
        args.out.write_text(json.dumps(
            {"results": results, "environment": environment(resolve_device(args.device))},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
