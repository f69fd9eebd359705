"""The EMA of the weights a modern run keeps, used beyond ``eval --ema``: ``densenets.load(run,
ema=True)`` in Python and ``predict --ema`` / ``export --ema`` on the command line, all through
one reading of the checkpoint; a file without an EMA is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from support import load_pt, run_cli

from densenets import load, save
from densenets.deploy.export import run_exported
from densenets.deploy.predict import predict_files

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY_RUN = ["train", "--recipe", "digits-modern", "--model", "densenet-bc-16-k4", "--epochs", "1",
            "--seed", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch of digits-modern (its EMA, decay 0.95, updated 24 times) and the same run
    without an EMA (--ema-decay 0), plus three real digits as 8x8 grayscale PNGs."""
    d = tmp_path_factory.mktemp("ema")
    for name, extra in (("ema", []), ("plain", ["--ema-decay", "0"])):
        code, _, err = run_cli([*TINY_RUN, *extra, "--out", str(d / name)])
        assert code == 0, err
    digits = load_digits()
    images = []
    for i in range(3):
        images.append(d / f"digit{i}.png")
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(images[-1])
    return d / "ema", d / "plain", images


def stored_ema(checkpoint) -> dict[str, torch.Tensor]:
    """The averaged module's state as AveragedModel saved it, without its step counter."""
    return {k.removeprefix("module."): v for k, v in load_pt(checkpoint)["ema"].items()
            if k != "n_averaged"}


def test_load_ema_gives_the_average_the_checkpoint_holds(runs):
    run, _, _ = runs
    ema = stored_ema(run / "best.pt")
    model = load(run, ema=True)
    state = model.state_dict()
    assert state.keys() == ema.keys()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert model.weights_meta["ema"] is True and model.weights_meta["source"].endswith("best.pt")
    plain = load(run).state_dict()
    differ = {k for k in ema if not torch.equal(plain[k], ema[k])}
    assert "classifier.weight" in differ
    assert "features.norm5.running_var" in differ  # BN statistics as the average holds them
    # a run directory and its best.pt are the same file
    assert all(torch.equal(v, load(run / "best.pt", ema=True).state_dict()[k])
               for k, v in state.items())


def test_eval_ema_reads_the_same_average_the_run_logged(runs):
    run, _, _ = runs
    code, out, err = run_cli(["eval", str(run), "--ema", "--json"])
    assert code == 0, err
    logged = load_pt(run / "last.pt")["metrics"][-1]["test_ema_top1_err"]
    assert json.loads(out)["top1_err"] == pytest.approx(logged)


def test_predict_ema_gives_the_ema_models_predictions(runs):
    run, _, images = runs
    files = [str(p) for p in images]
    code, out, err = run_cli(["predict", str(run), *files, "--ema", "--topk", "3", "--json"])
    assert code == 0, err
    printed = json.loads(out)
    assert printed["ema"] is True
    expected = predict_files(load(run, ema=True), files, topk=3).to_dict()["predictions"]
    assert printed["predictions"] == expected
    plain = predict_files(load(run), files, topk=3).to_dict()["predictions"]
    assert printed["predictions"] != plain
    code, out, _ = run_cli(["predict", str(run), files[0], "--ema"])
    assert code == 0 and out.splitlines()[0].startswith("densenet-bc-16-k4 (EMA weights):")


def test_export_ema_writes_the_ema_model(runs, tmp_path):
    run, _, _ = runs
    path = tmp_path / "ema.pt"
    code, out, err = run_cli(["export", str(run), "--ema", "--format", "torchscript",
                              "-o", str(path), "--json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["ema"] is True and info["check_passed"]
    x = torch.randn(4, 1, 8, 8)
    got = run_exported(path, "torchscript", x)
    with torch.no_grad():
        want = load(run, ema=True).eval()(x)
        model = load(run).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, model, atol=1e-3)


def test_a_file_without_an_ema_is_refused_in_one_line(runs, tmp_path):
    ema_run, plain, images = runs
    # eval reports last.pt unless a validation split chose best.pt; load(run) reads best.pt
    for argv, file in ((["predict", str(plain), str(images[0]), "--ema"], "best.pt"),
                       (["export", str(plain), "--ema", "-o", str(tmp_path / "m.onnx")],
                        "best.pt"),
                       (["eval", str(plain), "--ema"], "last.pt")):
        code, out, err = run_cli(argv)
        assert code == 2 and out == "", argv
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert (f"{argv[0]}: error: {plain / file} holds no EMA weights: it was trained "
                "without --ema-decay; drop --ema") in err, err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="holds no EMA weights: it was trained without"):
        load(plain, ema=True)
    weights = save(load(ema_run, ema=True), tmp_path / "ema.safetensors")  # one set of weights
    with pytest.raises(ValueError, match="ema.safetensors holds no EMA weights: a safetensors"):
        load(weights, ema=True)
    weights = save(load(ema_run, ema=True), tmp_path / "ema.pt")  # densenets.save's format
    with pytest.raises(ValueError, match="ema.pt holds no EMA weights: only the checkpoints of"):
        load(weights, ema=True)
    torch.save(load(ema_run).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="bare.pth holds no EMA weights: it is a plain state"):
        load(tmp_path / "bare.pth", ema=True)
    code, _, err = run_cli(["predict", "densenet-bc-16-k4", str(images[0]), "--ema"])
    assert code == 2 and err.count("\n") == 1
    assert "--ema reads the EMA of the weights a training run kept" in err
