"""Issue 3, item 6: DenseNet as a backbone (features_only, forward_features/head, classifier)."""

from __future__ import annotations

import pytest
import torch
from support import vary_bn

from densenets import FeatureExtractor, create_model, save

pytestmark = pytest.mark.usefixtures("one_thread_module")


def block_outputs(model, x) -> dict[str, torch.Tensor]:
    """The full model's stem and dense block outputs, caught with hooks."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.clone()))
             for n, m in model.features.named_children()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name, size", [("densenet121", 64), ("densenet-bc-16-k4", 32)])
def test_features_only_maps_match_the_full_model(name, size):
    torch.manual_seed(0)
    full = create_model(name).eval()
    backbone = FeatureExtractor(full).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = backbone(x)
        final = full.forward_features(x)
    seen = block_outputs(full, x)
    stem = "pool0" if full.config.stem == "imagenet" else "conv0"
    blocks = [f"denseblock{i}" for i in range(1, len(full.config.block_config) + 1)]
    assert len(maps) == len(backbone.feature_info) == len(blocks) + 1
    assert torch.equal(maps[0], seen[stem])
    for m, b in zip(maps[1:-1], blocks[:-1], strict=True):
        assert torch.equal(m, seen[b])
    assert torch.equal(maps[-1], final)  # after the final BN-ReLU, as forward_features
    for m, c, r in zip(maps, backbone.feature_info.channels(),
                       backbone.feature_info.reduction(), strict=True):
        assert m.shape == (2, c, size // r, size // r)
    assert "classifier" not in dict(backbone.named_modules())


def test_create_model_features_only_with_weights_and_out_indices(tmp_path):
    src = create_model("densenet-bc-16-k4").eval()
    vary_bn(src)
    path = save(src, tmp_path / "w.safetensors")
    backbone = create_model("densenet-bc-16-k4", weights=path, features_only=True,
                            out_indices=(1, -2)).eval()
    assert backbone.out_indices == (1, 2)
    assert backbone.feature_info.channels() == [src.feature_info[1]["num_chs"],
                                                src.feature_info[2]["num_chs"]]
    assert "transition2" not in dict(backbone.features.named_children())  # stops early
    x = torch.randn(1, 3, 32, 32)
    seen = block_outputs(src, x)
    a, b = backbone(x)
    assert torch.equal(a, seen["denseblock1"]) and torch.equal(b, seen["denseblock2"])
    assert set(backbone.state_dict()) <= set(src.state_dict())


def test_bad_out_indices_and_small_inputs_are_explained():
    with pytest.raises(ValueError, match=r"0\.\.4 \(0 = stem"):
        create_model("densenet121", features_only=True, out_indices=(5,))
    backbone = create_model("densenet121", features_only=True)
    with pytest.raises(ValueError, match="minimum is 29x29"):
        backbone(torch.randn(1, 3, 20, 20))


def test_forward_features_head_and_reset_classifier():
    model = create_model("densenet-bc-16-k4").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(model.forward_head(feats), model(x))
        model.reset_classifier(4)
        assert model(x).shape == (2, 4)
        assert torch.equal(model.forward_head(feats, pre_logits=True), pooled)
