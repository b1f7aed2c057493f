"""The VAE encoder's in-place resnet blocks: the same latents bit for bit, from fewer fresh tensors."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode

from data.demo_models import TINY_SD3_VAE, TINY_VAE
from lightning_modules.backbones import StableDiffusion
from lightning_modules.engine.encoder import InPlaceResnet, add_conv_into, encode_in_place


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _encode(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, Counter]:
    with torch.no_grad(), _Ops() as ops:
        latents = vae.encode(images).latent_dist.mean
    return latents, ops.counts


@pytest.mark.parametrize("config, blocks", [(TINY_VAE, 6), (TINY_SD3_VAE, 6)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_in_place_blocks_give_the_same_latents_bit_for_bit(config, blocks, memory_format):
    torch.manual_seed(0)
    plain = AutoencoderKL(**config).eval().to(memory_format=memory_format)
    lean = copy.deepcopy(plain)
    assert encode_in_place(lean) == blocks
    assert sum(type(m) is InPlaceResnet for m in lean.encoder.modules()) == blocks
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).contiguous(memory_format=memory_format)
    expected, plain_ops = _encode(plain, images)
    latents, lean_ops = _encode(lean, images)
    assert torch.equal(latents, expected)
    # Per block: the two SiLUs in place, the second convolution summed into the residual by oneDNN
    # (no add at all), no division by output_scale_factor 1.
    assert (plain_ops["aten.silu"], lean_ops["aten.silu_"]) == (2 * blocks + 1, 2 * blocks)
    assert plain_ops["aten.div"] - lean_ops["aten.div"] == blocks
    assert lean_ops["mkldnn._convolution_pointwise_"] == blocks
    assert plain_ops["aten.add"] - lean_ops["aten.add"] == blocks and lean_ops["aten.add_"] == plain_ops["aten.add_"]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("stride, padding, bias", [(1, 1, True), (2, 0, False), (1, 0, True)])
def test_a_convolution_summed_into_a_tensor_has_the_bits_of_convolution_then_sum(memory_format, stride, padding, bias):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(8, 6, 3 if padding else 1, stride, padding, bias=bias).to(memory_format=memory_format)
    x = torch.randn(2, 8, 17, 17).contiguous(memory_format=memory_format)
    into = torch.randn_like(conv(x))
    expected = conv(x).add_(into)
    target = into.clone()
    result = add_conv_into(target, conv, x)
    assert result.data_ptr() == target.data_ptr()  # written into the tensor given, no fresh one
    assert torch.equal(result, expected)


def test_without_onednn_s_sum_the_convolution_and_the_sum_run_apart_with_the_same_bits():
    """bf16 (like a GPU) takes the plain path: a fresh convolution output, the residual added to it."""
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).bfloat16()
    x, into = torch.randn(1, 4, 9, 9, dtype=torch.bfloat16), torch.randn(1, 4, 9, 9, dtype=torch.bfloat16)
    target = into.clone()
    with _Ops() as ops:
        result = add_conv_into(target, conv, x)
    assert "mkldnn._convolution_pointwise_" not in ops.counts and ops.counts["aten.add_"] == 1
    assert result.data_ptr() != target.data_ptr() and torch.equal(result, conv(x).add_(into))


def test_a_scale_factor_other_than_one_divides_in_place_with_the_same_bits():
    torch.manual_seed(1)
    plain = AutoencoderKL(**TINY_VAE).eval()
    for module in plain.encoder.modules():
        if hasattr(module, "output_scale_factor"):
            module.output_scale_factor = 1.5
    lean = copy.deepcopy(plain)
    encode_in_place(lean)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    (expected, _), (latents, ops) = _encode(plain, images), _encode(lean, images)
    assert torch.equal(latents, expected) and ops["aten.div_"] == 6


def test_with_gradient_the_blocks_are_diffusers_own():
    """A caller differentiating through the encoder gets autograd's gradient, untouched."""
    torch.manual_seed(2)
    plain = AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)
    lean = copy.deepcopy(plain)
    encode_in_place(lean)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    grads = []
    for vae in (plain, lean):
        x = images.clone().requires_grad_()
        vae.encode(x).latent_dist.mean.square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_every_family_encodes_in_place(tiny_sd_path):
    backbone = StableDiffusion(str(tiny_sd_path))
    backbone.load()
    assert sum(type(m) is InPlaceResnet for m in backbone.vae.encoder.modules()) == 6
