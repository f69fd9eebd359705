"""The Triton kernels of the memory-efficient blocks on a CUDA GPU: parity, then ours against
torchvision in the same run, against the targets set for them; one device call of at most 9
minutes.

    python benchmarks/gpu_kernels.py [--out DIR] [--steps 20] [--budget-s 450] [--hard-limit-s 510]
    python benchmarks/gpu_kernels.py --dry-run     # any CPU: Triton's interpreter, tiny shapes

Sections, in order of importance (the measurements are in benchmarks/gpu_sections.py):
1. Parity, always (exit 1 at the end if any check fails): float32 through the Triton kernels
   against the float64 plain model (outputs, every gradient, parameters and running statistics
   after 2 SGD steps; with and without bottleneck, both layouts, dropout), bfloat16 autocast as
   close to float64 as plain autocast, a torch.compile'd step with no graph break equal to eager.
2. DenseNet-121 eager (224, batch 256, bf16, channels_last): ours (memory-efficient) through the
   Triton kernels and through the PyTorch operations (the CUDA default), torchvision plain and
   memory_efficient, taking turns step by step in one process (median of --steps after
   --warmup); then each one's peak memory (torch.cuda.max_memory_allocated) from its own process.
3. DenseNet-121's training FLOP utilisation (16.8 GFLOP per image against the measured bf16
   matmul rate), ours and torchvision's.
4. DenseNet-121 torch.compile'd (inductor), ours (Triton) and torchvision plain.
5. DenseNet-BC-250 k=24 eager (32x32, batch 64), the four sides of 2.
6. DenseNet-BC-100 k=12 (batch 64) as CUDA graphs, ours (Triton) and torchvision plain.
   (The 3D and segmentation rows will follow here.)
7. Kernel launches per training step (torch.profiler); 8. eval-mode images/s.

A section runs when its estimate fits what is left of --budget-s (counted from the start of this
process, imports included): its prior seconds (``prior_s`` in gpu_sections.targets, guesses for
an H100-class card until a run's "seconds" replace them), scaled by how long the sections before
it took against their priors; otherwise it is skipped with a line saying so. The default 450 s
leaves 90 s of a 540 s call for a section that takes longer than estimated; at --hard-limit-s
(SIGALRM, default 510 s), or on SIGTERM, the script stops where it is.

Printed, in order:
1. ``gpu_kernels: GPU, torch X, triton Y, budget N s`` (``, DRY RUN`` in a rehearsal);
2. ``ok   CHECK`` or ``FAIL CHECK``, one per parity check as it finishes;
3. per section, in the order above: ``NAME: speed_x=.., peak_x=.. (targets: ..)`` (speed_x: ours
   with Triton / torchvision plain; peak_x: ours / torchvision memory_efficient), ``training FLOP
   utilisation (..): ..``, ``CUDA kernels per step: ..``, ``eval images/s: ..``; or ``skip NAME:
   needs about E s, L s of --budget-s left`` (or another reason), or ``error NAME: ..``; after a
   comparison that changes it, ``cuda default supported by these numbers: torch|triton (why)``;
4. ``stopped: SIGTERM|SIGALRM after S s`` when a signal cut the run short;
5. always, last: the ``cuda default supported by these numbers: ..`` line again, and ``wrote
   DIR/gpu_kernels.md; parity: N failed (S s)``.
Exit status: 0; 1 when a parity check failed; 124 when stopped; 2 without a CUDA device.

Written: DIR/gpu_kernels.json and DIR/gpu_kernels.md (DIR: --out, else $OUT, else
benchmarks/results), rewritten (a temporary file, then os.replace) after every result: each
parity check, each comparison's speeds, each peak, each later section, each skip. A call killed
at its limit leaves both files whole, with everything measured so far and the CUDA default line
(at the top of the markdown).
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts this process's imports too

import os  # noqa: E402
import sys  # noqa: E402

if "--dry-run" in sys.argv:  # Triton reads this when it is imported: before torch imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["DENSENETS_KERNELS"] = "triton"

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import gpu_sections as sec  # noqa: E402
import torch  # noqa: E402

from densenets.analysis.bench import BenchConfig, environment  # noqa: E402
from densenets.efficient.dispatch import CUDA_DEFAULT, backend  # noqa: E402

PARITY_PRIOR_S = 90
EXTRAS_PRIOR_S = {"flop_utilisation": 10, "kernels": 30, "eval_images_per_s": 20}
DRY_SCALE = 0.1  # priors in a dry run: tiny shapes on a CPU


class Stopped(BaseException):
    """SIGTERM or the hard limit: stop measuring, keep what was written."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


# --- the record ------------------------------------------------------------------------------
def supported_default(results: dict) -> dict:
    """The CUDA default these numbers support: the Triton kernels only when their parity passed
    and they trained faster than the PyTorch operations in every comparison measuring both."""
    parity = results.get("parity", {})
    failed = [k for k, c in parity.items() if not c["ok"]]
    both = [t for t in results["comparisons"]
            if {sec.TRITON, sec.TORCH} <= set(t.get("results", {}))]
    speed = {t["name"]: t["results"][sec.TRITON]["images_per_s"]
             / t["results"][sec.TORCH]["images_per_s"] for t in both}
    if failed:
        why = f"Triton parity failed: {failed}"
    elif not parity:
        why = "parity not checked yet"
    elif not speed:
        why = "no comparison measured both paths"
    else:
        why = "Triton/PyTorch-ops training speed: " + ", ".join(
            f"{name} {x:.2f}x" for name, x in speed.items())
    kernels = "triton" if speed and parity and not failed and min(speed.values()) > 1 else "torch"
    return {"kernels": kernels, "why": why, "dispatch.CUDA_DEFAULT": CUDA_DEFAULT}


def default_line(results: dict) -> str:
    d = results["cuda_default"]
    return (f"cuda default supported by these numbers: {d['kernels']} ({d['why']})"
            + (" [dry run: no meaningful numbers]" if results["dry_run"] else ""))


def _target_line(t: dict) -> str:
    return (f"targets: speed >= {t['speed_target']}"
            + (f", peak <= {t['peak_target']}" if t.get("peak_target") else ""))


def extra_line(key: str, value: dict) -> str:
    """One line for a section after the targets (printed, and in the markdown)."""
    if key == "flop_utilisation":
        return (f"training FLOP utilisation (DenseNet-121, bf16 matmul peak "
                f"{value['matmul_peak_tflops']:.1f} TFLOP/s): " + ", ".join(
                    f"{k} {v['tflops']:.1f} TFLOP/s = {100 * v['utilisation']:.1f}%"
                    for k, v in value.items() if isinstance(v, dict)))
    if key == "kernels":
        return f"{value['what']}: " + ", ".join(f"{k} {n}" for k, n in value["counts"].items())
    return "eval images/s: " + ", ".join(f"{k} {v:.0f}" for k, v in value.items())


def _extras(results: dict, keys: list[str]) -> list[str]:
    return [f"- {extra_line(k, results[k])}" if k in results else f"- {k}: {results['skipped'][k]}"
            for k in keys if k in results or k in results["skipped"]]


def markdown(results: dict) -> str:
    env = results["environment"]
    machine = env.get("gpu", env.get("cpu", "?"))
    dry = "; DRY RUN (CPU, interpreter, tiny shapes): no meaningful numbers"
    lines = [f"# Triton kernels of the memory-efficient blocks: {machine}", "",
             f"torch {env.get('torch')}, triton {results.get('triton')}, budget "
             f"{results['budget_s']:.0f} s{dry if results['dry_run'] else ''}", "",
             default_line(results) + f"; dispatch.CUDA_DEFAULT is "
             f"{results['cuda_default']['dispatch.CUDA_DEFAULT']}"]
    if results.get("stopped"):
        lines += ["", f"**stopped early: {results['stopped']}**"]
    lines += ["", "## Parity", "", "| check | result | errors |", "|---|---|---|"]
    for key, c in results.get("parity", {}).items():
        errs = ", ".join(f"{k}={v:.2e}" for k, v in c.items() if isinstance(v, float))
        lines.append(f"| {key} | {'ok' if c['ok'] else 'FAIL'} | {errs} |")
    for t in results["comparisons"]:
        lines += ["", f"## {t['name']}", ""]
        if t.get("results"):
            lines += ["| implementation | images/s | median step ms | peak MiB |",
                      "|---|---|---|---|"]
            for name, r in t["results"].items():
                peak = (f"{r['peak_mib']:.0f}" if "peak_mib" in r else
                        r.get("peak_skipped", r.get("peak_error", "")))
                lines.append(f"| {name} | {r['images_per_s']:.1f} | "
                             f"{1000 * r['median_step_s']:.1f} | {peak} |")
        if t.get("ratios"):
            lines += ["", ", ".join(f"{k} = {v:.2f}" for k, v in t["ratios"].items())
                      + f" ({_target_line(t)})"]
        for why in ("skipped", "error"):
            if why in t:
                lines.append(f"{why}: {t[why]}")
        if t is results["comparisons"][0]:  # measured right after it, from its speeds
            lines += ["", *_extras(results, ["flop_utilisation"])]
    lines += ["", "## After the targets", "", *_extras(results, ["kernels", "eval_images_per_s"])]
    lines += ["", "## Seconds per section", "", json.dumps(results["seconds"])]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Whole or not at all: a process killed mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Record:
    """The results, written to DIR after every change, and the CUDA default line, printed when
    the results change it."""

    def __init__(self, out: Path, results: dict) -> None:
        self.out, self.results, self.printed = out, results, None

    def save(self) -> None:
        self.results["cuda_default"] = supported_default(self.results)
        write_atomic(self.out / "gpu_kernels.json", json.dumps(self.results, indent=1,
                                                               default=str))
        write_atomic(self.out / "gpu_kernels.md", markdown(self.results))

    def print_default(self, always: bool = False) -> None:
        line = default_line(self.results)
        if always or (line != self.printed and self.results.get("parity")):
            print(line, flush=True)
            self.printed = line


class Budget:
    """Seconds left of --budget-s, and whether a section's estimate fits them: its prior scaled
    by the time the measured sections took against their priors (within 0.5x-4x)."""

    def __init__(self, seconds: float, prior_scale: float) -> None:
        self.seconds, self.prior_scale = seconds, prior_scale
        self.priors = self.spent = 0.0

    def left(self) -> float:
        return self.seconds - (time.monotonic() - T0)

    def estimate(self, prior_s: float) -> float:
        scale = min(4.0, max(0.5, self.spent / self.priors)) if self.priors else 1.0
        return prior_s * self.prior_scale * scale

    def record(self, prior_s: float, seconds: float) -> None:
        self.priors += prior_s * self.prior_scale
        self.spent += seconds


# --- the run ---------------------------------------------------------------------------------
def run_section(name: str, prior_s: float, body: Callable[[], Iterator[None]], rec: Record,
                budget: Budget, store: Callable[[str, str], None]) -> None:
    """Run one section if its estimate fits the budget, saving after each result it yields;
    ``store(kind, why)`` records a section "skipped" or ended by an "error"."""
    est, left = budget.estimate(prior_s), budget.left()
    if est > left:
        why = f"needs about {est:.0f} s, {max(left, 0):.0f} s of --budget-s left"
        store("skipped", why)
        print(f"skip {name}: {why}", flush=True)
        rec.save()
        return
    start = time.monotonic()
    try:
        for _ in body():
            rec.save()
    except Exception as e:  # report it and go on to the next section
        why = f"{type(e).__name__}: {str(e)[-300:]}"
        store("error", why)
        print(f"error {name}: {why}", flush=True)
    seconds = time.monotonic() - start
    budget.record(prior_s, seconds)
    rec.results["seconds"][name] = round(seconds, 1)
    rec.save()


def comparison(t: dict, entry: dict, args, compile_backend: str,
               budget: Budget) -> Iterator[None]:
    for res in sec.compare(t, args.steps, args.warmup, compile_backend, budget.left):
        entry["results"] = res
        entry["ratios"] = sec.ratios(t, res)
        yield
    print(f"{t['name']}: " + ", ".join(f"{k}={v:.2f}" for k, v in entry["ratios"].items())
          + f" ({_target_line(t)})", flush=True)


def extra(results: dict, key: str, fn: Callable[[], dict]) -> Iterator[None]:
    results[key] = fn()
    yield
    print(extra_line(key, results[key]), flush=True)


def measure(dev, args, rec: Record, budget: Budget) -> None:
    results, dry = rec.results, args.dry_run
    compile_backend = "aot_eager" if dry else "inductor"  # a cold CPU inductor build: minutes
    start = time.monotonic()
    for key, check in sec.parity(dev, compile_backend):
        results["parity"][key] = check
        rec.save()
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {key}", flush=True)
    budget.record(PARITY_PRIOR_S, time.monotonic() - start)
    results["seconds"]["parity"] = round(time.monotonic() - start, 1)
    targets = sec.targets(dry)
    big = BenchConfig(**targets[0]["base"], steps=args.steps, warmup=args.warmup)
    extras = {"flop_utilisation": lambda: sec.flop_utilisation(dev, results["comparisons"][0]),
              "kernels": lambda: sec.kernel_counts(big),
              "eval_images_per_s": lambda: sec.eval_speed(big, args.steps)}
    plan = [("target", t) for t in targets]
    plan.insert(1, ("extra", "flop_utilisation"))
    plan += [("extra", "kernels"), ("extra", "eval_images_per_s")]
    for kind, what in plan:
        if kind == "extra":
            run_section(what, EXTRAS_PRIOR_S[what], lambda k=what: extra(results, k, extras[k]),
                        rec, budget, lambda kind, why, k=what: results["skipped"].__setitem__(
                            k, f"{kind}: {why}"))
            continue
        t = what
        entry = {k: v for k, v in t.items() if k not in ("sides", "base")}
        results["comparisons"].append(entry)
        if t.get("cuda_only") and dev.type != "cuda":
            entry["skipped"] = "CUDA graphs need a CUDA device"
            print(f"skip {t['name']}: {entry['skipped']}", flush=True)
            rec.save()
            continue
        run_section(t["name"], t["prior_s"],
                    lambda t=t, e=entry: comparison(t, e, args, compile_backend, budget),
                    rec, budget, lambda kind, why, e=entry: e.__setitem__(kind, why))
        rec.print_default()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on this CPU through Triton's interpreter, tiny shapes")
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=450,
                   help="start no section whose estimate ends past this many seconds from the "
                        "start of the process (default 450: one 540 s call, with margin)")
    p.add_argument("--hard-limit-s", type=float, default=510,
                   help="stop wherever the run is at this many seconds (default 510)")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to rehearse this script on a CPU", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if dry else "cuda")
    if dry:
        args.steps, args.warmup = 1, 1
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    results: dict = {"dry_run": dry, "environment": environment(dev), "triton":
                     triton.__version__, "budget_s": args.budget_s,
                     "default_backend": backend(dev, torch.bfloat16), "parity": {},
                     "comparisons": [], "skipped": {}, "seconds": {}}
    rec = Record(args.out, results)
    rec.save()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"gpu_kernels: {results['environment'].get('gpu', 'CPU')}, torch {torch.__version__}, "
          f"triton {triton.__version__}, budget {args.budget_s:.0f} s"
          f"{', DRY RUN' if dry else ''}", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(max(1, int(args.hard_limit_s - (time.monotonic() - T0))))
    stopped = False
    try:
        measure(dev, args, rec, Budget(args.budget_s, DRY_SCALE if dry else 1.0))
    except Stopped as e:
        stopped = True
        results["stopped"] = f"{e} after {time.monotonic() - T0:.0f} s"
        print(f"stopped: {results['stopped']}", flush=True)
    finally:
        signal.alarm(0)
        rec.save()
        rec.print_default(always=True)
    failed = [k for k, c in results["parity"].items() if not c["ok"]]
    print(f"wrote {args.out / 'gpu_kernels.md'}; parity: {len(failed)} failed "
          f"({time.monotonic() - T0:.0f} s)", flush=True)
    return 124 if stopped else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
