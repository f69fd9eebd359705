"""Training on several processes: DDP over gloo with 2 CPU processes.

The memory-efficient model's DDP gradients are checked in two processes started by
torch.multiprocessing (a file store, no launcher). The training jobs run under torchrun: each
torchrun job runs a small worker script (written below) that calls ``densenets train``;
it can shrink the digits training set (``LIMIT``), write each process's parameters after the
run (``DUMP``) and its pid at the start (``PIDS``), so a test can see every rank, not only
the run directory that rank 0 writes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import (
    finish,
    load_pt,
    rel,
    spawn,
    succeed,
    torchrun,
    vary_bn,
    wait_for,
    write_image_folder,
)

import densenets.training.data as data_mod
from densenets import DenseNet
from densenets.cli import main
from densenets.efficient import dispatch
from densenets.training.batches import rank_slice
from densenets.training.data import ArrayData, TensorLoader
from densenets.training.distributed import local_batch_size

TINY = ["--model", "densenet-bc-16-k4"]

WORKER = '''
import os, sys, torch
import densenets.training.data as data
from densenets.training import loop as train
from densenets.cli import main

rank = int(os.environ.get("RANK", "0"))
if os.environ.get("PIDS"):
    open(os.path.join(os.environ["PIDS"], f"rank{rank}.pid"), "w").write(str(os.getpid()))
limit = int(os.environ.get("LIMIT", "0"))
if limit:
    full = data.load_digits_data
    data.load_digits_data = lambda: (full()[0].subset(torch.arange(limit)), full()[1])
if os.environ.get("DUMP"):
    fit = train.Trainer.fit
    def dump(self):
        result = fit(self)
        params = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        torch.save(params, os.path.join(os.environ["DUMP"], f"rank{rank}.pt"))
        return result
    train.Trainer.fit = dump
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def worker(tmp_path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def train_job(worker: Path, *args: str, env: dict | None = None) -> tuple[str, str]:
    """``densenets train ARGS`` as a 2-process torchrun job that must succeed."""
    return succeed(torchrun(worker, "train", *args, env=env))


# ---------------------------------------------------------------------------- no processes


def test_rank_slices_cover_each_item_once():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [list(range(n))[rank_slice(n, r, world)] for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_loader_splits_the_single_process_batches():
    data = ArrayData(torch.rand(29, 1, 4, 4), torch.arange(29), ["x"])

    def loader(**kw):
        return TensorLoader(data, 8, [0.5], [0.25], shuffle=True, augment=True, seed=3, pad=1,
                            **kw)

    whole = list(loader().batches(1))
    for keep_tail in (True, False):
        shards = [list(loader().shard(r, 2, keep_tail).batches(1)) for r in range(2)]
        assert len(shards[0]) == len(whole)
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards, strict=True):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # A training tail of fewer images than processes is dropped, not given to one process.
    ones = ArrayData(torch.rand(17, 1, 4, 4), torch.arange(17), ["x"])
    assert len(TensorLoader(ones, 8, [0], [1]).shard(0, 2, keep_tail=False)) == 2
    assert len(TensorLoader(ones, 8, [0], [1]).shard(1, 2, keep_tail=True)) == 3


def test_sharded_image_folder_loads_each_image_once(tmp_path):
    from PIL import Image

    from densenets.training.imagefolder import FolderLoader, SafeImageFolder, train_transform

    for c, cls in enumerate(("cat", "dog")):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (12, 12), (40 * i, 100 * c, 0)).save(tmp_path / cls / f"{i}.png")
    ds = SafeImageFolder(tmp_path, train_transform(8, None, [0.5] * 3, [0.25] * 3, True))

    def batches(**shard):
        loader = FolderLoader(ds, 4, shuffle=True, seed=1)
        return list((loader.shard(**shard) if shard else loader).batches(2))

    whole = batches()
    shards = [batches(rank=r, world_size=3, keep_tail=True) for r in range(3)]
    for (x, y), *parts in zip(whole, *shards, strict=True):  # same crops, flips, order
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_batch_size_is_global_and_must_split_evenly():
    assert local_batch_size(256, 8) == 32
    with pytest.raises(ValueError, match=r"global batch .* 3 processes.* \(63 or 66\)"):
        local_batch_size(64, 3)


# ---------------------------------------------------------------------------- 2 processes


def ddp_model() -> DenseNet:
    """A float64 DenseNet-BC with every BN tensor off its initial value (same in each process)."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5,
                     stem="cifar", bottleneck=True, compression=0.5)
    return vary_bn(model).double().train()


def ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 6 whose halves hold the same 3 images with different labels (see below)."""
    half = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return torch.cat([half, half]), torch.tensor([0, 1, 2, 3, 4, 0])


def _ddp_worker(rank: int, store: str, out: str) -> None:
    """One of two processes: the memory-efficient model under DDP on half ``rank`` of
    :func:`ddp_batch`, once per CPU kernel choice; saves the gradients after DDP's all-reduce
    and the BN running statistics, under the name of the kernels that ran."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        x, y = ddp_batch()
        mine = slice(3 * rank, 3 * rank + 3)
        results = {}
        for choice in ("auto", "torch"):  # auto: the C kernels where they build
            os.environ["DENSENETS_KERNELS"] = choice
            model = ddp_model().set_memory_efficient(True)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            F.cross_entropy(ddp(x[mine]), y[mine]).backward()
            results[dispatch.backend("cpu", torch.float64)] = {
                "grads": {n: p.grad for n, p in model.named_parameters()},
                "buffers": dict(model.named_buffers())}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    spawn(_ddp_worker, (f"file://{out / 'store'}", str(out)))
    return [load_pt(out / f"rank{r}.pt") for r in range(2)]


NO_C_KERNELS = dispatch.backend("cpu", torch.float64) != "native"


@pytest.mark.dist
@pytest.mark.parametrize("kernels", [
    pytest.param("native", marks=pytest.mark.skipif(
        NO_C_KERNELS, reason="no C compiler: the fused CPU kernels cannot be built here")),
    "torch"])
def test_ddp_gradients_match_single_process(ddp_ranks, kernels):
    """Two processes (gloo), each with half the batch: the memory-efficient model's gradients
    after DDP's all-reduce equal, in float64, the plain model's gradients on the whole batch
    in one process.

    Without SyncBatchNorm (the memory-efficient path does not run it) each process normalises
    by its own half's statistics. So the two halves hold the same images with different
    labels: each half's BN statistics are the whole batch's, the whole-batch loss is the mean
    of the halves' losses as a function of the weights, and yet each process's own gradient
    differs from the average (checked below), so only a correct average passes. The BN running
    statistics are each process's own update, as without SyncBatchNorm: those of the plain
    model on one half (the unbiased variance divides by 3 - 1 there, not 6 - 1).
    """
    plain = ddp_model()
    x, y = ddp_batch()
    F.cross_entropy(plain(x), y).backward()
    want = {n: p.grad for n, p in plain.named_parameters()}
    alone = ddp_model()
    F.cross_entropy(alone(x[:3]), y[:3]).backward()
    assert max(rel(p.grad, want[n]) for n, p in alone.named_parameters()) > 1e-2

    for rank, result in enumerate(ddp_ranks):
        got = result[kernels]
        assert got["grads"].keys() == want.keys()
        for n, g in want.items():
            assert rel(got["grads"][n], g) < 1e-10, (rank, n)
        for n, b in alone.named_buffers():
            if n.endswith("num_batches_tracked"):
                assert int(got["buffers"][n]) == int(b) == 1, (rank, n)
            else:
                assert rel(got["buffers"][n], b) < 1e-10, (rank, n)
    for n, g in ddp_ranks[0][kernels]["grads"].items():  # replicas agree bit for bit
        assert torch.equal(g, ddp_ranks[1][kernels]["grads"][n]), n


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_stay_identical_evaluate_exactly_and_resume(worker, tmp_path, capsys):
    out_dir, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    args = [*TINY, "--epochs", "3", "--stop-after", "1", "--out", str(out_dir),
            "--memory-efficient", "--channels-last"]
    out, err = train_job(worker, *args, env={"LIMIT": "200", "DUMP": str(dump)})
    ranks = [load_pt(dump / f"rank{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:  # DDP keeps the replicas bit for bit equal
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert out.count("training ") == 1 and "2 processes (gloo" in out  # rank 0 speaks alone
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["distributed"]["world_size"] == 2 and cfg["distributed"]["backend"] == "gloo"
    assert cfg["distributed"]["batch_per_process"] == 32
    saved = load_pt(out_dir / "last.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in ranks[0].items())

    # Evaluation under 2 processes == one process on the saved model, over all 360 images.
    capsys.readouterr()
    assert main(["eval", str(out_dir / "last.pt"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["images"] == 360
    assert single["top1_err"] == round(saved["metrics"][-1]["test_top1_err"], 8)

    # Resume under 2 processes from the saved step.
    steps = saved["step"]
    assert steps == 4  # 200 images, batch 64: 3 full batches and a tail of 8 (4 each)
    out, err = train_job(worker, "--resume", str(out_dir), env={"LIMIT": "200"})
    assert f"resuming densenet-bc-16-k4 (5,322 parameters) on digits from step {steps}" in out
    final = load_pt(out_dir / "last.pt")
    assert final["step"] == 3 * steps and final["epoch"] == 3
    assert final["metrics"][0] == saved["metrics"][0]


MODERN = ["--optimizer", "adamw", "--lr", "0.002", "--schedule", "cosine", "--warmup-epochs",
          "0.5", "--accum-steps", "2", "--ema-decay", "0.9", "--clip-grad", "1.0",
          "--label-smoothing", "0.1"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("update", ["paper", "modern"])
def test_sync_bn_two_by_32_equals_one_by_64(worker, tmp_path, monkeypatch, update):
    # 349 images: 5 batches of 64 and a tail of 29 split 15/14, which DDP must weigh right;
    # "modern": AdamW, per-step cosine, accumulation over DDP's no_sync, clipping, an EMA.
    args = [*TINY, "--epochs", "1", "--lr", "0.02", *(MODERN if update == "modern" else [])]
    train_job(worker, *args, "--sync-bn", "--out", str(tmp_path / "two"),
            env={"LIMIT": "349"})
    full = data_mod.load_digits_data
    monkeypatch.setattr(data_mod, "load_digits_data",
                        lambda: (full()[0].subset(torch.arange(349)), full()[1]))
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    two, one = load_pt(tmp_path / "two" / "last.pt"), load_pt(tmp_path / "one" / "last.pt")
    assert two["step"] == one["step"] == (6 if update == "paper" else 3)
    assert two["config"]["distributed"]["sync_bn"] is True
    pairs = [(two["model"], one["model"])]
    if update == "modern":
        pairs.append((two["ema"], one["ema"]))
    for a, b in pairs:
        for k, v in b.items():
            if v.is_floating_point():
                assert torch.allclose(a[k], v, rtol=0, atol=1e-5), k


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_saves_once_and_resume_continues_from_the_saved_step(worker, tmp_path):
    out_dir = tmp_path / "run"
    job = torchrun(worker, "train", *TINY, "--epochs", "40", "--out", str(out_dir))
    wait_for(out_dir / "metrics.csv", job)
    os.kill(job.pid, signal.SIGTERM)  # torchrun passes it on to every process
    code, out, err = finish(job, 60)
    assert code != 0
    assert (out + err).count("SIGTERM: saved") == 1, out + err  # saved once, by rank 0
    saved = load_pt(out_dir / "last.pt")
    assert 23 <= saved["step"] < 40 * 23  # 1,437 images: 23 batches of 64 per epoch
    done = saved["epoch"] + 1
    out, _ = train_job(worker, "--resume", str(out_dir), "--stop-after", str(done))
    assert f"from step {saved['step']}:" in out
    final = load_pt(out_dir / "last.pt")
    assert final["step"] == done * 23 and final["epoch"] == done


@pytest.mark.dist
def test_killed_process_ends_the_job_with_an_error(worker, tmp_path):
    out_dir, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    job = torchrun(worker, "train", *TINY, "--epochs", "40", "--out", str(out_dir),
                   env={"PIDS": str(pids)})
    wait_for(out_dir / "metrics.csv", job)
    wait_for(pids / "rank1.pid", job)
    start = time.monotonic()
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
    code, out, err = finish(job, 60)
    assert time.monotonic() - start < 60
    assert code != 0
    # torchrun's report names the dead process; a survivor may say it lost the others.
    assert "local_rank: 1" in err and "SIGKILL" in err, err


@pytest.mark.dist
def test_a_process_whose_whole_share_is_unreadable_still_joins_the_step(worker, tmp_path):
    """Batch 2 of 3 holds two unreadable images, exactly process 1's share. Process 1 then has
    no image to train on; the others' gradient all-reduce must not wait for it until
    --dist-timeout: it joins the step with weight 0 and the replicas stay equal."""
    from densenets.training.batches import epoch_order
    from densenets.training.imagefolder import SafeImageFolder

    root = write_image_folder(tmp_path / "ds", per_class=6, size=16)
    samples = SafeImageFolder(root / "train", None).samples
    order = epoch_order(len(samples), 0, 0, True)
    for i in order[4 + 2:4 + 4].tolist():  # batch 1 (4 images), process 1's half
        Path(samples[i][0]).write_bytes(b"\x89PNG not really")
    dump = tmp_path / "dump"
    dump.mkdir()
    t0 = time.monotonic()
    out, err = train_job(worker, "--recipe", "folder", "--data-dir", str(root), *TINY,
                       "--image-size", "16", "--batch-size", "4", "--epochs", "1",
                       "--workers", "0", "--dist-timeout", "30", "--out", str(tmp_path / "run"),
                       env={"DUMP": str(dump)})
    assert time.monotonic() - t0 < 30, "a process waited for the one without images"
    assert err.count("skipped unreadable image") == 2
    ranks = [load_pt(dump / f"rank{r}.pt") for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert load_pt(tmp_path / "run" / "last.pt")["step"] == 3
