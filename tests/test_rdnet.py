"""RDNet ("DenseNets Reloaded", ECCV 2024) against timm's implementation.

Random weights throughout: timm's state dicts (and the authors' layout of them) load into ours
with equal outputs. Forwards use small inputs (64x64) or reduced configurations built by the
same code, so the whole file stays cheap on a 2-core CPU.
"""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from support import PUBLISHED_PARAMS, write_hub_cache
from timm.models.rdnet import RDNet as TimmRDNet

import densenets
from densenets import KeyMismatchError, RDNet, RDNetFeatures, create_model
from densenets.cli import main
from densenets.models.rdnet import RDNET
from densenets.weights.files import load_into, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread_module")

TIMM_PARAMS = {name: n for name, n in PUBLISHED_PARAMS.items() if name.startswith("rdnet")}
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# A reduced RDNet: three mixing blocks (plain, SE + patch merging, SE without downsampling).
SMALL = dict(num_init_features=16, growth_rates=(8, 16, 16), downsample=(False, True, False),
             effective_se=(False, True, True))
SMALL_TIMM = dict(num_init_features=16, growth_rates=(8, 16, 16), num_blocks_list=(3, 3, 3),
                  is_downsample_block=(None, True, False),
                  block_type=("Block", "BlockESE", "BlockESE"))


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initial value (layer scale 1e-6 would hide the mixers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if p.dim() == 1 and p.shape[0] > 1 and p.abs().max() < 1e-3:
                p.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def tiny_pair():
    """timm's rdnet_tiny with random weights, ours loaded from it, and timm's outputs on X."""
    torch.manual_seed(0)
    ref = perturb(timm.create_model("rdnet_tiny")).eval()
    ours = create_model("rdnet_tiny").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        final, maps = ref.forward_intermediates(X)
        want = {"final": final, "maps": maps, "logits": ref.forward_head(final)}
    return ref, ours, want


def test_every_size_has_timms_parameters_and_key_layout():
    for name, count in TIMM_PARAMS.items():
        with torch.device("meta"):
            ours, ref = create_model(name), timm.create_model(name)
        assert sum(p.numel() for p in ours.parameters()) == count, name
        mine, theirs = ours.state_dict(), ref.state_dict()
        assert list(mine) == list(theirs), name
        assert all(mine[k].shape == theirs[k].shape for k in mine), name
        assert ours.feature_info == [{k: f[k] for k in ("num_chs", "reduction", "module")}
                                     | {"growth_rate": f["growth_rate"]}
                                     for f in ref.feature_info], name


def test_timm_weights_give_timms_outputs(tiny_pair):
    ref, ours, want = tiny_pair
    with torch.no_grad():
        assert torch.equal(ours(X), want["logits"])
        final, maps = ours.forward_intermediates(X)
        assert torch.equal(final, want["final"]) and len(maps) == 4
        assert all(torch.equal(a, b) for a, b in zip(maps, want["maps"], strict=True))
        assert torch.equal(ours.forward_head(final, pre_logits=True),
                           ref.forward_head(final, pre_logits=True))
        last2 = ours.forward_intermediates(X, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last2] == [744, 1040]
        early, first = ours.forward_intermediates(X, indices=[0], stop_early=True)
        assert torch.equal(first[0], want["maps"][0]) and torch.equal(early, first[0])


def test_features_only_matches_timms_feature_info_and_maps(tiny_pair):
    ref, _, want = tiny_pair
    feats = create_model("rdnet_tiny", features_only=True, out_indices=(1, -1))
    feats.load_state_dict({k: v for k, v in ref.state_dict().items()
                           if not k.startswith("head.")})
    timm_feats = timm.create_model("rdnet_tiny", features_only=True, out_indices=(1, 3))
    assert feats.feature_info.channels() == timm_feats.feature_info.channels() == [440, 1040]
    assert feats.feature_info.reduction() == timm_feats.feature_info.reduction() == [8, 32]
    assert len(feats.dense_stages) == 7
    with torch.no_grad():
        maps = feats.eval()(X)
    assert all(torch.equal(a, b) for a, b in zip(maps, [want["maps"][1], want["maps"][3]],
                                                  strict=True))
    # timm's out_indices rules, on a reduced RDNet (taps after mixing blocks 0 and 2)
    small = RDNet(**SMALL)
    assert RDNetFeatures(small, 1).feature_info.channels() == [small.num_features]
    shallow = RDNetFeatures(small, (0,))
    assert len(shallow.dense_stages) == 1  # blocks after the last tap are not kept
    with pytest.raises(ValueError, match="out_indices.*0..1"):
        RDNetFeatures(small, (2,))


def test_authors_original_checkpoint_loads(tmp_path, tiny_pair):
    ref, _, want = tiny_pair
    original = {("stem.stem." + k[len("stem."):] if k.startswith("stem.") else k): v
                for k, v in ref.state_dict().items()}
    assert "stem.stem.0.weight" in original
    torch.save({"model": original, "epoch": 300}, tmp_path / "rdnet_tiny.pth")
    model = create_model("rdnet_tiny", weights=tmp_path / "rdnet_tiny.pth").eval()
    with torch.no_grad():
        assert torch.equal(model(X), want["logits"])
    with warnings.catch_warnings(record=True) as caught:  # the size read off the tensors
        warnings.simplefilter("always")
        tuned = densenets.load(tmp_path / "rdnet_tiny.pth", num_classes=7).eval()
    assert isinstance(tuned, RDNet) and tuned.pretrained_cfg["architecture"] == "rdnet_tiny"
    assert tuned.num_classes == 7 and "classifier not loaded" in str(caught[0].message)
    with torch.no_grad():
        assert torch.equal(tuned.forward_features(X), want["final"])
    with pytest.raises(KeyMismatchError, match="stem.0.weight.*looks like rdnet_tiny"):
        load_into(RDNet(**SMALL), read_checkpoint(tmp_path / "rdnet_tiny.pth").state_dict)
    with pytest.raises(KeyMismatchError, match="hold RDNet weights"):
        create_model("densenet121", weights=tmp_path / "rdnet_tiny.pth")


def test_saved_rdnet_round_trips_through_our_files_and_timm(tmp_path, tiny_pair):
    _, ours, want = tiny_pair
    densenets.save(ours, tmp_path / "w.safetensors")
    back = densenets.load(tmp_path / "w.safetensors").eval()
    assert back.pretrained_cfg["architecture"] == "rdnet_tiny"
    folder = densenets.save(ours, tmp_path / "hub")
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "rdnet_tiny" and cfg["pretrained_cfg"]["crop_pct"] == 0.9
    with torch.no_grad():
        assert torch.equal(back(X), want["logits"]) and torch.equal(theirs(X), want["logits"])


def test_reduced_config_matches_timm_in_training_with_checkpointing():
    torch.manual_seed(1)
    ref = perturb(TimmRDNet(num_classes=5, **SMALL_TIMM))
    ours = RDNet(num_classes=5, **SMALL)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    a, b = ours(x), ref(x)
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reduced_config_scripts_and_traces_with_equal_outputs():
    torch.manual_seed(2)
    model = perturb(RDNet(num_classes=5, **SMALL)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        want = model(x)
        assert torch.equal(torch.jit.script(model)(x), want)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), want)
        feats = RDNetFeatures(model)
        maps = feats(x)
        for compiled in (torch.jit.script(feats), torch.fx.symbolic_trace(feats)):
            assert all(torch.equal(a, b) for a, b in zip(compiled(x), maps, strict=True))


def test_head_contract_matches_timm():
    torch.manual_seed(3)
    ref = perturb(TimmRDNet(num_classes=5, **SMALL_TIMM)).eval()
    ours = RDNet(num_classes=5, **SMALL).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert ours.get_classifier().out_features == 5 and ours.num_classes == 5
    assert ours.num_features == ours.head_hidden_size == ref.num_features
    for args in ((0,), (0, "")):
        ours.reset_classifier(*args)
        ref.reset_classifier(*args)
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x)), args
    assert ours(x).shape == (1, ours.num_features, 4, 4) and ours.num_classes == 0
    ours.reset_classifier(3, "avg")
    assert ours(x).shape == (1, 3)
    assert ours.group_matcher() == ref.group_matcher()
    taps = ours.prune_intermediate_layers([0])
    assert taps == [0] and len(ours.dense_stages) == 1 and ours.num_classes == 0
    assert ours(x).shape == (1, ours.feature_info[0]["num_chs"], 8, 8)


def test_pretrained_cfg_is_timms(tiny_pair):
    _, ours, _ = tiny_pair
    pc = ours.pretrained_cfg
    assert pc["hf_hub_id"] == "naver-ai/rdnet_tiny.nv_in1k" and ours.default_cfg is pc
    data = timm.data.resolve_data_config({}, model=ours)
    assert data["interpolation"] == "bicubic" and data["crop_pct"] == 0.9
    gray = create_model("rdnet_tiny", in_chans=1, num_classes=0, head_drop_rate=0.3)
    assert gray.pretrained_cfg["input_size"] == (1, 224, 224) and gray.config.in_channels == 1
    assert gray.head.drop.p == gray.config.drop_rate == 0.3  # timm's drop_rate, either name


def test_bad_input_says_what_to_do():
    model = RDNet(**SMALL)
    with pytest.raises(ValueError, match="minimum is 8x8"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="one entry per mixing block"):
        RDNet(growth_rates=(8, 8), downsample=(False,), effective_se=(False, False))
    with pytest.raises(ValueError, match="no option memory_efficient; its options are"):
        create_model("rdnet_tiny", memory_efficient=True)
    with pytest.raises(ValueError, match="rdnet_tiny, rdnet_small"):
        densenets.models.rdnet.rdnet_config("rdnet_huge")


def test_cli_models_summary_and_paper_show_rdnet(capsys, monkeypatch):
    from densenets.analysis.summary import rdnet_table
    from densenets.cli import inspect_cmds

    assert main(["summary", "rdnet_tiny", "--input-size", "3", "64", "64", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["total_params"] == TIMM_PARAMS["rdnet_tiny"]
    mixers = [r for r in s["rows"] if r["kind"].startswith("feature mixer")]
    assert len(mixers) == 21 and mixers[0]["output_shape"] == [1, 128, 16, 16]
    assert sum(r["params"] for r in s["rows"] if r["depth"] == 0) == s["total_params"]
    assert main(["summary", "rdnet_tiny", "--input-size", "3", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "minimum is 32x32" in err and "Traceback" not in err
    # The DenseNet rows of `models` and `paper` are other tests' business (and cost time).
    assert set(RDNET) <= set(densenets.list_models())
    monkeypatch.setattr(inspect_cmds, "list_models", lambda: list(RDNET))
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: rows[n]["params"] for n in RDNET} == TIMM_PARAMS
    assert [round(rows[n]["macs"] / 1e9, 1) for n in RDNET] == [5.0, 8.7, 15.4, 34.7]
    monkeypatch.setattr(inspect_cmds, "paper_tables", lambda: {
        "table1": [], "table2": [], **rdnet_table(), "macs_convention": ""})
    assert main(["paper"]) == 0
    out = capsys.readouterr().out
    assert "RDNet" in out and "82.8" in out and "84.8" in out and "85.8%" in out
    assert "NO" not in out and out.count("yes") == 4


def test_diagram_draws_mixing_blocks_and_transitions(tmp_path):
    from densenets.analysis.diagram import diagram

    info = diagram(RDNet(**SMALL), tmp_path / "rdnet.svg", block=2, input_size=(3, 32, 32))
    kinds = [s["kind"] for s in info["stages"]]
    assert kinds == ["input", "stem", "block", "transition", "block", "transition", "block",
                     "head"]
    assert info["stages"][3]["lines"][2] == "merge 2×2/2" and info["stages"][3]["size"] == (4, 4)
    assert info["stages"][5]["lines"][2] == "conv 1×1"
    assert (info["num_layers"], info["connections"], info["exit_connections"]) == (3, 6, 4)
    assert (tmp_path / "rdnet.svg").stat().st_size > 1000


def test_rdnet_imagenet_weights_come_from_the_authors_hub_repository(tmp_path, monkeypatch,
                                                                     tiny_pair):
    """The authors' repositories publish only pytorch_model.bin, in their own layout."""
    from huggingface_hub import constants

    ref, _, want = tiny_pair
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sd = {("stem.stem." + k[5:] if k.startswith("stem.") else k): v
          for k, v in ref.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "pytorch_model.bin")
    write_hub_cache(tmp_path / "hub", "naver-ai/rdnet_tiny.nv_in1k",
                    {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    model = create_model("rdnet_tiny", weights="imagenet").eval()
    with torch.no_grad():
        assert torch.equal(model(X), want["logits"])
    assert model.weights_meta["source"] == "hf-hub:naver-ai/rdnet_tiny.nv_in1k"
    assert model.weights_meta["preprocessing"]["interpolation"] == "bicubic"
    # a pickle holding anything but tensors is refused, not unpickled
    torch.save({"model": sd, "why": tmp_path}, tmp_path / "evil.bin")
    write_hub_cache(tmp_path / "hub", "naver-ai/rdnet_small.nv_in1k",
                    {"pytorch_model.bin": tmp_path / "evil.bin"})
    with pytest.raises(ValueError, match="refused to load"):
        create_model("rdnet_small", weights="hf-hub:naver-ai/rdnet_small.nv_in1k")
