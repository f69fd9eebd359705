"""Pre-flight for a GPU call, on any CPU: is the GPU script going to run on the GPU image?

GPU time comes in short loans on a machine where nothing can be installed and whose versions
differ from this one's. Run this with those versions (``make gpu-preflight`` builds them in
``.venv-gpu``) before every GPU call:

    .venv-gpu/bin/python benchmarks/preflight.py [--skip-tests]

It prints one line per check (PASS/FAIL) and exits 1 if any failed:

1. versions: torch, torchvision, Triton and numpy are the GPU image's (numpy below 2.4, which
   Triton 3.6's interpreter needs here; the GPU itself does not use the interpreter);
2. sm_90: every Triton kernel that a training step launches (forward and backward, float32 and
   bfloat16, with and without the bottleneck, with dropout) is captured with the arguments its
   launcher gives it and compiled for Hopper by Triton's own code generator and bundled ptxas,
   no GPU needed; the GEMMs also with the tiles DenseNet-121's first block at batch 256 gets;
3. the Triton and torch.compile tests under TRITON_INTERPRET=1;
4. the GPU script's ``--dry-run`` (every section on tiny shapes, under the interpreter; the 3D
   and segmentation rows with every side measured, MONAI's from the wheel in ``.whl/`` that
   ``make gpu-wheels`` fetches, as on the GPU machine, which has no MONAI), then cut by its
   budget (``--budget-s 1``: parity only) and stopped by SIGTERM after its first parity check:
   each must leave whole json and markdown with what it measured and the CUDA default line.
"""

from __future__ import annotations

import os
import sys

# Triton reads TRITON_INTERPRET when it is first imported, its own library functions included: the
# capture runs interpreted in this process, the compilation in a child process without it.
COMPILING = "--compile" in sys.argv
if COMPILING:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import triton  # noqa: E402

# What the GPU image holds (the device tool's KINDS.md, read 2026-11).
GPU_IMAGE = {"torch": "2.11", "torchvision": "0.26", "triton": "3.6"}
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
_results: list[tuple[bool, str, str]] = []


def report(ok: bool, name: str, detail: str) -> None:
    _results.append((ok, name, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def check_versions() -> None:
    found = {"torch": torch.__version__, "torchvision": torchvision.__version__,
             "triton": triton.__version__}
    wrong = [f"{k} {v} (GPU image: {GPU_IMAGE[k]})" for k, v in found.items()
             if not v.startswith(GPU_IMAGE[k])]
    major, minor = (int(p) for p in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4) and triton.__version__.startswith("3.6"):
        wrong.append(f"numpy {numpy.__version__} (Triton 3.6's interpreter needs < 2.4)")
    detail = ", ".join(f"{k} {v}" for k, v in found.items()) + f", numpy {numpy.__version__}"
    report(not wrong, "versions", "; ".join(wrong) if wrong else detail)


class _Capture:
    """Stands in for one interpreted kernel: records each launch, then runs it."""

    def __init__(self, name: str, kernel, launches: list) -> None:
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch

    def __call__(self, *args, **kwargs):  # a helper called from inside another kernel
        return self.kernel(*args, **kwargs)


def capture_launches() -> tuple[list, object]:
    """Every kernel launch of a few tiny training steps through the Triton kernels."""
    from densenets import DenseNet
    from densenets.efficient import triton_passes

    module = triton_passes.kernels(torch.device("cpu"))
    launches: list = []
    kernels = {n: getattr(module, n) for n in dir(module)
               if hasattr(getattr(module, n), "arg_names") and n.startswith("_")}
    for name, kernel in kernels.items():
        setattr(module, name, _Capture(name, kernel, launches))
    os.environ["DENSENETS_KERNELS"] = "triton"
    try:
        for bottleneck, dtype, drop in ((True, torch.float32, 0.0), (False, torch.float32, 0.2),
                                        (True, torch.bfloat16, 0.2)):
            torch.manual_seed(0)
            model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                             bottleneck=bottleneck, drop_rate=drop, num_classes=3, stem="cifar",
                             memory_efficient=True)
            x = torch.randn(2, 3, 8, 8)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x).float().sum()
            loss.backward()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
        os.environ.pop("DENSENETS_KERNELS", None)
    return launches, kernels


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, options) for one captured launch of the interpreted
    kernel ``fn`` (its Python function's annotations say which parameters are constexpr)."""
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    sig, consts = {}, {}
    for name, param in inspect.signature(fn.fn).parameters.items():
        value = values.get(name)
        if "constexpr" in str(param.annotation):
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}={value!r} of unexpected type")
    return sig, consts, options


def specialisations(launches: list) -> list[dict]:
    """The distinct (kernel, signature, constexprs, options) of the captured launches, and the
    GEMMs again with the tiles their launchers pick at DenseNet-121 scale (bf16, batch 256)."""
    from densenets.efficient import triton_passes

    jobs: dict[str, dict] = {}
    for name, args, kwargs in launches:
        fn = getattr(triton_passes.kernels(torch.device("cpu")), name)
        sig, consts, options = _signature(fn, args, kwargs)
        job = {"name": name, "sig": sig, "consts": consts, "options": options}
        jobs[json.dumps(job, sort_keys=True)] = job
    bm, bn, bk = triton_passes._tiles(256 * 56 * 56, 128, 256, torch.bfloat16)
    for job in list(jobs.values()):
        consts = job["consts"]
        if {"BM", "BN", "BK"} <= consts.keys() and "*bf16" in job["sig"].values():
            big = dict(job, consts=dict(consts, BM=min(bm, consts["BM"] * 8), BN=bn, BK=bk),
                       options=dict(job["options"], num_warps=8))
            jobs[json.dumps(big, sort_keys=True)] = big
    return list(jobs.values())


def compile_for_hopper(jobs: list[dict]) -> list[str]:
    """Compile each specialisation for sm_90 (no GPU needed); the failures, one line each."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from densenets.efficient import triton_kernels

    failed = []
    for job in jobs:
        fn = getattr(triton_kernels, job["name"])
        try:
            out = triton.compile(ASTSource(fn=fn, signature=job["sig"], constexprs=job["consts"]),
                                 target=GPUTarget("cuda", 90, 32), options=job["options"])
            if not out.asm.get("cubin"):
                raise RuntimeError("no cubin")
        except Exception as e:  # report every kernel, not only the first failure
            cause = e
            while cause.__cause__ is not None:  # the innermost error says what is wrong
                cause = cause.__cause__
            failed.append(f"{job['name']} {job['consts']}: {type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[-1][:200]}")
    return failed


def check_compile(launches: list, kernels: dict) -> None:
    jobs = specialisations(launches)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"densenets-preflight-{os.getpid()}.json"
    path.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, __file__, "--compile", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    path.unlink()
    failed = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else [
        f"the compiling process failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"]
    launched = {job["name"] for job in jobs}
    never = sorted(set(kernels) - launched - _helpers(kernels))
    ok = not failed and not never
    detail = (f"{len(launched)} kernels, {len(jobs)} specialisations compiled to cubin"
              if ok else "; ".join(failed + [f"never launched by a step: {n}" for n in never]))
    report(ok, "sm_90 compile", detail)


def _helpers(kernels: dict) -> set[str]:
    """The @triton.jit functions that other kernels call (compiled inside them, never launched)."""
    sources = {n: inspect.getsource(k.fn) for n, k in kernels.items()}
    return {n for n in kernels
            if any(re.search(rf"\b{n}\(", src) for m, src in sources.items() if m != n)}


_ENV = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
DEFAULT_LINE = "cuda default supported by these numbers:"


def run_step(name: str, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_ENV, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    report(proc.returncode == 0, name, tail[-1] if tail else f"exit {proc.returncode}")


def _written(out: Path, stdout: str) -> tuple[dict, list[str]]:
    """The GPU script's json, and what is wrong with what it wrote and printed: both files
    whole, the CUDA default line in the markdown and last-but-one on stdout."""
    try:
        results = json.loads((out / "gpu_kernels.json").read_text())
        md = (out / "gpu_kernels.md").read_text()
    except (OSError, ValueError) as e:
        return {}, [f"unreadable output: {e}"]
    lines = stdout.strip().splitlines()
    wrong = [] if DEFAULT_LINE in md and "cuda_default" in results else ["no default in files"]
    if len(lines) < 2 or not lines[-2].startswith(DEFAULT_LINE):
        wrong.append("no default line at the end of stdout")
    return results, wrong


def _volume_rows(results: dict, wrong: list[str]) -> str:
    """The 3D and segmentation rows of a dry run: every side of each measured (MONAI's from
    its wheel); what is not goes into ``wrong``. Returns the detail for the report."""
    rows = [c for c in results.get("comparisons", []) if "unit" in c]
    if len(rows) != 4:
        wrong.append(f"{len(rows)} of the 4 3D and segmentation rows ran")
    for row in rows:
        sides = row.get("results", {})
        bad = {side: r.get("skipped") or r.get("error") for side, r in sides.items()
               if "images_per_s" not in r}
        if bad or not sides:
            wrong.append(f"{row['name']}: {bad or row.get('error') or 'not measured'}")
    monai = results.get("monai", {})
    return (f"{len(rows)} of them 3D and segmentation rows, MONAI {monai.get('version')} from "
            f"{monai.get('source')}" if "version" in monai else "")


def check_gpu_script() -> None:
    """The GPU script's dry run whole, cut by its budget, and stopped by SIGTERM mid-parity: each
    leaves whole json and markdown with what it measured and the CUDA default line."""
    tmp = Path(tempfile.mkdtemp(prefix="densenets-preflight-"))
    dry = [sys.executable, "benchmarks/gpu_kernels.py", "--dry-run", "--out"]
    for name, extra in (("gpu script dry run", []), ("gpu script budget cut", ["--budget-s", "1"])):
        out = tmp / name.split()[-1]
        proc = subprocess.run(dry + [str(out), *extra], cwd=ROOT, env=_ENV, capture_output=True,
                              text=True)
        results, wrong = _written(out, proc.stdout)
        comps = results.get("comparisons", [])
        done = [c["name"] for c in comps if "results" in c]
        cut = [c["name"] for c in comps if "needs about" in c.get("skipped", "")]
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or [""])[-1]
            wrong.append(f"exit {proc.returncode}: {err}")
        if len(results.get("parity", {})) != 6:
            wrong.append("parity incomplete")
        measured, skipped = (cut, done) if extra else (done, cut)  # 3 run on a CPU
        if len(measured) < 3 or skipped:
            wrong.append(f"measured {done}, cut by the budget {cut}")
        rows = [] if extra else _volume_rows(results, wrong)
        report(not wrong, name, "; ".join(wrong) or
               f"{len(results['parity'])} parity checks, {len(done)} comparisons measured"
               + (f" ({rows})" if rows else "") + f", {len(cut)} cut by the budget, default "
               "line written")
    out = tmp / "stopped"
    proc = subprocess.Popen(dry + [str(out)], cwd=ROOT, env=_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(("ok ", "FAIL ")):
            proc.send_signal(signal.SIGTERM)
            break
    seen += proc.stdout.readlines()
    rc = proc.wait(timeout=120)
    results, wrong = _written(out, "".join(seen))
    if rc != 124 or "stopped" not in results or not results.get("parity"):
        wrong.append(f"exit {rc}, stopped={results.get('stopped')}, "
                     f"parity={len(results.get('parity', {}))}")
    report(not wrong, "gpu script stopped", "; ".join(wrong) or
           f"SIGTERM after {len(results['parity'])} parity check(s): exit 124, files whole, "
           "default line written")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-tests", action="store_true", help="only versions and compilation")
    p.add_argument("--compile", metavar="JOBS", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.compile:
        print(json.dumps(compile_for_hopper(json.loads(Path(args.compile).read_text()))))
        return 0
    check_versions()
    try:
        launches, kernels = capture_launches()
    except Exception as e:  # a step that fails here fails on the GPU too: report, go on
        report(False, "sm_90 compile", f"a training step through the Triton kernels failed: "
                                       f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    else:
        check_compile(launches, kernels)
    if not args.skip_tests:
        run_step("interpreter tests", [sys.executable, "-m", "pytest", "-q", "-p",
                                       "no:cacheprovider", "tests/test_triton_kernels.py",
                                       "tests/test_compile.py"])
        check_gpu_script()
    bad = [name for ok, name, _ in _results if not ok]
    print(f"pre-flight: {len(_results) - len(bad)}/{len(_results)} checks passed"
          + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
