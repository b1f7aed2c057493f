"""Each metric against a plain NumPy loop over images, accumulation, reset, DDP-style merging."""

from __future__ import annotations


from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum

from data.human36m import H36M_LEFT_RIGHT_SWAP
from lightning_modules.metrics import (
    InterOcularError,
    NormalizedKeypointError,
    OrientationInvariantError,
    PercentageCorrectKeypoints,
    SummedKeypointError,
    inter_ocular_error,
    normalized_keypoint_error,
    orientation_invariant_error,
    percentage_correct_keypoints,
    summed_keypoint_error,
    swap_permutation,
)

# ---- plain NumPy references: one image at a time; NaN marks an image the metric skips ----


def np_normalized(e: np.ndarray, g: np.ndarray, vis: np.ndarray) -> float:
    if not vis.any():
        return float("nan")
    return float(np.linalg.norm(e - g, axis=-1)[vis].mean() * 100)


def np_inter_ocular(e: np.ndarray, g: np.ndarray, vis: np.ndarray) -> float:
    if not (vis.any() and vis[0] and vis[1]):
        return float("nan")
    return float(np.linalg.norm(e - g, axis=-1)[vis].mean() / np.linalg.norm(g[0] - g[1]) * 100)


def np_summed(e: np.ndarray, g: np.ndarray, vis: np.ndarray) -> float:
    return float(np.linalg.norm((e - g) * 256, axis=-1)[vis].sum())


def np_pck(e: np.ndarray, g: np.ndarray, vis: np.ndarray) -> float:
    """Percentage of the image's visible keypoints within 6 px at 256 px."""
    if not vis.any():
        return float("nan")
    correct = np.linalg.norm((e - g) * 256, axis=-1) < 6
    return float(correct[vis].mean() * 100)


def np_orientation_invariant(e: np.ndarray, g: np.ndarray, vis: np.ndarray) -> float:
    if not vis.any():
        return float("nan")
    swapped = e.copy()
    for a, b in H36M_LEFT_RIGHT_SWAP:
        swapped[[a, b]] = e[[b, a]]
    straight = np.linalg.norm(e - g, axis=-1)[vis].mean()
    flipped = np.linalg.norm(swapped - g, axis=-1)[vis].mean()
    return float(min(straight, flipped) * 128)


PerImage = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def human36m_metric(**kwargs) -> OrientationInvariantError:
    """The Human3.6M metric with its skeleton's left/right pairs."""
    return OrientationInvariantError(swap=H36M_LEFT_RIGHT_SWAP, **kwargs)


def human36m_error(preds: torch.Tensor, target: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    return orientation_invariant_error(preds, target, visible, swap=H36M_LEFT_RIGHT_SWAP)

# name: (metric factory, functional twin, NumPy per-image reference, number of keypoints)
PER_IMAGE_METRICS: dict[str, tuple[Callable[[], Metric], Callable, PerImage, int]] = {
    "cub": (NormalizedKeypointError, normalized_keypoint_error, np_normalized, 15),
    "celeba": (InterOcularError, inter_ocular_error, np_inter_ocular, 5),
    "taichi": (SummedKeypointError, summed_keypoint_error, np_summed, 18),
    "human36m": (human36m_metric, human36m_error, np_orientation_invariant, 32),
    "deepfashion": (PercentageCorrectKeypoints, percentage_correct_keypoints, np_pck, 8),
}
PER_IMAGE_METRICS_JOINTS = {make: joints for make, _, _, joints in PER_IMAGE_METRICS.values()}


def random_batches(num_joints: int, seed: int, sizes: tuple[int, ...] = (5, 7, 4)) -> list[tuple[torch.Tensor, ...]]:
    """Batches of (preds, target, visible); a few images with no visible keypoint, invisible GT at (0, 0)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        target = torch.rand(size, num_joints, 2, generator=g)
        preds = (target + 0.05 * torch.randn(size, num_joints, 2, generator=g)).clamp(0, 1)
        visible = torch.rand(size, num_joints, generator=g) < 0.7
        visible[0] = False
        target = torch.where(visible[..., None], target, torch.zeros(()))
        batches.append((preds, target, visible))
    return batches


def images(batches: list[tuple[torch.Tensor, ...]]) -> list[tuple[np.ndarray, ...]]:
    """-> (preds, target, visible) of every image, float64 NumPy."""
    return [
        (e, g, v)
        for preds, target, visible in batches
        for e, g, v in zip(preds.double().numpy(), target.double().numpy(), visible.numpy())
    ]


def numpy_per_image(reference: PerImage, batches: list[tuple[torch.Tensor, ...]]) -> np.ndarray:
    return np.array([reference(*image) for image in images(batches)])


def concatenated(batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*batches))


@pytest.mark.parametrize("name", PER_IMAGE_METRICS)
def test_per_image_metric_matches_numpy(name: str) -> None:
    make, functional, reference, num_joints = PER_IMAGE_METRICS[name]
    batches = random_batches(num_joints, seed=len(name))
    expected_per_image = numpy_per_image(reference, batches)
    expected = np.nanmean(expected_per_image)
    if name == "taichi":
        # Tai-Chi counts an image without visible keypoints as 0, as the reference does.
        assert not np.isnan(expected_per_image).any() and expected_per_image[0] == 0
    else:
        assert np.isnan(expected_per_image[0])

    per_image = torch.cat([functional(*batch) for batch in batches])
    np.testing.assert_allclose(per_image.numpy(), expected_per_image, rtol=1e-12, atol=1e-12, equal_nan=True)

    metric = make()
    for batch in batches:
        metric.update(*batch)
    accumulated = metric.compute()
    assert accumulated.ndim == 0
    np.testing.assert_allclose(accumulated.item(), expected, rtol=1e-12)

    at_once = make()
    at_once.update(*concatenated(batches))
    torch.testing.assert_close(at_once.compute(), accumulated, rtol=1e-12, atol=0)

    metric.reset()
    metric.update(*batches[1])
    np.testing.assert_allclose(metric.compute().item(), np.nanmean(numpy_per_image(reference, batches[1:2])), rtol=1e-12)


def test_pck_averages_per_image_not_pooled_over_keypoints() -> None:
    # Image 0: its one visible keypoint is correct (100 %); image 1: none of its 3 is (0 %).
    target = torch.full((2, 4, 2), 0.5)
    preds = target.clone()
    preds[1, 1:] += 10 / 256
    visible = torch.tensor([[True, False, False, False], [False, True, True, True]])
    metric = PercentageCorrectKeypoints()
    assert metric.higher_is_better
    metric.update(preds, target, visible)
    # StableKeypoints' mean of per-image fractions: (100 + 0) / 2; pooled would be 1 / 4 = 25 %.
    assert metric.compute().item() == 50.0
    assert percentage_correct_keypoints(preds, target, visible).tolist() == [100.0, 0.0]


def test_pck_threshold_is_strict() -> None:
    target = torch.full((1, 3, 2), 0.5)
    preds = target.clone()
    preds[0, 0, 0] += 6 / 256  # exactly 6 px at scale 256: not correct
    preds[0, 1, 1] += 5.99 / 256  # just inside
    preds[0, 2] += torch.tensor([3.0, 4.0]) / 256  # 5 px along a diagonal
    metric = PercentageCorrectKeypoints(scale=256.0, threshold_px=6.0)
    metric.update(preds, target)
    torch.testing.assert_close(metric.compute(), torch.tensor(200 / 3, dtype=torch.float64))
    # The threshold scales with the image: at 128 px the first keypoint is 3 px away.
    metric = PercentageCorrectKeypoints(scale=128.0, threshold_px=3.0)
    metric.update(preds, target)
    torch.testing.assert_close(metric.compute(), torch.tensor(200 / 3, dtype=torch.float64))


def test_visible_none_means_all_visible() -> None:
    preds, target, _ = random_batches(32, seed=12, sizes=(6,))[0]
    everything = torch.ones(target.shape[:2], dtype=torch.bool)
    for make, num_joints in PER_IMAGE_METRICS_JOINTS.items():
        a, b = make(), make()
        a.update(preds[:, :num_joints], target[:, :num_joints])
        b.update(preds[:, :num_joints], target[:, :num_joints], everything[:, :num_joints])
        assert a.compute().item() == b.compute().item()



def test_inter_ocular_error_uses_the_given_eyes() -> None:
    preds, target, _ = random_batches(5, seed=13, sizes=(4,))[0]
    reordered = [3, 4, 2, 0, 1]  # eyes now at 3 and 4
    metric = InterOcularError(left_eye=3, right_eye=4)
    metric.update(preds[:, reordered], target[:, reordered])
    reference = InterOcularError()
    reference.update(preds, target)
    torch.testing.assert_close(metric.compute(), reference.compute())
    with pytest.raises(ValueError, match="two different landmarks"):
        InterOcularError(left_eye=2, right_eye=2)


def test_orientation_invariant_error_forgives_a_left_right_swap() -> None:
    preds, target, _ = random_batches(32, seed=14, sizes=(6,))[0]
    perm = swap_permutation(32, H36M_LEFT_RIGHT_SWAP)
    torch.testing.assert_close(orientation_invariant_error(target[:, perm], target, swap=H36M_LEFT_RIGHT_SWAP), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(orientation_invariant_error(preds[:, perm], target, swap=H36M_LEFT_RIGHT_SWAP),
                               orientation_invariant_error(preds, target, swap=H36M_LEFT_RIGHT_SWAP))
    assert (orientation_invariant_error(preds, target, swap=H36M_LEFT_RIGHT_SWAP)
            <= orientation_invariant_error(preds, target, swap=())).all()


def test_h36m_swap_is_a_permutation_and_an_involution() -> None:
    perm = swap_permutation(32, H36M_LEFT_RIGHT_SWAP)
    assert perm.dtype == torch.long
    assert torch.equal(torch.sort(perm).values, torch.arange(32))  # each index exactly once
    assert torch.equal(perm[perm], torch.arange(32))
    midline = (perm == torch.arange(32)).nonzero().flatten().tolist()
    # Midline joints, and 16 and 24 (duplicates of midline joints), stay, as in StableKeypoints.
    assert midline == [0, 11, 12, 13, 14, 15, 16, 24]
    # Right leg 1-5 <-> left leg 6-10, left arm/hand 17-23 <-> right 25-31 (21 <-> 29, not SK's 28).
    assert perm[1:6].tolist() == [6, 7, 8, 9, 10] and perm[17:24].tolist() == list(range(25, 32))


def test_h36m_swap_pairs_are_stable_keypoints_list_with_the_duplicate_fixed() -> None:
    # unsupervised_keypoints/eval.py, swap_points, with (21, 28) -> (21, 29).
    sk = [(1, 6), (2, 7), (3, 8), (4, 9), (5, 10), (17, 25), (18, 26), (19, 27), (20, 28), (21, 28), (22, 30), (23, 31)]
    assert list(H36M_LEFT_RIGHT_SWAP) == [pair if pair != (21, 28) else (21, 29) for pair in sk]


def test_swap_list_with_the_reference_bug_is_rejected() -> None:
    buggy = [pair if pair != (21, 29) else (21, 28) for pair in H36M_LEFT_RIGHT_SWAP]
    with pytest.raises(ValueError, match="Joint 28 appears in more than one swap pair"):
        swap_permutation(32, buggy)
    with pytest.raises(ValueError, match="Joint 28"):
        OrientationInvariantError(swap=buggy)
    with pytest.raises(ValueError, match="outside the 20 joints"):
        swap_permutation(20, H36M_LEFT_RIGHT_SWAP)
    with pytest.raises(ValueError, match="itself"):
        swap_permutation(4, [(2, 2)])


ALL_METRICS: list[Callable[[], Metric]] = list(PER_IMAGE_METRICS_JOINTS)


@pytest.mark.parametrize("make", ALL_METRICS, ids=lambda make: make.__name__)
def test_states_reduce_with_sum_and_merge_like_ddp(make: Callable[[], Metric]) -> None:
    num_joints = PER_IMAGE_METRICS_JOINTS.get(make, 10)
    batches = random_batches(num_joints, seed=15)
    rank_0, rank_1, single = make(), make(), make()
    assert rank_0._reductions and all(fx is dim_zero_sum for fx in rank_0._reductions.values())
    assert not rank_0.is_differentiable and not rank_0.full_state_update
    rank_0.update(*batches[0])
    rank_1.update(*batches[1])
    rank_1.update(*batches[2])
    for batch in batches:
        single.update(*batch)
    rank_0.merge_state(rank_1)  # what the sum reduction does across DDP ranks
    torch.testing.assert_close(rank_0.compute(), single.compute(), rtol=1e-12, atol=0)


def test_bad_shapes_are_errors() -> None:
    metric = NormalizedKeypointError()
    with pytest.raises(ValueError, match=r"\(B, J, 2\)"):
        metric.update(torch.rand(2, 5, 2), torch.rand(2, 4, 2))
    with pytest.raises(ValueError, match="booleans"):
        metric.update(torch.rand(2, 5, 2), torch.rand(2, 5, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices of the two eyes"):
        InterOcularError(left_eye=0, right_eye=7).update(torch.rand(2, 5, 2), torch.rand(2, 5, 2))


def test_nan_prediction_shows_in_the_result_unless_invisible() -> None:
    preds, target, visible = random_batches(15, seed=16, sizes=(3,))[0]
    clean = NormalizedKeypointError()
    clean.update(preds, target, visible)
    preds[1, (~visible[1]).nonzero()[0, 0]] = float("nan")
    at_invisible = NormalizedKeypointError()
    at_invisible.update(preds, target, visible)
    assert at_invisible.compute().item() == clean.compute().item()
    preds[1, visible[1].nonzero()[0, 0]] = float("nan")
    at_visible = NormalizedKeypointError()
    at_visible.update(preds, target, visible)
    assert at_visible.compute().isnan()


def test_per_image_method_matches_the_functional_twin():
    from lightning_modules.metrics import (
        InterOcularError,
        NormalizedKeypointError,
        PercentageCorrectKeypoints,
        inter_ocular_error,
        normalized_keypoint_error,
        percentage_correct_keypoints,
    )

    gen = torch.Generator().manual_seed(0)
    preds, target = torch.rand(4, 5, 2, generator=gen), torch.rand(4, 5, 2, generator=gen)
    visible = torch.rand(4, 5, generator=gen) > 0.3
    torch.testing.assert_close(NormalizedKeypointError().per_image(preds, target, visible),
                               normalized_keypoint_error(preds, target, visible), equal_nan=True)
    torch.testing.assert_close(InterOcularError().per_image(preds, target), inter_ocular_error(preds, target))
    torch.testing.assert_close(PercentageCorrectKeypoints().per_image(preds, target, visible),
                               percentage_correct_keypoints(preds, target, visible), equal_nan=True)
