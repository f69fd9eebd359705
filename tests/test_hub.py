"""The builders load through torch.hub from a local checkout, each one the model its name
promises: checked against the zoo's table and the published parameter counts, not against the
function the hub entries call."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from support import PUBLISHED_PARAMS

from densenets import DenseNet, FCDenseNet, FeatureExtractor, create_model, save
from densenets.models import zoo
from densenets.models.fcdensenet import FCDENSENET

REPO = str(Path(__file__).resolve().parents[1])
HELPERS = {"create_model", "load"}  # the entry points that are not one named model

# The CIFAR/SVHN entries: (growth rate, layers per block, bottleneck, compression, the paper's
# Table 2 parameter count in millions at 10 classes).
CIFAR = {
    "densenet_40_k12": (12, 12, False, 1.0, 1.0),
    "densenet_bc_100_k12": (12, 16, True, 0.5, 0.8),
    "densenet_bc_250_k24": (24, 41, True, 0.5, 15.3),
    "densenet_bc_190_k40": (40, 31, True, 0.5, 25.6),
}


def hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO) / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hub_model(entry: str, **kw):
    """The architecture only (meta device): no memory, no initialisation cost."""
    with torch.device("meta"):
        return torch.hub.load(REPO, entry, source="local", **kw)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_hub_entry_is_pinned_here():
    entries = set(hubconf().__all__) - HELPERS
    assert entries == set(zoo.IMAGENET) | set(CIFAR) | set(FCDENSENET) | {
        n for n in PUBLISHED_PARAMS if n.startswith("rdnet")}
    assert all(callable(getattr(hubconf(), n)) for n in entries | HELPERS)


@pytest.mark.parametrize("name", list(zoo.IMAGENET))
def test_imagenet_entries_match_the_zoo_table_and_the_published_counts(name):
    model = hub_model(name)
    assert isinstance(model, DenseNet)
    cfg = model.config
    assert {k: getattr(cfg, k) for k in zoo.IMAGENET[name]} == zoo.IMAGENET[name]
    assert cfg.stem == "imagenet" and cfg.num_classes == 1000
    if name in PUBLISHED_PARAMS:  # densenet264 has no published weights to count
        assert n_params(model) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("entry", list(CIFAR))
def test_cifar_entries_match_table_2(entry):
    k, n, bottleneck, compression, millions = CIFAR[entry]
    model = hub_model(entry, num_classes=10)
    cfg = model.config
    assert (cfg.growth_rate, cfg.block_config, cfg.bottleneck, cfg.compression, cfg.stem) == (
        k, (n, n, n), bottleneck, compression, "cifar")
    assert round(n_params(model) / 1e6, 1) == millions


@pytest.mark.parametrize("name", [n for n in PUBLISHED_PARAMS if n.startswith("rdnet")])
def test_rdnet_entries_have_timms_parameter_counts(name):
    assert n_params(hub_model(name)) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", list(FCDENSENET))
def test_fcdensenet_entries_are_the_papers_tiramisus_in_any_rank(name):
    model = hub_model(name)
    assert isinstance(model, FCDenseNet)
    assert {k: getattr(model.config, k) for k in FCDENSENET[name]} == FCDENSENET[name]
    assert (model.config.num_classes, model.config.spatial_dims) == (11, 2)  # CamVid's classes
    volume = hub_model(name, spatial_dims=3, in_channels=1, num_classes=2)
    assert volume.conv0.weight.shape[1:] == (1, 3, 3, 3)
    assert volume.classifier.weight.shape[:2] == (2, model.classifier.weight.shape[1])


def test_hub_passes_weights_classes_and_backbone_options(tmp_path):
    small = torch.hub.load(REPO, "densenet_bc_100_k12", source="local", num_classes=100)
    assert small.config.num_classes == 100 and small.classifier.out_features == 100
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
