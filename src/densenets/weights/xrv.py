"""TorchXRayVision's chest X-ray DenseNet-121s: its published weight sets and what its files mean.

TorchXRayVision (``xrv``) publishes one-channel DenseNet-121s with 18 outputs, one per chest
pathology in a fixed order; a set trained on data without some of them leaves those outputs
untrained and names them ``""``. Its files are whole pickled modules (read here by
:mod:`.unpickle`, which runs none of their code) in torchvision's key layout, so they load into
this library's DenseNet. What the file alone does not say, the weight set does:

- class names: the pathologies; an untrained output ``""`` at index i is named
  ``"(untrained i)"`` and listed in the meta's ``untrained`` (predict ranks only the others);
- ``multi_label``: each output is an independent probability (a sigmoid, not a softmax);
- ``op_threshs``: the set's operating points. TorchXRayVision's forward rescales each sigmoid
  output p with threshold t to p / 2t below t and 1 - (1 - p) / 2(1 - t) above, so t maps to
  0.5; an untrained output (no threshold, None here) gives 0.5. :func:`op_norm` is that rule;
- the preprocessing: 224 px, one channel, intensities [0, 1] mapped to [-1024, 1024] (mean
  0.5, std 1/2048 on the [0, 1] scale).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..digest import file_digest
from .pretrained import fetch_published
from .unpickle import PickledModule

PREFIX = "xrv:"
# The 18 outputs in TorchXRayVision's order (its datasets.default_pathologies).
PATHOLOGIES = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema",
               "Emphysema", "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening",
               "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
               "Lung Opacity", "Enlarged Cardiomediastinum")
# [0, 1] -> [-1024, 1024]: x' = (x - 0.5) / (1 / 2048) = 2048 x - 1024, as xrv.utils.normalize
# maps [0, 255] (or any maxval) there.
PREPROCESSING = {"resize": 224, "crop": 224, "mean": [0.5], "std": [1 / 2048],
                 "interpolation": "bilinear"}
_BASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_SUFFIX = "-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
_NAN = math.nan


@dataclass(frozen=True)
class XrvWeights:
    """One published weight set: its file, what it was trained on, its operating points."""

    name: str  # TorchXRayVision's name, e.g. "densenet121-res224-all"
    filename: str
    trained_on: str
    labels: str  # 18 characters, "1" where the output was trained
    op_threshs: tuple[float, ...]  # NaN for untrained outputs
    sha256: str | None = None  # the published file's SHA-256 where it is known

    @property
    def url(self) -> str:
        return _BASE + self.filename

    @property
    def pathologies(self) -> list[str]:
        """TorchXRayVision's label list for the set: ``""`` for untrained outputs."""
        return [p if bit == "1" else "" for p, bit in zip(PATHOLOGIES, self.labels, strict=True)]

    def meta(self) -> dict[str, Any]:
        """Class names, preprocessing, operating points and the set's name and recipe."""
        return {**xrv_meta(self.pathologies, self.op_threshs), "weights_set": self.name,
                "recipe": f"TorchXRayVision chest X-ray weights {self.name} "
                          f"(trained on {self.trained_on})"}


def _set(short: str, trained_on: str, labels: str, op: Sequence[float],
         filename: str | None = None, sha256: str | None = None) -> XrvWeights:
    return XrvWeights(f"densenet121-res224-{short}", filename or short + _SUFFIX, trained_on,
                      labels, tuple(op), sha256)


# TorchXRayVision 1.5's model_urls for its DenseNets (labels and op_threshs as published).
XRV_WEIGHTS: dict[str, XrvWeights] = {w.name: w for w in (
    _set("all", "NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, RSNA", "1" * 18,
         [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358,
          0.010060724, 0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857,
          0.01939503, 0.042889766, 0.053369623, 0.035975814, 0.20204692, 0.05015312],
         filename="nih-pc-chex-mimic_ch-google-openi-kaggle" + _SUFFIX,
         sha256="56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899"),
    _set("nih", "NIH ChestX-ray14", "1" * 14 + "0" * 4,
         [0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932,
          0.012037827, 0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467,
          0.037198864, 0.0004403434, _NAN, _NAN, _NAN, _NAN]),
    _set("pc", "PadChest", "1" * 14 + "0100",
         [0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257,
          0.0023071, 0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247,
          0.005658899, 0.0091741895, _NAN, 0.026507627, _NAN, _NAN]),
    _set("chex", "CheXpert", "110110011010001111",
         [0.1988969, 0.05710573, _NAN, 0.0531293, 0.1435217, _NAN, _NAN, 0.27212676,
          0.07749717, _NAN, 0.19712369, _NAN, _NAN, _NAN, 0.09932402, 0.09273402, 0.3270967,
          0.10888247]),
    _set("rsna", "RSNA Pneumonia Challenge", "000000001000000010",
         [_NAN] * 8 + [0.13486601] + [_NAN] * 7 + [0.13511065, _NAN],
         filename="kaggle" + _SUFFIX),
    _set("mimic_nb", "MIMIC-CXR (NegBio labels)", "110110011010001111",
         [0.08558747, 0.011884617, _NAN, 0.0040595434, 0.010733786, _NAN, _NAN, 0.118761964,
          0.022924708, _NAN, 0.06358637, _NAN, _NAN, _NAN, 0.022143636, 0.017476924,
          0.1258702, 0.014020768]),
    _set("mimic_ch", "MIMIC-CXR (CheXpert labels)", "110110011010001111",
         [0.09121389, 0.010573786, _NAN, 0.005023008, 0.003698257, _NAN, _NAN, 0.08001232,
          0.037242252, _NAN, 0.05006329, _NAN, _NAN, _NAN, 0.019866971, 0.03823637,
          0.11303808, 0.0069147074]),
)}


def is_xrv_name(weights: Any) -> bool:
    """Whether ``weights`` names a TorchXRayVision weight set (``"xrv:..."``)."""
    return isinstance(weights, str) and weights.strip().lower().startswith(PREFIX)


def xrv_entry(weights: str) -> XrvWeights:
    """The set ``"xrv:densenet121-res224-all"`` (or its short name, ``"xrv:all"``) names; a
    ValueError listing the sets otherwise."""
    key = weights.strip().lower().removeprefix(PREFIX)
    entry = XRV_WEIGHTS.get(key) or XRV_WEIGHTS.get(f"densenet121-res224-{key}")
    if entry is None:
        raise ValueError(f"no TorchXRayVision DenseNet weights named {weights!r}; they are "
                         f"{', '.join(PREFIX + n for n in XRV_WEIGHTS)}")
    return entry


def class_names(pathologies: Sequence[str]) -> list[str]:
    """Class names for TorchXRayVision's labels: an untrained output (``""``) at index i is
    ``"(untrained i)"``, so every output keeps a distinct name."""
    return [str(p) if p else f"(untrained {i})" for i, p in enumerate(pathologies)]


def _thresholds(op: Any) -> list[float | None]:
    """Operating points as JSON keeps them: floats, None where TorchXRayVision has NaN."""
    values = op.double().flatten().tolist() if torch.is_tensor(op) else list(op)
    return [None if v is None or math.isnan(float(v)) else float(v) for v in values]


def xrv_meta(pathologies: Sequence[str] | None, op_threshs: Any = None) -> dict[str, Any]:
    """The weights meta of a TorchXRayVision DenseNet with these labels and operating points."""
    meta: dict[str, Any] = {"preprocessing": dict(PREPROCESSING), "multi_label": True}
    if pathologies is not None:
        meta["class_names"] = class_names(pathologies)
        meta["untrained"] = [i for i, p in enumerate(pathologies) if not p]
    if op_threshs is not None:
        meta["op_threshs"] = _thresholds(op_threshs)
    return meta


def op_norm(probabilities: torch.Tensor, op_threshs: Sequence[float | None]) -> torch.Tensor:
    """TorchXRayVision's operating-point rescaling of sigmoid outputs [N, C]: each threshold t
    maps to 0.5, linearly on either side; an output without one (None) gives 0.5."""
    p = probabilities
    t = torch.tensor([_NAN if v is None else v for v in op_threshs], dtype=p.dtype,
                     device=p.device).expand_as(p)
    below = p / (t * 2)
    above = 1.0 - (1.0 - p) / ((1.0 - t) * 2)
    out = torch.where(p < t, below, above)
    return torch.where(torch.isnan(t), torch.full_like(p, 0.5), out)


def _same_thresholds(a: Sequence[float | None], b: Sequence[float]) -> bool:
    if len(a) != len(b):
        return False
    return all((x is None and math.isnan(y)) or (x is not None and not math.isnan(y)
                                                  and math.isclose(x, y, rel_tol=1e-6))
               for x, y in zip(a, b, strict=True))


def published_set(path: str | os.PathLike | None, op_threshs: Any = None) -> XrvWeights | None:
    """The published set a file is: by its file name (as published), else by its operating
    points (a state dict of a TorchXRayVision model loaded with that set's weights)."""
    name = Path(path).name if path else None
    for entry in XRV_WEIGHTS.values():
        if name == entry.filename:
            return entry
    if op_threshs is not None:
        op = _thresholds(op_threshs)
        for entry in XRV_WEIGHTS.values():
            if _same_thresholds(op, entry.op_threshs):
                return entry
    return None


def xrv_weights(obj: Any, path: str | os.PathLike | None = None) -> tuple[Any, dict[str, Any]]:
    """The state dict and weights meta a file read as ``obj`` holds.

    A pickled TorchXRayVision module (its class in ``torchxrayvision``) or a state dict with
    TorchXRayVision's ``op_threshs`` buffer gives its weights without that buffer and the meta
    of its set (recognised by file name or operating points; else the labels and operating
    points the file carries). Any other pickled module gives its state dict and no meta;
    anything else comes back as it is.
    """
    if isinstance(obj, PickledModule):
        sd, attrs = dict(obj.state_dict), obj.attributes
        if not obj.class_name.startswith("torchxrayvision."):
            return sd, {}
    elif isinstance(obj, Mapping) and torch.is_tensor(obj.get("op_threshs")) \
            and "classifier.weight" in obj:
        sd, attrs = dict(obj), {}
    else:
        return obj, {}
    op = sd.pop("op_threshs", None)
    if op is None:
        op = attrs.get("op_threshs")
    outputs = int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else None
    entry = published_set(path, op)
    if entry is not None and outputs == len(PATHOLOGIES):
        return sd, entry.meta()
    labels = attrs.get("pathologies") or attrs.get("targets")
    if labels is None and outputs == len(PATHOLOGIES):
        labels = PATHOLOGIES
    if labels is not None and len(labels) != outputs:
        raise ValueError(f"{path}: {len(labels)} pathologies for {outputs} outputs")
    if op is not None and len(_thresholds(op)) != outputs:
        raise ValueError(f"{path}: {len(_thresholds(op))} op_threshs for {outputs} outputs")
    return sd, {**xrv_meta(labels, op), "recipe": "TorchXRayVision chest X-ray weights"}


def download_xrv(weights: str, progress: bool = True) -> tuple[Path, XrvWeights, str]:
    """The cached file of the set ``weights`` names (downloaded into torch.hub's cache once),
    the set, and the file's SHA-256.

    A set whose published SHA-256 is known is checked against it on download and on every
    use. For the others the digest of the file first cached is written beside it (``.sha256``)
    and every later use must match it; that digest travels in the weights meta. Either way the
    file is then read without running code and must hold a DenseNet-121 with one channel and
    18 outputs.
    """
    entry = xrv_entry(weights)
    path = fetch_published(entry.url, entry.sha256,
                           f"the TorchXRayVision {entry.name} weights", progress)
    digest = file_digest(path, "sha256")
    if entry.sha256 is None:
        pin = path.with_name(path.name + ".sha256")
        if not pin.exists():
            pin.write_text(digest + "\n")
        elif pin.read_text().strip() != digest:
            raise ValueError(f"the cached file {path} has SHA-256 {digest[:16]}..., not the "
                             f"{pin.read_text().strip()[:16]}... it had when first cached: it "
                             "changed since. Delete both files and retry")
    return path, entry, digest


__all__ = ["PATHOLOGIES", "PREFIX", "PREPROCESSING", "XRV_WEIGHTS", "XrvWeights", "class_names",
           "download_xrv", "is_xrv_name", "op_norm", "published_set", "xrv_entry", "xrv_meta",
           "xrv_weights"]
