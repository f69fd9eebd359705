"""torch.hub entry points: ``torch.hub.load(REPO, "densenet121", weights="imagenet")``.

Works from a GitHub checkout or a local one (``source="local"``) without installing the
package: the ``src`` folder is put on the import path first.
"""

import os
import sys

dependencies = ["torch", "torchvision"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from densenets import load  # noqa: E402
from densenets.factory import builder as _entry  # noqa: E402
from densenets.factory import create_model  # noqa: E402

densenet121 = _entry("densenet121")
densenet161 = _entry("densenet161")
densenet169 = _entry("densenet169")
densenet201 = _entry("densenet201")
densenet264 = _entry("densenet264")
densenet_bc_100_k12 = _entry("densenet-bc-100-k12")
densenet_bc_250_k24 = _entry("densenet-bc-250-k24")
densenet_bc_190_k40 = _entry("densenet-bc-190-k40")
densenet_40_k12 = _entry("densenet-40-k12")
densenet264d = _entry("densenet264d")
densenetblur121d = _entry("densenetblur121d")
rdnet_tiny = _entry("rdnet_tiny")
rdnet_small = _entry("rdnet_small")
rdnet_base = _entry("rdnet_base")
rdnet_large = _entry("rdnet_large")
fcdensenet56 = _entry("fcdensenet56")
fcdensenet67 = _entry("fcdensenet67")
fcdensenet103 = _entry("fcdensenet103")

__all__ = ["create_model", "load", "densenet121", "densenet161", "densenet169", "densenet201",
           "densenet264", "densenet_bc_100_k12", "densenet_bc_250_k24", "densenet_bc_190_k40",
           "densenet_40_k12", "densenet264d", "densenetblur121d", "rdnet_tiny", "rdnet_small",
           "rdnet_base", "rdnet_large", "fcdensenet56", "fcdensenet67", "fcdensenet103"]
