"""Correctness of the memory-efficient blocks on a CUDA device (the tests run on CPU only).

    python benchmarks/gpu_check.py [--json PATH]

Plain against memory-efficient on the GPU: float64 training parity (outputs, input and every
parameter gradient, running statistics after 3 SGD steps) for plain/B/C/BC nets with both
stems, dropout masks in both memory layouts, and bf16 channels-last autocast accuracy against
float32. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from densenets import DenseNet  # noqa: E402

TOL = 1e-10
CONFIGS = {
    "plain-cifar": dict(bottleneck=False, compression=1.0, stem="cifar"),
    "B-cifar": dict(bottleneck=True, compression=1.0, stem="cifar"),
    "C-imagenet": dict(bottleneck=False, compression=0.5, stem="imagenet"),
    "BC-imagenet": dict(bottleneck=True, compression=0.5, stem="imagenet"),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def pair(dev, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    kw = dict(growth_rate=4, block_config=(2, 3, 2), num_init_features=6, num_classes=5)
    plain = DenseNet(**{**kw, **cfg}).to(dev, dtype)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return plain, copy.deepcopy(plain).set_memory_efficient(True)


def worst_training_error(plain, efficient, xs) -> float:
    """Largest relative difference over 3 SGD steps: outputs, gradients, then buffers."""
    worst = 0.0
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, efficient)]
    for step, x in enumerate(xs):
        outs = []
        for model, opt in zip((plain, efficient), opts, strict=True):
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(step)
            y = model(xi)
            opt.zero_grad()
            (y * torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype)
             .view_as(y)).sum().backward()
            outs.append((y, xi.grad, [p.grad.clone() for p in model.parameters()]))
            opt.step()
        (ya, ga, pa), (yb, gb, pb) = outs
        worst = max(worst, rel(ya, yb), rel(ga, gb),
                    *(rel(a, b) for a, b in zip(pa, pb, strict=True)))
    for a, b in zip(plain.buffers(), efficient.buffers(), strict=True):
        worst = max(worst, rel(a.double(), b.double()))
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU tests cover CPU)")
        return 0
    dev = torch.device("cuda")
    torch.backends.cudnn.deterministic = True  # float64 parity, not speed
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    checks = results["checks"]
    for name, cfg in CONFIGS.items():
        size = 9 if cfg["stem"] == "cifar" else 37
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            xs = [torch.randn(3, 3, size, size, device=dev, dtype=torch.float64)
                  .contiguous(memory_format=fmt) for _ in range(3)]
            for drop in (0.0, 0.3):
                plain, efficient = pair(dev, drop_rate=drop, **cfg)
                err = worst_training_error(plain, efficient, xs)
                key = f"float64 {name} {'CL' if cl else 'NCHW'} drop={drop}"
                checks[key] = {"max_rel_error": err, "ok": err < TOL}
    reference, _ = pair(dev, torch.float32, bottleneck=True, stem="cifar")
    x = torch.randn(16, 3, 16, 16, device=dev).contiguous(memory_format=torch.channels_last)
    ref = reference(x).detach()
    errs = {}
    for me in (False, True):
        model = copy.deepcopy(reference).set_memory_efficient(me)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        errs[me] = rel(ref, y.float())
    checks["bf16 CL autocast output vs fp32"] = {
        "plain": errs[False], "efficient": errs[True], "ok": errs[True] < 2 * errs[False] + 0.01}
    failed = [k for k, v in checks.items() if not v["ok"]]
    for k, v in checks.items():
        print(f"{'ok  ' if v['ok'] else 'FAIL'} {k}: "
              + ", ".join(f"{a}={b:.2e}" for a, b in v.items() if isinstance(b, float)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
