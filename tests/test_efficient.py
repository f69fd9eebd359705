"""Memory-efficient dense blocks against the plain model, in float64: outputs, every gradient,
running statistics, dropout masks; gradcheck and opcheck of the custom operator the model
calls, with its hand-written backward."""

from __future__ import annotations

import copy

import pytest
import torch
from support import rel, train_steps
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from densenets import DenseNet
from densenets.efficient import dispatch as eff
from densenets.models.densenet import DenseBlock

TOL = 1e-10

CONFIGS = {
    "plain-cifar": dict(bottleneck=False, compression=1.0, stem="cifar"),
    "B-cifar": dict(bottleneck=True, compression=1.0, stem="cifar"),
    "C-imagenet": dict(bottleneck=False, compression=0.5, stem="imagenet"),
    "BC-imagenet": dict(bottleneck=True, compression=0.5, stem="imagenet"),
}
SIZES = {"cifar": 9, "imagenet": 37}  # odd sizes: pooling floors, blocks at 9/4/2 and 10/5/2


def make_pair(seed: int = 0, **cfg) -> tuple[DenseNet, DenseNet]:
    """A plain float64 DenseNet with random BN affines and running stats, and its efficient
    twin with the same state."""
    torch.manual_seed(seed)
    kw = dict(growth_rate=4, block_config=(2, 3, 2), num_init_features=6, num_classes=5)
    kw.update(cfg)
    plain = DenseNet(**kw).double()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):  # beta != 0 so no gradient vanishes by symmetry
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return plain, copy.deepcopy(plain).set_memory_efficient(True)


def assert_same_training(plain, efficient, xs, seed=0):
    for (ya, ga, pa), (yb, gb, pb) in zip(train_steps(plain, xs, seed),
                                          train_steps(efficient, xs, seed), strict=True):
        assert rel(ya, yb) < TOL
        assert rel(ga, gb) < TOL
        names = [n for n, _ in plain.named_parameters()]
        for name, a, b in zip(names, pa, pb, strict=True):
            assert rel(a, b) < TOL, name
    for (name, a), b in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b) == 3, name
        else:
            assert rel(a, b) < TOL, name


def inputs(stem: str, n: int = 3, channels_last: bool = False, steps: int = 3):
    size = SIZES[stem]
    xs = [torch.randn(n, 3, size, size, dtype=torch.float64) for _ in range(steps)]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    return xs


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_training_matches_plain_model(variant, backend):
    cfg = CONFIGS[variant]
    plain, efficient = make_pair(**cfg)
    assert_same_training(plain, efficient, inputs(cfg["stem"]))


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_default_trains_like_plain_model(channels_last, monkeypatch):
    """On a GPU, float64 through the PyTorch operations (the path every CUDA float64 block
    takes) against the plain model there, with dropout, to the same tolerance as on a CPU."""
    monkeypatch.delenv("DENSENETS_KERNELS", raising=False)
    assert eff.backend("cuda", torch.float64) == "torch"
    plain, efficient = (m.cuda() for m in make_pair(bottleneck=True, stem="cifar",
                                                   drop_rate=0.2))
    xs = [x.cuda() for x in inputs("cifar", channels_last=channels_last)]
    assert_same_training(plain, efficient, xs, seed=3)


def test_channels_last_matches_and_keeps_layout(backend):
    plain, efficient = make_pair(bottleneck=True, stem="cifar", growth_rate=5)
    x = inputs("cifar", channels_last=True)
    assert_same_training(plain, efficient, x)
    block = efficient.features.denseblock1
    out = block(torch.randn(2, 6, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert block(torch.randn(2, 6, 5, 5, dtype=torch.float64)).is_contiguous()


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_draws_the_same_masks(bottleneck, channels_last, backend):
    plain, efficient = make_pair(bottleneck=bottleneck, stem="cifar", drop_rate=0.3)
    xs = inputs("cifar", channels_last=channels_last)
    assert_same_training(plain, efficient, xs, seed=7)
    # and the masks really differ between seeds (the comparison above is not vacuous)
    torch.manual_seed(1)
    y1 = efficient(xs[0])
    torch.manual_seed(2)
    assert not torch.allclose(y1, efficient(xs[0]))


def test_dropout_masks_are_kept_as_booleans_and_their_kept_value():
    """A float mask is the size of the maps it drops (4k channels for a bottleneck's): the block
    keeps booleans and each mask's kept value, which give backward the float mask bit for bit
    (the parity tests above train through it)."""
    torch.manual_seed(0)
    block = DenseBlock(3, 8, 4, bn_size=2, drop_rate=0.3, memory_efficient=True).train()
    x = torch.randn(2, 8, 5, 6)
    outs = torch.ops.densenets.dense_block(x, eff._params(block), 4, 8, [0.3] * 3, 1e-5, 1e-5,
                                           False, eff.backend())
    saved = eff.ops.outputs(outs)[1]
    assert [(m.dtype, m.shape[1]) for m in saved.noises] == [(torch.bool, 8), (torch.bool, 4)] * 3
    kept = torch.nn.functional.dropout(torch.ones(1000), 0.3, training=True).max()
    assert torch.equal(saved.scales, kept.expand(6))


def test_eval_outputs_identical():
    plain, efficient = make_pair(bottleneck=True, stem="imagenet")
    x = inputs("imagenet")[0]
    plain.eval()
    efficient.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), efficient(x))


def test_momentum_none_cumulative_average(backend):
    plain, efficient = make_pair(bottleneck=True, stem="cifar")
    for model in (plain, efficient):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    assert_same_training(plain, efficient, inputs("cifar"))


def test_running_stats_updated_once_per_step(backend):
    _, efficient = make_pair(bottleneck=True, stem="cifar")
    efficient(inputs("cifar")[0]).sum().backward()
    for name, buf in efficient.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buf) == 1, name


def test_state_dict_moves_between_modes():
    plain, efficient = make_pair(bottleneck=True, stem="cifar")
    assert list(plain.state_dict()) == list(efficient.state_dict())
    fresh = DenseNet(**{**plain.config.to_dict(), "memory_efficient": True}).double()
    fresh.load_state_dict(plain.state_dict())
    x = inputs("cifar")[0]
    plain.train()
    assert rel(plain(x), fresh(x)) < TOL


def block_op_args(bottleneck: bool, kernels: str, drop_rates=(0.0, 0.0)):
    """Arguments of ``densenets::dense_block`` for a tiny float64 block of two layers, its
    parameters (random BN affines) requiring gradients."""
    torch.manual_seed(0)
    block = DenseBlock(2, 3, 2, bottleneck=bottleneck, bn_size=2).double().train()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):  # beta != 0: no gradient vanishes by symmetry
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    params = [p.detach().clone().requires_grad_(True) for p in eff._params(block)]
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    return (x, params, 2, 4 if bottleneck else 0, list(drop_rates), 1e-5, 1e-5, False, kernels)


@pytest.mark.parametrize("bottleneck", [True, False])
def test_gradcheck_of_the_custom_operator(bottleneck, backend):
    """The operator the model calls, through its registered autograd (finite differences of
    the output against the hand-written backward)."""
    x, params, *args = block_op_args(bottleneck, backend)

    def f(x, *ps):
        return torch.ops.densenets.dense_block(x, list(ps), *args)[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bottleneck", [True, False])
def test_opcheck_of_the_custom_operator(bottleneck, backend):
    """Schema, fake tensors (shapes, strides, dtypes of every output) and autograd
    registration of ``densenets::dense_block`` in float64, with dropout."""
    args = block_op_args(bottleneck, backend, drop_rates=(0.2, 0.0))
    torch.library.opcheck(torch.ops.densenets.dense_block.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_single_value_per_channel_is_an_error():
    _, efficient = make_pair(bottleneck=True, stem="cifar", block_config=(2,))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        efficient.features.denseblock1(torch.randn(1, 6, 1, 1, dtype=torch.float64))


class AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of every tensor an operator returns in new storage (not an input's)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_backward_is_handed_no_zero_gradients_for_the_saved_tensors():
    """Only the block's output carries a gradient: autograd must not materialise zeros the
    size of the other outputs (the normalised block, the bottleneck maps) in every backward,
    which raised the peak memory of BC-250 k=12 by a fifth. Every byte allocated around the
    block's backward (its kernels' own scratch is inside the operator) is counted."""
    torch.manual_seed(0)
    block = DenseBlock(6, 24, 12, memory_efficient=True).train()
    x = torch.randn(4, 24, 16, 16, requires_grad=True)
    outs = torch.ops.densenets.dense_block(x, eff._params(block), 12, 48, [0.0] * 6, 1e-5,
                                           1e-5, False, eff.backend())
    saved = sum(t.nbytes for t in outs[1:])  # what materialised zero gradients would take
    needed = x.nbytes + sum(p.nbytes for p in block.parameters())  # dL/dx and dL/dparams
    loss = outs[0].sum()
    with AllocatedBytes() as allocated:
        loss.backward()
    assert needed <= allocated.bytes <= needed + 4096, (allocated.bytes, needed)
    assert saved > 4 * needed  # so zero gradients for the saved outputs could not hide
