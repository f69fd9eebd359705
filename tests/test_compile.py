"""torch.compile through memory-efficient blocks: the block is a custom operator with a fake
implementation and a registered backward, so a compiled model has no graph break and no skipped
function, and its training step equals the eager one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from densenets import DenseNet
from densenets.efficient import dispatch  # imports ops: registers torch.ops.densenets

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> DenseNet:
    torch.manual_seed(0)
    cfg = dict(growth_rate=5, block_config=(2, 3), num_init_features=7, num_classes=4,
               stem="cifar", bottleneck=True, compression=0.5)
    cfg.update(kw)
    return DenseNet(**cfg).set_memory_efficient(True)


def test_compiled_training_step_has_no_graph_break_and_equals_eager():
    """One SGD step of a compiled memory-efficient DenseNet-BC (CPU C kernels, channels_last,
    dropout) against the same step in eager mode: one graph holding both blocks, no graph
    break. The compiler is dynamo + AOTAutograd (``aot_eager``), which trace the custom
    operators through their fakes and registered backward; inductor's code generation is left
    to the GPU script (a cold CPU inductor build costs about a minute here)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    eager = tiny(drop_rate=0.1)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(3, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2])
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    counters.clear()
    compiled = torch.compile(compiled_model, backend=backend)
    losses = []
    for model, opt in zip((eager, compiled), opts, strict=True):
        torch.manual_seed(1)  # the same dropout masks
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert dict(counters["graph_break"]) == {}
    assert len(graphs) == 1  # one graph: no block left out of it, nothing skipped
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    block_ops = [t for t in targets if "densenets.dense_block" in str(t)]
    assert len(block_ops) == 2, targets
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(eager.buffers(), compiled_model.buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-8)


def _block_args(kernels: str, channels_last: bool, bottleneck: bool):
    torch.manual_seed(0)
    block = tiny(bottleneck=bottleneck).features.denseblock1
    x = torch.randn(2, 7, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = dispatch._params(block)
    b = block.layers[0].conv1.out_channels if bottleneck else 0
    return (x, params, block.growth_rate, b, [0.0] * len(block.layers), 1e-5, 1e-5,
            channels_last, kernels)


KERNELS = [
    pytest.param("native", marks=pytest.mark.skipif(
        dispatch.backend() != "native", reason="no C compiler: the C kernels cannot be built")),
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not dispatch._triton_importable(), reason="Triton is not installed")),
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(("channels_last", "bottleneck"), [(True, True), (False, False)])
def test_custom_op_fakes_match_the_kernels(monkeypatch, kernels, channels_last, bottleneck):
    """torch.library.opcheck: schema, fake shapes/strides/dtypes against the real outputs and
    the registered autograd, for the C kernels, PyTorch operations and the Triton kernels
    (through the interpreter); AOT dispatch is exercised by the compiled step above."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = _block_args(kernels, channels_last, bottleneck)
    torch.library.opcheck(torch.ops.densenets.dense_block.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
