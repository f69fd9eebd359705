"""The paper's published figures, as data: Tables 1-3 and RDNet's published sizes.

Everything here is quoted, not computed; :mod:`densenets.analysis.summary` computes ours beside it.
torchvision's parameter counts and accuracies for its weights live with those weights
(:data:`densenets.weights.pretrained.PRETRAINED`), as its ``Weights`` records keep them.
"""

from __future__ import annotations

from ..weights.pretrained import PRETRAINED

# Table 1: ImageNet architectures (k = 32, theta = 0.5; 161 has k = 48 and a 96-channel stem).
# Table 3: single-crop / 10-crop validation error (%): top-1 1-crop, 10-crop, top-5 1-crop,
# 10-crop (DenseNet-161 is not in the paper).
TABLE3 = {
    "densenet121": (25.02, 23.61, 7.71, 6.66),
    "densenet161": (None, None, None, None),
    "densenet169": (23.80, 22.08, 6.85, 5.92),
    "densenet201": (22.58, 21.46, 6.34, 5.54),
    "densenet264": (22.15, 20.80, 6.12, 5.29),
}


def _torchvision(name: str) -> tuple[int | None, float | None, float | None]:
    """torchvision's parameter count and its evaluation of its weights (resize 256 bilinear,
    centre crop 224, accuracy %), from the weights' own record."""
    tv = PRETRAINED.get(name)
    return (tv.num_params, tv.top1, tv.top5) if tv else (None, None, None)


# name, params (torchvision build, 1000 classes), top-1 err 1-crop, 10-crop,
# top-5 err 1-crop, 10-crop, torchvision top-1 acc, top-5 acc
IMAGENET_ROWS = [(name, _torchvision(name)[0], *errors, *_torchvision(name)[1:])
                 for name, errors in TABLE3.items()]

# DenseNet-121 at 224x224: 2.83-2.87 G multiply-adds in the literature.
DENSENET121_GMACS = (2.83, 2.87)

# Table 2: (zoo name, printed params in millions, test error % for C10, C10+, C100, C100+, SVHN).
TABLE2_ROWS = [
    ("densenet-40-k12", 1.0, 7.00, 5.24, 27.55, 24.42, 1.79),
    ("densenet-100-k12", 7.0, 5.77, 4.10, 23.79, 20.20, 1.67),
    ("densenet-100-k24", 27.2, 5.83, 3.74, 23.42, 19.25, 1.59),
    ("densenet-bc-100-k12", 0.8, 5.92, 4.51, 24.15, 22.27, 1.76),
    ("densenet-bc-250-k24", 15.3, 5.19, 3.62, 19.64, 17.60, 1.74),
    ("densenet-bc-190-k40", 25.6, None, 3.46, None, 17.18, None),
]
TABLE2_COLUMNS = ("C10", "C10+", "C100", "C100+", "SVHN")

# Wide-shallow -BC nets the authors later recommended: (name, params M, C10+, C100+).
WIDE_SHALLOW_ROWS = [
    ("densenet-bc-40-k36", 1.5, 4.58, 22.30),
    ("densenet-bc-40-k48", 2.7, 3.99, 20.29),
    ("densenet-bc-40-k60", 4.3, 4.01, 19.99),
]


def paper_error(model: str, dataset: str) -> float | None:
    """The paper's test error (%) of a Table 2 model on C10, C10+, C100, C100+ or SVHN."""
    for row in TABLE2_ROWS:
        if row[0] == model and dataset in TABLE2_COLUMNS:
            return row[2 + TABLE2_COLUMNS.index(dataset)]
    for name, _, c10p, c100p in WIDE_SHALLOW_ROWS:
        if name == model:
            return {"C10+": c10p, "C100+": c100p}.get(dataset)
    return None

# RDNet ("DenseNets Reloaded", ECCV 2024), ImageNet-1k, as the authors publish each size:
# (zoo name, params M, GMACs, input side, top-1 acc %). The large model fine-tuned at 384 px
# (the same architecture and parameters) reaches 85.8% at 101.9 GMACs.
RDNET_ROWS = [
    ("rdnet_tiny", 24, 5.0, 224, 82.8),
    ("rdnet_small", 50, 8.7, 224, 83.7),
    ("rdnet_base", 87, 15.4, 224, 84.4),
    ("rdnet_large", 186, 34.7, 224, 84.8),
]
RDNET_LARGE_384_TOP1 = 85.8
