"""Verbs that look at models without training them: models, summary, paper."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..analysis.summary import human, model_stats, paper_tables, summary
from ..deploy.export import check_input_size, native_input_size
from ..factory import list_models
from .flags import JSON, add_model_source, model_of, verb
from .output import console


def register(sub: argparse._SubParsersAction) -> None:
    verb(sub, "models", cmd_models, "list the model zoo with parameters and MACs", json=JSON)

    p = verb(sub, "summary", cmd_summary, "per-layer shapes, parameters and MACs of a model",
             json=JSON)
    add_model_source(p, "zoo name, variant, weights file or run directory")
    add_input_size(p, "default: the size its weights expect, else its native size")
    p.add_argument("--batch-size", type=int, default=1, help="batch dimension (default 1)")

    verb(sub, "paper", cmd_paper, "the paper's Tables 1 and 2 beside our computed numbers",
         json=JSON)


def add_input_size(p: argparse.ArgumentParser, default: str) -> None:
    """``--input-size C [L | H W | D H W]``: one side per spatial dimension of the model
    (checked against it by :func:`input_size`)."""
    p.add_argument("--input-size", nargs="+", type=int, metavar="N",
                   help=f"channels and one side per spatial dimension: C L (1D), C H W (2D) "
                        f"or C D H W (3D) ({default})")


def input_size(args: argparse.Namespace, model) -> tuple[int, ...]:
    """(C, *sides) for ``model``: ``--input-size`` if given (its number of sides checked
    against the model's rank), else the size the model's weights expect."""
    if args.input_size:
        return check_input_size(model, args.input_size)
    return native_input_size(model)


def cmd_models(args: argparse.Namespace) -> int:
    """Every zoo name with parameters and multiply-adds at its native input size (224x224
    ImageNet, 32x32 CIFAR/SVHN)."""
    stats = [model_stats(n) for n in list_models()]
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    t = Table(title="densenets model zoo (MACs = multiply-adds at the native input size)")
    for col in ("model", "k", "blocks", "B", "theta", "input", "params", "MACs"):
        t.add_column(col, justify="left" if col in ("model", "blocks") else "right")
    for s in stats:
        k = s["growth_rate"]  # an RDNet has one growth rate per mixing block
        k = f"{min(k)}-{max(k)}" if isinstance(k, list) else str(k)
        t.add_row(s["name"], k, str(tuple(s["block_config"])),
                  "yes" if s["bottleneck"] else "no", f"{s['compression']:g}",
                  "x".join(map(str, s["input_size"][1:])), f"{s['params']:,}", human(s["macs"]))
    console().print(t)
    print("Any depth works for CIFAR/SVHN names: densenet-{L}-k{k} (L = 3n+4), "
          "densenet-bc-{L}-k{k} (L = 6n+4), also densenet-b- and densenet-c-.")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """One row per stem op, dense layer, dense block, transition, pool and classifier (an
    FC-DenseNet: its blocks and transitions down and up). MODEL is a zoo name (densenet121,
    densenet-bc-100-k12, fcdensenet56, ...), a variant (densenet, densenet-b, densenet-c,
    densenet-bc) with --depth, or a weights file or run directory (its stored architecture).
    --spatial-dims 1 or 3 builds a zoo name for signals or volumes; --input-size then takes
    C L or C D H W."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    name, model = model_of(args)
    s = summary(model, (args.batch_size, *input_size(args, model)), name=name)
    if args.json:
        print(s.to_json())
    else:
        console().print(s.table())
        print(f"MACs: multiply-adds of conv and linear layers, {s.total_macs / 1e9:.3f} G "
              f"(x2 = {2 * s.total_macs / 1e9:.3f} GFLOPs)")
    return 0


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def cmd_paper(args: argparse.Namespace) -> int:
    tables = paper_tables()
    if args.json:
        print(json.dumps(tables, indent=2))
        return 0
    out = console()
    t = Table(title="Table 1 + 3: ImageNet models (224x224, 1000 classes). Error % = paper, "
                    "single-crop / 10-crop; torchvision acc % = resize 256 bilinear, crop 224")
    for col in ("model", "blocks", "k", "params (ours)", "params (torchvision)", "match",
                "GMACs", "top-1 err", "top-5 err", "tv top-1/top-5 acc"):
        t.add_column(col, justify="left" if col in ("model", "blocks") else "right")
    for r in tables["table1"]:
        tv = "-" if r["torchvision_params"] is None else f"{r['torchvision_params']:,}"
        t.add_row(r["name"], str(tuple(r["block_config"])), str(r["growth_rate"]),
                  f"{r['params']:,}", tv,
                  "-" if r["torchvision_params"] is None else
                  ("yes" if r["params_match"] else "NO"),
                  f"{r['macs'] / 1e9:.2f}",
                  f"{_fmt(r['top1_err_1crop'])} / {_fmt(r['top1_err_10crop'])}",
                  f"{_fmt(r['top5_err_1crop'])} / {_fmt(r['top5_err_10crop'])}",
                  f"{_fmt(r['torchvision_top1_acc'], '.3f')} / "
                  f"{_fmt(r['torchvision_top5_acc'], '.3f')}")
    out.print(t)
    t = Table(title="Table 2: CIFAR/SVHN models (32x32, 10 classes). Test error % from the "
                    "paper; + = standard augmentation")
    for col in ("model", "L", "k", "params (paper)", "params (ours)", "match", "MMACs",
                "C10", "C10+", "C100", "C100+", "SVHN"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in tables["table2"]:
        depth = r["name"].split("-")[-2]
        e = r["errors"]
        t.add_row(r["name"], depth, str(r["growth_rate"]), f"{r['paper_params_m']:.1f}M",
                  f"{r['params']:,}", "yes" if r["params_match"] else "NO",
                  f"{r['macs'] / 1e6:.0f}", *(_fmt(e[c]) for c in ("C10", "C10+", "C100",
                                                                    "C100+", "SVHN")))
    out.print(t)
    t = Table(title="RDNet (DenseNets Reloaded, ECCV 2024): ImageNet-1k at 224x224, "
                    "top-1 accuracy as published")
    for col in ("model", "mixing blocks", "growth rates", "params (ours)", "params (paper)",
                "GMACs (ours)", "GMACs (paper)", "match", "top-1 %"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in tables["rdnet"]:
        t.add_row(r["name"], str(len(r["block_config"])),
                  f"{min(r['growth_rate'])}-{max(r['growth_rate'])}", f"{r['params']:,}",
                  f"{r['paper_params_m']}M", f"{r['macs'] / 1e9:.2f}", f"{r['paper_gmacs']:.1f}",
                  "yes" if r["params_match"] and r["macs_match"] else "NO",
                  f"{r['top1_acc']:.1f}")
    out.print(t)
    print(f"rdnet_large fine-tuned at 384x384: {tables['rdnet_large_384_top1_acc']}% top-1.")
    print(tables["macs_convention"])
    return 0
