"""Evaluation: top-1/top-5 error against a plain reference, the 10-crop path, and the eval verb
on a fake CIFAR directory and an image folder written by the tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import write_fake_cifar, write_image_folder
from torch import nn
from torchvision import transforms as T

from densenets import DenseNet
from densenets.cli import main
from densenets.training.checkpoint import load_checkpoint
from densenets.training.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


class Fixed(nn.Module):
    """Returns preset logits, ignoring the images' values (row i of ``logits`` for image i)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x[:, 0, 0, 0].long()
        return self.logits[idx]


def test_topk_errors_and_loss_match_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 12, generator=g, dtype=torch.float64)
    target = torch.randint(0, 12, (50,), generator=g)
    images = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1).expand(50, 1, 2, 2)
    batches = [(images[i:i + 16], target[i:i + 16]) for i in range(0, 50, 16)]
    m = evaluate(Fixed(logits.float()), batches)
    ranks = [(logits[i] > logits[i, target[i]]).sum().item() for i in range(50)]
    assert m["n"] == 50
    assert m["top1_err"] == pytest.approx(100 * np.mean([r >= 1 for r in ranks]))
    assert m["top5_err"] == pytest.approx(100 * np.mean([r >= 5 for r in ranks]))
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)


def test_ten_crop_batches_average_the_logits_of_their_crops():
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7)).double()
    x = torch.randn(5, 10, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=g)
    m = evaluate(net, [(x, y)])
    avg = torch.stack([net(x[i]).mean(0) for i in range(5)])
    assert m["loss"] == pytest.approx(F.cross_entropy(avg, y).item(), rel=1e-9)
    assert m["top1_err"] == pytest.approx(100 * (avg.argmax(1) != y).double().mean().item())


def test_eval_on_a_fake_cifar_directory(tmp_path, capsys):
    write_fake_cifar(tmp_path / "cifar", n_train=100, n_test=40)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "cifar10+", "--model", "densenet-bc-16-k4", "--epochs",
                 "1", "--batch-size", "20", "--data-dir", str(tmp_path / "cifar"),
                 "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["recipe"], out["split"], out["images"]) == ("cifar10+", "test", 40)
    assert out["top1_err"] == pytest.approx(summary["final"]["test_top1_err"], abs=1e-7)
    assert main(["eval", str(run), "--split", "val"]) == 2
    assert "no held-out validation set" in capsys.readouterr().err
    assert main(["eval", str(run), "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and str(tmp_path / "missing") in err
    assert main(["eval", str(run), "--ten-crop"]) == 2
    assert "ImageNet evaluation" in capsys.readouterr().err


def test_cifar_validation_hold_out_is_evaluated_each_epoch(tmp_path, capsys):
    write_fake_cifar(tmp_path / "cifar", n_train=100, n_test=40)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "cifar10", "--model", "densenet-bc-16-k4", "--epochs", "1",
                 "--batch-size", "25", "--val-split", "30", "--data-dir",
                 str(tmp_path / "cifar"), "--out", str(run)]) == 0
    final = json.loads((run / "summary.json").read_text())["final"]
    assert {"val_top1_err", "test_top1_err"} <= set(final)
    assert load_checkpoint(run / "best.pt")["best"]["split"] == "val"
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 30 and out["top1_err"] == pytest.approx(final["val_top1_err"])
    assert out["checkpoint"] == str(run / "best.pt")  # chosen on validation, so reported


def test_missing_cifar_without_download_names_files_and_directory(tmp_path, capsys):
    assert main(["train", "--recipe", "cifar100", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cifar-100-python" in err and "train" in err and str(tmp_path) in err
    assert "--download" in err


def test_ten_crop_eval_on_an_image_folder_matches_a_manual_ten_crop(tmp_path, capsys):
    root = write_image_folder(tmp_path / "ds", per_class=3, size=20)
    run = tmp_path / "run"
    assert main(["train", "--recipe", "folder", "--model", "densenet-bc-16-k4", "--epochs", "1",
                 "--batch-size", "4", "--image-size", "16", "--workers", "0", "--data-dir",
                 str(root), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run / "last.pt"), "--ten-crop", "--json", "--workers", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["split"], out["images"], out["ten_crop"]) == ("val", 6, True)

    state = load_checkpoint(run / "last.pt")
    model = DenseNet(**state["model_config"]).eval()
    model.load_state_dict(state["model"])
    prep = state["meta"]["preprocessing"]
    assert (prep["crop"], prep["resize"]) == (16, 18)
    norm = T.Normalize(prep["mean"], prep["std"])
    logits, labels = [], []
    for label, name in enumerate(("cat", "dog")):
        for path in sorted((root / "val" / name).iterdir()):
            img = T.Resize(18)(Image.open(path).convert("RGB"))
            crops = torch.stack([norm(T.functional.to_tensor(c)) for c in T.TenCrop(16)(img)])
            with torch.no_grad():
                logits.append(model(crops).mean(0))
            labels.append(label)
    ref = F.cross_entropy(torch.stack(logits), torch.tensor(labels)).item()
    assert out["loss"] == pytest.approx(ref, rel=1e-4)
    assert main(["eval", str(run), "--workers", "0", "--json"]) == 0  # single crop still works
