"""3D DenseNet-121 training beside MONAI's, and memory against depth in 3D.

    python benchmarks/medical.py                    # 64^3, 96^3, 128^3 and the depth sweep
    python benchmarks/medical.py --sizes 64 --steps 2 --no-depth   # a smoke run

One input channel, two classes, batch 2, fp32, cross-entropy, SGD with momentum, on this
machine's CPU. Four implementations of the same network (11,244,674 parameters each): MONAI's
``DenseNet121(spatial_dims=3)`` plain, MONAI's with every dense layer under
``torch.utils.checkpoint`` (what MONAI offers its users for memory), ours plain and ours
memory-efficient.

Speed: the four take turns step by step in one process on the same data (a busy machine slows
them alike); the median step counts. Memory: each figure from fresh processes, the training
memory being the peak resident set minus what the process held once the model and the batch
were built (so torch's own import does not dilute the ratios); three processes per figure and
the median counts, since what the C allocator keeps after a free moves a CPU's peak by some
tens of MiB from run to run. The depth sweep trains 3D DenseNet-BC (k = 12, CIFAR stem) at
several depths, plain and memory-efficient, the same way, and fits a line and a parabola to
memory against depth.

Results go to benchmarks/results/medical.json (each measurement as it is made, so a stopped run
keeps what it measured) and into docs/benchmarks.md between the ``medical-cpu`` markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from report import write_section  # noqa: E402

from densenets.analysis.bench import (  # noqa: E402
    current_memory_mib,
    environment,
    fit_line_and_parabola,
    median_run,
    peak_memory_mib,
    time_alternating,
)

IMPLS = ("monai plain", "monai checkpointed", "densenets plain", "densenets memory-efficient")
RESULTS = ROOT / "benchmarks" / "results" / "medical.json"
# ours memory-efficient against MONAI plain (and checkpointed), per volume side
TARGETS = {128: {"memory": 0.45, "speed": 1.0},
           96: {"memory": 0.5, "memory_vs_checkpointed": 0.7, "speed": 1.0}}
DEPTHS = (40, 70, 100, 130)
REPEATS = 3  # fresh processes per memory figure; the median counts


def build(impl: str, depth: int | None = None) -> torch.nn.Module:
    """The network ``impl`` names: 3D DenseNet-121, or with ``depth`` 3D DenseNet-BC-depth
    (k = 12, ours only)."""
    import densenets

    if depth is not None:
        from densenets.training.model import named_model

        return named_model("densenet-bc", depth=depth, spatial_dims=3, in_channels=1,
                           num_classes=2, memory_efficient=impl.endswith("efficient"))[1]
    if impl.startswith("densenets"):
        return densenets.create_model("densenet121", spatial_dims=3, in_channels=1,
                                      num_classes=2, memory_efficient=impl.endswith("efficient"))
    from monai.networks.nets import DenseNet121

    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    if impl.endswith("checkpointed"):
        for layer in model.modules():
            if type(layer).__name__ == "_DenseLayer":
                layer.forward = _checkpointed(layer.forward)
    return model


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    return lambda x: checkpoint(forward, x, use_reentrant=False)


class Step:
    """One training step of a model on fixed data; calling it returns the step's seconds."""

    def __init__(self, model: torch.nn.Module, side: int, batch: int = 2) -> None:
        torch.manual_seed(0)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 1, side, side, side)
        self.y = torch.arange(batch) % 2

    def __call__(self) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def child(spec: dict) -> dict:
    """Training memory of one implementation in this (fresh) process."""
    dev = torch.device("cpu")
    step = Step(build(spec["impl"], spec.get("depth")), spec["side"])
    before = current_memory_mib(dev)
    times = [step() for _ in range(spec["steps"])]
    peak = peak_memory_mib(dev)
    return {"train_mib": peak - before, "peak_mib": peak, "before_mib": before,
            "step_s": times}


def in_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{spec} failed: {tail}")
    return json.loads(lines[-1])


def median_memory(spec: dict) -> dict:
    """:func:`in_child` ``REPEATS`` times: the median run's figures, and every run's."""
    return median_run(lambda: in_child(spec), "train_mib", REPEATS)


def measure_size(row: dict, steps: int, warmup: int, save) -> dict:
    """Fill ``row`` (saved as each figure comes in) for the volume side it names."""
    side = row["side"]
    row["batch"] = 2
    for impl in IMPLS:
        row.setdefault("memory", {})[impl] = median_memory(
            {"impl": impl, "side": side, "steps": 2})
        save()
    # the four take turns step by step on the same data
    times = time_alternating({impl: Step(build(impl), side) for impl in IMPLS}, steps, warmup)
    row["step_s"] = times
    row["median_step_s"] = {k: statistics.median(v) for k, v in times.items()}
    return row


def depth_sweep(out: dict, save) -> dict:
    """Fill ``out`` ({"side", "depths"}) with plain and memory-efficient training memory."""
    side = out["side"]
    for impl in ("densenets plain", "densenets memory-efficient"):
        mibs = []
        for depth in DEPTHS:
            mibs.append(median_memory({"impl": impl, "side": side, "steps": 2,
                                       "depth": depth})["train_mib"])
            out[impl] = {"train_mib": mibs}
            save()
        out[impl]["fit"] = fit_line_and_parabola(list(DEPTHS), mibs)
    return out


def ratios(row: dict) -> dict:
    mem = {k: v["train_mib"] for k, v in row["memory"].items()}
    med = row["median_step_s"]
    ours = "densenets memory-efficient"
    return {"memory_vs_monai": mem[ours] / mem["monai plain"],
            "memory_vs_checkpointed": mem[ours] / mem["monai checkpointed"],
            "speed_vs_monai": med["monai plain"] / med[ours],
            "speed_vs_checkpointed": med["monai checkpointed"] / med[ours]}


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch "
             f"threads; torch {env['torch']}, MONAI {res.get('monai', '?')}. Measured "
             f"{res['date']}. 3D DenseNet-121, one channel, batch 2, fp32; training memory = peak "
             f"RSS minus RSS before the first step, the median of {REPEATS} fresh processes; "
             "speed = median step, the four taking turns in one process.", "",
             "| volume | implementation | step s | speed vs MONAI plain | training MiB | "
             "memory vs MONAI plain | vs MONAI checkpointed |", "|---|---|---|---|---|---|---|"]
    for row in res["sizes"]:
        if "median_step_s" not in row:
            continue
        med, mem = row["median_step_s"], row["memory"]
        for impl in IMPLS:
            lines.append(
                f"| {row['side']}^3 | {impl} | {med[impl]:.2f} | "
                f"{med['monai plain'] / med[impl]:.2f}x | {mem[impl]['train_mib']:.0f} | "
                f"{mem[impl]['train_mib'] / mem['monai plain']['train_mib']:.2f}x | "
                f"{mem[impl]['train_mib'] / mem['monai checkpointed']['train_mib']:.2f}x |")
    lines += ["", _target_lines(res)]
    sweep = res.get("depth")
    if sweep and all("fit" in sweep.get(k, {}) for k in ("densenets plain",
                                                         "densenets memory-efficient")):
        lines += ["", f"Memory against depth, 3D DenseNet-BC k=12 (CIFAR stem), "
                      f"{sweep['side']}^3, batch 2 (training MiB, the median of {REPEATS} "
                      "processes each):", "",
                  "| depth | " + " | ".join(str(d) for d in sweep["depths"]) +
                  " | line R^2 | parabola R^2 |", "|---" * (len(sweep["depths"]) + 3) + "|"]
        for impl in ("densenets plain", "densenets memory-efficient"):
            s = sweep[impl]
            lines.append(f"| {impl} | " + " | ".join(f"{m:.0f}" for m in s["train_mib"]) +
                         f" | {s['fit']['line']['r2']:.4f} | {s['fit']['parabola']['r2']:.4f} |")
    return "\n".join(lines)


def _target_lines(res: dict) -> str:
    out = []
    for row in res["sizes"]:
        t = TARGETS.get(row["side"])
        if not t or "median_step_s" not in row:
            continue
        r = ratios(row)
        checks = [f"memory {r['memory_vs_monai']:.2f}x MONAI plain (target <= {t['memory']}x)",
                  f"speed {r['speed_vs_monai']:.2f}x (target >= {t['speed']}x)"]
        if "memory_vs_checkpointed" in t:
            checks.insert(1, f"{r['memory_vs_checkpointed']:.2f}x MONAI checkpointed "
                             f"(target <= {t['memory_vs_checkpointed']}x)")
        ok = (r["memory_vs_monai"] <= t["memory"] and r["speed_vs_monai"] >= t["speed"]
              and r["memory_vs_checkpointed"] <= t.get("memory_vs_checkpointed", 9e9))
        out.append(f"- {row['side']}^3: {'met' if ok else 'MISSED'}: " + "; ".join(checks))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--depth-side", type=int, default=24)
    p.add_argument("--no-depth", action="store_true")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    import monai

    res = {"date": str(date.today()), "environment": environment(torch.device("cpu")),
           "monai": monai.__version__, "sizes": []}

    def save() -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(RESULTS)

    for side in args.sizes:
        res["sizes"].append({"side": side})
        measure_size(res["sizes"][-1], args.steps, args.warmup, save)
        save()
        print(markdown(res).split("\n\n")[1], flush=True)
    if not args.no_depth:
        res["depth"] = {"side": args.depth_side, "depths": list(DEPTHS)}
        depth_sweep(res["depth"], save)
        save()
    text = markdown(res)
    print(text)
    write_section(args.docs, "medical-cpu", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
