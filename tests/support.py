"""Helpers shared by the test modules: one copy of each, imported as ``from support import ...``.

``pyproject.toml`` puts ``tests/`` on ``sys.path`` (``pythonpath``), so the import works under
``pytest`` from the repository root, under ``make test`` and under any import mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenets import DenseNet

# ---------------------------------------------------------------------------- published facts

# Parameter counts as published, 1000 classes: the paper's ImageNet models as torchvision hosts
# them, timm 1.0's registry for timm's two DenseNet variants and for RDNet.
PUBLISHED_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264d": 72_736_216,
    "densenetblur121d": 7_998_088,
    "rdnet_tiny": 23_863_008,
    "rdnet_small": 50_436_448,
    "rdnet_base": 87_451_096,
    "rdnet_large": 186_269_632,
}

# ---------------------------------------------------------------------------- numbers


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative max error: ``max |a - b|`` over the smaller of ``max |a|`` and ``max |b|``.

    Computed in float64 and symmetric, so no caller has to remember which argument is the
    reference; dividing by the smaller scale makes it at least as strict as measuring against
    either tensor alone. Two all-zero tensors agree (0); zero against non-zero is a huge error.
    """
    a, b = a.detach().double(), b.detach().double()
    scale = torch.minimum(a.abs().max(), b.abs().max()).clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def tiny_densenet(**kw) -> DenseNet:
    """A three-block CIFAR-stem DenseNet of 7 layers (k = 4, 5 classes): small enough for any
    test; keyword arguments override its configuration."""
    return DenseNet(**{**dict(growth_rate=4, block_config=(2, 3, 2), num_init_features=8,
                              num_classes=5, stem="cifar"), **kw})


def vary_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Every 1-D floating tensor of the state (BN scales, shifts, running statistics, biases)
    uniform in [0.5, 1.5), drawn from the global generator.

    They start constant (1 or 0), which would hide a swapped, skipped or mis-normalised tensor;
    a variance of at least 0.5 keeps every normalisation well conditioned.
    """
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.dim() == 1 and t.is_floating_point():
                t.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------- files on disk


def write_image_folder(root: Path, per_class: int = 4, size: int = 20,
                       classes: Sequence[str] = ("cat", "dog")) -> Path:
    """``root/{train,val}/<class>/<i>.png``: noisy RGB images whose brightness is the class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pix = np.clip(rng.normal(80 + 100 * c, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pix.astype(np.uint8)).save(d / f"{i}.png")
    return root


def write_fake_cifar(root: Path, n_train: int = 60, n_test: int = 30, classes: int = 10,
                     seed: int = 0) -> Path:
    """A cifar-10-batches-py folder with five tiny training batches, a test batch and meta.

    Images are class-dependent colour blobs plus noise, so a tiny net can learn them.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, classes, n)
        base = (labels[:, None] * 25 % 256).astype(np.float64)
        pix = np.clip(base + rng.normal(0, 20, (n, 3072)), 0, 255).astype(np.uint8)
        return {"data": pix, "labels": labels.tolist(), "batch_label": "fake"}

    per = n_train // 5
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = [f"class{i}" for i in range(classes)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return folder


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Put ``files`` (name in the repository: local file) into a Hugging Face Hub cache at
    ``cache`` as huggingface_hub stores downloads: refs/main, a snapshot of links to blobs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap, blobs = root / "snapshots" / HUB_COMMIT, root / "blobs"
    for d in (root / "refs", snap, blobs):
        d.mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    for name, src in files.items():
        data = src.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))


def load_pt(path: Path) -> dict:
    """A checkpoint or tensor file written by ``torch.save``, tensors only."""
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------- the CLI


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``densenets ARGV`` in this process: its exit code, stdout and stderr."""
    from densenets.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------- signals and processes


class SignalAt:
    """Wraps a loader (a TensorLoader or FolderLoader); delivers a real SIGINT to this process
    while yielding batch ``batch`` of epoch ``epoch``."""

    def __init__(self, inner, epoch: int, batch: int) -> None:
        self.inner, self.epoch, self.batch = inner, epoch, batch
        self.num_samples = inner.num_samples
        self.global_size = inner.global_size  # the loop weighs accumulated batches by it

    def __len__(self) -> int:
        return len(self.inner)

    def batches(self, epoch: int, start: int = 0):
        for b, item in enumerate(self.inner.batches(epoch, start), start):
            if (epoch, b) == (self.epoch, self.batch):
                signal.raise_signal(signal.SIGINT)
            yield item


TORCHRUN = Path(sys.executable).with_name("torchrun")
JOB_TIMEOUT = 120  # seconds: a job that hangs fails its test instead of the suite
ONE_NODE = ("--standalone", "--nproc-per-node=2")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, launcher: Sequence[str] = ONE_NODE,
             env: dict | None = None) -> subprocess.Popen:
    """``torchrun LAUNCHER SCRIPT ARGS`` on this machine, CPU and gloo, one thread a process.

    The default is a 2-process standalone job (its own free port, so jobs may run side by side).
    The job gets a session of its own so that :func:`kill_tree` can end all of it.
    """
    cmd = [str(TORCHRUN), *launcher, "--monitor-interval=0.5", str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def spawn(fn: Callable[..., None], args: tuple, nprocs: int = 2,
          timeout: float = JOB_TIMEOUT) -> None:
    """``fn(rank, *args)`` in ``nprocs`` fresh processes (torch.multiprocessing, spawn start).

    ``fn`` must be importable by name from a test module (``tests/`` is on the children's
    path). An error in any process fails the test with its traceback; processes still
    running after ``timeout`` seconds are killed and fail it too.
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + timeout
    while not context.join(timeout=0.5):
        if time.monotonic() > end:
            for p in context.processes:
                kill_tree(p.pid)
            pytest.fail(f"{nprocs} processes of {fn.__name__} still running after {timeout} s")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun starts its workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in reversed(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def finish(job: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> tuple[int, str, str]:
    """Wait for ``job``: exit code, stdout, stderr. One still running after ``timeout`` seconds
    is killed with its children and fails the test."""
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid)
        out, err = job.communicate()
        pytest.fail(f"job still running after {timeout} s:\n{out}\n{err}")
    return job.returncode, out, err


def succeed(job: subprocess.Popen) -> tuple[str, str]:
    """:func:`finish`, asserting exit code 0; stdout and stderr."""
    code, out, err = finish(job)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    return out, err


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 90) -> None:
    """Wait until ``job`` creates ``path``; fail with its output if it ends or ``timeout``
    seconds pass first."""
    end = time.monotonic() + timeout
    while not path.exists():
        if job.poll() is not None or time.monotonic() > end:
            code, out, err = finish(job, 5)
            pytest.fail(f"{path.name} never appeared (exit {code})\n{out}\n{err}")
        time.sleep(0.05)


def saved_bytes(model, x):
    """Bytes of activations autograd keeps for backward after ``model(x)`` (parameters
    excluded), each storage once."""
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_(True))
    return sum(storages.values())


def train_steps(model, xs, seed: int = 0, steps: int = 3):
    """Three SGD steps (momentum, weight decay), seeded per step so dropout draws alike in two
    models; per step the output, the input gradient and the parameter gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    record = []
    for step, x in enumerate(xs[:steps]):
        x = x.clone().requires_grad_(True)
        torch.manual_seed(seed + step)
        y = model(x)
        opt.zero_grad()
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        record.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record
