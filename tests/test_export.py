"""Issue 3, item 7: export to ONNX (checked with onnxruntime), TorchScript, ExportedProgram."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support import vary_bn

from densenets import DenseNet, create_model, save
from densenets.cli import main
from densenets.deploy.export import export, read_metadata, run_exported, within_tolerance

# the [onnx] extra; the rest of the library works without it
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small zoo model with non-trivial weights saved with class names: as after training."""
    torch.manual_seed(0)
    model = create_model("densenet-bc-16-k4", num_classes=4)
    vary_bn(model)
    model.weights_meta = {"class_names": ["w", "x", "y", "z"]}
    path = save(model, tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    return model.eval(), path


def onnxruntime_outputs(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_cli_onnx_dynamic_batch_matches_pytorch(trained, tmp_path, capsys):
    model, ckpt = trained
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--dynamic-batch", "-o", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["check_passed"] and info["max_abs_diff"] < 1e-4 and info["opset"] == 18
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(onnxruntime_outputs(out, x) - expected).max() < 1e-4
    meta = read_metadata(out, "onnx")
    assert meta["class_names"] == ["w", "x", "y", "z"]
    assert meta["model_config"] == model.config.to_dict()
    assert meta["preprocessing"]["crop"] == 32


def test_onnx_fixed_batch_and_older_opset(trained, tmp_path):
    model, _ = trained
    for opset in (17, 18):
        path = tmp_path / f"m{opset}.onnx"
        result = export(model, path, "onnx", opset=opset)
        assert result.input_shape == (1, 3, 32, 32)
        proto = onnx.load(str(path))
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert np.abs(onnxruntime_outputs(path, x) - model(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("exported-program", ".pt2")])
def test_torchscript_and_exported_program_roundtrip(trained, tmp_path, fmt, suffix):
    model, _ = trained
    path = tmp_path / f"model{suffix}"
    export(model, path, fmt, dynamic_batch=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (run_exported(path, fmt, x) - model(x)).abs().max() < 1e-5
    assert read_metadata(path, fmt)["class_names"] == ["w", "x", "y", "z"]


def test_cli_exports_any_zoo_name_with_random_weights(tmp_path, capsys):
    out = tmp_path / "zoo.pt2"
    assert main(["export", "densenet-bc-16-k4", "--num-classes", "7", "--format",
                 "exported-program", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exported densenet-bc-16-k4" in text and "(ok, tolerance 0.0001" in text
    assert read_metadata(out, "exported-program")["model_config"]["num_classes"] == 7


def test_cli_default_output_is_named_after_the_model_or_its_file(tmp_path, monkeypatch):
    """A zoo name names the file; weights without one (their name is a description of the
    architecture) give the source file's name."""
    monkeypatch.chdir(tmp_path)
    mine = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, stem="cifar",
                    num_classes=3)
    src = save(mine, tmp_path / "mine.safetensors")
    assert main(["export", str(src), "--format", "torchscript", "--no-check"]) == 0
    assert main(["export", "densenet-bc-16-k4", "--format", "torchscript", "--no-check"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["densenet-bc-16-k4.pt", "mine.pt"]


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "densenet-bc-16-k4", "--format", "exported-program",
                 "-o", str(tmp_path / "x.pt")]) == 2
    assert main(["export", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "must end in .pt2" in err[0] and "no such weights file" in err[1]
    with pytest.raises(SystemExit) as e:
        main(["export", "densenet-bc-16-k4", "--format", "tflite"])
    assert e.value.code == 2


def test_tolerance_is_absolute_for_small_outputs_and_relative_for_large():
    # an untrained ImageNet DenseNet in eval mode emits logits near 1e7: float32 alone
    # differs in the units place there, while trained logits are judged to 1e-4 absolute
    assert within_tolerance(6.0, 1.6e7, 1e-4)
    assert not within_tolerance(6.0, 1e4, 1e-4)
    assert within_tolerance(9e-5, 0.3, 1e-4) and not within_tolerance(2e-4, 0.3, 1e-4)
