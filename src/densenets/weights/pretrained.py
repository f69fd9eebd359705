"""torchvision's published ImageNet weights: the registry, their download, their metadata.

Each file is checked against its published SHA-256 prefix on download and whenever it is found in
the cache, and travels with the class names and preprocessing it was evaluated with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..digest import file_digest
from ..models.zoo import recorded_sides


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint: where it lives, its SHA-256 prefix, and what it was scored at."""

    name: str
    url: str
    sha256: str  # prefix of the file's SHA-256, as in the file name torchvision publishes
    top1: float
    top5: float
    num_params: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def meta(self) -> dict[str, Any]:
        """Class names, evaluation preprocessing and provenance that travel with the weights."""
        return {
            "class_names": imagenet_class_names(),
            "preprocessing": imagenet_preprocessing(),
            "min_input_size": 29,
            "recipe": "torchvision ImageNet weights (ported from the authors' Lua Torch models)",
            "source": self.url,
            "metrics": {"imagenet_top1": self.top1, "imagenet_top5": self.top5,
                        "evaluated_at": "resize 256 bilinear, centre crop 224"},
        }


_BASE = "https://download.pytorch.org/models/"
PRETRAINED: dict[str, PretrainedWeights] = {
    "densenet121": PretrainedWeights("densenet121", _BASE + "densenet121-a639ec97.pth",
                                     "a639ec97", 74.434, 91.972, 7_978_856),
    "densenet161": PretrainedWeights("densenet161", _BASE + "densenet161-8d451a50.pth",
                                     "8d451a50", 77.138, 93.560, 28_681_000),
    "densenet169": PretrainedWeights("densenet169", _BASE + "densenet169-b2777c0a.pth",
                                     "b2777c0a", 75.600, 92.806, 14_149_480),
    "densenet201": PretrainedWeights("densenet201", _BASE + "densenet201-c1103571.pth",
                                     "c1103571", 76.896, 93.370, 20_013_928),
}


class WeightsNotAvailableError(FileNotFoundError):
    """Published weights could not be fetched (offline, blocked, or the server failed)."""


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (shipped with torchvision, offline)."""
    from torchvision.models import DenseNet121_Weights

    return list(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_preprocessing() -> dict[str, Any]:
    """torchvision's evaluation transform for its DenseNet weights."""
    return {"resize": 256, "crop": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "interpolation": "bilinear"}


def default_preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """A fallback for weights that carry no preprocessing: the native size of the stem type."""
    if config.get("stem", "imagenet") == "imagenet":
        pre = imagenet_preprocessing()
    else:
        pre = {"resize": 32, "crop": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
               "interpolation": "bilinear"}
    c = int(config.get("in_channels", 3))
    if c != 3:
        pre["mean"], pre["std"] = [0.5] * c, [0.5] * c
    return pre


# What weights meta may say about the classifier's outputs beside their names: independent
# (sigmoid) probabilities, operating points per output, outputs never trained (TorchXRayVision).
HEAD_META = ("multi_label", "op_threshs", "untrained")


def complete_meta(config: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Complete ``meta`` with defaults; drop class names that no longer fit the classifier."""
    out: dict[str, Any] = {"class_names": None, "preprocessing": default_preprocessing(config)}
    out.update({k: v for k, v in (meta or {}).items() if v is not None})
    # A partial preprocessing entry keeps the defaults for the fields it leaves out.
    out["preprocessing"] = {**default_preprocessing(config), **out["preprocessing"]}
    names = out.get("class_names")
    if names is not None and len(names) != config["num_classes"]:
        out["class_names"] = None
        for key in HEAD_META:  # they described the outputs of a classifier that is gone
            out.pop(key, None)
    return out


# ---------------------------------------------------------------- download

def download_weights(name: str, progress: bool = True) -> Path:
    """The local path of ``name``'s published weights, downloaded into torch.hub's cache once.

    The file's SHA-256 must start with the published prefix, both on download and when it is
    found in the cache, so a truncated or replaced file is never loaded.
    """
    entry = pretrained_entry(name)
    return fetch_published(entry.url, entry.sha256, f"the {name} ImageNet weights", progress)


def fetch_published(url: str, sha256: str | None, what: str, progress: bool = True) -> Path:
    """The local path of the file at ``url``, downloaded into torch.hub's cache once.

    With ``sha256`` (a prefix of the file's SHA-256) the file is checked on download and each
    time it is found in the cache; without one it is not (the caller checks what it can).
    ``what`` names the file in messages ("the densenet121 ImageNet weights").
    """
    dst = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"Downloading {url} to {dst}", file=sys.stderr)
        try:  # torch.hub writes a temporary file and moves it into place only when complete
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256,
                                           progress=progress)
        except OSError as e:  # URLError, HTTPError, timeouts, refused connections
            raise WeightsNotAvailableError(
                f"could not download {what} from {url} ({e}). "
                f"Without internet, download that file on another machine and pass "
                f"weights=PATH (--weights PATH on the command line), or copy it to {dst}"
            ) from e
        except RuntimeError as e:
            if "hash" not in str(e):
                raise
            raise ValueError(f"the file downloaded from {url} failed its hash check "
                             f"({e}); nothing was saved. Try again later") from e
    digest = file_digest(dst, "sha256") if sha256 else ""
    if not digest.startswith(sha256 or ""):
        raise ValueError(
            f"the cached file {dst} has SHA-256 {digest[:16]}..., expected a prefix of "
            f"{sha256}: it is corrupt or not the published file. Delete it and retry"
        )
    return dst


def pretrained_entry(name: str) -> PretrainedWeights:
    """The registry entry for ``name``, or a ValueError naming the models that have weights."""
    key = name.strip().lower()
    if key not in PRETRAINED:
        raise ValueError(
            f"no published ImageNet weights for {name!r}; they exist for "
            f"{', '.join(PRETRAINED)}. Pass weights=PATH to load a local checkpoint instead"
        )
    return PRETRAINED[key]


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRETRAINED", "PretrainedWeights",
           "WeightsNotAvailableError", "complete_meta", "default_preprocessing",
           "download_weights", "fetch_published", "imagenet_class_names",
           "imagenet_preprocessing", "pretrained_entry"]


def native_input_size(model: Any) -> tuple[int, ...]:
    """(C, *sides) the model's weights expect, one side per spatial dimension: a volume
    model's recorded volume size, an image model's centre crop, else the model's own native
    size (its ``pretrained_cfg["input_size"]``: 96^3 for 3D ImageNet stems, 224 for 1D);
    :func:`~densenets.models.zoo.recorded_sides` says which record counts for which rank.
    """
    pre = complete_meta(model.config.to_dict(), getattr(model, "weights_meta", None))[
        "preprocessing"]
    dims = int(getattr(model.config, "spatial_dims", 2))
    sides = recorded_sides(pre, dims) or tuple(model.pretrained_cfg["input_size"])[1:]
    return (int(model.config.in_channels), *(int(s) for s in sides))
