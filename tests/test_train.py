"""The training loop end to end on real data (digits), the run directory, and NaN handling."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from densenets import DenseNet
from densenets.cli import main
from densenets.training.checkpoint import FORMAT, load_checkpoint
from densenets.training.data import TensorLoader, load_digits_data
from densenets.training.loop import Schedule, Trainer, TrainingDiverged

TINY = ["--model", "densenet-bc-16-k8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real 2-epoch digits run through the CLI, shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    code = main(["train", *TINY, "--epochs", "2", "--out", str(out)])
    assert code == 0
    return out


def test_two_epoch_digits_run_learns(digits_run):
    rows = _rows(digits_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[1]["test_loss"]) < float(rows[0]["test_loss"])
    assert float(rows[1]["test_top1_err"]) < 40.0  # chance is 90% error


def test_run_directory_holds_the_contract(digits_run):
    names = {p.name for p in digits_run.iterdir()}
    assert {"config.json", "metrics.csv", "last.pt", "best.pt", "curves.png",
            "summary.json"} <= names
    cols = list(_rows(digits_run)[0])
    for c in ("epoch", "lr", "train_loss", "train_top1_err", "test_loss", "test_top1_err",
              "test_top5_err", "seconds", "images_per_s"):
        assert c in cols
    assert (digits_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((digits_run / "config.json").read_text())
    assert config["recipe"] == "digits" and config["epochs"] == 2 and config["model"] == TINY[1]
    for name in ("last.pt", "best.pt"):
        ck = torch.load(digits_run / name, weights_only=True)
        assert ck["format"] == FORMAT and ck["version"] == 1
        assert ck["meta"]["class_names"] == [str(i) for i in range(10)]
        assert ck["meta"]["recipe"] == "digits"
        prep = ck["meta"]["preprocessing"]
        assert prep["crop"] == 8 and len(prep["mean"]) == 1 and prep["interpolation"] == "bilinear"
        assert ck["model_config"]["in_channels"] == 1 and ck["model_name"] == TINY[1]
        assert {"optimizer", "epoch", "step", "rng", "metrics", "config"} <= set(ck)
        DenseNet(**ck["model_config"]).load_state_dict(ck["model"])
    summary = json.loads((digits_run / "summary.json").read_text())
    last = _rows(digits_run)[-1]
    assert summary["final"]["test_top1_err"] == pytest.approx(float(last["test_top1_err"]),
                                                              rel=1e-5)
    assert summary["epochs_completed"] == 2


def test_eval_verb_reproduces_the_runs_test_error(digits_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(digits_run / "last.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = json.loads((digits_run / "summary.json").read_text())
    assert out["split"] == "test" and out["images"] == 360
    assert out["top1_err"] == pytest.approx(summary["final"]["test_top1_err"], abs=1e-7)
    assert out["loss"] == pytest.approx(summary["final"]["test_loss"], rel=1e-5)
    assert main(["eval", str(digits_run), "--json"]) == 0  # no validation split: last.pt
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(digits_run / "last.pt")


def test_plain_output_is_one_line_per_epoch(tmp_path, capsys):
    assert main(["train", "--model", "densenet-bc-16-k4", "--epochs", "2", "--amp", "bf16",
                 "--channels-last", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and "img/s" in lines[0] and "test loss" in lines[0]
    assert "finished 2 epochs" in out


def test_existing_run_directory_is_not_overwritten(digits_run, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(digits_run)]) == 2
    assert "--resume" in capsys.readouterr().err


class NaNAfter(nn.Module):
    """Any nn.Module: a linear classifier whose output turns NaN from its ``n``-th training call."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                out = out * float("nan")
        return out


def _trainer(model, run_dir, epochs=3, **kw) -> Trainer:
    train, test = load_digits_data()
    return Trainer(model, TensorLoader(train, 64, [0.3], [0.4], shuffle=True),
                   {"test": TensorLoader(test, 500, [0.3], [0.4])}, epochs=epochs,
                   schedule=Schedule(0.1, [2]), run_dir=run_dir, progress=False,
                   log=lambda s: None, **kw)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    steps_per_epoch = 23
    t = _trainer(NaNAfter(steps_per_epoch + 5), tmp_path)
    with pytest.raises(TrainingDiverged) as e:
        t.fit()
    msg = str(e.value)
    assert f"step {steps_per_epoch + 5} " in msg and "epoch 2, batch 5 of 23" in msg
    assert str(tmp_path / "last.pt") in msg
    good = load_checkpoint(tmp_path / "last.pt")
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values())
    assert len(good["metrics"]) == 1


def test_nan_detected_late_on_accelerators_still_names_the_first_bad_step(tmp_path):
    t = _trainer(NaNAfter(7), tmp_path, sync_every=5)  # the GPU path checks every few steps
    with pytest.raises(TrainingDiverged, match=r"step 7 \(epoch 1, batch 7 of 23\)"):
        t.fit()
    assert not (tmp_path / "last.pt").exists()


def test_nan_exits_1_from_the_cli(tmp_path, capsys):
    code = main(["train", "--model", "densenet-bc-16-k4", "--epochs", "1", "--lr", "1e30",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "loss is" in err and "at step" in err and "Lower --lr" in err


def test_any_module_with_a_plain_dataloader(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    train, test = load_digits_data()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=32, shuffle=True)
    t = Trainer(mlp, loader, {"test": [(test.images, test.labels)]}, epochs=3,
                schedule=Schedule(0.1, [2]), run_dir=tmp_path, progress=False,
                log=lambda s: None)
    s = t.fit().summary
    assert s["steps"] == 3 * len(loader) and s["final"]["test_top1_err"] < 30.0
    assert t.history[-1]["train_loss"] < t.history[0]["train_loss"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def test_grouped_settings_and_the_flat_keywords_of_earlier_versions_train_alike(tmp_path):
    from densenets.training.loop import Checkpointing, Execution, OptimizerSettings, Reporting

    def fit(run_dir, **settings):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        train, test = load_digits_data()
        t = Trainer(mlp, TensorLoader(train, 256, [0.3], [0.4], shuffle=True),
                    {"test": TensorLoader(test, 500, [0.3], [0.4])}, epochs=2,
                    schedule=Schedule(1e-2), run_dir=run_dir, **settings)
        t.fit()
        return t

    grouped = fit(tmp_path / "grouped",
                  optim=OptimizerSettings(optimizer="adamw", weight_decay=0.05,
                                          decay_norm_bias=False),
                  execution=Execution(device="cpu"),
                  checkpointing=Checkpointing(stop_after=1, extra={"note": "kept"}),
                  reporting=Reporting(progress=False, log=lambda s: None))
    flat = fit(tmp_path / "flat", optimizer="adamw", weight_decay=0.05, decay_norm_bias=False,
               device="cpu", stop_after=1, checkpoint_extra={"note": "kept"}, progress=False,
               log=lambda s: None)
    assert isinstance(grouped.optimizer, torch.optim.AdamW) and grouped.epoch == 1
    assert [g["weight_decay"] for g in grouped.optimizer.param_groups] == [0.05, 0.0]
    for a, b in zip(grouped.model.parameters(), flat.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert load_checkpoint(tmp_path / "grouped" / "last.pt")["note"] == "kept"
    with pytest.raises(TypeError, match="pass one"):
        fit(tmp_path / "both", optim=OptimizerSettings(), optimizer="adamw")
    with pytest.raises(TypeError, match="unexpected keyword arguments: momentun"):
        fit(tmp_path / "typo", momentun=0.9)
