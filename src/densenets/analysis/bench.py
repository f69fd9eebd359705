"""Training-step measurements: images per second and peak memory, ours or torchvision's.

Used by ``densenets bench`` (one configuration, this process) and by ``benchmarks/run.py``
(torchvision and densenets side by side). Speed comparisons alternate the models step by step
in one process, so a busy machine slows them alike; a peak-memory figure needs a process of its
own (CPU peak RSS is per process), which :func:`run_in_subprocess` provides.

A step is forward + cross-entropy + backward + SGD (Nesterov momentum 0.9, weight decay 1e-4)
on random data already on the device. CPU memory is peak resident set size; GPU memory is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device

IMPLEMENTATIONS = ("densenets", "torchvision")


@dataclass
class BenchConfig:
    """One configuration to measure."""

    model: str = "densenet-bc-100-k12"
    impl: str = "densenets"  # or "torchvision"
    memory_efficient: bool = False
    batch_size: int = 64
    input_size: int | None = None  # None: the model's native size (224 or 32)
    amp: bool = False  # bfloat16 autocast
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # replay each step as a CUDA graph (densenets.training.cuda_graphs)
    device: str = "auto"
    steps: int = 5
    warmup: int = 2

    @property
    def label(self) -> str:
        mode = "memory_efficient" if self.memory_efficient else "plain"
        return f"{self.impl} {mode}" + (" + CUDA graphs" if self.cuda_graphs else "")


def torchvision_densenet(name: str, memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet with exactly the architecture of our zoo model ``name``.

    torchvision builds only the -BC form (bottleneck, compression 0.5) with an ImageNet stem;
    for CIFAR names its stem is replaced by our single 3x3 convolution (BN, ReLU and pool
    removed), so parameter counts and FLOPs match ours.
    """
    import torchvision

    from ..models.zoo import model_config

    cfg = model_config(name)
    if not cfg.get("bottleneck", True) or cfg.get("compression", 0.5) != 0.5:
        raise ValueError(f"torchvision's DenseNet has only the -BC form (bottleneck, "
                         f"compression 0.5); {name!r} is not one")
    model = torchvision.models.DenseNet(
        growth_rate=cfg["growth_rate"], block_config=tuple(cfg["block_config"]),
        num_init_features=cfg["num_init_features"], bn_size=cfg.get("bn_size", 4),
        num_classes=cfg.get("num_classes", 1000), memory_efficient=memory_efficient)
    if cfg.get("stem") == "cifar":
        model.features.conv0 = nn.Conv2d(3, cfg["num_init_features"], 3, 1, 1, bias=False)
        model.features.norm0 = model.features.relu0 = model.features.pool0 = nn.Identity()
    return model


def build_model(cfg: BenchConfig) -> nn.Module:
    if cfg.impl == "torchvision":
        return torchvision_densenet(cfg.model, cfg.memory_efficient)
    if cfg.impl != "densenets":
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {cfg.impl!r}")
    from ..factory import create_model

    return create_model(cfg.model, memory_efficient=cfg.memory_efficient)


def input_size(cfg: BenchConfig) -> int:
    if cfg.input_size is not None:
        return cfg.input_size
    from ..models.zoo import native_input_size

    return native_input_size(cfg.model)[-1]


class TrainStep:
    """One model's training step on fixed random data; calling it runs and times one step."""

    def __init__(self, cfg: BenchConfig, model: nn.Module | None = None) -> None:
        if cfg.batch_size < 2:
            raise ValueError("--batch-size must be at least 2 (batch normalisation needs more "
                             "than one value per channel)")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(0)
        model = (model if model is not None else build_model(cfg)).to(self.device).train()
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                   weight_decay=1e-4)
        size = input_size(cfg)
        self.x = torch.randn(cfg.batch_size, 3, size, size, device=self.device)
        self.x = self.x.contiguous(memory_format=fmt)
        classes = model.classifier.out_features
        self.y = torch.randint(0, classes, (cfg.batch_size,), device=self.device)
        self.fn = torch.compile(model) if cfg.compile else model
        self.graphed = None
        if cfg.cuda_graphs:
            from ..training.cuda_graphs import GraphedTrainStep, check_supported

            if cfg.warmup < 2:
                raise ValueError("--cuda-graphs needs --warmup 2 or more: one eager step, then "
                                 "one that records the graph, so that timed steps are replays")
            check_supported(self.device, None, False, cfg.compile)
            # the last warm-up step records the graph, so timed steps are replays
            self.graphed = GraphedTrainStep(model, self.opt, torch.bfloat16 if cfg.amp else None,
                                            warmup=max(0, cfg.warmup - 1))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> float:
        """Run one step; return its wall time in seconds."""
        self._sync()
        start = time.perf_counter()
        if self.graphed is not None:
            self.graphed(self.x, self.y)
            self._sync()
            return time.perf_counter() - start
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            loss = F.cross_entropy(self.fn(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sync()
        return time.perf_counter() - start


def median_run(run: Callable[[], dict], key: str, repeats: int = 3) -> dict:
    """``run()`` (a measurement in a fresh process, say) ``repeats`` times: the run whose
    ``key`` is the median, with every run's ``key`` as ``runs_<key>``. A CPU's peak memory
    includes what the C allocator keeps after a free, which moves from process to process."""
    runs = [run() for _ in range(repeats)]
    middle = sorted(runs, key=lambda r: r[key])[len(runs) // 2]
    return {**middle, f"runs_{key}": [r[key] for r in runs]}


def time_alternating(steps: dict[str, Callable[[], float]], n: int,
                     warmup: int) -> dict[str, list[float]]:
    """Warm every model up, then time ``n`` steps of each, taking turns step by step."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(n):
        for key, step in steps.items():
            times[key].append(step())
    return times


def step_stats(times: list[float], batch_size: int) -> dict:
    """Median and best step: on a shared machine a step disturbed by other work can take ten
    times longer, and the best of several alternating steps shows the undisturbed speed."""
    median = statistics.median(times) if times else float("nan")
    best = min(times) if times else float("nan")
    return {"step_s": times, "median_step_s": median, "images_per_s": batch_size / median,
            "best_step_s": best, "best_images_per_s": batch_size / best}


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations, or resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM starts afresh at exec; ru_maxrss keeps the parent's peak on Linux
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 2**10
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def run_single(cfg: BenchConfig) -> dict:
    """Measure one configuration in this process: speed and (meaningful in a fresh process)
    peak memory."""
    step = TrainStep(cfg)
    if step.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(step.device)
    before = current_memory_mib(step.device)
    start = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    warmup_s = time.perf_counter() - start
    times = [step() for _ in range(cfg.steps)]
    peak = peak_memory_mib(step.device)
    return {
        "config": asdict(cfg), "label": cfg.label, "input_size": input_size(cfg),
        **step_stats(times, cfg.batch_size), "warmup_s": warmup_s, "peak_mib": peak,
        "memory_before_mib": before,
        "memory_kind": "cuda max_memory_allocated" if step.device.type == "cuda"
        else "peak RSS", "params": sum(p.numel() for p in step.model.parameters()),
        "backend": _backend(step.device, cfg), "environment": environment(step.device),
    }


def _backend(device: torch.device, cfg: BenchConfig) -> str | None:
    if cfg.impl != "densenets" or not cfg.memory_efficient:
        return None
    from ..efficient.dispatch import backend

    dtype = torch.bfloat16 if cfg.amp else torch.float32
    return backend(device, dtype)


def run_in_subprocess(cfg: BenchConfig, timeout: float = 1800) -> dict:
    """:func:`run_single` in a fresh Python process, so its peak memory is its own."""
    # the child imports this very package, installed or not
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "densenets.analysis.bench", json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"benchmark of {cfg.label} {cfg.model} failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


def environment(device: torch.device | None = None) -> dict:
    """Machine and versions, for the record next to every number."""
    import torchvision

    device = device or resolve_device()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def fit_line_and_parabola(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line and parabola through (x, y); R^2 of each and the line's slope.

    A memory curve is linear when the parabola's R^2 is no better than the line's.
    """
    import numpy as np

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    total = float(((y - y.mean()) ** 2).sum()) or 1.0
    out = {}
    for deg, name in ((1, "line"), (2, "parabola")):
        coef = np.polyfit(x, y, deg)
        resid = float(((np.polyval(coef, x) - y) ** 2).sum())
        out[name] = {"coef": [float(c) for c in coef], "r2": 1 - resid / total}
    out["slope"] = out["line"]["coef"][0]
    return out


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: one JSON BenchConfig in, one JSON result line out."""
    args = sys.argv[1:] if argv is None else argv
    cfg = BenchConfig(**json.loads(args[0]))
    print(json.dumps(run_single(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
