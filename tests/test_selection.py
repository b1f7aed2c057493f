"""Token ranking and furthest point sampling on hand-built maps and points."""

from __future__ import annotations

import math

import torch

from lightning_modules.selection import (
    argmax_pixels,
    entropy_scores,
    furthest_point_sampling,
    gaussian_kl_scores,
    gaussian_maps,
    rank_candidates,
    select_tokens,
)


def test_furthest_point_sampling_on_hand_placed_points():
    # Corners of a square, its centre and a point near one corner.
    points = torch.tensor([[[5.0, 5.0], [0.0, 0.0], [10.0, 10.0], [0.0, 10.0], [10.0, 0.0], [1.0, 1.0]]])
    chosen = furthest_point_sampling(points, 5)[0].tolist()
    # The first furthest pair in row-major order is (1, 2) (the diagonal, tied with (3, 4)).
    assert chosen[:2] == [1, 2]
    # Then the other two corners (distance 10 to the chosen set), then the centre (7.07).
    assert sorted(chosen[2:4]) == [3, 4]
    assert chosen[4] == 0


def test_furthest_point_sampling_is_per_image():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [9.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [8.0, 0.0], [9.0, 0.0]])
    chosen = furthest_point_sampling(torch.stack([a, b]), 3)
    assert chosen[0].tolist() == [0, 2, 1]
    assert chosen[1].tolist() == [0, 2, 1]


def test_argmax_pixels_is_x_then_y():
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2, 5] = 1  # row 2 (y), column 5 (x)
    assert argmax_pixels(maps)[0, 0].tolist() == [5, 2]


def test_gaussian_maps_peak_at_pixel_centres():
    g = gaussian_maps(torch.tensor([[3, 1]]), 8, sigma_px=1.0)[0]
    assert g[1, 3] == 1.0
    assert math.isclose(g[1, 4].item(), math.exp(-0.5), rel_tol=1e-6)
    assert math.isclose(g[2, 4].item(), math.exp(-1.0), rel_tol=1e-6)
    # kornia renders a PDF normalized over the grid: at a border too, it is exp(-d^2 / 2 sigma^2).
    corner = gaussian_maps(torch.tensor([[0, 7], [5, 2]]), 8, sigma_px=2.0)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    for (x, y), g in zip([(0, 7), (5, 2)], corner):
        torch.testing.assert_close(g, torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 8), rtol=0, atol=1e-6)


def test_gaussian_kl_score_by_hand():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 2] = 2.0
    target = gaussian_maps(torch.tensor([[2, 1]]), 4, 2.0).flatten() + 1e-5
    target = target / target.sum()
    p = torch.softmax(maps.flatten(), dim=0)
    expected = (target * (target.log() - p.log())).sum()
    torch.testing.assert_close(gaussian_kl_scores(maps, sigma_px=2.0)[0, 0], expected)


def test_ranking_prefers_sharp_maps():
    size = 16
    sharp = gaussian_maps(torch.tensor([[4, 9]]), size, 1.0)[0] * 10
    flat = torch.ones(size, size)
    maps = torch.stack([flat, sharp, flat * 0.5])[None]
    assert rank_candidates(maps, "gaussian", 1, 1.0).item() == 1
    assert rank_candidates(maps, "entropy", 1, 1.0).item() == 1
    assert entropy_scores(maps)[0, 0] > entropy_scores(maps)[0, 1]
    assert rank_candidates(maps, "consistent", 2, 1.0).tolist() == [[0, 1]]


def test_select_tokens_spreads_over_distinct_blobs():
    size = 16
    centres = [(2, 2), (2, 13), (13, 2), (13, 13), (3, 2)]
    maps = torch.stack([gaussian_maps(torch.tensor([c]), size, 1.0)[0] * 10 for c in centres])[None]
    tokens = select_tokens(maps, top_k=4, num_candidates=5, method="gaussian", sigma_px=1.0)[0]
    # Token 4 duplicates token 0's location: furthest point sampling keeps the four corners.
    assert sorted(tokens.tolist()) == [0, 1, 2, 3]
    fps_from_other = select_tokens(maps, 2, 5, "consistent", 1.0, fps_maps=maps.flip(1))
    assert fps_from_other.shape == (1, 2)
