"""The feature-reuse matrix (the paper's Figure 5): a known answer on hand-set weights, the
channel layout it assumes, torchvision weights, exports, the heatmap and the `reuse` verb."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torchvision

from densenets import DenseNet
from densenets.analysis.reuse import (
    cell_values,
    feature_reuse,
    plot,
    to_json,
    write_csv,
    write_json,
)
from densenets.cli import main


def tiny(**kw) -> DenseNet:
    cfg = dict(growth_rate=3, block_config=(3, 2), num_init_features=5, bottleneck=False,
               compression=0.5, num_classes=4, stem="cifar")
    cfg.update(kw)
    return DenseNet(**cfg)


def set_by_hand(w: torch.Tensor) -> None:
    """w[o, c, ...] = +-(c + 1) * (o + 1), signs alternating so only |w| can give the answer."""
    o = torch.arange(w.shape[0], dtype=torch.float64).view(-1, *([1] * (w.dim() - 1))) + 1
    c = torch.arange(w.shape[1], dtype=torch.float64).view(1, -1, *([1] * (w.dim() - 2))) + 1
    sign = torch.ones_like(w, dtype=torch.float64)
    sign.view(-1)[1::2] = -1
    with torch.no_grad():
        w.copy_(sign * c * o)


def expected_mean(first: int, last: int, out_channels: int) -> float:
    """Mean of (c + 1)(o + 1) over channels first..last and every output o: a closed form."""
    return ((first + last) / 2 + 1) * (out_channels + 1) / 2


@pytest.mark.parametrize("bottleneck", [False, True])
def test_known_answer_on_hand_set_weights(bottleneck):
    model = tiny(bottleneck=bottleneck)
    for name, p in model.named_parameters():
        if name.endswith("conv1.weight") or name.endswith("transition1.conv.weight") \
                or name == "classifier.weight":
            set_by_hand(p)
    blocks = feature_reuse(model)
    assert [b.exit for b in blocks] == ["transition", "classifier"]
    k = 3
    c0s = [5, (5 + 3 * k) // 2]  # block 2 reads the transition's floor(0.5 * 14) = 7 maps
    for b, c0, n_layers in zip(blocks, c0s, (3, 2), strict=True):
        assert (b.num_layers, b.in_channels, b.growth_rate) == (n_layers, c0, k)
        exit_w = model.features.transition1.conv.weight if b.block == 1 \
            else model.classifier.weight
        outs = [getattr(model.features, f"denseblock{b.block}").layers[t].conv1.weight.shape[0]
                for t in range(n_layers)] + [exit_w.shape[0]]
        for t in range(1, n_layers + 2):  # targets: layers 1..L, then the exit
            for s in range(n_layers + 1):
                got = b.matrix[t - 1][s]
                if s >= t:
                    assert math.isnan(got), (t, s)
                    continue
                first, last = (0, c0 - 1) if s == 0 else (c0 + (s - 1) * k, c0 + s * k - 1)
                assert got == pytest.approx(expected_mean(first, last, outs[t - 1]), rel=1e-12)


def test_source_slices_are_what_each_layer_produced():
    """The matrix assumes layer l's input is [x0, x1, ..., x_{l-1}] in that channel order."""
    torch.manual_seed(0)
    model = tiny().eval()
    block = model.features.denseblock1
    inputs, outputs = {}, {}

    def record(i: int):
        def hook(_m, inp, out) -> None:
            inputs[i], outputs[i] = inp[0], out
        return hook

    for i, layer in enumerate(block.layers, start=1):
        layer.register_forward_hook(record(i))
    x0 = {}
    block.register_forward_pre_hook(lambda m, inp: x0.__setitem__(0, inp[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    info = feature_reuse(model)[0]
    last_in = inputs[block.num_layers]
    for s in range(block.num_layers):
        r = info.source_channels(s)
        produced = x0[0] if s == 0 else outputs[s]
        assert torch.equal(last_in[:, r.start:r.stop], produced)


def test_torchvision_weights_give_the_same_matrix():
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8,
                                     num_classes=6)
    ours = DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=6)
    ours.load_state_dict(tv.state_dict())
    a, b = feature_reuse(tv.state_dict()), feature_reuse(ours)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]


def test_not_a_densenet_is_refused():
    with pytest.raises(ValueError, match="denselayer1"):
        feature_reuse(torch.nn.Linear(3, 4))


def test_scaled_per_target():
    rows = cell_values(feature_reuse(tiny())[0], "target")
    for row in rows:
        assert max(v for v in row if not math.isnan(v)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scale"):
        cell_values(feature_reuse(tiny())[0], "rows")


def reference_z(w: torch.Tensor, channels: range) -> float:
    """Plain float64 reference: a slice's mean |w| against a random slice of as many channels."""
    per_channel = [float(w.detach()[:, c].abs().double().mean()) for c in range(w.shape[1])]
    C, n = len(per_channel), len(channels)
    mu = sum(per_channel) / C
    var = sum((v - mu) ** 2 for v in per_channel) / C
    m = sum(per_channel[c] for c in channels) / n
    return (m - mu) / math.sqrt(var / n * (C - n) / (C - 1))


def test_zscores_against_a_reference_and_chance():
    torch.manual_seed(0)
    model = tiny(growth_rate=6, block_config=(5, 4), num_init_features=10)
    blocks = feature_reuse(model)
    b = blocks[0]
    w = model.features.denseblock1.layers[3].conv1.weight  # target 4 reads sources 0..3
    for s in range(4):
        assert b.zscore[3][s] == pytest.approx(reference_z(w, b.source_channels(s)), rel=1e-9)
    assert math.isnan(b.zscore[0][0])  # one source covering every channel: no comparison
    # Freshly initialised weights favour no source: about chance.
    chance = [x.structure for x in feature_reuse(DenseNet(growth_rate=12,
                                                          block_config=(8, 8, 8),
                                                          num_init_features=24, stem="cifar"))]
    assert all(0.3 < v < 2.5 for v in chance)
    # A layer that leans on the block input shows up far above chance.
    with torch.no_grad():
        for layer in model.features.denseblock1.layers:
            layer.conv1.weight[:, :10] *= 3
    assert feature_reuse(model)[0].structure > 4 * max(chance)


def test_json_and_csv_exports(tmp_path):
    blocks = feature_reuse(tiny())
    write_json(blocks, tmp_path / "r.json")
    write_csv(blocks, tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == "densenets.reuse"
    for b, jb in zip(blocks, data["blocks"], strict=True):
        assert jb["sources"][0] == "input" and jb["targets"][-1] == b.exit
        for row, jrow in zip(b.matrix, jb["matrix"], strict=True):
            assert [None if math.isnan(v) else v for v in row] == jrow
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for b in blocks:
        mine = [r for r in rows if int(r["block"]) == b.block]
        L = b.num_layers
        assert len(mine) == L * (L + 1) // 2 + (L + 1)  # dense connections + the exit's inputs
        for r in mine:
            t, s = b.targets.index(r["target"]), b.sources.index(r["source"])
            assert float(r["mean_abs_weight"]) == b.matrix[t][s]


def test_heatmap_has_one_panel_per_block(tmp_path):
    fig = plot(feature_reuse(tiny()), tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 5000
    assert sum(ax.get_visible() and bool(ax.images) for ax in fig.axes) == 2


def test_reuse_verb_on_checkpoint_state_dict_and_zoo(tmp_path, capsys):
    model = tiny()
    ckpt = {"format": "densenets.checkpoint", "version": 1, "model": model.state_dict(),
            "model_config": model.config.to_dict(), "model_name": "tiny", "meta": {}}
    torch.save(ckpt, tmp_path / "best.pt")
    assert main(["reuse", str(tmp_path / "best.pt"), "-o", str(tmp_path / "a.png"),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(to_json(feature_reuse(model))))
    assert all((tmp_path / f"a.{ext}").is_file() for ext in ("png", "json", "csv"))
    # A run directory stands for its best.pt.
    assert main(["reuse", str(tmp_path), "-o", str(tmp_path / "d" / "r.png")]) == 0
    assert json.loads((tmp_path / "d" / "r.json").read_text()) == printed

    sd = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DataParallel saves it
    torch.save(sd, tmp_path / "sd.pth")
    assert main(["reuse", str(tmp_path / "sd.pth"), "-o", str(tmp_path / "b.svg")]) == 0
    assert json.loads((tmp_path / "b.json").read_text()) == printed
    assert main(["reuse", "densenet-bc-40-k12", "-o", str(tmp_path / "c.png")]) == 0
    assert len(json.loads((tmp_path / "c.json").read_text())["blocks"]) == 3


def test_reuse_verb_errors_are_one_line(tmp_path, capsys):
    assert main(["reuse", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "r.png")]) == 2
    assert "no such weights file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["reuse", str(tmp_path / "junk.pt"), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "junk.pt is not a PyTorch checkpoint" in err and err.count("\n") == 1
    assert main(["reuse", "densenet121", "-o", str(tmp_path / "r.pdf")]) == 2


@pytest.mark.slow
def test_a_trained_digits_checkpoint_shows_structure(tmp_path, capsys):
    """Real data, the CLI end to end. Weight decay shapes which sources a layer keeps only when
    lr x weight decay x steps is large enough (here 0.1 x 1.2e-2 x 270 steps at the first rate:
    5 epochs, about the product of 20 epochs at 3e-3 in a quarter of the time; measured
    structure 5.1, classifier z -6.0);
    the recipe's 1e-4 over 460 steps leaves the initial weights' chance level (docs/visualize.md).
    The last block then favours some sources far beyond chance, and its classifier leans away
    from the block input towards the layers' own maps, as the paper's Figure 5 shows."""
    run = tmp_path / "run"
    assert main(["train", "--batch-size", "16", "--weight-decay", "1.2e-2", "--epochs", "5",
                 "--threads", "2", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["reuse", str(run), "-o", str(tmp_path / "reuse.png"), "--json"]) == 0
    last = json.loads(capsys.readouterr().out)["blocks"][-1]
    untrained = feature_reuse(DenseNet(growth_rate=12, block_config=(6, 6, 6), in_channels=1,
                                       num_init_features=24, num_classes=10, stem="cifar"))
    chance = max(b.structure for b in untrained)
    assert chance < 2.5
    assert last["structure"] > max(4.0, 2.5 * chance), (last["structure"], summary)
    classifier = last["zscore"][-1]
    assert classifier[0] < -3 and sum(classifier[1:]) / len(classifier[1:]) > 1, classifier
