"""Training that survives failures: --auto-resume, --save-every, the run-directory lock, an
elastic restart under torchrun --max-restarts, two nodes on one machine, sharded eval.

The torchrun jobs (CPU, gloo, localhost only) run a worker script that reads the digits from
a tensor file the test writes (``DIGITS``: each process would otherwise spend seconds importing
scikit-learn), keeps the first 200 training images, skips curves.png (matplotlib's import),
makes one process SIGKILL itself after a given optimiser step of the first attempt
(``KILL=RANK:STEP``, after waiting for a ``go`` file, so the test can act while the job is
alive) and leaves time stamps (``MARKS``) from which the test measures the restart. After
its command it runs ``THEN`` (a JSON list of arguments) if given: ``densenets eval`` joins a
new process group of the same torchrun processes, as a separate launch would, for the cost of
no new processes (each one spends seconds importing torch and torchvision).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from support import ONE_NODE, free_port, load_pt, run_cli, succeed, torchrun, wait_for

import densenets.training.data as data_mod
from densenets.training import rundir

TINY = ["--model", "densenet-bc-16-k4"]
pytestmark = pytest.mark.usefixtures("one_thread")
# 200 digits, batch 64: 4 steps an epoch (3 full batches and a tail of 8), 12 in all.
RUN = [*TINY, "--epochs", "3", "--drop-rate", "0.1"]
KILL_STEP, SAVE_EVERY = 7, 5  # killed in epoch 2 (steps 5-8), 2 steps after a step checkpoint

WORKER = '''
import json, os, signal, sys, time, torch
import densenets.training.data as data
from densenets.training import loop
from densenets.cli import main

rank = int(os.environ.get("RANK", "0"))
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
marks = os.environ.get("MARKS")

def mark(name):
    if marks:
        path = os.path.join(marks, f"{name}.rank{rank}.attempt{attempt}")
        with open(path, "w") as f:
            f.write(f"{time.time()} {os.getpid()}")

train, test = torch.load(os.environ["DIGITS"], weights_only=True)
data.load_digits_data = lambda: (data.ArrayData(*train), data.ArrayData(*test))
loop.write_curves = lambda history, path: None
kill_rank, kill_step = map(int, os.environ.get("KILL", "-1:0").split(":"))
step = loop.Trainer._train_step

def train_step(self, *args, **kw):
    result = step(self, *args, **kw)
    if attempt == 0 and rank == kill_rank and self.step + 1 == kill_step:
        mark("waiting")
        while not os.path.exists(os.path.join(marks, "go")):
            time.sleep(0.05)
        mark("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    if attempt and not getattr(self, "_stepped", False):
        self._stepped = True
        mark("first_step")
    return result

loop.Trainer._train_step = train_step
code = main(sys.argv[1:])
if not code and os.environ.get("THEN"):
    code = main(json.loads(os.environ["THEN"]))
sys.exit(code)
'''


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("worker") / "worker.py"
    path.write_text(WORKER)
    train, test = data_mod.load_digits_data()
    train = train.subset(torch.arange(200))
    torch.save([[d.images, d.labels, d.class_names] for d in (train, test)],
               path.with_name("digits.pt"))
    return path


def start(worker: Path, args: list[str], launcher: Sequence[str] = ONE_NODE,
          env: dict | None = None) -> subprocess.Popen:
    """A torchrun job of the worker, reading the digits the ``worker`` fixture saved."""
    return torchrun(worker, *args, launcher=launcher,
                    env={"DIGITS": str(worker.with_name("digits.pt")), **(env or {})})


def stamp(path: Path) -> tuple[float, int]:
    t, pid = path.read_text().split()
    return float(t), int(pid)


def epochs_in_metrics(run: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().split()[1:]]


EVAL = ["--json", "--batch-size", "101"]  # 360 test images = 3 x 101 + 57: uneven shards


@pytest.fixture(scope="module")
def two_nodes(worker, tmp_path_factory) -> dict:
    """The reference: two torchrun launches as two nodes of one process each, c10d on
    127.0.0.1, uninterrupted; then ``densenets eval`` of the result over both nodes."""
    out = tmp_path_factory.mktemp("two-nodes") / "run"
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes"]
    then = {"THEN": json.dumps(["eval", str(out), *EVAL])}
    jobs = [start(worker, ["train", *RUN, "--out", str(out)], launcher, then) for _ in range(2)]
    stdout = "".join(succeed(job)[0] for job in jobs)
    return {"out": out, "stdout": stdout}


@pytest.fixture(scope="module")
def elastic(worker, tmp_path_factory) -> dict:
    """One node, two processes, --max-restarts 1: process 0 (the lock holder) SIGKILLs itself
    after step 7; while it waits to do so, a second job is pointed at the same directory."""
    base = tmp_path_factory.mktemp("elastic")
    out, marks = base / "run", base / "marks"
    marks.mkdir()
    args = ["train", *RUN, "--out", str(out), "--auto-resume", "--save-every", str(SAVE_EVERY)]
    job = start(worker, args, [*ONE_NODE, "--max-restarts=1"],
                {"KILL": f"0:{KILL_STEP}", "MARKS": str(marks)})
    wait_for(marks / "waiting.rank0.attempt0", job)
    second = run_cli(args[:])  # the same command, in this process: a second job
    saved_before_kill = load_pt(out / "last.pt")["step"]
    (marks / "go").touch()
    stdout, stderr = succeed(job)
    return {"out": out, "marks": marks, "stdout": stdout, "stderr": stderr, "second": second,
            "saved_before_kill": saved_before_kill}


@pytest.mark.dist
@pytest.mark.slow
def test_killed_process_restarts_from_the_step_checkpoint_and_ends_like_an_uninterrupted_run(
        elastic, two_nodes):
    out, marks = elastic["out"], elastic["marks"]
    assert elastic["saved_before_kill"] == SAVE_EVERY  # a step checkpoint mid-epoch
    resumed = f"from step {SAVE_EVERY}:"
    assert elastic["stdout"].count("training densenet") == 1, elastic["stdout"]
    assert elastic["stdout"].count(resumed) == 1, elastic["stdout"]
    # The dead holder's lock did not block the restart.
    assert "taking over the lock" in elastic["stderr"]
    assert "earlier attempt of this torchrun job" in elastic["stderr"]
    final, reference = load_pt(out / "last.pt"), load_pt(two_nodes["out"] / "last.pt")
    assert final["step"] == reference["step"] == 12 and final["epoch"] == 3
    diff = max((final["model"][k].double() - v.double()).abs().max().item()
               for k, v in reference["model"].items() if v.is_floating_point())
    for k, v in reference["model"].items():
        assert torch.equal(final["model"][k], v), k
    assert epochs_in_metrics(out) == [1, 2, 3]
    assert not (out / rundir.LOCK_NAME).exists()  # released at the end
    killed, _ = stamp(marks / "killed.rank0.attempt0")
    back, _ = stamp(marks / "first_step.rank0.attempt1")
    print(f"\nrestart: {KILL_STEP - SAVE_EVERY} steps lost, first step after the restart "
          f"{back - killed:.1f} s after the SIGKILL, max weight difference {diff:g}")


@pytest.mark.dist
@pytest.mark.slow
def test_a_second_job_on_the_same_directory_refuses_naming_the_holder(elastic):
    code, _, err = elastic["second"]
    _, holder_pid = stamp(elastic["marks"] / "waiting.rank0.attempt0")
    assert code == 2
    assert f"is in use by another job (host {socket.gethostname()}, pid {holder_pid}," in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.dist
@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_two_processes(two_nodes, elastic):
    cfg = json.loads((two_nodes["out"] / "config.json").read_text())
    assert cfg["distributed"]["world_size"] == 2
    one_node = load_pt(elastic["out"] / "last.pt")["model"]
    for k, v in load_pt(two_nodes["out"] / "last.pt")["model"].items():
        assert torch.equal(one_node[k], v), k


@pytest.mark.dist
@pytest.mark.slow
def test_sharded_eval_equals_single_process_eval(two_nodes):
    stdout = two_nodes["stdout"]
    assert stdout.count('"checkpoint"') == 1, stdout  # rank 0 alone prints
    sharded = json.loads(stdout[stdout.index("\n{") + 1:])
    code, single, _ = run_cli(["eval", str(two_nodes["out"]), *EVAL])
    single = json.loads(single)
    assert code == 0 and sharded["images"] == single["images"] == 360
    for key in ("top1_err", "top5_err"):
        assert sharded[key] == single[key], key
    assert sharded["loss"] == pytest.approx(single["loss"], abs=1e-6)


# ---------------------------------------------------------------------------- one process


@pytest.fixture
def small_digits(monkeypatch):
    full = data_mod.load_digits_data
    monkeypatch.setattr(data_mod, "load_digits_data",
                        lambda: (full()[0].subset(torch.arange(200)), full()[1]))


def test_auto_resume_starts_continues_finishes_and_refuses_another_configuration(
        tmp_path, small_digits, monkeypatch):
    from densenets.training import loop

    saves: list[tuple[str, int, int]] = []
    save = loop.ckpt.save_checkpoint

    def record(state, path):
        saves.append((Path(path).name, state["step"], state["step_in_epoch"]))
        return save(state, path)

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", record)
    out = tmp_path / "run"
    cmd = ["train", *TINY, "--epochs", "2", "--out", str(out), "--auto-resume"]
    code, stdout, _ = run_cli([*cmd, "--stop-after", "1", "--save-every", "3"])  # empty
    assert code == 0 and "training densenet-bc-16-k4" in stdout
    # Step 3 mid-epoch, then the epoch's end (step 4) as always.
    assert saves == [("last.pt", 3, 3), ("last.pt", 4, 0), ("best.pt", 4, 0)]
    code, stdout, _ = run_cli(cmd)  # partial: continues
    assert code == 0 and "resuming densenet-bc-16-k4" in stdout and "from step 4:" in stdout
    assert load_pt(out / "last.pt")["epoch"] == 2 and epochs_in_metrics(out) == [1, 2]
    before = (out / "last.pt").read_bytes()
    code, stdout, _ = run_cli(cmd)  # finished: nothing to do, nothing rewritten
    assert code == 0 and "holds all 2 epochs: nothing left to train" in stdout
    assert (out / "last.pt").read_bytes() == before
    code, _, err = run_cli([*cmd, "--lr", "0.5"])  # another configuration
    assert code == 2 and "another configuration (lr 0.1 there, 0.5 here)" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*cmd, "--sync-bn"])
    assert code == 2 and "sync_bn False there, True here" in err
    code, _, err = run_cli(["train", *TINY, "--auto-resume"])
    assert code == 2 and "--auto-resume needs --out DIR" in err
    code, _, err = run_cli(["train", *TINY, "--out", str(tmp_path / "x"), "--save-every", "0"])
    assert code == 2 and "--save-every must be >= 1 optimiser step, got 0" in err
    assert not (out / rundir.LOCK_NAME).exists()


# ---------------------------------------------------------------------------- the lock


def write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / rundir.LOCK_NAME
    path.write_text(json.dumps({"since": "then", "token": "t", **holder}))
    return path


def test_lock_refuses_live_holders_and_takes_over_stale_ones(tmp_path, monkeypatch):
    host = socket.gethostname()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    notes: list[str] = []
    sleeper = subprocess.Popen(["sleep", "60"])
    try:  # a live process on this host
        write_lock(tmp_path / "a", host=host, pid=sleeper.pid)
        with pytest.raises(rundir.RunDirLocked, match=f"host {host}, pid {sleeper.pid}"):
            rundir.acquire_lock(tmp_path / "a", notes.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = rundir.acquire_lock(tmp_path / "a", notes.append)  # ... now dead: stale
    assert "no longer running" in notes[-1]
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(rundir.RunDirLocked):  # held: a second taker in this process refuses
        rundir.acquire_lock(tmp_path / "a", notes.append)
    lock.release()
    assert not lock.path.exists()

    path = write_lock(tmp_path / "b", host="node7", pid=1)  # another host, fresh
    with pytest.raises(rundir.RunDirLocked, match="host node7, pid 1.*refreshed 0 s ago"):
        rundir.acquire_lock(tmp_path / "b", notes.append)
    old = time.time() - rundir.STALE_AFTER_S - 5
    os.utime(path, (old, old))  # ... that stopped refreshing it
    rundir.acquire_lock(tmp_path / "b", notes.append).release()
    assert "not been refreshed" in notes[-1]

    write_lock(tmp_path / "c", host="node7", pid=1, run_id="job-42")  # an earlier attempt
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    rundir.acquire_lock(tmp_path / "c", notes.append).release()
    assert "earlier attempt of this torchrun job (run id job-42)" in notes[-1]
