"""Frozen UNet modules that keep for backward only what their input's gradient needs.

The context's gradient flows back through the frozen UNet, so autograd keeps activations for
backward, and for two common modules it keeps more than that gradient reads:

- a convolution keeps its input, because its derivative formula computes the input's and the
  weight's gradients together, though the input's gradient needs only the weight (SD 1.5 at
  512 px: 0.24 GiB of the 1.41 GiB a training step keeps);
- diffusers' ``GEGLU`` keeps its projection (a, gate) and ``gelu(gate)``: three times the width of the
  feed-forward's hidden layer, twelve times its input's (0.5 GiB).

``keep_less_for_backward`` replaces a frozen model's ``nn.Conv2d`` and ``GEGLU`` modules by
subclasses that keep only the weight, resp. the input. The GEGLU's backward replays its projection
(about 0.12 TFLOP per SD 1.5 step at 512 px, some 2 % of the step's work) and keeps the projection
only while it runs; it is one autograd function rather than ``torch.utils.checkpoint``, which would
also replay the product ``a * gelu(gate)`` that backward does not read. Their gradients are computed
by the same kernels in the same order as autograd's, so they are equal bit for bit (tested); nothing
in torch drops the convolution's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from torch import Tensor, nn


class _InputGradConv2d(torch.autograd.Function):
    """conv2d whose backward gives only the input's gradient, from the weight alone."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.shape, ctx.options = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(ctx.shape, weight, grad, *ctx.options)
        return grad_x, None, None, None, None, None, None


class FrozenConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with frozen weights that keeps no activation for backward."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> FrozenConv2d:
        """The same convolution (the same parameter objects, no copy) as a ``FrozenConv2d``."""
        with torch.device("meta"):
            lean = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                       conv.groups, conv.bias is not None, conv.padding_mode)
        lean.weight, lean.bias = conv.weight, conv.bias
        return lean.train(conv.training)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        needs_input_grad = input.requires_grad and torch.is_grad_enabled()
        plain_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)  # what conv2d_input takes
        if frozen and needs_input_grad and plain_padding:
            return _InputGradConv2d.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def _gated(projected: Tensor, activation) -> Tensor:
    """``a * activation(gate)`` of a projection ``(a, gate)``, written into the activation's tensor (the same
    bits: multiplication commutes in floating point)."""
    a, gate = projected.chunk(2, dim=-1)
    return activation(gate).mul_(a)


def _geglu_gradient_into(projected: Tensor, grad: Tensor, activation) -> Tensor:
    """The gradient of ``a * activation(gate)``, ``(a, gate) = projected``, written over ``projected`` -> ``projected``.

    Every value comes from the kernel autograd uses for it, on the same operands (multiplication
    commutes in floating point): equal bit for bit (tested). Only ``activation(gate)`` is a fresh tensor.
    """
    a, gate = projected.chunk(2, dim=-1)
    activated = activation(gate)
    a.mul_(grad)  # the gradient reaching activation(gate): grad * a
    torch.ops.aten.gelu_backward.grad_input(a, gate, grad_input=gate)  # the gate's gradient, over the gate
    torch.mul(grad, activated, out=a)  # a's gradient, over grad * a
    return projected


class _KeptGEGLU(torch.autograd.Function):
    """``a * activation(gate)`` of a projection ``(a, gate)`` kept for backward, where its gradient is
    written over it (autograd keeps the projection and ``gelu(gate)``, and makes five fresh tensors)."""

    @staticmethod
    def forward(ctx, projected: Tensor, activation) -> Tensor:
        ctx.save_for_backward(projected)
        ctx.activation = activation
        return _gated(projected, activation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (projected,) = ctx.saved_tensors
        return _geglu_gradient_into(projected, grad, ctx.activation), None


class _ReplayedGEGLU(torch.autograd.Function):
    """GEGLU, ``a * gelu(gate)`` of the projection ``(a, gate) = proj(x)``, keeping only ``x`` for backward
    and replaying the projection there, where its gradient is written over it.

    One fresh tensor in forward and two in backward instead of autograd's three and five (SD 1.5's
    64 x 64 layers: 42 to 84 MB each). The projection's weight is frozen: only ``x``'s gradient is
    computed, by autograd's own product for a linear layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, proj: nn.Linear, activation) -> Tensor:
        ctx.save_for_backward(x)
        ctx.proj, ctx.activation = proj, activation
        return _gated(proj(x), activation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            projected = _geglu_gradient_into(ctx.proj(x), grad, ctx.activation)  # replayed, then overwritten
        grad_x = projected.view(-1, projected.shape[-1]).mm(ctx.proj.weight)  # = autograd's linear backward
        return grad_x.view(x.shape), None, None


class FrozenGEGLU(GEGLU):
    """diffusers' ``GEGLU`` that keeps only its input for backward, and replays its projection there."""

    @classmethod
    def of(cls, geglu: GEGLU) -> FrozenGEGLU:
        """The same GEGLU (the same projection module, no copy) as a ``FrozenGEGLU``."""
        proj = geglu.proj
        with torch.device("meta"):
            lean = cls(proj.in_features, proj.out_features // 2, proj.bias is not None)
        lean.proj = proj
        return lean.train(geglu.training)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if not torch.is_grad_enabled():
            return _gated(self.proj(hidden_states), self.gelu)
        frozen = not any(parameter.requires_grad for parameter in self.proj.parameters())
        if not (hidden_states.requires_grad and frozen and hidden_states.is_contiguous()):
            return super().forward(hidden_states, *args, **kwargs)
        if keeps_projection(hidden_states, self.proj):
            return _KeptGEGLU.apply(self.proj(hidden_states), self.gelu)
        return _ReplayedGEGLU.apply(hidden_states, self.proj, self.gelu)


def keeps_projection(hidden_states: Tensor, proj: nn.Linear) -> bool:
    """Whether a frozen GEGLU keeps its projection for backward rather than replaying it there.

    On a CPU, where the product is the cost, a projection (tokens x out) no larger than its weight
    (in x out) is kept: little memory for one product as large as the weight saved (SD 1.5 at 512 px:
    the 16 x 16 and 8 x 8 layers, 0.06 GiB for five 13 GFLOP products a step). On a GPU the product
    costs about 1 % of a step and memory is what runs out: always replayed.
    """
    tokens = hidden_states.numel() // proj.in_features
    return hidden_states.device.type == "cpu" and tokens <= proj.in_features


#: The exact classes replaced (subclasses of them are someone else's modules, left alone).
_LEAN = {nn.Conv2d: FrozenConv2d, GEGLU: FrozenGEGLU}


def keep_less_for_backward(model: nn.Module) -> int:
    """Replaces ``model``'s ``nn.Conv2d`` and ``GEGLU`` modules by ``FrozenConv2d`` / ``FrozenGEGLU``.

    The new modules hold the same parameter objects under the same names; a convolution falls back
    to its plain forward when its own weight requires grad. Returns how many were replaced. Call it
    before anything registers hooks on the modules (``Engine.apply`` does, before the capture).
    """
    lean = [(name, _LEAN[type(module)]) for name, module in model.named_modules() if type(module) in _LEAN]
    for name, cls in lean:
        model.set_submodule(name, cls.of(model.get_submodule(name)))
    return len(lean)
