"""The test stage (docs/method.md section 7) in one place: collect, fit, score, write; every image counted once.

A DataModule names its evaluation (``data.base.Evaluation``: the metric, its arguments, the regression
protocol); ``RegressorEvaluation.of`` builds it. ``test`` runs two loaders: the regression split (0),
then the test split (1). ``RegressorEvaluation`` collects each image's keypoints with its dataset
``index`` (``KeypointSet``, a torchmetrics Metric with ``cat`` states), fits the regressor when the
test split starts (the loader boundary), scores the test split at the end of the epoch and writes
``metrics.json`` and ``regressor.safetensors``. Both steps gather the rows of every rank and keep
each index once: a DistributedSampler pads the ranks' shares with repeated images, so without this
some images would be fitted on and scored twice and the number would depend on the device count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_modules import metrics
from lightning_modules.app import files
from lightning_modules.app.errors import ConfigError
from lightning_modules.app.run_folder import METRICS_FILE, REGRESSOR_FILE
from lightning_modules.metrics import swap_index
from lightning_modules.regressor import LinearKeypointRegressor

REGRESSION_LOADER, TEST_LOADER = 0, 1

#: The metrics a DataModule's ``Evaluation`` can name, by the name logged as ``test/<name>``.
METRICS: dict[str, type[Metric]] = {
    "normalized_keypoint_error": metrics.NormalizedKeypointError,
    "inter_ocular_error": metrics.InterOcularError,
    "summed_keypoint_error": metrics.SummedKeypointError,
    "percentage_correct_keypoints": metrics.PercentageCorrectKeypoints,
    "orientation_invariant_error": metrics.OrientationInvariantError,
}
#: The metrics whose StableKeypoints evaluation method reads the ground truth's visibility (``visible``,
#: ``mean_average_error``); SK's ``inter_eye_distance``, ``pck`` and ``orientation_invariant`` fit on
#: every row and score every keypoint.
SK_VISIBILITY_METRICS = frozenset({"normalized_keypoint_error", "summed_keypoint_error"})


def reads_visibility(evaluation: Any) -> bool:
    """Whether the fit and the metric use the ground truth's visibility: always under ``default``; under
    ``stablekeypoints`` where SK's evaluation method does (``SK_VISIBILITY_METRICS``)."""
    return evaluation.protocol != "stablekeypoints" or evaluation.metric in SK_VISIBILITY_METRICS


def build_metric(evaluation: Any) -> Metric:
    """The metric a ``data.base.Evaluation`` names, with its arguments (and its swap pairs, where it takes them)."""
    if evaluation.metric not in METRICS:
        raise ConfigError(f"The DataModule names the metric {evaluation.metric!r}; known: {sorted(METRICS)}.")
    kwargs = dict(evaluation.metric_args, reads_visibility=reads_visibility(evaluation))
    if evaluation.metric == "orientation_invariant_error":
        kwargs["swap"] = evaluation.swap_pairs
        kwargs["protocol"] = evaluation.protocol
    return METRICS[evaluation.metric](**kwargs)


def regression_protocol(evaluation: Any) -> Callable[[Tensor, Tensor, Tensor], LinearKeypointRegressor]:
    """keypoints (N, K, 2), targets (N, J, 2), visible (N, J) -> the regressor, as ``evaluation.regressor`` says
    (``visible`` is ignored where ``reads_visibility`` says the protocol fits on every row)."""
    if evaluation.regressor == "linear":
        if reads_visibility(evaluation):
            return LinearKeypointRegressor.fit
        return lambda keypoints, targets, visible: LinearKeypointRegressor.fit(keypoints, targets, None)
    if evaluation.regressor == "orientation_invariant":
        protocol = evaluation.protocol
        use_visible = reads_visibility(evaluation)

        def fit(keypoints: Tensor, targets: Tensor, visible: Tensor) -> LinearKeypointRegressor:
            swap = swap_index(targets.shape[1], evaluation.swap_pairs, protocol)
            return LinearKeypointRegressor.fit_orientation_invariant(
                keypoints, targets, visible if use_visible else None, swap=swap, require_involution=protocol != "stablekeypoints")

        return fit
    raise ConfigError(f"The DataModule names the regressor {evaluation.regressor!r}: use 'linear' or 'orientation_invariant'.")


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

    def rows(self) -> dict[str, Tensor]:
        """``compute`` with its shapes kept: torchmetrics squeezes a one-element result to 0-d (a split of one image)."""
        rows = self.compute()
        rows["index"] = rows["index"].reshape(-1)
        rows["visible"] = rows["visible"].reshape(rows["targets"].shape[:-1])
        return rows

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
        metric: the dataset's metric (``build_metric``).
        fit_regressor: the dataset's regression protocol, keypoints (N, K, 2), targets (N, J, 2),
            visible (N, J) -> regressor (``regression_protocol``).
        device: where the rows are kept and gathered (the LightningModule's device).
        name: the metric's name, logged as ``test/<name>``.
        protocol: ``default`` or ``stablekeypoints``, recorded in ``metrics.json``.
    """

    def __init__(
        self,
        metric: Metric,
        fit_regressor: Callable[[Tensor, Tensor, Tensor], LinearKeypointRegressor] = LinearKeypointRegressor.fit,
        device: torch.device | str = "cpu",
        name: str = "metric",
        protocol: str = "default",
    ) -> None:
        self.name = name
        self.protocol = protocol
        self.fit_regressor = fit_regressor
        self.regression = KeypointSet().to(device)
        self.test = KeypointSet().to(device)
        self.metric = metric.to(device)
        self.regressor: LinearKeypointRegressor | None = None
        self.num_regression_images = 0
        self.num_test_images = 0
        self.value: float | None = None

    @classmethod
    def of(cls, evaluation: Any, device: torch.device | str = "cpu") -> RegressorEvaluation:
        """The evaluation a DataModule names (``data.base.Evaluation``)."""
        return cls(build_metric(evaluation), regression_protocol(evaluation), device, name=evaluation.metric,
                   protocol=evaluation.protocol)

    def update(self, dataloader_idx: int, index: Tensor, keypoints: Tensor, targets: Tensor, visible: Tensor) -> None:
        split = self.regression if dataloader_idx == REGRESSION_LOADER else self.test
        split.update(index, keypoints, targets, visible)

    def fit(self) -> LinearKeypointRegressor:
        """Fits the regressor on every rank's regression rows (docs/method.md section 7)."""
        if not len(self.regression) and not torch.distributed.is_initialized():
            raise RuntimeError("The regression split produced no keypoints: the regressor cannot be fitted.")
        rows = self.regression.rows()
        self.regressor = self.fit_regressor(rows["keypoints"], rows["targets"], rows["visible"])
        self.regressor.to(rows["keypoints"].device)
        self.num_regression_images = len(rows["index"])
        return self.regressor

    def score(self, rank: int = 0, world_size: int = 1) -> float:
        """The metric over every test image once."""
        if self.regressor is None:
            raise RuntimeError("The test split was empty: nothing was scored.")
        rows = self.test.rows()
        self.num_test_images = len(rows["index"])
        # Every rank holds the whole split now, and the metric sums its states over ranks when it
        # computes: each rank adds its own residue class of images, so each image counts once.
        mine = rows["index"] % world_size == rank
        predictions = self.regressor(rows["keypoints"][mine])
        self.metric.update(predictions, rows["targets"][mine], rows["visible"][mine])
        self.value = float(self.metric.compute())
        return self.value

    def save(self, folder: Path, dataset: str, keypoint_tokens: list[int], model: str, provenance: dict) -> Path:
        """Writes the regressor and ``metrics.json`` (the score, what was scored, ``provenance``) -> its path."""
        self.regressor.save(folder / REGRESSOR_FILE)
        result = {
            "metric": self.name,
            "value": self.value,
            "protocol": self.protocol,
            "higher_is_better": bool(self.metric.higher_is_better),
            "dataset": dataset,
            "keypoint_tokens": keypoint_tokens,
            "model": model,
            "num_regression_images": self.num_regression_images,
            "num_test_images": self.num_test_images,
            **provenance,
        }
        return files.write_text(folder / METRICS_FILE, json.dumps(result, indent=2) + "\n")

    def summary(self, written: Path) -> str:
        """What ``test`` prints at its end: the test split's metric by its logged name, how many images
        fitted the regressor and how many were scored, the protocol and where the results are."""
        better = "higher" if self.metric.higher_is_better else "lower"
        name = f"test/{self.name}"
        return "\n".join([
            f"Test results (protocol: {self.protocol})",
            f"  {'regression split':<{len(name)}}  {self.num_regression_images} images fitted the regressor",
            f"  {'test split':<{len(name)}}  {self.num_test_images} images scored",
            f"  {name}  {self.value:.4f}  ({better} is better)",
            f"Written to {written}",
        ])

    # ------------------------------------------------------------------ the test stage's hooks
    def step(self, dataloader_idx: int, batch: dict, keypoints: Tensor) -> dict[str, Tensor]:
        """Collects a batch's keypoints (B, K, 2) -> ``keypoints`` and, on the test split, the regressor's
        ``predictions`` (B, J, 2), normalized (x, y), for callbacks (``callbacks.visualization.TestResultsTable``)."""
        self.update(dataloader_idx, batch["index"], keypoints, batch["keypoints"], batch["visible"])
        if dataloader_idx != TEST_LOADER:
            return {"keypoints": keypoints}
        return {"keypoints": keypoints, "predictions": self.regressor(keypoints)}

    def at_batch_start(self, dataloader_idx: int) -> None:
        """The loader boundary: every rank has collected its share of the regression split; fit (collective)."""
        if dataloader_idx == TEST_LOADER and self.regressor is None:
            self.fit()

    def finish(self, module: Any) -> float:
        """At the end of the test epoch: scores, logs ``test/<name>`` and (rank 0) writes the results -> the score."""
        trainer = module.trainer
        value = self.score(trainer.global_rank, trainer.world_size)
        module.log(f"test/{self.name}", value, add_dataloader_idx=False, sync_dist=True)  # equal on every rank
        if trainer.is_global_zero:
            written = self.save(module.run_dir(), type(trainer.datamodule).__name__, module.keypoint_tokens.tolist(),
                                module.backbone.pretrained_model_name_or_path, module.provenance())
            rank_zero_info(self.summary(written))
        return value
