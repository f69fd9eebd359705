"""CUDA-graph training steps: what can be checked without a GPU (the refusals).

The replay itself is checked on a GPU by benchmarks/gpu_graphs.py (equality with eager steps
through capture, replays, a smaller batch and a learning-rate change)."""

from __future__ import annotations

import pytest
import torch

from densenets import DenseNet
from densenets.analysis.bench import BenchConfig
from densenets.cli import main
from densenets.training.cuda_graphs import check_supported
from densenets.training.loop import Schedule, Trainer

CUDA = torch.device("cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(device=torch.device("cpu")), "needs a CUDA device"),
    (dict(amp="fp16"), "--amp fp16"),
    (dict(distributed=True), "single-process"),
    (dict(compile=True), "--compile"),
])
def test_unsupported_set_ups_are_refused_with_the_reason(kwargs, match):
    args = {"device": CUDA, "amp": None, "distributed": False, "compile": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_supported(**args)
    check_supported(CUDA, "bf16", False, False)  # what is supported passes


def test_cli_refuses_on_cpu_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--cuda-graphs", "--device", "cpu", "--epochs", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["densenets train: error: --cuda-graphs needs a CUDA device (training runs "
                   "on cpu); drop the flag or use --device cuda"]
    assert not out.exists()
    assert main(["bench", "densenet-bc-40-k12", "--cuda-graphs", "--device", "cpu"]) == 2


def test_trainer_refuses_on_cpu(tmp_path):
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3,
                     stem="cifar")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(model, [], {}, epochs=1, schedule=Schedule(0.1, []), run_dir=tmp_path,
                cuda_graphs=True)


def test_bench_needs_warmup_steps_to_time_replays_only(capsys):
    assert main(["bench", "densenet-bc-40-k12", "--cuda-graphs", "--warmup", "1"]) == 2
    assert "--warmup 2 or more" in capsys.readouterr().err


def test_bench_label_names_the_graphs():
    assert BenchConfig(memory_efficient=True, cuda_graphs=True).label == \
        "densenets memory_efficient + CUDA graphs"
