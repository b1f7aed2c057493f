"""A trained detector as one folder: export from a run, load by path or hub id, push to the Hub (offline)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lightning_modules import detector
from lightning_modules.app.errors import CheckpointMismatchError, ConfigError, HubError, MissingFileError
from lightning_modules.detector import export_context, load_context
from tests.conftest import tiny_module

TOKENS = [7, 3, 11, 5]


@pytest.fixture
def run(tmp_path, tiny_sd_path) -> Path:
    """A finished fit run's folder, tested once on its last checkpoint (and once on an older one)."""
    run = tmp_path / "20261201-093000-abcdef"
    module = tiny_module(tiny_sd_path)
    module.keypoint_tokens = torch.tensor(TOKENS)
    module.context.data += 1  # "trained": no longer the seed-0 initialization
    last = run / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"ckpt")
    export_context(module, run / "embedding.safetensors", checkpoint=str(last))
    (run / "config.yaml").write_text("# Written by `run.py fit`\nmodel:\n  num_tokens: 40\n")
    old = time.time() - 100
    os.utime(run / "embedding.safetensors", (old, old))
    for name, checkpoint, value in (("test", last, 12.5), ("test-2", run / "checkpoints" / "step=2.ckpt", 99.0)):
        folder = run / name
        (folder / "test_examples").mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "metric": "normalized_keypoint_error", "value": value, "higher_is_better": False,
            "dataset": "CUBDataModule", "num_regression_images": 18, "checkpoint": str(checkpoint.resolve()),
        }))
        save_file({"weight": torch.full((30, 8), value)}, str(folder / "regressor.safetensors"))
        Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "test_examples" / "example_000.png")
    for step in ("step_000000", "step_000040"):
        (run / "visualizations" / step).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(run / "visualizations" / step / f"image_{i}.png")
    return run


def test_export_gathers_the_state_its_test_and_pictures_with_a_model_card(run):
    out = Path(detector.export(str(run)))
    assert out == run / "detector"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.yaml", "embedding.safetensors", "images/attention_0.png",
                     "images/attention_1.png", "images/test_example_0.png", "metrics.json", "regressor.safetensors"]
    # the test of the exported checkpoint, not the newer one of step=2
    assert json.loads((out / "metrics.json").read_text())["value"] == 12.5
    from safetensors.torch import load_file

    assert load_file(str(out / "regressor.safetensors"))["weight"][0, 0] == 12.5
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: stable-keypoints" in card
    assert "| CUBDataModule | normalized_keypoint_error (lower is better) | 12.5000 | 18 |" in card
    assert "![attention maps at step 000040](images/attention_0.png)" in card
    assert "--model.pretrained_context" in card
    with pytest.raises(ConfigError, match="already holds files"):
        detector.export(str(run))  # nothing is overwritten


def test_export_leaves_out_a_test_older_than_the_state(run, tmp_path):
    old = time.time() - 1000
    os.utime(run / "test" / "metrics.json", (old, old))  # tested before a resume rewrote the embedding
    out = Path(detector.export(str(run), output=str(tmp_path / "det")))
    assert not (out / "metrics.json").exists() and not (out / "regressor.safetensors").exists()
    assert "Not tested" in (out / "README.md").read_text()


def test_export_needs_a_finished_run(tmp_path):
    with pytest.raises(MissingFileError, match="embedding.safetensors does not exist"):
        detector.export(str(tmp_path))


def test_a_detector_folder_loads_as_pretrained_context(run, tiny_sd_path):
    folder = Path(detector.export(str(run)))
    context, tokens = load_context(str(detector.detector_embedding(str(folder))))
    module = tiny_module(tiny_sd_path, pretrained_context=str(folder))
    torch.testing.assert_close(module.context.detach(), context, rtol=0, atol=0)
    assert module.keypoint_tokens.tolist() == TOKENS == tokens.tolist()
    fresh = tiny_module(tiny_sd_path).context.detach()
    torch.testing.assert_close(module.context.detach(), fresh + 1, rtol=0, atol=0)  # the trained one, not an init


def test_a_detector_trained_with_other_layers_or_resolution_is_refused(run, tiny_sd_path):
    folder = detector.export(str(run))
    with pytest.raises(CheckpointMismatchError, match="trained on 16 x 16 maps, but model.feature_upsample_res=32: set --model.feature_upsample_res 16"):
        tiny_module(tiny_sd_path, feature_upsample_res=32, pretrained_context=folder)
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(CheckpointMismatchError, match="layers"):
        tiny_module(tiny_sd_path, backbone={"layers": [layer]}, pretrained_context=folder)


def test_stablekeypoints_embedding_pt_still_loads_without_metadata_checks(tmp_path, tiny_sd_path):
    context = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(3))
    torch.save(context, tmp_path / "embedding.pt")
    torch.save(torch.tensor([1, 2, 3, 4]), tmp_path / "indices.pt")
    module = tiny_module(tiny_sd_path, pretrained_context=str(tmp_path / "embedding.pt"),
                         pretrained_keypoint_tokens=str(tmp_path / "indices.pt"))
    torch.testing.assert_close(module.context.detach(), context[0], rtol=0, atol=0)
    assert module.keypoint_tokens.tolist() == [1, 2, 3, 4]


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lays ``folder`` out as the Hub cache does after a download of ``repo_id`` (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in detector.DOWNLOADED:
        if (folder / name).is_file():
            (snapshot / name).write_bytes((folder / name).read_bytes())
    return snapshot


def test_a_hub_id_resolves_through_the_hub_cache_offline(run, tmp_path, monkeypatch, tiny_sd_path):
    import huggingface_hub.constants

    folder = Path(detector.export(str(run)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = _cache_repo(tmp_path / "cache", "someone/cub-keypoints", folder)
    assert detector.resolve_detector("someone/cub-keypoints") == snapshot
    module = tiny_module(tiny_sd_path, pretrained_context="someone/cub-keypoints")
    assert module.keypoint_tokens.tolist() == TOKENS
    with pytest.raises(HubError, match="not in the local hub cache"):
        detector.resolve_detector("someone/not-downloaded")
    with pytest.raises(MissingFileError, match="neither a local file or folder nor a hub id"):
        detector.resolve_detector(str(tmp_path / "no" / "such" / "file.safetensors"))


class FakeHub:
    """The Hub's HTTP API as far as create_repo and upload_folder use it; records what was committed."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, str]] = []
        self.committed: dict[str, bytes] = {}
        self.header: dict = {}
        self.validated = ""

    def __call__(self, request):
        import httpx2

        path = request.url.path
        self.requests.append((request.method, path))
        if self.status != 200:
            return httpx2.Response(self.status, json={"error": "Invalid credentials"})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/someone/cub-keypoints"})
        if path == "/api/validate-yaml":  # the model card's front matter, checked before the commit
            self.validated = json.loads(request.content)["content"]
            return httpx2.Response(200, json={})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if path.endswith("/commit/main"):
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    self.header = item["value"]
                elif item["key"] == "file":
                    self.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/someone/cub-keypoints/commit/abc",
                                              "commitOid": "abc" * 13 + "a"})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub's real client code over an HTTP transport that answers like the Hub."""
    import httpx2
    from huggingface_hub.utils import _http

    def install(status: int = 200) -> FakeHub:
        hub = FakeHub(status)
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
        return hub

    yield install
    _http.set_client_factory(_http.default_client_factory)


def test_push_uploads_exactly_the_detectors_files_through_huggingface_hub(run, fake_hub):
    folder = Path(detector.export(str(run)))
    expected = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    (folder / "notes.txt").write_text("mine")  # what a user or a command left in the folder stays local
    (folder / "outputs").mkdir()
    (folder / "outputs" / "keypoints.json").write_text("{}")
    (folder / "images" / "holiday.png").write_bytes(b"png")
    hub = fake_hub()
    url = detector.push(str(folder), "someone/cub-keypoints", token="hf_test")
    assert url == "https://huggingface.co/someone/cub-keypoints/commit/abc"
    assert sorted(expected) == ["README.md", "config.yaml", "embedding.safetensors", "images/attention_0.png",
                                "images/attention_1.png", "images/test_example_0.png",
                                "metrics.json", "regressor.safetensors"]
    assert hub.committed == expected  # byte for byte, README and pictures included
    assert hub.header["summary"] == "Upload StableKeypoints detector"
    assert ("POST", "/api/repos/create") in hub.requests
    assert hub.validated == (folder / "README.md").read_text()


def test_push_refused_by_the_hub_says_how_to_log_in(run, fake_hub):
    folder = detector.export(str(run))
    fake_hub(status=401)
    with pytest.raises(HubError, match="HTTP 401.*hf auth login"):
        detector.push(folder, "someone/cub-keypoints", token="hf_wrong")


def test_push_checks_its_arguments_before_any_request(run, tmp_path, fake_hub):
    hub = fake_hub()
    with pytest.raises(MissingFileError, match="embedding.safetensors does not exist"):
        detector.push(str(tmp_path), "someone/x")
    with pytest.raises(ConfigError, match="owner/name"):
        detector.push(detector.export(str(run)), "no-owner")
    assert hub.requests == []
