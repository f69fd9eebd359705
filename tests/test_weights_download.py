"""Issue 3, item 1: published weights come through torch.hub's cache with hash checking.

Offline: a local HTTP server on 127.0.0.1 serves a file made here in the hosted format
(legacy keys, pre-1.6 serialisation); the registry entry is pointed at it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from support import free_port, vary_bn

from densenets import create_model
from densenets.cli import main
from densenets.weights.keymap import to_legacy_keys
from densenets.weights.pretrained import PRETRAINED, WeightsNotAvailableError, download_weights

pytestmark = pytest.mark.usefixtures("one_thread_module")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(d))
    return d / "checkpoints"


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A densenet121 checkpoint as torchvision hosts them, and its torchvision source."""
    tv = torchvision.models.densenet121(weights=None).eval()
    vary_bn(tv)
    raw = tmp_path_factory.mktemp("hosted") / "raw.pth"
    torch.save(to_legacy_keys(tv.state_dict()), raw, _use_new_zipfile_serialization=False)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    return tv, raw.read_bytes(), digest


def publish(monkeypatch, root: Path, base: str, data: bytes, sha256: str,
            name: str = "densenet121") -> str:
    filename = f"{name}-{sha256[:8]}.pth"
    (root / filename).write_bytes(data)
    monkeypatch.setitem(PRETRAINED, name, dataclasses.replace(PRETRAINED[name],
                                                               url=base + filename,
                                                               sha256=sha256[:8]))
    return filename


def test_imagenet_weights_download_once_and_carry_metadata(server, hub, hosted, monkeypatch):
    root, base = server
    tv, data, digest = hosted
    filename = publish(monkeypatch, root, base, data, digest)
    model = create_model("densenet121", weights="imagenet").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - tv(x)).abs().max() < 1e-5
    assert (hub / filename).read_bytes() == data
    meta = model.weights_meta
    assert len(meta["class_names"]) == 1000 and meta["class_names"][1] == "goldfish"
    assert meta["preprocessing"] == {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    assert meta["min_input_size"] == model.min_input_size == 29
    assert meta["source"] == base + filename
    # the second time comes from the cache: the server no longer has the file
    (root / filename).unlink()
    again = create_model("densenet121", weights="imagenet").eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_download_with_wrong_hash_is_rejected_and_not_cached(server, hub, monkeypatch):
    root, base = server
    data = b"not the published weights" * 100
    wrong = hashlib.sha256(b"something else").hexdigest()
    publish(monkeypatch, root, base, data, wrong)
    with pytest.raises(ValueError, match="failed its hash check"):
        download_weights("densenet121", progress=False)
    assert not hub.exists() or not any(hub.iterdir())


def test_tampered_cache_is_rejected(server, hub, monkeypatch):
    root, base = server
    data = b"published bytes" * 100
    filename = publish(monkeypatch, root, base, data, hashlib.sha256(data).hexdigest())
    assert download_weights("densenet121", progress=False) == hub / filename
    (hub / filename).write_bytes(b"replaced" * 100)
    with pytest.raises(ValueError, match="corrupt or not the published file. Delete it"):
        download_weights("densenet121", progress=False)


def test_offline_error_names_the_url_and_the_local_alternative(hub, monkeypatch, tmp_path,
                                                               capsys):
    url = f"http://127.0.0.1:{free_port()}/densenet121-a639ec97.pth"
    monkeypatch.setitem(PRETRAINED, "densenet121",
                        dataclasses.replace(PRETRAINED["densenet121"], url=url))
    with pytest.raises(WeightsNotAvailableError) as err:
        create_model("densenet121", weights="imagenet")
    assert url in str(err.value) and "weights=PATH" in str(err.value)
    # the CLI says the same in one line, exit status 2
    (tmp_path / "cat.png").write_bytes(b"")
    assert main(["predict", "densenet121", "--weights", "imagenet",
                 str(tmp_path / "cat.png")]) == 2
    err_text = capsys.readouterr().err
    last = err_text.strip().splitlines()[-1]
    assert last.startswith("densenets predict: error: could not download") and url in last
    assert "Traceback" not in err_text


def test_models_without_published_weights_say_which_have_them():
    with pytest.raises(ValueError, match="densenet121, densenet161, densenet169, densenet201"):
        create_model("densenet264", weights="imagenet")
    with pytest.raises(ValueError, match="no published ImageNet weights for 'densenet-bc-100"):
        create_model("densenet-bc-100-k12", weights="imagenet")


def test_registry_matches_torchvision():
    for name, entry in PRETRAINED.items():
        tv = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        assert entry.url == tv.url
        assert entry.filename.split("-")[1].startswith(entry.sha256)
        assert entry.num_params == tv.meta["num_params"]
        assert entry.top1 == tv.meta["_metrics"]["ImageNet-1K"]["acc@1"]
