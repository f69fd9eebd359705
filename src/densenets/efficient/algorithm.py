"""The memory-efficient dense block: one forward and one backward loop for every backend.

Every activation of a block is held as a matrix [M, C] (one row per position, M = N x the
spatial positions; one column per channel; see :mod:`.layout`): the block buffer. Layer l
writes its k new channels into its column slice, and its input, the prefix of the block's
channels, is a strided view with no copy, so the bottleneck's 1x1 convolution is a plain matrix
product over that view.

- Every channel's batch mean and variance are computed once, when the channel is produced: in
  training mode all the layers that read a channel normalise the same data, so each layer
  applies only its own affine. With instance norm the statistics are per sample and channel
  (one set per sample's rows, ``Saved.mean`` [N, C]) and are shared the same way.
- BN1-ReLU of the prefix (O(L^2) values over the block) is never stored: backward recomputes it.
  Per layer only the bottleneck output (4k channels) and its statistics are kept.
- BN1's backward is linear in the incoming gradient, so the terms of every layer reading a
  channel are summed first (``g_sum``) and normalised once per channel, when its last reader is
  done.

The loops below order that work and run the growth convolution; the arithmetic over [M, c]
matrices comes from a backend's :class:`Passes`: fused C kernels or PyTorch operations
(:mod:`.passes`), which keep a normalised copy of the block unless memory comes first, or the
Triton kernels (:mod:`.triton_passes`), which keep the raw block and normalise each tile as they
load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from ..constants import accumulation_dtype
from .layout import (
    draws_channels_last,
    dropout_noise,
    growth_conv,
    growth_conv_grads,
    memory_format,
    rows,
    spatial_rank,
    unrows,
)
from .workspace import fresh_scratch, workspace


@dataclass(frozen=True)
class BlockSpec:
    """What the loops need to know about a block beyond its tensors."""

    in_channels: int
    growth_rate: int
    inter_channels: int  # bn_size * k, 0 without a bottleneck
    drop_rates: tuple[float, ...]  # one per layer
    eps1: float
    eps2: float
    compute_dtype: torch.dtype  # activations and convolutions
    channels_last: bool  # the input is channels-last: the output is the block buffer itself
    instance: bool = False  # instance norm: statistics per sample and channel, not per channel
    # Memory before speed (volumes; see layout.MEMORY_FIRST_RANKS): recompute each layer's
    # bottleneck output in backward (one more 1x1 convolution per layer, 4k channels per layer
    # less memory) and free scratch buffers after each pass instead of keeping them for the next.
    memory_first: bool = False

    @property
    def keep_bottleneck(self) -> bool:
        return not self.memory_first

    @property
    def keep_xhat(self) -> bool:
        """Whether backends that keep normalised copies keep one of the block (``xhat``): not
        when memory comes first; then they normalise the raw block, kept as the output, as they
        read it (the same values, one copy of the block less)."""
        return not self.memory_first

    def keeps_raw_block(self, passes: type[Passes]) -> bool:
        """Whether backward reads the raw block rather than a normalised copy."""
        return passes.normalises_on_load or not self.keep_xhat

    @property
    def num_layers(self) -> int:
        return len(self.drop_rates)

    @property
    def bottleneck(self) -> bool:
        return self.inter_channels > 0

    @property
    def out_channels(self) -> int:
        return self.in_channels + self.num_layers * self.growth_rate

    @property
    def acc_dtype(self) -> torch.dtype:
        """Statistics, gradient sums and parameter gradients."""
        return accumulation_dtype(self.compute_dtype)


class LayerParams(NamedTuple):
    """One layer's parameters; the bottleneck's are None without a bottleneck. Flattened
    without the Nones, the layer's parameters in module order."""

    gamma1: Tensor
    beta1: Tensor
    w1: Tensor | None  # the bottleneck's 1x1 convolution [4k, c, 1, ...]
    gamma2: Tensor | None
    beta2: Tensor | None
    w_growth: Tensor  # the growth convolution [k, 4k or c, 3, ...]

    @staticmethod
    def split(params, spec: BlockSpec) -> list[LayerParams]:
        if spec.bottleneck:
            return [LayerParams(*params[6 * i: 6 * i + 6]) for i in range(spec.num_layers)]
        return [LayerParams(g, b, None, None, None, w)
                for g, b, w in (params[3 * i: 3 * i + 3] for i in range(spec.num_layers))]

    def flat(self) -> list[Tensor]:
        return [t for t in self if t is not None]


@dataclass
class Saved:
    """What backward reads, by name. A field a backend does not keep is an empty tensor; the
    statistics are in the accumulation dtype, the rest in the compute dtype."""

    mean: Tensor  # [C] BN1's batch mean of every channel of the block ([N, C]: instance norm)
    var: Tensor  # [C] biased variance (the running statistics take it)
    invstd: Tensor  # [C]
    mean2: Tensor  # [L, 4k] BN2's, per layer (empty without a bottleneck; [L, N, 4k]: instance)
    var2: Tensor
    invstd2: Tensor
    xhat: Tensor  # [M, C] the normalised block (backends that keep normalised copies)
    zhat: Tensor  # [L, M, 4k] the normalised bottleneck outputs (the same backends, when kept)
    block: Tensor  # [M, C] the raw block (backends that normalise on load), unless the output
    #                is the block buffer itself (channels-last): then backward views the output
    z: Tensor  # [L, M, 4k] the raw bottleneck outputs (backends that normalise on load)
    # Dropout: each mask's kept value as F.dropout computed it (1 / (1 - p) in the compute
    # dtype), one per mask, and the masks as booleans [M, c] in the order drawn (a quarter of
    # float32 masks' memory; :func:`_mask` gives backward the float mask back, bit for bit).
    scales: Tensor
    noises: list[Tensor] = field(default_factory=list)

    @staticmethod
    def new(spec: BlockSpec, m: int, device: torch.device, normalises_on_load: bool,
            batch: int) -> Saved:
        """A record with every tensor allocated but ``block``, ``scales`` and ``noises``."""
        c, layers, b = spec.out_channels, spec.num_layers, spec.inter_channels
        cdt, acc = spec.compute_dtype, spec.acc_dtype

        def new(*shape, dtype=acc):
            return torch.empty(shape, dtype=dtype, device=device)

        on_load, none = normalises_on_load, (0,)
        groups = (batch,) if spec.instance else ()  # one set of statistics per sample
        stats2 = (layers, *groups, b) if b else none
        per_layer = (layers, m, b) if b else none
        stats = (*groups, c)
        return Saved(new(*stats), new(*stats), new(*stats), new(*stats2), new(*stats2),
                     new(*stats2),
                     xhat=new(*(none if on_load or not spec.keep_xhat else (m, c)), dtype=cdt),
                     zhat=new(*(none if on_load or not spec.keep_bottleneck else per_layer),
                              dtype=cdt),
                     block=new(*none, dtype=cdt),
                     z=new(*(per_layer if on_load else none), dtype=cdt),
                     scales=new(*none, dtype=cdt))


class Passes(Protocol):
    """A backend's arithmetic over [M, c] matrices, for one block in one step.

    Made with the spec, the record (being filled in forward, read in backward) and the raw block
    [M, C]. Forward makes 1 + 2L calls per block of L layers, backward 3L.
    """

    # True: the passes keep the raw block and bottleneck outputs (``block``, ``z``) and
    # normalise tiles as they load them; False: they keep normalised copies (``xhat``, ``zhat``).
    normalises_on_load: ClassVar[bool]

    def __init__(self, spec: BlockSpec, saved: Saved, block: Tensor) -> None: ...

    def add_channels(self, c: int, new: Tensor | None) -> None:
        """Batch statistics of channels c:c + k, copying ``new`` [M, k] into the block (None:
        the block's input channels, already there)."""

    def conv_input(self, i: int, c: int, p: LayerParams, noise: Tensor | None) -> Tensor:
        """Forward: layer i's growth convolution input [M, 4k or c] from the c channels before
        it; ``noise`` is the bottleneck's dropout mask."""

    def recompute_conv_input(self, i: int, c: int, p: LayerParams,
                             noise: Tensor | None) -> Tensor:
        """Backward: :meth:`conv_input` again from what was saved (``noise`` as there)."""

    def conv_input_backward(self, i: int, c: int, p: LayerParams, dh: Tensor, h: Tensor,
                            g_sum: Tensor, accumulate: bool,
                            noise: Tensor | None) -> LayerParams:
        """Backward of :meth:`conv_input` given dL/dh [M, 4k or c]: the gradients of BN1 (and
        of the bottleneck), w_growth's None; adds gamma1 * dL/d(BN1 output) into g_sum[:, :c]
        (writes it unless ``accumulate``)."""

    def channel_grad(self, c: int, g_sum: Tensor, direct: Tensor, scratch: bool) -> Tensor:
        """dL/d(channels c:c + k) [M, k]: ``direct`` plus BN1's backward of the readers' summed
        ``g_sum`` [M, k] (in a reused buffer if ``scratch``)."""


def forward(passes: type[Passes], spec: BlockSpec, x: Tensor, params) -> tuple[Tensor, Saved]:
    """Training-mode forward of one block: (output, what :func:`backward` reads)."""
    with fresh_scratch(spec.memory_first):
        return _forward(passes, spec, x, params)


def _forward(passes: type[Passes], spec: BlockSpec, x: Tensor, params) -> tuple[Tensor, Saved]:
    n, c0, *spatial = x.shape
    spatial_rank(x.shape)
    m, c_out, k, cdt = x.numel() // c0, spec.out_channels, spec.growth_rate, spec.compute_dtype
    if m // (n if spec.instance else 1) <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    saved = Saved.new(spec, m, x.device, passes.normalises_on_load, n)
    # Returned as the output (channels-last) or kept for backward: a fresh buffer; else scratch.
    raw = spec.keeps_raw_block(passes)
    keep = spec.channels_last or raw
    shape = (n, *spatial, c_out)
    buffer = (torch.empty(shape, dtype=cdt, device=x.device) if keep
              else workspace("out", shape, cdt, x.device))
    buffer[..., :c0].copy_(x.movedim(1, -1))
    block = buffer.view(m, c_out)
    run = passes(spec, saved, block)
    run.add_channels(0, None)
    for i, p in enumerate(LayerParams.split(params, spec)):
        c = c0 + i * k
        drop = spec.drop_rates[i]
        noise = _noise(saved, spec, x, spec.inter_channels, drop) if spec.bottleneck else None
        h = run.conv_input(i, c, p, noise)
        new = rows(growth_conv(unrows(h, n, spatial), p.w_growth.to(cdt)))
        if drop > 0:
            new = new * _noise(saved, spec, x, k, drop)
        run.add_channels(c, new)
    result = unrows(block, n, spatial)
    if not spec.channels_last:
        # always a copy: the buffer is scratch (an all-ones-sized map is contiguous already)
        result = result.clone(memory_format=torch.contiguous_format)
        if raw:
            saved.block = block
    return result, saved


def _noise(saved: Saved, spec: BlockSpec, x: Tensor, channels: int, p: float) -> Tensor | None:
    """A dropout mask [M, channels] drawn now (the plain model's order), kept for backward as
    booleans and its kept value."""
    if p == 0:
        return None
    shape = (x.shape[0], channels, *x.shape[2:])
    # laid out as the plain model's tensor is (the output may differ, see dispatch)
    noise = dropout_noise(shape, p, spec.compute_dtype, x.device, draws_channels_last(x))
    saved.noises.append(noise != 0)
    # the kept value itself (the mask holds 0 or it), so no arithmetic here can differ from
    # F.dropout's; a mask that keeps nothing has no kept value to need
    saved.scales = torch.cat([saved.scales, noise.amax().view(1)])
    return noise


def _mask(saved: Saved, masks: list[Tensor]) -> Tensor:
    """The float mask of the last of ``masks`` (taken off the list), as forward drew it."""
    i = len(masks) - 1
    return masks.pop().to(saved.scales.dtype) * saved.scales[i]


def backward(passes: type[Passes], spec: BlockSpec, grad_out: Tensor, result: Tensor, params,
             saved: Saved) -> tuple[Tensor, list[Tensor]]:
    """(dL/dx, parameter gradients in ``params`` order) of :func:`forward`."""
    with fresh_scratch(spec.memory_first):
        return _backward(passes, spec, grad_out, result, params, saved)


def _backward(passes: type[Passes], spec: BlockSpec, grad_out: Tensor, result: Tensor, params,
              saved: Saved) -> tuple[Tensor, list[Tensor]]:
    n, _, *spatial = result.shape
    c0, k, cdt = spec.in_channels, spec.growth_rate, spec.compute_dtype
    m = result.numel() // spec.out_channels
    raw = spec.keeps_raw_block(passes)
    block = rows(result) if raw and spec.channels_last else saved.block
    run = passes(spec, saved, block)
    grad_out = rows(grad_out.to(cdt))
    # g_sum[:, j] = sum over readers l of gamma1_l[j] * dL/dy1_l[:, j] (y1 = BN1 output)
    g_sum = workspace("g_sum", (m, spec.out_channels), spec.acc_dtype, result.device)
    noises = list(saved.noises)
    layers = LayerParams.split(params, spec)
    grads: list[list[Tensor]] = []
    last = spec.num_layers - 1
    for i in reversed(range(spec.num_layers)):
        c, p = c0 + i * k, layers[i]
        direct = grad_out[:, c:c + k]
        # the last layer's channels have no reader: only the block output's gradient
        d_new = direct if i == last else run.channel_grad(c, g_sum[:, c:c + k], direct, True)
        if spec.drop_rates[i] > 0:
            d_new = d_new * _mask(saved, noises)
        d_new = unrows(d_new.to(cdt).contiguous(), n, spatial)
        noise = _mask(saved, noises) if spec.bottleneck and spec.drop_rates[i] > 0 else None
        h = run.recompute_conv_input(i, c, p, noise)
        dh, dw_growth = growth_conv_grads(d_new, unrows(h, n, spatial), p.w_growth.to(cdt))
        # the last layer reads every earlier channel: it writes g_sum, the others add to it
        g = run.conv_input_backward(i, c, p, rows(dh), h, g_sum, i != last, noise)
        g = g._replace(w_growth=dw_growth)
        grads.append([d.to(t.dtype) for d, t in zip(g.flat(), p.flat(), strict=True)])
    dx = run.channel_grad(0, g_sum[:, :c0], grad_out[:, :c0], False)
    dx = unrows(dx.to(cdt), n, spatial)
    if not spec.channels_last:
        dx = dx.contiguous()
    return dx, [g for layer in reversed(grads) for g in layer]


def fake_forward(passes: type[Passes], spec: BlockSpec, x: Tensor) -> tuple[Tensor, Saved]:
    """Empty tensors shaped, strided and typed as :func:`forward`'s results (for tracing)."""
    n, c0, *spatial = x.shape
    m, cdt, dev = x.numel() // c0, spec.compute_dtype, x.device
    saved = Saved.new(spec, m, dev, passes.normalises_on_load, n)
    if spec.keeps_raw_block(passes) and not spec.channels_last:
        saved.block = torch.empty((m, spec.out_channels), dtype=cdt, device=dev)
    widths = ([spec.inter_channels] if spec.bottleneck else []) + [spec.growth_rate]
    for p in spec.drop_rates:
        if p > 0:  # the masks _noise draws, in its order
            saved.noises += [torch.empty((m, w), dtype=torch.bool, device=dev) for w in widths]
    saved.scales = torch.empty(len(saved.noises), dtype=cdt, device=dev)
    fmt = memory_format(spatial_rank(x.shape), spec.channels_last)
    result = torch.empty((n, spec.out_channels, *spatial), dtype=cdt, device=dev,
                         memory_format=fmt)
    return result, saved
