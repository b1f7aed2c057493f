"""The regressor against a known map and a plain NumPy fit, and its safetensors round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lightning_modules.regressor import LinearKeypointRegressor, apply_regressor, fit_regressor
from tests.conftest import tiny_module


def numpy_fit(keypoints: np.ndarray, targets: np.ndarray, visible: np.ndarray | None) -> np.ndarray:
    """The docs/method.md section 7 recipe, one ground-truth keypoint at a time."""
    n = keypoints.shape[0]
    x = keypoints.reshape(n, -1).astype(np.float64) - 0.5
    y = targets.reshape(n, -1).astype(np.float64) - 0.5
    num_targets = targets.shape[1]
    visible = np.ones((n, num_targets), dtype=bool) if visible is None else visible
    weight = np.zeros((x.shape[1], y.shape[1]))
    for j in range(num_targets):
        rows = visible[:, j]
        xj = x[rows]
        weight[:, 2 * j : 2 * j + 2] = np.linalg.pinv(xj.T @ xj) @ xj.T @ y[rows, 2 * j : 2 * j + 2]
    return weight


def synthetic(n: int = 200, k: int = 6, j: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> keypoints (n, k, 2), targets (n, j, 2) exactly (kp - 0.5) W + 0.5, W (2k, 2j); float64."""
    g = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(n, k, 2, generator=g, dtype=torch.float64)
    weight = torch.randn(2 * k, 2 * j, generator=g, dtype=torch.float64) * 0.3
    targets = ((keypoints.reshape(n, -1) - 0.5) @ weight + 0.5).reshape(n, j, 2)
    return keypoints, targets, weight


def test_recovers_a_known_linear_map() -> None:
    keypoints, targets, weight = synthetic()
    fitted = fit_regressor(keypoints, targets)
    assert fitted.dtype == torch.float64 and fitted.shape == weight.shape
    torch.testing.assert_close(fitted, weight, atol=1e-8, rtol=0)


def test_recovers_a_known_map_from_visible_rows_only() -> None:
    keypoints, targets, weight = synthetic(seed=1)
    g = torch.Generator().manual_seed(2)
    visible = torch.rand(targets.shape[:2], generator=g) < 0.6
    targets = torch.where(visible[..., None], targets, torch.zeros(()))  # invisible keypoints hold (0, 0)
    torch.testing.assert_close(fit_regressor(keypoints, targets, visible), weight, atol=1e-8, rtol=0)


@pytest.mark.parametrize("with_visibility", [False, True])
def test_matches_numpy_on_random_data(with_visibility: bool) -> None:
    rng = np.random.default_rng(3)
    n, k, j = 300, 8, 15
    keypoints = rng.random((n, k, 2)).astype(np.float32)
    targets = rng.random((n, j, 2)).astype(np.float32)
    visible = None
    if with_visibility:
        visible = rng.random((n, j)) < 0.7
        visible[:, 4] = visible[:, 9]  # two keypoints sharing one visibility pattern share one solve
        visible[:, 11] = True
        targets[~visible] = 0.0
    fitted = fit_regressor(
        torch.from_numpy(keypoints), torch.from_numpy(targets), None if visible is None else torch.from_numpy(visible)
    )
    np.testing.assert_allclose(fitted.numpy(), numpy_fit(keypoints, targets, visible), rtol=0, atol=1e-10)


def test_full_visibility_equals_no_mask() -> None:
    keypoints, targets, _ = synthetic(seed=4)
    targets = targets + 0.01 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    visible = torch.ones(targets.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(fit_regressor(keypoints, targets, visible), fit_regressor(keypoints, targets))


def test_apply_round_trip_keeps_the_input_dtype() -> None:
    keypoints, targets, _ = synthetic(seed=6)
    weight = fit_regressor(keypoints, targets)
    torch.testing.assert_close(apply_regressor(keypoints, weight), targets, atol=1e-9, rtol=0)

    predicted = apply_regressor(keypoints.float(), weight)
    assert predicted.dtype == torch.float32 and predicted.shape == targets.shape
    torch.testing.assert_close(predicted, targets.float(), atol=1e-5, rtol=0)
    # Any leading dims: one image without a batch axis.
    torch.testing.assert_close(apply_regressor(keypoints[0], weight), targets[0], atol=1e-9, rtol=0)


def test_keypoint_never_visible_is_an_error_naming_it() -> None:
    keypoints, targets, _ = synthetic(seed=7)
    visible = torch.ones(targets.shape[:2], dtype=torch.bool)
    visible[:, 3] = False
    with pytest.raises(ValueError, match=r"\[3\]"):
        fit_regressor(keypoints, targets, visible)


def test_bad_shapes_are_errors() -> None:
    keypoints, targets, weight = synthetic(seed=8)
    with pytest.raises(ValueError, match="one row per regression image"):
        fit_regressor(keypoints[:-1], targets)
    with pytest.raises(ValueError, match=r"\(N, P, 2\)"):
        fit_regressor(keypoints.flatten(1), targets)
    with pytest.raises(ValueError, match="booleans"):
        fit_regressor(keypoints, targets, torch.ones(targets.shape[0], dtype=torch.bool))
    with pytest.raises(ValueError, match="fit_regressor returned"):
        apply_regressor(keypoints[:, :-1], weight)


def test_save_load_round_trip(tmp_path) -> None:
    keypoints, targets, _ = synthetic(seed=9)
    regressor = LinearKeypointRegressor.fit(keypoints.float(), targets.float())
    assert (regressor.num_keypoints, regressor.num_targets) == (6, 5)
    assert "weight" in dict(regressor.named_buffers())

    path = tmp_path / "regressor.safetensors"
    regressor.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["num_keypoints"] == "6" and f.metadata()["num_targets"] == "5"

    loaded = LinearKeypointRegressor.load(path)
    assert loaded.weight.dtype == torch.float64
    assert torch.equal(loaded.weight, regressor.weight)
    torch.testing.assert_close(loaded(keypoints.float()), regressor(keypoints.float()), atol=0, rtol=0)


# ---- StableKeypoints' orientation-invariant fit (Human3.6M) ----

#: One keypoint, two ground-truth joints: joint 0 is the keypoint and joint 1 its point reflection
#: through the centre, so swapping the joints is what a person turning round does to the labels.
W_MIRROR = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
SWAP_2 = torch.tensor([1, 0])


def mirrored_labels(num_distinct: int, num_swapped: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints (3 n, 1, 2) and targets (3 n, 2, 2): ``num_distinct`` keypoints, each thrice, the
    first ``num_swapped`` of the last copy labelled with left and right exchanged."""
    g = torch.Generator().manual_seed(3)
    distinct = torch.rand(num_distinct, 1, 2, generator=g, dtype=torch.float64)
    keypoints = distinct.repeat(3, 1, 1)
    targets = apply_regressor(keypoints, W_MIRROR)
    swapped = torch.zeros(len(keypoints), dtype=torch.bool)
    swapped[2 * num_distinct : 2 * num_distinct + num_swapped] = True
    targets[swapped] = targets[swapped][:, SWAP_2]
    return keypoints, targets, swapped


def test_orientation_invariant_fit_unswaps_turned_round_labels() -> None:
    from lightning_modules.regressor import fit_orientation_invariant_regressor

    keypoints, targets, swapped = mirrored_labels(20, 20)  # 20 of 60 images turned round
    # A plain fit averages the two orientations: (2 - 1) / 3 of the true map.
    torch.testing.assert_close(fit_regressor(keypoints, targets), W_MIRROR / 3, rtol=0, atol=1e-12)
    weight, ended_swapped = fit_orientation_invariant_regressor(keypoints, targets, SWAP_2)
    torch.testing.assert_close(weight, W_MIRROR, rtol=0, atol=1e-12)
    assert torch.equal(ended_swapped, swapped)
    regressor = LinearKeypointRegressor.fit_orientation_invariant(keypoints, targets, swap=SWAP_2)
    torch.testing.assert_close(regressor.weight, W_MIRROR, rtol=0, atol=1e-12)


def test_orientation_invariant_fit_stops_when_ten_or_fewer_images_want_a_swap() -> None:
    from lightning_modules.regressor import fit_orientation_invariant_regressor

    keypoints, targets, _ = mirrored_labels(10, 10)  # exactly 10 want a swap after the first fit
    weight, ended_swapped = fit_orientation_invariant_regressor(keypoints, targets, SWAP_2)
    torch.testing.assert_close(weight, W_MIRROR / 3, rtol=0, atol=1e-12)  # SK keeps the first fit
    assert not ended_swapped.any()
    weight, ended_swapped = fit_orientation_invariant_regressor(keypoints, targets, SWAP_2, max_images_left=9)
    torch.testing.assert_close(weight, W_MIRROR, rtol=0, atol=1e-12)
    assert int(ended_swapped.sum()) == 10


def test_orientation_invariant_fit_warns_when_it_does_not_settle_and_rejects_a_non_involution() -> None:
    from lightning_modules.regressor import fit_orientation_invariant_regressor

    keypoints, targets, _ = mirrored_labels(20, 20)
    with pytest.warns(UserWarning, match="after 1 fits"):
        weight, _ = fit_orientation_invariant_regressor(keypoints, targets, SWAP_2, max_iterations=1)
    torch.testing.assert_close(weight, W_MIRROR / 3, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="its own inverse"):
        fit_orientation_invariant_regressor(keypoints, targets, torch.tensor([0, 0]))


def test_human36m_datamodule_fits_the_orientation_invariant_regressor_with_sk_pairs() -> None:
    from data.cub import CUBDataModule
    from data.human36m import Human36MDataModule
    from data.human36m import H36M_LEFT_RIGHT_SWAP
    from lightning_modules.evaluation import regression_protocol
    from lightning_modules.metrics import swap_permutation

    keypoints, targets, weight = synthetic(n=60, k=4, j=32, seed=5)
    perm = swap_permutation(32, H36M_LEFT_RIGHT_SWAP)
    labels = targets.clone()
    labels[:20] = labels[:20][:, perm]  # a third of the people face the other way
    visible = torch.ones(60, 32, dtype=torch.bool)
    h36m = regression_protocol(Human36MDataModule(root="unused").evaluation())(keypoints, labels, visible)
    torch.testing.assert_close(h36m.weight, weight, rtol=0, atol=1e-9)
    # Every other dataset keeps the plain visible-rows fit, which the swapped labels pull off.
    plain = regression_protocol(CUBDataModule(root="unused").evaluation())(keypoints, labels, visible)
    torch.testing.assert_close(plain.weight, fit_regressor(keypoints, labels, visible), rtol=0, atol=0)
    assert (plain.weight - weight).abs().max() > 0.1


@pytest.mark.slow
def test_the_test_stage_fits_the_regressor_the_datamodule_names(tiny_sd_path, cub_root, tmp_path, monkeypatch) -> None:
    import lightning as L

    from data.base import Evaluation
    from data.cub import CUBDataModule
    calls = []
    fit = LinearKeypointRegressor.fit_orientation_invariant.__func__

    def recording(cls, keypoints, targets, visible=None, *, swap, **kwargs):
        calls.append((keypoints.shape, targets.shape, visible.shape, swap.tolist()[:9]))
        return fit(cls, keypoints, targets, visible, swap=swap, **kwargs)

    monkeypatch.setattr(LinearKeypointRegressor, "fit_orientation_invariant", classmethod(recording))

    class Swapping(CUBDataModule):
        def evaluation(self) -> Evaluation:
            return Evaluation("normalized_keypoint_error", regressor="orientation_invariant", swap_pairs=((6, 10), (7, 11)))

    module = tiny_module(tiny_sd_path, load=False, num_indices=4, augmentation_iterations=2)
    data = Swapping(str(cub_root), subset="cub_001", image_size=64, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.test(module, datamodule=data)
    # Once, on the 8 training images of class 001, with the named pairs as a permutation of the 15 parts.
    assert calls == [((8, 4, 2), (8, 15, 2), (8, 15), [0, 1, 2, 3, 4, 5, 10, 11, 8])]
