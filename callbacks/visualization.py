"""What a person watches while a run trains and after it is tested: attention maps and scored examples.

Both callbacks always write PNG files (and a CSV) into the run's folder, so every run can be looked
at without a logger; when a ``WandbLogger`` is among the trainer's loggers they also log there.
They work on global rank 0 only and call no collective operation, so the other DDP ranks go on.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import Metric

from callbacks.drawing import (
    PREDICTION_RGB,
    TRUTH_RGB,
    captioned,
    colorbar,
    draw_comparison,
    draw_keypoints,
    fit_for_display,
    grid,
    heatmap_overlay,
    legend,
    save_png,
    to_pil,
    with_legend,
)
from lightning_modules.selection import argmax_pixels


def wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    """The trainer's W&B logger, or None."""
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


def first_images(dataloader: DataLoader, num_images: int) -> Tensor:
    """The first ``num_images`` images (N, 3, S, S) of ``dataloader``'s batches, on the CPU."""
    images, seen = [], 0
    for batch in dataloader:
        images.append(batch["image"][: num_images - seen])
        seen += len(images[-1])
        if seen >= num_images:
            break
    if not images:
        raise RuntimeError("AttentionVisualizer: the keypoint index dataloader yielded no images.")
    return torch.cat(images)


class AttentionVisualizer(Callback):
    """Every ``every_n_steps`` steps, the attention maps of the tokens a step would optimize; at the
    end of fit, those of the final keypoint tokens.

    At the start of training it fixes the first ``num_images`` images of
    ``trainer.datamodule.keypoint_index_dataloader()`` (no augmentation) and a noise seed, so the
    pictures of successive steps differ by the learned context alone. During training the global
    keypoint tokens are not chosen yet (they are ranked after fit, docs/method.md section 5.1), so for each image it
    selects tokens as a training step does (``StableKeypoints.select`` with the
    model's ``top_k``, ``furthest_point_num_samples``, ``selection`` and ``sigma_px``), and says so
    on the picture; when the model already has its keypoint tokens (a pretrained context) those are
    drawn instead. Each picture is one grid: the image with each token's peak, then up to
    ``max_tokens`` heat-map overlays, all on one colour scale drawn as a colour bar below.
    Token t has the colour ``PALETTE[t % 30]`` in every picture.

    Pictures go to ``<run_dir>/visualizations/step_{s:06d}/image_{i}.png`` and, with a W&B
    logger, to ``attention/heatmaps``. The first is drawn at the start of training (the initial
    context), then whenever ``global_step`` is a multiple of ``every_n_steps``; once fit has ranked
    the keypoint tokens, ``visualizations/final/image_{i}.png`` shows them (captioned ``keypoint
    k · token t``, the numbering of ``predict``). Each costs one UNet pass over ``num_images``
    images, on global rank 0 only (the other ranks wait at the next gradient synchronization, no
    longer).

    Args:
        every_n_steps: optimizer steps between pictures.
        num_images: images drawn each time.
        max_tokens: heat maps per image (the first of the selected tokens, in selection order).
        cell_px: side of each picture in a grid, in pixels (bounds the files' size).
        seed: seed of the noise added to the latents before the UNet pass.
    """

    def __init__(
        self, every_n_steps: int = 100, num_images: int = 4, max_tokens: int = 10, cell_px: int = 256, seed: int = 0
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("num_images", num_images),
                            ("max_tokens", max_tokens), ("cell_px", cell_px)):
            if value < 1:
                raise ValueError(f"AttentionVisualizer {name}={value}: use a positive number.")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.max_tokens = max_tokens
        self.cell_px = cell_px
        self.seed = seed
        self._images: Tensor | None = None
        self._last_step: int | None = None

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is None:
            raise ValueError(
                "AttentionVisualizer takes its images from trainer.datamodule.keypoint_index_dataloader(): "
                "pass a DataModule (the `data` section of the config) to fit."
            )
        self._images = first_images(trainer.datamodule.keypoint_index_dataloader(), self.num_images)
        self._last_step = None
        rank_zero_info(f"Attention maps of {len(self._images)} images every {self.every_n_steps} steps: "
                       f"{pl_module.run_dir() / 'visualizations'}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.visualize(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: dict, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.visualize(trainer, pl_module)

    @rank_zero_only
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After the module's on_train_end, which ranks the final keypoint tokens.
        if stage == "fit" and self._images is not None and pl_module.keypoint_tokens.numel():
            self._draw(trainer, pl_module, "final", log=False)

    @rank_zero_only
    @torch.no_grad()
    def visualize(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draws and writes (and logs) the pictures of the current step, once per step."""
        step = trainer.global_step
        # With gradient accumulation several batches end on the same step: draw it once.
        if step == self._last_step:
            return
        self._last_step = step
        self._draw(trainer, pl_module, f"step_{step:06d}", log=True)

    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, folder_name: str, log: bool) -> None:
        step = trainer.global_step
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        maps = pl_module.maps_of(self._images.to(pl_module.device), generator).float()  # (N, T, R, R)
        final = pl_module.keypoint_tokens.numel() > 0
        if final:
            tokens = pl_module.keypoint_tokens.to(maps.device)[None].expand(len(maps), -1)
        else:
            tokens = pl_module.select(maps)
        tokens = tokens[:, : self.max_tokens]
        selected = maps[torch.arange(len(maps), device=maps.device)[:, None], tokens].cpu()  # (N, k, R, R)
        tokens = tokens.cpu()
        peaks = (argmax_pixels(selected).double() + 0.5) * self.cell_px / maps.shape[-1]  # (N, k, 2) cell pixels
        if final:
            heading, note = f"keypoint tokens · step {step}", "the final keypoint tokens"
            captions = [f"keypoint {k} · token {t} · step {step}" for k, t in enumerate(tokens[0].tolist())]
        else:
            heading, captions = f"selected tokens · step {step}", None
            note = "tokens selected for this image; the keypoint tokens are ranked after fit"
        pictures = [
            attention_grid(image, heat, image_tokens.tolist(), points.numpy(), step, self.cell_px, heading, captions,
                           note)
            for image, heat, image_tokens, points in zip(self._images, selected, tokens, peaks)
        ]
        folder = pl_module.run_dir() / "visualizations" / folder_name
        for i, picture in enumerate(pictures):
            save_png(picture, folder / f"image_{i}.png")
        logger = wandb_logger(trainer) if log else None
        if logger is not None:
            logger.log_image(key="attention/heatmaps", images=pictures,
                             caption=[f"image {i} · step {step}" for i in range(len(pictures))], step=step)


def attention_grid(
    image: Tensor,
    maps: Tensor,
    tokens: list[int],
    points_px: np.ndarray,
    step: int,
    cell_px: int,
    heading: str | None = None,
    captions: list[str] | None = None,
    note: str | None = None,
) -> Image.Image:
    """image (3, S, S), maps (k, R, R) of ``tokens`` (k,), their peaks points_px (k, 2) in pixels of a
    cell_px picture -> one grid: the peaks on the image, then each token's heat-map overlay, on one
    colour scale shown by a colour bar below. ``heading``/``captions`` title the first cell and the
    maps (default ``selected tokens · step s`` and ``token t · step s``); ``note`` is added to the
    colour bar's title (what the tokens are)."""
    base = to_pil(image).resize((cell_px, cell_px), Image.Resampling.BILINEAR)
    labels = [str(t) for t in tokens]
    heading = f"selected tokens · step {step}" if heading is None else heading
    captions = [f"token {t} · step {step}" for t in tokens] if captions is None else captions
    low, high = float(maps.min()), float(maps.max())
    cells = [captioned(draw_keypoints(base, points_px, labels, color_ids=tokens), heading)]
    for j, token in enumerate(tokens):
        heat = heatmap_overlay(base, maps[j], low=low, high=high)
        cells.append(captioned(draw_keypoints(heat, points_px[j : j + 1], labels[j : j + 1], color_ids=[token]),
                               captions[j]))
    picture = grid(cells, columns=math.ceil(math.sqrt(len(cells))))
    title = "attention probability, one scale for every map" + (f" · {note}" if note else "")
    return with_legend(picture, colorbar(picture.width, low, high, title))


def per_image_error(metric: Metric, preds: Tensor, target: Tensor, visible: Tensor) -> Tensor:
    """preds, target: (B, J, 2) normalized (x, y); visible: (B, J) -> (B,) ``metric`` per image."""
    if not hasattr(metric, "per_image"):
        raise TypeError(
            f"TestResultsTable needs {type(metric).__name__}.per_image(preds, target, visible) -> (B,) values, "
            "as the metrics of lightning_modules/metrics.py have."
        )
    return metric.per_image(preds, target, visible)


@dataclass
class _Example:
    path: str
    picture: Image.Image
    ground_truth: list[list[float] | None]
    prediction: list[list[float]]
    error: float


def _points(points: Tensor, visible: Tensor | None = None) -> list[list[float] | None]:
    """(J, 2) -> [[x, y], ...] rounded to 1e-4 (image side / 10 000), None where not visible."""
    keep = torch.ones(len(points), dtype=torch.bool) if visible is None else visible.bool()
    return [[round(float(x), 4), round(float(y), 4)] if shown else None for (x, y), shown in zip(points, keep)]


class TestResultsTable(Callback):
    """Up to ``max_rows`` scored test images: ground truth and the regressor's prediction drawn.

    Reads the test split's batches (dataloader 1) and the ``predictions`` (B, J, 2) that
    ``test_step`` returns for them, and scores each image with the functional twin of
    ``pl_module.evaluation.metric`` (its ``per_image``; for PCK the value is a percentage, higher is better).
    At the end of the test it writes ``<run_dir>/test_examples/example_{i:03d}.png`` (the model's
    input at display size, longer side in [256, 1024] px; blue disc: ground truth, orange square:
    prediction, white line: the error; the file name, the error and this legend on the picture) and ``examples.csv``
    (path, image, ground_truth, prediction, error; points normalized (x, y), ``null`` = not
    visible) and, with a W&B logger, a ``test/examples`` table of the same columns. Under DDP the
    rows are the first test images of rank 0's share.

    Args:
        max_rows: images kept, the first of the test split.
    """

    __test__ = False  # a Lightning callback, not a pytest class

    COLUMNS = ("path", "image", "ground_truth", "prediction", "error")

    def __init__(self, max_rows: int = 50) -> None:
        if max_rows < 1:
            raise ValueError(f"TestResultsTable max_rows={max_rows}: use a positive number.")
        self.max_rows = max_rows
        self._examples: list[_Example] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._examples = []

    @rank_zero_only
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict | None,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 1 or len(self._examples) >= self.max_rows:
            return
        if not isinstance(outputs, dict) or "predictions" not in outputs:
            raise RuntimeError(
                "TestResultsTable needs test_step to return {'predictions': (B, J, 2) normalized points} for the "
                "test split (dataloader 1); remove the callback or update the LightningModule."
            )
        preds = outputs["predictions"].detach().cpu()
        target, visible = batch["keypoints"].cpu(), batch["visible"].cpu()
        errors = per_image_error(pl_module.evaluation.metric, preds, target, visible)
        metric = type(pl_module.evaluation.metric).__name__
        for b in range(min(len(preds), self.max_rows - len(self._examples))):
            image, _ = fit_for_display(to_pil(batch["image"][b]))
            scale = np.array(image.size, dtype=np.float64)  # normalized -> pixels of the displayed image
            picture = draw_comparison(image, target[b].double().numpy() * scale, preds[b].double().numpy() * scale,
                                      visible[b].numpy())
            picture = captioned(picture, f"{Path(str(batch['path'][b])).name} · {metric} {float(errors[b]):.4g}")
            key = [(TRUTH_RGB, "ground truth"), (PREDICTION_RGB, "prediction", "square"), ((255, 255, 255), "error")]
            picture = with_legend(picture, legend(key, picture.width))
            self._examples.append(
                _Example(str(batch["path"][b]), picture, _points(target[b], visible[b]), _points(preds[b]),
                         float(errors[b]))
            )

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._examples:
            return
        folder = pl_module.run_dir() / "test_examples"
        names = [f"example_{i:03d}.png" for i in range(len(self._examples))]
        for name, example in zip(names, self._examples):
            save_png(example.picture, folder / name)
        metric = type(pl_module.evaluation.metric).__name__
        with (folder / "examples.csv").open("w", newline="") as file:
            file.write(f"# error: per-image {metric}; points: normalized (x, y) of the model's image, null = not "
                       "visible; pictures: blue disc = ground truth, orange square = prediction\n")
            writer = csv.writer(file)
            writer.writerow(self.COLUMNS)
            for name, example in zip(names, self._examples):
                writer.writerow([example.path, name, json.dumps(example.ground_truth), json.dumps(example.prediction),
                                 example.error])
        logger = wandb_logger(trainer)
        if logger is not None:
            import wandb

            data = [
                [e.path, wandb.Image(e.picture), json.dumps(e.ground_truth), json.dumps(e.prediction), e.error]
                for e in self._examples
            ]
            logger.log_table(key="test/examples", columns=list(self.COLUMNS), data=data)
        rank_zero_info(f"{len(self._examples)} scored test examples ({metric} per image) written to {folder}")
