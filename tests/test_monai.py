"""MONAI's DenseNets: parameter counts in 1D/2D/3D, and checkpoints both ways with equal outputs.

MONAI's own classes build the references (``monai.networks.nets``); every comparison of outputs
runs both models in float64 in eval mode, from float32 weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks import nets
from support import rel, run_cli, vary_bn

import densenets
from densenets import KeyMismatchError, create_model
from densenets.weights.monai_keys import from_monai_keys, to_monai_keys

pytestmark = pytest.mark.usefixtures("one_thread_module")

MONAI_NAMES = {"densenet121": nets.DenseNet121, "densenet169": nets.DenseNet169,
               "densenet201": nets.DenseNet201, "densenet264": nets.DenseNet264}
SIDE = {1: 64, 2: 32, 3: 32}  # the smallest inputs DenseNet-121 takes are 32 per axis


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", list(MONAI_NAMES))
def test_parameter_counts_equal_monai(name, dims):
    # MONAI's defaults in its docs: one input channel, two classes; on the meta device no
    # weight is drawn, so even the 3D DenseNet-264 (40 M parameters) costs nothing
    with torch.device("meta"):
        theirs = MONAI_NAMES[name](spatial_dims=dims, in_channels=1, out_channels=2)
        ours = create_model(name, spatial_dims=dims, in_channels=1, num_classes=2)
    assert count(ours) == count(theirs)
    # same tensors under the two key layouts: nothing is counted twice or missed
    assert {k: v.shape for k, v in to_monai_keys(ours.state_dict()).items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


def test_monai_densenet264_is_ours():
    # MONAI's DenseNet264 is k = 32, 64 stem channels, blocks (6, 12, 64, 48): our densenet264
    # (timm's densenet264d is another model: k = 48 and a deep stem)
    with torch.device("meta"):
        theirs = nets.DenseNet264(spatial_dims=2, in_channels=3, out_channels=1000)
        ours, timms = create_model("densenet264"), create_model("densenet264d")
    blocks = tuple(len(b) for n, b in theirs.features.named_children() if "block" in n)
    assert blocks == ours.config.block_config == (6, 12, 64, 48)
    assert theirs.features.conv0.out_channels == ours.config.num_init_features == 64
    assert count(ours) == count(theirs) == 33_337_704
    assert count(timms) != count(theirs)


def monai_file(tmp_path, model: torch.nn.Module, wrap=lambda sd: sd, name="monai.pt"):
    vary_bn(model.eval())
    path = tmp_path / name
    torch.save(wrap(model.state_dict()), path)
    return path


def same_outputs(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return rel(ours.double().eval()(x.double()), theirs.double().eval()(x.double()))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_monai_densenet121_reads_with_its_rank_channels_and_classes(tmp_path, dims):
    theirs = nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)
    path = monai_file(tmp_path, theirs)
    x = torch.randn(1, 1, *[SIDE[dims]] * dims)
    for ours in (create_model("densenet121", weights=path), densenets.load(path)):
        c = ours.config
        assert (c.spatial_dims, c.in_channels, c.num_classes, c.norm) == (dims, 1, 2, "batch")
        assert ours.weights_meta["model_name"] == "densenet121"
        assert same_outputs(ours, theirs, x) < 1e-10


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd},
    lambda sd: {"network": sd, "optimizer": {"state": {}, "param_groups": []}},  # CheckpointSaver
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel / DDP
], ids=["state_dict", "checkpoint_saver", "ddp"])
def test_wrapped_monai_checkpoints_read(tmp_path, wrap):
    theirs = nets.DenseNet(spatial_dims=3, in_channels=2, out_channels=3, init_features=8,
                           growth_rate=4, block_config=(2, 3), bn_size=2)
    ours = densenets.load(monai_file(tmp_path, theirs, wrap))
    c = ours.config
    assert (c.num_init_features, c.growth_rate, c.block_config, c.bn_size, c.in_channels,
            c.num_classes, c.spatial_dims) == (8, 4, (2, 3), 2, 2, 3, 3)
    assert same_outputs(ours, theirs, torch.randn(2, 2, 16, 16, 16)) < 1e-10


def test_instance_norm_without_affine_is_read_off_missing_norm_tensors(tmp_path):
    theirs = nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=8,
                           growth_rate=4, block_config=(2, 2), norm="instance")
    ours = densenets.load(monai_file(tmp_path, theirs))
    assert ours.config.norm == "instance"
    assert same_outputs(ours, theirs, torch.randn(2, 1, 16, 16, 16)) < 1e-10


@pytest.mark.parametrize("norm", [("instance", {"affine": True}), ("group", {"num_groups": 4})])
def test_norms_the_tensors_cannot_tell_apart_are_refused_unless_named(tmp_path, norm):
    theirs = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8,
                           growth_rate=4, block_config=(2, 2), norm=norm)
    path = monai_file(tmp_path, theirs)
    with pytest.raises(KeyMismatchError, match=r"cannot tell apart; pass norm=") as e:
        densenets.load(path)
    assert "\n" not in str(e.value)
    ours = densenets.load(path, norm=norm)
    assert same_outputs(ours, theirs, torch.randn(2, 1, 32, 32)) < 1e-10


def test_tracked_instance_norm_reads_as_batch_norm_which_is_the_same_in_eval(tmp_path):
    norm = ("instance", {"affine": True, "track_running_stats": True})
    theirs = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8,
                           growth_rate=4, block_config=(2, 2), norm=norm)
    path = monai_file(tmp_path, theirs)
    x = torch.randn(2, 1, 32, 32)
    read = densenets.load(path)
    assert read.config.norm == "batch"
    assert same_outputs(read, theirs, x) < 1e-10  # both normalise by the running statistics
    named = densenets.load(path, norm=norm)
    assert named.config.norm == norm
    assert isinstance(named.features.norm5, torch.nn.InstanceNorm2d)
    assert same_outputs(named, theirs, x) < 1e-10


def test_monai_keys_map_both_ways():
    theirs = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8,
                           growth_rate=4, block_config=(2, 2)).state_dict()
    ours = from_monai_keys(theirs)
    assert "features.denseblock2.denselayer2.norm1.running_var" in ours
    assert "classifier.bias" in ours and not any(".layers." in k for k in ours)
    assert list(to_monai_keys(ours)) == list(theirs)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_saved_in_monai_layout_loads_strictly_into_monai(tmp_path, dims):
    ours = vary_bn(create_model("densenet121", spatial_dims=dims, in_channels=1,
                                num_classes=2).eval())
    x = torch.randn(1, 1, *[SIDE[dims]] * dims)
    for suffix in (".pt", ".safetensors"):
        path = densenets.save(ours, tmp_path / f"w{suffix}", layout="monai")
        if suffix == ".pt":
            sd = torch.load(path, weights_only=True)
        else:
            from safetensors.torch import load_file
            sd = load_file(str(path))
        theirs = nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)
        theirs.load_state_dict(sd, strict=True)
        assert same_outputs(ours, theirs, x) < 1e-10
        ours.float()
    back = densenets.load(path)  # and densenets reads its own MONAI file back
    assert back.config.spatial_dims == dims
    assert same_outputs(back, ours, x) < 1e-10


def test_instance_norm_model_saves_for_monais_instance_norm(tmp_path):
    ours = create_model("densenet121", spatial_dims=3, in_channels=2, num_classes=3,
                        norm="instance", block_config=(2, 2, 2)).eval()
    path = densenets.save(ours, tmp_path / "w.pt", layout="monai")
    theirs = nets.DenseNet(spatial_dims=3, in_channels=2, out_channels=3,
                           block_config=(2, 2, 2), norm="instance")
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert same_outputs(ours, theirs, torch.randn(2, 2, 32, 32, 32)) < 1e-10


@pytest.mark.parametrize("kw, why", [
    (dict(stem="cifar"), "stem"),
    (dict(deep_stem=True), "stem"),
    (dict(blur_pool=True), "stem"),
    (dict(bottleneck=False), "bottleneck"),
    (dict(compression=0.6), "theta = 0.6"),
    (dict(global_pool="max"), "global average pooling"),
    (dict(num_classes=0), "global average pooling"),
])
def test_models_monai_cannot_express_are_refused_with_the_reason(tmp_path, kw, why):
    model = create_model("densenet121", block_config=(1, 1), **kw)
    with pytest.raises(ValueError, match=why) as e:
        densenets.save(model, tmp_path / "w.pt", layout="monai")
    assert "\n" not in str(e.value) and "MONAI's DenseNet cannot hold" in str(e.value)
    assert not (tmp_path / "w.pt").exists()


def test_monai_layout_refusals(tmp_path):
    model = create_model("densenet121", block_config=(1, 1))
    for kw, why in [(dict(layout="timm"), "unknown layout"),
                    (dict(layout="monai", meta={"class_names": ["a"]}), "weights only"),
                    (dict(layout="monai"), "one file")]:
        path = tmp_path / ("folder" if "meta" not in kw and kw["layout"] == "monai" else "w.pt")
        with pytest.raises(ValueError, match=why):
            densenets.save(model, path, **kw)
    with pytest.raises(ValueError, match="holds DenseNets only"):
        densenets.save(create_model("rdnet_tiny"), tmp_path / "r.pt", layout="monai")


def test_cli_reads_a_monai_checkpoint(tmp_path):
    theirs = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8,
                           growth_rate=4, block_config=(2, 2))
    path = monai_file(tmp_path, theirs)
    code, out, err = run_cli(["summary", str(path), "--json"])
    assert code == 0, err
    assert json.loads(out)["total_params"] == count(theirs)


def test_cli_exports_for_monai_and_monai_loads_it_strictly(tmp_path):
    """`densenets export --format monai`: the state dict MONAI's DenseNet, built with the
    arguments the command prints, loads with strict=True and runs to the same outputs."""
    ours = vary_bn(create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2,
                                block_config=(2, 2), growth_rate=8, num_init_features=16).eval())
    src = densenets.save(ours, tmp_path / "ours.safetensors")
    out = tmp_path / "for_monai.pt"
    code, stdout, err = run_cli(["export", str(src), "--format", "monai", "-o", str(out),
                                 "--json"])
    assert code == 0, err
    info = json.loads(stdout)
    assert info["check_passed"] and info["format"] == "monai"
    theirs = nets.DenseNet(**info["monai_kwargs"])
    theirs.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert same_outputs(ours, theirs, torch.randn(2, 1, 32, 32, 32)) < 1e-10
    code, stdout, _ = run_cli(["export", str(src), "--format", "monai", "-o",
                               str(tmp_path / "m.safetensors")])
    assert code == 0 and "monai.networks.nets.DenseNet(spatial_dims=3" in stdout
    code, _, err = run_cli(["export", "densenet-bc-40-k12", "--format", "monai", "-o",
                            str(tmp_path / "c.pt")])
    assert code == 2 and "MONAI's DenseNet cannot hold" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c.pt").exists()


def test_monai_export_check_without_monai_reads_the_file_back(tmp_path, monkeypatch):
    from densenets.deploy import export as exp

    ours = vary_bn(create_model("densenet121", in_channels=1, num_classes=2,
                                block_config=(2, 2)).eval())
    path = exp.export(ours, tmp_path / "m.monai.pt", "monai").path
    real = exp.importlib.util.find_spec
    monkeypatch.setattr(exp.importlib.util, "find_spec",
                        lambda name, *a: None if name == "monai" else real(name, *a))
    assert exp.monai_runner().startswith("densenets.load")
    diff, scale = exp.verify(path, "monai", ours, input_size=(1, 32, 32))
    assert diff < 1e-6 * max(1.0, scale)
