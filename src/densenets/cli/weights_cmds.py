"""Verbs that use a model's weights: export and predict.

CHECKPOINT_OR_MODEL is a weights file (a training checkpoint or state dict in .pt/.pth, a
.safetensors file), a run directory (its best.pt), or a zoo name with random weights unless
``--weights imagenet|PATH`` is given. ``--ema`` takes the exponential moving average of the
weights a run trained with ``--ema-decay`` kept (:func:`densenets.load` with ``ema=True``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..deploy.export import (
    FORMATS,
    check_destination,
    export,
    monai_runner,
    verify,
    within_tolerance,
)
from ..deploy.predict import predict_files, weights_meta
from ..deploy.segment import is_segmentation_model, predict_masks
from .flags import JSON, add_device_flag, add_model_source, is_file_spec, model_of, verb


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "export", cmd_export,
             "export a model to ONNX, TorchScript, a torch.export program or MONAI's layout",
             json=JSON)
    _add_source(p)
    p.add_argument("--format", choices=list(FORMATS), default="onnx",
                   help="default: onnx; monai: the state dict MONAI's DenseNet loads "
                        "(.pt/.pth/.safetensors)")
    p.add_argument("-o", "--output", help="output file (default: MODEL.onnx/.pt/.pt2)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="let the batch dimension vary (TorchScript traces always do)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--input-size", nargs="+", type=int, metavar="N",
                   help="example input: C and one side per spatial dimension, C L, C H W or "
                        "C D H W (default: the size the weights expect)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported model")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |exported - PyTorch| in the check, relative to the "
                        "largest output when that exceeds 1 (default 1e-4)")

    p = verb(sub, "predict", cmd_predict, "top classes for image files", json=JSON)
    _add_source(p)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (a volume model: .npy/.nii/.nii.gz volumes)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--out", metavar="DIR", help="segmentation models: write NAME_mask.png "
                   "(class indices) and NAME_overlay.png for each image into DIR")
    add_device_flag(p, default="cpu")


def _add_source(p: argparse.ArgumentParser) -> None:
    add_model_source(p, "weights file, run directory, or zoo name (random weights)",
                     "CHECKPOINT_OR_MODEL")
    p.add_argument("--weights", metavar="imagenet|hf-hub:ORG/NAME|PATH",
                   help="for a zoo name: the published ImageNet weights (torchvision's; the "
                        "Hub's for densenetblur121d and RDNet), a Hub repository or a local file")
    p.add_argument("--ema", action="store_true",
                   help="a training checkpoint's EMA of the weights (a run with --ema-decay)")


def is_random(args: argparse.Namespace) -> bool:
    """Whether CHECKPOINT_OR_MODEL is a zoo name without --weights: an untrained network."""
    return not is_file_spec(args.model) and not args.weights


def cmd_export(args: argparse.Namespace) -> int:
    """Write CHECKPOINT_OR_MODEL (a .pt/.pth/.safetensors file, a run directory, or a zoo
    name) to FILE and check the result against PyTorch (ONNX with onnxruntime)."""
    if args.output:  # before loading anything: a bad destination fails in a moment
        check_destination(args.output, FORMATS[args.format])
    name, model = model_of(args)
    out = args.output or _default_output(name, args)
    size = tuple(args.input_size) if args.input_size else None
    result = export(model, out, args.format, dynamic_batch=args.dynamic_batch, opset=args.opset,
                    input_size=size)
    # A dynamic batch is checked at a size other than the traced one, to show it varies.
    check_batch = 3 if result.dynamic_batch else result.input_shape[0]
    diff, scale = (None, None) if args.no_check else verify(
        out, args.format, model, batch_size=check_batch, input_size=size)
    ok = diff is None or within_tolerance(diff, scale, args.tolerance)
    info = {"model": name, "ema": args.ema, "file": str(result.path), "format": result.format,
            "exporter": result.exporter, "example_input": list(result.input_shape),
            "dynamic_batch": result.dynamic_batch, "bytes": result.path.stat().st_size,
            "opset": result.opset, "max_abs_diff": diff, "max_abs_output": scale,
            "check_passed": ok if diff is not None else None}
    if args.format == "monai":
        from ..weights.monai_keys import monai_kwargs

        info["monai_kwargs"] = monai_kwargs(model)
    if args.json:
        print(json.dumps(info, indent=2))
    elif args.format == "monai":
        _print_monai(name, args, info, check_batch)
    else:
        extra = f", opset {result.opset}" if result.opset else ""
        print(f"exported {_named(name, args)} to {result.path} ({result.format} via "
              f"{result.exporter}{extra}, "
              f"input {'x'.join(map(str, result.input_shape[1:]))}, "
              f"{'dynamic' if result.dynamic_batch else 'fixed'} batch, "
              f"{_size(info['bytes'])})")
        if diff is not None:
            runner = "onnxruntime" if args.format == "onnx" else "the reloaded artefact"
            print(f"check: {runner} vs PyTorch on a batch of {check_batch}, "
                  f"max |diff| = {diff:.2e} on outputs up to {scale:.3g} "
                  f"({'ok' if ok else 'FAILED'}, tolerance {args.tolerance:g} x max(1, output))")
    if not ok:
        print(f"densenets export: error: exported outputs differ from PyTorch by {diff:.2e} "
              f"> {args.tolerance:g} x max(1, {scale:.3g})", file=sys.stderr)
        return 1
    return 0


def _default_output(name: str, args: argparse.Namespace) -> str:
    """NAME + the format's suffix: the model's name, or the source's when the name is a
    description of the architecture (weights saved without a zoo name)."""
    base = Path(name).name
    if not re.fullmatch(r"[\w.+-]+", base):
        base = Path(args.model.rstrip("/")).stem
    return f"{base}{FORMATS[args.format]}"


def _print_monai(name: str, args: argparse.Namespace, info: dict, batch: int) -> None:
    kw = ", ".join(f"{k}={v!r}" for k, v in info["monai_kwargs"].items())
    path = info["file"]
    read = (f"safetensors.torch.load_file({path!r})" if path.endswith(".safetensors")
            else f"torch.load({path!r}, weights_only=True)")
    print(f"exported {_named(name, args)} to {path} (a state dict in MONAI's layout, "
          f"{_size(info['bytes'])}); in MONAI: net = monai.networks.nets.DenseNet({kw}); "
          f"net.load_state_dict({read})")
    if info["max_abs_diff"] is not None:
        print(f"check: {monai_runner()} vs PyTorch on a batch of {batch} at "
              f"{'x'.join(map(str, info['example_input'][1:]))}, max |diff| = "
              f"{info['max_abs_diff']:.2e} on outputs up to {info['max_abs_output']:.3g} "
              f"({'ok' if info['check_passed'] else 'FAILED'}, tolerance {args.tolerance:g} x "
              "max(1, output))")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _named(name: str, args: argparse.Namespace) -> str:
    """The model as the verbs print it: its name, and which of a run's weights it carries."""
    return f"{name} (EMA weights)" if args.ema else name


RANDOM_WEIGHTS = ("random weights: this network is untrained, so its classes mean nothing; "
                  "pass --weights imagenet (or PATH), or a trained checkpoint or run directory")


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with CHECKPOINT_OR_MODEL, using the preprocessing and class
    names stored with its weights. Unreadable files are reported and skipped (exit status
    1); the rest are still predicted."""
    name, model = model_of(args)
    if is_segmentation_model(model):
        return _predict_masks(name, model, args)
    if args.out:
        raise ValueError(f"--out writes segmentation masks; {name} is a classifier (it prints "
                         "its top classes): drop --out")
    report = predict_files(model, args.images, topk=args.topk, batch_size=args.batch_size,
                           device=args.device)
    meta = weights_meta(model)
    random = is_random(args)
    for s in report.skipped:
        print(f"densenets predict: skipped {s['file']}: {s['error']}", file=sys.stderr)
    if args.json:
        warning = {"warning": RANDOM_WEIGHTS} if random else {}
        print(json.dumps({"model": name, "source": meta.get("source"),
                          "weights": "random" if random else "trained", "ema": args.ema,
                          **warning,
                          "preprocessing": meta["preprocessing"], **report.to_dict()}, indent=2))
    else:
        pre = meta["preprocessing"]
        resize = pre.get("resize") or pre["crop"]
        labels = "its class names" if meta["class_names"] else "class indices (no names stored)"
        caution = f" ({RANDOM_WEIGHTS})" if random else ""
        if pre.get("volume_size"):  # a volume model: its files are resampled, not cropped
            window = pre.get("intensity_window")
            scaling = f"window {window[0]:g}..{window[1]:g}" if window else "z-scored"
            shape = "x".join(map(str, pre["volume_size"]))
            print(f"{_named(name, args)}{caution}: volumes {scaling}, resampled to {shape} "
                  f"({pre.get('interpolation', 'trilinear')}); {labels}")
        else:
            print(f"{_named(name, args)}{caution}: resize {resize}, centre crop {pre['crop']}, "
                  f"{pre.get('interpolation', 'bilinear')}; {labels}")
        for p in report.predictions:
            if p.preprocessed:  # what was done to this image beyond reading it
                print(f"densenets predict: note: {p.file}: {'; '.join(p.preprocessed)}",
                      file=sys.stderr)
            print(p.file)
            for rank, t in enumerate(p.topk, 1):
                print(f"  {rank}. {t['probability'] * 100:6.2f}%  {t['label']} ({t['index']})")
    return 1 if report.skipped else 0


def _predict_masks(name: str, model, args: argparse.Namespace) -> int:
    """A segmentation model's predict: a mask and an overlay PNG per image into --out."""
    if not args.out:
        raise ValueError(f"{name} is a segmentation model: pass --out DIR for its mask and "
                         "overlay PNGs")
    report = predict_masks(model, args.images, args.out, device=args.device)
    for s in report["skipped"]:
        print(f"densenets predict: skipped {s['file']}: {s['error']}", file=sys.stderr)
    if args.json:
        warning = {"warning": RANDOM_WEIGHTS} if is_random(args) else {}
        print(json.dumps({"model": name, "ema": args.ema, **warning, **report}, indent=2))
    else:
        caution = f" ({RANDOM_WEIGHTS})" if is_random(args) else ""
        print(f"{_named(name, args)}{caution}: whole images, class indices in NAME_mask.png")
        for m in report["masks"]:
            top = ", ".join(f"{c} {share:.1f}%" for c, share in sorted(
                m["classes"].items(), key=lambda kv: -kv[1])[:5])
            print(f"{m['file']}: {m['mask']}, {m['overlay']} ({top})")
    return 1 if report["skipped"] else 0
