"""Nothing lost: bit-exact resume (epoch boundary and mid-epoch), SIGINT/SIGTERM in a real
process, SIGKILL in the middle of a checkpoint write, corrupt checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import SignalAt, wait_for

from densenets import create_model
from densenets.cli import main
from densenets.training.checkpoint import load_checkpoint, save_checkpoint
from densenets.training.data import TensorLoader, load_digits_data
from densenets.training.loop import Schedule, Trainer

TINY = ["--model", "densenet-bc-16-k4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
            for r in history]


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # --deterministic is process-wide


def test_stop_after_two_of_four_epochs_then_resume_is_bit_identical(tmp_path, capsys,
                                                                     restore_determinism):
    common = [*TINY, "--drop-rate", "0.2", "--epochs", "4", "--deterministic", "--seed", "3"]
    assert main(["train", *common, "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", *common, "--stop-after", "2", "--out", str(tmp_path / "split")]) == 0
    halfway = load_checkpoint(tmp_path / "split" / "last.pt")
    assert halfway["epoch"] == 2 and len(halfway["metrics"]) == 2
    assert "--resume" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert resumed["epoch"] == whole["epoch"] == 4 and resumed["step"] == whole["step"]
    assert_same_state(whole["model"], resumed["model"])
    for sa, sb in zip(whole["optimizer"]["state"].values(),
                      resumed["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert comparable(whole["metrics"]) == comparable(resumed["metrics"])


def _trainer(run_dir: Path, interrupt: tuple[int, int] | None = None) -> Trainer:
    torch.manual_seed(0)
    model = create_model("densenet-bc-16-k4", in_channels=1, drop_rate=0.2)
    train, test = load_digits_data()
    loader = TensorLoader(train, 64, [0.3], [0.4], shuffle=True, augment=True, pad=1, seed=5)
    if interrupt:
        loader = SignalAt(loader, *interrupt)
    return Trainer(model, loader, {"test": TensorLoader(test, 500, [0.3], [0.4])}, epochs=3,
                   schedule=Schedule(0.1, [2]), run_dir=run_dir, progress=False,
                   log=lambda s: None)


def test_sigint_mid_epoch_saves_and_resume_is_bit_identical(tmp_path):
    reference = _trainer(tmp_path / "ref")
    reference.fit()
    first = _trainer(tmp_path / "run", interrupt=(1, 10))
    result = first.fit()
    assert (result.status, result.exit_code) == ("interrupted", 130)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 11, 23 + 11)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    second = _trainer(tmp_path / "run")
    second.load_state_dict(state)
    assert second.fit().status == "completed"
    assert_same_state(reference.model.state_dict(), second.model.state_dict())
    assert comparable(reference.history) == comparable(second.history)


# ---------------------------------------------------------------- real processes

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(args: list[str], prelude: str = "") -> subprocess.Popen:
    code = f"{prelude}\nimport sys\nfrom densenets.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_line(p: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    for line in p.stdout:
        if line.startswith(prefix):
            return line
        assert time.monotonic() < deadline, f"no line starting {prefix!r}"
    raise AssertionError(f"process ended before printing {prefix!r}: {p.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_checkpoint_prints_how_to_resume_and_exits(tmp_path, sig, code):
    out = tmp_path / "run"
    p = _start(["train", *TINY, "--epochs", "6", "--out", str(out)])
    _wait_for_line(p, "epoch 1/6")
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == code, stderr
    assert f"continue with: densenets train --resume {out}" in stdout
    assert "Traceback" not in stderr
    state = load_checkpoint(out / "last.pt")
    assert 1 <= state["epoch"] < 6
    if sig == signal.SIGINT:  # and the run carries on from there
        assert main(["train", "--resume", str(out)]) == 0
        assert load_checkpoint(out / "last.pt")["epoch"] == 6


# Stops the child inside the fsync of its second write of last.pt: the temporary file holds a
# complete new checkpoint, the rename has not happened. The test then SIGKILLs it there.
HOLD_IN_SAVE = """
import os, time
_fsync, _saves = os.fsync, []
def fsync(fd):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if "last.pt." in target and target.endswith(".tmp"):
        _saves.append(target)
        if len(_saves) == 2:
            open(os.environ["HOLD_FLAG"], "w").close()
            time.sleep(600)
    return _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to spot the save")
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    out, flag = tmp_path / "run", tmp_path / "holding"
    ENV["HOLD_FLAG"] = str(flag)
    try:
        p = _start(["train", *TINY, "--epochs", "3", "--out", str(out)], prelude=HOLD_IN_SAVE)
    finally:
        del ENV["HOLD_FLAG"]
    wait_for(flag, p, 120)
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert list(out.glob("last.pt.*.tmp")), "the interrupted write should have left its temp file"
    state = load_checkpoint(out / "last.pt")  # the epoch-1 checkpoint, intact
    assert state["epoch"] == 1
    assert main(["train", "--resume", str(out)]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    assert not list(out.glob("*.tmp"))


def test_corrupt_checkpoint_is_named_in_a_clear_error(tmp_path, capsys):
    path = save_checkpoint({"format": "densenets.checkpoint", "version": 1,
                            "model": {"w": torch.ones(1000)}}, tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_resume_refuses_to_change_the_stored_configuration(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert main(["train", "--resume", str(tmp_path), "--lr", "0.5"]) == 2
    assert "--lr cannot change" in capsys.readouterr().err
