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


def test_every_flagged_field_is_a_train_flag_that_sets_it():
    from densenets.cli import build_parser
    from densenets.cli.train_cmds import config_from_args
    from densenets.training.fields import flagged

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    defaults = {a.dest: a.default for a in train._actions}
    # Values with a meaning of their own are exercised by their own tests.
    own = {"device", "auto_augment", "model", "out", "data_dir", "stop_after", "drop_path"}
    for f in flagged(TrainConfig):
        assert f.dest in defaults and defaults[f.dest] is None, f.name  # absent: the recipe's
        if f.name in own:
            continue
        value = {bool: True, int: 3, float: 0.0625, str: (f.flag.choices or ("", ""))[1]}[f.type]
        # A flag of several values sets a list: a fixed count of them, or one for "+".
        n = f.flag.nargs if isinstance(f.flag.nargs, int) else int(f.flag.nargs == "+")
        value = [value * (i + 1) for i in range(n)] if n else value  # increasing (LO < HI)
        argv = [f.names[0]] + ([] if f.type is bool else [str(v) for v in value] if n
                               else [str(value)])
        cfg, _ = config_from_args(build_parser().parse_args(["train", *argv]))
        assert getattr(cfg, f.name) == value, (f.name, getattr(cfg, f.name), value)


def test_configuration_records_are_built_by_keyword():
    from densenets.training.recipes import Recipe

    with pytest.raises(TypeError):
        TrainConfig("digits")  # a positional value would land in whatever field comes first
    with pytest.raises(TypeError, match="no TrainConfig fields"):
        Recipe(name="x", augment="none", settings={"learning_rate": 0.1})


def test_resume_may_change_only_the_declared_fields():
    from densenets.training.run import RESUMABLE

    assert set(RESUMABLE) == {"epochs", "device", "workers", "data_dir", "download",
                              "stop_after", "strict", "threads"}


@pytest.mark.parametrize("bad,match", [
    (dict(mixup_prob=1.5), r"--mixup-prob is a probability in \[0, 1\], got 1.5"),
    (dict(ema_decay=1.0), r"--ema-decay must be in \[0, 1\), got 1.0"),
    (dict(accum_steps=0), "--accum-steps must be >= 1 batch per step, got 0"),
    (dict(optimizer="lamb"), "--optimizer must be one of sgd, adamw, rmsprop, got 'lamb'"),
    (dict(device="tpu:x"), "--device must be auto, cpu, cuda or cuda:N"),
    (dict(val_split=-2), "--val-split must be >= 0 images, got -2"),
])
def test_declared_checks_name_the_flag(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve("digits-modern", **bad)
