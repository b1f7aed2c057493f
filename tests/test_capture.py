"""Attention capture: probabilities, early stop, batching, gradients, layer names."""

from __future__ import annotations

import pytest
import torch

from unittest import mock

from lightning_modules.capture import (
    AttentionCall,
    AttentionCapture,
    cross_attention_layers,
    head_mean_maps,
    replaced_attention_output,
)
from lightning_modules.engine.attention import FastLayerMaps, head_mean_attention
from lightning_modules.backbones import Engine, StableDiffusion
from lightning_modules.app.errors import ConfigError, MissingFileError
from tests.conftest import tiny_module


def _maps(module, images, noise_seed=0):
    latents = module.backbone.encode(images)
    noise = module.backbone.sample_noise(latents, torch.Generator().manual_seed(noise_seed))
    return latents, noise, module.backbone.attention_maps(latents, noise, module.context, 16)


def test_maps_are_per_pixel_probabilities_over_tokens(tiny_sd_module, images):
    _, _, maps = _maps(tiny_sd_module, images)
    assert maps.shape == (2, 40, 16, 16)
    assert maps.min() >= 0
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 16, 16))


def test_batch_of_two_equals_two_batches_of_one(tiny_sd_module, images):
    latents, noise, maps = _maps(tiny_sd_module, images)
    backbone = tiny_sd_module.backbone
    for i in range(2):
        one = backbone.attention_maps({"latents": latents["latents"][i : i + 1]}, {"latents": noise["latents"][i : i + 1]},
                                      tiny_sd_module.context, 16)
        torch.testing.assert_close(one[0], maps[i], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(maps[0], maps[1])  # different images give different maps


def test_early_stop_gives_the_same_maps_as_the_full_forward(tiny_sd_module, tiny_sd_path, images):
    full_module = tiny_module(tiny_sd_path, backbone={"engine": Engine(stop_early=False)})
    full_module.context.data.copy_(tiny_sd_module.context)
    _, _, early = _maps(tiny_sd_module, images)
    _, _, full = _maps(full_module, images)
    assert tiny_sd_module.backbone.applied.released > 0 and full_module.backbone.applied.released == 0
    torch.testing.assert_close(early, full)


def test_capture_leaves_the_unet_output_unchanged(tiny_sd_path):
    backbone = StableDiffusion(str(tiny_sd_path), engine=Engine(stop_early=False))
    backbone.load()
    unet = backbone.unet
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    call = AttentionCall(16)
    with_capture = unet(z, backbone.timestep, encoder_hidden_states=context, cross_attention_kwargs={"call": call}).sample
    assert sorted(call.recorded) == sorted(backbone.layers) and call.total.shape == (1, 16 * 16, 7)
    backbone.capture.remove()
    plain = unet(z, backbone.timestep, encoder_hidden_states=context).sample
    torch.testing.assert_close(with_capture, plain)


def test_gradients_reach_the_context_and_nothing_else(tiny_sd_path, images):
    module = tiny_module(tiny_sd_path, num_tokens=30, top_k=3, furthest_point_num_samples=6, sigma_px=2.0)
    theta = module.augmentation.sample(2, torch.Generator().manual_seed(0))
    maps = module.maps_of(torch.cat([images, images]), torch.Generator().manual_seed(0))
    module.losses(maps[:2], maps[2:], theta)["loss"].backward()
    assert module.context.grad is not None and module.context.grad.abs().sum() > 0
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["context"]
    assert all(p.grad is None for p in module.backbone.parameters())


def test_memory_efficient_head_mean_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 50, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 50, 7, generator=gen, dtype=torch.float64)
    fast = head_mean_attention(q, k, 0.5, memory_efficient=True)
    (fast * weight).sum().backward()
    grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    slow = head_mean_attention(q, k, 0.5, memory_efficient=False)
    (slow * weight).sum().backward()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(grads[0], q.grad)
    torch.testing.assert_close(grads[1], k.grad)
    assert torch.autograd.gradcheck(lambda a, b: head_mean_attention(a, b, 0.5), (q[:1, :, :5].detach().requires_grad_(),
                                                                                k[:1].detach().requires_grad_()))


@pytest.mark.parametrize("layer", ["up_blocks.9.attentions.0.transformer_blocks.0.attn2",
                                   "up_blocks.1.attentions.0.transformer_blocks.0.attn1"])
def test_a_wrong_layer_name_fails_before_the_weights_load_and_lists_the_valid_ones(layer, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    backbone = StableDiffusion(str(tiny_sd_path), layers=[layer])
    with mock.patch.object(UNet2DConditionModel, "from_pretrained", side_effect=AssertionError("weights loaded")):
        with pytest.raises(ConfigError) as err:
            backbone.load()
    message = str(err.value)
    assert layer in message
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2" in message
    assert ("self-attention layers (attn1)" in message) == layer.endswith("attn1")


def test_default_layers_are_cross_attention_layers_7_to_10_counting_from_0(tiny_sd_path):
    backbone = StableDiffusion(str(tiny_sd_path))
    backbone.load()
    order = []
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, module in backbone.unet.named_modules() if name.endswith("attn2")]
    backbone.capture.remove()
    backbone.unet(torch.randn(1, 4, 8, 8), 1, encoder_hidden_states=torch.randn(1, 3, 32))
    for hook in hooks:
        hook.remove()
    assert len(order) == 16
    assert order[7:11] == list(backbone.layers)
    assert cross_attention_layers(backbone.unet) != []


def test_removing_the_capture_restores_the_default_processors(tiny_sd_path):
    backbone = StableDiffusion(str(tiny_sd_path))
    backbone.load()
    before = {k: type(v).__name__ for k, v in backbone.unet.attn_processors.items()}
    assert before[backbone.layers[0] + ".processor"] == "CaptureProcessor"
    backbone.capture.remove()
    assert {type(v).__name__ for v in backbone.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    AttentionCapture(backbone.unet, backbone.layers)  # installs again without complaint


def test_head_mean_backward_is_exact_when_the_loss_reads_few_tokens(monkeypatch):
    """The sparse path of the backward (the training case), over several row blocks, against autograd."""
    import lightning_modules.engine.attention as attention

    monkeypatch.setattr(attention, "_BLOCK_BYTES", 2 * 4 * 64 * 8 * 50)  # 50-row blocks: 6 of them
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 300, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 64, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.zeros(2, 300, 64, dtype=torch.float64)
    weight[0, :, [3, 17]] = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    weight[1, :, [40]] = torch.randn(300, 1, generator=gen, dtype=torch.float64)
    grads = []
    for efficient in (True, False):
        q.grad = k.grad = None
        (head_mean_attention(q, k, 0.3, memory_efficient=efficient) * weight).sum().backward()
        grads.append((q.grad.clone(), k.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_gradient_checkpointing_gives_the_same_gradient(tiny_sd_path, images):
    grads = []
    for checkpointing in (False, True):
        module = tiny_module(tiny_sd_path, backbone={"engine": Engine(gradient_checkpointing=checkpointing)}, num_tokens=30,
                             top_k=3, furthest_point_num_samples=6, sigma_px=2.0)
        theta = module.augmentation.sample(2, torch.Generator().manual_seed(0))
        maps = module.maps_of(torch.cat([images, images]), torch.Generator().manual_seed(0))
        module.losses(maps[:2], maps[2:], theta)["loss"].backward()
        grads.append(module.context.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_replaced_output_is_downsampled_bicubically_as_stablexlkeypoints_did():
    """A 4 x 4 attention output with one 1 at (1, 1), downsampled to 2 x 2 through identity projections.

    Bicubic (a = -0.75, align_corners False) samples source rows 0.5 and 2.5: row weights
    [0.5, 0.59375, -0.09375, 0] and [0, -0.09375, 0.59375, 0.5] (borders clamped), so the (1, 1)
    one-hot gives the outer product of [0.59375, -0.09375]; bilinear would give [[0.25, 0], [0, 0]].
    """
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=2, heads=1, dim_head=2)
    with torch.no_grad():
        attn.to_out[0].weight.copy_(torch.eye(2))
        attn.to_out[0].bias.zero_()
    grid = torch.zeros(1, 4, 4, 2)
    grid[0, 1, 1] = torch.tensor([1.0, -2.0])
    out = replaced_attention_output(attn, grid.reshape(1, 16, 2), side=2, resolution=4)
    expected = torch.tensor([[0.3525390625, -0.0556640625], [-0.0556640625, 0.0087890625]])
    torch.testing.assert_close(out[0, :, 0].view(2, 2), expected)
    torch.testing.assert_close(out[0, :, 1].view(2, 2), -2 * expected)


def test_replace_output_changes_the_maps_of_later_layers_only(tiny_sd_path, images):
    maps = {}
    for replace in (False, True):
        backbone = StableDiffusion(str(tiny_sd_path), layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                                               "up_blocks.1.attentions.1.transformer_blocks.0.attn2"],
                                   replace_output=replace)
        backbone.load()
        latents = backbone.encode(images)
        noise = backbone.sample_noise(latents, torch.Generator().manual_seed(0))
        context = torch.randn(12, 32, generator=torch.Generator().manual_seed(3))
        first = StableDiffusion(str(tiny_sd_path), layers=backbone.layers[:1], replace_output=replace)
        first.load()
        maps[replace] = (first.attention_maps(latents, noise, context, 16), backbone.attention_maps(latents, noise, context, 16))
    torch.testing.assert_close(maps[True][0], maps[False][0])  # the first captured layer sees the plain network
    assert (maps[True][1] - maps[False][1]).abs().max() > 1e-6  # the second sees the replaced output (3e-6 here)


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="no such folder"):
        StableDiffusion(str(tmp_path / "no-such-model"), local_files_only=True).load()


def test_upsampling_queries_equals_upsampling_features(tiny_sd_path, images):
    """Projecting then upsampling (the default) gives StableKeypoints' upsample-then-project maps."""
    maps = []
    for upsample_queries in (True, False):
        backbone = StableDiffusion(str(tiny_sd_path), engine=Engine(upsample_queries=upsample_queries))
        backbone.load()
        latents = backbone.encode(images)
        noise = backbone.sample_noise(latents, torch.Generator().manual_seed(0))
        context = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
        maps.append(backbone.attention_maps(latents, noise, context, 24))
    torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=1e-5)


def test_bicubic_weights_reproduce_interpolate():
    from lightning_modules.engine.attention import bicubic_weights

    grid = torch.randn(3, 5, 7, 7, dtype=torch.float64)
    w = bicubic_weights(7, 20)
    expected = torch.nn.functional.interpolate(grid, size=(20, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(w @ grid @ w.T, expected)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(20, dtype=torch.float64))  # why projecting first is exact


def test_folded_upsampling_matches_autograd_over_several_blocks(monkeypatch):
    import lightning_modules.engine.attention as attention
    from lightning_modules.engine.attention import bicubic_weights

    monkeypatch.setattr(attention, "_BLOCK_BYTES", 2 * 3 * 30 * 8 * 40)  # 40 token rows = 2 image rows
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 36, 4, generator=gen, dtype=torch.float64, requires_grad=True)  # a 6 x 6 grid
    k = torch.randn(2, 3, 30, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = bicubic_weights(6, 20)
    for columns in ([2, 5], list(range(30))):  # the sparse and the dense backward
        weight = torch.zeros(2, 400, 30, dtype=torch.float64)
        weight[..., columns] = torch.randn(2, 400, len(columns), generator=gen, dtype=torch.float64)
        results = []
        for efficient in (True, False):
            q.grad = k.grad = None
            out = head_mean_attention(q, k, 0.4, memory_efficient=efficient, weights=w)
            (out * weight).sum().backward()
            results.append((out.detach(), q.grad.clone(), k.grad.clone()))
        for fast, slow in zip(*results):
            torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize(("memory_efficient", "upsample_queries"), [(True, True), (True, False), (False, True)])
def test_the_engines_maps_equal_the_plain_math_with_their_gradients(tiny_sd_path, memory_efficient, upsample_queries):
    """``engine.attention.FastLayerMaps`` is ``capture.head_mean_maps`` computed faster: same maps, same gradients."""
    backbone = StableDiffusion(str(tiny_sd_path))
    backbone.load()
    attn = backbone.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    hidden = torch.randn(2, 8 * 8, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 30, attn.to_k.in_features, generator=torch.Generator().manual_seed(2))
    weight = torch.rand(2, 24 * 24, 30, generator=torch.Generator().manual_seed(3)) * (torch.arange(30) % 7 == 0)
    results = []
    for layer_maps in (head_mean_maps, FastLayerMaps(memory_efficient, upsample_queries)):
        h, c = hidden.clone().requires_grad_(), context.clone().requires_grad_()
        maps = layer_maps(attn, h, c, 24)
        (maps * weight).sum().backward()
        results.append((maps.detach(), h.grad, c.grad))
    (plain, plain_dh, plain_dc), (fast, fast_dh, fast_dc) = results
    assert plain.shape == (2, 24 * 24, 30)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast_dh, plain_dh, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fast_dc, plain_dc, atol=1e-6, rtol=1e-4)


def test_without_memory_efficient_maps_or_query_upsampling_the_capture_runs_the_plain_math(tiny_sd_path):
    backbone = StableDiffusion(str(tiny_sd_path), engine=Engine(memory_efficient_maps=False, upsample_queries=False))
    backbone.load()
    assert backbone.capture.layer_maps is head_mean_maps
    default = StableDiffusion(str(tiny_sd_path))
    default.load()
    assert isinstance(default.capture.layer_maps, FastLayerMaps)
