"""Verb ``bench``: training images/s and peak memory of one model on this machine."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..device import resolve_device
from .flags import JSON, add_device_flag, verb
from .output import console


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "bench", cmd_bench, "measure training speed and peak memory on this machine",
             json=JSON)
    p.add_argument("model", help="zoo name, e.g. densenet121 or densenet-bc-100-k12")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default 64; 256 for ImageNet models on GPU, 8 on CPU)")
    p.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="square input side (default: the model's native 224 or 32)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--memory-efficient", action="store_true",
                   help="memory-efficient dense blocks")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each training step as one CUDA graph (GPU only)")
    p.add_argument("--torchvision", action="store_true",
                   help="measure torchvision's DenseNet of the same architecture instead")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5; median shown)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    add_device_flag(p)


def _default_batch(model: str, device: str) -> int:
    from ..models.zoo import IMAGENET

    if model.lower() in IMAGENET:
        return 256 if resolve_device(device).type == "cuda" else 8
    return 64


def cmd_bench(args: argparse.Namespace) -> int:
    """Time training steps (forward, cross-entropy, backward, SGD) of a zoo model on random
    data and report images/s and peak memory (GPU: max allocated; CPU: peak resident set
    size of this process). For side-by-side numbers against torchvision run `python
    benchmarks/run.py`."""
    from ..analysis.bench import BenchConfig, run_single
    from ..models.zoo import model_config

    model_config(args.model)  # unknown names fail here, with suggestions
    for flag in ("steps", "warmup"):
        if getattr(args, flag) < (1 if flag == "steps" else 0):
            raise ValueError(f"--{flag} must be at least {1 if flag == 'steps' else 0}")
    if args.input_size is not None and args.input_size < 1:
        raise ValueError("--input-size must be a positive number of pixels")
    cfg = BenchConfig(
        model=args.model.lower(), impl="torchvision" if args.torchvision else "densenets",
        memory_efficient=args.memory_efficient,
        batch_size=args.batch_size or _default_batch(args.model, args.device),
        input_size=args.input_size, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, cuda_graphs=args.cuda_graphs, device=args.device,
        steps=args.steps, warmup=args.warmup)
    result = run_single(cfg)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    env = result["environment"]
    where = env.get("gpu") or f"{env['cpu']} ({env['torch_threads']} threads)"
    t = Table(title=f"densenets bench: {cfg.model}, batch {cfg.batch_size}, "
                    f"{result['input_size']}px, {'bf16' if cfg.amp else 'fp32'}"
                    f"{', channels_last' if cfg.channels_last else ''}"
                    f"{', compiled' if cfg.compile else ''}"
                    f"{', CUDA graphs' if cfg.cuda_graphs else ''} on {where}")
    for col in ("implementation", "images/s", "median step ms", "peak MiB", "memory"):
        t.add_column(col, justify="left" if col in ("implementation", "memory") else "right")
    label = result["label"] + (f" ({result['backend']} kernels)" if result["backend"] else "")
    t.add_row(label, f"{result['images_per_s']:.1f}", f"{1e3 * result['median_step_s']:.1f}",
              f"{result['peak_mib']:.0f}", result["memory_kind"])
    console().print(t)
    print(f"torch {env['torch']}, torchvision {env['torchvision']}; median of {cfg.steps} steps "
          f"after {cfg.warmup} warm-up ({result['warmup_s']:.1f} s)")
    return 0
