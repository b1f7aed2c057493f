"""Drawing helpers, the prediction writer and the visualization callbacks, on a stub model (no diffusion)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from callbacks.drawing import (
    PALETTE,
    PREDICTION_RGB,
    TRUTH_RGB,
    VIRIDIS_LUT,
    draw_comparison,
    draw_keypoints,
    grid,
    heatmap_overlay,
    save_png,
    to_pil,
)
from callbacks.prediction_writer import CONVENTION, KeypointWriter
from callbacks.visualization import AttentionVisualizer, TestResultsTable, per_image_error
from data.folder import ImageFolderDataModule
from lightning_modules.keypoints import inside_region, to_source_pixels
from lightning_modules.metrics import NormalizedKeypointError, normalized_keypoint_error
from lightning_modules.selection import select_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: K = 3 keypoints, normalized (x, y) in the model's image.
POINTS = torch.tensor([[0.25, 0.5], [0.5, 0.5], [0.75, 0.6]])
TOKENS = [3, 0, 7]
DARK = (20, 20, 20)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def close_to(pixel: tuple[int, ...], rgb: tuple[int, int, int], tol: int = 2) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, rgb))


class StubKeypointModel(L.LightningModule):
    """Stands in for StableKeypoints: the attributes the callbacks use, Gaussian maps, fixed keypoints."""

    def __init__(self, run_dir: str, num_tokens: int = 12, resolution: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["run_dir"])
        self.hparams.update(top_k=3, furthest_point_num_samples=6, selection="gaussian", sigma_px=1.0)
        self.context = nn.Parameter(torch.zeros(num_tokens))
        self.register_buffer("keypoint_tokens", torch.tensor(TOKENS))
        self.backbone = nn.Module()
        self.backbone.pretrained_model_name_or_path = "stub/model"
        self.backbone.family = "StubFamily"
        self._run_dir = Path(run_dir)
        self.evaluation = None
        self.points = POINTS  # what predict_step finds in every image

    def run_dir(self) -> Path:
        return self._run_dir

    def maps_of(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, S, S) -> (B, T, R, R): token t peaks at a fixed pixel; per-pixel softmax over tokens."""
        size = self.hparams.resolution
        centres = torch.rand(self.hparams.num_tokens, 2, generator=torch.Generator().manual_seed(0)) * size
        coords = torch.arange(size) + 0.5
        dx = coords[None, None, :] - centres[:, 0, None, None]
        dy = coords[None, :, None] - centres[:, 1, None, None]
        d2 = dx**2 + dy**2
        logits = -d2 / 2 + self.context[:, None, None].detach().cpu()
        return logits.softmax(0).expand(len(images), -1, -1, -1).to(images.device)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return ((self.context - 1) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.context], lr=0.1)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        keypoints = self.points.expand(len(batch["image"]), -1, -1)
        pixels = to_source_pixels(keypoints, batch["crop_box"], batch.get("flipped"))
        inside = inside_region(keypoints, batch["image_region"])
        return {"path": batch["path"], "keypoints": keypoints, "keypoints_px": pixels, "inside": inside}

    def select(self, maps: Tensor) -> Tensor:
        hp = self.hparams
        return select_tokens(maps, hp.top_k, hp.furthest_point_num_samples, hp.selection, hp.sigma_px)

    def on_test_start(self) -> None:
        self.evaluation = SimpleNamespace(metric=NormalizedKeypointError())

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        if dataloader_idx == 0:
            return None
        predictions = batch["keypoints"] + 0.05
        self.evaluation.metric.update(predictions, batch["keypoints"], batch["visible"])
        return {"keypoints": predictions, "predictions": predictions}


class LabelledImages(Dataset):
    """Random 32 x 32 images with J = 4 keypoints, the last one invisible."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {
            "image": torch.rand(3, 32, 32, generator=generator),
            "index": index,
            "path": f"image_{index}.jpg",
            "keypoints": torch.rand(4, 2, generator=generator) * 0.8 + 0.1,
            "visible": torch.tensor([True, True, True, False]),
        }


class StubDataModule(L.LightningDataModule):
    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.dataset = LabelledImages(size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2)

    def keypoint_index_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2)

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.dataset, batch_size=2), DataLoader(self.dataset, batch_size=4)]


class RecordingWandbLogger(WandbLogger):
    """Lightning's WandbLogger with W&B disabled (no run, no files); records the images and tables."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__(save_dir=str(save_dir), mode="disabled")
        self.calls: list[tuple[str, dict]] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
        self.calls.append(("image", {"key": key, "images": images, "step": step, **kwargs}))
        super().log_image(key, images, step, **kwargs)

    def log_table(self, key: str, columns=None, data=None, dataframe=None, step=None) -> None:
        self.calls.append(("table", {"key": key, "columns": columns, "data": data}))
        super().log_table(key, columns, data, dataframe, step)


@pytest.fixture
def recording_wandb(tmp_path):
    logger = RecordingWandbLogger(tmp_path)
    yield logger
    import wandb

    wandb.finish()  # the next WandbLogger would otherwise reuse this (disabled) run


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    kwargs = {"devices": 1, "logger": False, "log_every_n_steps": 1, **kwargs}
    return L.Trainer(accelerator="cpu", default_root_dir=tmp_path, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A 64 x 32 PNG, a 40 x 60 JPEG in a subfolder and an unreadable file."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 32), DARK).save(folder / "wide.png")
    Image.new("RGB", (40, 60), DARK).save(folder / "sub" / "tall.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


# Source pixels of POINTS: wide.png pads to the square (0, -16, 64, 48), tall.jpg to (-10, 0, 50, 60).
EXPECTED_PX = {
    "sub/tall.jpg": [[5.0, 30.0], [20.0, 30.0], [35.0, 36.0]],
    "wide.png": [[16.0, 16.0], [32.0, 16.0], [48.0, 22.4]],
}


# ------------------------------------------------------------------ drawing
def test_to_pil_maps_unit_range_to_bytes():
    image = torch.zeros(3, 5, 7)
    image[0] = 1.0
    pil = to_pil(image)
    assert pil.size == (7, 5) and pil.mode == "RGB"
    assert pil.getpixel((3, 2)) == (255, 0, 0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_pil(torch.zeros(1, 3, 5, 7))


def test_draw_keypoints_colours_each_point_and_leaves_the_input_alone():
    image = Image.new("RGB", (100, 80), DARK)
    points = np.array([[10.5, 20.5], [50.5, 60.5], [90.5, 10.5]])
    out = draw_keypoints(image, points, radius=4)
    assert out.size == image.size
    for k, (x, y) in enumerate(points):
        assert out.getpixel((int(x), int(y))) == PALETTE[k]
    assert image.getpixel((10, 20)) == DARK
    recoloured = draw_keypoints(image, points[:1], labels=["tok"], color_ids=[12], radius=4)
    assert recoloured.getpixel((10, 20)) == PALETTE[12]
    with pytest.raises(ValueError, match="labels"):
        draw_keypoints(image, points, labels=["0"])


def test_labels_at_the_border_stay_on_the_picture():
    image = Image.new("RGB", (100, 80), DARK)
    # A point in the top-right corner: its label goes below and to the left instead of off the picture.
    out = np.asarray(draw_keypoints(image, np.array([[97.5, 6.5]]), labels=["88"], radius=6)).astype(int)
    label = np.abs(out - PALETTE[0]).sum(-1) < 60
    label[:13, 91:] = False  # the disc itself (y 0..12, x 91..99)
    rows, cols = label.nonzero()
    # Above-right would put the text at y < 0 and x > 100; it sits below (y >= 13), left of the disc.
    assert len(rows) > 20 and rows.min() >= 13 and cols.max() < 91


def test_heatmap_overlay_is_resized_and_peaks_in_the_top_colour():
    image = Image.new("RGB", (64, 48), DARK)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[2, 6] = 1.0  # pixel (x=6, y=2) of the map -> around (52, 14) of the image
    out = heatmap_overlay(image, heat, alpha=1.0)
    assert out.size == image.size
    assert close_to(out.getpixel((52, 14)), tuple(VIRIDIS_LUT[255]), tol=60)
    assert close_to(out.getpixel((4, 44)), tuple(VIRIDIS_LUT[0]))
    assert close_to(heatmap_overlay(image, heat, alpha=0.0).getpixel((52, 14)), DARK)


def test_draw_comparison_marks_visible_truth_and_prediction_only():
    image = Image.new("RGB", (64, 64), DARK)
    target = np.array([[10.5, 10.5], [40.5, 40.5]])
    preds = np.array([[20.5, 10.5], [50.5, 50.5]])
    out = draw_comparison(image, target, preds, visible=np.array([True, False]), radius=3)
    assert out.getpixel((10, 10)) == TRUTH_RGB and out.getpixel((20, 10)) == PREDICTION_RGB
    assert out.getpixel((40, 40)) == DARK and out.getpixel((50, 50)) == DARK


def test_grid_size_and_png_bytes(tmp_path):
    cells = [Image.new("RGB", (10, 20), PALETTE[i]) for i in range(3)]
    out = grid(cells, columns=2, padding_px=4)
    assert out.size == (2 * 10 + 3 * 4, 2 * 20 + 3 * 4)
    assert out.getpixel((4 + 5, 4 + 20 + 4 + 5)) == PALETTE[2]  # the third cell starts the second row
    path = save_png(out, tmp_path / "a" / "grid.png")
    assert is_png(path)
    with pytest.raises(ValueError, match=".png"):
        save_png(out, tmp_path / "grid.jpg")


# ------------------------------------------------------------------ prediction writer
def predict(tmp_path: Path, folder: Path, writer: KeypointWriter) -> StubKeypointModel:
    model = StubKeypointModel(str(tmp_path / "run"))
    data = ImageFolderDataModule(str(folder), image_size=32, batch_size=2, num_workers=0, skip_unreadable=True)
    with pytest.warns(UserWarning, match="broken.jpg"):
        trainer(tmp_path, [writer]).predict(model, datamodule=data, return_predictions=False)
    return model


def test_keypoint_writer_json_overlays_and_heatmaps(tmp_path, image_folder):
    predict(tmp_path, image_folder, KeypointWriter(heatmaps=True))
    out = tmp_path / "run"  # the default: the module's run_dir()
    index = json.loads((out / "keypoints.json").read_text())
    assert index["convention"] == CONVENTION
    assert index["keypoint_tokens"] == TOKENS and (index["model"], index["family"]) == ("stub/model", "StubFamily")
    assert [Path(s["path"]).name for s in index["skipped"]] == ["broken.jpg"]
    found = {Path(e["path"]).relative_to(image_folder).as_posix(): e["keypoints"] for e in index["images"]}
    assert found == EXPECTED_PX
    sizes = {Path(e["path"]).name: (e["width"], e["height"]) for e in index["images"]}
    assert sizes == {"tall.jpg": (40, 60), "wide.png": (64, 32)}
    assert all(e["inside"] == [True, True, True] for e in index["images"])
    for entry in index["images"]:
        overlay_path = out / entry["overlay"]
        assert is_png(overlay_path)
        overlay = Image.open(overlay_path).convert("RGB")
        # The small originals are enlarged to a 256 px longer side, with the legend below.
        scale = 256 / max(entry["width"], entry["height"])
        assert overlay.width == round(entry["width"] * scale) and overlay.height > round(entry["height"] * scale)
        for k, (x, y) in enumerate(entry["keypoints"]):
            assert overlay.getpixel((int(x * scale), int(y * scale))) == PALETTE[k]
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert [p.name for p in heatmaps] == [Path(e["overlay"]).name for e in index["images"]]
    assert all(is_png(p) for p in heatmaps)


def test_keypoint_writer_csv(tmp_path, image_folder):
    predict(tmp_path, image_folder, KeypointWriter(output_dir=str(tmp_path / "out"), format="csv", overlays=False))
    lines = (tmp_path / "out" / "keypoints.csv").read_text().splitlines()
    assert lines[0] == f"# {CONVENTION}"
    assert "; model: stub/model (StubFamily);" in lines[1]
    assert any(line.startswith("# skipped:") and "broken.jpg" in line for line in lines)
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(rows) == 2 * len(POINTS)
    wide = [r for r in rows if r["path"].endswith("wide.png")]
    assert [(r["width"], r["height"], r["k"], r["inside"]) for r in wide] == [("64", "32", str(k), "true") for k in range(3)]
    assert [[float(r["x"]), float(r["y"])] for r in wide] == EXPECTED_PX["wide.png"]
    assert not (tmp_path / "out" / "overlays").exists()


def test_keypoint_writer_rejects_unknown_format():
    with pytest.raises(ValueError, match="'json' or 'csv'"):
        KeypointWriter(format="xml")


# ------------------------------------------------------------------ attention visualizer
class RanksTokensAfterFit(StubKeypointModel):
    """Like StableKeypoints: no keypoint tokens while training, TOKENS once fit ends."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.keypoint_tokens = torch.empty(0, dtype=torch.long)

    def on_train_end(self) -> None:
        self.keypoint_tokens = torch.tensor(TOKENS)


def test_attention_visualizer_writes_pngs_at_start_and_every_n_steps(tmp_path, monkeypatch):
    import callbacks.visualization as visualization

    drawn = []
    original = visualization.attention_grid
    monkeypatch.setattr(visualization, "attention_grid",
                        lambda *args: drawn.append((args[2], args[7], args[8])) or original(*args))
    model = RanksTokensAfterFit(str(tmp_path / "run"))
    visualizer = AttentionVisualizer(every_n_steps=2, num_images=3, max_tokens=2, cell_px=48)
    logger = CSVLogger(tmp_path / "logs")
    trainer(tmp_path, [visualizer], logger=logger, max_steps=4).fit(model, datamodule=StubDataModule())
    folder = tmp_path / "run" / "visualizations"
    assert sorted(p.name for p in folder.iterdir()) == ["final", "step_000000", "step_000002", "step_000004"]
    # During training: each image's selected tokens, labelled as such; at the end the final keypoint tokens.
    assert all("keypoint tokens are ranked after fit" in note for _, _, note in drawn[:-3])
    assert [tokens for tokens, _, _ in drawn[-3:]] == [TOKENS[:2]] * 3
    assert all(note == "the final keypoint tokens" for _, _, note in drawn[-3:])
    assert all(captions is None for _, captions, _ in drawn[:-3])
    assert drawn[-1][1] == ["keypoint 0 · token 3 · step 4", "keypoint 1 · token 0 · step 4"]
    assert len(list((folder / "final").glob("image_*.png"))) == 3
    pictures = sorted((folder / "step_000004").glob("*.png"))
    assert [p.name for p in pictures] == ["image_0.png", "image_1.png", "image_2.png"]
    assert all(is_png(p) for p in pictures)
    # 1 + max_tokens cells of 48 px (plus captions) in 2 columns.
    assert Image.open(pictures[0]).width == 2 * 48 + 3 * 4


def test_attention_visualizer_logs_to_wandb(tmp_path, recording_wandb):
    model = StubKeypointModel(str(tmp_path / "run"))
    logger = recording_wandb
    visualizer = AttentionVisualizer(every_n_steps=1, num_images=2, max_tokens=3, cell_px=32)
    trainer(tmp_path, [visualizer], logger=logger, max_steps=1).fit(model, datamodule=StubDataModule())
    kinds = [(kind, call["key"], call["step"]) for kind, call in logger.calls]
    assert kinds == [("image", "attention/heatmaps", 0), ("image", "attention/heatmaps", 1)]
    call = logger.calls[-1][1]
    assert len(call["images"]) == 2 and call["caption"] == ["image 0 · step 1", "image 1 · step 1"]


# ------------------------------------------------------------------ test results table
def test_test_results_table_writes_pngs_and_csv(tmp_path):
    model = StubKeypointModel(str(tmp_path / "run"))
    data = StubDataModule(size=6)
    trainer(tmp_path, [TestResultsTable(max_rows=5)]).test(model, datamodule=data)
    folder = tmp_path / "run" / "test_examples"
    lines = (folder / "examples.csv").read_text().splitlines()
    assert lines[0].startswith("# error: per-image NormalizedKeypointError")
    rows = list(csv.DictReader(lines[1:]))
    assert len(rows) == 5
    batch = next(iter(DataLoader(data.dataset, batch_size=5)))
    expected = normalized_keypoint_error(batch["keypoints"] + 0.05, batch["keypoints"], batch["visible"])
    np.testing.assert_allclose([float(r["error"]) for r in rows], expected.numpy(), rtol=1e-6)
    assert json.loads(rows[0]["ground_truth"])[3] is None  # the invisible keypoint
    assert all(is_png(folder / r["image"]) for r in rows)


def test_test_results_table_logs_a_wandb_table(tmp_path, recording_wandb):
    logger = recording_wandb
    trainer(tmp_path, [TestResultsTable(max_rows=3)], logger=logger).test(
        StubKeypointModel(str(tmp_path / "run")), datamodule=StubDataModule()
    )
    (call,) = [call for kind, call in logger.calls if kind == "table"]
    assert call["key"] == "test/examples" and call["columns"] == list(TestResultsTable.COLUMNS)
    assert len(call["data"]) == 3 and type(call["data"][0][1]).__name__ == "Image"


def test_test_results_table_explains_a_missing_prediction(tmp_path):
    class Silent(StubKeypointModel):
        def test_step(self, batch, batch_idx, dataloader_idx=0):
            super().test_step(batch, batch_idx, dataloader_idx)

    with pytest.raises(RuntimeError, match="test_step to return"):
        trainer(tmp_path, [TestResultsTable()]).test(Silent(str(tmp_path)), datamodule=StubDataModule())


def test_per_image_error_needs_a_known_metric():
    points = torch.zeros(1, 2, 2)
    with pytest.raises(TypeError, match="per_image"):
        per_image_error(torch.nn.Identity(), points, points, torch.ones(1, 2, dtype=torch.bool))


# ------------------------------------------------------------------ pictures at a size a person can read
def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, discs and sensor-like noise: compresses like a photo, not like a flat test card."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([xs / width * 200, ys / height * 180, (xs + ys) / (width + height) * 255], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.03, 0.2) * min(width, height)
        pixels[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(("size", "shown"), [((4000, 3000), (1024, 768)), ((20, 15), (256, 192)), ((600, 400), (600, 400))])
def test_overlay_long_side_is_clamped_and_legend_is_on_the_picture(tmp_path, size, shown):
    from callbacks.prediction_writer import keypoint_overlay

    image = photo_like(*size)
    points = np.array([[0.25, 0.5], [0.5, 0.5], [0.75, 0.6]]) * np.array(size)
    overlay = keypoint_overlay(image, points, TOKENS, np.array([True, True, False]))
    assert overlay.width == shown[0] and shown[1] < overlay.height < shown[1] + 80  # the legend strip below
    scale = shown[0] / size[0]
    for k, (x, y) in enumerate(points[:2]):
        assert overlay.getpixel((int(x * scale), int(y * scale))) == PALETTE[k]
    legend_strip = np.asarray(overlay)[shown[1]:]
    assert all((legend_strip == PALETTE[k]).all(-1).any() for k in range(3))  # a swatch per keypoint
    path = save_png(overlay, tmp_path / "overlay.png")
    assert path.stat().st_size < 3_000_000  # was 7.8 MB for a 4000 x 3000 photo at full size


def test_display_scale_bounds():
    from callbacks.drawing import display_scale

    assert display_scale(4000, 3000) == 1024 / 4000 and display_scale(20, 15) == 256 / 20
    assert display_scale(300, 500) == 1.0 and display_scale(300, 500, 600, 800) == 600 / 500
    with pytest.raises(ValueError, match="min_px"):
        display_scale(10, 10, 500, 100)


def test_colorbar_spans_the_shared_scale_of_a_heatmap_grid():
    from callbacks.drawing import colorbar, colorize

    bar = np.asarray(colorbar(300, 0.0, 0.5, "attention"))
    row = bar[(bar == VIRIDIS_LUT[0]).all(-1).any(1)][0]  # a row of the bar itself
    assert (row == VIRIDIS_LUT[0]).all(-1).any() and (row == VIRIDIS_LUT[255]).all(-1).any()
    # One scale for several maps: a map reaching half of the shared maximum is drawn mid-scale.
    half = colorize(np.array([[0.0, 0.25]]), low=0.0, high=0.5)
    assert half[0, 1].tolist() == VIRIDIS_LUT[128].tolist()
    assert colorize(np.array([[0.0, 0.25]]))[0, 1].tolist() == VIRIDIS_LUT[255].tolist()  # per map by default


def test_test_examples_are_enlarged_with_their_legend(tmp_path):
    model = StubKeypointModel(str(tmp_path / "run"))
    trainer(tmp_path, [TestResultsTable(max_rows=2)]).test(model, datamodule=StubDataModule(size=2))
    picture = np.asarray(Image.open(tmp_path / "run" / "test_examples" / "example_000.png").convert("RGB"))
    assert picture.shape[1] == 256 and picture.shape[0] > 256 + 20  # 32 px inputs shown at 256, caption + legend
    below = picture[-30:]
    assert (below == TRUTH_RGB).all(-1).any() and (below == PREDICTION_RGB).all(-1).any()


def test_keypoint_writer_panorama_and_phone_photo(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo_like(1200, 300).save(folder / "panorama.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400 x 300, shown turned 90 degrees clockwise: 300 x 400
    photo_like(400, 300, seed=1).save(folder / "phone.jpg", exif=exif, quality=90)
    model = StubKeypointModel(str(tmp_path / "run"))
    model.points = torch.tensor([[0.5, 0.1], [0.5, 0.5], [0.9, 0.7]])
    data = ImageFolderDataModule(str(folder), image_size=32, batch_size=2, num_workers=0)
    trainer(tmp_path, [KeypointWriter(output_dir=str(tmp_path / "out"))]).predict(model, datamodule=data,
                                                                               return_predictions=False)
    images = {Path(e["path"]).name: e for e in json.loads((tmp_path / "out" / "keypoints.json").read_text())["images"]}
    panorama, phone = images["panorama.jpg"], images["phone.jpg"]
    # The panorama fills rows 0.375..0.625 of its square: y = 0.1 and 0.7 are in the padding.
    assert (panorama["width"], panorama["height"]) == (1200, 300)
    assert panorama["inside"] == [False, True, False]
    assert panorama["keypoints"][1] == [600.0, 150.0]
    # The phone photo in its upright frame: 300 wide, 400 tall; x 0.5 of the square (400) is 150.
    assert (phone["width"], phone["height"]) == (300, 400)
    assert phone["keypoints"] == [[150.0, 40.0], [150.0, 200.0], [310.0, 280.0]]
    assert phone["inside"] == [True, True, False]
    overlay = Image.open(tmp_path / "out" / phone["overlay"])
    assert overlay.width == 300 and overlay.height > 400  # upright, at its size, legend below
