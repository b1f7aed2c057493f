"""The benchmark metrics of docs/method.md section 7, as torchmetrics ``Metric``s with functional twins.

Every metric takes ``update(preds, target, visible)``: preds and target (B, J, 2) in the project's
point convention ((x, y) normalized to [0, 1], ``data/base.py``), visible (B, J) bool or None (all
visible). Each functional twin returns one value per image (NaN for an image the metric skips), for
tests and plots; the ``Metric`` keeps sums only, so its states reduce over DDP ranks with ``sum``.
Distances are taken in float64 so that sums over a whole test split stay exact to print precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def swap_permutation(num_joints: int, pairs: Sequence[tuple[int, int]]) -> Tensor:
    """-> (num_joints,) long: ``points[..., perm, :]`` exchanges the two joints of every pair.

    Each joint may appear in at most one pair, so the result is a permutation and its own inverse.
    """
    perm = list(range(num_joints))
    seen: set[int] = set()
    for a, b in pairs:
        if a == b:
            raise ValueError(f"Swap pair ({a}, {b}) pairs a joint with itself: leave midline joints out of the list.")
        for joint in (a, b):
            if not 0 <= joint < num_joints:
                raise ValueError(
                    f"Swap pair ({a}, {b}) names joint {joint}, outside the {num_joints} joints: "
                    f"pass pairs of 0-based indices below {num_joints}."
                )
            if joint in seen:
                raise ValueError(
                    f"Joint {joint} appears in more than one swap pair (pair ({a}, {b})): list each left/right pair once, "
                    "otherwise the swap is not a permutation."
                )
            seen.add(joint)
        perm[a], perm[b] = b, a
    return torch.tensor(perm, dtype=torch.long)


def sk_swap_index(num_joints: int, pairs: Sequence[tuple[int, int]]) -> Tensor:
    """-> (num_joints,) long: StableKeypoints' swap (``unsupervised_keypoints/eval.py``, ``swap_points``),
    ``points[..., index, :]``.

    The pairs are assigned in list order, ``index[a] = b`` then ``index[b] = a``, so a joint named in
    two pairs keeps its last assignment and the result need not be a permutation: with SK's
    Human3.6M pairs ``(20, 28), (21, 28)``, joints 20 and 21 both read joint 28, joint 28 reads 21,
    joint 20 is read by none and joint 29 stays in place.
    """
    index = list(range(num_joints))
    for a, b in pairs:
        for joint in (a, b):
            if not 0 <= joint < num_joints:
                raise ValueError(f"Swap pair ({a}, {b}) names joint {joint}, outside the {num_joints} joints: pass 0-based indices.")
        index[a], index[b] = b, a
    return torch.tensor(index, dtype=torch.long)


def swap_index(num_joints: int, pairs: Sequence[tuple[int, int]], protocol: str = "default") -> Tensor:
    """The left/right swap of ``pairs`` as a (num_joints,) index: a permutation (``default``,
    ``swap_permutation``) or StableKeypoints' assignment (``stablekeypoints``, ``sk_swap_index``)."""
    return sk_swap_index(num_joints, pairs) if protocol == "stablekeypoints" else swap_permutation(num_joints, pairs)


def _visible_mask(preds: Tensor, target: Tensor, visible: Tensor | None) -> Tensor:
    """Checks the shapes; -> (B, J) bool, all True when ``visible`` is None."""
    if preds.ndim != 3 or preds.shape[-1] != 2 or preds.shape != target.shape:
        raise ValueError(
            f"preds {tuple(preds.shape)} and target {tuple(target.shape)}: pass both as (B, J, 2) normalized (x, y) points."
        )
    if visible is None:
        return torch.ones(preds.shape[:2], dtype=torch.bool, device=preds.device)
    if visible.shape != preds.shape[:2]:
        raise ValueError(f"visible has shape {tuple(visible.shape)}: pass (B, J) = {tuple(preds.shape[:2])} booleans.")
    return visible.to(device=preds.device, dtype=torch.bool)


def _distances(preds: Tensor, target: Tensor) -> Tensor:
    """preds, target: (B, J, 2) -> (B, J) float64 Euclidean distances in normalized units."""
    return torch.linalg.vector_norm(preds.to(torch.float64) - target.to(torch.float64), dim=-1)


def _visible_sum(distances: Tensor, vis: Tensor) -> Tensor:
    """(B, J), (B, J) -> (B,) sum over visible keypoints; where() keeps a NaN at an invisible one out."""
    return torch.where(vis, distances, torch.zeros_like(distances)).sum(dim=-1)


def _skipped_as_nan(values: Tensor, counted: Tensor) -> Tensor:
    return torch.where(counted, values, torch.full_like(values, float("nan")))


def _normalized_keypoint_error(preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
    vis = _visible_mask(preds, target, visible)
    n_visible = vis.sum(dim=-1)
    per_image = _visible_sum(_distances(preds, target), vis) / n_visible.clamp_min(1) * 100
    return per_image, n_visible > 0


def normalized_keypoint_error(preds: Tensor, target: Tensor, visible: Tensor | None = None) -> Tensor:
    """preds, target: (B, J, 2), visible: (B, J) -> (B,) CUB error: mean distance over visible keypoints x100.

    NaN for an image with no visible keypoint.
    """
    return _skipped_as_nan(*_normalized_keypoint_error(preds, target, visible))


def _inter_ocular_error(
    preds: Tensor, target: Tensor, visible: Tensor | None, left_eye: int, right_eye: int
) -> tuple[Tensor, Tensor]:
    vis = _visible_mask(preds, target, visible)
    num_landmarks = preds.shape[-2]
    if not (0 <= left_eye < num_landmarks and 0 <= right_eye < num_landmarks):
        raise ValueError(
            f"Eye indices ({left_eye}, {right_eye}) outside the {num_landmarks} landmarks: pass the indices of the two eyes."
        )
    eye_distance = _distances(target[:, [left_eye]], target[:, [right_eye]])[:, 0]
    n_visible = vis.sum(dim=-1)
    per_image = _visible_sum(_distances(preds, target), vis) / n_visible.clamp_min(1) / eye_distance * 100
    # The normalizer needs both ground-truth eyes.
    counted = (n_visible > 0) & vis[:, left_eye] & vis[:, right_eye]
    return per_image, counted


def inter_ocular_error(
    preds: Tensor, target: Tensor, visible: Tensor | None = None, left_eye: int = 0, right_eye: int = 1
) -> Tensor:
    """preds, target: (B, J, 2), visible: (B, J) -> (B,) CelebA/MAFL error x100.

    Mean over the (visible) landmarks of ||e - g|| divided by the ground-truth distance between the
    eyes. NaN for an image whose eyes are not both visible or that has no visible landmark.
    """
    return _skipped_as_nan(*_inter_ocular_error(preds, target, visible, left_eye, right_eye))


def _summed_keypoint_error(preds: Tensor, target: Tensor, visible: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    vis = _visible_mask(preds, target, visible)
    per_image = _visible_sum(_distances(preds, target) * scale, vis)
    # An image without visible keypoints scores 0 and still counts, as in the reference (Tai-Chi).
    return per_image, torch.ones_like(per_image, dtype=torch.bool)


def summed_keypoint_error(preds: Tensor, target: Tensor, visible: Tensor | None = None, scale: float = 256.0) -> Tensor:
    """preds, target: (B, J, 2), visible: (B, J) -> (B,) Tai-Chi error: sum of visible distances in ``scale`` px."""
    return _summed_keypoint_error(preds, target, visible, scale)[0]


def _correct_keypoints(
    preds: Tensor, target: Tensor, visible: Tensor | None, scale: float, threshold_px: float
) -> tuple[Tensor, Tensor]:
    vis = _visible_mask(preds, target, visible)
    correct = (_distances(preds, target) * scale < threshold_px) & vis
    return correct.sum(dim=-1), vis.sum(dim=-1)


def percentage_correct_keypoints(
    preds: Tensor, target: Tensor, visible: Tensor | None = None, scale: float = 256.0, threshold_px: float = 6.0
) -> Tensor:
    """preds, target: (B, J, 2), visible: (B, J) -> (B,) DeepFashion PCK per image, in percent.

    A visible keypoint is correct when ||e - g|| x ``scale`` < ``threshold_px`` (strictly). NaN for
    an image with no visible keypoint. ``PercentageCorrectKeypoints`` averages these over images.
    """
    correct, n_visible = _correct_keypoints(preds, target, visible, scale, threshold_px)
    return _skipped_as_nan(correct.to(torch.float64) / n_visible.clamp_min(1) * 100, n_visible > 0)


def _orientation_invariant_error(
    preds: Tensor, target: Tensor, visible: Tensor | None, scale: float, swap: Sequence[tuple[int, int]],
    protocol: str = "default",
) -> tuple[Tensor, Tensor]:
    vis = _visible_mask(preds, target, visible)
    perm = swap_index(preds.shape[-2], swap, protocol).to(preds.device)
    n_visible = vis.sum(dim=-1)

    def mean_visible(distances: Tensor) -> Tensor:
        return _visible_sum(distances, vis) / n_visible.clamp_min(1)

    straight = mean_visible(_distances(preds, target))
    swapped = mean_visible(_distances(preds[:, perm], target))
    return torch.minimum(straight, swapped) * scale, n_visible > 0


def orientation_invariant_error(
    preds: Tensor,
    target: Tensor,
    visible: Tensor | None = None,
    scale: float = 128.0,
    *,
    swap: Sequence[tuple[int, int]],
    protocol: str = "default",
) -> Tensor:
    """preds, target: (B, J, 2), visible: (B, J) -> (B,) Human3.6M error in ``scale`` px.

    ``min(mean ||e - g||, mean ||swap(e) - g||)``: a prediction with left and right exchanged is not
    penalized, since an unsupervised model cannot tell a person's left from right when they turn
    round. NaN for an image with no visible keypoint. ``swap`` is applied as ``swap_index(.., protocol)``.
    """
    return _skipped_as_nan(*_orientation_invariant_error(preds, target, visible, scale, swap, protocol))


class _PerImageMean(Metric):
    """Mean over images of a per-image value; images the value skips do not count.

    Args:
        reads_visibility: ``False`` scores every keypoint whatever ``visible`` says (StableKeypoints'
            ``inter_eye_distance``, ``pck`` and ``orientation_invariant``, ``data.protocol``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, reads_visibility: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reads_visibility = reads_visibility
        self.add_state("value_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> (B,) values and (B,) bool: which images count."""
        raise NotImplementedError

    def per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None = None) -> Tensor:
        """preds, target: (B, J, 2) normalized (x, y) -> (B,) this metric per image (NaN: skipped)."""
        return _skipped_as_nan(*self._per_image(preds, target, visible if self.reads_visibility else None))

    def update(self, preds: Tensor, target: Tensor, visible: Tensor | None = None) -> None:
        """preds, target: (B, J, 2) normalized (x, y); visible: (B, J) bool or None."""
        values, counted = self._per_image(preds, target, visible if self.reads_visibility else None)
        # Selecting the counted images (not nansum) lets a NaN prediction show up in the result;
        # where() rather than boolean indexing avoids a host sync per batch on GPU.
        self.value_sum += torch.where(counted, values, torch.zeros_like(values)).sum()
        self.num_images += counted.sum()

    def compute(self) -> Tensor:
        return self.value_sum / self.num_images


class NormalizedKeypointError(_PerImageMean):
    """CUB: per image, mean distance over visible keypoints in [0, 1] image units x100; mean over images.

    Images with no visible keypoint are skipped.
    """

    def _per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        return _normalized_keypoint_error(preds, target, visible)


class InterOcularError(_PerImageMean):
    """CelebA/MAFL: per image, mean over landmarks of ||e - g|| / inter-ocular distance x100; mean over images.

    Args:
        left_eye, right_eye: indices of the eyes among the landmarks (MAFL order: 0 and 1).
    """

    def __init__(self, left_eye: int = 0, right_eye: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if left_eye == right_eye:
            raise ValueError(f"left_eye and right_eye are both {left_eye}: pass the indices of two different landmarks.")
        self.left_eye = left_eye
        self.right_eye = right_eye

    def _per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        return _inter_ocular_error(preds, target, visible, self.left_eye, self.right_eye)


class SummedKeypointError(_PerImageMean):
    """Tai-Chi: per image, sum over visible keypoints of ||e - g|| in pixels of a ``scale``-px image; mean over images.

    Args:
        scale: side of the image, in pixels, the coordinates are multiplied by.
    """

    def __init__(self, scale: float = 256.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def _per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        return _summed_keypoint_error(preds, target, visible, self.scale)


class OrientationInvariantError(_PerImageMean):
    """Human3.6M: per image, min(mean ||e - g||, mean ||swap(e) - g||) x ``scale``; mean over images.

    Args:
        scale: side of the image, in pixels, the coordinates are multiplied by.
        swap: left/right joint pairs, 0-based; each joint in at most one pair (``default``).
        protocol: ``default`` (the swap is a permutation) or ``stablekeypoints`` (SK's assignment of the
            pairs, ``sk_swap_index``, which allows SK's duplicated joint).
    """

    def __init__(self, swap: Sequence[tuple[int, int]], scale: float = 128.0, protocol: str = "default", **kwargs) -> None:
        super().__init__(**kwargs)
        swap = tuple((int(a), int(b)) for a, b in swap)
        # Reject a malformed list here, where it enters, rather than at the first test batch.
        swap_index(1 + max((max(pair) for pair in swap), default=-1), swap, protocol)
        self.scale = scale
        self.swap = swap
        self.protocol = protocol

    def _per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        return _orientation_invariant_error(preds, target, visible, self.scale, self.swap, self.protocol)


class PercentageCorrectKeypoints(_PerImageMean):
    """DeepFashion PCK, in percent (0-100): per image, the share of its visible keypoints with
    ||e - g|| x ``scale`` < ``threshold_px``; mean over images. Higher is better.

    Averaged per image as StableKeypoints does (``unsupervised_keypoints/eval.py``, ``evaluate``:
    ``(l2 < 6).float().mean()`` per test image, then the mean over images), not pooled over all
    keypoints; the two differ when images have different numbers of visible keypoints. Images
    with no visible keypoint are skipped.

    Args:
        scale: side of the image, in pixels, the coordinates are multiplied by.
        threshold_px: a keypoint closer than this (strictly) is correct.
    """

    higher_is_better = True

    def __init__(self, scale: float = 256.0, threshold_px: float = 6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale
        self.threshold_px = threshold_px

    def _per_image(self, preds: Tensor, target: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        correct, n_visible = _correct_keypoints(preds, target, visible, self.scale, self.threshold_px)
        return correct.to(torch.float64) / n_visible.clamp_min(1) * 100, n_visible > 0
