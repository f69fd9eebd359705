"""Issue 3, item 3: torchvision's DenseNets and ours exchange weights and then agree.

Every parameter and BN statistic is randomised (not left at init) so that a tensor loaded into
the wrong place, or not at all, changes the output.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from densenets import create_model, load
from densenets.weights.files import load_into
from densenets.weights.keymap import remap_state_dict, to_legacy_keys

NAMES = ["densenet121", "densenet161", "densenet169", "densenet201"]

pytestmark = pytest.mark.usefixtures("one_thread_module")


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random BN scales, shifts and running statistics, and classifier bias.

    Convolution and classifier weights are already random from initialisation; the 1-D tensors
    start constant (1, 0), which would hide a swapped or skipped BN.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dim() != 1:
                continue
            if name.endswith(("running_var", "weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:  # running_mean, bias
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def outputs(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(x) for x in inputs]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert x.abs().max() > 1e-3  # a dead network would agree trivially
        assert (x - y).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_and_ours_exchange_weights(name):
    torch.manual_seed(0)
    inputs = [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    tv = getattr(torchvision.models, name)(weights=None)
    randomise(tv, 1)
    expected = outputs(tv, inputs)

    # torchvision -> ours, current keys and the legacy keys of the hosted files
    ours = create_model(name)
    assert load_into(ours, remap_state_dict(tv.state_dict())) == []
    assert_same(outputs(ours, inputs), expected)
    legacy = to_legacy_keys(tv.state_dict())
    assert any(".norm.1." in k for k in legacy) and not any(".norm1." in k for k in legacy)
    ours_legacy = create_model(name)
    load_into(ours_legacy, remap_state_dict(legacy))
    got = ours_legacy.state_dict()
    for k, v in ours.state_dict().items():  # exact: same tensors, so same outputs
        assert torch.equal(got[k], v), k

    # ours -> torchvision: strict load of our state dict, same outputs
    randomise(ours, 2)
    tv.load_state_dict(ours.state_dict(), strict=True)
    assert_same(outputs(tv, inputs), outputs(ours, inputs))


def test_hosted_style_file_loads_without_architecture(tmp_path):
    """A legacy-keyed file saved in the pre-1.6 format, as torchvision hosts them."""
    tv = torchvision.models.densenet121(weights=None)
    randomise(tv, 3)
    path = tmp_path / "densenet121-0000.pth"
    torch.save(to_legacy_keys(tv.state_dict()), path, _use_new_zipfile_serialization=False)
    model = load(path)
    x = [torch.randn(2, 3, 32, 32)]
    assert_same(outputs(model, x), outputs(tv, x))
    assert model.weights_meta["model_name"] == "densenet121"
    assert len(model.weights_meta["class_names"]) == 1000
    assert model.weights_meta["preprocessing"]["crop"] == 224
