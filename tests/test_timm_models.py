"""timm's own model tests, run on this library's models.

Each test below is named after the function of timm's ``tests/test_models.py`` (timm 1.0) that
it mirrors, and makes the same calls with the same assertions on our DenseNets (ImageNet and
CIFAR), timm's two DenseNet variants and RDNet. What differs: ``create_model`` is ours; a model
name's input size comes from our zoo's ``pretrained_cfg`` where timm reads its registry; timm's
own densenet121 (``timm/densenet121``) runs alongside as the control the bodies must pass;
TorchScript runs without the profiling executor's optimisation passes (timm switches them off
for its whole session). A few assertions go beyond timm's, each marked "beyond timm".

The tests of published weights (``test_model_inference``, ``test_model_load_pretrained``,
``test_model_features_pretrained``) run offline: see their section. timm's
``test_model_default_cfgs_non_std`` and its NaFlexViT and Gemma tests are for transformers only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings

import pytest
import torch
from PIL import Image
from support import vary_bn, write_hub_cache

timm = pytest.importorskip("timm")

import torchvision  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm import get_pretrained_cfg_value, set_scriptable  # noqa: E402
from timm.layers import get_channel_dim, get_spatial_dim  # noqa: E402
from timm.models import get_notrace_functions, get_notrace_modules  # noqa: E402
from torchvision.models.feature_extraction import (  # noqa: E402
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

import densenets  # noqa: E402
from densenets.models.registry import family_for  # noqa: E402
from densenets.weights.keymap import remap_state_dict, to_legacy_keys  # noqa: E402
from densenets.weights.pretrained import PRETRAINED  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

# timm's sizes (tests/test_models.py)
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_JIT_SIZE = 128
MAX_JIT_SIZE = 320
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256
TARGET_FWD_FX_SIZE = 128
MAX_FWD_FX_SIZE = 256
TARGET_BWD_FX_SIZE = 128
MAX_BWD_FX_SIZE = 224

CONTROL = "timm/densenet121"  # timm's own model: every body here must pass on it
# densenet264d (72M parameters, 2-4 s a test here) runs with the slow tests
MODELS = ["densenet121", "densenet-bc-100-k12",
          pytest.param("densenet264d", marks=pytest.mark.slow), "densenetblur121d", "rdnet_tiny",
          CONTROL]


def create_model(name: str, **kwargs):
    """Ours, or timm's for the control."""
    if name.startswith("timm/"):
        return timm.create_model(name.removeprefix("timm/"), **kwargs)
    return densenets.create_model(name, **kwargs)


def zoo_cfg_value(name: str, key: str):
    """timm's get_pretrained_cfg_value for a name of our zoo: its pretrained_cfg, unbuilt."""
    if name.startswith("timm/"):
        return get_pretrained_cfg_value(name.removeprefix("timm/"), key)
    family = family_for(name)
    return family.pretrained_cfg(name, family.model_config(name), None).get(key)


def _get_input_size(model=None, model_name="", target=None):
    """timm's rule: the default input size, capped at ``target`` unless fixed."""
    if model is None:
        assert model_name, "One of model or model_name must be provided"
        input_size = zoo_cfg_value(model_name, "input_size")
        fixed_input_size = zoo_cfg_value(model_name, "fixed_input_size")
        min_input_size = zoo_cfg_value(model_name, "min_input_size")
    else:
        input_size = model.default_cfg["input_size"]
        fixed_input_size = model.default_cfg.get("fixed_input_size", None)
        min_input_size = model.default_cfg.get("min_input_size", None)
    assert input_size is not None
    if fixed_input_size:
        return input_size
    if target and max(input_size) > target:
        input_size = min_input_size or tuple(min(x, target) for x in input_size)
    return input_size


def _create_fx_model(model, train=False):
    """timm's _create_fx_model: torchvision's feature extractor with timm's tracer settings,
    returning the node(s) feeding the traced output."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(),
                         autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes]
        names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-names.index(o)] for o in output_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes,
                                    tracer_kwargs=tracer_kwargs)


def _check_maps(outputs, channels, reductions, input_size, batch_size, exact=False):
    """timm's per-map checks of its feature tests (``exact``: our floor sizes, beyond timm)."""
    assert len(channels) == len(outputs)
    feat_axis, (h_axis, w_axis) = get_channel_dim("NCHW"), get_spatial_dim("NCHW")
    h, w = input_size[-2:]
    for e, r, o in zip(channels, reductions, outputs, strict=True):
        assert e == o.shape[feat_axis]
        assert o.shape[h_axis] <= math.ceil(h / r) + 1
        assert o.shape[w_axis] <= math.ceil(w / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()
        if exact:
            assert (o.shape[h_axis], o.shape[w_axis]) == (h // r, w // r)


def _run_backbone(model, batch_size):
    """The body timm's two features_only tests share: maps at the feature_info's channels and
    reductions, at timm's feature input size."""
    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    assert max(input_size) <= MAX_FFEAT_SIZE
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_maps(outputs, model.feature_info.channels(), model.feature_info.reduction(),
                input_size, batch_size)


def _for_torchscript(model_name, **kwargs):
    """The start timm's TorchScript tests share: the model built scriptable, in eval mode, and
    timm's TorchScript input size."""
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    assert max(input_size) <= MAX_JIT_SIZE
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False, **kwargs)
    return model.eval(), input_size


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(module)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    assert max(input_size) <= MAX_FWD_SIZE
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any()
    model.set_grad_checkpointing()  # ours support it: no try/except to hide a failure
    outputs2 = model(inputs)
    assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward(model_name, batch_size=2):
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_SIZE)
    assert max(input_size) <= MAX_BWD_SIZE
    model = create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(torch.randn((batch_size, *input_size)))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert not encoder_only and outputs.shape[-1] == 42
    assert num_params == num_grad
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("model_name", MODELS)
def test_model_default_cfgs(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    pool_size, input_size = cfg["pool_size"], cfg["input_size"]
    spatial_axis, feat_axis = get_spatial_dim("NCHW"), get_channel_dim("NCHW")
    assert all(x <= MAX_FWD_OUT_SIZE for x in input_size)
    input_tensor = torch.randn((batch_size, *input_size))
    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == tuple(pool_size)
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size
    # without the classifier: pooled features
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 2 and outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape
    # without pooling and classifier: the unpooled map
    model.reset_classifier(0, "")
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0]
    assert outputs.shape[spatial_axis[1]] == pool_size[1]
    # the same, from __init__
    model = create_model(model_name, pretrained=False, num_classes=0, global_pool="").eval()
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0]
    assert outputs.shape[spatial_axis[1]] == pool_size[1]
    # the classifier and first convolution the cfg names are the model's
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in classifier if isinstance(classifier, (tuple, list)) else (classifier,):
            assert c + ".weight" in state_dict
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_torchscript(model_name, batch_size=1):
    model, input_size = _for_torchscript(model_name)
    scripted = _script(model)
    inputs = torch.randn((batch_size, *input_size))
    with torch.jit.optimized_execution(False):
        outputs = scripted(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any()
    with torch.no_grad():  # beyond timm: the compiled model computes what the eager one does
        assert torch.equal(outputs.detach(), model(inputs))


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_features(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    _run_backbone(model, batch_size)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates_features(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False, features_only=True, feature_cls="getter")
    model.eval()
    _run_backbone(model, batch_size)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= 3
    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    assert max(input_size) <= MAX_FFEAT_SIZE
    inpt = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(inpt, output_fmt="NCHW")
    # beyond timm: every map is exactly input // reduction
    _check_maps(intermediates, expected_channels, expected_reduction, input_size, batch_size,
                exact=True)
    output2 = model.forward_features(inpt)
    assert torch.allclose(output, output2)
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(inpt, output_fmt="NCHW")
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_fx(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model=model, target=TARGET_FWD_FX_SIZE)
    assert max(input_size) <= MAX_FWD_FX_SIZE
    with torch.inference_mode():
        inputs = torch.randn((batch_size, *input_size))
        outputs = model(inputs)
        traced = torch.fx.symbolic_trace(model) if not model_name.startswith("timm/") else None
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(inputs).values()))
        if traced is not None:  # beyond timm: plain symbolic tracing computes the same too
            assert torch.equal(traced(inputs), outputs)
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward_fx(model_name, batch_size=2):
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_FX_SIZE)
    assert max(input_size) <= MAX_BWD_FX_SIZE
    model = create_model(model_name, pretrained=False, num_classes=42)
    model.train()
    num_params = sum(x.numel() for x in model.parameters())
    model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(model(torch.randn((batch_size, *input_size))).values()))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_fx_torchscript(model_name, batch_size=1):
    model, input_size = _for_torchscript(model_name)
    model = _script(_create_fx_model(model))
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        outputs = torch.cat(tuple(model(torch.randn((batch_size, *input_size))).values()))
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any()


# timm runs this one on regnetx_002 only; timm's densenet121 takes no feature_cfg (its builder
# passes one of its own), so the control is left out here.
@pytest.mark.parametrize("model_name", MODELS[:-1])
def test_model_forward_torchscript_with_features_fx(model_name, batch_size=1):
    model, input_size = _for_torchscript(model_name, features_only=True,
                                         feature_cfg={"feature_cls": "fx"})
    model = _script(model)
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        outputs = model(torch.randn((batch_size, *input_size)))
    assert isinstance(outputs, list)
    for tensor in outputs:
        assert tensor.shape[0] == batch_size
        assert not torch.isnan(tensor).any()


# ------------------------------------------------------------ published weights, offline
# timm downloads them; here random stand-ins go through the same channels beforehand: the
# Hugging Face Hub cache (densenetblur121d, rdnet_tiny) and torch.hub's cache (densenet121,
# torchvision's file under its hash prefix). test_model_inference's reference tensors come from
# timm's own model with the same weights; its owl image needs the real weights (class 24) and is
# left out. timm's densenetblur121d, reading the same cache, is the control.

PUBLISHED_CONTROL = "timm/densenetblur121d"
# the models whose published weights live on the Hub -> their repository
HUB = {"densenetblur121d": "timm/densenetblur121d.ra_in1k",
       "rdnet_tiny": "naver-ai/rdnet_tiny.nv_in1k"}
PUBLISHED = ["densenet121", *HUB, PUBLISHED_CONTROL]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Random weights in place of each model's published ones, and timm's model holding them."""
    root = tmp_path_factory.mktemp("published")
    refs = {}
    for name, repo in HUB.items():
        ref = vary_bn(timm.create_model(name, pretrained=False)).eval()
        path = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        write_hub_cache(root / "hf", repo, {"model.safetensors": path})
        refs[name] = ref
    tv = vary_bn(torchvision.models.densenet121(weights=None)).eval()
    raw = root / "raw.pth"
    torch.save(to_legacy_keys(tv.state_dict()), raw)
    ref = timm.create_model("densenet121", pretrained=False).eval()
    ref.load_state_dict(remap_state_dict(tv.state_dict()))
    refs["densenet121"], refs[PUBLISHED_CONTROL] = ref, refs["densenetblur121d"]
    return root, raw, refs


@pytest.fixture
def offline(published, monkeypatch):
    """The caches hold the stand-in weights and nothing may be downloaded."""
    root, raw, refs = published
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(root / "torch"))
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    entry = PRETRAINED["densenet121"]
    url = entry.url.rsplit("/", 1)[0] + f"/densenet121-{digest}.pth"
    monkeypatch.setitem(PRETRAINED, "densenet121", dataclasses.replace(entry, url=url,
                                                                       sha256=digest))
    dst = root / "torch" / "checkpoints" / f"densenet121-{digest}.pth"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(raw.read_bytes())
    return refs


@pytest.mark.parametrize("model_name", PUBLISHED)
def test_model_inference(offline, model_name, batch_size=1):
    model = create_model(model_name, pretrained=True)
    model.eval()
    pp = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    ref = offline[model_name]
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn((batch_size, *model.pretrained_cfg["input_size"]), generator=g)
    with torch.inference_mode():  # timm's rand_tensors, from timm's model with these weights
        features = ref.forward_features(inputs)
        rand_tensors = {"input": inputs, "output": ref(inputs), "features": features,
                        "pre_logits": ref.forward_head(features, pre_logits=True)}
    with torch.inference_mode():
        rand_output = model(rand_tensors["input"])
        rand_features = model.forward_features(rand_tensors["input"])
        rand_pre_logits = model.forward_head(rand_features, pre_logits=True)
        assert torch.allclose(rand_output, rand_tensors["output"], rtol=1e-3, atol=1e-4)
        assert torch.allclose(rand_features, rand_tensors["features"], rtol=1e-3, atol=1e-4)
        assert torch.allclose(rand_pre_logits, rand_tensors["pre_logits"], rtol=1e-3, atol=1e-4)
    # beyond timm (its owl image needs the real weights): the resolved transform gives the
    # model's input size from any image
    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    assert tuple(pp(image).shape) == tuple(model.pretrained_cfg["input_size"])


@pytest.mark.filterwarnings("ignore:adapted .* input channels:UserWarning")
@pytest.mark.filterwarnings("ignore:classifier not loaded:UserWarning")
@pytest.mark.parametrize("model_name", PUBLISHED)
def test_model_load_pretrained(offline, model_name, batch_size=1):
    in_chans = 3 if "pruned" in model_name else 1
    create_model(model_name, pretrained=True, in_chans=in_chans, num_classes=5)
    create_model(model_name, pretrained=True, in_chans=in_chans, num_classes=0)


@pytest.mark.parametrize("model_name", PUBLISHED)
def test_model_features_pretrained(offline, model_name, batch_size=1):
    create_model(model_name, pretrained=True, features_only=True)
