"""Issue 16: what a new user hit in predict, export, the folder recipe, CPU defaults, the notebook
and ``summary``. Each test names the point of the issue it holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from support import vary_bn, write_image_folder

from densenets import create_model, load, save, summary
from densenets.cli import main
from densenets.deploy.predict import predict_files
from densenets.training import config
from densenets.training.data import build_data
from densenets.training.imagefolder import eval_transform, train_transform
from densenets.training.recipes import TrainConfig, resolve

pytestmark = pytest.mark.usefixtures("one_thread_module")
TINY = "densenet-bc-16-k4"
MEAN, STD = 0.3, 0.37


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """One real digit as an 8x8 8-bit PNG, the same pixels as a 16-bit PNG, and a 32x32 copy."""
    d = tmp_path_factory.mktemp("digit")
    pix = (load_digits().images[0] * 255 / 16).astype(np.uint8)
    Image.fromarray(pix).save(d / "d8.png")
    Image.fromarray(pix.astype(np.uint16) * 257).save(d / "d16.png")  # 255 -> 65535
    Image.fromarray(pix).resize((32, 32), Image.NEAREST).save(d / "d32.png")
    assert Image.open(d / "d16.png").mode == "I;16"
    return d


def digits_style_checkpoint(path: Path, in_channels: int = 1) -> Path:
    """A model with varied BN so outputs depend on the input; preprocessing stores no resize,
    as the digits runs did before this issue."""
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=10, in_channels=in_channels)
    vary_bn(model)
    meta = {"class_names": [str(i) for i in range(10)], "preprocessing": {
        "resize": None, "crop": 8, "mean": [MEAN] * in_channels, "std": [STD] * in_channels}}
    return save(model, path, meta=meta)


def probs(report) -> list[list[float]]:
    return [[t["probability"] for t in p.topk] for p in report.predictions]


# ---------------------------------------------------------------- 1. predict on ordinary images


def test_16_bit_png_is_scaled_by_its_range_not_clipped(tmp_path, digit_files):
    for c in (1, 3):  # grayscale model, and a colour model fed a 16-bit grayscale file
        model = load(digits_style_checkpoint(tmp_path / f"m{c}.safetensors", c))
        report = predict_files(model, [digit_files / "d8.png", digit_files / "d16.png"], topk=10)
        eight, sixteen = report.predictions
        assert [t["index"] for t in eight.topk] == [t["index"] for t in sixteen.topk]
        assert np.allclose(probs(report)[0], probs(report)[1], atol=1e-6)
        assert any("scaled from 0..65535" in n for n in sixteen.preprocessed)
        assert not any("scaled" in n for n in eight.preprocessed)


def test_a_larger_image_is_resized_to_the_input_not_cut_from_its_middle(tmp_path, digit_files,
                                                                       capsys):
    model = load(digits_style_checkpoint(tmp_path / "m.safetensors"))
    report = predict_files(model, [digit_files / "d32.png"], topk=10)
    small = Image.open(digit_files / "d32.png").resize((8, 8), Image.BILINEAR)
    x = (torch.from_numpy(np.asarray(small, dtype=np.float32) / 255) - MEAN) / STD
    with torch.no_grad():
        ref = torch.softmax(model.eval()(x[None, None]), 1)[0].sort(descending=True)
    assert [t["index"] for t in report.predictions[0].topk] == ref.indices.tolist()
    assert np.allclose(probs(report)[0], ref.values, atol=1e-5)
    assert report.predictions[0].preprocessed == ["resized 32x32 to 8x8 (bilinear)"]
    # The CLI says what was done to the image, and nothing for one already at the input size.
    assert main(["predict", str(tmp_path / "m.safetensors"), str(digit_files / "d32.png"),
                 str(digit_files / "d8.png"), "--topk", "1"]) == 0
    err = capsys.readouterr().err
    assert "d32.png: resized 32x32 to 8x8" in err and "d8.png" not in err
    # New digits checkpoints store the resize themselves.
    assert build_data(resolve("digits"), splits=("test",)).preprocessing["resize"] == 8


# ---------------------------------------------------------------- 2. random weights


def test_predict_says_when_the_weights_are_random(tmp_path, digit_files, capsys):
    img = str(digit_files / "d8.png")
    assert main(["predict", TINY, img, "--topk", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == "random" and "--weights imagenet" in out["warning"]
    assert main(["predict", TINY, img, "--topk", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "random weights" in header and "untrained" in header
    ckpt = str(digits_style_checkpoint(tmp_path / "m.safetensors"))
    assert main(["predict", ckpt, img, "--topk", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == "trained" and "warning" not in out
    assert main(["predict", ckpt, img, "--topk", "1"]) == 0
    assert "random" not in capsys.readouterr().out


# ---------------------------------------------------------------- 3. export destinations


def _unwritable_dir(tmp_path: Path) -> Path:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o555)
    if _cannot_create(d):
        return d
    # The superuser ignores permission bits; sysfs refuses new files even to it.
    if Path("/sys").is_dir() and _cannot_create(Path("/sys")):
        return Path("/sys")
    pytest.skip("no directory here refuses writes to this user")


def _cannot_create(d: Path) -> bool:
    try:
        (d / "densenets-probe").touch()
    except OSError:
        return True
    (d / "densenets-probe").unlink()
    return False


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt"),
                                         ("exported-program", ".pt2")])
def test_export_to_an_unwritable_destination_is_one_line_exit_2(tmp_path, capsys, monkeypatch,
                                                                fmt, suffix):
    import densenets.deploy.export as ex

    def must_not_run(*a, **k):
        raise AssertionError("the export ran before the destination was checked")

    for fn in ("_export_onnx", "_batch_dim"):
        monkeypatch.setattr(ex, fn, must_not_run)
    monkeypatch.setattr(ex.torch.jit, "trace", must_not_run)
    (tmp_path / "a_file").write_text("x")
    destinations = {
        "is a directory": tmp_path,
        "is a file, not a folder": tmp_path / "a_file" / f"m{suffix}",
        "cannot write": _unwritable_dir(tmp_path) / f"m{suffix}",
    }
    for reason, dest in destinations.items():
        assert main(["export", TINY, "--format", fmt, "-o", str(dest)]) == 2, reason
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("densenets export: error: "), err
        assert reason in err[0] and "Traceback" not in err[0]
        with pytest.raises(ValueError, match=reason):  # the library checks first too
            ex.export(create_model(TINY), dest, fmt)
    (tmp_path / "locked").chmod(0o755)


# ---------------------------------------------------------------- 4. the folder recipe


def test_augmentation_defaults_by_image_size_and_can_be_chosen():
    assert resolve("folder").augmentation == "imagenet"  # 224 crops: photos
    small = resolve("folder", image_size=32)
    assert (small.augmentation, small.augment) == ("standard", True)
    off = resolve("folder", image_size=32, augmentation="none")
    assert (off.augmentation, off.augment) == ("none", False)
    assert resolve("imagenet", image_size=32).augmentation == "imagenet"  # the paper's, fixed
    assert resolve("cifar10+").augmentation == "standard"
    assert resolve("digits").augmentation == "none"
    with pytest.raises(ValueError, match="--augment imagenet is for image folders"):
        resolve("cifar10", augmentation="imagenet")
    # A config.json written before the policy existed keeps meaning what it did.
    old = {k: v for k, v in resolve("folder").to_dict().items() if k != "augmentation"}
    assert TrainConfig.from_dict(old).augmentation == "imagenet"
    old = {k: v for k, v in resolve("cifar10+").to_dict().items() if k != "augmentation"}
    assert TrainConfig.from_dict(old).augmentation == "standard"


def test_standard_augmentation_only_shifts_and_flips(tmp_path):
    """Pad-4 crop + flip: every output pixel is an input pixel (normalised) or padding, and the
    colours are untouched; "none" is the evaluation transform."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ref = eval_transform(16, None, [0.5] * 3, [0.25] * 3)(img)
    torch.manual_seed(0)
    outs = [train_transform(16, None, [0.5] * 3, [0.25] * 3, "standard")(img) for _ in range(8)]
    allowed = set(ref.flatten().tolist()) | {0.0}
    for x in outs:
        assert x.shape == (3, 16, 16) and set(x.flatten().tolist()) <= allowed
    assert any(not torch.equal(x, ref) for x in outs)
    assert torch.equal(train_transform(16, None, [0.5] * 3, [0.25] * 3, "none")(img), ref)


def test_folder_training_records_the_augmentation_and_counts_readable_images(tmp_path, capsys):
    root = write_image_folder(tmp_path / "ds", per_class=3, size=16)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "folder", "--data-dir", str(root), "--model", TINY,
                 "--image-size", "16", "--augment", "none", "--epochs", "1", "--batch-size",
                 "4", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["augmentation"], cfg["augment"]) == ("none", False)
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("training"))
    assert ": 6 train, 6 val images;" in header  # broken.png is not counted


# ---------------------------------------------------------------- 5. CPU defaults


def test_workers_default_to_what_the_machine_has(monkeypatch):
    for cores, expected in ((1, 0), (2, 0), (4, 3), (64, 8)):
        monkeypatch.setattr(config.os, "sched_getaffinity", lambda _, n=cores: set(range(n)),
                            raising=False)
        assert config.default_workers() == expected
        assert resolve("folder").workers == expected
        assert resolve("folder", workers=5).workers == 5


def test_amp_fp16_on_a_cpu_is_refused_with_a_pointer_to_bf16(tmp_path, capsys):
    assert main(["train", "--amp", "fp16", "--device", "cpu", "--model", TINY, "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--amp fp16" in err[0] and "--amp bf16" in err[0]
    assert not (tmp_path / "run" / "config.json").exists()
    ckpt = digits_style_checkpoint(tmp_path / "m.pt")
    assert main(["eval", str(ckpt), "--recipe", "digits", "--amp", "fp16", "--device",
                 "cpu"]) == 2
    assert "--amp bf16" in capsys.readouterr().err


# ---------------------------------------------------------------- 6. the notebook


def test_summary_has_a_short_repr_and_rich_displays():
    s = summary(create_model("densenet121"), name="densenet121")
    r = repr(s)
    assert len(r) < 150 and "densenet121" in r and f"{s.total_params:,}" in r
    html = s._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == len(s.rows) + 2
    assert all(f">{row.name}</td>" in html for row in s.rows)

    printed = []

    class Printer:  # the one method of IPython's RepresentationPrinter that is used
        def text(self, t: str) -> None:
            printed.append(t)

    s._repr_pretty_(Printer(), False)
    assert printed == [str(s)]


def test_wrong_dtype_and_unbatched_inputs_get_friendly_errors():
    model = create_model(TINY).eval()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"float64 but this DenseNet holds float32.*x\.to\("
                                         r"torch\.float32\)"):
        model(x.double())
    with pytest.raises(ValueError, match=r"uint8 but this DenseNet holds float32.*/ 255"):
        model((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"one image of shape \(3, 32, 32\).*unsqueeze\(0\)"):
        model(x[0])
    with torch.no_grad():  # what still works: matching dtypes, and autocast's own casting
        assert model.double()(x.double()).dtype == torch.float64
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x.bfloat16()).shape == (1, 10)


# ---------------------------------------------------------------- 7. summary of a checkpoint


def test_summary_takes_checkpoints_and_run_directories(tmp_path, capsys):
    ckpt = digits_style_checkpoint(tmp_path / "m.safetensors")
    run = tmp_path / "run"
    save(load(ckpt), run / "best.pt")
    for source in (ckpt, run):
        assert main(["summary", str(source), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["input_size"] == [1, 1, 8, 8]  # the size the weights were trained at
        assert out["total_params"] == sum(p.numel() for p in load(ckpt).parameters())
    assert main(["summary", str(run)]) == 0
    assert "dense block" in capsys.readouterr().out
    assert main(["summary", str(ckpt), "--growth-rate", "12"]) == 2
    assert "--growth-rate applies to a zoo name" in capsys.readouterr().err
