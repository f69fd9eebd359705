"""2D ImageNet weights in a 3D DenseNet: I3D's inflation, and what it makes exact.

On a volume constant along depth, an inflated convolution gives the 2D convolution of a slice
times the share of its depth taps inside the volume (so exactly the 2D output away from the
depth padding). Norms in eval mode and ReLU act per voxel and channel, and a pool whose depth
window holds equal slices gives the 2D pool, so the whole 3D network equals the 2D one on every
slice whose depth receptive field stays inside the volume: the test predicts those slices from
the kernels, strides and paddings alone and checks equality there, and difference next to them.

The ImageNet weights are a stand-in saved in torch.hub's cache (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch
import torchvision
from support import rel, vary_bn
from torch import nn

import densenets
from densenets import DenseBlock, KeyMismatchError, create_model
from densenets.weights.inflate import inflate_kernel
from densenets.weights.pretrained import PRETRAINED

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """torch.hub's cache holding a densenet121 in torchvision's layout, and its SHA-256 prefix."""
    root = tmp_path_factory.mktemp("hub")
    # float64, so that nothing but the rule itself separates the 2D and 3D results below
    tv = vary_bn(torchvision.models.densenet121(weights=None)).double()
    raw = root / "raw.pth"
    torch.save(tv.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    (root / "checkpoints").mkdir()
    raw.rename(root / "checkpoints" / f"densenet121-{digest}.pth")
    return root, digest


def publish(hosted, monkeypatch: pytest.MonkeyPatch) -> None:
    """weights="imagenet" finds the stand-in in the cache and checks its hash."""
    root, digest = hosted
    monkeypatch.setattr(torch.hub, "_hub_dir", str(root))
    entry = PRETRAINED["densenet121"]
    url = entry.url.rsplit("/", 1)[0] + f"/densenet121-{digest}.pth"
    monkeypatch.setitem(PRETRAINED, "densenet121", dataclasses.replace(entry, url=url,
                                                                       sha256=digest))


@pytest.fixture
def imagenet(hosted, monkeypatch):
    publish(hosted, monkeypatch)


@pytest.fixture(scope="module")
def pair(hosted):
    """The 2D model and the inflated 3D one, one input channel, eval mode, built in float64
    (so the kernels are divided by their depth in float64 too), and the 3D one's notes."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.MonkeyPatch.context() as mp:
            publish(hosted, mp)
            with pytest.warns(UserWarning, match="adapted features.conv0"):
                flat = create_model("densenet121", weights="imagenet", in_channels=1)
            with pytest.warns(UserWarning) as notes:
                deep = create_model("densenet121", spatial_dims=3, weights="imagenet",
                                    in_channels=1)
    finally:
        torch.set_default_dtype(before)
    assert deep.features.conv0.weight.dtype == torch.float64
    return flat.eval(), deep.eval(), [str(n.message) for n in notes]


def test_the_i3d_rule():
    w = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w3 = inflate_kernel(w)
    assert w3.shape == (4, 3, 5, 5, 5)
    for j in range(5):
        assert torch.equal(w3[:, :, j], w / 5)
    with pytest.raises(ValueError, match="square 2D kernels"):
        inflate_kernel(torch.randn(4, 3, 3, 5))


def test_create_model_inflates_and_says_so(pair):
    flat, deep, notes = pair
    assert deep.config.spatial_dims == 3 and deep.config.in_channels == 1
    assert deep.features.conv0.weight.shape == (64, 1, 7, 7, 7)
    assert any("inflated the 2D weights" in n and "I3D" in n for n in notes), notes
    assert any("adapted features.conv0 from 3 to 1" in n for n in notes), notes
    two, three = flat.state_dict(), deep.state_dict()
    assert set(two) == set(three)
    for k, v in two.items():  # kernels: the 2D one over each depth slice; the rest copied
        w = three[k]
        assert torch.equal(w, v) if v.dim() != 4 else \
            rel(w.sum(2), v) < 1e-14 and torch.equal(w[:, :, 0], w[:, :, -1])


def taps_inside(t: int, conv: nn.Module, depth: int) -> int:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return sum(0 <= t * s - p + j < depth for j in range(k))


def test_each_inflated_convolution_is_the_2d_one_on_a_depth_constant_volume(pair):
    flat, deep, _ = pair
    convs2 = {n: m for n, m in flat.named_modules() if isinstance(m, nn.Conv2d)}
    convs3 = {n: m for n, m in deep.named_modules() if isinstance(m, nn.Conv3d)}
    assert set(convs2) == set(convs3) and len(convs2) == 120
    g = torch.Generator().manual_seed(0)
    depth = 9
    for name, c2 in convs2.items():
        x = torch.randn(1, c2.in_channels, 9, 9, generator=g, dtype=torch.float64)
        y2 = c2(x)
        y3 = convs3[name](x.unsqueeze(2).expand(-1, -1, depth, -1, -1))
        k = c2.kernel_size[0]
        for t in range(y3.shape[2]):
            inside = taps_inside(t, convs3[name], depth)
            # exact at every slice: the 2D output times the share of depth taps inside
            assert rel(y3[:, :, t], y2 * (inside / k)) < 1e-12, (name, t)
        assert any(taps_inside(t, convs3[name], depth) == k for t in range(y3.shape[2]))


def valid_after(module: nn.Module, lo: int, hi: int) -> tuple[int, int]:
    """The depth slices [lo, hi] whose receptive field lies in the input's valid slices, after
    ``module`` (by its kernels, strides and paddings along depth only)."""
    if isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
        k, s, p = (v if isinstance(v, int) else v[0]
                   for v in (module.kernel_size, module.stride, module.padding))
        return math.ceil((lo + p) / s), (hi + p - k + 1) // s
    if isinstance(module, DenseBlock):  # a layer's input holds every earlier map
        for layer in module.values():
            lo, hi = max(lo, valid_after(layer, lo, hi)[0]), min(hi, valid_after(layer, lo, hi)[1])
        return lo, hi
    for child in module.children():  # in their order of use: norm, relu, conv, ..., pool
        lo, hi = valid_after(child, lo, hi)
    return lo, hi


def test_the_3d_network_is_the_2d_one_where_depth_padding_cannot_reach(pair):
    flat, deep, _ = pair
    stages = ["pool0", "denseblock1", "transition1"]
    got: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    for model in (flat, deep):
        for s in stages:
            getattr(model.features, s).register_forward_hook(
                lambda m, i, o, s=s: got[s].append(o))
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    depth = 80
    with torch.no_grad():
        flat(x)
        deep(x.unsqueeze(2).expand(-1, -1, depth, -1, -1))
    lo, hi = 0, depth - 1
    done = []
    for name, module in deep.features.named_children():
        lo, hi = valid_after(module, lo, hi)
        if name not in stages:
            continue
        two, three = got[name]
        assert lo <= hi, (name, lo, hi)  # the prediction leaves slices to compare
        for t in range(three.shape[2]):
            err = rel(three[:, :, t], two)
            if lo <= t <= hi:  # float64 rounding only (about 1e-15)
                assert err < 1e-12, (name, t, err)
            elif t in (lo - 1, hi + 1):  # the prediction is tight: next to it, padding shows
                # (at a block's output only in the last layers' maps, hence small)
                assert err > 1e-9, (name, t, err)
        done.append((name, lo, hi))
    assert done == [("pool0", 2, 18), ("denseblock1", 8, 12), ("transition1", 4, 5)]


def test_more_input_channels_and_fresh_classes(imagenet):
    with pytest.warns(UserWarning) as notes:
        model = create_model("densenet121", spatial_dims=3, weights="imagenet", in_channels=4,
                             num_classes=2)
    said = " ".join(str(n.message) for n in notes)
    assert "from 3 to 4 input channels" in said and "inflated" in said
    assert "classifier not loaded" in said
    assert model.features.conv0.weight.shape == (64, 4, 7, 7, 7)
    assert model.num_classes == 2


def test_a_2d_file_inflates_through_load_and_other_ranks_are_refused(imagenet, tmp_path):
    small = densenets.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                               num_classes=3)
    path = densenets.save(small, tmp_path / "small.pt")
    with pytest.warns(UserWarning, match="inflated"):
        deep = densenets.load(path, spatial_dims=3)
    assert deep.config.spatial_dims == 3 and deep.config.block_config == (2, 2)
    with pytest.raises(KeyMismatchError, match="only 2D weights inflate") as e:
        create_model("densenet121", spatial_dims=1, weights="imagenet")
    assert "\n" not in str(e.value)
    path3 = densenets.save(deep, tmp_path / "deep.pt")
    with pytest.raises(KeyMismatchError, match="the weights are 3D and the model 2D"):
        densenets.load(path3, spatial_dims=2)
