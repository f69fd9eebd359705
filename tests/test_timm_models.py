"""timm's own model tests, run on this library's models.

Each test below is named after the function of timm's ``tests/test_models.py`` (timm 1.0) that
it mirrors, and makes the same calls with the same assertions on our DenseNets (ImageNet and
CIFAR), timm's two DenseNet variants and RDNet. What differs: ``create_model`` is ours; a model
name's input size comes from our zoo's ``pretrained_cfg`` where timm reads its registry; timm's
own densenet121 (``timm/densenet121``) runs alongside as the control the bodies must pass;
TorchScript runs without the profiling executor's optimisation passes (timm switches them off
for its whole session). A few assertions go beyond timm's, each marked "beyond timm".

Of timm's file, the tests of published weights (``test_model_inference``,
``test_model_load_pretrained``, ``test_model_features_pretrained``) need downloads, and
``test_model_default_cfgs_non_std`` and the NaFlexViT and Gemma tests are for transformers.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

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
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    assert max(input_size) <= MAX_JIT_SIZE
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False)
    model.eval()
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
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3
    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    assert max(input_size) <= MAX_FFEAT_SIZE
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_maps(outputs, expected_channels, expected_reduction, input_size, batch_size)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates_features(model_name, batch_size=1):
    model = create_model(model_name, pretrained=False, features_only=True, feature_cls="getter")
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    assert max(input_size) <= MAX_FFEAT_SIZE
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_maps(outputs, expected_channels, expected_reduction, input_size, batch_size)


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
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    assert max(input_size) <= MAX_JIT_SIZE
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False)
    model.eval()
    model = _script(_create_fx_model(model))
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        outputs = torch.cat(tuple(model(torch.randn((batch_size, *input_size))).values()))
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any()


# timm runs this one on regnetx_002 only; timm's densenet121 takes no feature_cfg (its builder
# passes one of its own), so the control is left out here.
@pytest.mark.parametrize("model_name", MODELS[:-1])
def test_model_forward_torchscript_with_features_fx(model_name, batch_size=1):
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    assert max(input_size) <= MAX_JIT_SIZE
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False, features_only=True,
                             feature_cfg={"feature_cls": "fx"})
    model.eval()
    model = _script(model)
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        outputs = model(torch.randn((batch_size, *input_size)))
    assert isinstance(outputs, list)
    for tensor in outputs:
        assert tensor.shape[0] == batch_size
        assert not torch.isnan(tensor).any()
