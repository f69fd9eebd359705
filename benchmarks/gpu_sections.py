"""The measurements of benchmarks/gpu_kernels.py, each a section that hands back its results as
they come (parity check by check, a comparison's speeds and then each peak), so the script can
write every result the moment it exists.

A section is a generator: each value it yields is the section's result so far, which replaces the
previous one. Seconds left of the budget come in as ``left()``, so a section stops starting new
work (a peak-memory process) when the budget is spent.
"""

from __future__ import annotations

import copy
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from unittest import mock

import torch
import torch.nn.functional as F

from densenets import DenseNet
from densenets.analysis.bench import (
    BenchConfig,
    TrainStep,
    build_model,
    run_in_subprocess,
    step_stats,
    time_alternating,
)

GFLOP_PER_IMAGE = 16.8  # DenseNet-121 training step at 224: 3 x 2.8 GMACs x 2
TRITON, TORCH = "ours (Triton)", "ours (PyTorch ops)"
PEAK_RUN_MIN_S = 30  # a fresh process for one peak: imports, build, cuDNN search, 5 steps


def kernels_env(value: str | None):
    """DENSENETS_KERNELS for one side of a comparison (restored afterwards)."""
    return mock.patch.dict(os.environ, {} if value is None else {"DENSENETS_KERNELS": value})


def side(cfg: BenchConfig, kernels: str | None, compile_backend: str) -> Callable[[], float]:
    """One implementation in a comparison: a TrainStep run under its own DENSENETS_KERNELS."""
    with kernels_env(kernels):
        step = TrainStep(replace(cfg, compile=False))
    if cfg.compile:
        step.fn = torch.compile(step.model, backend=compile_backend)

    def run() -> float:
        with kernels_env(kernels):
            return step()
    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --- parity ----------------------------------------------------------------------------------
def tiny_net(dev, bottleneck: bool, drop: float, dtype=torch.float32) -> DenseNet:
    torch.manual_seed(0)
    net = DenseNet(growth_rate=5, block_config=(3, 3), num_init_features=7, num_classes=4,
                   stem="cifar", bottleneck=bottleneck, compression=0.5, drop_rate=drop)
    return net.to(dev, dtype)


def train_errors(dev, bottleneck: bool, cl: bool, drop: float) -> dict:
    """Two SGD steps: float32 efficient (Triton) and float32 plain, each against float64 plain."""
    ref = tiny_net(dev, bottleneck, drop, torch.float64)
    models = {"plain": tiny_net(dev, bottleneck, drop),
              "efficient": tiny_net(dev, bottleneck, drop).set_memory_efficient(True)}
    fmt = torch.channels_last if cl else torch.contiguous_format
    torch.manual_seed(1)
    x = torch.randn(5, 3, 11, 11, device=dev).contiguous(memory_format=fmt)
    y = torch.arange(5, device=dev) % 4
    errors = {k: 0.0 for k in models}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            for k, m in {**models, "ref": ref}.items()}
    for step in range(2):
        outs, grads = {}, {}
        for key, model in {**models, "ref": ref}.items():
            torch.manual_seed(10 + step)
            opts[key].zero_grad()
            outs[key] = model(x.double() if key == "ref" else x)
            F.cross_entropy(outs[key], y).backward()
            grads[key] = [p.grad for p in model.parameters()]
            opts[key].step()
        for key in models:
            errs = [rel(outs[key], outs["ref"])]
            errs += [rel(g, r) for g, r in zip(grads[key], grads["ref"], strict=True)]
            errors[key] = max(errors[key], *errs)
    for key, model in models.items():
        for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
            if a.is_floating_point():
                errors[key] = max(errors[key], rel(a, b))
    return {**errors, "ok": errors["efficient"] < 1e-4 + 10 * errors["plain"]}


def bf16_errors(dev) -> dict:
    ref = tiny_net(dev, True, 0.0, torch.float64)
    x = torch.randn(8, 3, 11, 11, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8, device=dev) % 4
    F.cross_entropy(ref(x.double()), y).backward()
    errors = {}
    for me in (False, True):
        model = tiny_net(dev, True, 0.0).set_memory_efficient(me)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        errors["efficient" if me else "plain"] = max(
            rel(p.grad, r.grad) for p, r in zip(model.parameters(), ref.parameters(), strict=True))
    return {**errors, "ok": errors["efficient"] < 2 * errors["plain"] + 0.01}


def compile_check(dev, compile_backend: str) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_net(dev, True, 0.0).set_memory_efficient(True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=compile_backend)
    x = torch.randn(4, 3, 11, 11, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.arange(4, device=dev) % 4
    losses = []
    for model in (eager, compiled):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
    c = {"graph_breaks": sum(counters["graph_break"].values()),
         "loss_rel_diff": abs(losses[0] - losses[1]) / abs(losses[0]),
         "grad_rel": max(rel(a.grad, b.grad) for a, b in
                         zip(compiled_model.parameters(), eager.parameters(), strict=True))}
    return {**c, "ok": c["graph_breaks"] == 0 and c["loss_rel_diff"] < 1e-4
            and c["grad_rel"] < 1e-3}


def parity(dev, compile_backend: str) -> Iterator[tuple[str, dict]]:
    """(name, errors with "ok") of each check through the Triton kernels, one at a time; a
    check that raises fails with its "error"."""
    checks: list[tuple[str, Callable[[], dict]]] = [
        (f"fp32 vs float64, {'bottleneck' if b else 'no bottleneck'}, {'CL' if cl else 'NCHW'}, "
         f"drop={drop}", lambda b=b, cl=cl, drop=drop: train_errors(dev, b, cl, drop))
        for b, cl, drop in [(True, True, 0.0), (True, False, 0.2), (False, True, 0.2),
                            (False, False, 0.0)]]
    checks += [("bf16 autocast vs float64 (grads)", lambda: bf16_errors(dev)),
               (f"torch.compile ({compile_backend}) vs eager",
                lambda: compile_check(dev, compile_backend))]
    for name, check in checks:
        # float32 means float32 here: no TF32 in cuDNN's 3x3 convolutions either
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with kernels_env("triton"):
                result = check()
        except Exception as e:  # a failed check, not a lost call: the others still run
            why = " ".join(str(e).split())[:300]  # one line, the start saying what went wrong
            result = {"ok": False, "error": f"{type(e).__name__}: {why}"}
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        yield name, result


# --- comparisons: ours against torchvision ---------------------------------------------------
def targets(dry: bool) -> list[dict]:
    """The target configurations in order of importance (a tiny stand-in for each in a dry run);
    ``key`` names each for --only.
    ``prior_s`` is the seconds a section is expected to take on an H100-class card (a tenth of
    it in a dry run), scaled by the script with what the sections before it took."""
    amp = dict(amp=True, channels_last=True)
    if dry:
        big = cifar = small = dict(model="densenet-bc-10-k4", batch_size=4, input_size=8,
                                   device="cpu", **amp)
    else:
        big = dict(model="densenet121", batch_size=256, input_size=224, device="cuda", **amp)
        cifar = dict(model="densenet-bc-250-k24", batch_size=64, input_size=32, device="cuda",
                     **amp)
        small = dict(model="densenet-bc-100-k12", batch_size=64, input_size=32, device="cuda",
                     **amp)
    ours = dict(impl="densenets", memory_efficient=True)
    tv, tv_me = dict(impl="torchvision"), dict(impl="torchvision", memory_efficient=True)
    four = {TRITON: (ours, "triton"), TORCH: (ours, "torch"), "torchvision plain": (tv, None),
            "torchvision memory_efficient": (tv_me, None)}
    graphs = dict(cuda_graphs=True, warmup=3)
    return [
        {"key": "dn121", "name": "DenseNet-121 eager", "base": big, "prior_s": 150,
         "sides": four,
         "speed_vs": "torchvision plain", "memory_vs": "torchvision memory_efficient",
         "speed_target": 1.25, "peak_target": 0.8},
        {"key": "dn121-compile", "name": "DenseNet-121 torch.compile", "base": big,
         "prior_s": 180,
         "sides": {TRITON: (dict(ours, compile=True), "triton"),
                   "torchvision plain": (dict(tv, compile=True), None)},
         "speed_vs": "torchvision plain", "memory_vs": None, "speed_target": 1.0},
        {"key": "bc250", "name": "DenseNet-BC-250 k=24 eager", "base": cifar, "prior_s": 100,
         "sides": four,
         "speed_vs": "torchvision plain", "memory_vs": "torchvision memory_efficient",
         "speed_target": 1.0, "peak_target": 0.8},
        {"key": "bc100-graphs", "name": "DenseNet-BC-100 k=12 CUDA graphs",
         "base": small, "prior_s": 60,
         "cuda_only": True, "sides": {TRITON: (dict(ours, **graphs), "triton"),
                                      "torchvision plain": (dict(tv, **graphs), None)},
         "speed_vs": "torchvision plain", "memory_vs": None, "speed_target": 1.0},
        # The 3D rows (against MONAI) and the segmentation rows come last: gpu_volumes.rows.
    ]


def compare(t: dict, steps: int, warmup: int, compile_backend: str,
            left: Callable[[], float]) -> Iterator[dict]:
    """Speed of every side of target ``t`` in one process (taking turns step by step); then,
    where the target compares memory, each side's peak from a process of its own, while the
    budget lasts. Yields the results after the speeds and after each peak."""
    base = BenchConfig(**t["base"], steps=steps, warmup=warmup)
    runners = {name: side(replace(base, **over), kernels, compile_backend)
               for name, (over, kernels) in t["sides"].items()}
    times = time_alternating(runners, steps, warmup)
    del runners
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = {}
    for name, (over, kernels) in t["sides"].items():
        cfg = replace(base, **over)
        out[name] = {"config": asdict(cfg), "kernels": kernels,
                     **{k: v for k, v in step_stats(times[name], cfg.batch_size).items()
                        if k != "step_s"}}
    yield out
    if t["memory_vs"] is None:
        return
    for name, (over, kernels) in t["sides"].items():
        cfg = replace(base, **over, steps=3, warmup=max(2, base.warmup))
        if left() < PEAK_RUN_MIN_S:
            out[name]["peak_skipped"] = f"{left():.0f} s of the budget left"
        else:
            try:
                with kernels_env(kernels):
                    r = run_in_subprocess(cfg, timeout=left())
                out[name]["peak_mib"], out[name]["backend"] = r["peak_mib"], r["backend"]
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                out[name]["peak_error"] = str(e)[-300:]
        yield out


def ratios(t: dict, res: dict) -> dict:
    """Ours (Triton) against the target's references: speed_x, and peak_x where measured."""
    r = {"speed_x": res[TRITON]["images_per_s"] / res[t["speed_vs"]]["images_per_s"]}
    mem = t["memory_vs"]
    if mem and "peak_mib" in res[TRITON] and "peak_mib" in res.get(mem, {}):
        r["peak_x"] = res[TRITON]["peak_mib"] / res[mem]["peak_mib"]
    return r


# --- after the targets: FLOP utilisation, launches per step, eval ----------------------------
def timed(dev, fn, reps: int = 1) -> float:
    """Seconds for ``reps`` calls of fn, the device's queue drained before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def matmul_peak_tflops(dev) -> float:
    cuda = dev.type == "cuda"
    n, reps = (8192, 20) if cuda else (512, 2)
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
            for _ in range(2))
    timed(dev, lambda: a @ b, 3)
    return 2 * n**3 * reps / timed(dev, lambda: a @ b, reps) / 1e12


def flop_utilisation(dev, first: dict) -> dict:
    """DenseNet-121's training TFLOP/s (from the first comparison) against the measured bf16
    matmul peak, ours and torchvision's."""
    util = {"matmul_peak_tflops": matmul_peak_tflops(dev)}
    for name, r in first.get("results", {}).items():
        tflops = GFLOP_PER_IMAGE * r["images_per_s"] / 1e3
        util[name] = {"tflops": tflops, "utilisation": tflops / util["matmul_peak_tflops"]}
    return util


def kernel_counts(base: BenchConfig) -> dict:
    """Kernels launched by one training step (GPU kernels on CUDA; operators on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    cuda = torch.cuda.is_available()
    ours = dict(impl="densenets", memory_efficient=True)
    for name, over, kernels in [(TRITON, ours, "triton"), (TORCH, ours, "torch"),
                                ("torchvision plain", dict(impl="torchvision"), None)]:
        step = side(replace(base, **over), kernels, "inductor")
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            step()
        counts[name] = sum(1 for e in prof.events() if (
            e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.cpu_parent is None))
    return {"what": "CUDA kernels per step" if cuda else "top-level CPU operators per step",
            "counts": counts}


def eval_speed(base: BenchConfig, steps: int) -> dict:
    """Eval-mode images/s (bf16 autocast, no grad), ours memory-efficient and torchvision's."""
    dev = torch.device(base.device)
    out = {}
    fmt = torch.channels_last
    x = torch.randn(base.batch_size, 3, base.input_size, base.input_size,
                    device=dev).contiguous(memory_format=fmt)
    for impl in ("densenets", "torchvision"):
        model = build_model(replace(base, impl=impl, memory_efficient=impl == "densenets"))
        model = model.to(dev).eval().to(memory_format=fmt)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            times = [timed(dev, lambda m=model: m(x)) for _ in range(steps + 3)][3:]
        out[impl] = step_stats(times, base.batch_size)["images_per_s"]
    return out
