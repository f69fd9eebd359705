"""Issue 13: timm's model contract on our DenseNets.

The first part is an adapter for timm's own model tests (its tests/test_models.py: forward,
backward, default_cfgs, forward_features, forward_intermediates, torchscript, fx), the same
checks in the same order, with ``create_model`` being ours, run over densenet121 and a CIFAR
DenseNet-BC. timm's helpers (``resolve_data_config``, ``FeatureInfo``, ``group_parameters``,
torchvision's FX feature extractor with timm's tracer settings) read our models as they read
timm's. The second part checks each piece against timm's densenet121 with the same weights.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.layers import get_channel_dim, get_spatial_dim  # noqa: E402
from timm.models import get_notrace_functions, get_notrace_modules  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from torchvision.models.feature_extraction import (  # noqa: E402
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

from densenets import DenseNet, create_model, save  # noqa: E402
from densenets.weights.keymap import remap_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# timm's test sizes (tests/test_models.py), a CIFAR model's 32 px being below all of them
TARGET_FWD_SIZE, TARGET_BWD_SIZE, TARGET_JIT_SIZE = 384, 128, 128
TARGET_FFEAT_SIZE, TARGET_FWD_FX_SIZE, TARGET_BWD_FX_SIZE = 96, 128, 128
MAX_FWD_OUT_SIZE = 448
MODELS = ["densenet121", "densenet-bc-40-k12", "rdnet_tiny"]


def input_size(model: nn.Module, target: int | None = None) -> tuple[int, ...]:
    """timm's _get_input_size: the pretrained_cfg's size, capped at ``target``."""
    size = model.default_cfg["input_size"]
    if target and max(size) > target:
        size = tuple(min(x, target) for x in size)
    return size


def fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """timm's _create_fx_model: torchvision's feature extractor with timm's tracer settings."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        outs = [n.name for n in nodes[0]._input_nodes]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(o)] for o in outs]
    return create_feature_extractor(model, train_return_nodes=train_return,
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)


# ---------------------------------------------------------------- timm's model tests, adapted

@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model = create_model(name, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_FWD_SIZE))
    out = model(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name):
    model = create_model(name, pretrained=False, num_classes=42).train()
    x = torch.randn(2, *input_size(model, TARGET_BWD_SIZE))
    out = model(x)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfgs(name):
    model = create_model(name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    cfg = model.default_cfg
    pool = cfg["pool_size"]
    size = tuple(min(s, MAX_FWD_OUT_SIZE) for s in cfg["input_size"])
    x = torch.randn(1, *size)
    feat_axis, (h_axis, w_axis) = get_channel_dim("NCHW"), get_spatial_dim("NCHW")
    with torch.no_grad():
        out = model.forward_features(x)
        pre = model.forward_head(out, pre_logits=True)
        assert (out.shape[h_axis], out.shape[w_axis]) == pool
        assert out.shape[feat_axis] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.dim() == 4 and (unpooled.shape[h_axis], unpooled.shape[w_axis]) == pool
        fresh = create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        out = fresh(x)
        assert out.dim() == 4 and (out.shape[h_axis], out.shape[w_axis]) == pool
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_features(name):
    model = create_model(name, pretrained=False, features_only=True).eval()
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    size = input_size(model, TARGET_FFEAT_SIZE)
    outs = model(torch.randn(1, *size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reduction, outs, strict=True):
        assert o.shape[1] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name):
    model = create_model(name, pretrained=False).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reduction = info.channels(), info.reduction()
    assert len(channels) >= 3
    size = input_size(model, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *size)
    out, inter = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(inter) == len(channels)
    for c, r, o in zip(channels, reduction, inter, strict=True):
        assert o.shape[1] == c and not torch.isnan(o).any()
        # timm allows a map one larger than size / r; ours are exact (floor)
        assert o.shape[2:] == (size[1] // r, size[2] // r)
    assert torch.allclose(out, model.forward_features(x))
    model.set_grad_checkpointing()
    out3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    assert torch.allclose(out, out3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_torchscript(name):
    model = create_model(name, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_JIT_SIZE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    # without the profiling executor's first-run optimisation passes (seconds, same outputs)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        out = scripted(x)
        assert out.shape[0] == 1 and not torch.isnan(out).any()
        assert torch.equal(out, model(x))


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_fx(name):
    model = create_model(name, pretrained=False).eval()
    x = torch.randn(1, *input_size(model, TARGET_FWD_FX_SIZE))
    with torch.inference_mode():
        out = model(x)
        fx_out = torch.cat(tuple(fx_model(model)(x).values()))
        assert torch.equal(fx_out, out) and not torch.isnan(out).any()
        assert torch.equal(torch.fx.symbolic_trace(model)(x), out)


@pytest.mark.parametrize("name", MODELS[1:2])  # the CIFAR net: densenet121's costs ~10 s here
def test_model_backward_fx(name):
    model = create_model(name, pretrained=False, num_classes=42).train()
    n_params = sum(p.numel() for p in model.parameters())
    traced = fx_model(model, train=True)
    out = torch.cat(tuple(traced(torch.randn(2, *input_size(model, TARGET_BWD_FX_SIZE))).values()))
    out.mean().backward()
    grads = [p.grad for p in traced.parameters()]
    assert all(g is not None for g in grads) and sum(g.numel() for g in grads) == n_params
    assert out.shape[-1] == 42


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
SMALL_RDNET = dict(num_init_features=16, growth_rates=(8, 16, 16), downsample=(False, True, False),
                   effective_se=(False, True, True), num_classes=5)


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
