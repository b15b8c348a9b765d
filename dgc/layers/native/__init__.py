"""The DGC layer's direct-convolution inference kernel (``direct_conv.c``), built on first use.

The C source ships with the package and is compiled once per machine with the system C
compiler (``$CC``, else ``cc``; ``FLAGS``, else ``PORTABLE_FLAGS``) into ``$DGC_NATIVE_DIR``
(default ``~/.cache/dgc-search``),
then loaded with ctypes. The library's name carries a hash of the source, the flags and the
CPU's feature flags, so an edited source or a different CPU (a shared home directory across
a cluster) gets its own build; it is written to a temporary name and renamed into place, so
concurrent Ray workers never load a half-written file.

Nothing depends on it: where there is no compiler, the build fails or ``DGC_NATIVE=0`` is set,
``library()`` returns None (the reason is logged once) and the layer keeps its torch kernels.
OpenMP comes from the ``libgomp.so.1`` that PyTorch has already loaded (same soname), so both
share one thread pool; ``threads`` is torch's intra-op thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from dgc.layers import gathered as G

SOURCE = Path(__file__).with_name("direct_conv.c")
FLAGS = (
    "-O3",
    "-march=native",
    "-funroll-loops",
    "-fopenmp",
    "-pthread",
    "-shared",
    "-fPIC",
    "-std=gnu99",
)
# Where those fail (a compiler without OpenMP or -march=native, e.g. Apple clang): one thread,
# generic vector code. The pragmas are then ignored.
PORTABLE_FLAGS = ("-O3", "-funroll-loops", "-pthread", "-shared", "-fPIC", "-std=gnu99")
BUILD_TIMEOUT_S = 120
_log = logging.getLogger(__name__)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Plan(ctypes.Structure):
    """direct_conv.c's ``FusedPlan``."""

    _fields_ = [(name, _PTR) for name in "bn_a bn_c fc1 fc2t b2 weight ep_a ep_c".split()]
    _fields_ += [(name, _I64) for name in "B C H W r heads n O k stride pad Ho Wo xc".split()]
    _fields_ += [(name, ctypes.c_int32) for name in ("mask", "threads", "ep_relu")]


def cache_dir() -> Path:
    return Path(os.environ.get("DGC_NATIVE_DIR") or Path.home() / ".cache" / "dgc-search")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be had (reason logged once)."""
    if os.environ.get("DGC_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        _log.warning("dgc: native direct-conv kernel unavailable, torch kernels only: %s", e)
        return None
    lib.dgc_direct_conv.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]
    lib.dgc_direct_conv.argtypes += [_I64, _I64, _I64, _I64, _PTR, _I64, _I64, ctypes.c_int]
    lib.dgc_direct_conv.restype = ctypes.c_int
    lib.dgc_fused_eval.argtypes = [ctypes.POINTER(_Plan), _PTR, _PTR, _PTR]
    lib.dgc_fused_eval.restype = ctypes.c_int
    lib.dgc_wgrad_weight.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]
    lib.dgc_wgrad_weight.argtypes += [_I64, _I64, _I64, _I64, _I64, _I64, _PTR, ctypes.c_int]
    lib.dgc_wgrad_weight.restype = ctypes.c_int
    lib.dgc_select.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_int]
    lib.dgc_select.restype = ctypes.c_int
    lib.dgc_igrad_planes.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64]
    lib.dgc_igrad_planes.argtypes += [_PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _I64]
    lib.dgc_igrad_planes.argtypes += [ctypes.c_int]
    lib.dgc_igrad_planes.restype = ctypes.c_int
    lib.dgc_igrad_fused.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64]
    lib.dgc_igrad_fused.argtypes += [_I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR]
    lib.dgc_igrad_fused.argtypes += [_PTR, ctypes.c_int]
    lib.dgc_igrad_fused.restype = ctypes.c_int
    lib.dgc_group_conv_eval.argtypes = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR]
    lib.dgc_group_conv_eval.argtypes += [_I64, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _I64]
    lib.dgc_group_conv_eval.argtypes += [ctypes.c_int]
    lib.dgc_group_conv_eval.restype = ctypes.c_int
    lib.dgc_bn_relu_train.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_float]
    lib.dgc_bn_relu_train.argtypes += [_PTR, _PTR, _PTR, _PTR, ctypes.c_int]
    lib.dgc_bn_relu_train.restype = ctypes.c_int
    lib.dgc_bn_relu_train_backward.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR]
    lib.dgc_bn_relu_train_backward.argtypes += [_PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int]
    lib.dgc_bn_relu_train_backward.restype = ctypes.c_int
    lib.dgc_avg_pool2.argtypes = [_PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
    lib.dgc_avg_pool2.restype = None
    return lib


def _build() -> Path:
    """Compile (or find the cached build of) the library with the first flag set that works."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)")
    errors = []
    for flags in (FLAGS, PORTABLE_FLAGS):
        try:
            return _build_with(compiler, flags)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _build_with(compiler: str, flags: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *flags, _cpu_flags())).encode()).hexdigest()
    target = cache_dir() / f"direct_conv-{platform.machine()}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, str(SOURCE), "-o", tmp, "-lm"]  # libs after the source
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:1000]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def supported(x: Tensor, weight: Tensor, dilation: int) -> bool:
    """Whether a native kernel may run this call: float32 CPU tensors, dilation 1, a library,
    and no torch dispatch mode active (``FlopCounterMode``, ``torch.export``'s fake tensors:
    a mode sees torch's operators, never a ctypes call)."""
    ok = x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
    ok = ok and dilation == 1 and not is_in_torch_dispatch_mode()
    return ok and library() is not None


def direct_conv(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    rows: Tensor,
    shape: tuple[int, int],
    conv: tuple[int, int, int],
) -> Tensor:
    """The kept-channel convolution of ``gathered.fold_conv`` in one native call.

    Args:
        x: (B, C, H, W) post-BN-ReLU input.
        index: (B, h, K) kept channels per sample and head.
        scale: (B, h, K) what each kept channel is multiplied by.
        rows: the layer's weight (O, C, k, k) as ``gathered.weight_rows(weight, h)``, contiguous.
        shape: (O, k) of that weight.
        conv: (stride, padding, dilation); dilation must be 1.

    Returns:
        (B, O, H', W'), heads interleaved (channel j*h + i is output j of head i).
    """
    lib = library()
    assert lib is not None, "direct_conv called without the native library (check supported)"
    stride, padding, _ = conv
    b, c, h, w = x.shape
    heads, kept = index.shape[1], index.shape[2]
    o, k = shape
    ho, wo = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    x, index, scale = x.contiguous(), index.contiguous(), scale.contiguous()
    y = torch.empty(b, o, ho, wo, dtype=x.dtype)
    status = lib.dgc_direct_conv(
        x.data_ptr(), b, c, h, w, index.data_ptr(), scale.data_ptr(), heads, kept,
        rows.data_ptr(), o, k, stride, padding, y.data_ptr(), ho, wo, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc direct_conv: cannot allocate its scratch buffer")
    return y  # (B, O, H', W')


def select_channels(sal: Tensor, n_inactive: int) -> tuple[Tensor, Tensor]:
    """``gathered.select_channels`` with a native selection in place of torch's top-k: the
    same kept channels and scales (ties at the threshold get scale 0), the kept channels in
    channel order rather than by saliency. ``scale`` carries autograd to ``sal`` (a gather).

    Args:
        sal: (B, h, C) non-negative float32 CPU saliencies; n_inactive: 1 <= n < C.

    Returns:
        index (B, h, K) and scale (B, h, K), K = C - n.
    """
    lib = library()
    assert lib is not None, "select_channels called without the native library"
    b, heads, c = sal.shape
    kept = c - n_inactive
    flat = sal.detach().contiguous()
    index = torch.empty(b, heads, kept, dtype=torch.int64)
    alive = torch.empty(b, heads, kept, dtype=sal.dtype)
    status = lib.dgc_select(
        flat.data_ptr(), b * heads, c, n_inactive, index.data_ptr(), alive.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc select: cannot allocate its scratch buffer")
    return index, sal.gather(-1, index) * alive  # (B, h, K) each


def wgrad_weight(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    grad_out: Tensor,
    shape: tuple[int, int],
    conv: tuple[int, int, int],
) -> Tensor:
    """The weight gradient of ``direct_conv``, in one call, in the weight's row layout.

    Args:
        x, index, scale, shape, conv: as ``direct_conv`` (kernel size 1 or 3).
        grad_out: (B, O, H', W') gradient of its output, heads interleaved.

    Returns:
        (h*C, O/h*k*k), ``gathered.weight_rows``' layout: row (i, c) sums, over the samples
        that keep channel c in head i, the gradient of head i's kernels of channel c (each
        thread into its own accumulator; no per-sample rows are made).
    """
    lib = library()
    assert lib is not None, "wgrad_weight called without the native library (check supported)"
    stride, padding, _ = conv
    b, c, h, w = x.shape
    heads, kept = index.shape[1], index.shape[2]
    o, k = shape
    assert k in (1, 3), f"wgrad_weight: kernel size {k} (1 or 3 only)"
    ho, wo = grad_out.shape[-2:]
    x, index, scale, grad_out = (t.contiguous() for t in (x, index, scale, grad_out))
    grad_rows = torch.empty(heads * c, o // heads * k * k, dtype=x.dtype)
    status = lib.dgc_wgrad_weight(
        x.data_ptr(), b, c, h, w, index.data_ptr(), scale.data_ptr(), heads, kept,
        grad_out.data_ptr(), o, k, stride, padding, ho, wo, grad_rows.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc wgrad_weight: cannot allocate its scratch buffer")
    return grad_rows  # (h*C, O/h*k^2)


def igrad_planes(
    grad_out: Tensor,
    index: Tensor,
    rows: Tensor,
    channels: int,
    k: int,
    padding: int,
    stride: int = 1,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """The input gradient of ``direct_conv`` w.r.t. each kept channel's scaled input plane,
    in one call (the transposed convolution with each channel's own kernels).

    Args:
        grad_out: (B, O, H', W') gradient of its output, heads interleaved.
        index: (B, h, K) kept channels; rows: ``gathered.weight_rows(weight, h)``, contiguous.
        channels: C of the input; k: the (odd) kernel size; padding: at most k - 1.
        stride: the layer's; size: the input's (H, W), needed at stride > 1.

    Returns:
        (B*h*K, H*W): row (b, i, c) is the gradient of sample b's input channel
        ``index[b, i, c]`` as head i scaled it (``index_add`` them, times the scale, into x).
    """
    lib = library()
    assert lib is not None, "igrad_planes called without the native library (check supported)"
    b, o, ho, wo = grad_out.shape
    heads, kept = index.shape[1], index.shape[2]
    if size is None:
        assert stride == 1, "igrad_planes: a strided layer's input size is needed"
        size = (ho + k - 1 - 2 * padding, wo + k - 1 - 2 * padding)
    h, w = size
    grad_out, index = grad_out.contiguous(), index.contiguous()
    planes, ones = _gradient_planes(b, o, heads, grad_out.dtype)
    g_xs = torch.empty(b * heads * kept, h * w, dtype=grad_out.dtype)
    status = lib.dgc_igrad_planes(
        grad_out.data_ptr(), b, o, ho, wo, planes.data_ptr(), ones.data_ptr(), index.data_ptr(),
        heads, kept, rows.data_ptr(), channels, k, padding, stride, g_xs.data_ptr(), h, w,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc igrad_planes: cannot allocate its scratch buffer")
    return g_xs  # (B*h*K, H*W)


def _gradient_planes(b: int, o: int, heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The input-gradient kernels' gather of the output gradient: the plane of (sample b, head
    i, output j) is channel j*heads + i, taken whole (scale 1). Both (B, h, O/h)."""
    planes = torch.arange(o).view(o // heads, heads).t().expand(b, -1, -1).contiguous()
    return planes, torch.ones(planes.shape, dtype=dtype)


def igrad_fused_balances(batch: int) -> bool:
    """Whether ``igrad_fused`` (a sample per thread) keeps every thread busy alike."""
    threads = torch.get_num_threads()
    return batch % threads == 0 or batch >= 4 * threads


def igrad_fused(
    grad_out: Tensor,
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    rows: Tensor,
    k: int,
    padding: int,
    stride: int = 1,
) -> tuple[Tensor, Tensor]:
    """The input and saliency gradients of ``direct_conv`` in one call: what
    ``igrad_planes`` followed by the torch ops of ``gathered_backward`` give (the kept planes'
    gradients times their scale, summed into x's channels; their dot products with the kept
    input planes), without the (B*h*K, H*W) intermediates.

    Args:
        grad_out: (B, O, H', W') gradient of the output, heads interleaved.
        x: (B, C, H, W) the convolved (post-BN-ReLU) input, unscaled.
        index, scale: (B, h, K) kept channels and their scale; rows: as ``direct_conv``.
        k: the (odd) kernel size; padding: at most k - 1; stride: the layer's.

    Returns:
        grad_x (B, C, H, W) and grad_scale (B, h, K).
    """
    lib = library()
    assert lib is not None, "igrad_fused called without the native library (check supported)"
    b, o, ho, wo = grad_out.shape
    c, h, w = x.shape[1:]
    heads, kept = index.shape[1], index.shape[2]
    grad_out, x, index, scale = (t.contiguous() for t in (grad_out, x, index, scale))
    planes, ones = _gradient_planes(b, o, heads, grad_out.dtype)
    grad_x = torch.empty(b, c, h, w, dtype=x.dtype)
    grad_scale = torch.empty(b, heads, kept, dtype=x.dtype)
    status = lib.dgc_igrad_fused(
        grad_out.data_ptr(), b, o, ho, wo, planes.data_ptr(), ones.data_ptr(), index.data_ptr(),
        scale.data_ptr(), heads, kept, rows.data_ptr(), c, k, padding, stride, x.data_ptr(), h, w,
        grad_x.data_ptr(), grad_scale.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc igrad_fused: cannot allocate its scratch buffer")
    return grad_x, grad_scale  # (B, C, H, W), (B, h, K)


def bn_relu_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training BatchNorm (batch statistics) + ReLU of x (B, C, H, W) and the per-plane sums
    of the result, in one call. Returns y (B, C, H, W), zsum (B, C), and the batch mean and
    biased variance (C,). weight, bias: the BN's affine parameters (None: 1 and 0)."""
    lib = library()
    assert lib is not None, "bn_relu_train called without the native library (check supported)"
    x = x.contiguous()
    b, c, h, w = x.shape
    y, zsum = torch.empty_like(x), torch.empty(b, c, dtype=x.dtype)
    mean, var = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    wt, bs = (None if t is None else t.detach().contiguous() for t in (weight, bias))
    status = lib.dgc_bn_relu_train(
        x.data_ptr(), b, c, h * w, _ptr(wt), _ptr(bs), eps, y.data_ptr(), zsum.data_ptr(),
        mean.data_ptr(), var.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc bn_relu_train: cannot allocate its scratch buffer")
    return y, zsum, mean, var


def bn_relu_train_backward(
    grad_y: Tensor,
    grad_zsum: Tensor | None,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``bn_relu_train``'s (y, zsum) w.r.t. x, weight and bias, in two passes
    over x and grad_y. Returns grad_x (B, C, H, W), grad_weight (C,), grad_bias (C,)."""
    lib = library()
    assert lib is not None, "bn_relu_train_backward without the native library"
    b, c, h, w = x.shape
    grad_y, x = grad_y.contiguous(), x.contiguous()
    gz = None if grad_zsum is None else grad_zsum.contiguous()
    wt, bs = (None if t is None else t.detach().contiguous() for t in (weight, bias))
    grad_x = torch.empty_like(x)
    gw, gb = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    status = lib.dgc_bn_relu_train_backward(
        grad_y.data_ptr(), _ptr(gz), x.data_ptr(), b, c, h * w, mean.data_ptr(),
        invstd.data_ptr(), _ptr(wt), _ptr(bs), grad_x.data_ptr(), gw.data_ptr(), gb.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc bn_relu_train_backward: cannot allocate its scratch buffer")
    return grad_x, gw, gb


class FusedPlan:
    """A DGC layer's whole inference forward as one native call, for one input shape.

    The call runs BN-ReLU, channel means, the saliency generators, bottom-n deactivation (ties
    at the threshold go) and the kept-channel convolution, heads interleaved. The plan holds
    the sizes and the (contiguous) parameter tensors, so that a call only allocates its output:
    build it once per (layer, input shape) and again when a parameter changes.

    Args:
        shape: (B, C, H, W) of the layer's input, before its BN-ReLU.
        norm: the BN-ReLU as per-channel (scale, shift), or None (no norm, no ReLU).
        gate: the generators' (fc1 (h, r, C), fc2 (h, C, r), fc2 bias (h, C)).
        n_inactive: channels deactivated per head, 1 <= n < C.
        mask: kept channels multiplied by 1 (``saliency="mask"``), else by their saliency.
        weight: (O, C, k, k).
        conv: (stride, padding, dilation); dilation must be 1.
        rows: ``gathered.weight_rows(weight, heads)`` where the caller keeps it (else made here).
        epilogue: what follows the convolution in the same call, (scale, shift, relu): every
            output v of channel o becomes ``scale[o] * v + shift[o]`` (the eval BN after the
            layer; both None: none), plus the call's residual where given, then ReLU where
            ``relu``. None: the convolution's output as is.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        norm: tuple[Tensor, Tensor] | None,
        gate: tuple[Tensor, Tensor, Tensor],
        n_inactive: int,
        mask: bool,
        weight: Tensor,
        conv: tuple[int, int, int],
        rows: Tensor | None = None,
        epilogue: tuple[Tensor | None, Tensor | None, bool] | None = None,
    ) -> None:
        lib = library()
        assert lib is not None, "FusedPlan without the native library (check supported)"
        self._call = lib.dgc_fused_eval
        stride, padding, _ = conv
        b, c, h, w = shape
        fc1, fc2, b2 = (t.detach() for t in gate)
        fc1, fc2t, b2 = fc1.contiguous(), fc2.transpose(1, 2).contiguous(), b2.contiguous()
        o, k = weight.shape[0], weight.shape[-1]
        if rows is None:
            rows = G.weight_rows(weight.detach(), fc1.shape[0])
        weight = rows.contiguous()
        a, d = (None, None) if norm is None else (t.detach().contiguous() for t in norm)
        ho, wo = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
        self.out_shape = (b, o, ho, wo)
        ea, ec, relu = epilogue or (None, None, False)
        ea, ec = (None if t is None else t.detach().contiguous() for t in (ea, ec))
        self._keep = (fc1, fc2t, b2, weight, a, d, ea, ec)  # the plan points into these
        self._plan = _Plan(
            _ptr(a), _ptr(d), fc1.data_ptr(), fc2t.data_ptr(), b2.data_ptr(), weight.data_ptr(),
            _ptr(ea), _ptr(ec),
            b, c, h, w, fc1.shape[1], fc1.shape[0], n_inactive, o, k, stride, padding, ho, wo,
            c, int(mask), torch.get_num_threads(), int(relu),
        )  # fmt: skip
        self._ref = ctypes.byref(self._plan)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) of the planned shape, float32, CPU; contiguous or a channel slice.
        residual: (B, O, H', W') float32 added in the epilogue, before its ReLU, or None."""
        x, xc = channel_slice(x)
        if residual is not None:
            assert residual.shape == self.out_shape and residual.dtype == torch.float32
            residual = residual.contiguous()
        y = torch.empty(self.out_shape)  # (B, O, H', W')
        threads = torch.get_num_threads()
        if threads != self._plan.threads:
            self._plan.threads = threads
        if xc != self._plan.xc:
            self._plan.xc = xc
        if self._call(self._ref, x.data_ptr(), _ptr(residual), y.data_ptr()) != 0:
            raise MemoryError("dgc fused_eval: cannot allocate its scratch buffer")
        return y  # (B, O, H', W')


def avg_pool2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2, 2)`` of a contiguous float32 CPU (B, C, H, W), bit for bit, in one
    native pass (``dgc_avg_pool2``; the caller checked ``supported``)."""
    b, c, h, w = x.shape
    y = torch.empty(b, c, h // 2, w // 2)  # (B, C, H/2, W/2)
    library().dgc_avg_pool2(x.data_ptr(), y.data_ptr(), b * c, h, w, torch.get_num_threads())
    return y  # (B, C, H/2, W/2)


def channel_slice(x: Tensor) -> tuple[Tensor, int]:
    """x (B, C, H, W) as the eval kernels read it, and the channels a sample spans in memory:
    x itself where it is contiguous or a channel slice of a wider contiguous tensor (a
    DenseNet stage's features, ``buffer[:, :C]``), else a contiguous copy."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x, c
    sb, sc, sh, sw = x.stride()
    if sw == 1 and sh == w and sc == h * w and sb % (h * w) == 0 and sb >= c * h * w:
        return x, sb // (h * w)
    return x.contiguous(), c


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def group_rows(weight: Tensor, groups: int) -> Tensor:
    """A static group convolution's weight (O, C/g, k, k) in ``direct_conv``'s row layout over
    all C = g * C/g input channels, (g*C, O/g*k*k): row i*C + c holds group i's kernels of
    channel c as (O/g, k*k) where c is one of group i's channels, zeros elsewhere (never read)."""
    o, kg, k, _ = weight.shape
    oh, c = o // groups, groups * kg
    own = weight.reshape(groups, oh, kg, k * k).transpose(1, 2)  # (g, C/g, O/g, k*k)
    rows = weight.new_zeros(groups, groups, kg, oh * k * k)
    diagonal = torch.arange(groups)
    rows[diagonal, diagonal] = own.reshape(groups, kg, oh * k * k)
    return rows.reshape(groups * c, oh * k * k)


class GroupConvPlan:
    """An eval BN-ReLU (or none) followed by a static group convolution, as one native call
    for one input shape (``dgc_group_conv_eval``): the DGC kernel with every sample keeping
    its group's channels. Outputs are grouped as ``nn.Conv2d(groups=g)``'s.

    Args:
        shape: (B, C, H, W) of the input.
        norm: the BN-ReLU as per-channel (scale, shift), or None.
        rows: ``group_rows(weight, groups)``; out_channels, k: the weight's O and kernel size.
        conv: (stride, padding, groups).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        norm: tuple[Tensor, Tensor] | None,
        rows: Tensor,
        out_channels: int,
        k: int,
        conv: tuple[int, int, int],
    ) -> None:
        lib = library()
        assert lib is not None, "GroupConvPlan without the native library (check supported)"
        self._call = lib.dgc_group_conv_eval
        stride, padding, groups = conv
        b, c, h, w = shape
        a, d = (None, None) if norm is None else (t.detach().contiguous() for t in norm)
        rows = rows.detach().contiguous()
        ho, wo = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
        self.out_shape = (b, out_channels, ho, wo)
        self._keep = (a, d, rows)  # the call points into these
        self._head = (b, c, h, w, groups, _ptr(a), _ptr(d), rows.data_ptr())
        self._tail = (out_channels, k, stride, padding)

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) of the planned shape, float32, CPU; contiguous or a channel slice.
        out: where to write, (B, O, H', W') contiguous or a channel slice (None: a new tensor)."""
        x, xc = channel_slice(x)
        y = torch.empty(self.out_shape) if out is None else out  # (B, O, H', W')
        y, yc = channel_slice(y)
        if y is not out and out is not None:
            raise ValueError("GroupConvPlan: out must be contiguous or a channel slice")
        ho, wo = self.out_shape[2:]
        status = self._call(
            x.data_ptr(), *self._head, *self._tail, y.data_ptr(), ho, wo, xc, yc,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("dgc group_conv_eval: cannot allocate its scratch buffer")
        return y  # (B, O, H', W')
