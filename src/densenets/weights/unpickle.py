"""Whole pickled modules (``torch.save(model)``) read without running any code they name.

Such a file pickles the module object itself: its class by name and its attribute dictionary
(``_parameters``, ``_buffers``, ``_modules`` and plain attributes such as a label list).
Unpickling it the usual way imports every class it names and calls every function it names
(``os.system`` as readily as a tensor rebuild). This reader does neither: module classes
(``torch.nn.modules.*``, ``torchxrayvision.*``, ``torchvision.models.*``) become inert
:class:`StandIn` records of the state the file gives them, never imported nor called; tensors
are rebuilt here from the file's bytes; a short allowlist of plain containers is kept; and any
other name, or a call of a module class, is refused before anything runs, with one line naming
it and the file. Both of torch's formats are read: the zip archive (torch >= 1.6) and the older
single-stream format in which long-published checkpoints were saved.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import torch

# Where the module classes of a pickled model live; a global elsewhere is refused.
MODULE_PREFIXES = ("torch.nn.modules.", "torchxrayvision.", "torchvision.models.")
# The legacy format's first three pickles: a magic number, its version, the writer's system.
_LEGACY_MAGIC, _LEGACY_VERSION = 0x1950A86A20F9469CFC6C, 1001
# Python 2 spellings that protocol-2 pickles still use.
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class UnsafePickleError(ValueError):
    """The file names a global this reader will not use; the message names it and the file."""


def is_module_class(name: str) -> bool:
    """Whether the dotted global ``name`` is where a pickled model's module classes live."""
    return name.startswith(MODULE_PREFIXES)


class StandIn:
    """An inert record of a pickled module: the state the file gives it, nothing more.

    Built only the way pickle builds plain objects (``__new__`` then the state); calling the
    class, which a pickle does to run a constructor or a function of that name, is refused.
    """

    pickled_name = "?"  # the dotted class name the file gave

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafePickleError(f"it calls {self.pickled_name}(...), which a saved module never "
                                "does: a constructor or function of that name would run")

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is not None and not isinstance(part, dict):
                raise UnsafePickleError(f"it gives {self.pickled_name} a state of type "
                                        f"{type(part).__name__}, not a dictionary")
            self.__dict__.update(part or {})

    def __repr__(self) -> str:
        return f"StandIn({self.pickled_name})"


@cache
def _stand_in(module: str, name: str) -> type[StandIn]:
    """One stand-in class per pickled class name (pickle's NEWOBJ needs a class)."""
    return type(name, (StandIn,), {"__module__": module, "pickled_name": f"{module}.{name}"})


# ---------------------------------------------------------------- tensors from the file's bytes

@dataclass
class _Storage:
    """A storage the file holds: its element type and its bytes (a uint8 tensor, possibly a
    view into a larger storage in the legacy format)."""

    dtype: torch.dtype
    data: torch.Tensor


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                  torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                  torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
                  torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _bytes_tensor(raw: bytes) -> torch.Tensor:
    """``raw`` as a uint8 tensor owning a copy of it."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
        torch.empty(0, dtype=torch.uint8)


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """A tensor viewing the file's storage; gradients flags, hooks and metadata are dropped."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("it rebuilds a tensor from something other than a storage")
    # a legacy storage may view part of a larger one
    start = storage.data.storage_offset() // _itemsize(storage.dtype)
    tensor = torch.empty(0, dtype=storage.dtype)
    return tensor.set_(storage.data.untyped_storage(), start + int(offset), tuple(size),
                       tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = True, *_: Any) -> torch.nn.Parameter:
    if not torch.is_tensor(data):
        raise UnsafePickleError("it rebuilds a Parameter from something other than a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _no_backend(*_: Any) -> None:
    """Modules saved by torch < 1.5 pickle their compute backend as a call of this name; the
    attribute is meaningless today (torch itself keeps a stub that returns None)."""
    return None


def _bytes_of(text: Any, encoding: str = "latin1") -> bytes:
    """How protocol 2 pickles ``bytes``: ``_codecs.encode(text, "latin1")``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("it calls _codecs.encode with something other than text")
    return codecs.encode(text, "latin1")


_SAFE: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "_codecs.encode": _bytes_of,
    "torch.Size": torch.Size,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
}
# torch.FloatStorage and its kin by name (typed storages as both formats name them)
_STORAGES = {f"{n}Storage": _StorageType(d) for d, n in _STORAGE_NAMES.items()}
_STORAGES["UntypedStorage"] = _StorageType(torch.uint8)
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}


class _Unpickler(pickle.Unpickler):
    """pickle's own machine with every name it resolves and every persistent id checked."""

    def __init__(self, file: BinaryIO, storage: Any = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage = storage  # (storage type, key, location, numel, view) -> _Storage

    def find_class(self, module: str, name: str) -> Any:
        module = _RENAMED_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full in _SAFE:
            return _SAFE[full]
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if is_module_class(full):
            return _stand_in(module, name)
        raise UnsafePickleError(f"it names {full}, which is neither a module class nor a "
                                "tensor or plain container, and unpickling it could run "
                                "arbitrary code")

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0].decode("ascii") if isinstance(pid, tuple) and isinstance(
            pid[0], bytes) else (pid[0] if isinstance(pid, tuple) else None)
        if kind == "module" and len(pid) >= 2 and isinstance(pid[1], type) \
                and issubclass(pid[1], StandIn):
            return pid[1]  # how the legacy format refers to a module's class (and source)
        if kind == "storage" and self._storage is not None and len(pid) in (5, 6) \
                and isinstance(pid[1], _StorageType):
            return self._storage(*pid[1:])
        raise UnsafePickleError(f"it holds an unknown persistent reference {str(pid)[:60]}")


# ---------------------------------------------------------------- the two file formats

def _zip_load(f: BinaryIO) -> Any:
    with zipfile.ZipFile(f) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError("a zip archive without one data.pkl (a TorchScript file or "
                             "another archive, not torch.save's)")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in z.namelist() and z.read(root + "byteorder") != b"little":
            raise ValueError("saved on a big-endian machine; re-save it on a little-endian one")

        def storage(kind: _StorageType, key: Any, location: Any, numel: Any) -> _Storage:
            raw = z.read(f"{root}data/{key}")
            nbytes = int(numel) * _itemsize(kind.dtype)
            if len(raw) != nbytes:
                raise ValueError(f"storage {key} holds {len(raw)} bytes, {nbytes} expected")
            return _Storage(kind.dtype, _bytes_tensor(raw))

        return _Unpickler(io.BytesIO(z.read(pkl[0])), storage).load()


def _legacy_load(f: BinaryIO, size: int) -> Any:
    """torch's format before 1.6: magic number, version and system pickles, the object (its
    storages as persistent ids), the storage keys, then each storage's length and bytes."""
    header = [_Unpickler(f).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_VERSION:
        raise ValueError("unreadable pickle data")
    if isinstance(header[2], dict) and header[2].get("little_endian") is False:
        raise ValueError("saved on a big-endian machine; re-save it on a little-endian one")
    storages: dict[str, _Storage] = {}

    def storage(kind: _StorageType, key: Any, location: Any, numel: Any,
                view: Any = None) -> _Storage:
        item = _itemsize(kind.dtype)
        if str(key) not in storages:
            if not 0 <= int(numel) * item <= size:  # never allocate more than the file holds
                raise ValueError(f"storage {key} claims {numel} elements, more than the file")
            storages[str(key)] = _Storage(kind.dtype, torch.zeros(int(numel) * item,
                                                                  dtype=torch.uint8))
        root = storages[str(key)]
        if view is None:
            return root
        _, offset, length = view  # a storage viewing part of another
        return _Storage(kind.dtype, root.data[int(offset) * item:(int(offset) + int(length))
                                              * item])

    obj = _Unpickler(f, storage).load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list):
        raise ValueError("unreadable pickle data")
    for key in keys:  # each: its element count, then its bytes
        if str(key) not in storages:
            raise ValueError(f"storage {key} is listed but never used")
        s = storages[str(key)]
        head = f.read(8)
        count = struct.unpack("<q", head)[0] if len(head) == 8 else -1
        raw = f.read(s.data.numel())
        if count * _itemsize(s.dtype) != s.data.numel() or len(raw) != s.data.numel():
            raise ValueError("truncated: a storage's bytes end early")
        s.data.copy_(_bytes_tensor(raw))
    return obj


def read_pickled(path: str | os.PathLike) -> Any:
    """The object ``torch.save`` wrote to ``path``, module objects as :class:`StandIn` records.

    Raises :class:`UnsafePickleError` naming the first global that is not allowed (nothing
    it names has run), or ValueError when the file is not a readable checkpoint.
    """
    p = Path(path)
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                return _zip_load(f)
            f.seek(0)
            return _legacy_load(f, size)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"refused to load {p}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError, KeyError,
            IndexError, AttributeError, zipfile.BadZipFile, struct.error) as e:
        raise ValueError(f"{p} is not a readable PyTorch checkpoint ({e})") from None


# ---------------------------------------------------------------- what a pickled module holds

@dataclass
class PickledModule:
    """A whole pickled module, read: its class, its state dict, its plain attributes."""

    class_name: str
    state_dict: dict[str, torch.Tensor]
    attributes: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> bool:
    """Attributes worth keeping: tensors, and numbers, text and lists of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or torch.is_tensor(value) or isinstance(value, (str, int, float, bool))


def module_state(root: StandIn, path: str | os.PathLike = "") -> dict[str, torch.Tensor]:
    """What ``state_dict()`` of the saved module gave: parameters and persistent buffers of it
    and its submodules, by dotted name."""
    out: dict[str, torch.Tensor] = {}

    def walk(mod: StandIn, prefix: str, above: tuple[int, ...]) -> None:
        if id(mod) in above:
            raise ValueError(f"{path}: module {prefix or 'root'} contains itself")
        state = mod.__dict__
        transient = set(state.get("_non_persistent_buffers_set") or ())
        for kind in ("_parameters", "_buffers"):
            for name, value in (state.get(kind) or {}).items():
                if value is None or (kind == "_buffers" and name in transient):
                    continue
                if not torch.is_tensor(value):
                    raise ValueError(f"{path}: {prefix}{name} is a {type(value).__name__}, "
                                     "not a tensor")
                out[prefix + str(name)] = value.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, StandIn):
                raise ValueError(f"{path}: submodule {prefix}{name} is a "
                                 f"{type(child).__name__}, not a module")
            walk(child, f"{prefix}{name}.", (*above, id(mod)))

    walk(root, "", ())
    return out


def as_module(obj: Any, path: str | os.PathLike = "") -> PickledModule | None:
    """The pickled module ``obj`` holds (itself, or the one module among a dict's values), read
    into a :class:`PickledModule`; None when it holds none."""
    if isinstance(obj, Mapping):
        found = [v for v in obj.values() if isinstance(v, StandIn)]
        obj = found[0] if len(found) == 1 else None
    if not isinstance(obj, StandIn):
        return None
    attributes = {k: v for k, v in obj.__dict__.items()
                  if not k.startswith("_") and k != "training" and _plain(v)}
    return PickledModule(obj.pickled_name, module_state(obj, path), attributes)


def read_module(path: str | os.PathLike) -> Any:
    """A :class:`PickledModule` for a file holding a whole pickled module, else the plain
    object the file holds (tensors and containers only, as ``weights_only`` loading gives)."""
    obj = read_pickled(path)
    module = as_module(obj, path)
    return obj if module is None else module


__all__ = ["MODULE_PREFIXES", "PickledModule", "StandIn", "UnsafePickleError", "as_module",
           "is_module_class", "module_state", "read_module", "read_pickled"]
