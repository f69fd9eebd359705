"""Each setting of a training run declared once: its default, its flag, its check.

A field of :class:`~densenets.training.config.TrainConfig` is declared with :func:`setting`;
everything else is read from that declaration: the command line's flags (built by the CLI from
:func:`flagged`), the overrides :func:`~densenets.training.recipes.resolve` accepts,
``config.json`` (the dataclass itself), the value checks (:func:`check_fields`) and which
fields a resumed run may change (:func:`resumable`). Adding a field is one declaration there.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import KW_ONLY, MISSING, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Check:
    """A condition on one value and what the error says when it fails (``must be >= 1``)."""

    ok: Callable[[Any], bool]
    says: str


def at_least(n: float, unit: str = "") -> Check:
    return Check(ok=lambda v: v >= n, says=f"must be >= {n:g}{' ' + unit if unit else ''}")


def above(n: float) -> Check:
    return Check(ok=lambda v: v > n, says=f"must be > {n:g}")


FRACTION = Check(ok=lambda v: 0 <= v < 1, says="must be in [0, 1)")
PROBABILITY = Check(ok=lambda v: 0 <= v <= 1, says="is a probability in [0, 1]")


@dataclass(frozen=True)
class Flag:
    """How the command line spells a field: ``--field-name`` unless ``names`` says otherwise.

    ``dest`` is the override's name when it is not the field's (``--image-size`` sets the crop
    through ``resolve(image_size=...)``); booleans are switches (``negatable``: also ``--no-X``).
    """

    group: str | None = None  # the --help section; None: the verb's own
    help: str | None = None
    _: KW_ONLY
    metavar: str | None = None
    names: tuple[str, ...] = ()
    dest: str | None = None
    choices: tuple[str, ...] | None = None
    negatable: bool = False
    nargs: str | None = None
    const: Any = None


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None,
            flag: Flag | None = None, check: Check | Callable[[Any], Any] | None = None,
            resumable: bool = False) -> Any:
    """A dataclass field with its flag, its check and whether ``--resume`` may change it."""
    meta = {"flag": flag, "check": check, "resumable": resumable}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class Flagged:
    """One field that has a flag, with what argparse needs to declare it."""

    name: str
    flag: Flag
    type: type  # int, float, str or bool (a switch); the element type of a sequence
    optional: bool  # None is a value of its own (``--threads``: torch's default)

    @property
    def dest(self) -> str:
        return self.flag.dest or self.name

    @property
    def names(self) -> tuple[str, ...]:
        return self.flag.names or ("--" + self.name.replace("_", "-"),)


def _plain_type(hint: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``float`` -> (float, False); ``tuple[int, ...]`` -> int
    (a flag that takes several values gives each the element type)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        plain = [a for a in args if a is not type(None)]
        return _plain_type(plain[0])[0], len(plain) < len(args)
    if typing.get_origin(hint) in (tuple, list):
        return args[0], False
    return hint, False


def flagged(cls: type) -> list[Flagged]:
    """The fields of ``cls`` that have a flag, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag") is not None:
            kind, optional = _plain_type(hints[f.name])
            out.append(Flagged(name=f.name, flag=f.metadata["flag"], type=kind, optional=optional))
    return out


def resumable(cls: type) -> tuple[str, ...]:
    """The fields a resumed run may change (where the data is, how long, on what)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


def flag_name(name: str) -> str:
    """The flag the messages name for field ``name``."""
    return "--" + name.replace("_", "-")


def check_fields(obj: Any) -> None:
    """Every declared check of ``obj``'s fields; ValueError naming the flag otherwise.

    A field whose default is None accepts None (it means "the default": torch's threads, no
    mixed precision); a field with choices takes one of them.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        flag, check = f.metadata.get("flag"), f.metadata.get("check")
        if flag is not None and flag.choices and value not in flag.choices:
            raise ValueError(f"{flag_name(f.name)} must be one of {', '.join(flag.choices)}, "
                             f"got {value!r}")
        if isinstance(check, Check):
            if not check.ok(value):
                shown = repr(value) if isinstance(value, str) else value
                raise ValueError(f"{flag_name(f.name)} {check.says}, got {shown}")
        elif check is not None:
            check(value)  # raises its own message (a parser: --device, --auto-augment)


def pick(cls: type, source: Any, **given: Any) -> Any:
    """``cls`` built by keyword from the same-named attributes of ``source`` (``given`` wins):
    a group of settings taken from a configuration without naming its fields again."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {n: getattr(source, n) for n in names if n not in given and hasattr(source, n)}
    return cls(**values, **{k: v for k, v in given.items() if k in names})
