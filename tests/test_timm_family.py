"""Issue 13: the DenseNet family under timm's names, tensor for tensor and output for output.

timm builds each model with random weights; every BN statistic is randomised too, so a tensor
loaded into the wrong place (or a stem that pools differently) changes the output. State dicts
go through the same key map as any checkpoint file; one goes through a file without a name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from support import PUBLISHED_PARAMS, write_hub_cache
from torch import nn

timm = pytest.importorskip("timm")

from huggingface_hub import constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from densenets import create_model, load  # noqa: E402
from densenets.models.layers import BlurPool2d  # noqa: E402
from densenets.weights.files import load_into  # noqa: E402
from densenets.weights.keymap import remap_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# name -> timm's parameter count (timm 1.0's model registry, 1000 classes)
FAMILY = {name: n for name, n in PUBLISHED_PARAMS.items() if name.startswith("densenet")}


def randomise(state: dict[str, torch.Tensor], seed: int) -> None:
    """Every tensor random: He-scaled weights, BN scales, shifts and statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in state.items():
            if not t.is_floating_point():
                t.zero_()
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith(("running_var", "weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build models without their weight initialisation (seconds for 72M parameters, and
    overwritten at once here): torch.nn.init's fills return their tensor untouched."""
    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "constant_", "ones_",
             "zeros_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def timm_model(name: str, seed: int = 0) -> nn.Module:
    """timm's model with every tensor random."""
    with no_init():
        model = timm.create_model(name, pretrained=False)
    randomise(model.state_dict(), seed)
    return model.eval()


@pytest.mark.parametrize("name", list(FAMILY))
def test_timm_state_dict_loads_with_equal_outputs(name):
    ref = timm_model(name)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == FAMILY[name]
    with no_init():
        ours = create_model(name)
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert load_into(ours, remap_state_dict(ref.state_dict())) == []  # nothing adapted
    ours.eval()
    x = torch.randn(1, 3, 40, 32)  # not square: a swapped H and W would show
    with torch.no_grad():  # the same operations in the same order: bit for bit
        assert torch.equal(ours.forward_features(x), ref.forward_features(x))
        assert torch.equal(ours(x), ref(x))


def test_deep_stem_checkpoint_loads_by_file_and_by_pretrained(tmp_path, monkeypatch):
    ref = timm_model("densenetblur121d", seed=1)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    # pretrained=True means timm's Hub weights, read here from a cache written offline
    write_hub_cache(tmp_path / "hub", "timm/densenetblur121d.ra_in1k",
                    {"model.safetensors": path})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    x = torch.randn(1, 3, 32, 32)
    for ours in (load(path), create_model("densenetblur121d", weights=path),
                 create_model("densenetblur121d", pretrained=True)):
        ours.eval()
        assert ours.weights_meta["model_name"] == "densenetblur121d"
        assert ours.config.deep_stem and ours.config.blur_pool
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x))


def test_deep_stem_layout_and_timm_taps():
    model = create_model("densenetblur121d")
    names = [n for n, _ in model.features.named_children()][:10]
    assert names == ["conv0", "norm0", "relu0", "conv1", "norm1", "relu1", "conv2", "norm2",
                     "relu2", "pool0"]
    assert [m.stride for m in (model.features.conv0, model.features.conv1)] == [(2, 2), (1, 1)]
    assert model.features.conv0.out_channels == 32 and model.features.conv2.out_channels == 64
    with no_init():
        ref = timm.create_model("densenetblur121d", pretrained=False)
    assert [f["num_chs"] for f in model.feature_info] == [f["num_chs"] for f in ref.feature_info]
    assert [f["reduction"] for f in model.feature_info] == \
        [f["reduction"] for f in ref.feature_info]
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    assert model.pretrained_cfg["hf_hub_id"] == "timm/densenetblur121d.ra_in1k"
    with no_init():
        assert create_model("densenet264d").features.conv2.out_channels == 96  # 2k, k = 48


def test_blur_pool_matches_timm_and_is_no_weight():
    from timm.layers import BlurPool2d as TimmBlur

    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    ours, ref = BlurPool2d(5).double(), TimmBlur(5, filt_size=3, stride=2).double()
    assert torch.equal(ours(x), ref(x))
    assert ours.state_dict() == {}  # the filter is fixed, so checkpoints never carry it
    # A one-pixel shift moves a blurred-then-sampled map less than a strided max pool's.
    img = torch.zeros(1, 1, 16, 16)
    img[..., ::2] = 1.0  # a stripe pattern at the sampling frequency
    shifted = torch.roll(img, 1, dims=-1)
    blur = BlurPool2d(1)
    assert (blur(img) - blur(shifted)).abs().max() < 0.6
    pool = nn.MaxPool2d(1, 2)
    assert (pool(img) - pool(shifted)).abs().max() == 1.0


def test_deep_stem_options_are_checked():
    with pytest.raises(ValueError, match="use stem='imagenet'"):
        create_model("densenet-bc-100-k12", deep_stem=True)
