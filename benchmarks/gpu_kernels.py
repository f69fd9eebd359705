"""The Triton kernels of the memory-efficient blocks on a CUDA GPU: parity, then ours against
torchvision in the same run, against the targets set for them.

    python benchmarks/gpu_kernels.py [--out DIR] [--steps 20] [--budget-s 480]
    python benchmarks/gpu_kernels.py --dry-run     # any CPU: Triton's interpreter, tiny shapes

1. Parity (exits 1 at the end if any fails): float32 through the Triton kernels against the
   float64 plain model (outputs, every gradient, parameters and running statistics after 2 SGD
   steps; with and without bottleneck, both layouts, dropout), bfloat16 autocast as close to
   float64 as plain autocast, a torch.compile'd step with no graph break equal to the eager one.
2. Speed, ours (memory-efficient, Triton) against torchvision plain and memory_efficient, taking
   turns step by step in one process (median of --steps after --warmup); peak memory
   (torch.cuda.max_memory_allocated) of each from its own process. Eager DenseNet-121 (224, batch
   256, bf16, channels_last) and DenseNet-BC-250 k=24 (32x32, batch 64), ours also through the
   PyTorch operations (the CUDA default); DenseNet-BC-100 k=12 (batch 64) as CUDA graphs and
   DenseNet-121 torch.compile'd, on both sides. From the eager ratios the script prints the
   default its numbers support: "cuda default supported by these numbers: torch|triton".
3. Kernel launches per training step (torch.profiler); DenseNet-121's training FLOP utilisation
   (16.8 GFLOP per 224 image against the measured bf16 matmul peak); eval-mode images/s.

Sections run in that order until --budget-s is spent; results are written after each section
to DIR/gpu_kernels.json and DIR/gpu_kernels.md (DIR: $OUT, else benchmarks/results).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # Triton reads this when it is imported: before torch imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["DENSENETS_KERNELS"] = "triton"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from densenets import DenseNet  # noqa: E402
from densenets.analysis.bench import (  # noqa: E402
    BenchConfig,
    TrainStep,
    environment,
    run_in_subprocess,
    step_stats,
    time_alternating,
)
from densenets.efficient.dispatch import CUDA_DEFAULT, backend  # noqa: E402

GFLOP_PER_IMAGE = 16.8  # DenseNet-121 training step at 224: 3 x 2.8 GMACs x 2
TRITON, TORCH = "ours (Triton)", "ours (PyTorch ops)"


def kernels_env(value: str | None):
    """DENSENETS_KERNELS for one side of a comparison (restored afterwards)."""
    return mock.patch.dict(os.environ, {} if value is None else {"DENSENETS_KERNELS": value})


def side(cfg: BenchConfig, kernels: str | None, compile_backend: str):
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


# --- 1. parity -------------------------------------------------------------------------------
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
            xin = x.double() if key == "ref" else x
            outs[key] = model(xin)
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
    return errors


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
    return errors


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
    grad_err = max(rel(a.grad, b.grad) for a, b in
                   zip(compiled_model.parameters(), eager.parameters(), strict=True))
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "loss_rel_diff": abs(losses[0] - losses[1]) / abs(losses[0]), "grad_rel": grad_err}


def parity(dev, compile_backend: str) -> dict:
    # float32 means float32 here: no TF32 in cuDNN's 3x3 convolutions either
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with kernels_env("triton"):
            return _parity(dev, compile_backend)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _parity(dev, compile_backend: str) -> dict:
    checks = {}
    for bottleneck, cl, drop in [(True, True, 0.0), (True, False, 0.2), (False, True, 0.2),
                                 (False, False, 0.0)]:
        e = train_errors(dev, bottleneck, cl, drop)
        key = (f"fp32 vs float64, {'bottleneck' if bottleneck else 'no bottleneck'}, "
               f"{'CL' if cl else 'NCHW'}, drop={drop}")
        checks[key] = {**e, "ok": e["efficient"] < 1e-4 + 10 * e["plain"]}
    e = bf16_errors(dev)
    checks["bf16 autocast vs float64 (grads)"] = {**e, "ok": e["efficient"] < 2 * e["plain"] + 0.01}
    c = compile_check(dev, compile_backend)
    checks[f"torch.compile ({compile_backend}) vs eager"] = {
        **c, "ok": c["graph_breaks"] == 0 and c["loss_rel_diff"] < 1e-4 and c["grad_rel"] < 1e-3}
    return checks


# --- 2. speed and memory ---------------------------------------------------------------------
def compare(base: BenchConfig, sides: dict, steps: int, warmup: int, compile_backend: str,
            memory: bool) -> dict:
    """Speed of every side in one process (taking turns), then each peak from its own."""
    runners = {name: side(replace(base, **over), kernels, compile_backend)
               for name, (over, kernels) in sides.items()}
    times = time_alternating(runners, steps, warmup)
    out = {}
    for name, (over, kernels) in sides.items():
        cfg = replace(base, **over)
        out[name] = {"config": asdict(cfg), "kernels": kernels,
                     **{k: v for k, v in step_stats(times[name], cfg.batch_size).items()
                        if k != "step_s"}}
        if memory:
            with kernels_env(kernels):
                r = run_in_subprocess(replace(cfg, steps=3, warmup=max(2, cfg.warmup)))
            out[name]["peak_mib"], out[name]["backend"] = r["peak_mib"], r["backend"]
    del runners
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def ratios(res: dict, ours: str, speed_vs: str, memory_vs: str | None) -> dict:
    r = {"speed_x": res[ours]["images_per_s"] / res[speed_vs]["images_per_s"]}
    if memory_vs and "peak_mib" in res[ours] and "peak_mib" in res.get(memory_vs, {}):
        r["peak_x"] = res[ours]["peak_mib"] / res[memory_vs]["peak_mib"]
    return r


def targets(dry: bool) -> list[dict]:
    """The target configurations (a tiny stand-in for each in a dry run)."""
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
    return [
        {"name": "DenseNet-121 eager", "base": big, "speed_vs": "torchvision plain",
         "memory_vs": "torchvision memory_efficient", "speed_target": 1.25, "peak_target": 0.8,
         "sides": {TRITON: (ours, "triton"), TORCH: (ours, "torch"),
                   "torchvision plain": (tv, None), "torchvision memory_efficient": (tv_me, None)}},
        {"name": "DenseNet-BC-250 k=24 eager", "base": cifar, "speed_vs": "torchvision plain",
         "memory_vs": "torchvision memory_efficient", "speed_target": 1.0, "peak_target": 0.8,
         "sides": {TRITON: (ours, "triton"), TORCH: (ours, "torch"),
                   "torchvision plain": (tv, None), "torchvision memory_efficient": (tv_me, None)}},
        {"name": "DenseNet-BC-100 k=12 CUDA graphs", "base": small, "cuda_only": True,
         "speed_vs": "torchvision plain", "memory_vs": None, "speed_target": 1.0,
         "sides": {TRITON: (dict(ours, cuda_graphs=True, warmup=3), "triton"),
                   "torchvision plain": (dict(tv, cuda_graphs=True, warmup=3), None)}},
        {"name": "DenseNet-121 torch.compile", "base": big, "speed_vs": "torchvision plain",
         "memory_vs": None, "speed_target": 1.0,
         "sides": {TRITON: (dict(ours, compile=True), "triton"),
                   "torchvision plain": (dict(tv, compile=True), None)}},
    ]


# --- 3. profile, FLOP utilisation, eval ------------------------------------------------------
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


def flop_utilisation(dev, results: dict) -> dict:
    """DenseNet-121's training TFLOP/s (first comparison) against the measured matmul peak."""
    util = {"matmul_peak_tflops": matmul_peak_tflops(dev)}
    for name, r in results["comparisons"][0].get("results", {}).items():
        tflops = GFLOP_PER_IMAGE * r["images_per_s"] / 1e3
        util[name] = {"tflops": tflops, "utilisation": tflops / util["matmul_peak_tflops"]}
    return util


def eval_speed(base: BenchConfig, steps: int) -> dict:
    from densenets.analysis.bench import build_model

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


# --- report ----------------------------------------------------------------------------------
def supported_default(results: dict) -> dict:
    """The CUDA default these numbers support: the Triton kernels only when their parity passed
    and they trained faster than the PyTorch operations in every comparison measuring both."""
    failed = [k for k, c in results.get("parity", {}).items() if not c["ok"]]
    speed = {t["name"]: t["results"][TRITON]["images_per_s"] / t["results"][TORCH]["images_per_s"]
             for t in results["comparisons"] if {TRITON, TORCH} <= set(t.get("results", {}))}
    if failed:
        why = f"Triton parity failed: {failed}"
    elif not speed:
        why = "no comparison measured both paths"
    else:
        why = "Triton/PyTorch-ops training speed: " + ", ".join(
            f"{name} {x:.2f}x" for name, x in speed.items())
    kernels = "triton" if speed and not failed and min(speed.values()) > 1 else "torch"
    return {"kernels": kernels, "why": why, "dispatch.CUDA_DEFAULT": CUDA_DEFAULT}


def markdown(results: dict) -> str:
    env = results["environment"]
    machine = env.get("gpu", env.get("cpu", "?"))
    dry = "; DRY RUN (CPU, interpreter, tiny shapes): no meaningful numbers"
    lines = [f"# Triton kernels of the memory-efficient blocks: {machine}",
             "", f"torch {env.get('torch')}, triton {results.get('triton')}"
             f"{dry if results['dry_run'] else ''}",
             "", "## Parity", "", "| check | result | errors |", "|---|---|---|"]
    for key, c in results.get("parity", {}).items():
        errs = ", ".join(f"{k}={v:.2e}" for k, v in c.items() if isinstance(v, float))
        lines.append(f"| {key} | {'ok' if c['ok'] else 'FAIL'} | {errs} |")
    for t in results.get("comparisons", []):
        lines += ["", f"## {t['name']}", "", "| implementation | images/s | median step ms | "
                  "peak MiB |", "|---|---|---|---|"]
        for name, r in t.get("results", {}).items():
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
            lines.append(f"| {name} | {r['images_per_s']:.1f} | "
                         f"{1000 * r['median_step_s']:.1f} | {peak} |")
        if "ratios" in t:
            lines.append("")
            lines.append(", ".join(f"{k} = {v:.2f}" for k, v in t["ratios"].items())
                         + f" (targets: speed >= {t['speed_target']}"
                         + (f", peak <= {t['peak_target']}" if t.get("peak_target") else "")
                         + ")")
        if "skipped" in t:
            lines.append(f"skipped: {t['skipped']}")
    if d := results.get("cuda_default"):
        lines += ["", f"cuda default supported by these numbers: {d['kernels']} ({d['why']}; "
                  f"dispatch.CUDA_DEFAULT is {d['dispatch.CUDA_DEFAULT']})"]
    for key in ("kernels", "flop_utilisation", "eval_images_per_s"):
        if key in results:
            lines += ["", f"## {key}", "", "```", json.dumps(results[key], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on this CPU through Triton's interpreter, tiny shapes")
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=480,
                   help="start no new section after this many seconds (default 480)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to rehearse this script on a CPU", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if dry else "cuda")
    steps, warmup = (1, 1) if dry else (args.steps, args.warmup)
    compile_backend = "aot_eager" if dry else "inductor"  # a cold CPU inductor build: minutes
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    results: dict = {"dry_run": dry, "environment": environment(dev), "triton":
                     triton.__version__, "default_backend": backend(dev, torch.bfloat16),
                     "comparisons": []}
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def save() -> None:
        (args.out / "gpu_kernels.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "gpu_kernels.md").write_text(markdown(results))

    def left() -> bool:
        return time.perf_counter() - start < args.budget_s

    results["parity"] = parity(dev, compile_backend)
    for key, c in results["parity"].items():
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {key}", flush=True)
    save()
    for t in targets(dry):
        entry = {k: v for k, v in t.items() if k not in ("sides", "base")}
        results["comparisons"].append(entry)
        if t.get("cuda_only") and dev.type != "cuda":
            entry["skipped"] = "CUDA graphs need a CUDA device"
        elif not left():
            entry["skipped"] = "out of --budget-s"
        else:
            base = BenchConfig(**t["base"], steps=steps, warmup=warmup)
            memory = t["memory_vs"] is not None
            res = compare(base, t["sides"], steps, warmup, compile_backend, memory)
            entry["results"] = res
            entry["ratios"] = ratios(res, TRITON, t["speed_vs"], t["memory_vs"])
            print(f"{t['name']}: {entry['ratios']}", flush=True)
        results["cuda_default"] = supported_default(results)
        save()
    big = BenchConfig(**targets(dry)[0]["base"], steps=steps, warmup=warmup)
    for key, section in [("kernels", lambda: kernel_counts(big)),
                         ("flop_utilisation", lambda: flop_utilisation(dev, results)),
                         ("eval_images_per_s", lambda: eval_speed(big, steps))]:
        if left():
            results[key] = section()
            save()
    failed = [k for k, c in results["parity"].items() if not c["ok"]]
    d = results["cuda_default"]
    print(f"cuda default supported by these numbers: {d['kernels']} ({d['why']})"
          f"{' [dry run: no meaningful numbers]' if dry else ''}")
    print(f"wrote {args.out / 'gpu_kernels.md'}; parity: {len(failed)} failed "
          f"({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
