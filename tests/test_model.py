"""The architecture: shapes, the four variants, dropout placement, initialisation, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import tiny_densenet
from torch import nn

from densenets import DenseNet, create_model
from densenets.models.layers import DenseLayer, Transition


@pytest.mark.parametrize(
    "cfg, size",
    [
        (dict(growth_rate=12, block_config=(6, 12, 24, 16), num_init_features=64), 224),
        (dict(growth_rate=12, block_config=(4, 4, 4), num_init_features=24, stem="cifar"), 32),
        (dict(growth_rate=7, block_config=(3, 5), num_init_features=16, bottleneck=False,
              compression=0.7, stem="cifar"), 33),
        (dict(growth_rate=5, block_config=(2, 2, 2), num_init_features=9, compression=0.5,
              in_channels=1), 61),
    ],
)
def test_shapes_through_every_block(cfg, size):
    model = DenseNet(num_classes=7, **cfg).eval()
    seen = {}
    for name, m in model.features.named_children():
        m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.shape))
    x = torch.randn(2, cfg.get("in_channels", 3), size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    k, theta = cfg["growth_rate"], cfg.get("compression", 0.5)
    channels = cfg["num_init_features"]
    spatial = size if cfg.get("stem") == "cifar" else ((size - 1) // 2 + 1 - 1) // 2 + 1
    blocks = cfg["block_config"]
    for i, n in enumerate(blocks, start=1):
        channels += n * k
        assert seen[f"denseblock{i}"] == (2, channels, spatial, spatial)
        if i < len(blocks):
            channels = math.floor(theta * channels)
            spatial //= 2
            assert seen[f"transition{i}"] == (2, channels, spatial, spatial)
    assert model.num_features == channels
    assert seen["relu5"] == (2, channels, spatial, spatial)


VARIANTS = {
    "DenseNet": dict(bottleneck=False, compression=1.0),
    "DenseNet-B": dict(bottleneck=True, compression=1.0),
    "DenseNet-C": dict(bottleneck=False, compression=0.5),
    "DenseNet-BC": dict(bottleneck=True, compression=0.5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_four_variants_build_and_train(variant):
    torch.manual_seed(0)
    model = tiny_densenet(**VARIANTS[variant])
    layer = model.features.denseblock1.denselayer2
    assert layer.bottleneck == VARIANTS[variant]["bottleneck"]
    assert hasattr(layer, "conv2") == VARIANTS[variant]["bottleneck"]
    expected_t = math.floor(VARIANTS[variant]["compression"] * (8 + 2 * 4))
    assert model.features.transition1.conv.out_channels == expected_t
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_layer_composite_function_order():
    """H_l is BN -> ReLU -> Conv, twice with the bottleneck; checked against a hand-written one."""
    torch.manual_seed(0)
    layer = DenseLayer(6, growth_rate=3, bottleneck=True, bn_size=4).double().eval()
    for bn in (layer.norm1, layer.norm2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False)

    h = F.conv2d(F.relu(bn(x, layer.norm1)), layer.conv1.weight)
    h = F.conv2d(F.relu(bn(h, layer.norm2)), layer.conv2.weight, padding=1)
    assert layer.conv1.weight.shape == (12, 6, 1, 1)
    assert layer.conv2.weight.shape == (3, 12, 3, 3)
    torch.testing.assert_close(layer(x), h, rtol=0, atol=1e-12)


def test_no_conv_bias_and_fan_out_he_init():
    torch.manual_seed(0)
    model = create_model("densenet121")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    big = model.features.denseblock3.denselayer24.conv2  # 32 x 128 x 3 x 3
    std = math.sqrt(2.0 / (3 * 3 * big.out_channels))
    assert big.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(model.features.norm5.weight == 1) and torch.all(model.features.norm5.bias == 0)
    assert torch.all(model.classifier.bias == 0)


def _dropout_calls(model: DenseNet, x: torch.Tensor, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = F.dropout

    def spy(t, p=0.5, training=True, inplace=False):
        calls.append(t.shape[1])
        return real(t, p, training, inplace)

    monkeypatch.setattr(F, "dropout", spy)
    model(x)
    return calls


@pytest.mark.parametrize("bottleneck", [True, False])
def test_dropout_after_every_conv_except_the_stem(bottleneck, monkeypatch):
    model = tiny_densenet(drop_rate=0.2, bottleneck=bottleneck).train()
    calls = _dropout_calls(model, torch.randn(2, 3, 16, 16), monkeypatch)
    expected = []
    for i, block in enumerate(model.features.children()):
        if isinstance(block, Transition):
            expected.append(block.conv.out_channels)
        elif hasattr(block, "layers"):
            expected += ([4 * 4, 4] if bottleneck else [4]) * len(block.layers)
        elif i == 0:
            assert isinstance(block, nn.Conv2d)  # the stem conv: never dropped
    assert calls == expected  # the stem's 8-channel output is never dropped


def test_no_dropout_when_rate_zero_and_eval_is_deterministic(monkeypatch):
    model = tiny_densenet(drop_rate=0.0)
    assert _dropout_calls(model, torch.randn(2, 3, 16, 16), monkeypatch) == []
    model = tiny_densenet(drop_rate=0.5).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_in_channels_and_num_classes():
    model = tiny_densenet(in_channels=13, num_classes=4).eval()
    assert model(torch.randn(1, 13, 8, 8)).shape == (1, 4)
    assert model.features.conv0.in_channels == 13


def test_forward_features_and_head():
    model = tiny_densenet().eval()
    x = torch.randn(2, 3, 16, 16)
    f = model.forward_features(x)
    assert f.shape == (2, model.num_features, 4, 4)
    assert torch.all(f >= 0)  # the final BN-ReLU lives inside features
    assert model.forward_head(f, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(f), model(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(growth_rate=0), "growth_rate must be >= 1"),
        (dict(compression=0.0), "compression"),
        (dict(compression=1.5), "compression"),
        (dict(block_config=()), "at least one dense block"),
        (dict(block_config=(3, 0, 2)), "at least one layer"),
        (dict(block_config=(3, -1)), "at least one layer"),
        (dict(stem="resnet"), "stem must be one of"),
        (dict(drop_rate=1.0), "drop_rate"),
    ],
)
def test_invalid_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_densenet(**kwargs)


def test_wrong_channel_count_error():
    model = tiny_densenet(in_channels=1)
    with pytest.raises(ValueError, match="takes 1-channel images but the input has 3 channels"):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name, minimum", [("densenet121", 29), ("densenet-bc-40-k12", 4)])
def test_too_small_input_names_the_minimum(name, minimum):
    model = create_model(name).eval()
    assert model.min_input_size == minimum
    with torch.no_grad():
        model(torch.randn(1, 3, minimum, minimum))  # the minimum itself works
        with pytest.raises(ValueError, match=f"minimum is {minimum}x{minimum}"):
            model(torch.randn(1, 3, minimum - 1, minimum))
