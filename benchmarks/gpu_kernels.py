"""The Triton kernels of the memory-efficient blocks on a CUDA GPU: parity, then ours against
torchvision in the same run, against the targets set for them; then 3D DenseNet-121 beside
MONAI's and FC-DenseNet plain against memory-efficient; one device call of at most 9 minutes.

    python benchmarks/gpu_kernels.py [--out DIR] [--steps 20] [--budget-s 450] [--hard-limit-s 510]
    python benchmarks/gpu_kernels.py --only 3d fc  # only the sections whose keys start so
    python benchmarks/gpu_kernels.py --dry-run     # any CPU: Triton's interpreter, tiny shapes

Sections, in order of importance (keys for --only in brackets; measured in
benchmarks/gpu_sections.py, 9 and 10 in benchmarks/gpu_volumes.py):
1. [parity] (exit 1 at the end if any check fails): float32 through the Triton kernels
   against the float64 plain model (outputs, every gradient, parameters and running statistics
   after 2 SGD steps; with and without bottleneck, both layouts, dropout), bfloat16 autocast as
   close to float64 as plain autocast, a torch.compile'd step with no graph break equal to eager.
2. [dn121] DenseNet-121 eager (224, batch 256, bf16, channels_last): ours (memory-efficient)
   through the Triton kernels and through the PyTorch operations (the CUDA default),
   torchvision plain and memory_efficient, taking turns step by step in one process (median of
   --steps after --warmup); then each one's peak memory (torch.cuda.max_memory_allocated) from
   its own process.
3. [flop_utilisation] DenseNet-121's training FLOP utilisation (16.8 GFLOP per image against
   the measured bf16 matmul rate), ours and torchvision's.
4. [dn121-compile] DenseNet-121 torch.compile'd (inductor), ours (Triton) and torchvision plain.
5. [bc250] DenseNet-BC-250 k=24 eager (32x32, batch 64), the four sides of 2.
6. [bc100-graphs] DenseNet-BC-100 k=12 (batch 64) as CUDA graphs, ours (Triton) and
   torchvision plain.
7. [kernels] Kernel launches per training step (torch.profiler); 8. [eval_images_per_s]
   eval-mode images/s.
9. [3d-128, 3d-160] 3D DenseNet-121 at 128^3 and 160^3 (one channel, batch 2, bf16,
   channels-last): MONAI plain, MONAI with every dense layer checkpointed, ours plain and ours
   memory-efficient (PyTorch operations, the CUDA default): speeds taking turns, then each
   side's training and peak memory (max_memory_allocated after a reset, each side alone).
   MONAI comes from a wheel in .whl/ when not installed (``make gpu-wheels``; carry ``.whl``);
   without it the MONAI sides print ``skip`` lines and ours are measured.
10. [fc103, fc56-3d] FC-DenseNet103 (224x224, batch 3) and 3D FC-DenseNet56 (64^3, batch 1),
   plain and memory-efficient, measured as 9.

A section runs when its estimate fits what is left of --budget-s (counted from the start of this
process, imports included): its prior seconds (``prior_s`` in gpu_sections.targets and
gpu_volumes.rows, guesses for an H100-class card until a run's "seconds" replace them), scaled
by how long the sections before it took against their priors; otherwise it is skipped with a
line saying so. The default 450 s leaves 90 s of a 540 s call for a section that takes longer
than estimated; at --hard-limit-s (SIGALRM, default 510 s), or on SIGTERM, the script stops
where it is. The priors of all sections add up to more than one call: --only picks sections by
key prefix (``--only 3d fc``: 9 and 10, about 215 s).

Printed, in order:
1. ``gpu_kernels: GPU, torch X, triton Y, budget N s`` (``, DRY RUN`` in a rehearsal;
   ``, only K..`` with --only), and ``monai: VERSION (SOURCE)`` or ``monai: missing (why)`` when
   a selected section has MONAI sides;
2. ``ok   CHECK`` or ``FAIL CHECK``, one per parity check as it finishes;
3. per section, in the order above: ``NAME: speed_x=.., peak_x=.. (targets: ..)`` (speed_x: ours
   with Triton / torchvision plain; peak_x: ours / torchvision memory_efficient), ``training FLOP
   utilisation (..): ..``, ``CUDA kernels per step: ..``, ``eval images/s: ..``, for 9-10
   ``NAME: speed_x=.., memory_x=.. (ours memory-efficient against ..)``; or ``skip NAME: needs
   about E s, L s of --budget-s left`` (or another reason, also ``skip NAME, SIDE: ..`` for one
   side), or ``error NAME[, SIDE]: ..``; after a comparison that changes it, ``cuda default
   supported by these numbers: torch|triton (why)``;
4. ``stopped: SIGTERM|SIGALRM after S s`` when a signal cut the run short;
5. always, last: the ``cuda default supported by these numbers: ..`` line again, and ``wrote
   DIR/gpu_kernels.md; parity: N failed (S s)``.

Exit status: 0; 1 when a parity check failed; 124 when stopped; 2 without a CUDA device or for
an --only that names no section.

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
import gpu_volumes as vol  # noqa: E402
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
    if "targets_text" in t:  # the rows beside MONAI and the segmentation rows
        return t["targets_text"]
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
        errs = ", ".join([f"{k}={v:.2e}" for k, v in c.items() if isinstance(v, float)]
                         + ([c["error"]] if "error" in c else []))
        lines.append(f"| {key} | {'ok' if c['ok'] else 'FAIL'} | {errs} |")
    if not selected("parity", results["only"]):
        lines.append("| not run (--only) | | |")
    for t in results["comparisons"]:
        lines += ["", f"## {t['name']}", ""]
        if t.get("results"):
            lines += _table(t)
        if t.get("ratios"):
            lines += ["", ", ".join(f"{k} = {v:.2f}" for k, v in t["ratios"].items())
                      + f" ({_target_line(t)})"]
        for why in ("skipped", "error"):
            if why in t:
                lines.append(f"{why}: {t[why]}")
        if t.get("key") == "dn121":  # measured right after it, from its speeds
            lines += ["", *_extras(results, ["flop_utilisation"])]
    lines += ["", "## After the targets", "", *_extras(results, ["kernels", "eval_images_per_s"])]
    lines += ["", "## Seconds per section", "", json.dumps(results["seconds"])]
    return "\n".join(lines) + "\n"


def _table(t: dict) -> list[str]:
    """One comparison's sides: speed, and peak memory (and, for the rows beside MONAI and the
    segmentation rows, training memory); a side's skip or error in place of a number."""
    training = "unit" in t
    lines = [f"| implementation | {t.get('unit', 'images')}/s | median step ms | peak MiB |"
             + (" training MiB |" if training else ""),
             "|---|---|---|---|" + ("---|" if training else "")]
    for name, r in t["results"].items():
        if "images_per_s" not in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} |")
            continue
        why = r.get("peak_skipped", r.get("peak_error", r.get("memory_skipped",
                                                              r.get("memory_error", ""))))
        mib = [f"{r[k]:.0f}" if k in r else why
               for k in ("peak_mib", "training_mib")[:1 + training]]
        lines.append(f"| {name} | {r['images_per_s']:.2f} | {1000 * r['median_step_s']:.1f} | "
                     + " | ".join(mib) + " |")
    return lines


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


def comparison(t: dict, entry: dict, dev, args, compile_backend: str,
               budget: Budget) -> Iterator[None]:
    if "unit" in t:  # a row of gpu_volumes
        runs, ratios = vol.compare(t, dev, args.steps, args.warmup, budget.left), vol.ratios
    else:
        runs, ratios = sec.compare(t, args.steps, args.warmup, compile_backend,
                                   budget.left), sec.ratios
    for res in runs:
        entry["results"] = res
        entry["ratios"] = ratios(t, res)
        yield
    print(f"{t['name']}: " + (", ".join(f"{k}={v:.2f}" for k, v in entry["ratios"].items())
                              or "no ratio (a side was not measured)")
          + f" ({_target_line(t)})", flush=True)


def extra(results: dict, key: str, fn: Callable[[], dict]) -> Iterator[None]:
    results[key] = fn()
    yield
    print(extra_line(key, results[key]), flush=True)


def plan(dry: bool) -> list[tuple[str, str, object]]:
    """(key, kind, what) of every section in order: parity, the targets of gpu_sections with
    the FLOP utilisation after the first, the extras, then the rows of gpu_volumes."""
    targets = sec.targets(dry)
    out: list[tuple[str, str, object]] = [("parity", "parity", None)]
    out += [(t["key"], "target", t) for t in targets]
    out.insert(2, ("flop_utilisation", "extra", "flop_utilisation"))
    out += [(k, "extra", k) for k in ("kernels", "eval_images_per_s")]
    return out + [(row["key"], "target", row) for row in vol.rows(dry)]


def selected(key: str, only: list[str] | None) -> bool:
    """Whether --only (key prefixes; None: every section) takes the section ``key``."""
    return only is None or any(key.startswith(prefix) for prefix in only)


def run_parity(dev, compile_backend: str, rec: Record, budget: Budget) -> None:
    start = time.monotonic()
    for key, check in sec.parity(dev, compile_backend):
        rec.results["parity"][key] = check
        rec.save()
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {key}"
              + (f": {check['error']}" if "error" in check else ""), flush=True)
    budget.record(PARITY_PRIOR_S, time.monotonic() - start)
    rec.results["seconds"]["parity"] = round(time.monotonic() - start, 1)


def measure(dev, args, rec: Record, budget: Budget) -> None:
    results, dry = rec.results, args.dry_run
    compile_backend = "aot_eager" if dry else "inductor"  # a cold CPU inductor build: minutes
    big = BenchConfig(**sec.targets(dry)[0]["base"], steps=args.steps, warmup=args.warmup)
    extras = {"flop_utilisation": lambda: sec.flop_utilisation(dev, next(
                  (c for c in results["comparisons"] if c.get("key") == "dn121"), {})),
              "kernels": lambda: sec.kernel_counts(big),
              "eval_images_per_s": lambda: sec.eval_speed(big, args.steps)}
    for key, kind, what in plan(dry):
        if not selected(key, args.only):
            continue
        if kind == "parity":
            run_parity(dev, compile_backend, rec, budget)
            continue
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
                    lambda t=t, e=entry: comparison(t, e, dev, args, compile_backend, budget),
                    rec, budget, lambda kind, why, e=entry: e.__setitem__(kind, why))
        rec.print_default()


def announce_monai(args, rec: Record) -> None:
    """Make MONAI importable (gpu_volumes.load_monai) when a selected section has MONAI sides,
    and say which MONAI, or why none."""
    if not any(selected(key, args.only) and isinstance(what, dict)
               and vol.MONAI_PLAIN in what.get("sides", ()) for key, _, what in plan(args.dry_run)):
        return
    monai = rec.results["monai"] = vol.load_monai()
    print(f"monai: {monai['version']} ({monai['source']})" if "version" in monai else
          f"monai: missing ({monai['missing']})", flush=True)
    rec.save()


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
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="run only the sections whose keys start with one of these (parity, "
                        "dn121, flop_utilisation, dn121-compile, bc250, bc100-graphs, kernels, "
                        "eval_images_per_s, 3d-128, 3d-160, fc103, fc56-3d)")
    args = p.parse_args(argv)
    dry = args.dry_run
    keys = [key for key, _, _ in plan(dry)]
    unknown = [o for o in args.only or [] if not any(k.startswith(o) for k in keys)]
    if unknown:
        print(f"--only {' '.join(unknown)}: no section's key starts so; the keys are "
              f"{', '.join(keys)}", file=sys.stderr)
        return 2
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
                     "default_backend": backend(dev, torch.bfloat16), "only": args.only,
                     "parity": {}, "comparisons": [], "skipped": {}, "seconds": {}}
    rec = Record(args.out, results)
    rec.save()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"gpu_kernels: {results['environment'].get('gpu', 'CPU')}, torch {torch.__version__}, "
          f"triton {triton.__version__}, budget {args.budget_s:.0f} s"
          f"{', DRY RUN' if dry else ''}{', only ' + ' '.join(args.only) if args.only else ''}",
          flush=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(max(1, int(args.hard_limit_s - (time.monotonic() - T0))))
    stopped = False
    try:
        announce_monai(args, rec)
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
