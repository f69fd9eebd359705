"""The Triton kernels of the memory-efficient block, run on the CPU by Triton's interpreter.

Each kernel against a float64 reference on shapes that miss every tile size (odd M, C not a
multiple of 16, k = 5, prefix views with a row stride wider than the view), then whole models
training through the kernels against the plain model, and the backend selection.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import rel

from densenets import DenseNet
from densenets.efficient import dispatch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from densenets.efficient import triton_kernels  # noqa: E402  (needs triton)

pytestmark = pytest.mark.usefixtures("one_thread")

M, C, N, K = 37, 21, 20, 5  # rows, prefix channels, bottleneck width, growth rate
EPS = 1e-5


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter; the kernel module is (re)loaded for it on first use."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from densenets.efficient import triton_passes

    return triton_passes


def prefix(seed: int, dtype=torch.float32) -> torch.Tensor:
    """A [M, C] prefix view of a wider buffer (row stride C + K), like a layer's input."""
    torch.manual_seed(seed)
    return (torch.randn(M, C + K) * 2 + 0.5).to(dtype)[:, :C]


def stats64(x: torch.Tensor):
    x = x.double()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return mean, var, (var + EPS).rsqrt()


def affine(c: int, seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(c), torch.randn(c)


def f32(*ts):
    return [t.float().contiguous() for t in ts]


def test_batch_stats_and_copy(interpret):
    x = prefix(0)
    out = torch.zeros(M, C + 3)[:, 1:1 + C]
    mean, var, inv = (torch.empty(C) for _ in range(3))
    interpret.batch_stats(x, EPS, mean, var, inv, copy_to=out)
    ref = stats64(x)
    assert torch.equal(out, x)
    for got, want in zip((mean, var, inv), ref, strict=True):
        assert rel(got, want) < 1e-6


def test_bn_relu_gemm_forward_with_bn2_statistics(interpret):
    x = prefix(1)
    mean, _, inv = stats64(x)
    g, b = affine(C)
    torch.manual_seed(2)
    w = torch.randn(N, C)
    z = torch.empty(M, N)
    parts = interpret.gemm_bn_relu(x, *f32(mean, inv), g, b, w, z, stats=True)
    a = torch.relu((x.double() - mean) * inv * g.double() + b.double())
    z_ref = a @ w.double().t()
    assert rel(z, z_ref) < 1e-6
    m2, v2, i2 = (torch.empty(N) for _ in range(3))
    interpret.finalize(parts, M, EPS, m2, v2, i2)
    for got, want in zip((m2, v2, i2), stats64(z_ref), strict=True):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("gemm", [True, False])
@pytest.mark.parametrize("accumulate", [True, False])
def test_bn_relu_backward_epilogue(interpret, gemm, accumulate):
    """g_sum (+)= gamma * dL/dy and (dgamma, dbeta) of a = relu(BN1(x)), da from the GEMM."""
    x = prefix(3)
    mean, _, inv = stats64(x)
    g, b = affine(C, 4)
    torch.manual_seed(5)
    w, dz, da = torch.randn(N, C), torch.randn(M, N), torch.randn(M, C)
    g_sum0 = torch.randn(M, C + 2)
    g_sum = g_sum0.clone()
    dg, db = interpret.gemm_bn_relu_dgrad(dz if gemm else None, w if gemm else None,
                                          None if gemm else da, x, *f32(mean, inv), g, b,
                                          g_sum[:, :C], accumulate)
    xhat = (x.double() - mean) * inv
    da_ref = dz.double() @ w.double() if gemm else da.double()
    dy = da_ref * (xhat * g.double() + b.double() > 0)
    g_ref = g_sum0[:, :C].double() * accumulate + g.double() * dy
    assert rel(g_sum[:, :C], g_ref) < 1e-6
    assert torch.equal(g_sum[:, C:], g_sum0[:, C:])  # columns past the view untouched
    assert rel(dg, (dy * xhat).sum(0)) < 1e-5
    assert rel(db, dy.sum(0)) < 1e-5


@pytest.mark.parametrize("split", [1, 3])
def test_weight_gradient_gemm(interpret, split):
    x = prefix(6)
    mean, _, inv = stats64(x)
    g, b = affine(C, 7)
    torch.manual_seed(8)
    dz = torch.randn(M, N)
    dw = interpret.gemm_bn_relu_wgrad(dz, x, *f32(mean, inv), g, b, split=split)
    a = torch.relu((x.double() - mean) * inv * g.double() + b.double())
    assert rel(dw, dz.double().t() @ a) < 1e-6


def test_bn2_relu_apply_and_backward(interpret):
    """hidden = relu(BN2(z)) and its backward (batch statistics) against float64 autograd."""
    torch.manual_seed(9)
    z = torch.randn(M, N) * 3 + 1
    g, b = affine(N, 10)
    mean, var, inv = stats64(z)
    hidden = interpret.bn_relu(z, *f32(mean, inv), g, b, torch.empty(M, N))
    z64 = z.double().requires_grad_()
    g64, b64 = g.double().requires_grad_(), b.double().requires_grad_()
    h64 = torch.relu(F.batch_norm(z64, None, None, g64, b64, training=True, eps=EPS))
    assert rel(hidden, h64) < 1e-6
    dh = torch.randn(M, N)
    h64.backward(dh.double())
    dz = torch.empty(M, N)
    dg, db = interpret.bn_relu_backward_full(dh, z, *f32(mean, inv), g, b, dz)
    assert rel(dz, z64.grad) < 1e-5
    assert rel(dg, g64.grad) < 1e-5
    assert rel(db, b64.grad) < 1e-5


def test_input_gradient_of_a_channel_group(interpret):
    """direct + invstd * (G - mean G - xhat * mean(G xhat)): BN1's input gradient summed over
    its readers, against float64 autograd through batch_norm."""
    x = prefix(11)
    mean, _, inv = stats64(x)
    torch.manual_seed(12)
    g_sum, direct = torch.randn(M, C), torch.randn(M, C)
    x64 = x.double().requires_grad_()
    y = F.batch_norm(x64, None, None, training=True, eps=EPS)
    ((y * g_sum.double()).sum() + (x64 * direct.double()).sum()).backward()
    out = interpret.input_grad(g_sum, x, *f32(mean, inv), direct, torch.empty(M, C))
    assert rel(out, x64.grad) < 1e-5


def test_bfloat16_gemm_accumulates_in_float32(interpret):
    x = prefix(13, torch.bfloat16)
    mean, _, inv = stats64(x)
    g, b = affine(C, 14)
    torch.manual_seed(15)
    w = torch.randn(N, C)
    z = torch.empty(M, N, dtype=torch.bfloat16)
    mean, inv = f32(mean, inv)
    interpret.gemm_bn_relu(x, mean, inv, g, b, w, z, stats=False)
    # the prologue: BN-ReLU in float32, rounded to bfloat16 (w too), float32 sums of products
    scale = g * inv
    a = torch.relu(x.float() * scale + (b - mean * scale)).bfloat16()
    z_ref = a.double() @ w.bfloat16().double().t()
    # the interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest):
    # a few units of 2^-8 relative, where a wrong accumulation would be far off
    assert rel(z, z_ref) < 2e-2


# --- 64-bit offsets -----------------------------------------------------------------------------
ROW, LD = 2**20 + 3, 2**12 + 1  # a row and a row stride whose product passes 2^32


def _probe(tile_ptr, row_ptr, row, ld):
    """The kernels' offsets of a [2, 4] tile at ``row`` and of one row (decorated in the test,
    once the interpreter is on; the helpers are read from the module, which is reloaded in
    place for it)."""
    rm = row + tl.arange(0, 2)
    rc = tl.arange(0, 4)
    tl.store(tile_ptr + tl.arange(0, 2)[:, None] * 4 + rc[None, :],
             triton_kernels._offsets(rm, ld, rc))
    tl.store(row_ptr, triton_kernels._wide(row, ld))  # a program index times a row stride


def test_tile_offsets_are_64_bit(interpret):
    """The offsets every load and store goes through, for rows and a stride whose product passes
    2^32 (a block buffer past 2^31 elements), exact as Python integers: int32 arithmetic would
    wrap. Rows are int32 as the tiles make them; no large tensor is needed."""
    assert interpret.kernels(torch.device("cpu")) is triton_kernels
    tile, row = torch.zeros(2, 4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    triton.jit(_probe)[(1,)](tile, row, ROW, LD)
    assert tile.tolist() == [[(ROW + i) * LD + j for j in range(4)] for i in range(2)]
    assert row.item() == ROW * LD > 2**32


def test_launchers_pass_wide_row_strides_whole(interpret, monkeypatch):
    """A row stride past 2^31 reaches every kernel as the same Python integer (which Triton
    types int64), never truncated: each launcher run on meta tensors, whose strides need no
    memory, with its kernel launches recorded instead of run."""
    from types import SimpleNamespace

    launches = []

    class Record:
        def __init__(self, name):
            self.names = getattr(triton_kernels, name).arg_names

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(
                dict(zip(self.names, args, strict=False), **kw))

    names = [n for n in dir(triton_kernels) if hasattr(getattr(triton_kernels, n), "arg_names")]
    stub = SimpleNamespace(INTERPRETED=False, **{n: Record(n) for n in names})
    monkeypatch.setattr(interpret, "kernels", lambda device: stub)
    ld = 2**31 + 16

    def mat(c):
        return torch.empty_strided((5, c), (ld, 1), device="meta")

    def vec(c):
        return torch.empty(c, device="meta")

    stats = [vec(C) for _ in range(5)]  # mean, var, invstd, gamma, beta
    mean, var, inv, g, b = stats
    interpret.batch_stats(mat(C), EPS, mean, var, inv, copy_to=mat(C))
    interpret.bn_relu(mat(C), mean, inv, g, b, mat(C))
    interpret.bn_relu_backward_full(mat(C), mat(C), mean, inv, g, b, mat(C))
    interpret.input_grad(mat(C), mat(C), mean, inv, mat(C), mat(C))
    interpret.gemm_bn_relu(mat(C), mean, inv, g, b, torch.empty(N, C, device="meta"), mat(N),
                           stats=True)
    interpret.gemm_bn_relu_dgrad(mat(N), torch.empty(N, C, device="meta"), None, mat(C), mean,
                                 inv, g, b, mat(C), accumulate=True)
    interpret.gemm_bn_relu_dgrad(None, None, mat(C), mat(C), mean, inv, g, b, mat(C),
                                 accumulate=False)
    interpret.gemm_bn_relu_wgrad(mat(N), mat(C), mean, inv, g, b, split=1)
    strides = [(k, v) for args in launches for k, v in args.items()
               if k.startswith("ld") and not (k == "ldda" and args["GEMM"])]  # da unread
    assert len(strides) == 27  # every row stride of the 11 launches above
    assert all(type(v) is int and v == ld for _, v in strides), strides


def tiny(bottleneck: bool, drop_rate: float = 0.0) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=K, block_config=(2, 3), num_init_features=7, num_classes=4,
                    stem="cifar", bottleneck=bottleneck, compression=0.5, drop_rate=drop_rate)


@pytest.mark.parametrize(("bottleneck", "channels_last", "drop_rate"),
                         [(True, True, 0.2), (False, False, 0.0)])
def test_model_trains_like_plain_through_triton(interpret, monkeypatch, bottleneck,
                                                channels_last, drop_rate):
    """Two SGD steps (momentum) of a memory-efficient model through the Triton kernels against
    the plain model: outputs, every gradient, the parameters and running statistics."""
    monkeypatch.setenv("DENSENETS_KERNELS", "triton")
    assert dispatch.backend("cpu") == "triton"
    plain = tiny(bottleneck, drop_rate)
    efficient = copy.deepcopy(plain).set_memory_efficient(True)
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 9, 9), torch.tensor([0, 1, 2])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, efficient)]
    for step in range(2):
        outs = []
        for model, opt in zip((plain, efficient), opts, strict=True):
            torch.manual_seed(100 + step)  # the same dropout masks in both modes
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            outs.append(out)
        assert rel(outs[1], outs[0]) < 1e-5
        for a, b in zip(efficient.parameters(), plain.parameters(), strict=True):
            assert rel(a.grad, b.grad) < 1e-4
        for opt in opts:
            opt.step()
    for a, b in zip(efficient.state_dict().values(), plain.state_dict().values(), strict=True):
        assert rel(a, b) < 1e-5


def test_bfloat16_autocast_through_triton(interpret, monkeypatch):
    """Under bfloat16 autocast, as close to float64 as the plain model under autocast."""
    monkeypatch.setenv("DENSENETS_KERNELS", "triton")
    plain = tiny(True)
    x = torch.randn(4, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    ref = copy.deepcopy(plain).double()
    F.cross_entropy(ref(x.double()), y).backward()
    ref_grads = [p.grad for p in ref.parameters()]
    errors = {}
    for efficient in (False, True):
        model = copy.deepcopy(plain).set_memory_efficient(efficient)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        errors[efficient] = max(float((p.grad.double() - r).norm() / r.norm())
                                for p, r in zip(model.parameters(), ref_grads, strict=True))
    assert errors[True] < 2 * errors[False] + 0.01, errors


def test_kernels_imported_before_the_setting_are_reloaded_for_the_interpreter(monkeypatch):
    """Triton reads TRITON_INTERPRET when a kernel is decorated: a module imported without it
    is reloaded on first use on a CPU."""
    import importlib

    from densenets.efficient import triton_kernels, triton_passes

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    importlib.reload(triton_kernels)  # decorated for a GPU
    assert not triton_kernels.INTERPRETED
    monkeypatch.setattr(triton_passes, "_module", triton_kernels)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = prefix(16)
    mean, _, inv = stats64(x)
    g, b = affine(C, 17)
    out = triton_passes.bn_relu(x, *f32(mean, inv), g, b, torch.empty(M, C))
    assert triton_passes._module.INTERPRETED
    assert rel(out, torch.relu((x.double() - mean) * inv * g.double() + b.double())) < 1e-6


_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from densenets.efficient import triton_kernels
for name, sig, consts, attrs, options in json.load(sys.stdin):
    attrs = {(int(i),): a for i, a in attrs.items()}
    src = ASTSource(fn=getattr(triton_kernels, name), signature=sig, constexprs=consts,
                    attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    print(name, len(out.asm["cubin"]))
"""


@pytest.mark.parametrize("stride", ["i32", "i64"])
def test_kernels_compile_for_a_gpu(stride):
    """The interpreter accepts code a GPU compiler rejects: build every kernel for sm_90
    (Triton's code generator and its bundled ptxas, no GPU needed), the GEMMs with the tiles the
    launchers pick for DenseNet-121's first block in bfloat16, pointers and sizes 16-aligned as
    a launch specialises them; the row strides as Triton types them below 2^31 and from 2^31 on.
    In a child process without TRITON_INTERPRET: Triton's own library functions are decorated
    for the interpreter when it is on at import, and Triton 3.6 cannot compile through those."""
    import json
    import os
    import subprocess
    import sys

    from densenets.efficient import triton_passes

    data = {"x_ptr", "w_ptr", "z_ptr", "dz_ptr", "da_ptr", "src_ptr", "dst_ptr", "out_ptr",
            "dy_ptr", "direct_ptr"}
    bm, bn, bk = triton_passes._tiles(256 * 56 * 56, 128, 256, torch.bfloat16)
    flags = dict(IEEE=False, UPCAST=False)
    cols = dict(BM=64, BC=64)
    kernels = [("_gemm_bnrelu_fwd", dict(BM=bm, BN=bn, BK=bk, STATS=True, **flags)),
               ("_gemm_bnrelu_dgrad", dict(BM=min(bm, 64), BN=bn, BK=bk, GEMM=True,
                                           ACCUMULATE=True, **flags)),
               ("_gemm_bnrelu_wgrad", dict(BM=min(bm, 64), BN=bn, BK=bk, **flags)),
               ("_col_stats", dict(cols, COPY=True)),
               ("_stats_finalize", dict(TILE=256, BT=64, BC=64)),
               ("_bn_relu_apply", cols),
               ("_bn_bwd_reduce", dict(cols, MASK=True)),
               ("_bn_bwd_apply", dict(cols, MASK=True, DIRECT=True))]
    jobs = []
    for name, consts in kernels:
        params = getattr(triton_kernels, name).arg_names
        sig = {n: "constexpr" if n in consts else ("*bf16" if n in data else "*fp32")
               if n.endswith("_ptr") else "fp32" if n == "eps" else stride if n.startswith("ld")
               else "i32" for n in params}
        aligned = {i: [["tt.divisibility", 16]] for i, n in enumerate(params)
                   if sig[n] not in ("constexpr", "fp32") and n != "rows_per_split"}
        jobs.append((name, sig, consts, aligned,
                     {"num_warps": triton_passes._warps(bm, bn), "num_stages": 3}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = dict(line.split() for line in proc.stdout.splitlines())
    assert sizes.keys() == {name for name, _ in kernels}
    assert all(int(v) > 0 for v in sizes.values()), sizes


# --- selection ---------------------------------------------------------------------------------
def test_forced_triton_fails_loudly(monkeypatch):
    monkeypatch.setenv("DENSENETS_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.backend("cpu")
    model = tiny(True).set_memory_efficient(True)
    with pytest.raises(RuntimeError, match="DENSENETS_KERNELS=triton"):
        model(torch.randn(2, 3, 9, 9))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="float64"):
        dispatch.backend("cpu", torch.float64)
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        dispatch.backend("cuda")
    monkeypatch.setenv("DENSENETS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected one of auto, triton, torch"):
        dispatch.backend("cpu")


def test_a_triton_default_without_triton_warns_once_then_uses_pytorch(monkeypatch):
    """Were the Triton kernels the recorded CUDA default, a machine without Triton would say so
    once and train through PyTorch operations."""
    monkeypatch.delenv("DENSENETS_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "CUDA_DEFAULT", "triton")
    assert dispatch.backend("cuda", torch.bfloat16) == "triton"
    assert dispatch.backend("cuda", torch.float64) == "torch"
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="Triton is not installed"):
        assert dispatch.backend("cuda", torch.bfloat16) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.backend("cuda", torch.bfloat16) == "torch"
