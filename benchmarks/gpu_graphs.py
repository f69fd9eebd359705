"""CUDA graphs on a GPU: the replayed step equals the eager one, and what it buys.

    python benchmarks/gpu_graphs.py [--out DIR] [--seconds S]

1. Equality: a small DenseNet-BC trained 9 steps eagerly and through GraphedTrainStep (warm-up,
   capture, replays, a smaller last batch run eagerly, a learning-rate change that captures
   again), plain and memory-efficient, float32 with deterministic cuDNN: the parameters must
   agree to 1e-5 relative.
2. Speed and memory: fresh-process training steps (median of 20 after 5 warm-up, bf16
   channels-last) for torchvision plain eager, ours memory-efficient with graphs, and
   torchvision plain with graphs, target configurations first, until S seconds are spent.
Writes graphs.json to DIR (default: $OUT or benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from densenets import DenseNet  # noqa: E402
from densenets.analysis.bench import BenchConfig, run_in_subprocess  # noqa: E402
from densenets.training.cuda_graphs import GraphedTrainStep  # noqa: E402

CONFIGS = [("densenet-bc-250-k24", 64), ("densenet-bc-100-k12", 64), ("densenet121", 256)]
VARIANTS = [("torchvision", False, False), ("densenets", True, True),
            ("torchvision", False, True), ("densenets", False, True)]


def equality(memory_efficient: bool) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    eager = DenseNet(growth_rate=8, block_config=(3, 3, 3), num_init_features=16,
                     num_classes=10, stem="cifar").to(dev)
    eager.set_memory_efficient(memory_efficient)
    graphed = copy.deepcopy(eager)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                            weight_decay=1e-4) for m in (eager, graphed)]
    step = GraphedTrainStep(graphed, opts[1])
    batches = [(torch.randn(16, 3, 32, 32, device=dev), torch.randint(0, 10, (16,), device=dev))
               for _ in range(8)]
    batches.append((batches[0][0][:8].clone(), batches[0][1][:8].clone()))  # a smaller batch
    losses = []
    for i, (x, y) in enumerate(batches):
        if i == 6:  # a milestone: the graph must be recorded again with the new rate
            for opt in opts:
                opt.param_groups[0]["lr"] = 0.01
        opts[0].zero_grad(set_to_none=True)
        loss_e = F.cross_entropy(eager(x).float(), y)
        loss_e.backward()
        opts[0].step()
        loss_g, _ = step(x, y)
        losses.append((loss_e.item(), loss_g.item()))
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
                for a, b in zip(eager.state_dict().values(), graphed.state_dict().values(),
                                strict=True) if a.is_floating_point())
    return {"max_rel_param_diff": worst, "captures": step.captures, "losses": losses,
            "ok": worst < 1e-5 and step.captures == 2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("OUT", "benchmarks/results")))
    p.add_argument("--seconds", type=float, default=200)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.deterministic = True
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "equality": {}, "bench": []}
    for me in (False, True):
        try:
            report["equality"]["memory_efficient" if me else "plain"] = r = equality(me)
        except RuntimeError as e:  # report and go on
            report["equality"]["memory_efficient" if me else "plain"] = r = {
                "ok": False, "error": str(e)[-400:]}
        print("equality", "memory-efficient" if me else "plain", r, flush=True)
    torch.backends.cudnn.deterministic = False
    (args.out / "graphs.json").write_text(json.dumps(report, indent=1))
    for model, batch in CONFIGS:
        for impl, me, graphs in VARIANTS:
            if model == "densenet121" and graphs and impl == "torchvision":
                continue
            if time.perf_counter() - t0 > args.seconds:
                break
            cfg = BenchConfig(model=model, impl=impl, memory_efficient=me, batch_size=batch,
                              amp=True, channels_last=True, device="cuda", steps=20, warmup=5)
            cfg = replace(cfg, cuda_graphs=graphs)
            t1 = time.perf_counter()
            try:
                r = run_in_subprocess(cfg, timeout=120)
                row = {"model": model, "batch": batch, "label": cfg.label,
                       "images_per_s": r["images_per_s"], "best_images_per_s":
                       r["best_images_per_s"], "peak_gib": r["peak_mib"] / 1024}
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                row = {"model": model, "batch": batch, "label": cfg.label,
                       "error": str(e)[-300:]}
            row["seconds"] = round(time.perf_counter() - t1, 1)
            report["bench"].append(row)
            print(row, flush=True)
            (args.out / "graphs.json").write_text(json.dumps(report, indent=1))
    ok = all(r.get("ok") for r in report["equality"].values())
    print("equality", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
