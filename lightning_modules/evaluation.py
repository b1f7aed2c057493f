"""The test stage (SPEC section 7) in one place: collect, fit, score; every image counted once.

``test`` runs two loaders: the regression split (0), then the test split (1). ``RegressorEvaluation``
collects each image's keypoints with its dataset ``index`` (``KeypointSet``, a torchmetrics Metric
with ``cat`` states), fits the regressor when the test split starts (the loader boundary), and
scores the test split at the end of the epoch. Both steps gather the rows of every rank and keep
each index once: a DistributedSampler pads the ranks' shares with repeated images, so without this
some images would be fitted on and scored twice and the number would depend on the device count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_modules.regressor import LinearKeypointRegressor

REGRESSION_LOADER, TEST_LOADER = 0, 1


class KeypointSet(Metric):
    """Per-image rows of one split: ``index`` (N,), ``keypoints`` (N, K, 2), ``targets`` (N, J, 2), ``visible`` (N, J).

    ``compute`` gathers the rows of every rank (torchmetrics pads uneven shares) and returns them
    sorted by index, each index once (the first row seen; repeated images have identical rows,
    their draws being seeded per image).
    """

    full_state_update = False
    _FIELDS = ("index", "keypoints", "targets", "visible")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self._FIELDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, keypoints: Tensor, targets: Tensor, visible: Tensor) -> None:
        self.index.append(torch.as_tensor(index, device=self.device).long())
        self.keypoints.append(keypoints.float())
        self.targets.append(targets.float())
        self.visible.append(visible.to(torch.uint8))  # gloo gathers no bool tensors

    def compute(self) -> dict[str, Tensor]:
        rows = {name: dim_zero_cat(getattr(self, name)) for name in self._FIELDS}
        unique, inverse = torch.unique(rows["index"], sorted=True, return_inverse=True)
        positions = torch.arange(len(inverse), device=inverse.device)
        first = torch.full_like(unique, len(inverse)).scatter_reduce(0, inverse, positions, "amin")
        out = {name: value[first] for name, value in rows.items()}
        out["visible"] = out["visible"].bool()
        return out

    def __len__(self) -> int:
        return sum(len(part) for part in self.index)


class RegressorEvaluation:
    """Regressor fitted on loader 0's images, ``metric`` of its predictions on loader 1's images.

    Lifecycle (``StableKeypoints``' test hooks): ``update`` per batch; ``fit`` once, when the first
    test-split batch starts (collective: every rank calls it); ``score`` at the end of the epoch
    (collective). Both see the union of all ranks' rows, each image once, so 1 and N devices give
    the same regressor and the same number (up to float summation order).

    Not an ``nn.Module``: held by the LightningModule, it stays out of its state dict and checkpoints.

    Args:
        metric: the dataset's metric (``KeypointDataModule.make_metric``).
        fit_regressor: the dataset's regression protocol, keypoints (N, K, 2), targets (N, J, 2),
            visible (N, J) -> regressor (``KeypointDataModule.fit_regressor``).
        device: where the rows are kept and gathered (the LightningModule's device).
    """

    def __init__(
        self,
        metric: Metric,
        fit_regressor: Callable[[Tensor, Tensor, Tensor], LinearKeypointRegressor] = LinearKeypointRegressor.fit,
        device: torch.device | str = "cpu",
    ) -> None:
        self.fit_regressor = fit_regressor
        self.regression = KeypointSet().to(device)
        self.test = KeypointSet().to(device)
        self.metric = metric.to(device)
        self.regressor: LinearKeypointRegressor | None = None
        self.num_regression_images = 0
        self.num_test_images = 0

    def update(self, dataloader_idx: int, index: Tensor, keypoints: Tensor, targets: Tensor, visible: Tensor) -> None:
        split = self.regression if dataloader_idx == REGRESSION_LOADER else self.test
        split.update(index, keypoints, targets, visible)

    def fit(self) -> LinearKeypointRegressor:
        """Fits the regressor on every rank's regression rows (SPEC section 7)."""
        if not len(self.regression) and not torch.distributed.is_initialized():
            raise RuntimeError("The regression split produced no keypoints: the regressor cannot be fitted.")
        rows = self.regression.compute()
        self.regressor = self.fit_regressor(rows["keypoints"], rows["targets"], rows["visible"])
        self.regressor.to(rows["keypoints"].device)
        self.num_regression_images = len(rows["index"])
        return self.regressor

    def score(self, rank: int = 0, world_size: int = 1) -> float:
        """The metric over every test image once."""
        if self.regressor is None:
            raise RuntimeError("The test split was empty: nothing was scored.")
        rows = self.test.compute()
        self.num_test_images = len(rows["index"])
        # Every rank holds the whole split now, and the metric sums its states over ranks when it
        # computes: each rank adds its own residue class of images, so each image counts once.
        mine = rows["index"] % world_size == rank
        predictions = self.regressor(rows["keypoints"][mine])
        self.metric.update(predictions, rows["targets"][mine], rows["visible"][mine])
        return float(self.metric.compute())
