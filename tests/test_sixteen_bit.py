"""Image folders keep what the files hold: 16-bit grayscale scaled by its range (as ``predict``
scales it), one-channel images trained as one channel, and the preprocessing recorded so that
``predict`` and ``eval`` repeat it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import run_cli, write_image_folder

from densenets import load
from densenets.deploy.predict import model_input, predict_files
from densenets.training.data import build_data
from densenets.training.imagefolder import Lighting, SafeImageFolder, apply_transform
from densenets.training.recipes import resolve
from densenets.weights.preprocessing import TYPE_RANGE, channel_stats, open_image

pytestmark = pytest.mark.usefixtures("one_thread_module")
TINY = "densenet-bc-16-k4"
# Both classes saturate at 255 under an 8-bit clip; only values above 255 tell them apart.
RANGES = {"low": (300, 1000), "high": (40000, 60000)}


def write_16_bit_folder(root: Path, per_class: int = 8, val_per_class: int = 4,
                        size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for name, (lo, hi) in RANGES.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(lo, hi, (size, size)).astype(np.uint16)).save(
                    d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory):
    return write_16_bit_folder(tmp_path_factory.mktemp("sixteen") / "ds")


@pytest.fixture(scope="module")
def trained(sixteen, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code, stdout, err = run_cli(["train", "--recipe", "folder", "--data-dir", str(sixteen),
                                 "--model", TINY, "--image-size", "8", "--epochs", "4",
                                 "--batch-size", "4", "--workers", "0", "--out", str(out)])
    assert code == 0, err
    return out, stdout, err


def test_the_classes_differ_only_above_255(sixteen):
    """The premise: an 8-bit clip (what .convert("RGB") did) makes both classes white."""
    for name in RANGES:
        path = next((sixteen / "train" / name).glob("*.png"))
        with Image.open(path) as img:
            assert img.mode == "I;16"
            assert np.asarray(img.convert("RGB")).min() == 255


def test_a_16_bit_folder_trains_to_100_percent_as_one_channel(trained):
    out, stdout, err = trained
    assert "(accuracy 100.00%)" in stdout.split("val:")[1].splitlines()[0]
    assert "I;16 grayscale images" in err and "not clipped" in err
    model = load(out)
    assert model.config.in_channels == 1  # inferred: every image holds one channel
    pre = json.loads((out / "config.json").read_text())["preprocessing"]
    assert pre["channels"] == 1 and pre["high_bit_depth"] == TYPE_RANGE
    assert pre["mean"] == pytest.approx([sum(resolve("folder").mean) / 3])
    assert model.weights_meta["preprocessing"] == pre


def test_predict_and_eval_repeat_the_training_preprocessing(trained, sixteen):
    out, _, _ = trained
    model = load(out)
    pre = model.weights_meta["preprocessing"]
    cfg = resolve("folder", data_dir=str(sixteen), image_size=8, workers=0,
                  model_overrides={"in_channels": 1})
    val = build_data(cfg, splits=("val",)).loaders["val"].dataset
    for index in (0, len(val) - 1):
        path, _ = val.samples[index]
        x, _ = val[index]
        assert x.shape == (1, 8, 8)
        assert torch.equal(model_input(path, pre, 1), x)  # the very same tensor
    # The two classes are apart by far more than the noise within each.
    means = {val.classes[c]: float(model_input(p, pre, 1).mean()) for p, c in val.samples}
    assert means["low"] < -1.5 and means["high"] > 0.8
    files = [p for p, _ in val.samples]
    report = predict_files(model, files, topk=1)
    names = model.weights_meta["class_names"]
    assert [p.topk[0]["label"] for p in report.predictions] == \
        [names[c] for _, c in val.samples]
    code, stdout, err = run_cli(["eval", str(out), "--json"])
    assert code == 0, err
    assert json.loads(stdout)["top1_acc"] == 100.0


def test_one_channel_from_the_flag_or_the_files(tmp_path):
    rgb = write_image_folder(tmp_path / "rgb", per_class=2, size=10)
    base = dict(data_dir=str(rgb), image_size=8, workers=0)
    assert build_data(resolve("folder", **base)).in_channels == 3
    one = build_data(resolve("folder", **base, model_overrides={"in_channels": 1}))
    x, _ = one.loaders["train"].dataset[0]
    assert one.in_channels == 1 and x.shape == (1, 8, 8)
    assert one.preprocessing["mean"] == pytest.approx([sum(resolve("folder").mean) / 3])
    gray = tmp_path / "gray"
    for path, _ in SafeImageFolder(rgb / "train", None).samples + \
            SafeImageFolder(rgb / "val", None).samples:
        dest = gray / Path(path).relative_to(rgb)
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(dest)
    assert build_data(resolve("folder", **{**base, "data_dir": str(gray)})).in_channels == 1


def test_a_colour_model_takes_16_bit_files_repeated_not_clipped(sixteen):
    cfg = resolve("folder", data_dir=str(sixteen), image_size=8, workers=0,
                  model_overrides={"in_channels": 3})
    built = build_data(cfg, splits=("val",))
    ds = built.loaders["val"].dataset
    x, _ = ds[len(ds) - 1]
    assert built.in_channels == 3 and x.shape == (3, 8, 8)
    pre = built.preprocessing
    unit = x * torch.tensor(pre["std"]).view(3, 1, 1) + torch.tensor(pre["mean"]).view(3, 1, 1)
    assert torch.allclose(unit[0], unit[1], atol=1e-6) and torch.allclose(unit[1], unit[2],
                                                                           atol=1e-6)
    raw = np.asarray(Image.open(ds.samples[-1][0]), dtype=np.float64) / 65535
    assert RANGES["low"][0] / 65535 - 1e-6 <= float(unit.min()) <= float(unit.max()) \
        <= RANGES["low"][1] / 65535 + 1e-6  # sorted classes: the last sample is "low"
    assert float(unit.mean()) == pytest.approx(raw.mean(), abs=0.002)


def test_colour_augmentation_runs_on_16_bit_images(sixteen):
    """PIL's colour ops take 8-bit images only: wide ones go through them as tensors."""
    cfg = resolve("folder", data_dir=str(sixteen), image_size=8, workers=0,
                  augmentation="imagenet", auto_augment="rand-m9-n2")
    ds = build_data(cfg, splits=("train",)).loaders["train"].dataset
    torch.manual_seed(0)
    x, _ = ds[(0, 1)]
    assert x.shape == (1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, ds[(0, 1)][0])  # seeded per image
    torch.manual_seed(0)
    lit = Lighting(0.1)(torch.zeros(1, 2, 2))
    assert lit.shape == (1, 2, 2) and len(lit.unique()) == 1
    img = open_image(ds.samples[0][0], 1)
    assert img.mode == "F" and apply_transform(lambda i: i.mode, img) == "F"


def test_channel_statistics():
    assert channel_stats([0.5], 3) == [0.5, 0.5, 0.5]
    assert channel_stats([0.2, 0.4, 0.6], 1) == pytest.approx([0.4])
    assert channel_stats([0.2, 0.4, 0.6], 3) == [0.2, 0.4, 0.6]
    with pytest.raises(ValueError, match="2 mean/std values cannot normalise 3-channel"):
        channel_stats([0.2, 0.4], 3)
