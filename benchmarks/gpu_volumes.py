"""The last sections of benchmarks/gpu_kernels.py: 3D DenseNet-121 beside MONAI's, and
FC-DenseNet plain against memory-efficient, on a CUDA GPU (the CPU tables' rows, in bf16).

Rows, bf16 autocast and channels-last (``channels_last_3d`` for volumes) on every side, SGD
with momentum, cross-entropy (per voxel for segmentation), random data:

- 3D DenseNet-121 at 128^3 and 160^3, one channel, two classes, batch 2: MONAI's
  ``DenseNet121(spatial_dims=3)`` plain and with every dense layer under
  ``torch.utils.checkpoint`` (what MONAI offers its users for memory), ours plain and ours
  memory-efficient (the CUDA default backend: PyTorch operations; Triton is opt-in);
- FC-DenseNet103 at 224x224, batch 3, and 3D FC-DenseNet56 at 64^3, batch 1
  (benchmarks/segmentation.py's configurations), plain and memory-efficient.

Speed: the sides of a row take turns step by step in one process (median of the steps after the
warm-up), so a slow moment slows them alike. Memory, after the speeds, each side alone in the
same process, with care: its gradients and optimizer state freed (as in a process that has only
built the model and the batch), CUDA's peak counter reset, two steps, then
``torch.cuda.max_memory_allocated`` minus what was allocated at the reset is its training
memory (what training adds to the model and the batch, as the CPU tables count it). Adding the
side's own parameters, buffers and batch gives the peak a process of its own would reach (CUDA
library workspaces aside). The other sides' tensors are in both readings and cancel; allocated,
not reserved, memory is counted, so blocks cached for other sides do not count; the cuDNN
algorithm search is over by then (warm-up), so its trial workspaces do not count either.

MONAI is imported when installed; else from a monai wheel in ``.whl/`` (``make gpu-wheels``;
the GPU machine gets it when the call carries ``.whl``), unpacked into a temporary directory
put first on ``sys.path`` (MONAI is pure Python); else the MONAI sides print ``skip`` lines and
ours are measured alone.
"""

from __future__ import annotations

import atexit
import gc
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_sections import kernels_env
from segmentation import CONFIGS as SEG_CONFIGS
from segmentation import TARGETS as SEG_TARGETS
from torch import nn

import densenets
from densenets.analysis.bench import step_stats
from densenets.efficient.dispatch import backend, clear_workspaces

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
MONAI_PLAIN, MONAI_CKPT = "MONAI plain", "MONAI checkpointed"
OURS, OURS_ME = "ours plain", "ours memory-efficient"
MEMORY_STEPS = 2  # the first allocates gradients and momentum, the second runs as training does
MEMORY_MIN_S = 10  # budget left below which a side's memory is not measured
# The CPU targets at 128^3 (docs/benchmarks.md), printed beside the GPU ratios for reference:
# no GPU targets are set.
CPU_TARGETS_3D = {128: "memory <= 0.45x, speed >= 1.0x"}
_MONAI: dict = {}


def load_monai() -> dict:
    """Make MONAI importable, once per process: ``{"version", "source"}``, or ``{"missing":
    why}`` when it is neither installed nor in a wheel in ``.whl/``."""
    if _MONAI:
        return _MONAI
    source = "installed"
    try:
        import monai
    except ImportError:
        wheels = sorted(WHEELS.glob("monai-*.whl"))
        if not wheels:
            _MONAI["missing"] = ("MONAI is not installed and .whl/ has no monai wheel (make "
                                 "gpu-wheels here, and carry .whl to the GPU machine)")
            return _MONAI
        target = tempfile.mkdtemp(prefix="densenets-monai-")
        atexit.register(shutil.rmtree, target, ignore_errors=True)
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(target)
        sys.path.insert(0, target)
        source = str(wheels[-1].relative_to(ROOT))
        try:
            import monai
        except Exception as e:  # a wheel that does not import here: say why, measure ours
            _MONAI["missing"] = f"{source} does not import: {type(e).__name__}: {e}"
            return _MONAI
    _MONAI.update(version=monai.__version__, source=source)
    return _MONAI


def rows(dry: bool) -> list[dict]:
    """The sections in order. ``prior_s``: seconds expected on an H100-class card (model builds,
    cuDNN's algorithm search for every new convolution shape in the first steps, the timed
    steps, the memory steps); a tenth of it in a dry run, which uses tiny inputs on a CPU."""
    seg_sides = dict(sides=[OURS, OURS_ME], speed_vs=OURS,
                     targets_text=(f"ours memory-efficient against ours plain; CPU targets: "
                                   f"memory <= {SEG_TARGETS['memory']}x, speed >= "
                                   f"{SEG_TARGETS['speed']}x"))
    out = []
    for key, volume, prior in (("3d-128", 128, 60), ("3d-160", 160, 70)):
        target = CPU_TARGETS_3D.get(volume)
        out.append(dict(
            key=key, name=f"3D DenseNet-121 {volume}^3", prior_s=prior, model="densenet121",
            dims=3, side=32 if dry else volume, batch=2, in_channels=1, classes=2,
            segmentation=False, unit="volumes", sides=[MONAI_PLAIN, MONAI_CKPT, OURS, OURS_ME],
            speed_vs=MONAI_PLAIN,
            targets_text="ours memory-efficient against MONAI plain, _ckpt against MONAI "
                         "checkpointed, _plain against ours plain"
                         + (f"; CPU targets: {target}" if target else "")))
    for key, config, prior in (("fc103", "2d", 40), ("fc56-3d", "3d", 45)):
        model, overrides, side, batch = SEG_CONFIGS[config]
        dims = overrides.get("spatial_dims", 2)
        name = f"{'3D ' if dims == 3 else ''}FC-DenseNet{model[len('fcdensenet'):]} "
        out.append(dict(
            key=key, name=name + ("x".join([str(side)] * dims) if dims == 2 else f"{side}^3"),
            prior_s=prior, model=model, overrides=overrides, dims=dims,
            # five pools: a dry run's 32 reaches 1 voxel, where batch norm needs a batch of 2
            side=32 if dry else side, batch=max(batch, 2) if dry else batch,
            in_channels=overrides.get("in_channels", 3), classes=overrides["num_classes"],
            segmentation=True, unit="images" if dims == 2 else "volumes", **seg_sides))
    return out


def checkpoint_dense_layers(model: nn.Module) -> nn.Module:
    """MONAI's DenseNet with every dense layer recomputed in backward (non-reentrant
    ``torch.utils.checkpoint``), as a MONAI user would save memory."""
    from torch.utils.checkpoint import checkpoint

    layers = [m for m in model.modules() if type(m).__name__ == "_DenseLayer"]
    if not layers:  # a MONAI that names its layers otherwise: no row that checkpoints nothing
        raise ValueError("MONAI's DenseNet121 has no _DenseLayer modules to checkpoint")
    for layer in layers:
        layer.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(
            layer.forward)
    return model


def build(row: dict, side: str) -> nn.Module:
    """The network of one side of ``row``."""
    if side in (MONAI_PLAIN, MONAI_CKPT):
        from monai.networks.nets import DenseNet121

        model = DenseNet121(spatial_dims=3, in_channels=row["in_channels"],
                            out_channels=row["classes"])
        return checkpoint_dense_layers(model) if side == MONAI_CKPT else model
    overrides = row.get("overrides") or dict(spatial_dims=row["dims"],
                                             in_channels=row["in_channels"],
                                             num_classes=row["classes"])
    return densenets.create_model(row["model"], memory_efficient=side == OURS_ME, **overrides)


class Step:
    """One side's training step on fixed random data (the memory-efficient blocks on their
    default backend); calling it runs a step and returns its seconds."""

    def __init__(self, row: dict, side: str, dev: torch.device) -> None:
        torch.manual_seed(0)  # ours plain and memory-efficient start from the same weights
        fmt = torch.channels_last_3d if row["dims"] == 3 else torch.channels_last
        self.dev = dev
        self.model = build(row, side).to(dev).train().to(memory_format=fmt)
        spatial = [row["side"]] * row["dims"]
        self.x = torch.randn(row["batch"], row["in_channels"], *spatial,
                             device=dev).contiguous(memory_format=fmt)
        labels = (row["batch"], *spatial) if row["segmentation"] else (row["batch"],)
        self.y = torch.randint(0, row["classes"], labels, device=dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def __call__(self) -> float:
        self._sync()
        start = time.perf_counter()
        with kernels_env("auto"):
            with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(self.model(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        self._sync()
        return time.perf_counter() - start

    def own_bytes(self) -> int:
        """Parameters, buffers and batch: what the side holds before training."""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        return sum(t.numel() * t.element_size() for t in tensors)


def memory(step: Step) -> dict:
    """Training memory of one side, measured alone after the speeds (module docstring)."""
    step.opt.zero_grad(set_to_none=True)
    step.opt.state.clear()
    clear_workspaces()
    gc.collect()
    cuda = step.dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(step.dev)
        torch.cuda.reset_peak_memory_stats(step.dev)
        before = torch.cuda.memory_allocated(step.dev)
    for _ in range(MEMORY_STEPS):
        step()
    if not cuda:
        return {"memory_skipped": "no per-side peak on a CPU (dry run)"}
    training = (torch.cuda.max_memory_allocated(step.dev) - before) / 2**20
    return {"training_mib": training, "peak_mib": step.own_bytes() / 2**20 + training}


def _why(e: Exception) -> str:
    """One line: the error's type and the start of its message, which says what went wrong."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def compare(row: dict, dev: torch.device, steps: int, warmup: int,
            left: Callable[[], float]) -> Iterator[dict]:
    """Every side's speed (taking turns), then each one's memory while the budget lasts; yields
    the results after the speeds and after each memory figure. A side that cannot be built or
    fails a step is recorded with its error and the others go on."""
    out: dict[str, dict] = {}
    runners: dict[str, Step] = {}
    for side in row["sides"]:
        missing = load_monai().get("missing") if side.startswith("MONAI") else None
        if missing:
            out[side] = {"skipped": missing}
            print(f"skip {row['name']}, {side}: {missing}", flush=True)
            continue
        try:
            runners[side] = Step(row, side, dev)
        except Exception as e:
            out[side] = {"error": _why(e)}
            print(f"error {row['name']}, {side}: {out[side]['error']}", flush=True)
    times: dict[str, list[float]] = {side: [] for side in runners}
    for i in range(warmup + steps):
        for side, step in list(runners.items()):
            try:
                seconds = step()
            except Exception as e:
                out[side] = {"error": _why(e)}
                print(f"error {row['name']}, {side}: {out[side]['error']}", flush=True)
                del runners[side]
                continue
            if i >= warmup:
                times[side].append(seconds)
    for side, step in runners.items():
        with kernels_env("auto"):
            path = backend(dev, torch.bfloat16) if side == OURS_ME else None
        stats = step_stats(times[side], row["batch"])
        out[side] = {**{k: v for k, v in stats.items() if k != "step_s"}, "backend": path,
                     "params": sum(p.numel() for p in step.model.parameters())}
    yield out
    for side, step in runners.items():
        if left() < MEMORY_MIN_S:
            out[side]["memory_skipped"] = f"{max(left(), 0):.0f} s of the budget left"
        else:
            try:
                out[side].update(memory(step))
            except Exception as e:
                out[side]["memory_error"] = _why(e)
        yield out
    runners.clear()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def ratios(row: dict, res: dict) -> dict:
    """Ours memory-efficient against each other side, where both were measured: speed_x and
    memory_x (training memory) against ``speed_vs``, with ``_ckpt`` against MONAI checkpointed
    and ``_plain`` against ours plain when that is not ``speed_vs``."""
    refs = [(row["speed_vs"], "")] + [(side, tag) for side, tag in ((MONAI_CKPT, "_ckpt"),
                                                                      (OURS, "_plain"))
                                      if side != row["speed_vs"]]
    ours, r = res.get(OURS_ME, {}), {}
    for ref, tag in refs:
        for key, name in (("images_per_s", "speed_x"), ("training_mib", "memory_x")):
            if key in ours and key in res.get(ref, {}):
                r[f"{name}{tag}"] = ours[key] / res[ref][key]
    return r
