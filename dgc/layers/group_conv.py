"""BN-ReLU followed by a static group convolution (CondenseNet's 3x3), with a native eval path.

Every DenseNet variant (dense, static group, DGC, SG-CNN, DyNet) keeps CondenseNet's 3x3 group
convolution after its replaceable 1x1 conv. oneDNN runs those shapes (8-32 input channels and
2-8 outputs a group, groups 4) at a few GMAC/s at batch 1, so they were a large share of every
DenseNet's inference time, not a DGC cost. In eager CPU float32 inference this module runs the
BN-ReLU and the group conv as one call of the DGC layer's native kernel (every sample keeping
its group's channels) wherever that is timed faster for the input shape (``KernelChoice``, as
the DGC layers choose); elsewhere (training, grad enabled, other devices and dtypes, hooks) it
is the ``nn.Sequential`` of its three modules, with their names and ``state_dict`` keys.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch import nn

from dgc.layers import native
from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.norm import eval_affine
from dgc.layers.norm import hooked
from dgc.layers.plan_cache import PlanCache
from dgc.layers.tracing import record_group_conv_eval
from dgc.layers.tracing import tracing


class PreactGroupConv2d(nn.Sequential):
    """``nn.Sequential(BatchNorm2d(C), ReLU, Conv2d(C, O, k, stride, padding, groups))``.

    A TorchScript trace or ``torch.export`` of the eval module records one call to
    ``torch.ops.dgc.preact_group_conv_eval`` (``dgc.layers.shipped``), which runs this eager
    forward; ``ship_op = False`` records the three torch modules instead.
    """

    sealed = False  # as DynamicGroupConv2d.sealed (``dgc.program.seal``)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                      bias=False),
        )  # fmt: skip
        self.ship_op = True
        self.kernels = KernelChoice()  # "native" or "torch", per input shape
        self.plans = PlanCache()  # native plans per input shape

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        if not (self.training or torch.is_grad_enabled() or tracing()):
            y = self._forward_native(x)  # (B, O, H', W'), or None where torch's kernels run
            if y is not None:
                return y
        elif not self.training and self.ship_op and tracing() and self._plain(x):
            bn, _, conv = self._modules.values()
            assert isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)  # _plain
            return record_group_conv_eval(bn, conv, x)  # (B, O, H', W'), one recorded operator
        return super().forward(x)  # (B, O, H', W')

    def forward_into(self, x: Tensor, out: Tensor) -> None:
        """``out.copy_(self(x))`` in eval without grad (``out``: a channel slice of a DenseNet
        stage's features); the native kernel writes into ``out`` directly where it runs."""
        if hooked(self) or torch.is_grad_enabled():
            out.copy_(self(x))
        elif self._forward_native(x, out) is None:
            out.copy_(self(x))

    def _forward_native(self, x: Tensor, out: Tensor | None = None) -> Tensor | None:
        if not self._call_plain(x):
            return None  # a trace records dgc's operator (forward), not a ctypes call
        weight = self._modules["2"]._parameters["weight"]  # the conv's, without __getattr__
        assert weight is not None
        if not native.supported(x, weight, 1):
            return None  # not float32 on the CPU, a dispatch mode, or no library
        key = (tuple(x.shape), x.dtype, x.device)
        name = self.kernels.known(key, ("native", "torch"))
        if name == "torch":
            return None
        plan = self._plan(key, x)
        if name == "native":
            return plan(x, out)  # (B, O, H', W')
        kernels = {"native": lambda: plan(x), "torch": lambda: nn.Sequential.forward(self, x)}
        y = self.kernels.run(key, kernels, "native")  # a new shape: both timed
        return y if out is None else out.copy_(y)

    def _call_plain(self, x: Tensor) -> bool:
        """Whether this call may run natively: eval, not traced, ``_plain``; for a sealed
        module (``dgc.program.seal``), whose modules cannot change, only not under autocast."""
        if self.sealed:
            return not torch.is_autocast_enabled(x.device.type)
        return not (self.training or tracing()) and self._plain(x)

    def _plain(self, x: Tensor) -> bool:
        """Whether the native call (or dgc's operator) computes this forward: a 4-d input, an
        eval BatchNorm2d with running statistics, a plain ReLU and zero-padded conv without
        bias or dilation, no hooks on them, no autocast."""
        bn, act, conv = self._modules.values()
        if hooked(bn, act, conv):
            return False
        if not (isinstance(bn, nn.BatchNorm2d) and type(act) is nn.ReLU):
            return False
        if bn.training or bn.running_mean is None or type(conv) is not nn.Conv2d:
            return False
        plain = conv.bias is None and conv.padding_mode == "zeros" and conv.dilation == (1, 1)
        square = conv.stride[0] == conv.stride[1] and conv.padding in {(p, p) for p in range(8)}
        square = square and conv.kernel_size[0] == conv.kernel_size[1] <= 7
        shaped = x.dim() == 4 and x.shape[1] == conv.in_channels
        return plain and square and shaped and not torch.is_autocast_enabled(x.device.type)

    def _plan(self, key: tuple, x: Tensor) -> native.GroupConvPlan:
        """The native plan for ``key``, rebuilt when a parameter or buffer it reads changed."""
        bn, _, conv = self._modules.values()

        def build() -> native.GroupConvPlan:
            assert isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)  # _plain
            with torch.no_grad():
                rows = native.group_rows(conv.weight, conv.groups)
                norm = eval_affine(bn)
            padding = conv.padding
            assert not isinstance(padding, str)  # _plain: (p, p)
            geometry = (conv.stride[0], padding[0], conv.groups)
            k, o = conv.kernel_size[0], conv.out_channels
            return native.GroupConvPlan(tuple(x.shape), norm, rows, o, k, geometry)

        def sources() -> list[Tensor | None]:
            return [conv._parameters["weight"], *bn._parameters.values(), *bn._buffers.values()]

        plan = self.plans.get(key, sources, build, sealed=self.sealed)
        assert plan is not None
        return plan
