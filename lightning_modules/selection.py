"""Which tokens a training step optimizes: candidate ranking, then furthest point sampling.

All functions take a batch of per-image maps (B, T, R, R) and work on every image at once; none
needs gradients (the selection is a discrete choice made on detached maps).
"""

from __future__ import annotations

from typing import Literal

import torch
from kornia.geometry.subpix import render_gaussian2d
from torch import Tensor

RankingMethod = Literal["gaussian", "entropy", "consistent"]


def argmax_pixels(maps: Tensor) -> Tensor:
    """maps: (..., R, R) -> (..., 2) integer (x, y) pixel indices of each map's maximum."""
    width = maps.shape[-1]
    flat = maps.flatten(-2).argmax(dim=-1)
    return torch.stack([flat % width, flat // width], dim=-1)


def gaussian_maps(pixels: Tensor, size: int, sigma_px: float) -> Tensor:
    """pixels: (..., 2) integer (x, y) pixel indices on a size x size grid -> (..., size, size) Gaussians, peak 1.

    Each Gaussian is centred on its pixel's centre (continuous coordinate index + 0.5) and is
    exp(-d^2 / (2 sigma^2)), not normalized: the localization target of docs/method.md section 4. kornia's
    ``render_gaussian2d`` draws it as a PDF (sum 1 over the grid); centred on a pixel, the PDF's
    maximum is its value at the centre, so dividing by it gives the peak-1 Gaussian (to float32
    rounding, 1e-7).
    """
    mean = pixels.float()
    pdf = render_gaussian2d(mean, torch.full_like(mean, sigma_px), (size, size), normalized_coordinates=False)
    return pdf / pdf.amax(dim=(-2, -1), keepdim=True)


def gaussian_kl_scores(maps: Tensor, sigma_px: float, eps: float = 1e-5) -> Tensor:
    """maps: (B, T, R, R) -> (B, T) KL(G || softmax(A)): low when a token's map is one sharp blob.

    G is a Gaussian at the token's argmax (sigma in pixels of the R grid), plus ``eps`` and
    normalized to sum 1; softmax(A) is the spatial softmax of the map at temperature 1.
    """
    size = maps.shape[-1]
    target = gaussian_maps(argmax_pixels(maps), size, sigma_px).flatten(-2) + eps
    target = target / target.sum(dim=-1, keepdim=True)
    log_p = torch.log_softmax(maps.flatten(-2).float(), dim=-1)
    return (target * (target.log() - log_p)).sum(dim=-1)


def entropy_scores(maps: Tensor) -> Tensor:
    """maps: (B, T, R, R) -> (B, T) entropy of each map's spatial softmax."""
    log_p = torch.log_softmax(maps.flatten(-2).float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def rank_candidates(maps: Tensor, method: RankingMethod, num_candidates: int, sigma_px: float) -> Tensor:
    """maps: (B, T, R, R) -> (B, num_candidates) token indices, best first."""
    batch, tokens = maps.shape[:2]
    if num_candidates > tokens:
        raise ValueError(f"furthest_point_num_samples={num_candidates} exceeds num_tokens={tokens}.")
    if method == "consistent":
        return torch.arange(num_candidates, device=maps.device).expand(batch, -1)
    if method == "gaussian":
        scores = gaussian_kl_scores(maps, sigma_px)
    elif method == "entropy":
        scores = entropy_scores(maps)
    else:
        raise ValueError(f"Unknown token ranking {method!r}: use 'gaussian', 'entropy' or 'consistent'.")
    return scores.topk(num_candidates, dim=-1, largest=False).indices


def furthest_point_sampling(points: Tensor, k: int) -> Tensor:
    """points: (B, N, 2) -> (B, k) indices into N, spread out by furthest point sampling.

    Starts with the pair furthest apart (the first such pair in row-major order), then repeatedly
    adds the point whose distance to the chosen set is largest (ties: the lowest index).
    """
    batch, num = points.shape[:2]
    if not 2 <= k <= num:
        raise ValueError(f"Furthest point sampling needs 2 <= top_k <= candidates, got top_k={k}, candidates={num}.")
    dist = torch.cdist(points.float(), points.float())  # (B, N, N)
    first = dist.flatten(1).argmax(dim=1)
    chosen = [first // num, first % num]
    rows = torch.arange(batch, device=points.device)
    min_dist = torch.minimum(dist[rows, chosen[0]], dist[rows, chosen[1]])  # (B, N)
    for _ in range(k - 2):
        taken = torch.stack(chosen, dim=1)
        min_dist = min_dist.scatter(1, taken, -1.0)
        nxt = min_dist.argmax(dim=1)
        chosen.append(nxt)
        min_dist = torch.minimum(min_dist, dist[rows, nxt])
    return torch.stack(chosen, dim=1)


@torch.no_grad()
def select_tokens(
    maps: Tensor,
    top_k: int,
    num_candidates: int,
    method: RankingMethod = "gaussian",
    sigma_px: float = 2.0,
    fps_maps: Tensor | None = None,
) -> Tensor:
    """maps: (B, T, R, R) -> (B, top_k) token indices per image: rank, then furthest point sampling.

    ``fps_maps`` (same shape) supplies the argmax locations for the sampling step when they should
    come from other maps than the ranking (StableKeypoints used the augmented image's maps).
    """
    candidates = rank_candidates(maps, method, num_candidates, sigma_px)  # (B, C)
    source = maps if fps_maps is None else fps_maps
    rows = torch.arange(maps.shape[0], device=maps.device)[:, None]
    locations = argmax_pixels(source[rows, candidates]).float()  # (B, C, 2)
    picked = furthest_point_sampling(locations, top_k)
    return candidates.gather(1, picked)
