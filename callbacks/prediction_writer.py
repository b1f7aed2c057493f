"""What ``predict`` leaves on disk: one index of keypoints in source-image pixels, and pictures of them."""

from __future__ import annotations

import csv
import io
import json
import re
import time
import zlib
from pathlib import Path
from typing import Any, Literal, TextIO

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
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
from lightning_modules.app import files
from lightning_modules.app.errors import ConfigError
from lightning_modules.app.run_folder import provenance

CONVENTION = (
    "x, y in pixels of the original image; origin at the top-left corner of the top-left pixel; "
    "x to the right, y down"
)
#: Side of each heat-map cell in pixels, whatever the model's input size S.
HEATMAP_CELL_PX = 256
#: Decimals kept for pixel coordinates in the index: a thousandth of a pixel is far below the error.
PIXEL_DECIMALS = 3
#: Folder of the per-rank JSON-lines shards, under the writer's output folder.
SHARD_DIR = "shards"
#: Module settings that change the keypoints of an image: a shard written with others is not reused.
IDENTITY_SETTINGS = ("augmentation_iterations", "feature_upsample_res", "soft_argmax_window_px", "noise_seed")


class KeypointWriter(BasePredictionWriter):
    """Writes the keypoints that ``predict`` finds, in pixels of each original image; resumable.

    ``predict_step`` returns ``keypoints`` (B, K, 2) normalized (x, y) in the model's image and
    ``keypoints_px`` (B, K, 2) (x, y) pixels of the source image; the image itself (``image``
    (B, 3, S, S)), its ``path`` and dataset ``index`` are read from the batch (``data/base.py``).

    Files, under ``output_dir``:
    - ``shards/rank-<global rank>.jsonl``: each process appends one JSON line per image (see
      ``image_record``) as soon as its batch is done, and flushes it; the first line names what the
      shard holds keypoints of (model, context checksum, extraction settings). A run killed at any
      point loses at most the batches in flight: the next ``predict`` into the same ``output_dir``
      (same checkpoint, same ``data.path``) skips every image already in a shard (the DataModule
      drops them before the distributed sampler splits the rest), and a shard of another model or
      context is an error instead of being mixed in.
    - ``keypoints.json``: at the end, every shard merged (each image once):
      ``{"convention", "keypoint_tokens", "model", "checkpoint", "config", "code_version", "skipped",
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

    Under DDP each rank writes its own shard and pictures; at the end each rank reads its own shard
    and rank 0 gathers the records (no shared filesystem needed) and writes the merged file. Every
    ``log_every_n_seconds`` rank 0 logs its progress and throughput (images/s), and the end of the
    run logs the total.

    Args:
        output_dir: folder of the files; ``None`` = the module's ``run_dir()`` (under the CLI the run's
            ``predict/<images>/``, see ``lightning_modules/app/run_folder.py``). Give a fixed folder (or
            the CLI's ``--output_dir``) to resume a killed run.
        format: merged file format, ``json`` or ``csv``.
        overlays: draw the keypoints on each original image (one PNG per image: turn it off for
            very large folders).
        heatmaps: also draw each keypoint's attention map (one more UNet pass per batch).
        log_every_n_seconds: interval of the progress and throughput lines in the log.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        format: Literal["json", "csv"] = "json",
        overlays: bool = True,
        heatmaps: bool = False,
        log_every_n_seconds: float = 60.0,
    ) -> None:
        super().__init__(write_interval="batch")
        if format not in ("json", "csv"):
            raise ValueError(f"KeypointWriter format={format!r}: use 'json' or 'csv'.")
        if log_every_n_seconds <= 0:
            raise ValueError(f"KeypointWriter log_every_n_seconds={log_every_n_seconds}: use a positive number.")
        self.output_dir = output_dir
        self.format = format
        self.overlays = overlays
        self.heatmaps = heatmaps
        self.log_every_n_seconds = log_every_n_seconds
        self._dir: Path | None = None
        self._checked = self._merged = False
        self._shard: TextIO | None = None
        self._already_done = 0
        self._written = 0
        self._to_write = 0
        self._start = self._last_log = 0.0

    # ------------------------------------------------------------------ resume
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._dir, self._checked, self._merged, self._written = None, False, False, 0
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "exclude_from_predict"):
            # Called when the predict loader is built: after the checkpoint is restored (the shard
            # identity needs the context) and after ModelCheckpoint has settled the run folder.
            datamodule.exclude_from_predict = lambda: self.finished_paths(trainer, pl_module)
        else:
            rank_zero_warn("KeypointWriter: the predict data has no KeypointDataModule, so images already in the "
                           "shards of an earlier run are predicted again (the merged file still lists each once).")

    def finished_paths(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        """Paths already in a shard of ``output_dir``, on every rank (one collective call per rank).

        Raises a ConfigError when a shard holds keypoints of another model, context or settings.
        """
        folder = self._resolve_dir(pl_module) / SHARD_DIR
        headers, paths = [], set()
        for shard in shard_files(folder):
            header, records = read_shard(shard)
            if header is not None or records:  # else killed before its first line was whole: nothing in it
                headers.append((str(shard), header))
            paths.update(record["path"] for record in records)
        parts = gather_objects(trainer, (headers, sorted(paths)), to_all=True)
        identity = shard_identity(trainer, pl_module)
        for part_headers, _ in parts:
            for shard, header in part_headers:
                if header != identity:
                    raise ConfigError(
                        f"{shard} holds keypoints of another model, context or settings ({header}, now {identity}): "
                        "give the KeypointWriter another output_dir, or delete that folder to predict from scratch."
                    )
        done = {path for _, part_paths in parts for path in part_paths}
        self._already_done, self._checked = len(done), True
        self._start = time.perf_counter()
        if done:
            rank_zero_info(f"{len(done)} images already have keypoints in {folder}: they are skipped.")
        return done

    def _resolve_dir(self, pl_module: L.LightningModule) -> Path:
        if self._dir is None:
            self._dir = Path(self.output_dir) if self.output_dir else pl_module.run_dir()
        return self._dir

    # ------------------------------------------------------------------ per batch
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._checked:  # the data did not ask (no KeypointDataModule): still refuse foreign shards
            self.finished_paths(trainer, pl_module)
        folder = self._resolve_dir(pl_module) / SHARD_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = drop_torn_line(folder / shard_name(trainer.global_rank))
        fresh = not path.exists() or path.stat().st_size == 0
        self._shard = path.open("a", encoding="utf-8")
        if fresh:
            self._shard.write(json.dumps({"shard": shard_identity(trainer, pl_module)}) + "\n")
            self._shard.flush()
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        self._to_write = sum(len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
                             for loader in loaders)
        self._written = 0
        self._start = self._last_log = time.perf_counter()

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
        lines = []
        for b, (name, index, path, points) in enumerate(zip(names, batch["index"], batch["path"], pixels)):
            # The upright frame the dataset cropped from (EXIF orientation applied).
            width, height = (int(v) for v in sizes[b]) if sizes is not None else upright_size(path)
            overlay = None
            if self.overlays:
                # read_image decodes as the datasets do: the pixels the points refer to.
                drawn = keypoint_overlay(read_image(path, background), points, tokens, inside[b])
                overlay = save_png(drawn, self._dir / "overlays" / name).relative_to(self._dir).as_posix()
            record = image_record(int(index), str(path), width, height, points, inside[b], overlay)
            lines.append(json.dumps(record) + "\n")
        if self.heatmaps:
            self._write_heatmaps(pl_module, batch["image"], prediction["keypoints"], names, batch_idx)
        # One write per batch, flushed: a kill loses at most the batch in flight (a torn last line is
        # ignored when the shard is read back, and its images are predicted again).
        self._shard.write("".join(lines))
        self._shard.flush()
        self._written += len(lines)
        self._log_progress(trainer)

    def _log_progress(self, trainer: L.Trainer) -> None:
        now = time.perf_counter()
        if now - self._last_log < self.log_every_n_seconds:
            return
        self._last_log = now
        rate = self._written / max(now - self._start, 1e-9)
        rank_zero_info(
            f"predict: {self._written}/{self._to_write} images on rank 0, {rate:.2f} images/s per process "
            f"(about {rate * trainer.world_size:.2f} images/s on {trainer.world_size} processes)"
        )

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

    # ------------------------------------------------------------------ merge
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._merge(trainer, pl_module)

    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_shard()
        self._merged = True
        seconds = time.perf_counter() - self._start
        # Each rank reads the shards it owns (rank r of W owns rank-i for i % W == r): on a shared
        # filesystem every shard is read once, on node-local disks each node reads its own.
        own = [path for path in shard_files(self._dir / SHARD_DIR) if shard_rank(path) % trainer.world_size == trainer.global_rank]
        records = [record for path in own for record in read_shard(path)[1]]
        parts = gather_objects(trainer, (records, self._written))
        if not trainer.is_global_zero:
            return
        rows = merge_records(record for part, _ in parts for record in part)
        new = sum(written for _, written in parts)
        header = {
            "convention": CONVENTION,
            "keypoint_tokens": pl_module.keypoint_tokens.tolist(),
            "model": pl_module.backbone.pretrained_model_name_or_path,
            "family": pl_module.backbone.family,
            **provenance(trainer, pl_module),
            "skipped": skipped_files(trainer),
        }
        path = self._write_json(header, rows) if self.format == "json" else self._write_csv(header, rows)
        message = (f"Keypoints of {len(rows)} images written to {path} ({new} predicted in {seconds:.1f} s: "
                   f"{new / max(seconds, 1e-9):.2f} images/s on {trainer.world_size} processes")
        message += f"; {self._already_done} from earlier runs)" if self._already_done else ")"
        if header["skipped"]:
            message += f" ({len(header['skipped'])} unreadable files skipped, listed there)"
        for folder, written in (("overlays", self.overlays), ("heatmaps", self.heatmaps)):
            if written:
                message += f"\n{folder} in {self._dir / folder}"
        rank_zero_info(message)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict" and self._checked and not self._merged:
            # Every image was in the shards already: Lightning skipped the empty loop, merge anyway.
            self._merge(trainer, pl_module)
        self._close_shard()
        if stage == "predict" and getattr(trainer.datamodule, "exclude_from_predict", None) is not None:
            trainer.datamodule.exclude_from_predict = None

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def _write_json(self, header: dict, rows: list[dict]) -> Path:
        path = self._dir / "keypoints.json"
        images = [{key: value for key, value in row.items() if key != "index"} for row in rows]
        return files.write_text(path, json.dumps({**header, "images": images}, indent=1) + "\n")

    def _write_csv(self, header: dict, rows: list[dict]) -> Path:
        text = io.StringIO(newline="")
        text.write(f"# {header['convention']}\n")
        text.write(f"# keypoint_tokens: {header['keypoint_tokens']}; model: {header['model']} ({header['family']}); "
                   f"checkpoint: {header['checkpoint']}; config: {header['config']}; "
                   f"code_version: {header['code_version']}\n")
        for skipped in header["skipped"]:
            text.write(f"# skipped: {skipped['path']} ({skipped['reason']})\n")
        writer = csv.writer(text)
        writer.writerow(["path", "width", "height", "k", "x", "y", "inside"])
        for row in rows:
            for k, ((x, y), inside) in enumerate(zip(row["keypoints"], row["inside"])):
                writer.writerow([row["path"], row["width"], row["height"], k, x, y, str(inside).lower()])
        return files.write_text(self._dir / "keypoints.csv", text.getvalue())


def image_record(
    index: int, path: str, width: int, height: int, points_px: np.ndarray, inside: np.ndarray, overlay: str | None
) -> dict:
    """points_px: (K, 2) (x, y) upright source pixels, inside: (K,) bool -> the record of one image.

    The one place a record is built: shards and the merged file hold exactly this. ``index`` is the
    image's position in the dataset (it orders the merged file and is left out of it); ``overlay``
    the overlay PNG relative to the output folder, or None when none is drawn.
    """
    record = {"index": index, "path": path, "width": width, "height": height,
              "keypoints": np.round(points_px, PIXEL_DECIMALS).tolist(), "inside": np.asarray(inside, bool).tolist()}
    if overlay is not None:
        record["overlay"] = overlay
    return record


def shard_identity(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """What a shard holds keypoints of: the model, a checksum of the context, the extraction settings."""
    context = pl_module.context.detach().float().cpu().contiguous().numpy()
    settings = {key: pl_module.hparams.get(key) for key in IDENTITY_SETTINGS}
    datamodule = trainer.datamodule
    settings["image_size"] = getattr(datamodule, "image_size", None)
    return {"model": str(pl_module.backbone.pretrained_model_name_or_path),
            "context_crc32": zlib.crc32(context.tobytes()), "settings": settings}


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.jsonl"


def shard_rank(path: Path) -> int:
    return int(path.stem.removeprefix("rank-"))


def shard_files(folder: Path) -> list[Path]:
    """The shards of ``folder`` (``rank-<n>.jsonl``), by rank; [] when there is none."""
    return sorted(folder.glob("rank-*.jsonl"), key=shard_rank) if folder.is_dir() else []


def read_shard(path: Path) -> tuple[dict | None, list[dict]]:
    """-> (identity header, image records) of one shard; a torn last line (a kill mid-write) is dropped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    # A complete shard ends with a newline, so the last piece is "" or a line cut short by a kill.
    lines = lines[:-1]
    header, records = None, []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not a JSON line ({error}): the shard is damaged; delete it to "
                             "predict its images again.") from error
        if number == 1 and "shard" in entry:
            header = entry["shard"]
        else:
            records.append(entry)
    return header, records


def drop_torn_line(path: Path) -> Path:
    """Cuts a line left unfinished by a kill off the end of ``path`` (if any), so appending stays valid."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as file:
                file.truncate(data.rfind(b"\n") + 1)
    return path


def merge_records(records) -> list[dict]:
    """Records of any number of shards -> each path once (the first seen), in dataset order."""
    unique: dict[str, dict] = {}
    for record in records:
        unique.setdefault(record["path"], record)
    return sorted(unique.values(), key=lambda record: (record["index"], record["path"]))


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


def gather_objects(trainer: L.Trainer, obj: Any, to_all: bool = False) -> list[Any]:
    """Every rank's ``obj``, by rank: on rank 0 only (others get []), or on every rank with ``to_all``.

    One collective call: every rank must make it.
    """
    if trainer.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    if to_all:
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    torch.distributed.gather_object(obj, gathered if trainer.is_global_zero else None, dst=0)
    return gathered if trainer.is_global_zero else []


def skipped_files(trainer: L.Trainer) -> list[dict[str, str]]:
    """Files the DataModule left out because they could not be decoded (``KeypointDataModule.unreadable``)."""
    return [{"path": str(path), "reason": reason} for path, reason in getattr(trainer.datamodule, "unreadable", ())]
