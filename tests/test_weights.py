"""Issue 3, items 2 and 4: every checkpoint layout loads, mismatches fail readably, fine-tuning
keeps all but the classifier, safetensors carry the configuration, pickles are refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import tiny_densenet, vary_bn

from densenets import (
    DenseNet,
    DenseNetConfig,
    KeyMismatchError,
    create_model,
    load,
    save,
)
from densenets.cli import main
from densenets.models.zoo import list_models as dense_zoo
from densenets.models.zoo import model_config
from densenets.weights.files import load_into, read_checkpoint
from densenets.weights.keymap import describe_config, infer_config, remap_state_dict, to_legacy_keys

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny(**kw) -> DenseNet:
    torch.manual_seed(kw.pop("seed", 0))
    return vary_bn(tiny_densenet(**kw)).eval()  # non-trivial BN so a skipped tensor changes outputs


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, channels: int = 3) -> bool:
    x = torch.randn(2, channels, 16, 16)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def contract_checkpoint(model: DenseNet, **extra) -> dict:
    """A training checkpoint per the shared contract, built by hand."""
    return {"format": "densenets.checkpoint", "version": 1, "model": model.state_dict(),
            "model_config": model.config.to_dict(), "model_name": "tiny",
            "meta": {"class_names": list("abcde"),
                     "preprocessing": {"resize": None, "crop": 16, "mean": [0.5] * 3,
                                       "std": [0.5] * 3, "interpolation": "bilinear"},
                     "recipe": "digits"},
            "epoch": 3, "optimizer": {"state": {}, "param_groups": []}, **extra}


@pytest.mark.parametrize("layout", ["current", "legacy", "dataparallel", "compiled+ddp",
                                    "timm_train", "lightning", "contract"])
def test_every_layout_loads_into_the_same_model(tmp_path, layout):
    src = tiny()
    sd = src.state_dict()
    objs = {
        "current": sd,
        "legacy": to_legacy_keys(sd),
        "dataparallel": {"module." + k: v for k, v in sd.items()},
        "compiled+ddp": {"module._orig_mod." + k: v for k, v in to_legacy_keys(sd).items()},
        # timm's train.py: state_dict (+ EMA) next to plain training state
        "timm_train": {"epoch": 4, "arch": "densenet", "state_dict": sd,
                       "state_dict_ema": {k: v * 0 for k, v in sd.items()}},
        "lightning": {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 1},
        "contract": contract_checkpoint(src),
    }
    path = tmp_path / "ckpt.pt"
    torch.save(objs[layout], path)
    model = load(path)
    assert same_outputs(model, src)
    assert model.config.to_dict() == src.config.to_dict()
    # and into a model built by the caller
    other = tiny(seed=1)
    assert not same_outputs(other, src)
    assert load_into(other, read_checkpoint(path).state_dict) == []
    assert same_outputs(other, src)


def test_timm_safetensors_layout_loads(tmp_path):
    """timm's DenseNets name parameters as torchvision does (BatchNormAct2d keeps BN names)."""
    src = tiny(growth_rate=6, block_config=(2, 2), num_init_features=12, stem="imagenet")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    model = load(path)
    assert same_outputs(model, src)


def test_timm_deep_stem_is_recognised_by_name():
    # timm's deep stem (three 3x3 convolutions) was refused once; it is built here now
    sd = create_model("densenet264d", num_classes=10).state_dict()
    cfg = infer_config(remap_state_dict(sd))
    assert cfg["deep_stem"] and cfg["growth_rate"] == 48 and not cfg["blur_pool"]
    assert cfg["block_config"] == (6, 12, 64, 48) and cfg["num_classes"] == 10


def test_mismatch_is_a_readable_diff_and_loads_nothing():
    src = tiny()
    target = tiny(block_config=(2, 2, 2), seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(KeyMismatchError) as err:
        load_into(target, src.state_dict())
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg and "shape conflict" in msg
    assert "features.denseblock2.denselayer3" in msg  # the extra layer, by module
    assert "block_config" not in msg or "blocks=[2, 3, 2]" in msg
    assert "looks like DenseNet(k=4, blocks=[2, 3, 2]" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_create_model_with_a_file_fine_tunes_and_says_so(tmp_path):
    src = create_model("densenet-bc-16-k4", num_classes=7)
    path = save(src, tmp_path / "w.pt")
    with pytest.warns(UserWarning, match="classifier not loaded.*7 classes.*model 3"):
        model = create_model("densenet-bc-16-k4", weights=path, num_classes=3)
    assert model.classifier.out_features == 3
    for k, v in src.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(model.state_dict()[k], v), k
    assert model.weights_meta["class_names"] is None
    # without num_classes, the checkpoint's 7 classes are kept: no surprise fine-tuning
    assert create_model("densenet-bc-16-k4", weights=path).classifier.out_features == 7


def test_rgb_stem_adapts_to_grayscale_with_same_response(tmp_path):
    src = tiny()
    path = save(src, tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="conv0 from 3 to 1"):
        gray = load(path, in_channels=1).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gray(x), src(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_load_takes_the_data_configuration_from_the_weights(tmp_path):
    """load() sets the pretrained_cfg from the preprocessing the weights were evaluated with
    (what timm's resolve_data_config reads), as create_model(weights=...) does."""
    src = tiny(in_channels=1)
    pre = {"resize": 36, "crop": 32, "mean": [0.3], "std": [0.2], "interpolation": "bicubic"}
    path = save(src, tmp_path / "w.safetensors", meta={"preprocessing": pre},
                model_name="densenet-bc-custom")
    loaded = load(path)
    assert loaded.pretrained_cfg["architecture"] == "densenet-bc-custom"
    cfg = loaded.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and cfg["crop_pct"] == round(32 / 36, 4)
    assert (cfg["mean"], cfg["std"], cfg["interpolation"]) == ((0.3,), (0.2,), "bicubic")
    # an image crop says nothing about a volume: weights that state no volume size keep the
    # native 96^3 of a 3D ImageNet stem (the fallback preprocessing records a 224 crop)
    vol = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, spatial_dims=3,
                   in_channels=1, num_classes=2)
    torch.save(vol.state_dict(), tmp_path / "vol.pt")
    assert load(tmp_path / "vol.pt").pretrained_cfg["input_size"] == (1, 96, 96, 96)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_roundtrip_needs_no_other_information(tmp_path, suffix):
    src = tiny(growth_rate=5, block_config=(3, 1), num_init_features=9, bottleneck=False,
               compression=0.7, in_channels=2, drop_rate=0.2)
    src.weights_meta = {"class_names": list("vwxyz"), "recipe": "test"}
    path = save(src, tmp_path / f"model{suffix}")
    model = load(path)
    assert model.config == src.config
    assert same_outputs(model, src, channels=2)
    assert model.weights_meta["class_names"] == list("vwxyz")
    assert model.weights_meta["preprocessing"]["mean"] == [0.5, 0.5]
    if suffix == ".pt":  # the shared checkpoint contract
        obj = torch.load(path, weights_only=True)
        assert obj["format"] == "densenets.checkpoint" and obj["version"] == 1
        assert DenseNet(**obj["model_config"]).config == src.config


def test_config_is_read_off_tensor_shapes():
    for cfg in [dict(), dict(bottleneck=False, compression=1.0, growth_rate=3),
                dict(compression=0.3, block_config=(1, 2, 3, 1), stem="imagenet", bn_size=2)]:
        src = tiny(**cfg)
        inferred = infer_config(src.state_dict())
        assert DenseNet(**inferred).config == src.config


def test_bare_imagenet_state_dict_gets_imagenet_names(tmp_path):
    path = tmp_path / "densenet121-download.pth"
    torch.save(create_model("densenet121").state_dict(), path)
    for model in (load(path), create_model("densenet121", weights=path)):
        assert model.weights_meta["model_name"] == "densenet121"
        assert model.weights_meta["class_names"][0] == "tench"
        assert model.weights_meta["preprocessing"]["resize"] == 256


# the DenseNet zoo's names (RDNet checkpoints are recognised by their own key map)
@pytest.mark.parametrize("name", dense_zoo() + ["densenet-b-16-k4", "densenet-c-13-k5"])
def test_every_zoo_architecture_is_recognised_by_name(name):
    assert describe_config({**DenseNetConfig().to_dict(), **model_config(name)}) == name


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny().state_dict(), "x": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refused to load .*evil.pt.*\(getattr\).*arbitrary code"):
        load(path)
    with pytest.raises(ValueError, match="refused"):
        create_model("densenet-bc-16-k4", weights=path)
    assert main(["predict", str(path), str(path)]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    # the payload is real: plain pickle would have run it
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_unreadable_files_have_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a PyTorch checkpoint"):
        load(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load(tmp_path / "absent.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="no state dict found"):
        load(tmp_path / "nostate.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="no DenseNet weights"):
        load(tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"\.safetensors, \.pt or \.pth"):
        save(tiny(), tmp_path / "model.onnx")


def test_run_directory_loads_best(tmp_path):
    src = tiny()
    torch.save(contract_checkpoint(src), tmp_path / "best.pt")
    torch.save(contract_checkpoint(tiny(seed=3)), tmp_path / "last.pt")
    model = load(tmp_path)
    assert same_outputs(model, src)
    assert model.weights_meta["class_names"] == list("abcde")
    assert model.weights_meta["recipe"] == "digits"


def test_reset_classifier():
    model = tiny()
    model.reset_classifier(11)
    assert model.config.num_classes == 11
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 11)
    # timm's convention: 0 removes the classifier and forward returns the pooled features
    model.reset_classifier(0)
    feats = model(torch.randn(1, 3, 16, 16))
    assert feats.shape == (1, model.num_features) and model.num_classes == 0
