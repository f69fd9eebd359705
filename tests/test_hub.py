"""Issue 3, item 5: the builders load through torch.hub from a local checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from densenets import DenseNet, FeatureExtractor, create_model, save

REPO = str(Path(__file__).resolve().parents[1])


def test_hub_builds_the_zoo():
    model = torch.hub.load(REPO, "densenet121", source="local")
    assert isinstance(model, DenseNet)
    assert sum(p.numel() for p in model.parameters()) == 7_978_856
    for name in ("densenet161", "densenet169", "densenet201"):
        assert torch.hub.load(REPO, name, source="local").config.block_config == \
            create_model(name).config.block_config
    small = torch.hub.load(REPO, "densenet_bc_100_k12", source="local", num_classes=100)
    assert small.config.block_config == (16, 16, 16) and small.config.num_classes == 100



def test_hub_lists_the_whole_family():
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    family = {"densenet264d", "densenetblur121d", "rdnet_tiny", "rdnet_small", "rdnet_base",
              "rdnet_large"}
    assert family <= set(hubconf.__all__) and all(callable(getattr(hubconf, n)) for n in family)
    expected = {"densenetblur121d": 7_998_088, "rdnet_tiny": 23_863_008}
    with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
        for name, params in expected.items():
            model = torch.hub.load(REPO, name, source="local")
            assert sum(p.numel() for p in model.parameters()) == params, name


def test_hub_passes_weights_and_backbone_options(tmp_path):
    src = create_model("densenet-bc-16-k4", num_classes=3)
    path = save(src, tmp_path / "w.safetensors")
    model = torch.hub.load(REPO, "create_model", "densenet-bc-16-k4", source="local",
                           weights=str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    loaded = torch.hub.load(REPO, "load", str(path), source="local")
    assert loaded.config == src.config
    backbone = torch.hub.load(REPO, "densenet121", source="local", features_only=True)
    assert isinstance(backbone, FeatureExtractor)
    assert backbone.feature_info.reduction() == [4, 4, 8, 16, 32]
