"""timm's model contract on our DenseNets, piece by piece.

timm's own model tests (its tests/test_models.py) run on our models in tests/test_timm_models.py.
Here each piece of the contract is checked against timm's densenet121 with the same weights:
intermediates, pooling heads, pruning, parameter groups, the data config timm resolves, and the
``features_only`` kinds timm's ``feature_cls`` names; then the contract's own rules (timm's
keywords of create_model, the index rule, input checks) on both families.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.optim import create_optimizer_v2  # noqa: E402

from densenets import DenseNet, create_model, save  # noqa: E402
from densenets.weights.keymap import remap_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# A reduced RDNet (three mixing blocks) for the tests of both families.
SMALL_RDNET = dict(num_init_features=16, growth_rates=(8, 16, 16), downsample=(False, True, False),
                   effective_se=(False, True, True), num_classes=5)


@pytest.mark.parametrize("kw", [dict(drop_rate=0.2, head_drop_rate=0.1, global_pool="catavgmax"),
                                dict(num_classes=0, global_pool=""),
                                dict(num_classes=0, global_pool="avgmax")])
def test_script_and_fx_equal_eager_without_bottleneck_and_with_other_heads(kw):
    model = create_model("densenet-10-k4", **kw).eval()  # plain: no conv2 in any layer
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        out = model(x)
        assert torch.equal(scripted(x), out) and torch.equal(torch.fx.symbolic_trace(model)(x), out)


# ---------------------------------------------------------------- each piece against timm

@pytest.fixture(scope="module")
def pair() -> tuple[DenseNet, nn.Module]:
    """Our densenet121 and timm's with the same random weights and BN statistics."""
    torch.manual_seed(0)
    ref = timm.create_model("densenet121", pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, t in ref.state_dict().items():
            if t.dim() == 1 and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if k.endswith(("var", "weight"))
                        else torch.randn(t.shape, generator=g) * 0.1)
    ours = create_model("densenet121")
    ours.load_state_dict(remap_state_dict(ref.state_dict()))
    return ours.eval(), ref


def test_resolve_data_config_reads_each_models_own_cfg():
    cifar = timm.data.resolve_data_config(model=create_model("densenet-bc-100-k12"))
    assert cifar["input_size"] == (3, 32, 32) and cifar["crop_pct"] == 1.0
    assert cifar["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    tv = timm.data.resolve_data_config(model=create_model("densenet121"))
    assert tv["input_size"] == (3, 224, 224) and tv["crop_pct"] == 0.875
    assert tv["interpolation"] == "bilinear"  # what torchvision's weights were scored with
    grey = create_model("densenet-bc-40-k12", in_chans=1, num_classes=100).pretrained_cfg
    assert grey["input_size"] == (1, 32, 32) and grey["num_classes"] == 100
    assert grey["mean"] == (0.5,) and grey["pool_size"] == (8, 8)
    assert create_model("densenet-bc-16-k4", block_config=(2, 2)).pretrained_cfg["pool_size"] \
        == (16, 16)


def test_intermediates_equal_timms(pair):
    ours, ref = pair
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for kw in ({}, {"indices": 2}, {"indices": [0, -1]}, {"indices": [1], "stop_early": True}):
            a, mine = ours.forward_intermediates(x, **kw)
            b, theirs = ref.forward_intermediates(x, **kw)
            assert torch.equal(a, b) and len(mine) == len(theirs)
            assert all(torch.equal(m, t) for m, t in zip(mine, theirs, strict=True))
        only = ours.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert isinstance(only, list) and len(only) == 1 and torch.equal(only[0], theirs[0])
    # timm's BN-ReLU is one module named norm0/norm5; ours has its ReLU as relu0/relu5
    renamed = [{**f, "module": f["module"].replace("norm", "relu")} for f in ref.feature_info]
    assert ours.feature_info == renamed


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pools_equal_timms(pair, pool):
    ours, ref = pair
    feats = torch.randn(2, ours.num_features, 3, 2)
    ours.reset_classifier(5, pool)
    ref.reset_classifier(5, pool)
    assert ours.head_hidden_size == ref.head_hidden_size
    assert ours.get_classifier().in_features == ref.get_classifier().in_features
    with torch.no_grad():
        assert torch.equal(ours.forward_head(feats, pre_logits=True),
                           ref.forward_head(feats, pre_logits=True))
    assert not ours.get_classifier().training  # the new head follows the model's mode
    ours.reset_classifier(1000, "avg")  # fresh classifiers: later tests read no logits
    ref.reset_classifier(1000, "avg")


def test_prune_intermediate_layers_like_timm(pair):
    ours, ref = pair
    x = torch.randn(1, 3, 64, 64)
    pruned = create_model("densenet121")
    pruned.load_state_dict(ours.state_dict())
    pruned.eval()
    with torch.no_grad():
        _, maps = ours.forward_intermediates(x)
        assert pruned.prune_intermediate_layers([1, 2]) == [1, 2]
        assert "transition2" not in dict(pruned.features.named_children())
        assert pruned.num_classes == 0 and pruned.num_features == 512
        assert torch.equal(pruned(x), maps[2])  # no pooling, no classifier: the last kept map
        out, inter = pruned.forward_intermediates(x, indices=[1, 2])
        assert torch.equal(inter[0], maps[1]) and torch.equal(out, maps[2])


def test_group_matcher_groups_as_timm_does(pair):
    ours, ref = pair
    for coarse in (False, True):
        mine = timm.models.group_parameters(ours, ours.group_matcher(coarse))
        theirs = timm.models.group_parameters(ref, ref.group_matcher(coarse))
        assert mine == theirs
    assert len(mine) == 1 + 4 + 1  # stem, four blocks (their transitions), final norm + head
    groups = create_optimizer_v2(ours, "sgd", lr=1.0, layer_decay=0.5).param_groups
    assert len({g["lr_scale"] for g in groups}) > 50  # one per dense layer, as timm's


# timm's feature_cls kinds: what each returns for timm's densenet121 (taps 1..4 are the same
# maps in both; our tap 0 is the stem after its max pool, timm's before it).
KINDS = [  # feature_cfg, the output's type, its keys for out_indices (1, 3)
    ({"feature_cls": "getter"}, list, None),
    ({"feature_cls": "list"}, list, None),
    ({"feature_cls": "dict"}, dict, ["1", "3"]),
    ({"feature_cls": "hook"}, list, None),
    ({"feature_cls": "hook", "return_dict": True}, dict,
     ["features.denseblock1", "features.denseblock3"]),
    ({"feature_cls": "fx"}, list, None),
    ({"feature_cls": "fx", "return_dict": True}, dict, ["1", "3"]),
]


@pytest.fixture(scope="module")
def timm_file(pair, tmp_path_factory):
    """timm's densenet121 of ``pair`` as a file timm's own ``features_only`` builder loads."""
    path = tmp_path_factory.mktemp("timm") / "densenet121.pth"
    torch.save(pair[1].state_dict(), path)
    return path


@pytest.mark.parametrize("cfg, kind, keys", KINDS)
def test_each_feature_cls_returns_timms_maps_in_timms_form(pair, timm_file, cfg, kind, keys):
    ours, _ = pair
    x = torch.randn(1, 3, 64, 64)
    # timm's densenet121 takes feature_cls alone (its builder passes a feature_cfg of its own),
    # so its wrapper's return_dict is set on the wrapper
    theirs = timm.create_model("densenet121", pretrained=True, features_only=True,
                               out_indices=(1, 3), pretrained_cfg_overlay=dict(file=timm_file),
                               feature_cls=cfg["feature_cls"]).eval()
    theirs.return_dict = cfg.get("return_dict", getattr(theirs, "return_dict", None))
    mine = create_model("densenet121", features_only=True, out_indices=(1, 3), feature_cfg=cfg)
    assert set(mine.state_dict()) <= set(ours.state_dict())  # the model's keys, every kind
    mine.load_state_dict({k: v for k, v in ours.state_dict().items() if k in mine.state_dict()})
    mine.eval()
    assert mine.feature_info.channels() == theirs.feature_info.channels() == [256, 1024]
    assert mine.feature_info.reduction() == theirs.feature_info.reduction() == [4, 16]
    with torch.no_grad():
        got, want = mine(x), theirs(x)
        _, maps = ours.forward_intermediates(x, indices=(1, 3))
    assert isinstance(got, kind) and isinstance(want, kind)
    if keys is not None:
        assert list(got) == list(want) == keys
        got, want = list(got.values()), list(want.values())
    assert all(torch.equal(g, w) and torch.equal(g, m)
               for g, w, m in zip(got, want, maps, strict=True))
    mine.train()  # the fx kind switches to its training graph; every kind still gives maps
    assert len(mine(x)) == 2


def test_feature_cfg_carries_the_kind_and_its_options_and_explicit_arguments_win():
    kw = dict(features_only=True, feature_cfg={"feature_cls": "dict", "out_indices": (0, 1),
                                               "out_map": ["stem", "block1"]})
    assert list(create_model("densenet-bc-16-k4", **kw)(torch.randn(1, 3, 32, 32))) == \
        ["stem", "block1"]
    backbone = create_model("densenet-bc-16-k4", features_only=True, out_indices=1,
                            feature_cls="hook", feature_cfg={"feature_cls": "dict",
                                                             "out_indices": (0, 1)})
    assert isinstance(backbone(torch.randn(1, 3, 32, 32)), list) and backbone.out_indices == (3,)
    for bad, match in [(dict(feature_cls="graph"), "feature_cls must be one of"),
                       (dict(feature_cfg={"feature_cls": "list", "out_map": [1]}),
                        "takes no out_map"),
                       (dict(feature_cfg={"feature_cls": "hook", "default_hook_type": "pre"}),
                        "default_hook_type"),
                       (dict(feature_cls="dict", out_indices=(0, 1), feature_cfg={"out_map": [1]}),
                        "out_map names 1 maps")]:
        with pytest.raises(ValueError, match=match):
            create_model("densenet-bc-16-k4", features_only=True, **bad)
    with pytest.raises(ValueError, match="features_only=True"):
        create_model("densenet-bc-16-k4", feature_cls="hook")


@pytest.mark.parametrize("name, kw", [("densenet-bc-16-k4", {}), ("rdnet_tiny", SMALL_RDNET)])
def test_the_hook_and_fx_backbones_survive_what_a_saved_model_goes_through(name, kw):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for cls in ("hook", "fx"):
            backbone = create_model(name, features_only=True, feature_cls=cls, **kw).eval()
            want = backbone(x)
            again = pickle.loads(pickle.dumps(backbone))  # hooks and graphs travel with it
            assert all(torch.equal(a, b) for a, b in zip(again(x), want, strict=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            scripted = torch.jit.script(backbone)  # the fx kind compiles for both families
        with torch.jit.optimized_execution(False):
            assert all(torch.equal(a, b) for a, b in zip(scripted(x), want, strict=True))


def test_reset_classifier_to_features_and_back():
    model = create_model("densenet-bc-16-k4").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        assert torch.equal(model(x), pooled)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.config.num_classes == 7
        assert torch.all(model.classifier.bias == 0)
    for bad, match in [((-1,), "integer >= 0"), ((3, ""), "num_classes=0"),
                       ((3, "mean"), "global_pool must be one of")]:
        with pytest.raises(ValueError, match=match):
            model.reset_classifier(*bad)


def test_timm_keywords_of_create_model(tmp_path):
    m = create_model("densenet-bc-16-k4", pretrained=False, in_chans=1, global_pool="max")
    assert m.config.in_channels == 1 and isinstance(m.global_pool, nn.AdaptiveMaxPool2d)
    with pytest.raises(ValueError, match="disagree"):
        create_model("densenet-bc-16-k4", in_chans=1, in_channels=3)
    with pytest.raises(ValueError, match="no published weights for 'densenet264d'"):
        create_model("densenet264d", pretrained=True)
    src = create_model("densenet-bc-16-k4").eval()
    path = save(src, tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 32, 32)
    feats = create_model("densenet-bc-16-k4", weights=path, num_classes=0).eval()
    with torch.no_grad():
        assert torch.equal(feats(x), src.forward_head(src.forward_features(x), pre_logits=True))
    with pytest.warns(UserWarning, match="doubles"):
        cat = create_model("densenet-bc-16-k4", weights=path, global_pool="catavgmax")
    assert cat.get_classifier().in_features == 2 * src.num_features
    backbone = create_model("densenet-bc-16-k4", features_only=True, out_indices=2)
    assert backbone.out_indices == (2, 3)  # an int: the last n, as in timm
    with pytest.raises(ValueError, match="use 1..4"):
        create_model("densenet-bc-16-k4", features_only=True, out_indices=5)


def test_drop_rates_keep_their_meanings():
    model = create_model("densenet-bc-16-k4", drop_rate=0.2, head_drop_rate=0.5)
    assert model.features.denseblock1.denselayer1.drop_rate == 0.2  # the paper's, per conv
    assert isinstance(model.head_drop, nn.Dropout) and model.head_drop.p == 0.5  # timm's
    assert isinstance(create_model("densenet-bc-16-k4").head_drop, nn.Identity)
    model.train()
    torch.manual_seed(0)
    feats = torch.ones(1, model.num_features, 2, 2)
    pooled = model.forward_head(feats, pre_logits=True)
    assert set(pooled.unique().tolist()) <= {0.0, 2.0}  # dropped or scaled by 1 / (1 - p)


def test_grad_checkpointing_is_the_memory_efficient_mode():
    model = create_model("densenet-bc-16-k4")
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and model.features.denseblock1.memory_efficient
    model.set_grad_checkpointing(False)
    assert not model.config.memory_efficient


def test_input_checks_stay_for_eager_users_and_step_aside_when_traced():
    model = create_model("densenet-bc-16-k4").eval()
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="3-channel"):
        model.forward_intermediates(torch.randn(1, 1, 32, 32))
    torch.fx.symbolic_trace(model)  # raises if a check branches on a traced shape
    backbone = create_model("densenet-bc-16-k4", features_only=True)
    assert len(torch.fx.symbolic_trace(backbone)(torch.randn(1, 3, 32, 32))) == 4


# One index rule for every family and for the backbone wrapper: a bool is refused everywhere.


@pytest.mark.parametrize("name, kw", [("densenet-bc-16-k4", {}), ("rdnet_tiny", SMALL_RDNET)])
@pytest.mark.parametrize("bad", [True, [True], (0, False)])
def test_a_bool_index_is_refused_by_the_model_its_pruning_and_its_backbone(name, kw, bad):
    x = torch.randn(1, 3, 32, 32)
    model = create_model(name, **kw)
    with pytest.raises(ValueError, match="indices|feature index"):
        model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="indices|feature index"):
        model.prune_intermediate_layers(bad)
    with pytest.raises(ValueError, match="out_indices"):
        create_model(name, features_only=True, out_indices=bad, **kw)


@pytest.mark.parametrize("name, kw", [("densenet-bc-16-k4", {}), ("rdnet_tiny", SMALL_RDNET)])
def test_both_families_prune_through_the_one_contract(name, kw):
    model = create_model(name, **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
        assert model.prune_intermediate_layers([-2]) == [len(maps) - 2]
        # the taps past the cut are gone with their modules, so the pruned model taps anew
        assert len(model.feature_info) == len(maps) - 1 and model.num_classes == 0
        assert torch.equal(model.forward_features(x), maps[-2])
        assert model(x).shape[1] == model.num_features == maps[-2].shape[1]
        assert torch.equal(model.forward_intermediates(x)[1][-1], maps[-2])
    backbone = create_model(name, features_only=True, **kw).eval()
    assert set(backbone.state_dict()) <= set(create_model(name, **kw).state_dict())
    assert [m.shape[1] for m in backbone(x)] == backbone.feature_info.channels()
