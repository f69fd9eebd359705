"""The modern recipes from the command line: every flag overrides the recipe, digits-modern
reaches 99% on the real digits (stopped and resumed on the way), imagenet-rdnet trains an RDNet
on an image folder."""

from __future__ import annotations

import json

import pytest
import torch
from support import write_image_folder

from densenets.cli import build_parser, main
from densenets.cli.train_cmds import config_from_args
from densenets.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(*flags: str):
    return config_from_args(build_parser().parse_args(["train", *flags]))[0]


def test_every_modern_flag_overrides_the_recipe():
    cfg = _config("--recipe", "digits-modern", "--optimizer", "sgd", "--decay-norm-bias",
                  "--schedule", "step", "--warmup-epochs", "1.5", "--warmup-lr", "0.01",
                  "--min-lr", "0.0002", "--label-smoothing", "0.2", "--mixup", "0.3",
                  "--cutmix", "0.7", "--mixup-prob", "0.6", "--mixup-switch-prob", "0.4",
                  "--auto-augment", "rand-m7-n3", "--color-jitter", "0.3",
                  "--random-erasing", "0.1", "--accum-steps", "3", "--ema-decay", "0.9",
                  "--clip-grad", "2.5")
    assert (cfg.optimizer, cfg.decay_norm_bias, cfg.schedule) == ("sgd", True, "step")
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr) == (1.5, 0.01, 0.0002)
    assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.mixup_prob,
            cfg.mixup_switch_prob) == (0.2, 0.3, 0.7, 0.6, 0.4)
    assert (cfg.auto_augment, cfg.color_jitter, cfg.random_erasing) == ("rand-m7-n3", 0.3, 0.1)
    assert (cfg.accum_steps, cfg.ema_decay, cfg.clip_grad) == (3, 0.9, 2.5)
    plain = _config("--recipe", "digits-modern")
    assert (plain.optimizer, plain.decay_norm_bias, plain.ema_decay) == ("adamw", False, 0.95)
    assert _config("--recipe", "digits-modern", "--epochs", "30").warmup_epochs == 3.0
    assert _config("--recipe", "digits-modern", "--no-decay-norm-bias").decay_norm_bias is False


def test_bad_modern_flags_exit_2_with_one_line(tmp_path, capsys):
    for flags, words in ((["--auto-augment", "autoaugment"], "--auto-augment"),
                         (["--augment", "modern"], "--augment modern is for image folders")):
        code = main(["train", "--recipe", "digits-modern", *flags, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_digits_modern_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """Bit for bit through the CLI, with mixing and accumulation added to the recipe's AdamW,
    warm-up + cosine, label smoothing and EMA (a small model, so it takes seconds)."""
    common = ["--recipe", "digits-modern", "--model", "densenet-bc-16-k4", "--epochs", "3",
              "--mixup", "0.2", "--cutmix", "1.0", "--accum-steps", "2", "--seed", "4"]
    assert main(["train", *common, "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", *common, "--stop-after", "1", "--out", str(tmp_path / "split")]) == 0
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    assert whole["step"] == split["step"] == 3 * 12
    for part in ("model", "ema"):
        assert all(torch.equal(whole[part][k], split[part][k]) for k in whole[part]), part
    same = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
            for r in whole["metrics"]]
    assert same == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                    for r in split["metrics"]]


@pytest.mark.slow
def test_digits_modern_reaches_99_percent_stopped_and_resumed(tmp_path, capsys):
    """The bar: >= 99% test accuracy on the real digits (about 60 s here)."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", "digits-modern", "--stop-after", "8",
                 "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adamw, cosine to 1e-05, 1.5 warm-up epochs from 0.0001" in printed
    state = load_checkpoint(out / "last.pt")
    rows = state["metrics"]
    assert [r["epoch"] for r in rows] == list(range(1, 16))
    assert rows[-1]["test_top1_err"] <= 1.0, rows[-1]  # >= 99% accuracy
    assert rows[-1]["test_ema_top1_err"] <= 2.0
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[-1]["lr"] < 1e-4  # warm-up, cosine
    assert state["scheduler"]["type"] == "cosine" and state["ema"]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "test_ema_top1_err" in header
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["optimizer"], cfg["label_smoothing"], cfg["ema_decay"]) == ("adamw", 0.1, 0.95)
    capsys.readouterr()
    for flags, key in (([], "test_top1_err"), (["--ema"], "test_ema_top1_err")):
        assert main(["eval", str(out), "--json", *flags]) == 0  # the EMA weights on their own
        assert json.loads(capsys.readouterr().out)["top1_err"] == pytest.approx(rows[-1][key])


@pytest.mark.slow
def test_rdnet_recipe_trains_evaluates_and_resumes_on_an_image_folder(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", per_class=2, size=36)
    out = tmp_path / "run"
    common = ["--data-dir", str(data), "--image-size", "32", "--batch-size", "4"]
    assert main(["train", "--recipe", "imagenet-rdnet", "--model", "rdnet_tiny", *common,
                 "--epochs", "2", "--stop-after", "1", "--workers", "0",
                 "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rdnet_tiny" in printed and "drop path 0.15" in printed and "mixup 0.8" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["drop_path"], cfg["optimizer"], cfg["augmentation"]) == (0.15, "adamw", "modern")
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["model_config"]["drop_path_rate"] == 0.15
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "rdnet_tiny" and result["images"] == 4
    assert main(["eval", str(out), "--ema"]) == 2  # this recipe keeps no EMA
    assert "holds no EMA" in capsys.readouterr().err
