"""summary(): rows, shapes, parameters, multiply-adds and connections."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from densenets import DenseNet, RDNet, create_model, load, save, summary
from densenets.analysis.summary import count_params


def test_k12_channels_grow_by_k_and_halve_at_transitions():
    """k=12, theta=0.5, blocks (6, 12, 24, 16), 64-channel ImageNet stem on 3x224x224."""
    model = DenseNet(growth_rate=12, block_config=(6, 12, 24, 16), num_init_features=64,
                     compression=0.5)
    s = summary(model, (3, 224, 224))
    channels, spatial = 64, 56
    kinds = [r.kind for r in s.rows]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert s.rows[3].output_shape == (1, 64, 56, 56)
    layer_rows = 0
    for row in s.rows[4:]:
        if row.kind.startswith("dense layer"):
            channels += 12
            layer_rows += 1
            assert row.output_shape == (1, channels, spatial, spatial)
        elif row.kind == "transition":
            channels //= 2
            spatial //= 2
            assert row.output_shape == (1, channels, spatial, spatial)
        elif row.kind.startswith("dense block"):
            n = int(row.kind.split("(")[1].split()[0])
            assert row.connections == n * (n + 1) // 2
            assert row.output_shape[1] == channels + 12 * n
    assert layer_rows == 6 + 12 + 24 + 16
    assert s.rows[-1].name == "classifier" and s.rows[-1].output_shape == (1, 1000)
    assert s.rows[-2].output_shape == (1, channels, 1, 1)


def test_totals_match_parameters_and_an_independent_flop_count():
    model = create_model("densenet121").eval()
    s = summary(model, (1, 3, 224, 224))
    assert s.total_params == count_params(model) == 7_978_856
    assert 2.83e9 <= s.total_macs <= 2.87e9
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert s.total_macs * 2 == counter.get_total_flops()


def test_rows_sum_to_totals_and_model_state_untouched():
    model = create_model("densenet-bc-40-k12").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = summary(model, (2, 3, 32, 32))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"summary changed {k}"
    top = [r for r in s.rows if r.depth == 0]
    assert sum(r.params for r in top) == s.total_params
    assert sum(r.macs for r in top) == s.total_macs
    for block in [r for r in s.rows if r.kind.startswith("dense block")]:
        i = s.rows.index(block)
        inner = [r for r in s.rows[i + 1:i + 7] if r.depth == 1]
        assert sum(r.params for r in inner) == block.params


def test_summary_output_renders_and_serialises():
    s = summary(create_model("densenet-bc-40-k12"), (3, 32, 32), name="densenet-bc-40-k12")
    text = str(s)
    assert "denselayer6" in text and "transition2" in text and "classifier" in text
    d = s.to_dict()
    assert d["total_params"] == s.total_params and len(d["rows"]) == len(s.rows)
    assert d["rows"][0]["output_shape"] == [1, 24, 32, 32]


SMALL_RDNET = dict(num_init_features=16, growth_rates=(8, 16), downsample=(False, True),
                   effective_se=(False, True), num_classes=5)


def shown_names(s) -> tuple[str, ...]:
    """The name each rendering of a summary gives: repr, text title, JSON, notebook caption."""
    caption = s._repr_html_().split("<caption>", 1)[1]
    return (repr(s).split("'")[1], str(s).split("\n", 1)[0].split()[0],
            json.loads(s.to_json())["model"], caption.split()[0])


def test_summary_names_the_zoo_entry_the_model_was_created_from(tmp_path):
    model = create_model("densenet-bc-16-k4")
    assert shown_names(summary(model, (3, 32, 32))) == ("densenet-bc-16-k4",) * 4
    rdnet = create_model("rdnet_tiny", **SMALL_RDNET)
    assert shown_names(summary(rdnet, (3, 32, 32))) == ("rdnet_tiny",) * 4
    # loaded weights carry their zoo name; a name passed in wins
    loaded = load(save(model, tmp_path / "w.safetensors"))
    assert shown_names(summary(loaded, (3, 32, 32)))[0] == "densenet-bc-16-k4"
    assert shown_names(summary(model, (3, 32, 32), name="mine")) == ("mine",) * 4
    # built from the class: no zoo entry, so the class
    assert shown_names(summary(DenseNet(growth_rate=4, block_config=(2, 2), stem="cifar"),
                               (3, 32, 32)))[0] == "DenseNet"
    assert shown_names(summary(RDNet(**SMALL_RDNET), (3, 32, 32)))[0] == "RDNet"


def test_summary_rejects_bad_input_sizes():
    model = create_model("densenet121")
    with pytest.raises(ValueError, match="minimum is 29x29"):
        summary(model, (3, 16, 16))
    with pytest.raises(ValueError, match="input_size"):
        summary(model, (224, 224))
