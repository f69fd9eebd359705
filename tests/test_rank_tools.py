"""The tools around a model in 1D and 3D as in 2D: summary (shapes, parameters, MACs), diagram,
features_only and forward_intermediates in every feature_cls kind, export to ONNX and
torch.export, from the Python API and the CLI.

MACs are checked against a hand count for single layers and against torch's own FLOP counter
(two FLOPs per multiply-add of convolutions, transposed ones and linear layers) for whole
networks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support import run_cli, tiny_densenet, vary_bn
from torch.utils.flop_counter import FlopCounterMode

from densenets import FCDenseNet, create_model, save, summary
from densenets.analysis.diagram import diagram, network_stages
from densenets.deploy.export import export, native_input_size, verify
from densenets.models.backbone import FEATURE_KINDS

pytestmark = pytest.mark.usefixtures("one_thread_module")

SIDES = {1: (40,), 3: (32, 36, 40)}  # unequal sides: a swapped axis shows


def tiny(dims: int, **kw) -> torch.nn.Module:
    """A small ImageNet-stem DenseNet in ``dims`` dimensions (one channel, 3 classes)."""
    return tiny_densenet(**{**dict(spatial_dims=dims, in_channels=1, num_classes=3,
                                   stem="imagenet", block_config=(2, 2)), **kw})


def tiny_fcdensenet(dims: int) -> FCDenseNet:
    return FCDenseNet(down_blocks=(1, 2), bottleneck_layers=1, up_blocks=(2, 1), growth_rate=3,
                      num_init_features=4, num_classes=2, in_channels=1, spatial_dims=dims)


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """torch's count of FLOPs for one forward pass (two per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops()


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------- summary

@pytest.mark.parametrize("dims", [1, 3])
def test_summary_defaults_to_the_models_native_size_in_its_rank(dims):
    model = tiny(dims, num_init_features=4)
    s = summary(model)
    assert s.input_size == (1, *model.pretrained_cfg["input_size"])
    assert s.input_size == (1, 1, *[96 if dims == 3 else 224] * dims)
    assert len(s.rows[-1].output_shape) == 2  # the classifier: (N, classes)
    assert all(len(r.output_shape) == dims + 2 for r in s.rows[:-1])
    assert s.rows[-2].kind == f"AdaptiveAvgPool{dims}d" and s.rows[-2].macs == 0


@pytest.mark.parametrize("dims", [1, 3])
def test_summary_input_size_must_have_one_side_per_spatial_dimension(dims):
    model = tiny(dims)
    size = (1, *SIDES[dims])
    assert summary(model, size).input_size == (1, *size)  # N = 1 added
    for wrong in ((1, *SIDES[dims][1:]), (1, 1, *SIDES[dims], 8), (0, *SIDES[dims])):
        with pytest.raises(ValueError, match=f"for this {dims}D model") as e:
            summary(model, wrong)
        assert "\n" not in str(e.value)


def test_conv3d_macs_equal_a_hand_count():
    model = tiny(3, num_init_features=6)
    d, h, w = SIDES[3]
    rows = {}
    for r in summary(model, (1, d, h, w)).rows:  # each block has a denselayer1: keep the first
        rows.setdefault(r.name, r)
    # conv0: 7x7x7, stride 2, padding 3 -> each side halves (rounded up); 1 -> 6 channels
    out = [math.ceil(s / 2) for s in (d, h, w)]
    assert rows["conv0"].output_shape == (1, 6, *out)
    assert rows["conv0"].macs == math.prod(out) * 6 * 1 * 7 ** 3
    # the first dense layer after the stem and its max pool (sides halve again):
    # bottleneck 1x1x1 of 6 -> 16 (bn_size 4 x k 4), then 3x3x3 of 16 -> 4
    pooled = [math.ceil(s / 2) for s in out]
    assert rows["denselayer1"].macs == math.prod(pooled) * (16 * 6 + 4 * 16 * 27)
    assert rows["pool0"].macs == 0  # pooling multiplies by no weight


def test_transposed_conv3d_macs_equal_a_hand_count():
    model = tiny_fcdensenet(3)
    rows = {r.name: r for r in summary(model, (1, 1, 12, 16, 20)).rows}
    up = model.transition_up1.conv  # each input voxel meets every tap of every output map once
    inp = rows["bottleneck"].output_shape
    new = model.bottleneck.out_channels - model.bottleneck.in_channels  # its new maps only
    assert up.in_channels == new
    assert rows["transition_up1"].macs == math.prod(inp[2:]) * new * up.out_channels * 27
    assert rows["classifier"].kind == "1x1x1 conv" and rows["conv0"].kind == "3x3x3 conv"
    assert rows["classifier"].output_shape == (1, 2, 12, 16, 20)  # a map of class scores


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_total_macs_are_half_of_torchs_flop_count(dims):
    model = tiny(dims)
    size = (1, *(SIDES.get(dims) or (36, 44)))
    assert 2 * summary(model, size).total_macs == flops(model, torch.zeros(1, *size))
    seg = tiny_fcdensenet(dims)
    size = (1, *(SIDES.get(dims) or (36, 44)))
    assert 2 * summary(seg, size).total_macs == flops(seg, torch.zeros(1, *size))


def test_densenet121_3d_macs_against_torchs_flop_count():
    model = create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)
    s = summary(model, (1, 29, 29, 29))  # the smallest volume it takes
    assert s.total_params == 11_244_674  # MONAI's DenseNet121(spatial_dims=3, 1, 2)
    assert 2 * s.total_macs == flops(model, torch.zeros(1, 1, 29, 29, 29))


def test_cli_summary_of_1d_and_3d_zoo_models():
    code, out, err = run_cli(["summary", "densenet121", "--spatial-dims", "3", "--in-channels",
                              "1", "--json"])
    assert code == 0, err
    d = json.loads(out)
    assert d["input_size"] == [1, 1, 96, 96, 96] and d["total_params"] == 12_267_624
    assert d["rows"][0]["output_shape"] == [1, 64, 48, 48, 48]
    code, out, err = run_cli(["summary", "densenet121", "--spatial-dims", "1", "--in-channels",
                              "1", "--input-size", "1", "64"])
    assert code == 0, err
    assert "densenet121" in out and "1x64x32" in out and "AdaptiveAvgPool1d" in out
    code, _, err = run_cli(["summary", "densenet121", "--spatial-dims", "3", "--input-size",
                            "3", "64", "64"])
    assert code == 2 and one_line(err) and "C D H W" in err and "3D model" in err


def test_cli_summary_of_a_3d_checkpoint_uses_its_size(tmp_path):
    path = save(tiny(3), tmp_path / "volume.safetensors")
    code, out, err = run_cli(["summary", str(path), "--json"])
    assert code == 0, err
    assert json.loads(out)["input_size"] == [1, 1, 96, 96, 96]  # not the 2D crop, 224x224
    # a run trained on volumes records its volume size, which the summary then shows
    model = tiny(3)
    model.weights_meta = {"preprocessing": {"volume_size": [30, 34, 38], "channels": 1,
                                            "interpolation": "trilinear"}}
    path = save(model, tmp_path / "run.safetensors")
    code, out, err = run_cli(["summary", str(path), "--json"])
    assert code == 0, err
    assert json.loads(out)["input_size"] == [1, 1, 30, 34, 38]


def test_cli_summary_of_an_fcdensenet():
    code, out, err = run_cli(["summary", "fcdensenet56", "--spatial-dims", "3", "--in-channels",
                              "1", "--num-classes", "2", "--input-size", "1", "32", "32", "32",
                              "--json"])
    assert code == 0, err
    d = json.loads(out)
    assert d["rows"][-1]["output_shape"] == [1, 2, 32, 32, 32]
    assert d["rows"][0]["kind"] == "3x3x3 conv"


# ---------------------------------------------------------------------------- diagram

@pytest.mark.parametrize("dims", [1, 3])
def test_diagram_shows_every_side(tmp_path, dims):
    model = tiny(dims)
    size = (1, *SIDES[dims])
    stages = network_stages(model, size)
    rows = {r.name: r for r in summary(model, size).rows}
    stem = rows["pool0"].output_shape
    assert stages[1].size == stem[2:] and stages[1].lines[-1] == "×".join(map(str, stem[1:]))
    assert stages[2].size == rows["denseblock1"].output_shape[2:]
    assert stages[-1].size == (1,) * dims
    info = diagram(model, tmp_path / f"d{dims}.svg", block=2, input_size=size)
    svg = (tmp_path / f"d{dims}.svg").read_text()
    assert info["connections"] == 3 and "connection-2-0-2" in svg
    assert f"conv {'×'.join(['7'] * dims)}/2" in info["stages"][1]["lines"]
    with pytest.raises(ValueError, match=f"for this {dims}D model"):
        network_stages(model, (1, 32, 32) if dims == 3 else (1, 32, 32, 32))


def test_cli_diagram_of_a_3d_model_and_what_it_refuses(tmp_path):
    out = tmp_path / "volume.png"
    code, text, err = run_cli(["diagram", "densenet-bc", "--depth", "16", "--spatial-dims", "3",
                               "--input-size", "3", "16", "16", "16", "-o", str(out), "--json"])
    assert code == 0, err
    assert out.stat().st_size > 1000
    assert json.loads(text)["stages"][0]["lines"] == ["input", "3×16×16×16"]
    code, _, err = run_cli(["diagram", "densenet121", "--spatial-dims", "3", "--input-size",
                            "3", "64", "64", "-o", str(out)])
    assert code == 2 and one_line(err) and "C D H W" in err
    code, _, err = run_cli(["diagram", "fcdensenet56", "-o", str(tmp_path / "seg.svg")])
    assert code == 2 and one_line(err) and "densenets summary" in err


# ---------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("dims", [1, 3])
def test_features_only_every_kind_in_1d_and_3d(dims):
    torch.manual_seed(0)
    model = vary_bn(tiny(dims, block_config=(2, 2, 2))).eval()
    x = torch.randn(2, 1, *SIDES[dims])
    final, maps = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert [m.dim() for m in maps] == [dims + 2] * 4
    for kind in FEATURE_KINDS:
        backbone = create_model("densenet121", features_only=True, feature_cls=kind,
                                spatial_dims=dims, in_channels=1, growth_rate=4,
                                block_config=(2, 2, 2), num_init_features=8)
        backbone.load_state_dict(model.state_dict(), strict=False)
        out = backbone.eval()(x)
        got = list(out.values()) if isinstance(out, dict) else out
        taps = [model.features.pool0(model.features.relu0(model.features.norm0(
            model.features.conv0(x))))] + maps[1:]  # the stem tap is after its max pool
        assert len(got) == len(taps), kind
        for g, want, info in zip(got, taps, backbone.feature_info, strict=True):
            assert torch.allclose(g, want, atol=1e-6), (kind, info)
            assert g.shape[1] == info["num_chs"]
            # the reduction holds on every side
            assert [s // r for s, r in zip(x.shape[2:], [info["reduction"]] * dims,
                                           strict=True)] == list(g.shape[2:]), (kind, info)
    if dims == 3:  # the compiled kind in 3D
        scripted = torch.jit.script(create_model(
            "densenet121", features_only=True, feature_cls="fx", spatial_dims=3, in_channels=1,
            growth_rate=4, block_config=(2, 2, 2), num_init_features=8).eval())
        assert [m.shape for m in scripted(x)] == [t.shape for t in taps]


def test_densenet121_3d_backbone():
    backbone = create_model("densenet121", spatial_dims=3, features_only=True, out_indices=(1, 4))
    assert backbone.feature_info.channels() == [256, 1024]
    assert backbone.feature_info.reduction() == [4, 32]
    maps = backbone.eval()(torch.randn(1, 3, 32, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 8, 8, 8), (1, 1024, 1, 1, 1)]


# ---------------------------------------------------------------------------- export

@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("fmt, suffix, dynamic", [("onnx", ".onnx", True),
                                                   ("exported-program", ".pt2", False)])
def test_export_1d_and_3d_equals_pytorch(tmp_path, dims, fmt, suffix, dynamic):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = vary_bn(tiny(dims))
    size = (1, *SIDES[dims])
    result = export(model, tmp_path / f"m{suffix}", fmt, dynamic_batch=dynamic, input_size=size)
    assert result.input_shape == (2 if dynamic else 1, *size)
    diff, scale = verify(result.path, fmt, model, batch_size=3 if dynamic else 1, input_size=size)
    assert scale > 0 and diff <= 1e-5 * max(1.0, scale)
    with pytest.raises(ValueError, match=f"for this {dims}D model"):
        export(model, tmp_path / f"bad{suffix}", fmt, input_size=(1, 32, 32) if dims != 2
               else (1, 32))


def test_export_default_input_follows_the_rank():
    model = tiny(3)
    assert native_input_size(model) == (1, 96, 96, 96)  # the 3D native size, not 224x224
    assert native_input_size(tiny(1)) == (1, 224)
    model.weights_meta = {"preprocessing": {"volume_size": [20, 24, 28]}}
    assert native_input_size(model) == (1, 20, 24, 28)


def test_cli_export_3d_and_an_fcdensenet(tmp_path):
    pytest.importorskip("onnxruntime")
    path = save(vary_bn(tiny(3)), tmp_path / "volume.safetensors")
    code, out, err = run_cli(["export", str(path), "-o", str(tmp_path / "v.onnx"),
                              "--input-size", "1", "32", "36", "40", "--json"])
    assert code == 0, err
    d = json.loads(out)
    assert d["example_input"] == [1, 1, 32, 36, 40] and d["check_passed"] is True
    code, _, err = run_cli(["export", str(path), "-o", str(tmp_path / "w.onnx"),
                            "--input-size", "1", "32", "36"])
    assert code == 2 and one_line(err) and "C D H W" in err
    seg = save(vary_bn(tiny_fcdensenet(3)), tmp_path / "seg.safetensors")
    code, out, err = run_cli(["export", str(seg), "--format", "exported-program", "-o",
                              str(tmp_path / "seg.pt2"), "--input-size", "1", "12", "16", "20",
                              "--json"])
    assert code == 0, err
    assert json.loads(out)["check_passed"] is True
