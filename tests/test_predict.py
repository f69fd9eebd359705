"""Issue 3, item 7: predict on image files with the weights' own preprocessing and names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from support import vary_bn

from densenets import create_model, load, save
from densenets.cli import main
from densenets.deploy.predict import predict_files
from densenets.weights.pretrained import imagenet_class_names

NAMES = [f"digit {i}" for i in range(10)]

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real digits as 40x40 RGB PNGs, plus files that are not images."""
    d = tmp_path_factory.mktemp("images")
    digits = load_digits()
    paths = []
    for i in range(3):
        img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
        img.resize((40, 40), Image.NEAREST).convert("RGB").save(d / f"digit{i}.png")
        paths.append(d / f"digit{i}.png")
    (d / "notes.txt").write_text("not an image")
    (d / "cut.png").write_bytes((d / "digit0.png").read_bytes()[:60])
    return paths, d / "notes.txt", d / "cut.png", d


def checkpoint(tmp_path, mean: float, in_channels: int = 3):
    torch.manual_seed(0)
    model = create_model("densenet-bc-16-k4", num_classes=10, in_channels=in_channels)
    vary_bn(model)
    meta = {"class_names": NAMES, "preprocessing": {
        "resize": 32, "crop": 32, "mean": [mean] * in_channels, "std": [0.25] * in_channels,
        "interpolation": "bilinear"}}
    return save(model, tmp_path / f"m{mean}-{in_channels}.safetensors", meta=meta)


def reference_probs(model, path, mean: float, mode: str = "RGB") -> torch.Tensor:
    """Plain PIL + numpy: resize 40 -> 32 bilinear, crop is then the whole image, normalise."""
    img = Image.open(path).convert(mode).resize((32, 32), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255
    a = a[..., None] if a.ndim == 2 else a
    x = torch.from_numpy((a - mean) / 0.25).permute(2, 0, 1)[None]
    with torch.no_grad():
        return torch.softmax(model.eval()(x), 1)[0]


@pytest.mark.parametrize("in_channels, mode", [(3, "RGB"), (1, "L")])
def test_predictions_use_the_stored_preprocessing(tmp_path, images, in_channels, mode):
    paths, *_ = images
    results = {}
    for mean in (0.2, 0.7):
        ckpt = checkpoint(tmp_path, mean, in_channels)
        model = load(ckpt)
        report = predict_files(model, paths, topk=3, batch_size=2)
        assert [p.file for p in report.predictions] == [str(p) for p in paths]
        for pred, path in zip(report.predictions, paths, strict=True):
            ref = reference_probs(model, path, mean, mode)
            top = ref.topk(3)
            assert [t["index"] for t in pred.topk] == top.indices.tolist()
            assert [t["label"] for t in pred.topk] == [NAMES[i] for i in top.indices]
            assert np.allclose([t["probability"] for t in pred.topk], top.values, atol=1e-5)
        results[mean] = [t["probability"] for t in report.predictions[0].topk]
    assert results[0.2] != results[0.7]  # the normalisation really came from the file


def test_cli_skips_unreadable_files_by_name_and_predicts_the_rest(tmp_path, images, capsys):
    paths, notes, cut, folder = images
    ckpt = checkpoint(tmp_path, 0.5)
    args = ["predict", str(ckpt), str(paths[0]), str(notes), str(cut), str(folder),
            str(tmp_path / "absent.jpg"), str(paths[1]), "--topk", "2", "--json"]
    assert main(args) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [p["file"] for p in out["predictions"]] == [str(paths[0]), str(paths[1])]
    assert all(len(p["topk"]) == 2 and p["topk"][0]["label"] in NAMES
               for p in out["predictions"])
    skipped = {s["file"]: s["error"] for s in out["skipped"]}
    assert set(skipped) == {str(notes), str(cut), str(folder), str(tmp_path / "absent.jpg")}
    assert skipped[str(tmp_path / "absent.jpg")] == "no such file"
    for f in skipped:
        assert f"skipped {f}:" in captured.err
    # text output: one block per image, class names and percentages
    assert main(["predict", str(ckpt), str(paths[2]), "--topk", "3"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1] == str(paths[2]) and len(text) == 5 and "%  digit " in text[2]


def test_imagenet_architecture_predicts_imagenet_class_names(tmp_path, images):
    """A bare 1000-class densenet121 state dict (as published) gets ImageNet's names and
    its resize-256 / crop-224 evaluation transform."""
    path = tmp_path / "densenet121.pth"
    torch.save(create_model("densenet121").state_dict(), path)
    model = load(path)
    report = predict_files(model, images[0][:1], topk=5)
    names = imagenet_class_names()
    assert [t["label"] for t in report.predictions[0].topk] == \
        [names[t["index"]] for t in report.predictions[0].topk]


def test_predict_rejects_bad_arguments(tmp_path, images, capsys):
    ckpt = checkpoint(tmp_path, 0.5)
    assert main(["predict", str(ckpt), str(images[0][0]), "--topk", "0"]) == 2
    assert main(["predict", str(ckpt), str(images[0][0]), "--weights", "imagenet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--topk must be >= 1" in err[0] and "--weights applies to a zoo name" in err[1]


def test_device_is_checked_and_resolved_in_one_place(tmp_path, images, capsys):
    from densenets.device import check_device, resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        check_device("gpu0")
    ckpt = checkpoint(tmp_path, 0.5)
    report = predict_files(load(ckpt), images[0][:1], device="auto")  # any verb's spelling
    assert len(report.predictions) == 1
    for verb in (["predict", str(ckpt), str(images[0][0])], ["eval", str(ckpt)],
                 ["bench", "densenet-bc-16-k4"], ["train", "--epochs", "1"]):
        assert main([*verb, "--device", "gpu0"]) == 2, verb
        assert "--device must be auto, cpu, cuda or cuda:N, got 'gpu0'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["predict", str(ckpt), str(images[0][0]), "--device", "cuda:1"]) == 2
        assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err
