"""TorchXRayVision's chest X-ray DenseNet-121s: its files (whole pickled modules, read without
running their code, and state dicts), its weight sets by name through the checked download, its
preprocessing and operating points, and predict's multi-label probabilities.

Every TorchXRayVision model here is built locally (``xrv.models.DenseNet(weights=None)``
downloads nothing) and saved as TorchXRayVision's users save it; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import rel, run_cli, vary_bn

from densenets import create_model, load
from densenets.deploy.predict import probabilities
from densenets.weights import xrv as ours
from densenets.weights.unpickle import read_module

xrv = pytest.importorskip("torchxrayvision")
pytestmark = pytest.mark.usefixtures("one_thread_module")

NIH = ours.XRV_WEIGHTS["densenet121-res224-nih"]
X = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 600


def xrv_logits(m, x: torch.Tensor) -> torch.Tensor:
    """TorchXRayVision's DenseNet before its sigmoid and operating points."""
    return m.classifier(m.features2(x))


@pytest.fixture(scope="module")
def reference():
    """A TorchXRayVision DenseNet-121 with the NIH set's operating points (four untrained
    outputs, NaN thresholds), in eval mode, whose probabilities are far from 0 and 1.

    BN scales and shifts are varied; the running statistics come from a batch of inputs in
    [-1024, 1024] and the classifier is scaled to logits of order 1, half of them shifted
    down, so that outputs fall on both sides of the thresholds instead of saturating (random
    initialisation gives logits in the thousands at these intensities, where every
    probability is 1 and comparing them proves nothing)."""
    torch.manual_seed(0)
    op = torch.tensor(xrv.models.model_urls["nih"]["op_threshs"], dtype=torch.float32)
    m = xrv.models.DenseNet(weights=None, op_threshs=op.clone())
    vary_bn(m)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        m.op_threshs.copy_(op)  # vary_bn drew the 18 thresholds too
        m.train()(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(5))
                  * 2048 - 1024)
        m.eval()
        m.classifier.weight.div_(xrv_logits(m, X).std() / 2)
        m.classifier.bias[::2] -= 5
    return m


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """The model saved whole (zip and pre-1.6 formats, TorchXRayVision's published files are
    the latter) and as a state dict."""
    d = tmp_path_factory.mktemp("xrv")
    out = {"whole": d / "whole.pt", "legacy": d / "legacy.pt", "state_dict": d / "sd.pt"}
    torch.save(reference, out["whole"])
    torch.save(reference, out["legacy"], _use_new_zipfile_serialization=False)
    torch.save(reference.state_dict(), out["state_dict"])
    return out


@pytest.mark.parametrize("kind", ["whole", "legacy", "state_dict"])
def test_files_load_with_outputs_and_probabilities_equal_to_torchxrayvision(reference, files,
                                                                            kind):
    with torch.no_grad():
        want_logits, want = xrv_logits(reference, X), reference(X)
    p, t = torch.sigmoid(want_logits[:, :14]), reference.op_threshs[:14]
    assert (p < t).any() and (p > t).any() and ((want > 0.05) & (want < 0.95)).sum() > 10
    for model in (create_model("densenet121", weights=files[kind]), load(files[kind])):
        model.eval()
        assert model.config.in_channels == 1 and model.num_classes == 18
        with torch.no_grad():
            logits = model(X)
            assert rel(logits, want_logits) < 1e-5
            assert (probabilities(model, logits) - want).abs().max() < 1e-6
        meta = model.weights_meta
        assert meta["class_names"] == [p or f"(untrained {i})" for i, p in
                                       enumerate(xrv.models.model_urls["nih"]["labels"])]
        assert meta["untrained"] == [14, 15, 16, 17] and meta["multi_label"] is True
        assert torch.equal(torch.tensor(meta["op_threshs"][:14]), reference.op_threshs[:14])
        assert meta["op_threshs"][14:] == [None] * 4
        assert meta["weights_set"] == "densenet121-res224-nih"  # known by its thresholds
        assert meta["preprocessing"] == {"resize": 224, "crop": 224, "mean": [0.5],
                                         "std": [1 / 2048], "interpolation": "bilinear"}


def test_float64_parity(reference, files):
    model = load(files["legacy"]).double().eval()
    ref64 = xrv.models.DenseNet(weights=None).double().eval()
    ref64.load_state_dict({k: v for k, v in reference.state_dict().items()
                           if k != "op_threshs"})
    x = X.double()
    with torch.no_grad():
        assert rel(model(x), xrv_logits(ref64, x)) < 1e-12
        # without operating points TorchXRayVision's apply_sigmoid output is the sigmoid
        ref64.apply_sigmoid = True
        model.weights_meta.pop("op_threshs")
        assert (probabilities(model, model(x)) - ref64(x)).abs().max() < 1e-12


def test_whole_module_is_read_into_weights_and_attributes(reference, files):
    labels = list(xrv.models.model_urls["nih"]["labels"])
    reference.pathologies = labels  # as TorchXRayVision sets it when it loads a weight set
    held = Path(files["whole"]).with_name("labelled.pt")
    torch.save(reference, held, _use_new_zipfile_serialization=False)
    del reference.pathologies
    read = read_module(held)
    assert read.class_name == "torchxrayvision.models.DenseNet"
    sd = reference.state_dict()
    assert read.state_dict.keys() == sd.keys()
    for k in sd:  # op_threshs holds NaN: equal_nan
        torch.testing.assert_close(read.state_dict[k], sd[k], rtol=0, atol=0, equal_nan=True)
    assert read.attributes["pathologies"] == labels and read.attributes["apply_sigmoid"] is False
    # a file under its published name is that set, whatever thresholds it carries
    published = held.with_name(ours.XRV_WEIGHTS["densenet121-res224-chex"].filename)
    m = xrv.models.DenseNet(weights=None)  # no thresholds, as the published files hold
    torch.save(m, published, _use_new_zipfile_serialization=False)
    meta = load(published).weights_meta
    assert meta["weights_set"] == "densenet121-res224-chex"
    assert meta["class_names"][2] == "(untrained 2)" and meta["op_threshs"][0] == 0.1988969


def test_op_norm_equals_torchxrayvision():
    op = torch.tensor(xrv.models.model_urls["chex"]["op_threshs"], dtype=torch.float32)
    p = torch.rand(64, 18, generator=torch.Generator().manual_seed(2))
    p[0] = op.nan_to_num(0.3)  # exactly at the thresholds: the upper branch, as in xrv
    p[1], p[2] = 0.0, 1.0
    assert torch.equal(ours.op_norm(p, ours._thresholds(op)), xrv.models.op_norm(p, op))


@pytest.mark.parametrize("maxval", [255, 65535])
def test_recorded_preprocessing_is_torchxrayvisions_normalisation(maxval):
    img = np.random.default_rng(3).integers(0, maxval + 1, (8, 8)).astype(np.float32)
    img[0, 0], img[0, 1] = 0, maxval
    pre = ours.PREPROCESSING
    ours_x = (torch.from_numpy(img) / maxval - pre["mean"][0]) / pre["std"][0]
    want = torch.from_numpy(xrv.utils.normalize(img, maxval))
    assert (ours_x - want).abs().max() < 1e-3  # float32 on values up to 1024
    assert ours_x.min() == -1024 and ours_x.max() == 1024


def test_registry_matches_torchxrayvision():
    urls = xrv.models.model_urls
    assert set(ours.XRV_WEIGHTS) == {k for k in urls if k.startswith("densenet121-")}
    for name, entry in ours.XRV_WEIGHTS.items():
        assert entry.url == urls[name]["weights_url"]
        assert entry.pathologies == urls[name]["labels"]
        assert len(entry.op_threshs) == 18
        for a, b in zip(entry.op_threshs, urls[name]["op_threshs"], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == b
        assert urls[name]["input_resolution"] == ours.PREPROCESSING["crop"]
    assert list(ours.PATHOLOGIES) == list(xrv.datasets.default_pathologies)


# ---------------------------------------------------------------- code in a pickle is refused

class Shell:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Builds:
    """Unpickling this calls TorchXRayVision's DenseNet constructor."""

    def __reduce__(self):
        return (xrv.models.DenseNet, ())


@pytest.mark.parametrize("zipped", [True, False])
def test_a_module_carrying_code_is_refused_by_name(tmp_path, zipped):
    marker = tmp_path / "pwned"
    m = xrv.models.DenseNet(weights=None, block_config=(1, 1), num_init_features=4)
    m.note = Shell(f"touch {marker}")
    evil = tmp_path / "evil.pt"
    torch.save(m, evil, _use_new_zipfile_serialization=zipped)
    system = f"{os.system.__module__}.system"  # posix.system: how pickle names os.system
    for attempt in (lambda: load(evil), lambda: create_model("densenet121", weights=evil)):
        with pytest.raises(ValueError, match=rf"^refused to load .*evil.pt: it names {system},"):
            attempt()
    code, out, err = run_cli(["predict", str(evil), str(evil)])
    assert code == 2 and err.count("\n") == 1 and system in err and "Traceback" not in err
    assert not marker.exists()
    # a module class called like a function (a constructor would run) is refused too
    m.note = Builds()
    torch.save(m, evil, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=r"it calls torchxrayvision.models.DenseNet\(...\)"):
        load(evil)
    # the payload is real: plain unpickling runs it
    pickle.loads(pickle.dumps(Shell(f"touch {marker}")))
    assert marker.exists()


class OldBackend:
    """What torch < 1.5 pickled as every module's ``_backend``."""

    def __reduce__(self):
        from torch.nn.backends import thnn

        return (thnn._get_thnn_function_backend, ())


def test_modules_saved_by_old_torch_load(tmp_path, reference):
    m = xrv.models.DenseNet(weights=None, block_config=(1, 1), num_init_features=4).eval()
    for mod in m.modules():
        mod._backend = OldBackend()
    path = tmp_path / "old.pt"
    torch.save(m, path, _use_new_zipfile_serialization=False)
    model = load(path).eval()
    with torch.no_grad():
        assert rel(model(X), xrv_logits(m, X)) < 1e-5


def test_truncated_file_is_a_one_line_error(files, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(files["legacy"].read_bytes()[:-1000])
    with pytest.raises(ValueError, match="cut.pt is not a readable PyTorch checkpoint"):
        load(cut)


# ---------------------------------------------------------------- weight sets by name

@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(d))
    return d / "checkpoints"


def test_a_weight_set_by_name_downloads_once_into_the_hub_cache(files, hub, monkeypatch,
                                                                reference):
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        Path(dst).write_bytes(files["legacy"].read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = create_model("densenet121", weights="xrv:densenet121-res224-nih").eval()
    assert fetched == [(xrv.models.model_urls["nih"]["weights_url"], None)]
    cached = hub / NIH.filename
    digest = cached.with_name(cached.name + ".sha256").read_text().strip()
    meta = model.weights_meta
    assert meta["source"] == NIH.url and meta["sha256"] == digest
    assert meta["weights_set"] == NIH.name and model.pretrained_cfg["std"] == (1 / 2048,)
    with torch.no_grad():
        assert (probabilities(model, model(X)) - reference(X)).abs().max() < 1e-6
    # from the cache the second time, by its short name too, and through load()
    again = load("xrv:nih").eval()
    assert len(fetched) == 1
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    # a cached file that changed since it was first cached is refused
    cached.write_bytes(files["whole"].read_bytes())
    with pytest.raises(ValueError, match="changed since. Delete both files"):
        create_model("densenet121", weights="xrv:densenet121-res224-nih")


def test_a_set_with_a_known_digest_is_checked_against_it(files, hub):
    entry = ours.XRV_WEIGHTS["densenet121-res224-all"]
    assert entry.sha256 and entry.url == xrv.models.model_urls["all"]["weights_url"]
    hub.mkdir(parents=True)
    (hub / entry.filename).write_bytes(files["legacy"].read_bytes())  # not the published file
    with pytest.raises(ValueError, match="corrupt or not the published file"):
        create_model("densenet121", weights="xrv:densenet121-res224-all")


def test_bad_names_say_what_exists(tmp_path, capsys):
    with pytest.raises(ValueError, match="xrv:densenet121-res224-all, xrv:densenet121-res224-nih"):
        create_model("densenet121", weights="xrv:densenet121-res999")
    with pytest.raises(ValueError, match="weight sets are DenseNet-121s"):
        create_model("densenet169", weights="xrv:all")
    code, _, err = run_cli(["predict", "densenet121", "--weights", "xrv:nope",
                            str(tmp_path / "a.png")])
    assert code == 2 and err.count("\n") == 1 and "no TorchXRayVision DenseNet weights" in err


# ---------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    """A 224 x 224 8-bit grayscale image (the native size: no resizing)."""
    a = np.random.default_rng(4).integers(0, 256, (224, 224), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "chest.png"
    Image.fromarray(a, mode="L").save(path)
    return path, a


def test_predict_gives_torchxrayvisions_probabilities_with_pathology_names(reference, files,
                                                                           xray):
    path, pixels = xray
    x = torch.from_numpy(xrv.utils.normalize(pixels, 255))[None, None]
    with torch.no_grad():
        want = reference(x)[0]
    for argv in (["predict", str(files["whole"])],
                 ["predict", "densenet121", "--weights", str(files["state_dict"])]):
        code, out, err = run_cli([*argv, str(path), "--topk", "18", "--json"])
        assert code == 0, err
        report = json.loads(out)
        assert report["probabilities"] == "sigmoid per output, operating points at 0.5"
        top = report["predictions"][0]["topk"]
        assert [t["index"] for t in top if t["index"] >= 14] == []  # untrained: not ranked
        assert len(top) == 14
        for t in top:
            assert t["label"] == xrv.models.model_urls["nih"]["labels"][t["index"]]
            assert abs(t["probability"] - float(want[t["index"]])) < 1e-5
    code, out, _ = run_cli(["predict", str(files["whole"]), str(path), "--topk", "3"])
    best = int(want[:14].argmax())
    assert code == 0 and f"{float(want[best]) * 100:6.2f}%  {ours.PATHOLOGIES[best]} ({best})" \
        in out


def test_predict_names_bad_inputs_in_one_line(files, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli(["predict", str(tmp_path / "junk.pt"), "x.png"])
    assert code == 2 and err.count("\n") == 1 and "junk.pt is not a PyTorch checkpoint" in err
    code, out, err = run_cli(["predict", str(files["whole"]), str(tmp_path / "absent.png")])
    assert code == 1 and "skipped" in err and "absent.png: no such file" in err


def test_fine_tuning_drops_what_described_the_old_classifier(files):
    with pytest.warns(UserWarning, match="classifier not loaded"):
        model = create_model("densenet121", weights=files["whole"], num_classes=3)
    meta = model.weights_meta
    assert meta["class_names"] is None and meta["preprocessing"] == ours.PREPROCESSING
    assert not {"multi_label", "op_threshs", "untrained"} & set(meta)
    assert probabilities(model, torch.zeros(1, 3)).sum() == pytest.approx(1.0)  # a softmax
