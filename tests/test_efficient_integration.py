"""Memory-efficient blocks with the rest of PyTorch: linear saved memory, AMP, torch.compile,
fallbacks, and the kernel build."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from support import saved_bytes
from torch import nn

from densenets import DenseNet
from densenets.efficient import cpu_kernels
from densenets.efficient import dispatch as eff
from densenets.models.densenet import DenseBlock


def small(**kw) -> DenseNet:
    torch.manual_seed(0)
    cfg = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5,
               stem="cifar")
    cfg.update(kw)
    return DenseNet(**cfg)


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("dims,drop_rate", [(2, 0.0), (3, 0.2)])
def test_saved_memory_is_linear_in_depth(bottleneck, dims, drop_rate):
    """Images, and volumes (memory first: no normalised copy, no bottleneck outputs) with
    dropout (boolean masks): the efficient block keeps O(L) tensors, the plain one O(L^2)."""
    x = torch.randn(2, 8, *[5] * dims)
    x = x.to(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[dims])
    for efficient in (True, False):
        sizes = []
        for layers in (2, 4, 6):
            block = DenseBlock(layers, 8, 4, bottleneck=bottleneck, memory_efficient=efficient,
                               spatial_dims=dims, drop_rate=drop_rate)
            sizes.append(saved_bytes(block.train(), x.clone()))
        second_difference = sizes[2] - 2 * sizes[1] + sizes[0]
        if efficient:
            assert second_difference == 0, sizes  # exactly linear: O(L) tensors
        else:
            assert second_difference > 0, sizes  # the plain block keeps every concatenation


def test_bf16_autocast_as_accurate_as_plain_bf16():
    """Under bf16 autocast the efficient model is as close to float32 as the plain one is."""
    reference = small()
    x = torch.randn(8, 3, 8, 8)
    reference(x).square().mean().backward()
    ref_grad = torch.cat([p.grad.flatten() for p in reference.parameters()])
    ref_out = reference(x).detach()
    errors = {}
    for efficient in (False, True):
        model = copy.deepcopy(reference).set_memory_efficient(efficient)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        errors[efficient] = (float((y.detach().float() - ref_out).norm() / ref_out.norm()),
                             float((grad - ref_grad).norm() / ref_grad.norm()))
    for plain_err, eff_err in zip(errors[False], errors[True], strict=True):
        assert eff_err < 2 * plain_err + 0.01, errors


def test_torch_compile_trains_like_eager():
    eager = small().set_memory_efficient(True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="eager")
    x = torch.randn(3, 3, 8, 8)
    ya, yb = eager(x), compiled(x)
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.sum().backward()
    yb.sum().backward()
    for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_default_is_the_measured_path_and_triton_is_opt_in(monkeypatch, dtype):
    """On CUDA the default is the path a GPU run recorded (PyTorch operations) while no record
    says the Triton kernels are faster; DENSENETS_KERNELS=triton selects them."""
    monkeypatch.delenv("DENSENETS_KERNELS", raising=False)
    assert eff.CUDA_DEFAULT == "torch"
    assert eff.backend("cuda", dtype) == "torch"
    assert eff.backend("cpu", torch.float32) in ("native", "torch")
    monkeypatch.setattr(eff, "_triton_importable", lambda: True)
    assert eff.backend("cuda", dtype) == "torch"  # installed Triton changes nothing by itself
    monkeypatch.setenv("DENSENETS_KERNELS", "triton")
    if dtype == torch.float64:
        with pytest.raises(RuntimeError, match="float64"):
            eff.backend("cuda", dtype)
    else:
        assert eff.backend("cuda", dtype) == "triton"
    monkeypatch.setenv("DENSENETS_KERNELS", "torch")
    assert eff.backend("cuda", dtype) == eff.backend("cpu", dtype) == "torch"
    monkeypatch.setenv("DENSENETS_KERNELS", "auto")
    assert eff.backend("cuda", dtype) == "torch"


def test_frozen_batchnorm_falls_back_to_plain_path():
    plain = small()
    efficient = copy.deepcopy(plain).set_memory_efficient(True)
    for model in (plain, efficient):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # fine-tuning with frozen statistics
    x = torch.randn(3, 3, 8, 8)
    eff._warned.clear()
    with pytest.warns(UserWarning, match="eval mode"):
        y = efficient(x)
    assert torch.allclose(plain(x), y, atol=1e-6)


def test_unsupported_reason_names_the_problem():
    block = DenseBlock(2, 4, 2).train()
    assert eff.unsupported_reason(block) is None
    block.denselayer1.norm1 = nn.SyncBatchNorm(4)
    assert "SyncBatchNorm" in eff.unsupported_reason(block)


def test_kernel_build_failure_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSENETS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build"):
        assert cpu_kernels._build() is None
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind


def test_native_switch_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setenv("DENSENETS_NATIVE", "0")
    assert eff.backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = small(memory_efficient=True)(torch.randn(2, 3, 8, 8))
    y.sum().backward()


def test_bench_verb_measures_one_configuration(capsys):
    import json

    from densenets.cli import main

    rc = main(["bench", "densenet-bc-10-k4", "--batch-size", "2", "--input-size", "8",
               "--steps", "1", "--warmup", "0", "--memory-efficient", "--channels-last",
               "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == "densenets memory_efficient"
    assert result["images_per_s"] > 0 and result["peak_mib"] > 0
    assert result["config"]["channels_last"] and result["input_size"] == 8
    assert main(["bench", "densenet-bc-10-k4", "--batch-size", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_torchvision_twin_has_our_architecture():
    from densenets import create_model
    from densenets.analysis.bench import torchvision_densenet

    for name in ("densenet-bc-16-k4", "densenet121"):
        ours, theirs = create_model(name), torchvision_densenet(name)
        assert sum(p.numel() for p in ours.parameters()) == \
            sum(p.numel() for p in theirs.parameters())
    with pytest.raises(ValueError, match="-BC form"):
        torchvision_densenet("densenet-40-k12")


def test_line_and_parabola_fit():
    from densenets.analysis.bench import fit_line_and_parabola

    depths = [40, 100, 160, 250]
    line = fit_line_and_parabola(depths, [3 * d + 7 for d in depths])
    assert line["slope"] == pytest.approx(3)
    assert line["line"]["r2"] == pytest.approx(1)
    curved = fit_line_and_parabola(depths, [d * d for d in depths])
    assert curved["parabola"]["r2"] == pytest.approx(1)
    assert curved["line"]["r2"] < 0.999


def test_median_run_keeps_the_median_run_and_every_figure():
    from densenets.analysis.bench import median_run

    figures = iter([{"mib": 412, "peak": 1}, {"mib": 380, "peak": 2}, {"mib": 387, "peak": 3}])
    out = median_run(lambda: next(figures), "mib", repeats=3)
    assert out == {"mib": 387, "peak": 3, "runs_mib": [412, 380, 387]}
