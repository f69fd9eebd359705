"""FC-DenseNet (the Tiramisu): the paper's configurations and widths, every input size the pools
accept, the memory-efficient mode against the plain model in float64 (2D and 3D), memory linear
in depth, and the model contract (zoo, config round trip, checkpoints, summary, export)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from support import rel, run_cli, saved_bytes
from torch import nn

import densenets
from densenets import create_model
from densenets.analysis.summary import summary
from densenets.models.fcdensenet import FCDENSENET, PAPER_PARAMS_M, FCDenseNet
from densenets.models.registry import model_from_config

TOL = 1e-10
TINY = dict(down_blocks=(2, 3), bottleneck_layers=2, growth_rate=4, num_init_features=6,
            num_classes=3)


def expected_params(c: dict, classes: int = 11, in_channels: int = 3, init: int = 48) -> int:
    """The paper's pieces counted by hand: BN (2 per channel) and 3x3 conv (no bias) per dense
    layer, BN + 1x1 conv per transition down, 3x3 transposed conv with bias per transition up,
    the first 3x3 conv (no bias) and the final 1x1 conv with bias."""
    k = c["growth_rate"]

    def block(width: int, layers: int) -> int:
        return sum(2 * (width + i * k) + 9 * (width + i * k) * k for i in range(layers))

    total, width, skips = 9 * in_channels * init, init, []
    for layers in c["down_blocks"]:
        total += block(width, layers)
        width += layers * k
        skips.append(width)
        total += 2 * width + width * width
    total += block(width, c["bottleneck_layers"])
    new = c["bottleneck_layers"] * k
    for layers, skip in zip(c["up_blocks"], reversed(skips), strict=True):
        total += 9 * new * new + new + block(new + skip, layers)
        width, new = new + skip + layers * k, layers * k
    return total + width * classes + classes


@pytest.mark.parametrize("name", list(FCDENSENET))
def test_parameter_counts_of_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(FCDENSENET[name])
    # The paper's figures are what its Lasagne code counts: every convolution with a bias and
    # BN's running mean and inverse std as parameters too (docs/segmentation.md).
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    lasagne = n + sum(m.out_channels for m in convs if m.bias is None) + sum(
        2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    paper = {"fcdensenet56": 1.4}.get(name, PAPER_PARAMS_M[name])  # 1.5 in the paper's text
    assert round(lasagne / 1e6, 1) == paper


def test_widths_of_table_2():
    """The m column of the paper's Table 2 for FC-DenseNet103 (its 578 is 464 + 7 * 16 = 576)."""
    with torch.device("meta"):
        model = create_model("fcdensenet103")
    rows = {r.name: r.output_shape[1] for r in summary(model, (1, 3, 224, 224)).rows
            if r.depth == 0}
    assert [rows[f"transition_down{i}"] for i in range(1, 6)] == [112, 192, 304, 464, 656]
    assert rows["bottleneck"] == 896
    assert [rows[f"denseblock_up{i}"] for i in range(1, 6)] == [1088, 816, 576, 384, 256]
    assert rows["classifier"] == 11


@pytest.mark.parametrize("dims,sides", [(1, (13,)), (2, (4, 4)), (2, (13, 11)), (2, (5, 32)),
                                        (3, (9, 4, 7))])
def test_every_side_from_the_minimum_up_comes_back_at_its_size(dims, sides):
    model = FCDenseNet(**TINY, spatial_dims=dims).eval()
    assert model.min_input_size == 4
    with torch.no_grad():
        y = model(torch.randn(2, 3, *sides))
    assert y.shape == (2, 3, *sides)


def test_too_small_an_input_is_refused_in_one_line_naming_a_valid_size():
    model = create_model("fcdensenet56", num_classes=2)
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, 3, 20, 64))
    msg = str(e.value)
    assert "\n" not in msg and "every side >= 32" in msg and "nearest valid size: 32x64" in msg
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        model(torch.randn(1, 3, 64, 64, 64))


def test_skip_and_upsampling_wiring():
    """Transition up sees only the new maps of the block below; its output comes before the
    skip; each up block reads both."""
    model = FCDenseNet(**TINY).eval()
    seen = {}
    model.transition_up1.register_forward_hook(lambda m, i, o: seen.update(up1=(i[0], i[1], o)))
    with torch.no_grad():
        model(torch.randn(2, 3, 12, 12))
    new, skip, out = seen["up1"]
    assert new.shape[1] == TINY["bottleneck_layers"] * TINY["growth_rate"]
    assert skip.shape[1] == 6 + 5 * 4 and torch.equal(out[:, new.shape[1]:], skip)
    assert model.transition_up1.conv.kernel_size == (3, 3) and \
        model.transition_up1.conv.stride == (2, 2)


def make_pair(dims: int, drop_rate: float = 0.2) -> tuple[FCDenseNet, FCDenseNet]:
    torch.manual_seed(0)
    plain = FCDenseNet(**TINY, spatial_dims=dims, drop_rate=drop_rate).double()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # no symmetry hides a gradient
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2)
    return plain, copy.deepcopy(plain).set_memory_efficient(True)


def train(model: FCDenseNet, x: torch.Tensor, target: torch.Tensor, steps: int = 3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    record = []
    for step in range(steps):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(step)  # the same dropout masks in both modes
        y = model(xi)
        opt.zero_grad()
        F.cross_entropy(y, target).backward()
        record.append((y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


@pytest.mark.parametrize("dims,sides", [(2, (13, 11)), (3, (9, 10, 11))])
def test_memory_efficient_trains_like_the_plain_model(dims, sides):
    """Odd sides: pools round down and the transposed convolutions are cropped."""
    plain, efficient = make_pair(dims)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *sides, dtype=torch.float64)
    target = torch.randint(0, 3, (2, *sides))
    for (ya, ga, pa), (yb, gb, pb) in zip(train(plain, x, target), train(efficient, x, target),
                                          strict=True):
        assert rel(ya, yb) < TOL and rel(ga, gb) < TOL
        # against the model's gradient scale: BN after a transition up cancels its bias's
        # gradient (~1e-18 of rounding in both modes, no relative agreement to ask of it)
        scale = max(float(g.abs().max()) for g in pa)
        for (name, _), a, b in zip(plain.named_parameters(), pa, pb, strict=True):
            assert float((a - b).abs().max()) < TOL * scale, name
    for (name, a), b in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b) == 3, name
        else:
            assert rel(a, b) < TOL, name
    with torch.no_grad():  # eval runs the plain path in both, on the trained weights
        assert rel(plain.eval()(x), efficient.eval()(x)) < TOL


@pytest.mark.parametrize("dims", [2, 3])
def test_memory_efficient_runs_channels_last_and_answers_in_the_input_layout(dims):
    """Float32, where the CPU's convolutions keep channels-last: the memory-efficient mode runs
    channels-last inside, draws dropout as the contiguous plain model does, and returns
    contiguous scores for a contiguous input (channels-last for a channels-last one)."""
    torch.manual_seed(0)
    plain = FCDenseNet(**TINY, spatial_dims=dims, drop_rate=0.5)
    efficient = copy.deepcopy(plain).set_memory_efficient(True)
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    seen = []
    efficient.denseblock_up1.register_forward_pre_hook(
        lambda m, i: seen.append(i[0].is_contiguous(memory_format=fmt)))
    x = torch.randn(2, 3, *[12] * dims)
    target = torch.randint(0, 3, (2, *[12] * dims))
    (ya, ga, _), = train(plain, x, target, steps=1)
    (yb, gb, _), = train(efficient, x, target, steps=1)
    assert seen == [True] and yb.is_contiguous()
    assert rel(ya, yb) < 1e-4 and rel(ga, gb) < 1e-4
    out = efficient(x.contiguous(memory_format=fmt))  # training, with gradients: efficient
    assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous()


def test_memory_efficient_with_a_one_pixel_bottleneck():
    plain, efficient = make_pair(2, drop_rate=0.0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    (ya, ga, _), = train(plain, x, target, steps=1)
    (yb, gb, _), = train(efficient, x, target, steps=1)
    assert rel(ya, yb) < TOL and rel(ga, gb) < TOL


def test_saved_memory_is_linear_in_depth():
    """Every block of L layers: the efficient model's saved bytes grow linearly with L (second
    difference 0), the plain model's with L^2."""
    x = torch.randn(2, 3, 8, 8)
    for efficient in (True, False):
        sizes = []
        for layers in (2, 4, 6):
            torch.manual_seed(0)
            model = FCDenseNet(down_blocks=(layers,) * 2, bottleneck_layers=layers,
                               growth_rate=4, num_init_features=6, num_classes=3, drop_rate=0.0,
                               memory_efficient=efficient)
            sizes.append(saved_bytes(model.train(), x.clone()))
        second_difference = sizes[2] - 2 * sizes[1] + sizes[0]
        if efficient:
            assert second_difference == 0, sizes
        else:
            assert second_difference > 0, sizes


def test_create_model_config_round_trip_and_pretrained_cfg():
    model = create_model("fcdensenet103", num_classes=12, in_channels=1, spatial_dims=3,
                         memory_efficient=True)
    c = model.config
    assert (c.down_blocks, c.bottleneck_layers, c.up_blocks, c.growth_rate) == (
        (4, 5, 7, 10, 12), 15, (12, 10, 7, 5, 4), 16)
    assert model.conv0.weight.shape == (48, 1, 3, 3, 3) and model.num_classes == 12
    assert all(b.memory_efficient for b in model.modules()
               if isinstance(b, densenets.DenseBlock))
    twin = model_from_config(c.to_dict())
    assert type(twin) is FCDenseNet and twin.config == c
    assert twin.state_dict().keys() == model.state_dict().keys()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "fcdensenet103" and cfg["input_size"] == (1, 64, 64, 64)
    assert cfg["num_classes"] == 12 and cfg["first_conv"] == "conv0"
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing and not any(
        b.memory_efficient for b in model.modules() if isinstance(b, densenets.DenseBlock))
    assert create_model("fcdensenet56").config.growth_rate == 12


@pytest.mark.parametrize("kw,match", [
    (dict(up_blocks=(4, 4)), "one dense block per down block"),
    (dict(growth_rate=0), "growth_rate must be an integer >= 1"),
    (dict(drop_rate=1.0), "drop_rate must be in"),
    (dict(spatial_dims=4), "spatial_dims must be"),
    (dict(bottleneck=True), "FCDenseNet has no option bottleneck"),
])
def test_bad_configurations_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model("fcdensenet56", **kw)


def test_features_only_is_refused_in_one_line():
    with pytest.raises(ValueError, match="classification DenseNet as the encoder"):
        create_model("fcdensenet56", features_only=True)


def test_checkpoints_round_trip_and_adapt_the_classifier(tmp_path):
    model = FCDenseNet(**TINY, spatial_dims=3)
    for path in (tmp_path / "fc.pt", tmp_path / "fc.safetensors"):
        densenets.save(model, path)
        loaded = densenets.load(path)
        assert loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     loaded.state_dict().values(), strict=True))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "bare.pt")
    loaded = densenets.load(tmp_path / "bare.pt")  # the architecture read off the tensors
    assert loaded.config == model.config
    with pytest.warns(UserWarning, match="classifier not loaded"):
        tuned = create_model("fcdensenet56", weights=tmp_path / "fc.pt", num_classes=5,
                             **{k: v for k, v in TINY.items() if k != "num_classes"},
                             spatial_dims=3)
    assert tuned.num_classes == 5
    assert torch.equal(tuned.conv0.weight, model.conv0.weight)


def test_summary_and_the_cli():
    model = create_model("fcdensenet56")
    s = summary(model, (1, 3, 64, 64))
    assert s.model_name == "fcdensenet56"
    assert s.total_params == sum(p.numel() for p in model.parameters())
    up = next(r for r in s.rows if r.name == "transition_up1")
    # transposed conv MACs: every input position meets the whole kernel once (2x2 -> 4x4 map)
    assert up.macs == 2 * 2 * 48 * 48 * 9
    first = next(r for r in s.rows if r.name == "conv0")
    assert first.macs == 64 * 64 * 48 * 3 * 9
    code, out, _ = run_cli(["summary", "fcdensenet103", "--input-size", "3", "32", "32"])
    assert code == 0 and "denseblock_up5" in out and "9,318,859" in out


@pytest.mark.parametrize("fmt,suffix", [("exported-program", ".pt2"), ("torchscript", ".pt")])
def test_export(tmp_path, fmt, suffix):
    from densenets.deploy.export import export, verify

    model = FCDenseNet(**TINY)
    r = export(model, tmp_path / f"m{suffix}", format=fmt, input_size=(3, 13, 11),
               dynamic_batch=True)
    err, scale = verify(r.path, fmt, model, 2, (3, 13, 11))
    assert err <= 1e-5 * max(1.0, scale)
    assert math.isfinite(scale)


def test_the_documented_encoder_taps_are_bn_relu_of_the_dense_blocks():
    """docs/segmentation.md's hooks give segmentation_models_pytorch's DenseNet taps: the stem
    after its ReLU, each transition's BN-ReLU, and norm5 unrectified."""
    torch.manual_seed(0)
    model = densenets.DenseNet(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8,
                               num_classes=3).eval()
    taps = ["features.relu0", "features.transition1.relu", "features.transition2.relu",
            "features.transition3.relu", "features.norm5"]
    maps = {}
    for name in taps:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: maps.__setitem__(name, out.clone()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.forward_features(x)
        blocks = densenets.FeatureExtractor(model)(x)  # features_only: raw block outputs
        f = model.features
        want = [F.relu(f.norm0(f.conv0(x)))] + [
            F.relu(getattr(f, f"transition{i}").norm(blocks[i])) for i in (1, 2, 3)] + [
            f.norm5(f.denseblock4(f.transition3(blocks[3])))]
    for name, w in zip(taps, want, strict=True):
        assert torch.allclose(maps[name], w, atol=1e-6), name
    assert [maps[n].shape[-1] for n in taps] == [32, 16, 8, 4, 2]  # reductions 2, 4, 8, 16, 32
    assert (maps["features.norm5"] < 0).any()  # not rectified
