"""The demo's numbers before and after the move of the equivariance transform onto kornia.

The literals were computed once with the hand-written ``affine_grid`` code this project had before
(commit bab3d99), on the demo's configuration: the tiny SD model, 100 tokens, 32 px maps, sigma 1,
two 128 px synthetic birds, step generator (0, 0, 0, 0). kornia's float32 warp moved them by at most
4e-8 (maps) and 1e-7 (keypoints); the bound asked for is 1e-6. The keypoint literals were computed
again the same way (bab3d99's ``warp``/``unwarp``/``sample``) when extraction moved to one generator
per image and augmentation, ``seeded_generator(0, 1, b, i)``; kornia's warp differs by 1.8e-7.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.augmentation import PhotometricAugmentation, unwarp
from lightning_modules.keypoints import augmented_keypoints
from lightning_modules.app.seeding import seeded_generator
from tests.conftest import tiny_module

TRANSFORMED_MAPS = [0.009714998304843903, 0.010097509250044823, 0.012178708799183369, 0.010870687663555145, 0.011304158717393875, 0.010234556160867214, 0.011642658151686192, 0.010421400889754295, 0.010039353743195534, 0.010891687124967575, 0.010641207918524742, 0.010489780455827713]
UNWARPED_SELECTED = [0.010451954789459705, 0.010848663747310638, 0.011282609775662422, 0.0, 0.015116646885871887, 0.009136791341006756, 0.011856443248689175, 0.01080600917339325, 0.014237740077078342, 0.012530490756034851, 0.011857462115585804, 0.0]
LOSS, LOSS_LOC, LOSS_EQUIV = 0.32084834575653076, 0.003015691414475441, 1.9279203115729615e-05
TOKENS = [[0, 28, 39, 82, 37, 56, 25, 6, 55, 81], [25, 55, 19, 54, 22, 18, 0, 12, 26, 21]]
KEYPOINTS = [0.8007792234420776, 0.9570350646972656, 0.15275904536247253, 0.9089705348014832, 0.07812078297138214, 0.1757800281047821, 0.22264210879802704, 0.12094523012638092, 0.16049538552761078, 0.48827290534973145, 0.9882937073707581, 0.9804700016975403, 0.8241966962814331, 0.8630560636520386, 0.15221130847930908, 0.8867071866989136, 0.4414091110229492, 0.2695753276348114, 0.8398327827453613, 0.011712219566106796, 0.9882814288139343, 0.4179675579071045, 0.9882879257202148, 0.9882940649986267, 0.03507305681705475, 0.5269390344619751, 0.05052363872528076, 0.30853772163391113, 0.9882933497428894, 0.6913803815841675, 0.44922319054603577, 0.6289050579071045, 0.6523407101631165, 0.7070296406745911, 0.06849826872348785, 0.9872336387634277, 0.0664953887462616, 0.36332228779792786, 0.41797226667404175, 0.11320891976356506]


@pytest.fixture(scope="module")
def demo(tiny_sd_path, cub_root):
    module = tiny_module(tiny_sd_path, num_tokens=100, feature_upsample_res=32, top_k=10, furthest_point_num_samples=25)
    # Read with PIL directly, so that changes to the data pipeline do not move these numbers.
    names = [line.split()[1] for line in (cub_root / "images.txt").read_text().splitlines()[:2]]
    pixels = []
    for name in names:
        with Image.open(cub_root / "images" / name) as image:
            resized = image.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR)
        pixels.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1))
    return module, torch.stack(pixels)


def _samples(values: torch.Tensor, seed: int) -> list[float]:
    index = torch.randint(0, values.numel(), (12,), generator=torch.Generator().manual_seed(seed))
    return values.flatten()[index].tolist()


@torch.no_grad()
@pytest.mark.parametrize("photometric", [None, PhotometricAugmentation()])
def test_demo_step_maps_and_losses_match_the_affine_grid_code(demo, photometric):
    module, images = demo
    module.photometric = photometric  # off either way: no draw, no change
    maps, transform = module.equivariance_pair(images, seeded_generator(0, 0, 0, 0))
    out = module.losses(maps[:2], maps[2:], transform)
    assert out["tokens"].tolist() == TOKENS
    torch.testing.assert_close(torch.tensor(_samples(maps[2:], 5)), torch.tensor(TRANSFORMED_MAPS), rtol=0, atol=1e-6)
    back = unwarp(maps[2:][torch.arange(2)[:, None], out["tokens"]], transform)
    torch.testing.assert_close(torch.tensor(_samples(back, 6)), torch.tensor(UNWARPED_SELECTED), rtol=0, atol=1e-6)
    for name, expected in (("loss", LOSS), ("loss_loc", LOSS_LOC), ("loss_equiv", LOSS_EQUIV)):
        assert abs(out[name].item() - expected) <= 1e-6, name


@torch.no_grad()
def test_demo_step_with_photometric_moves_the_transformed_maps(demo):
    module, images = demo
    module.photometric = PhotometricAugmentation(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5)
    try:
        maps, transform = module.equivariance_pair(images, seeded_generator(0, 0, 0, 0))
    finally:
        module.photometric = None
    assert (torch.tensor(_samples(maps[2:], 5)) - torch.tensor(TRANSFORMED_MAPS)).abs().max() > 1e-6


@torch.no_grad()
def test_demo_keypoints_match_the_affine_grid_code(demo):
    module, images = demo
    generators = [seeded_generator(0, 1, b, i) for b in range(2) for i in range(3)]
    tokens = torch.tensor(TOKENS[0])
    keypoints = augmented_keypoints(module.maps_of, images, tokens, module.augmentation, 3, generators,
                                    soft_argmax_window_px=5)
    torch.testing.assert_close(keypoints.flatten(), torch.tensor(KEYPOINTS), rtol=0, atol=1e-6)
