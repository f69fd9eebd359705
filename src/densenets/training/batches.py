"""What every loader shares: the order of an epoch, the shard of a process, the bundle of splits.

An epoch's order is a pure function of (seed, epoch), and a global batch is split among the
processes of a distributed job by :func:`rank_slice`, so a run of any size, or one resumed
mid-epoch, sees exactly the batches of one uninterrupted single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch


class Loader(Protocol):
    """What the training loop iterates: batches of (images, labels) for one epoch."""

    num_samples: int

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random source of one epoch's order and augmentation (independent of global RNG)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Process ``rank``'s contiguous part of ``n`` items: sizes differ by at most one, the parts
    of all processes cover each item exactly once (no padding, no repeats)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool,
                g: torch.Generator | None = None) -> torch.Tensor:
    """The sample order of an epoch; the one place a distributed run would shard it."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=g if g is not None else epoch_generator(seed, epoch))


_Loader = TypeVar("_Loader", bound="ShardedBatches")


class ShardedBatches:
    """Global batches of ``batch_size`` over ``num_samples`` items, of which this process
    loads part ``rank`` of ``world_size`` (the batch arithmetic shared by the loaders)."""

    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    keep_tail: bool

    def shard(self: _Loader, rank: int, world_size: int, keep_tail: bool = True) -> _Loader:
        """Yield only process ``rank``'s part of every global batch of ``batch_size``.

        The global batches (and their augmentation) are those of a single process, so a job
        of any size trains on the same data. Without ``keep_tail`` a last batch smaller than
        ``world_size`` is dropped (a process with no image would idle through a step).
        """
        self.rank, self.world_size, self.keep_tail = rank, world_size, keep_tail
        return self

    def __len__(self) -> int:
        full, tail = divmod(self.num_samples, self.batch_size)
        return full + (tail > 0 and (self.keep_tail or tail >= self.world_size))

    def global_size(self, b: int) -> int:
        """Images in global batch ``b`` over all processes."""
        return min(self.batch_size, self.num_samples - b * self.batch_size)


@dataclass
class DataBundle:
    """The loaders of a run by split name, with what a checkpoint must remember about them."""

    loaders: dict[str, Loader]
    class_names: list[str]
    in_channels: int
    preprocessing: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def preprocessing_of(cfg) -> dict[str, Any]:
    """The inference preprocessing a checkpoint records (pixels in [0, 1], then normalised)."""
    return {"resize": cfg.resize, "crop": cfg.crop, "mean": list(cfg.mean),
            "std": list(cfg.std), "interpolation": "bilinear"}


class _IterableLoader:
    """Adapts a plain iterable of (x, y) batches with a length (e.g. a DataLoader): skipping
    ``start`` batches on resume is exact only if its order is a function of the epoch."""

    def __init__(self, iterable) -> None:
        self.iterable = iterable
        self.num_samples = len(getattr(iterable, "dataset", ())) or len(iterable)

    def __len__(self) -> int:
        return len(self.iterable)

    def batches(self, epoch: int, start: int = 0):
        if hasattr(getattr(self.iterable, "sampler", None), "set_epoch"):
            self.iterable.sampler.set_epoch(epoch)
        for b, batch in enumerate(self.iterable):
            if b >= start:
                yield batch


def as_loader(loader):
    """Our loaders have ``batches(epoch, start)``; anything else iterable is adapted."""
    return loader if hasattr(loader, "batches") else _IterableLoader(loader)
