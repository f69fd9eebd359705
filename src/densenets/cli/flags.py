"""Flags several verbs share, each declared once, and the model a verb is pointed at.

The training configuration's flags and the architecture overrides are built from their field
declarations (:mod:`densenets.training.config`, :class:`~densenets.training.model.Architecture`);
``--device`` has one spelling rule and one resolver (:mod:`densenets.device`) for every verb.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..device import HELP as DEVICE_HELP
from ..training.config import ARCHITECTURE, GROUPS, TrainConfig
from ..training.fields import Flagged, flagged
from ..training.model import Architecture, named_model
from ..weights.files import load

_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
JSON = "print JSON"  # the --json help of most verbs


def verb(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
         help: str, json: str | None = None) -> argparse.ArgumentParser:
    """The parser of verb ``name``, run by ``func`` and described by its docstring; ``json``: the
    help of its ``--json`` (a verb whose result a script would read has one)."""
    p = sub.add_parser(name, help=help, description=inspect.getdoc(func))
    p.set_defaults(func=func)
    if json:
        p.add_argument("--json", action="store_true", help=json)
    return p


def add_device_flag(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device`` (checked and resolved by :func:`densenets.device.resolve_device`)."""
    p.add_argument("--device", default=default, help=f"{DEVICE_HELP} (default {default})")


def _add(container: Any, f: Flagged) -> None:
    flag = f.flag
    kw: dict[str, Any] = {"dest": f.dest, "help": flag.help, "default": None}
    if f.type is bool:
        kw["action"] = argparse.BooleanOptionalAction if flag.negatable else "store_true"
    else:
        kw.update(type=f.type, metavar=flag.metavar, choices=flag.choices)
        if flag.nargs:
            kw.update(nargs=flag.nargs, const=flag.const)
    container.add_argument(*f.names, **kw)


def add_field_flags(p: argparse.ArgumentParser, cls: type,
                    groups: Iterable[str | None]) -> dict[str | None, Any]:
    """A flag for each field of ``cls`` whose flag is in one of ``groups`` (None: the verb's
    own section), the sections in that order; returns the sections, for the verb's own flags."""
    sections = {}
    for title in groups:
        sections[title] = container = p if title is None else p.add_argument_group(title)
        for f in flagged(cls):
            if f.flag.group == title:
                _add(container, f)
    return sections


def add_architecture_flags(p: argparse.ArgumentParser) -> None:
    """The flags that change a zoo model's architecture (every verb that builds one)."""
    g = p.add_argument_group(ARCHITECTURE)
    for f in flagged(Architecture) + [f for f in flagged(TrainConfig)
                                      if f.flag.group == ARCHITECTURE]:
        _add(g, f)


def add_model_source(p: argparse.ArgumentParser, help: str, metavar: str = "MODEL") -> None:
    """The MODEL argument and the architecture flags that change it."""
    p.add_argument("model", metavar=metavar, help=help)
    add_architecture_flags(p)


def add_config_flags(p: argparse.ArgumentParser) -> dict[str | None, Any]:
    """Every other flagged field of the training configuration (``densenets train``)."""
    return add_field_flags(p, TrainConfig, (None, *GROUPS))


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls``'s fields that were given, by override name."""
    return {f.dest: getattr(args, f.dest) for f in flagged(cls)
            if getattr(args, f.dest, None) is not None}


def architecture(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture flags given (``depth`` and ``drop_rate`` included)."""
    arch = given(args, Architecture)
    if getattr(args, "drop_rate", None) is not None:
        arch["drop_rate"] = args.drop_rate
    return arch


def model_from_args(args: argparse.Namespace, weights: str | None = None):
    """Build the model a verb was asked for: a zoo name plus overrides, or a variant + --depth."""
    return named_model(args.model, weights=weights, **architecture(args))


def is_file_spec(spec: str) -> bool:
    """Whether MODEL names a weights file or run directory rather than a zoo name."""
    p = Path(spec)
    return p.exists() or p.suffix.lower() in _FILE_SUFFIXES or "/" in spec or "\\" in spec


def notes_to_stderr(args: argparse.Namespace, build):
    """``build()``, with each adaptation warning it raises as one ``note:`` line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = build()
    for w in caught:
        print(f"densenets {args.command}: note: {w.message}", file=sys.stderr)
    return result


def model_from_file(args: argparse.Namespace):
    """(name, model) for a weights file or run directory; adaptation notes go to stderr."""
    fixed = list(architecture(args))
    if getattr(args, "weights", None) or fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed) or "--weights"
        raise ValueError(f"{flags} applies to a zoo name; the file {args.model} already "
                         "fixes the architecture and weights")
    ema = getattr(args, "ema", False)  # the verbs that take --ema (predict, export)
    model = notes_to_stderr(args, lambda: load(args.model, ema=ema))
    return model.weights_meta.get("model_name") or Path(args.model).stem, model


def model_of(args: argparse.Namespace):
    """(name, model) for MODEL: a weights file or run directory, else a zoo name or variant
    (with ``--weights`` when the verb takes it); adaptation notes go to stderr."""
    if is_file_spec(args.model):
        return model_from_file(args)
    if getattr(args, "ema", False):
        raise ValueError(f"--ema reads the EMA of the weights a training run kept: pass the run "
                         f"directory or its checkpoint, not the zoo name {args.model}")
    weights = getattr(args, "weights", None)
    return notes_to_stderr(args, lambda: model_from_args(args, weights))
