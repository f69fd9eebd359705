"""Export a DenseNet for deployment: ONNX, TorchScript, a torch.export ExportedProgram, or the
state dict MONAI's DenseNet loads.

ONNX uses torch's exporter built on torch.export (``dynamo=True``, which needs onnxscript)
wherever it exists, and falls back to the TorchScript-based exporter on torch releases or
installs without it. Every graph artefact carries the model's configuration, class names and
preprocessing as metadata (a MONAI state dict holds weights only), and :func:`verify` runs it and
compares with PyTorch: a MONAI state dict in MONAI's own DenseNet, loaded strictly.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..weights.pretrained import native_input_size
from .predict import weights_meta

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2",
           "monai": ".monai.pt"}
META_KEY = "densenets.json"


@dataclass
class ExportResult:
    path: Path
    format: str
    exporter: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    opset: int | None = None


def export_metadata(model: nn.Module) -> dict[str, Any]:
    """What a deployed model needs besides its graph: architecture, labels, preprocessing."""
    meta = weights_meta(model)
    return {"model_name": meta.get("model_name"), "model_config": model.config.to_dict(),
            "class_names": meta["class_names"], "preprocessing": meta["preprocessing"]}


def check_input_size(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, ...]:
    """``input_size`` as (C, *sides) ints, or ValueError in one line when its number of
    spatial sides is not the model's rank (1: L; 2: H W; 3: D H W) or a size is not positive."""
    size = tuple(int(s) for s in input_size)
    dims = int(getattr(model.config, "spatial_dims", 2))
    if len(size) != dims + 1 or min(size) < 1:
        sides = {1: "L", 2: "H W", 3: "D H W"}[dims]
        raise ValueError(f"the input size takes C and {dims} spatial side{'s' * (dims > 1)} "
                         f"({'C ' + sides}) for this {dims}D model, got "
                         f"{' '.join(map(str, input_size))}")
    return size


def example_input(model: nn.Module, batch_size: int = 1,
                  input_size: tuple[int, ...] | None = None) -> torch.Tensor:
    """A random batch at ``input_size`` (C, *sides), by default the size the weights'
    preprocessing produces (:func:`native_input_size`)."""
    size = native_input_size(model) if input_size is None else check_input_size(model,
                                                                                input_size)
    return torch.randn(batch_size, *size)


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           dynamic_batch: bool = False, opset: int = 18,
           input_size: tuple[int, ...] | None = None) -> ExportResult:
    """Write ``model`` (eval mode) to ``path`` in ``format``; see :data:`FORMATS`.

    The example input is ``input_size`` (C, *sides: L, H W or D H W by the model's rank),
    by default the size its weights expect (:func:`native_input_size`)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    model = model.eval()
    # torch.export specialises a batch of 1 to a constant, so trace a dynamic batch with 2.
    x = example_input(model, 2 if dynamic_batch else 1, input_size)
    model.check_input(x)
    p = check_destination(path, FORMATS[format])
    if format == "exported-program" and p.suffix != ".pt2":
        raise ValueError(f"an ExportedProgram archive must end in .pt2 (torch.export.load "
                         f"refuses other names); got {p}")
    if format == "monai":  # weights only: MONAI builds the network from its own arguments
        from ..weights.files import save

        save(model, p, layout="monai")
        return ExportResult(p, format, "densenets.save(layout='monai')", tuple(x.shape), True)
    meta = json.dumps(export_metadata(model))
    if format == "onnx":
        exporter = _export_onnx(model, x, p, dynamic_batch, opset, meta)
        return ExportResult(p, format, exporter, tuple(x.shape), dynamic_batch, opset)
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # upstream deprecation notice
            traced = torch.jit.trace(model, x)
            torch.jit.save(traced, str(p), _extra_files={META_KEY: meta})
        # A trace of this network has no batch-size constants: every batch works.
        return ExportResult(p, format, "torch.jit.trace", tuple(x.shape), True)
    ep = torch.export.export(model, (x,), dynamic_shapes=_batch_dim(dynamic_batch))
    torch.export.save(ep, str(p), extra_files={META_KEY: meta})
    return ExportResult(p, format, "torch.export", tuple(x.shape), dynamic_batch)


def check_destination(path: str | os.PathLike, suffix: str = ".onnx") -> Path:
    """Make sure ``path`` can be written (creating its folder), before any export work.

    ValueError in one line otherwise. Writing a probe file is the only test that also holds for
    read-only file systems and for the superuser, for whom permission bits say little.
    """
    p = Path(path).expanduser()
    hint = "choose another --output (-o)"
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give a file name inside it, e.g. "
                         f"{p / ('model' + suffix)}")
    blocking = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot write {p}: {blocking} is a file, not a folder; {hint}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {p.parent} for {p.name} "
                         f"({e.strerror or e}); {hint}") from None
    try:
        if p.exists():
            with open(p, "ab"):  # an existing file: writable without changing it
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".probe"):
                pass
    except OSError as e:
        raise ValueError(f"cannot write {p} ({e.strerror or e}); {hint}") from None
    return p


def _batch_dim(dynamic: bool) -> tuple[dict[int, Any]] | None:
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool, opset: int,
                 meta: str) -> str:
    params = inspect.signature(torch.onnx.export).parameters
    kw: dict[str, Any] = dict(input_names=["input"], output_names=["logits"],
                              opset_version=opset)
    # The torch.export-based exporter emits opset 18+; older opsets need the TorchScript one.
    use_dynamo = ("dynamo" in params and importlib.util.find_spec("onnxscript") is not None
                  and opset >= 18)
    if use_dynamo:
        kw.update(dynamo=True, verbose=False, dynamic_shapes=_batch_dim(dynamic))
        if "external_data" in params:
            kw["external_data"] = False  # one self-contained file (DenseNets are << 2 GB)
    else:
        if "dynamo" in params:
            kw["dynamo"] = False
        if dynamic:
            kw["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        torch.onnx.export(model, (x,), str(path), **kw)
    written = _add_onnx_metadata(path, meta)
    if written is not None and written != opset:
        raise ValueError(f"the ONNX exporter wrote opset {written}, not the requested {opset}; "
                         "pick --opset 18 or newer")
    return "torch.onnx.export(dynamo=True)" if use_dynamo else "torch.onnx.export(TorchScript)"


def _add_onnx_metadata(path: Path, meta: str) -> int | None:
    """Store ``meta`` in the ONNX file; return the default-domain opset it was written with."""
    if importlib.util.find_spec("onnx") is None:
        return None  # the graph is complete without it
    import onnx

    m = onnx.load(str(path))
    entry = m.metadata_props.add()
    entry.key, entry.value = META_KEY, meta
    onnx.save(m, str(path))
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def read_metadata(path: str | os.PathLike, format: str) -> dict[str, Any]:
    """The metadata :func:`export` stored in an artefact."""
    if format == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                 .metadata_props}
        return json.loads(props[META_KEY])
    files = {META_KEY: ""}
    if format == "torchscript":
        _jit_load(path, _extra_files=files)
    else:
        torch.export.load(str(path), extra_files=files)
    return json.loads(files[META_KEY])


def run_exported(path: str | os.PathLike, format: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported artefact on ``x`` (onnxruntime for ONNX)."""
    if format == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        return torch.from_numpy(out)
    with torch.inference_mode():
        if format == "torchscript":
            return _jit_load(path)(x)
        return torch.export.load(str(path)).module()(x)


def _jit_load(path: str | os.PathLike, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # upstream deprecation notice
        return torch.jit.load(str(path), **kw)


def verify(path: str | os.PathLike, format: str, model: nn.Module, batch_size: int = 2,
           input_size: tuple[int, ...] | None = None) -> tuple[float, float]:
    """(max |exported - PyTorch|, max |PyTorch|) on a random batch.

    The second number is the scale to judge the first by: an untrained ImageNet DenseNet in
    eval mode can emit logits of 1e7, where float32 alone differs in the units place.
    """
    x = example_input(model, batch_size, input_size)
    with torch.inference_mode():
        expected = model.eval()(x)
    got = run_monai(path, model, x) if format == "monai" else run_exported(path, format, x)
    diff = (got - expected).abs().max()
    return float(diff), float(expected.abs().max())


def monai_runner() -> str:
    """What :func:`run_monai` runs a MONAI state dict in here."""
    if importlib.util.find_spec("monai") is None:
        return "densenets.load (MONAI is not installed)"
    return "MONAI's DenseNet (strict load)"


def run_monai(path: str | os.PathLike, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a state dict written in MONAI's layout on ``x``: in MONAI's DenseNet built with
    ``model``'s arguments and loaded with ``strict=True``; without MONAI, read back by
    :func:`densenets.load` (which reads MONAI's layout)."""
    from ..weights.files import load
    from ..weights.monai_keys import monai_kwargs

    if importlib.util.find_spec("monai") is None:
        net = load(path)
    else:
        from monai.networks.nets import DenseNet

        net = DenseNet(**monai_kwargs(model))
        p = Path(path)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    with torch.inference_mode():
        return net.eval()(x)


def within_tolerance(diff: float, scale: float, tolerance: float) -> bool:
    """Absolute tolerance for outputs up to 1, relative to the output scale beyond."""
    return diff <= tolerance * max(1.0, scale)
