"""Volume folders for 3D DenseNets: reading .npy and NIfTI files, intensity scaling and
resampling shared with ``predict``, augmentation, sharding, the CLI end to end (train, eval,
predict, export) and the offline 3D digits demo."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import run_cli

from densenets import load
from densenets.deploy.predict import model_input
from densenets.training import digits3d
from densenets.training.data import build_data
from densenets.training.recipes import resolve
from densenets.training.volumes import VolumeTransform, save_volume
from densenets.weights.preprocessing import read_volume, scale_intensity, volume_preprocessing

pytestmark = pytest.mark.usefixtures("one_thread_module")
SIZE = ["6", "6", "6"]
TINY = ["--model", "densenet-bc-10-k4", "--volume-size", *SIZE, "--workers", "0"]


def blob(rng: np.random.Generator, label: int, shape=(7, 8, 9)) -> np.ndarray:
    """Noise plus, for class 1, a bright centre (flip-invariant, so augmentation keeps it)."""
    v = rng.normal(100, 10, shape)
    if label:
        v[2:-2, 2:-2, 2:-2] += 80
    return v.astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/{empty,centre} and val/ likewise, .npy and .nii.gz mixed, one corrupt file."""
    root = tmp_path_factory.mktemp("vol") / "ds"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for label, name in enumerate(("centre", "empty")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                suffix = ".npy" if i % 2 else ".nii.gz"
                save_volume(d / f"{i}{suffix}", blob(rng, 1 - label))
    (root / "train" / "empty" / "broken.nii.gz").write_bytes(b"not a volume at all")
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code, stdout, err = run_cli(["train", "--recipe", "volumes", "--data-dir", str(folder),
                                 *TINY, "--epochs", "2", "--batch-size", "7", "--out",
                                 str(out)])
    assert code == 0, err
    return out, stdout, err


def test_files_are_read_as_written(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    for name in ("a.npy", "a.nii", "a.nii.gz"):
        save_volume(tmp_path / name, a)
        assert torch.equal(read_volume(tmp_path / name), torch.from_numpy(a).float())
    np.save(tmp_path / "c.npy", a[None])  # a leading channel axis of 1
    assert read_volume(tmp_path / "c.npy").shape == (2, 3, 4)
    # NIfTI's scaling (scl_slope, scl_inter) gives the real values, e.g. Hounsfield units.
    img = nibabel.Nifti1Image(a, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nibabel.save(img, tmp_path / "ct.nii.gz")
    assert torch.equal(read_volume(tmp_path / "ct.nii.gz"), torch.from_numpy(a * 2.0 - 1024))
    for bad, says in ((np.zeros((2, 3)), "a 3D volume was expected"),
                      (np.full((2, 2, 2), np.nan), "NaN or infinite"),
                      (np.zeros((2, 2, 2, 2)), "shape (2, 2, 2, 2)")):
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(ValueError, match=re_escape(says)):
            read_volume(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable volume"):
        read_volume(tmp_path / "obj.npy")  # pickles are never loaded


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_intensity_scaling_against_float64():
    x = torch.randn(5, 6, 7, dtype=torch.float64) * 300 + 40
    z = (x - x.mean()) / x.std(correction=0)
    assert torch.allclose(scale_intensity(x.float()).double(), z, atol=1e-5)
    w = scale_intensity(x.float(), [-100.0, 200.0]).double()
    assert torch.allclose(w, ((x.clamp(-100, 200) + 100) / 300), atol=1e-6)
    assert torch.equal(scale_intensity(torch.full((2, 2, 2), 7.0)), torch.zeros(2, 2, 2))


def test_evaluation_is_what_predict_does_and_training_augments(tmp_path):
    x = torch.from_numpy(blob(np.random.default_rng(1), 1))
    pre = volume_preprocessing([4, 5, 6], None)
    ev = VolumeTransform([4, 5, 6], None)(x)
    ref = F.interpolate(scale_intensity(x)[None, None], size=(4, 5, 6), mode="trilinear",
                        align_corners=False)[0]
    assert ev.shape == (1, 4, 5, 6) and torch.equal(ev, ref)
    save_volume(tmp_path / "v.npy", x.numpy())
    assert torch.equal(model_input(tmp_path / "v.npy", pre, 1), ev)
    train = VolumeTransform([4, 5, 6], None, augment=True)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(train(x))
    assert outs[0].shape == (1, 4, 5, 6)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # Without crops the augmentation is a flip of the evaluation volume along some axes.
    flat = torch.arange(8.0).view(2, 2, 2)
    aug = VolumeTransform([2, 2, 2], [0.0, 7.0], augment=True)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        y = aug(flat)[0]
        flips = [d for d in range(3) if torch.equal(y, (flat / 7).flip(d))]
        seen.add(torch.equal(y, flat / 7) or bool(flips) or
                 any(torch.equal(y, (flat / 7).flip(list(c))) for c in ((0, 1), (0, 2),
                                                                       (1, 2), (0, 1, 2))))
    assert seen == {True}


def test_train_eval_predict_export_from_the_cli(run, folder, tmp_path):
    out, stdout, err = run
    # The corrupt file is named and skipped; the others train (12 readable of 13).
    assert "skipped unreadable volume" in err and "broken.nii.gz" in err
    assert "12 train, 6 val" in stdout
    model = load(out)
    assert model.config.spatial_dims == 3 and model.config.in_channels == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preprocessing"]["volume_size"] == [6, 6, 6]
    assert cfg["preprocessing"]["intensity_window"] is None
    code, s, e = run_cli(["eval", str(out), "--json"])
    assert code == 0, e
    assert json.loads(s)["images"] == 6 and json.loads(s)["split"] == "val"
    files = sorted((folder / "val").rglob("*.nii.gz"))[:2]
    code, s, e = run_cli(["predict", str(out), *map(str, files), "--json"])
    assert code == 0, e
    got = json.loads(s)["predictions"]
    assert [p["file"] for p in got] == [str(f) for f in files]
    for p, f in zip(got, files, strict=True):
        with torch.no_grad():
            probs = torch.softmax(model.eval()(model_input(f, model.weights_meta[
                "preprocessing"], 1)[None]), 1)[0]
        assert sum(t["probability"] for t in p["topk"]) == pytest.approx(1.0, abs=1e-5)
        assert p["topk"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    code, s, e = run_cli(["predict", str(out), str(files[0])])
    assert code == 0 and "resampled to 6x6x6" in s and "%" in s
    code, s, e = run_cli(["export", str(out), "--format", "torchscript", "-o",
                          str(tmp_path / "m.pt"), "--json"])
    assert code == 0, e
    info = json.loads(s)
    assert info["example_input"] == [1, 1, 6, 6, 6] and info["check_passed"]


def test_a_sharded_epoch_is_the_single_process_one(folder):
    cfg = resolve("volumes", data_dir=str(folder), volume_size=[4, 4, 4], workers=0,
                  batch_size=5)
    whole = list(build_data(cfg, splits=("train",)).loaders["train"].batches(1))
    parts = [list(build_data(cfg, splits=("train",)).loaders["train"].shard(r, 2).batches(1))
             for r in (0, 1)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)


def test_bad_volume_settings_are_one_line_errors(folder):
    base = ["train", "--recipe", "volumes", "--data-dir", str(folder), "--workers", "0"]
    for extra, says in ((["--volume-size", "0", "4", "4"], "three positive sides"),
                        (["--intensity-window", "5", "1"], "LO < HI"),
                        (["--in-channels", "3"], "volumes have one channel")):
        code, _, err = run_cli([*base, *extra])
        assert code == 2 and says in err and "Traceback" not in err, err


def test_the_demo_volumes_are_what_the_docs_say(monkeypatch):
    monkeypatch.setattr(digits3d, "NOISE", 0.0)
    volumes, labels = digits3d.digit_volumes()
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)
    assert volumes.shape == (1797, digits3d.DEPTH, 8, 8)
    assert torch.equal(labels, torch.tensor(load_digits().target))
    for v, img in zip(volumes[:200], images[:200], strict=True):
        filled = [z for z in range(digits3d.DEPTH) if v[z].abs().sum() > 0]
        assert digits3d.MIN_THICKNESS <= len(filled) <= digits3d.MAX_THICKNESS
        assert filled == list(range(filled[0], filled[-1] + 1))  # consecutive slices
        assert all(torch.equal(v[z], img) for z in filled)
    parts = digits3d.digit_volumes_split()
    assert len(parts["train"][1]) == 1437 and len(parts["test"][1]) == 360


@pytest.mark.slow
def test_the_3d_demo_reaches_its_stated_accuracy(tmp_path):
    code, stdout, err = run_cli(["train", "--recipe", "digits3d", "--out", str(tmp_path / "r")])
    assert code == 0, err
    line = stdout.split("test:")[1].splitlines()[0]
    accuracy = float(line.split("(accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0, line


def test_the_run_report_of_a_volume_run(run):
    """The HTML report sizes its summary by the run's volumes, not an image crop."""
    from densenets.analysis.report import build_report

    page = build_report(run[0])
    assert "per 6×6×6 volume" in page and "output (C×D×H×W)" in page
