"""The zoo: exact parameter counts, torchvision's key layout, name patterns and their errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from support import PUBLISHED_PARAMS

from densenets import create_model, densenet121, densenet264, list_models
from densenets.analysis.paper import TABLE2_ROWS, WIDE_SHALLOW_ROWS
from densenets.analysis.summary import count_params

TORCHVISION_PARAMS = {n: PUBLISHED_PARAMS[n]
                      for n in ("densenet121", "densenet161", "densenet169", "densenet201")}


def meta_model(name: str, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_imagenet_params_and_keys_match_torchvision(name):
    ours = meta_model(name)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)()
    assert count_params(ours) == TORCHVISION_PARAMS[name] == count_params(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_densenet264_follows_table1():
    model = meta_model("densenet264")
    assert model.config.block_config == (6, 12, 64, 48)
    assert model.config.growth_rate == 32 and model.num_features == 2688


@pytest.mark.parametrize("name, params_m", [(r[0], r[1]) for r in TABLE2_ROWS + WIDE_SHALLOW_ROWS])
def test_table2_params_to_printed_precision(name, params_m):
    assert round(count_params(meta_model(name)) / 1e6, 1) == params_m


@pytest.mark.parametrize(
    "name, blocks, stem_channels, bottleneck, compression",
    [
        ("densenet-40-k12", (12, 12, 12), 16, False, 1.0),
        ("densenet-100-k24", (32, 32, 32), 16, False, 1.0),
        ("densenet-bc-100-k12", (16, 16, 16), 24, True, 0.5),
        ("densenet-bc-190-k40", (31, 31, 31), 80, True, 0.5),
        ("densenet-b-52-k8", (8, 8, 8), 16, True, 1.0),
        ("densenet-c-25-k6", (7, 7, 7), 16, False, 0.5),
    ],
)
def test_cifar_depth_formula(name, blocks, stem_channels, bottleneck, compression):
    cfg = meta_model(name).config
    assert cfg.block_config == blocks
    assert cfg.num_init_features == stem_channels
    assert (cfg.bottleneck, cfg.compression, cfg.stem, cfg.num_classes) == (
        bottleneck, compression, "cifar", 10)


def test_depth_counts_conv_and_fc_layers():
    """L = number of conv + FC layers, as the paper counts depth."""
    for name, depth in [("densenet-40-k12", 40), ("densenet-bc-250-k24", 250),
                        ("densenet-c-13-k4", 13)]:
        model = meta_model(name)
        n = sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in model.modules())
        assert n == depth


def test_overrides_and_builders():
    m = create_model("densenet-bc-100-k12", num_classes=100, growth_rate=24)
    assert m.config.num_classes == 100 and m.config.growth_rate == 24
    assert m.config.num_init_features == 48  # the -BC stem follows 2k
    assert densenet121(num_classes=3).classifier.out_features == 3
    assert densenet264(in_channels=1).config.in_channels == 1
    assert "densenet121" in list_models() and "densenet-bc-190-k40" in list_models()


@pytest.mark.parametrize("name, near", [("densenet-bc-101-k12", "100 and 106"),
                                        ("densenet-41-k12", "40 and 43"),
                                        ("densenet-bc-5-k12", "10")])
def test_invalid_depth_suggests_valid_ones(name, near):
    with pytest.raises(ValueError, match=f"Valid depths near it: {near}"):
        create_model(name)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean densenet121"):
        create_model("densenet12")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_the_family_registry_answers_for_every_name_model_and_config():
    from densenets import RDNet
    from densenets.models.registry import (
        FAMILIES,
        family_for,
        family_for_config,
        family_of,
        model_from_config,
    )

    assert list_models() == [n for f in FAMILIES.values() for n in f.names()]
    for name in ("densenet121", "densenet-bc-100-k12", "rdnet_tiny"):
        family = family_for(name)
        with torch.device("meta"):
            model = create_model(name)
        assert family_of(model) is family and isinstance(model, family.model)
        config = model.config.to_dict()
        assert family_for_config(config) is family
        with torch.device("meta"):
            assert model_from_config(config).config == model.config
    assert family_for("rdnet_small").supports_drop_path
    assert not family_for("densenet121").supports_drop_path
    assert family_of(torch.nn.Linear(1, 1)) is None
    assert family_for_config({"growth_rate": 12}).model is not RDNet
    with pytest.raises(ValueError, match="fits no model family"):
        family_for_config({"growth_rate": 12, "patch_size": 4})
