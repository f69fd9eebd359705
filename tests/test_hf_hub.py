"""Weights from the Hugging Face Hub through huggingface_hub's cache, offline, and the folder
layout (model.safetensors + config.json) that the Hub and timm read back.

No test touches the network: each writes a Hub cache itself, laid out as huggingface_hub
keeps one (refs/main -> snapshots/<commit>/<file> -> blobs/<hash>), and runs offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants, hf_hub_download
from support import write_hub_cache

import densenets
from densenets import create_model
from densenets.cli import main

pytestmark = pytest.mark.usefixtures("one_thread_module")

REPO = "timm/densenet121.tv_in1k"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache, with huggingface_hub in offline mode (as HF_HUB_OFFLINE=1 sets)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def timm_densenet121(tmp_path_factory):
    """timm's densenet121 with random weights, saved by timm itself for the Hub."""
    torch.manual_seed(0)
    model = timm.create_model("densenet121").eval()
    with torch.no_grad():  # move BN statistics off their defaults so they are compared too
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    out = tmp_path_factory.mktemp("timm_export")
    timm.models.save_for_hf(model, str(out), safe_serialization=True)
    return model, out


def test_hf_hub_weights_load_from_the_cache_offline(offline_cache, timm_densenet121):
    ref, export = timm_densenet121
    write_hub_cache(offline_cache, REPO, {"model.safetensors": export / "model.safetensors",
                                          "config.json": export / "config.json"})
    # huggingface_hub itself resolves the cache we wrote (so the layout is the real one)
    assert Path(hf_hub_download(REPO, "config.json", local_files_only=True)).is_file()
    model = create_model("densenet121", weights=f"hf-hub:{REPO}").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    meta = model.weights_meta
    assert meta["source"] == f"hf-hub:{REPO}"
    # the preprocessing comes from the repository's config.json
    cfg = json.loads((export / "config.json").read_text())["pretrained_cfg"]
    assert meta["preprocessing"]["interpolation"] == cfg["interpolation"]
    assert meta["preprocessing"]["crop"] == cfg["input_size"][-1] == 224
    assert meta["preprocessing"]["resize"] == int(224 / cfg["crop_pct"])
    # and densenets.load reads the architecture off the same repository
    again = densenets.load(f"hf-hub:{REPO}").eval()
    with torch.no_grad():
        assert torch.equal(again(x), ref(x))


def test_hf_hub_missing_file_names_the_repository(offline_cache, tmp_path):
    (tmp_path / "README.md").write_text("no weights here\n")
    write_hub_cache(offline_cache, "someone/empty-repo", {"README.md": tmp_path / "README.md"})
    for repo in ("someone/empty-repo", "someone/never-downloaded"):
        with pytest.raises(ValueError, match=f"Hub repository {repo}.*HF_HUB_OFFLINE"):
            create_model("densenet121", weights=f"hf-hub:{repo}")
    with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
        create_model("densenet121", weights="hf-hub:densenet121")


def test_save_to_a_folder_writes_what_timm_reads_back(tmp_path):
    torch.manual_seed(2)
    model = create_model("densenet121").eval()
    out = densenets.save(model, tmp_path / "upload")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "densenet121" and cfg["num_classes"] == 1000
    assert cfg["num_features"] == 1024
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 224, 224] and pc["first_conv"] == "features.conv0"
    assert pc["classifier"] == "classifier" and len(pc["mean"]) == 3
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    data = timm.data.resolve_data_config({}, model=back)
    assert tuple(data["input_size"]) == (3, 224, 224)
    assert tuple(data["mean"]) == tuple(pc["mean"]) and data["crop_pct"] == pc["crop_pct"]
    assert isinstance(densenets.load(out), densenets.DenseNet)


def test_cli_predicts_with_hub_weights_offline(offline_cache, timm_densenet121, tmp_path,
                                               capsys):
    from PIL import Image

    _, export = timm_densenet121
    write_hub_cache(offline_cache, REPO, {"model.safetensors": export / "model.safetensors",
                                          "config.json": export / "config.json"})
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    args = ["predict", "densenet121", "--weights", f"hf-hub:{REPO}", str(tmp_path / "red.png"),
            "--topk", "2", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["predictions"][0]["topk"]) == 2
    args[3] = "hf-hub:someone/not-cached"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "someone/not-cached" in err and "Traceback" not in err and len(err.splitlines()) == 1
