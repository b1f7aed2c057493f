"""The linear regressor of docs/method.md section 7: discovered keypoints -> ground-truth keypoints.

Points follow the project convention (``data/base.py``): (x, y) normalized to [0, 1]. Both sides
are flattened to ``[x1, y1, x2, y2, ...]`` and centred by subtracting 0.5, and the map has no
intercept: ``Y = X W`` with X (N, 2K), Y (N, 2J), W (2K, 2J). Fitting runs in float64 because the
normal equations square the condition number of X.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_modules.app import files


def _check_points(points: Tensor, name: str) -> None:
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"{name} has shape {tuple(points.shape)}: pass (N, P, 2) normalized (x, y) points.")


def _centred_rows(points: Tensor) -> Tensor:
    """points: (..., P, 2) -> (..., 2P) float64 ``[x1, y1, x2, y2, ...] - 0.5``."""
    return points.flatten(-2).to(torch.float64) - 0.5


def fit_regressor(keypoints: Tensor, targets: Tensor, visible: Tensor | None = None) -> Tensor:
    """keypoints: (N, K, 2), targets: (N, J, 2), visible: (N, J) bool or None -> W: (2K, 2J) float64.

    Least squares without intercept, ``W = pinv(X^T X) X^T Y``. With ``visible``, the two columns
    (x and y) of ground-truth keypoint j are fitted only on the rows where it is visible, so the
    (0, 0) placeholders of invisible keypoints never pull the fit.
    """
    _check_points(keypoints, "keypoints")
    _check_points(targets, "targets")
    if keypoints.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{keypoints.shape[0]} keypoint rows but {targets.shape[0]} target rows: pass one row per regression image to both."
        )
    x = _centred_rows(keypoints)
    y = _centred_rows(targets)
    if visible is None:
        return torch.linalg.pinv(x.T @ x, hermitian=True) @ x.T @ y

    if visible.shape != targets.shape[:2]:
        raise ValueError(f"visible has shape {tuple(visible.shape)}: pass (N, J) = {tuple(targets.shape[:2])} booleans.")
    visible = visible.to(device=x.device, dtype=torch.bool)
    never_seen = (~visible.any(dim=0)).nonzero().flatten().tolist()
    if never_seen:
        raise ValueError(
            f"Ground-truth keypoint(s) {never_seen} are invisible in all {visible.shape[0]} regression images, so their "
            "regressor columns cannot be fitted: use a regression split in which every keypoint is visible at least once."
        )
    weight = x.new_empty(x.shape[1], y.shape[1])
    # Keypoints with the same visibility pattern share one design matrix: with full visibility this
    # is a single solve, the same as the unmasked fit.
    patterns, pattern_of_keypoint = torch.unique(visible.T, dim=0, return_inverse=True)
    for p, rows in enumerate(patterns):
        columns = (pattern_of_keypoint == p).nonzero().flatten()
        columns = torch.stack([2 * columns, 2 * columns + 1], dim=1).flatten()
        x_rows = x[rows]
        weight[:, columns] = torch.linalg.pinv(x_rows.T @ x_rows, hermitian=True) @ x_rows.T @ y[rows][:, columns]
    return weight


def apply_regressor(keypoints: Tensor, weight: Tensor) -> Tensor:
    """keypoints: (..., K, 2), weight: (2K, 2J) -> (..., J, 2) ``(kp - 0.5) W + 0.5`` in the keypoints' dtype."""
    if weight.ndim != 2 or weight.shape[0] != 2 * keypoints.shape[-2] or weight.shape[1] % 2:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} for {keypoints.shape[-2]} keypoints: "
            f"pass the (2K, 2J) = ({2 * keypoints.shape[-2]}, 2J) matrix that fit_regressor returned for these K keypoints."
        )
    out = _centred_rows(keypoints) @ weight.to(device=keypoints.device, dtype=torch.float64) + 0.5
    return out.unflatten(-1, (-1, 2)).to(keypoints.dtype)


def _mean_distances(predictions: Tensor, targets: Tensor, visible: Tensor) -> Tensor:
    """(N, J, 2), (N, J, 2), (N, J) -> (N,) mean distance over each image's visible keypoints."""
    distances = torch.linalg.vector_norm(predictions - targets, dim=-1)
    return torch.where(visible, distances, torch.zeros_like(distances)).sum(-1) / visible.sum(-1).clamp_min(1)


def fit_orientation_invariant_regressor(
    keypoints: Tensor,
    targets: Tensor,
    swap: Tensor,
    visible: Tensor | None = None,
    max_images_left: int = 10,
    max_iterations: int = 100,
    require_involution: bool = True,
) -> tuple[Tensor, Tensor]:
    """keypoints: (N, K, 2), targets: (N, J, 2), swap: (J,) long -> W (2K, 2J) float64 and swapped (N,) bool.

    StableKeypoints' orientation-invariant fit for Human3.6M (``unsupervised_keypoints/
    keypoint_regressor.py``, ``return_regressor_human36m``): an unsupervised detector cannot tell a
    person's left from right when they turn round, so the ground truth of such images is mirrored
    to agree with the others before the final fit. Repeat: fit W (``fit_regressor``); for every
    image, compare the mean distance of its prediction to its ground truth and to the
    left/right-swapped ground truth (``targets[:, swap]``); if more than ``max_images_left``
    images are closer to the swapped one, swap their ground truth and refit; else stop and return
    the last fit (as SK, the at most ``max_images_left`` images still wanting a swap keep theirs).

    Args:
        swap: the left/right permutation of the J joints (``metrics.swap_permutation``); it must be
            its own inverse, so that swapping twice restores an image's ground truth.
        require_involution: ``False`` accepts any (J,) index, such as StableKeypoints' swap
            (``metrics.sk_swap_index``, not a permutation), applied to the current ground truth each time.
        visible: (N, J) bool or None; distances and fits use visible keypoints only (SK's
            Human3.6M has all joints visible, where this changes nothing).
        max_images_left: stop when this many images or fewer still want a swap (SK: 10).
        max_iterations: fits before giving up; SK has no limit and can loop forever when images
            keep trading places. Reaching it warns and returns the last fit.

    Returns:
        W, and which images ended with their ground truth swapped.
    """
    _check_points(targets, "targets")
    swap = torch.as_tensor(swap, dtype=torch.long, device=targets.device)
    inside = swap.shape == (targets.shape[1],) and bool(((swap >= 0) & (swap < len(swap))).all())
    if not inside or (require_involution and not torch.equal(swap[swap], torch.arange(len(swap), device=swap.device))):
        raise ValueError(
            f"swap must be a ({targets.shape[1]},) permutation that is its own inverse: build it with "
            "lightning_modules.metrics.swap_permutation from left/right pairs."
        )
    if max_images_left < 0 or max_iterations < 1:
        raise ValueError(f"max_images_left={max_images_left} and max_iterations={max_iterations}: use >= 0 and >= 1.")
    visible = torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device) if visible is None else visible.bool()
    targets = targets.to(torch.float64)
    swapped = torch.zeros(len(targets), dtype=torch.bool, device=targets.device)
    for _ in range(max_iterations):
        weight = fit_regressor(keypoints, targets, visible)
        predictions = apply_regressor(keypoints.to(torch.float64), weight)
        straight = _mean_distances(predictions, targets, visible)
        mirrored = _mean_distances(predictions, targets[:, swap], visible[:, swap])
        want = straight > mirrored
        if int(want.sum()) <= max_images_left:
            return weight, swapped
        targets = torch.where(want[:, None, None], targets[:, swap], targets)
        visible = torch.where(want[:, None], visible[:, swap], visible)
        swapped ^= want
    warnings.warn(
        f"The orientation-invariant regressor still had more than {max_images_left} images wanting a left/right swap "
        f"after {max_iterations} fits; the last fit is used. Raise max_iterations to let it settle.",
        stacklevel=2,
    )
    return weight, swapped


class LinearKeypointRegressor(nn.Module):
    """The fitted map W: (2K, 2J) float64, kept as a buffer and saved as a small safetensors file.

    The test stage fits it on the regression split (``LinearKeypointRegressor.fit``), scores the
    test split with it, and writes it beside ``metrics.json`` so the numbers can be reproduced.
    """

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] % 2 or weight.shape[1] % 2:
            raise ValueError(f"weight has shape {tuple(weight.shape)}: pass a (2K, 2J) matrix from fit_regressor.")
        self.register_buffer("weight", weight.detach().to(torch.float64))

    @property
    def num_keypoints(self) -> int:
        """K, the discovered keypoints the regressor reads."""
        return self.weight.shape[0] // 2

    @property
    def num_targets(self) -> int:
        """J, the ground-truth keypoints it predicts."""
        return self.weight.shape[1] // 2

    @classmethod
    def fit(cls, keypoints: Tensor, targets: Tensor, visible: Tensor | None = None) -> LinearKeypointRegressor:
        """keypoints: (N, K, 2), targets: (N, J, 2), visible: (N, J) or None -> the fitted regressor."""
        return cls(fit_regressor(keypoints, targets, visible))

    @classmethod
    def fit_orientation_invariant(
        cls, keypoints: Tensor, targets: Tensor, visible: Tensor | None = None, *, swap: Tensor, **kwargs
    ) -> LinearKeypointRegressor:
        """Like ``fit``, with the left/right swaps of ``fit_orientation_invariant_regressor`` (Human3.6M)."""
        weight, _ = fit_orientation_invariant_regressor(keypoints, targets, swap, visible, **kwargs)
        return cls(weight)

    def forward(self, keypoints: Tensor) -> Tensor:
        """keypoints: (..., K, 2) -> (..., J, 2) predicted ground-truth keypoints, normalized (x, y)."""
        return apply_regressor(keypoints, self.weight)

    def save(self, path: str | Path) -> None:
        """Write ``weight`` and its (K, J) to a safetensors file."""
        metadata = {
            "num_keypoints": str(self.num_keypoints),
            "num_targets": str(self.num_targets),
            "convention": "targets = (keypoints - 0.5) @ weight + 0.5, points flattened as [x1, y1, x2, y2, ...], "
            "(x, y) normalized to [0, 1]",
        }
        with files.atomic_file(path) as tmp:
            save_file({"weight": self.weight.detach().cpu().contiguous()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> LinearKeypointRegressor:
        """Read a file written by ``save``; the regressor comes back on the CPU."""
        with safe_open(str(path), framework="pt") as f:
            if "weight" not in f.keys():
                raise ValueError(f"{path} holds no 'weight' tensor: pass a file written by LinearKeypointRegressor.save.")
            weight = f.get_tensor("weight")
            metadata = f.metadata() or {}
        regressor = cls(weight)
        expected = (metadata.get("num_keypoints"), metadata.get("num_targets"))
        if expected != (str(regressor.num_keypoints), str(regressor.num_targets)):
            raise ValueError(
                f"{path}: metadata (K, J) = {expected} does not match the weight's shape {tuple(weight.shape)}; "
                "the file is damaged or was not written by LinearKeypointRegressor.save."
            )
        return regressor
