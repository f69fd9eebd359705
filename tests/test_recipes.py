"""Each recipe's resolved hyperparameters against the paper (Section 4.2 and Table 2)."""

from __future__ import annotations

import pytest

from densenets.cli import main
from densenets.training.loop import Schedule
from densenets.training.recipes import RECIPES, TrainConfig, resolve

PAPER_OPTIMISER = dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.0, weight_decay=1e-4,
                       gamma=0.1)
# recipe: (epochs, batch, lr divided at these 0-based epochs, augmentation, dropout, hold-out)
PAPER = {
    "cifar10": (300, 64, [150, 225], False, 0.2, 5000),
    "cifar10+": (300, 64, [150, 225], True, 0.0, 5000),
    "cifar100": (300, 64, [150, 225], False, 0.2, 5000),
    "cifar100+": (300, 64, [150, 225], True, 0.0, 5000),
    "svhn": (40, 64, [20, 30], False, 0.2, 6000),
    "imagenet": (90, 256, [30, 60], True, 0.0, 0),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_recipes_resolve_to_the_papers_hyperparameters(name):
    cfg = resolve(name)
    epochs, batch, milestones, augment, drop, hold = PAPER[name]
    for k, v in PAPER_OPTIMISER.items():
        assert getattr(cfg, k) == v, k
    assert (cfg.epochs, cfg.batch_size, cfg.milestones) == (epochs, batch, milestones)
    assert (cfg.augment, cfg.drop_rate) == (augment, drop)
    assert cfg.drop_rate == (0.0 if cfg.augment else 0.2)  # dropout exactly without augmentation
    assert RECIPES[name].holdout == hold


def test_dataset_details_of_the_paper():
    svhn = resolve("svhn")
    assert (svhn.mean, svhn.std) == ([0.0] * 3, [1.0] * 3)  # pixels / 255 and nothing else
    assert svhn.val_split == 6000  # test error is read at the best-validation epoch
    assert resolve("cifar10+").val_split == 0  # final CIFAR runs train on all 50,000 images
    assert resolve("cifar10+", val_split=-1).val_split == 5000  # bare --val-split
    assert resolve("cifar100").dataset == "cifar100" and resolve("cifar10").dataset == "cifar10"
    imagenet = resolve("imagenet")
    assert (imagenet.resize, imagenet.crop, imagenet.eval_split) == (256, 224, "val")
    assert imagenet.model == "densenet121"


def test_digits_default_is_the_decided_demo():
    cfg = resolve()
    assert (cfg.recipe, cfg.model, cfg.batch_size, cfg.lr) == ("digits", "densenet-bc-40-k12",
                                                               64, 0.1)
    assert cfg.milestones == [round(cfg.epochs * 0.5), round(cfg.epochs * 0.75)]
    assert cfg.nesterov and cfg.momentum == 0.9 and cfg.weight_decay == 1e-4


def test_overrides_replace_fields_and_rescale_the_schedule():
    cfg = resolve("cifar10+", epochs=40, batch_size=128, lr=0.05, seed=7, image_size=None)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed) == (40, 128, 0.05, 7)
    assert cfg.milestones == [20, 30]
    folder = resolve("folder", image_size=112)
    assert (folder.crop, folder.resize) == (112, 128)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.json round trip


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "--epochs"), (dict(batch_size=0), "--batch-size"), (dict(lr=-1), "--lr"),
    (dict(amp="fp8"), "--amp"), (dict(weight_decay=-1e-4), "--weight-decay"),
    (dict(nonsense=1), "unknown training options"),
])
def test_bad_values_are_rejected_with_the_flag_named(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve("digits", **bad)
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve("cifar11")


def test_weight_decay_flag_reaches_the_optimiser(tmp_path, monkeypatch):
    from densenets.training import run

    seen = {}
    real = run.Trainer

    def spy(*args, **kwargs):
        trainer = real(*args, **kwargs)
        seen["wd"] = trainer.optimizer.param_groups[0]["weight_decay"]
        raise SystemExit(0)

    monkeypatch.setattr(run, "Trainer", spy)
    with pytest.raises(SystemExit):
        main(["train", "--weight-decay", "5e-4", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert seen["wd"] == 5e-4


def test_step_schedule():
    s = Schedule(0.1, [150, 225])
    assert [s.lr_at(e) for e in (0, 149, 150, 224, 225, 299)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cli_reports_bad_flags_in_one_line(capsys):
    assert main(["train", "--epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["densenets train: error: --epochs must be >= 1, got 0"]
