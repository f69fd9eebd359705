"""Fused CPU kernels for the memory-efficient dense block, compiled on first use.

On CPU the block's elementwise passes are bound by memory bandwidth; the C kernels in
``cpu_kernels.c`` do in one pass what takes PyTorch three to six. They are built with
the system C compiler into a per-user cache the first time a float32/float64 CPU block trains,
and loaded with ctypes (no PyTorch headers, about a second to build). Without a compiler, or
with ``DENSENETS_NATIVE=0``, :mod:`densenets.efficient.passes` uses PyTorch operations instead:
same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]
# Tried in order: compilers without OpenMP or -march=native (Apple clang, say) still get a build.
_EXTRA_FLAGS = [["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_lib: ctypes.CDLL | None = None
_tried = False

_i64, _int, _dbl, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_SIGNATURES = {
    "bn_relu": [_i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _int],
    "bn_relu_backward": [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr,
                         _i64, _int, _ptr, _ptr, _int],
    "col_normalise": [_i64, _i64, _ptr, _i64, _ptr, _i64, _dbl, _ptr, _ptr, _ptr, _ptr, _i64,
                      _ptr, _ptr, _ptr, _i64, _int],
    "bn_backward": [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "bn_input_grad": [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64,
                      _int],
}


def _cache_dir() -> Path:
    root = os.environ.get("DENSENETS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "densenets"


def _build_key(compiler: str) -> str:
    """Source, flags, compiler and CPU: -march=native code must not move to another CPU."""
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join([compiler, *_BASE_FLAGS, platform.machine()]).encode())
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        h.update(next((ln for ln in cpu.splitlines() if ln.startswith("flags")), "").encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    target = _cache_dir() / f"efficient_kernels_{_build_key(compiler)}.so"
    if target.exists():
        return target
    errors = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a half-written
        # file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        errors.append(str(e))
    else:
        for extra in _EXTRA_FLAGS:
            cmd = [compiler, *_BASE_FLAGS, *extra, str(_SOURCE), "-o", tmp, "-lm"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                os.replace(tmp, target)
                return target
            except subprocess.CalledProcessError as e:
                errors.append((e.stderr or b"").decode(errors="replace").strip()[:200])
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
                break
        Path(tmp).unlink(missing_ok=True)
    warnings.warn("densenets: could not build the fused CPU kernels, using PyTorch operations "
                  f"instead ({compiler}: {errors[-1] if errors else 'no output'})", stacklevel=3)
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built or is switched off."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("DENSENETS_NATIVE", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"densenets: could not load the fused CPU kernels ({e})", stacklevel=2)
        return None
    for name, args in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, None
    _lib = lib
    return _lib


def usable(t: torch.Tensor) -> bool:
    """True when the fused kernels can run on tensors like ``t`` (CPU, float32 or float64)."""
    return t.device.type == "cpu" and t.dtype in _SUFFIX and library() is not None


def _fn(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{_SUFFIX[dtype]}")


def _mat(t: torch.Tensor) -> tuple[int, int]:
    """(pointer, leading dimension) of a row-major matrix view with unit column stride."""
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"expected a row-major matrix view, got strides {t.stride()}")
    return t.data_ptr(), t.stride(0)


def _vec(t: torch.Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()


def _stats(mean: torch.Tensor | None, invstd: torch.Tensor | None) -> tuple:
    """The (mu, sd) pointers of channels normalised on load; (NULL, NULL) for stored ones."""
    return (None, None) if mean is None else (_vec(mean), _vec(invstd))


# ``x`` below is normalised channels: stored, or raw with their ``mean`` and ``invstd`` (then
# normalised as they are read, to the values col_normalise would have stored).


def bn_relu(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
            mean: torch.Tensor | None = None, invstd: torch.Tensor | None = None
            ) -> torch.Tensor:
    """out = relu(x * g + b)."""
    m, c = x.shape
    _fn("bn_relu", x.dtype)(m, c, *_mat(x), *_stats(mean, invstd), _vec(g), _vec(b),
                            *_mat(out), torch.get_num_threads())
    return out


def bn_relu_backward(da, x, g, b, g_sum, accumulate: bool, mean=None, invstd=None):
    """(dgamma, dbeta) of relu(x * g + b) given da; g_sum (+)= g * dy."""
    m, c = x.shape
    dgamma, dbeta = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    _fn("bn_relu_backward", x.dtype)(m, c, *_mat(da), *_mat(x), *_stats(mean, invstd),
                                     _vec(g), _vec(b), *_mat(g_sum), int(accumulate),
                                     _vec(dgamma), _vec(dbeta), torch.get_num_threads())
    return dgamma, dbeta


def col_normalise(src: torch.Tensor, dst: torch.Tensor | None, eps: float, mean: torch.Tensor,
                  var: torch.Tensor, invstd: torch.Tensor, copy: torch.Tensor | None = None,
                  relu: tuple | None = None) -> None:
    """dst = (src - mean) * invstd per column (None: statistics only), writing the mean, biased
    var and invstd. Also writes ``copy`` = src and, with relu = (g, b, out), out = relu(dst * g
    + b) in the same pass."""
    m, k = src.shape
    copy_ptr, ldc = _mat(copy) if copy is not None else (None, 0)
    dst_ptr, ldd = _mat(dst) if dst is not None else (None, 0)
    if relu is not None:
        g, b, out = relu
        relu_args = (_vec(g), _vec(b), *_mat(out))
    else:
        relu_args = (None, None, None, 0)
    _fn("col_normalise", src.dtype)(m, k, *_mat(src), dst_ptr, ldd, float(eps), _vec(mean),
                                    _vec(var), _vec(invstd), copy_ptr, ldc, *relu_args,
                                    torch.get_num_threads())


def bn_backward(dh: torch.Tensor, z: torch.Tensor, g, b, invstd):
    """In place: dh becomes dL/dz of relu(z * g + b) with z normalised; returns (dgamma, dbeta)."""
    m, c = z.shape
    dgamma, dbeta = torch.empty(c, dtype=z.dtype), torch.empty(c, dtype=z.dtype)
    _fn("bn_backward", z.dtype)(m, c, *_mat(dh), *_mat(z), _vec(g), _vec(b), _vec(invstd),
                                _vec(dgamma), _vec(dbeta), torch.get_num_threads())
    return dgamma, dbeta


def bn_input_grad(g_sum, x, invstd, grad_direct, out, mean=None):
    """out = grad_direct + invstd * (G - mean(G) - x * mean(G * x)), means over G's rows (x
    raw with its ``mean`` when given: normalised on load with ``invstd``)."""
    m, k = x.shape
    mu = None if mean is None else _vec(mean)
    _fn("bn_input_grad", x.dtype)(m, k, *_mat(g_sum), *_mat(x), mu, _vec(invstd),
                                  *_mat(grad_direct), *_mat(out), torch.get_num_threads())
    return out
