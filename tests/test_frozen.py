"""Frozen modules that keep less for backward: the same numbers bit for bit, and really less kept."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.activations import GEGLU
from torch import nn

from benchmarks.memory_model import kept_for_backward
from data.demo_models import tiny_sd_unet
from lightning_modules.backbones import Engine, StableDiffusion
from lightning_modules.engine.frozen import FrozenConv2d, FrozenGEGLU, keep_less_for_backward, keeps_projection


def _run(unet, latents, context):
    """-> (output, context gradient, autograd node names, bytes kept for backward beside the weights)."""
    context = context.clone().requires_grad_()
    with kept_for_backward(unet) as kept:
        out = unet(latents, 10, encoder_hidden_states=context).sample
    nodes, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    out.square().sum().backward()
    return out.detach(), context.grad, nodes, sum(kept.values())


@pytest.mark.parametrize("memory_format, kept_plain", [(torch.contiguous_format, 14_190_400), (torch.channels_last, 14_759_744)])
def test_lean_modules_give_the_same_gradients_bit_for_bit_and_keep_less(memory_format, kept_plain):
    torch.manual_seed(0)
    plain = tiny_sd_unet().requires_grad_(False).to(memory_format=memory_format)
    lean = copy.deepcopy(plain)
    assert keep_less_for_backward(lean) == 97 + 16
    assert sum(type(m) is FrozenConv2d for m in lean.modules()) == 97
    assert sum(type(m) is FrozenGEGLU for m in lean.modules()) == 16
    latents = torch.randn(2, 4, 16, 16).contiguous(memory_format=memory_format)
    context = torch.randn(2, 7, plain.config.cross_attention_dim)
    out, grad, nodes, kept = _run(plain, latents, context)
    lean_out, lean_grad, lean_nodes, lean_kept = _run(lean, latents, context)
    assert torch.equal(out, lean_out) and torch.equal(grad, lean_grad)
    names = [type(node).__name__ for node in nodes]
    lean_names = [type(node).__name__ for node in lean_nodes]
    assert names.count("ConvolutionBackward0") == lean_names.count("_InputGradConv2dBackward") > 0
    assert "ConvolutionBackward0" not in lean_names
    # The wide levels replay their projection, the narrow ones (projection no larger than its weight) keep it.
    replayed, kept_projection = lean_names.count("_ReplayedGEGLUBackward"), lean_names.count("_KeptGEGLUBackward")
    assert (names.count("GeluBackward0"), replayed, kept_projection) == (16, 10, 6)
    assert (kept, lean_kept) == (kept_plain, 7_327_552)  # bytes beside the weights: 48-50 % less


def test_geglu_keeps_only_its_input_and_matches_autograd():
    torch.manual_seed(0)
    plain = GEGLU(6, 5).requires_grad_(False)
    holder = nn.Sequential(copy.deepcopy(plain))  # the modules of a model are replaced, not the model itself
    assert keep_less_for_backward(holder) == 1
    lean = holder[0]
    assert type(lean) is FrozenGEGLU
    x = torch.randn(3, 4, 6, requires_grad=True)
    grads, kept = [], []
    for module in (plain, lean):
        x.grad = None
        weight, shapes = module.proj.weight.untyped_storage()._cdata, []

        def pack(t):
            if t.untyped_storage()._cdata != weight:  # the projection's own weight is kept either way
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x.grad.clone()))
        kept.append(shapes)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert kept[1] == [(3, 4, 6)]  # the input only: backward replays the projection
    assert kept[0] == [(3, 4, 5)] * 3  # autograd keeps a and gate (the projection) and gelu(gate)
    with torch.no_grad():
        assert torch.equal(lean(x), plain(x))


def test_a_geglu_whose_projection_is_no_larger_than_its_weight_keeps_it_and_matches_autograd():
    torch.manual_seed(5)
    plain = GEGLU(6, 5).requires_grad_(False)
    lean = FrozenGEGLU.of(copy.deepcopy(plain))
    results = []
    for tokens, kept_shape, node in [(6, (1, 6, 10), "_KeptGEGLUBackward"), (7, (1, 7, 6), "_ReplayedGEGLUBackward")]:
        x = torch.randn(1, tokens, 6)
        for module in (plain, lean):
            leaf = x.clone().requires_grad_()
            shapes = []

            def pack(t):
                if t.untyped_storage()._cdata != module.proj.weight.untyped_storage()._cdata:
                    shapes.append(tuple(t.shape))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = module(leaf)
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            results.append((out.detach(), leaf.grad, shapes, type(out.grad_fn).__name__))
        (out, grad, _, _), (lean_out, lean_grad, lean_shapes, lean_node) = results[-2:]
        assert torch.equal(out, lean_out) and torch.equal(grad, lean_grad)
        # 6 tokens x 10 outputs <= the weight's 6 x 10: the projection is kept; 7 tokens: only the input.
        assert (lean_shapes, lean_node) == ([kept_shape], node)


def test_only_a_cpu_keeps_a_projection_and_only_one_no_larger_than_its_weight():
    proj = nn.Linear(6, 10)
    assert keeps_projection(torch.empty(1, 6, 6), proj) and not keeps_projection(torch.empty(1, 7, 6), proj)
    assert not keeps_projection(torch.empty(1, 6, 6, device="meta"), proj)  # any other device replays


def test_a_convolution_whose_weight_trains_keeps_the_plain_backward():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3, padding=1)
    holder = nn.Sequential(copy.deepcopy(plain))
    assert keep_less_for_backward(holder) == 1
    lean = holder[0]
    assert type(lean) is FrozenConv2d
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    for module in (plain, lean):
        module(x).sum().backward()
    assert lean.weight.grad is not None and torch.equal(lean.weight.grad, plain.weight.grad)
    lean.weight.requires_grad_(False)
    lean.bias.requires_grad_(False)
    x.grad = None
    lean(x).sum().backward()
    assert torch.equal(x.grad, torch.autograd.grad(plain(x).sum(), x)[0])


@pytest.mark.parametrize("compile_unet", [False, True])
def test_the_backbone_uses_them_unless_the_unet_is_compiled(tiny_sd_path, compile_unet):
    backbone = StableDiffusion(str(tiny_sd_path), local_files_only=True, engine=Engine(compile_unet=compile_unet))
    backbone.load()
    kinds = {type(m) for m in backbone.unet.modules()}
    assert (FrozenConv2d in kinds) is not compile_unet
    assert (nn.Conv2d in kinds) is compile_unet
    assert all(type(m) is nn.Conv2d for m in backbone.vae.modules() if isinstance(m, nn.Conv2d))


def test_the_replacements_hold_the_same_parameter_objects_under_the_same_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(GEGLU(4, 2)))
    before = dict(model.named_parameters())
    assert keep_less_for_backward(model) == 2
    assert (type(model[0]), type(model[1][0])) == (FrozenConv2d, FrozenGEGLU)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
