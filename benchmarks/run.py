"""torchvision's DenseNet (plain, memory_efficient) against ours (plain, memory-efficient).

    python benchmarks/run.py               # CPU here, or the GPU when there is one
    python benchmarks/run.py --quick       # fewer steps and configurations: a smoke run
    python benchmarks/run.py --device cuda --out DIR

Every figure is measured on the same configuration, batch and precision for all four
implementations. Speed: on CPU the four models take turns step by step in one process, so a
busy machine slows them alike (median of 5 timed steps after 2 warm-up); on a GPU each runs in
its own process. Memory: each figure from a fresh process (peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU). Results are written one JSON file per measurement under
benchmarks/results/<machine>/ (a rerun skips those already there: the command resumes; delete a
file, or pass --force, to measure again), then gathered into <machine>.json and into the tables
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from report import render, write_section  # noqa: E402

from densenets.analysis.bench import (  # noqa: E402
    BenchConfig,
    TrainStep,
    environment,
    fit_line_and_parabola,
    resolve_device,
    run_in_subprocess,
    step_stats,
    time_alternating,
)

IMPLS = [("torchvision", False), ("torchvision", True), ("densenets", False),
         ("densenets", True)]
# on a GPU also each step replayed as a CUDA graph (densenets.training.cuda_graphs), ours and
# torchvision's
GRAPHED = [("densenets", True), ("torchvision", False)]
DEPTHS = [40, 100, 160, 250]


def train_configs(device: str, quick: bool) -> list[BenchConfig]:
    """The issue's training configurations; CPU batches scaled to what 2 cores finish."""
    if device == "cuda":
        # the two configurations with targets first: a run stopped early still has them
        rows = [("densenet121", 256, True, True), ("densenet-bc-250-k24", 64, True, True),
                ("densenet-bc-100-k12", 64, True, True), ("densenet-bc-100-k12", 64, False, False)]
        steps, warmup = (5, 2) if quick else (20, 5)
    else:
        rows = [("densenet-bc-100-k12", 64, False, False), ("densenet-bc-100-k12", 64, False, True),
                ("densenet121", 8, False, False), ("densenet-bc-250-k24", 8, False, False)]
        steps, warmup = (2, 1) if quick else (5, 2)
    if quick:
        rows = rows[:1] if device == "cpu" else rows[:3]
    return [BenchConfig(model=m, batch_size=b, amp=amp, channels_last=cl, device=device,
                        steps=steps, warmup=warmup) for m, b, amp, cl in rows]


def key_of(cfg: BenchConfig, what: str) -> str:
    prec = "bf16" if cfg.amp else "fp32"
    parts = [what, cfg.model, f"b{cfg.batch_size}", prec, "cl" if cfg.channels_last else "nchw"]
    if what != "speed":  # a speed entry holds all four implementations
        parts += [cfg.impl, "me" if cfg.memory_efficient else "plain"]
        parts += ["graphs"] if cfg.cuda_graphs else []
    return "__".join(parts)


class Store:
    """One JSON file per measurement, so an interrupted run resumes where it stopped."""

    def __init__(self, folder: Path, force: bool, render_only: bool = False) -> None:
        self.folder, self.force, self.render_only = folder, force, render_only
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, measure) -> dict:
        path = self.folder / f"{key}.json"
        if path.exists() and not self.force:
            return json.loads(path.read_text())
        if self.render_only:
            return {"error": "not measured"}
        t0 = time.perf_counter()
        try:
            result = measure()
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
            result = {"error": str(e)[-300:]}
        print(f"  {key}: {_brief(result)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        path.write_text(json.dumps(result, indent=1))
        return result


def _brief(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"][-120:]
    parts = []
    if "images_per_s" in r:
        parts.append(f"{r['images_per_s']:.1f} img/s")
    if "peak_mib" in r:
        parts.append(f"{r['peak_mib']:.0f} MiB peak")
    return ", ".join(parts)


def measure_speed_alternating(cfg: BenchConfig) -> dict[str, dict]:
    """The four implementations in one process, taking turns step by step."""
    steps = {}
    for impl, me in IMPLS:
        c = replace(cfg, impl=impl, memory_efficient=me)
        steps[c.label] = TrainStep(c)
    times = time_alternating(steps, cfg.steps, cfg.warmup)
    return {label: step_stats(ts, cfg.batch_size) for label, ts in times.items()}


def run_training(store: Store, cfg: BenchConfig, device: torch.device) -> dict:
    print(f"{cfg.model} batch {cfg.batch_size} {'bf16 CL' if cfg.amp else 'fp32'}", flush=True)
    results: dict[str, dict] = {}
    speed: dict = {}
    if device.type == "cpu":
        speed = store.get(key_of(cfg, "speed"), lambda: measure_speed_alternating(cfg))
    graphed = [(impl, me, True) for impl, me in GRAPHED] if device.type == "cuda" else []
    for impl, me, graphs in [(impl, me, False) for impl, me in IMPLS] + graphed:
        c = replace(cfg, impl=impl, memory_efficient=me, cuda_graphs=graphs)
        if device.type == "cpu":  # memory only: one warm-up step, one measured
            c = replace(c, steps=1, warmup=1)
        r = dict(store.get(key_of(c, "train"), lambda c=c: run_in_subprocess(c)))
        if device.type == "cpu" and "error" not in speed and "error" not in r:
            r.update(speed[c.label])
            r["speed_method"] = "alternating in one process"
        results[c.label] = r
    return {"config": asdict(cfg), "results": results}


def run_depth(store: Store, device: torch.device, quick: bool) -> dict:
    batch = 64 if device.type == "cuda" else 16
    depths = DEPTHS[:2] if quick else DEPTHS
    print(f"memory against depth: densenet-bc-L-k12, batch {batch}", flush=True)
    table: dict[str, dict] = {}
    for impl, me in IMPLS:
        cfg = BenchConfig(impl=impl, memory_efficient=me, batch_size=batch, device=device.type,
                          steps=1, warmup=1)
        peaks = {}
        for depth in depths:
            c = replace(cfg, model=f"densenet-bc-{depth}-k12")
            r = store.get(key_of(c, "depth"), lambda c=c: run_in_subprocess(c))
            if "error" not in r:
                peaks[depth] = r["peak_mib"] - (r["memory_before_mib"]
                                                if device.type == "cpu" else 0)
        fit = fit_line_and_parabola(list(peaks), list(peaks.values())) if len(peaks) >= 3 else {}
        table[cfg.label] = {"memory_mib": peaks, "fit": fit}
    return {"batch": batch, "depths": depths, "results": table}


def machine_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--quick", action="store_true", help="fewer steps and configurations")
    p.add_argument("--force", action="store_true", help="measure again what is stored")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: write the tables from what is stored")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="results folder (default benchmarks/results)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md",
                   help="markdown file whose tables are rewritten ('' to skip)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    tag = machine_tag(device) + ("-quick" if args.quick else "")
    store = Store(args.out / tag, args.force, args.render_only)
    summary = {"machine": tag, "environment": environment(device),
               "date": time.strftime("%Y-%m-%d"), "train": [], "depth": None}
    for cfg in train_configs(device.type, args.quick):
        summary["train"].append(run_training(store, cfg, device))
    summary["depth"] = run_depth(store, device, args.quick)
    (args.out / f"{tag}.json").write_text(json.dumps(summary, indent=1))
    markdown = render(summary)
    print(markdown)
    if str(args.docs):
        write_section(args.docs, tag, markdown)
        print(f"tables written to {args.docs} (section {tag})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
