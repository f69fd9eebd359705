"""Diagrams drawn from the model: every connection drawn once (L(L+1)/2 per block), channel
counts and spatial sizes that match a real forward pass, and the `diagram` verb."""

from __future__ import annotations

import json
import re

import pytest
import torch

from densenets import DenseNet, create_model
from densenets.analysis.diagram import diagram, network_stages
from densenets.cli import main


def drawn_ids(svg: str, kind: str, block: int) -> list[tuple[int, ...]]:
    """(source, target) of every arc of a kind that the SVG really contains."""
    found = re.findall(rf'id="{kind}-{block}-([0-9-]+)"', svg)
    return [tuple(int(v) for v in f.split("-")) for f in found]


@pytest.mark.parametrize("cfg, block", [
    (dict(growth_rate=32, block_config=(6, 12, 24, 16)), 3),  # DenseNet-121's third block
    (dict(growth_rate=12, block_config=(6, 6, 6), num_init_features=24, stem="cifar"), 1),
    (dict(growth_rate=4, block_config=(1,), num_init_features=8, stem="cifar"), 1),
    (dict(growth_rate=5, block_config=(3, 9), num_init_features=7, bottleneck=False,
          compression=0.7, stem="cifar"), 2),
])
def test_every_connection_drawn_once(tmp_path, cfg, block):
    with torch.device("meta"):
        model = DenseNet(num_classes=10, **cfg)
    info = diagram(model, tmp_path / "d.svg", block=block)
    svg = (tmp_path / "d.svg").read_text()
    L = cfg["block_config"][block - 1]
    arcs = drawn_ids(svg, "connection", block)
    assert len(arcs) == L * (L + 1) // 2 == info["connections"]
    assert sorted(arcs) == [(s, t) for s in range(L) for t in range(s + 1, L + 1)]
    exits = drawn_ids(svg, "exit", block)
    assert sorted(exits) == [(s,) for s in range(L + 1)] and info["exit_connections"] == L + 1
    assert info["num_layers"] == L


@pytest.mark.parametrize("stem, size", [("imagenet", 65), ("cifar", 13)])
def test_stage_channels_and_sizes_match_a_forward_pass(stem, size):
    model = DenseNet(growth_rate=4, block_config=(2, 3, 2), num_init_features=8, num_classes=5,
                     stem=stem, in_channels=2).eval()
    seen = {}
    for name, m in model.features.named_children():
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.shape))
    with torch.no_grad():
        logits = model(torch.randn(1, 2, size, size))
    stages = {s.name: s for s in network_stages(model, (2, size, size))}
    stem_out = seen["pool0" if stem == "imagenet" else "conv0"]
    assert (stages["stem"].channels, *stages["stem"].size) == tuple(stem_out[1:])
    for name, shape in seen.items():
        if name.startswith(("denseblock", "transition")):
            assert (stages[name].channels, *stages[name].size) == tuple(shape[1:]), name
    assert stages["head"].channels == logits.shape[1]
    assert stages["denseblock2"].connections == 6
    assert list(stages) == ["input", "stem", "denseblock1", "transition1", "denseblock2",
                            "transition2", "denseblock3", "head"]


def test_png_and_bad_requests(tmp_path):
    model = create_model("densenet-bc-40-k12")
    diagram(model, tmp_path / "d.png", block=2)
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="between 1 and 3"):
        diagram(model, tmp_path / "d.png", block=4)
    with pytest.raises(ValueError, match=".svg or .png"):
        diagram(model, tmp_path / "d.pdf")


def test_diagram_verb(tmp_path, capsys):
    assert main(["diagram", "densenet-bc", "--depth", "22", "-o", str(tmp_path / "a.svg"),
                 "--block", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 3 and info["connections"] == 6

    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3,
                     stem="cifar", in_channels=1)
    ckpt = {"format": "densenets.checkpoint", "version": 1, "model": model.state_dict(),
            "model_config": model.config.to_dict(), "model_name": "tiny",
            "meta": {"preprocessing": {"resize": None, "crop": 8, "mean": [0.5], "std": [0.5],
                                       "interpolation": "bilinear"}}}
    torch.save(ckpt, tmp_path / "best.pt")
    assert main(["diagram", str(tmp_path / "best.pt"), "-o", str(tmp_path / "b.png"),
                 "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert stages[0]["size"] == [8, 8] and stages[-2]["size"] == [4, 4]  # the checkpoint's crop

    assert main(["diagram", "densenet121", "--block", "5", "-o", str(tmp_path / "c.svg")]) == 2
    assert "between 1 and 4" in capsys.readouterr().err
