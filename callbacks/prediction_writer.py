"""What ``predict`` leaves on disk: one index of keypoints in source-image pixels, and pictures of them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from callbacks.drawing import (
    PALETTE,
    captioned,
    colorbar,
    draw_keypoints,
    fit_for_display,
    grid,
    heatmap_overlay,
    legend,
    save_png,
    to_pil,
    with_legend,
)
from data.images import GRAY_RGB, read_image, upright_size
from lightning_modules.run_folder import provenance

CONVENTION = (
    "x, y in pixels of the original image; origin at the top-left corner of the top-left pixel; "
    "x to the right, y down"
)
#: Side of each heat-map cell in pixels, whatever the model's input size S.
HEATMAP_CELL_PX = 256
#: Decimals kept for pixel coordinates in the index: a thousandth of a pixel is far below the error.
PIXEL_DECIMALS = 3


class KeypointWriter(BasePredictionWriter):
    """Writes the keypoints that ``predict`` finds, in pixels of each original image.

    ``predict_step`` returns ``keypoints`` (B, K, 2) normalized (x, y) in the model's image and
    ``keypoints_px`` (B, K, 2) (x, y) pixels of the source image; the image itself (``image``
    (B, 3, S, S)), its ``path`` and dataset ``index`` are read from the batch (``data/base.py``).

    Files, under ``output_dir``:
    - ``keypoints.json``: ``{"convention", "keypoint_tokens", "model", "checkpoint", "config",
      "code_version", "skipped",
      "images": [{"path", "width", "height", "keypoints": [[x, y], ...], "inside": [bool, ...],
      "overlay"}]}``, images in dataset order. ``width``/``height`` and the points refer to the
      upright image (EXIF orientation applied, as a viewer shows it); ``inside[k]`` says whether
      point k lies on the photo rather than in the padding that made it square (always true unless
      ``model.predict_within_image`` is off). ``overlay`` (the PNG's path relative to
      ``output_dir``) only with ``overlays``; ``skipped`` lists the files left out because they
      could not be decoded (``path``, ``reason``; ``data.skip_unreadable``).
      Or ``keypoints.csv``: rows ``path,width,height,k,x,y,inside`` after ``#`` comment lines (the
      convention, the tokens, the model and the skipped files).
    - ``overlays/<index>_<stem>.png``: the upright original with keypoint k drawn and numbered in
      colour k (the same colour in every image), shown with its longer side in [256, 1024] px
      (``callbacks.drawing.fit_for_display``), above a legend of each number's token.
    - ``heatmaps/<index>_<stem>.png`` (``heatmaps=True``): per keypoint, its attention map over the
      model's S x S input, with the predicted point, all on one colour scale shown by a colour bar.
      The maps come from one extra pass of the model without augmentation (noise seeded by the
      batch index), while the points average ``augmentation_iterations`` augmented passes, so a
      map's peak can sit slightly off its point.

    Under DDP each rank draws the images it predicted; the index rows are gathered so that rank 0
    writes one index file.

    Args:
        output_dir: folder of the files; ``None`` = the module's ``run_dir()`` (under the CLI the run's
            ``predict/<images>/``, see ``lightning_modules/run_folder.py``).
        format: index file format, ``json`` or ``csv``.
        overlays: draw the keypoints on each original image.
        heatmaps: also draw each keypoint's attention map (one more UNet pass per batch).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        format: Literal["json", "csv"] = "json",
        overlays: bool = True,
        heatmaps: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if format not in ("json", "csv"):
            raise ValueError(f"KeypointWriter format={format!r}: use 'json' or 'csv'.")
        self.output_dir = output_dir
        self.format = format
        self.overlays = overlays
        self.heatmaps = heatmaps
        self._rows: list[dict[str, Any]] = []
        self._dir: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []
        self._dir = Path(self.output_dir) if self.output_dir else pl_module.run_dir()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict,
        batch_indices: Any,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        pixels = prediction["keypoints_px"].detach().cpu().double().numpy()  # (B, K, 2)
        inside = prediction.get("inside")
        inside = np.ones(pixels.shape[:2], bool) if inside is None else inside.detach().cpu().numpy()
        sizes = batch.get("source_size")
        tokens = pl_module.keypoint_tokens.tolist()
        background = getattr(trainer.datamodule, "background_rgb", GRAY_RGB)
        names = [overlay_name(int(index), path) for index, path in zip(batch["index"], batch["path"])]
        for b, (name, index, path, points) in enumerate(zip(names, batch["index"], batch["path"], pixels)):
            # The upright frame the dataset cropped from (EXIF orientation applied).
            width, height = (int(v) for v in sizes[b]) if sizes is not None else upright_size(path)
            row = {"index": int(index), "path": str(path), "width": width, "height": height,
                   "keypoints": np.round(points, PIXEL_DECIMALS).tolist(), "inside": inside[b].tolist()}
            if self.overlays:
                # read_image decodes as the datasets do: the pixels the points refer to.
                overlay = keypoint_overlay(read_image(path, background), points, tokens, inside[b])
                row["overlay"] = save_png(overlay, self._dir / "overlays" / name).relative_to(self._dir).as_posix()
            self._rows.append(row)
        if self.heatmaps:
            self._write_heatmaps(pl_module, batch["image"], prediction["keypoints"], names, batch_idx)

    def _write_heatmaps(
        self,
        pl_module: L.LightningModule,
        images: torch.Tensor,
        keypoints: torch.Tensor,
        names: list[str],
        batch_idx: int,
    ) -> None:
        """images: (B, 3, S, S) in [0, 1]; keypoints: (B, K, 2) normalized -> one grid PNG per image."""
        tokens = pl_module.keypoint_tokens
        generator = torch.Generator(device=pl_module.device).manual_seed(batch_idx)
        maps = pl_module.maps_of(images.to(pl_module.device), generator)[:, tokens].float().cpu()  # (B, K, R, R)
        for name, image, heat, points in zip(names, images, maps, keypoints.detach().cpu().double().numpy()):
            base, _ = fit_for_display(to_pil(image), HEATMAP_CELL_PX, HEATMAP_CELL_PX)
            points = points * base.width
            low, high = float(heat.min()), float(heat.max())
            cells = [
                captioned(
                    draw_keypoints(heatmap_overlay(base, heat[k], low=low, high=high), points[k : k + 1], [str(k)],
                                   color_ids=[k]),
                    f"keypoint {k} · token {int(tokens[k])}",
                )
                for k in range(len(tokens))
            ]
            picture = grid(cells, columns=5)
            bar = colorbar(picture.width, low, high, "attention probability (one scale for every map)")
            save_png(with_legend(picture, bar), self._dir / "heatmaps" / name)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = sorted(gather_rows(trainer, self._rows), key=lambda row: row["index"])
        if not trainer.is_global_zero:
            return
        header = {
            "convention": CONVENTION,
            "keypoint_tokens": pl_module.keypoint_tokens.tolist(),
            "model": pl_module.backbone.pretrained_model_name_or_path,
            **provenance(trainer, pl_module),
            "skipped": skipped_files(trainer),
        }
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._write_json(header, rows) if self.format == "json" else self._write_csv(header, rows)
        message = f"Keypoints of {len(rows)} images written to {path}"
        if header["skipped"]:
            message += f" ({len(header['skipped'])} unreadable files skipped, listed there)"
        for folder, written in (("overlays", self.overlays), ("heatmaps", self.heatmaps)):
            if written:
                message += f"\n{folder} in {self._dir / folder}"
        rank_zero_info(message)

    def _write_json(self, header: dict, rows: list[dict]) -> Path:
        path = self._dir / "keypoints.json"
        images = [{key: value for key, value in row.items() if key != "index"} for row in rows]
        path.write_text(json.dumps({**header, "images": images}, indent=1) + "\n")
        return path

    def _write_csv(self, header: dict, rows: list[dict]) -> Path:
        path = self._dir / "keypoints.csv"
        with path.open("w", newline="") as file:
            file.write(f"# {header['convention']}\n")
            file.write(f"# keypoint_tokens: {header['keypoint_tokens']}; model: {header['model']}; "
                       f"checkpoint: {header['checkpoint']}; config: {header['config']}; "
                       f"code_version: {header['code_version']}\n")
            for skipped in header["skipped"]:
                file.write(f"# skipped: {skipped['path']} ({skipped['reason']})\n")
            writer = csv.writer(file)
            writer.writerow(["path", "width", "height", "k", "x", "y", "inside"])
            for row in rows:
                for k, ((x, y), inside) in enumerate(zip(row["keypoints"], row["inside"])):
                    writer.writerow([row["path"], row["width"], row["height"], k, x, y, str(inside).lower()])
        return path


def keypoint_overlay(
    image: Image.Image, points_px: np.ndarray, tokens: list[int], inside: np.ndarray | None = None
) -> Image.Image:
    """The image at display size (``fit_for_display``) with points_px (K, 2) drawn, above their legend.

    points_px are continuous (x, y) pixels of ``image``; the legend names each number's token and
    marks the points outside the photo (in the padding of its square crop, so not drawn).
    """
    display, scale = fit_for_display(image)
    inside = np.ones(len(points_px), bool) if inside is None else np.asarray(inside, bool)
    drawn = draw_keypoints(display, np.asarray(points_px, dtype=np.float64) * scale)
    entries = [
        (PALETTE[k % len(PALETTE)], f"{k}: token {token}" + ("" if inside[k] else " (outside the photo)"))
        for k, token in enumerate(tokens[: len(points_px)])
    ]
    return with_legend(drawn, legend(entries, drawn.width))


def overlay_name(index: int, path: str) -> str:
    """``<index>_<stem>.png``: the dataset index keeps equal file names in different folders apart."""
    stem = re.sub(r"[^\w.-]+", "_", Path(path).stem)[:80]
    return f"{index:06d}_{stem}.png"


def gather_rows(trainer: L.Trainer, rows: list[dict]) -> list[dict]:
    """Every rank's rows, on every rank (one collective call; each rank must call it)."""
    if trainer.world_size == 1:
        return list(rows)
    gathered: list[list[dict] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def skipped_files(trainer: L.Trainer) -> list[dict[str, str]]:
    """Files the DataModule left out because they could not be decoded (``KeypointDataModule.unreadable``)."""
    return [{"path": str(path), "reason": reason} for path, reason in getattr(trainer.datamodule, "unreadable", ())]
