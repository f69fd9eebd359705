"""Data-parallel training over several processes (GPUs, machines), as launched by torchrun.

torchrun starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`setup` reads
it and joins the process group: NCCL when training on CUDA, gloo on the CPU. Each process then
trains on its share of every global batch (:func:`densenets.training.batches.rank_slice`), DDP
averages the gradients, and evaluation sums the per-process counts, so every sample is counted
exactly once. :class:`SyncBatchNorm2d` is batch normalisation over the global batch on any device
(torch's own ``SyncBatchNorm`` is used on GPUs; it refuses CPU tensors).

A crashed process must not leave the others waiting forever: every collective has a timeout
(``--dist-timeout``), NCCL tears its process down on an error, gloo fails as soon as a peer's
socket closes, and torchrun stops the whole job when one worker exits with an error.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..constants import accumulation_dtype

DEFAULT_TIMEOUT_S = 300  # long enough for a slow first batch, short enough to notice a dead peer
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True, kw_only=True)
class Dist:
    """This process's place in the job; ``Dist()`` is a single process (every op a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all processes (a new tensor; ``t`` is left alone)."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=op)
        return t

    def broadcast_text(self, text: str | None, device: torch.device) -> str:
        """Rank 0's ``text`` on every process (the others pass None)."""
        if not self.enabled:
            return text or ""
        data = torch.tensor(list((text or "").encode()) if self.is_main else [],
                            dtype=torch.uint8, device=device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        dist.broadcast(size, 0)
        if not self.is_main:
            data = torch.empty(int(size), dtype=torch.uint8, device=device)
        dist.broadcast(data, 0)
        return bytes(data.cpu().tolist()).decode()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every process."""
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def describe(self) -> dict[str, Any]:
        """What config.json records about the job."""
        return {"world_size": self.world_size, "backend": self.backend,
                "timeout_s": self.timeout_s}


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its env)."""
    return all(k in os.environ for k in ENV)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; start the "
                         "job with torchrun, which sets it") from None


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes; returns this process's place and device.

    Outside torchrun (or with one process) nothing happens. On CUDA each process takes GPU
    ``LOCAL_RANK`` and NCCL; on the CPU the processes talk over gloo.
    """
    if not launched() or _env_int("WORLD_SIZE") <= 1:
        return Dist(), device
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s:g}")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"process {rank} is local rank {local} but this machine shows "
                             f"{count} GPU(s): start at most {count} processes per node "
                             "(--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        # An NCCL error or timeout then ends this process instead of leaving it blocked.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), rank=rank,
                                world_size=world, store=_attempt_store(timeout_s), **kwargs)
    except dist.DistError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConnectionError(f"process {rank} of {world} could not join the job ({first}); "
                              "check --rdzv-endpoint / MASTER_ADDR:MASTER_PORT and that every "
                              "node can reach it") from e
    return Dist(rank=rank, world_size=world, local_rank=local, backend=backend,
                timeout_s=timeout_s), device


_GROUPS = itertools.count()  # process groups this process joined (train, then eval, ...)


def _attempt_store(timeout_s: float) -> dist.Store | None:
    """Keys of this attempt of the job alone in torchrun's store (None: env:// as usual).

    torchrun's agent keeps one store for every attempt of an elastic job, and a process group
    leaves its peers' addresses there, so the group of a restart could read its predecessor's
    and fail to connect, or hang (torch issue 135712). Each attempt, and each group within
    it, gets its own prefix. The restart count is the same on every process of one node; on
    several nodes set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun instead, which gives
    every attempt a fresh store (docs/distributed.md).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timedelta(seconds=timeout_s))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"densenets/attempt{attempt}/group{next(_GROUPS)}", base)


def teardown(clean: bool = True) -> None:
    """Leave the process group (a no-op when none was joined).

    After a clean finish every process first waits for the others: a process that tears down
    its gloo connections while a peer still uses them can abort at exit. After an error the
    peers may be gone, so no one waits.
    """
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def joined(device: torch.device,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[Dist, torch.device]]:
    """:func:`setup` for the length of a ``with`` block, then :func:`teardown` (waiting for
    the others only when the block ended normally). A failure to join is a ValueError."""
    try:
        d, device = setup(device, timeout_s)
    except ConnectionError as e:
        raise ValueError(str(e)) from e
    clean = False
    try:
        yield d, device
        clean = True
    finally:
        teardown(clean)


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Each process's share of ``--batch-size`` (the global batch, as the paper counts it)."""
    if global_batch % world_size == 0:
        return global_batch // world_size
    lower = global_batch - global_batch % world_size
    sizes = " or ".join(str(s) for s in (lower, lower + world_size) if s > 0)
    raise ValueError(f"--batch-size {global_batch} is the global batch and must split evenly "
                     f"over {world_size} processes; use a multiple of {world_size} ({sizes})")


def shard_loaders(loaders: dict[str, Any], d: Dist) -> None:
    """Give this process its part of every batch of every loader (training drops a tail
    batch too small to give every process an image, so no process idles through a step)."""
    if not d.enabled:
        return
    for split, loader in loaders.items():
        if not hasattr(loader, "shard"):
            raise ValueError(f"the {split} loader ({type(loader).__name__}) cannot be split "
                             "across processes")
        loader.shard(d.rank, d.world_size, keep_tail=split != "train")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (gradients averaged over all processes)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def lost_peer_message(error: BaseException, d: Dist, run_dir: os.PathLike | str) -> str:
    """The one line a process prints when a collective failed: a peer died or timed out."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    # gloo prefixes its source location and appends advice; keep the first sentence.
    first = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:200]
    return (f"process {d.rank} of {d.world_size} lost the others ({first}): another process "
            "crashed, was killed or stopped answering (its own message or torchrun's report "
            f"says why; waiting is bounded by --dist-timeout {d.timeout_s:g} s). The last "
            f"checkpoint is {run_dir}/last.pt: continue with --resume {run_dir} (under torchrun "
            "--max-restarts, --auto-resume continues by itself)")


# ---------------------------------------------------------------------------- SyncBatchNorm


class _GlobalSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients of every process: the loss of the
    job is the sum of the processes' losses, and each depends on every process's input."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    return _GlobalSum.apply(t)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any device.

    Same parameters and buffers as BatchNorm2d (checkpoints do not change). Two all-reduces
    per layer (the sum, then the squared deviations, which is stabler than E[x^2] - E[x]^2);
    the backward pass gets the cross-process terms from their differentiable all-reduce.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        acc = accumulation_dtype(x.dtype)
        xa = x.to(acc)
        dims = (0, 2, 3)
        local = torch.cat([xa.sum(dims), xa.new_tensor([x.numel() // x.shape[1]])])
        total = _global_sum(local)
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = xa - mean.view(1, -1, 1, 1)
        var = _global_sum((centred * centred).sum(dims)) / n
        self._update_running_stats(mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor,
                              n: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else \
            1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` normalised over the global batch (``--sync-bn``).

    torch's fused SyncBatchNorm on GPUs; :class:`SyncBatchNorm2d` elsewhere. The
    memory-efficient dense blocks need plain BatchNorm2d and so take their plain path.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=device)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model


# ---------------------------------------------------------------------------- RNG per rank


def seed_rank(seed: int, d: Dist) -> None:
    """Different random streams per process (dropout masks), rank 0 keeping ``seed``'s."""
    if d.enabled and d.rank:
        torch.manual_seed(int(seed) + 1_000_003 * d.rank)


def gather_rng(d: Dist, device: torch.device) -> list[dict[str, torch.Tensor]] | None:
    """Every process's torch RNG states (CPU, and its GPU's), for a checkpoint: a resumed
    job then draws exactly the dropout masks it would have drawn."""
    if not d.enabled:
        return None
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(d.world_size)]
    for key, s in states.items():
        parts = [torch.empty_like(s, device=device) for _ in range(d.world_size)]
        dist.all_gather(parts, s.to(device))
        for r, p in enumerate(parts):
            out[r][key] = p.cpu()
    return out


def restore_rng(per_rank: list[dict[str, torch.Tensor]] | None, d: Dist,
                device: torch.device) -> bool:
    """This process's states from :func:`gather_rng`; False when the job size changed."""
    if not d.enabled or not per_rank or len(per_rank) != d.world_size:
        return False
    mine = per_rank[d.rank]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
    return True
