"""A trained context as an artifact: the context file, and the detector folder that ships it.

The context file (``embedding.safetensors``) holds the context (T, D) and its keypoint tokens (K,),
with the context's ``ContextSignature`` and provenance as metadata; ``save_context`` writes it and
``load_pretrained`` reads it back (or StableKeypoints' ``embedding.pt`` and ``indices.pt``) for
``model.pretrained_context``, refusing a context trained differently.

A trained detector is one small folder: exported from a run, loaded by path or hub id, pushed to the Hub.

The folder (KBs to a few MB; the frozen diffusion model stays on the Hub under its own id)::

    embedding.safetensors    the context (T, D) and its keypoint tokens (K,); metadata: model, family,
                             layers, feature_upsample_res, checkpoint, config, code_version
    config.yaml              the fit's config
    metrics.json             the test of this very state, when one was run (with its regressor.safetensors)
    regressor.safetensors    the linear regressor from the K keypoints to the dataset's landmarks
    images/*.png             attention pictures of the last training step and scored test examples
    README.md                the model card: what it is, its metrics, its pictures, how to use it

``predict`` and ``test`` take it with ``--model.pretrained_context <folder or hub id>`` (``test``
fits its own regressor on the training split, as the protocol says; the shipped one is for use
outside this project). Commands::

    python -m lightning_modules.detector export <run folder> [--output <folder>]
    python -m lightning_modules.detector push <folder> <owner/name> [--private true]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_modules.app import files
from lightning_modules.app.errors import CheckpointMismatchError, ConfigError, HubError, MissingFileError
from lightning_modules.app.hub import is_hub_id
from lightning_modules.app.settings import require_finite_context
from lightning_modules.app.run_folder import CONFIG_FILE, EMBEDDING_FILE, METRICS_FILE, REGRESSOR_FILE
from lightning_modules.backbones.signature import ContextSignature, check_fits

DETECTOR_DIR = "detector"
PICTURES_DIR = "images"
CARD_FILE = "README.md"
#: What a user of the detector needs from a hub repository (the pictures are for the card only).
DOWNLOADED = [EMBEDDING_FILE, CONFIG_FILE, METRICS_FILE, REGRESSOR_FILE, CARD_FILE]


def embedding_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an ``embedding.safetensors`` (model, family, layers, provenance...)."""
    with safe_open(str(path), "pt") as file:
        return dict(file.metadata() or {})


def resolve_detector(source: str) -> Path:
    """A local file or folder as it is, else a hub id's files from the Hub (or its local cache).

    Raises:
        MissingFileError: ``source`` is neither a local path nor shaped like a hub id.
        HubError: the hub id cannot be fetched (offline without a cached copy, no such repository).
    """
    path = Path(source)
    if path.exists():
        return path
    if not is_hub_id(source):
        raise MissingFileError(
            f"pretrained_context={source!r} is neither a local file or folder nor a hub id (owner/name)."
        )
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(source, allow_patterns=DOWNLOADED))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise HubError(
            f"pretrained_context={source!r}: no such local file or folder, nor model repository on the Hugging Face "
            "Hub (or it is private: log in with `hf auth login` or set HF_TOKEN)."
        ) from error
    except LocalEntryNotFoundError as error:
        raise HubError(
            f"pretrained_context={source!r} is no local file or folder, and as a hub id it is not in the local hub "
            "cache and the Hub cannot be reached (offline, or HF_HUB_OFFLINE=1): fetch it once with network, or "
            "give the detector's local folder."
        ) from error


def detector_embedding(source: str) -> Path:
    """The context file of ``source``: a context file itself, or a detector folder / hub id's embedding."""
    path = resolve_detector(source)
    if path.is_dir():
        path = path / EMBEDDING_FILE
        if not path.is_file():
            raise MissingFileError(
                f"pretrained_context={source!r} is a folder without {EMBEDDING_FILE}: give a detector folder "
                "(`python -m lightning_modules.detector export <run>`) or a context file."
            )
    return path


def check_sources(pretrained_context: str | None, pretrained_keypoint_tokens: str | None) -> None:
    """Raises ``MissingFileError`` for a ``model.pretrained_*`` path that cannot exist (a hub id is looked up later)."""
    if pretrained_context is not None and not Path(pretrained_context).exists() and not is_hub_id(pretrained_context):
        raise MissingFileError(
            f"model.pretrained_context={pretrained_context!r} does not exist: give the file a trained context was "
            "saved to, a detector folder or its hub id (owner/name)."
        )
    if pretrained_keypoint_tokens is not None and not Path(pretrained_keypoint_tokens).is_file():
        raise MissingFileError(f"model.pretrained_keypoint_tokens={pretrained_keypoint_tokens!r} does not exist: give "
                               "the file the keypoint tokens were saved to.")


def save_context(path: str | Path, context: Tensor, keypoint_tokens: Tensor, signature: ContextSignature,
                 metadata: dict[str, str]) -> Path:
    """Writes the context (T, D) and the keypoint tokens (K,; none when empty) to a safetensors file, atomically.

    Its metadata is the context's ``signature`` and ``metadata`` (provenance, training step).
    """
    tensors = {"context": context.detach().float().cpu().contiguous()}
    if keypoint_tokens.numel():
        tensors["keypoint_tokens"] = keypoint_tokens.detach().cpu().contiguous()
    with files.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={**signature.metadata(), **metadata})
    return Path(path)


def export_context(module, path: str | Path, checkpoint: str | None = None, global_step: int | None = None) -> Path:
    """Writes a ``StableKeypoints``' context and keypoint tokens (when chosen) to a context file.

    Its metadata holds the context's signature and its origin (the module's ``provenance()``;
    ``checkpoint``: the checkpoint holding the same context, when there is one; ``global_step``:
    the training step of the context, default the trainer's).
    """
    step = module.global_step if global_step is None else global_step
    require_finite_context(module.context, f"the context to {path}", step)
    metadata = {"global_step": str(step), **{key: str(value) for key, value in module.provenance().items()}}
    if checkpoint:  # fit: the context is that of its last checkpoint; record where it started from
        metadata["started_from"] = metadata["checkpoint"]
        metadata["checkpoint"] = str(Path(checkpoint).resolve())
    return save_context(path, module.context, module.keypoint_tokens, module.signature(), metadata)


def holds_state(path: str | Path, checkpoint: str, global_step: int) -> bool:
    """Whether the context file at ``path`` was exported from ``checkpoint`` at ``global_step`` (a finished run)."""
    if not Path(path).is_file():
        return False
    try:
        meta = embedding_metadata(path)
    except Exception:  # unreadable: it is written again
        return False
    return meta.get("global_step") == str(global_step) and meta.get("checkpoint") == str(Path(checkpoint).resolve())


def load_context(path: str, tokens_path: str | None = None) -> tuple[Tensor, Tensor | None]:
    """A trained context (T, D) and its keypoint tokens (K,) or None, from either file format.

    This project's ``embedding.safetensors`` holds both; StableKeypoints saved the context as
    ``embedding.pt`` ((T, D) or (1, T, D)) and the tokens separately as ``indices.pt``.
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"model.pretrained_context={path!r} does not exist.")
    tokens = None
    if file.suffix == ".safetensors":
        tensors = load_file(str(file))
        if "context" not in tensors:
            raise ConfigError(f"model.pretrained_context: {path} holds no 'context' tensor (keys: {sorted(tensors)}).")
        context, tokens = tensors["context"], tensors.get("keypoint_tokens")
    else:
        context = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(context, Tensor):
            raise ConfigError(f"model.pretrained_context: {path} does not hold a tensor: expected StableKeypoints' embedding.pt.")
    if context.dim() == 3 and context.shape[0] == 1:
        context = context[0]
    if context.dim() != 2:
        raise ConfigError(f"model.pretrained_context: {path}: a context is (T, D) or (1, T, D), got {tuple(context.shape)}.")
    if tokens_path is not None:
        if not Path(tokens_path).is_file():
            raise MissingFileError(f"model.pretrained_keypoint_tokens={tokens_path!r} does not exist.")
        tokens = torch.load(tokens_path, map_location="cpu", weights_only=True)
        tokens = torch.as_tensor(tokens).flatten().long()
    return context, tokens


def load_pretrained(source: str, tokens_path: str | None, expected: ContextSignature) -> tuple[Tensor, Tensor | None]:
    """The context (T, D) and keypoint tokens (K,) or None of ``model.pretrained_context``, checked against
    the configured model's signature (``expected``, its width known).

    ``source``: a context file, a detector folder or its hub id; ``tokens_path``: StableKeypoints' ``indices.pt``.
    """
    path = detector_embedding(source)  # a file, a detector folder or a hub id
    name = f"pretrained_context={source!r}"
    if path.suffix == ".safetensors":
        check_fits(ContextSignature.from_metadata(embedding_metadata(path)), expected, name)
    context, tokens = load_context(str(path), tokens_path)
    if context.shape[-1] != expected.width:
        raise CheckpointMismatchError(f"{name} is {context.shape[-1]} wide but the backbone expects {expected.width}.")
    if context.shape[0] != expected.num_tokens:
        raise CheckpointMismatchError(f"{name} holds {context.shape[0]} tokens but model.num_tokens={expected.num_tokens}: "
                                      f"set model.num_tokens {context.shape[0]}.")
    if not torch.isfinite(context).all():
        raise ConfigError(f"{name} holds non-finite values (NaN or inf).")
    if tokens is not None and tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < expected.num_tokens):
        raise ConfigError(f"The imported keypoint tokens {tokens.tolist()} must lie in [0, {expected.num_tokens}) "
                          f"(model.num_tokens={expected.num_tokens}): they index the context's tokens.")
    return context.float(), None if tokens is None else tokens.long()


def _scored_this_state(metrics_file: Path, embedding: Path, checkpoint: str | None) -> bool:
    """A test result belongs to the exported state when it scored the embedding's checkpoint after the
    embedding was written (a later resume rewrites both ``last.ckpt`` and the embedding)."""
    if checkpoint in (None, "None"):
        return False
    scored = json.loads(metrics_file.read_text()).get("checkpoint")
    return (scored is not None and Path(scored).resolve() == Path(checkpoint).resolve()
            and metrics_file.stat().st_mtime >= embedding.stat().st_mtime)


def export(run: str, output: str | None = None, max_pictures: int = 2) -> str:
    """Gathers a fit run's detector into one folder (default ``<run>/detector``); returns its path.

    Args:
        run: a run folder written by ``run.py fit`` (holding ``embedding.safetensors`` and ``config.yaml``).
        output: the detector's folder; it must be new or empty.
        max_pictures: attention pictures and test examples copied, each.
    """
    run_dir = Path(run)
    embedding, config = run_dir / EMBEDDING_FILE, run_dir / CONFIG_FILE
    for required in (embedding, config):
        if not required.is_file():
            raise MissingFileError(
                f"{required} does not exist: export takes the folder of a fit run that ran to its end "
                "(it writes embedding.safetensors and config.yaml)."
            )
    out = Path(output) if output else run_dir / DETECTOR_DIR
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already holds files: remove it or give another --output.")
    meta = embedding_metadata(embedding)
    (out / PICTURES_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copy2(embedding, out / EMBEDDING_FILE)
    shutil.copy2(config, out / CONFIG_FILE)
    tests = sorted(run_dir.glob(f"test*/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    test_dir = next((p.parent for p in tests if _scored_this_state(p, embedding, meta.get("checkpoint"))), None)
    metrics = None
    if test_dir is not None:
        shutil.copy2(test_dir / METRICS_FILE, out / METRICS_FILE)
        metrics = json.loads((out / METRICS_FILE).read_text())
        if (test_dir / REGRESSOR_FILE).is_file():
            shutil.copy2(test_dir / REGRESSOR_FILE, out / REGRESSOR_FILE)
    pictures = []
    steps = sorted((run_dir / "visualizations").glob("step_*"))
    if steps:
        for i, picture in enumerate(sorted(steps[-1].glob("*.png"))[:max_pictures]):
            pictures.append((f"attention_{i}.png", picture, f"attention maps at {steps[-1].name.replace('_', ' ')}"))
    if test_dir is not None:
        for i, picture in enumerate(sorted((test_dir / "test_examples").glob("*.png"))[:max_pictures]):
            pictures.append((f"test_example_{i}.png", picture, "test example: blue = ground truth, orange = prediction"))
    for name, picture, _ in pictures:
        shutil.copy2(picture, out / PICTURES_DIR / name)
    model_card(meta, metrics, [(f"{PICTURES_DIR}/{name}", caption) for name, _, caption in pictures],
               run_dir.name).save(out / CARD_FILE)
    return str(out)


def model_card(meta: dict[str, str], metrics: dict | None, pictures: list[tuple[str, str]], name: str):
    """A ``huggingface_hub.ModelCard``: YAML front matter, what the detector is, its metrics and pictures."""
    from huggingface_hub import ModelCard, ModelCardData

    model = meta.get("model", "unknown")
    on_hub = is_hub_id(model) and not Path(model).exists()
    data = ModelCardData(
        library_name="stable-keypoints",
        pipeline_tag="keypoint-detection",
        tags=[tag for tag in ("keypoint-detection", "unsupervised", "stable-keypoints", meta.get("family")) if tag],
        base_model=model if on_hub else None,
    )
    lines = [
        f"# StableKeypoints detector `{name}`",
        "",
        "Unsupervised keypoints from a frozen diffusion model (StableKeypoints, CVPR 2024): a learned context "
        "whose cross-attention maps peak on consistent parts of the object.",
        "",
        "| | |",
        "|---|---|",
        f"| diffusion model | `{model}` ({meta.get('family', '?')}) |",
        f"| captured layers | {', '.join(f'`{layer}`' for layer in meta.get('layers', '').split(',') if layer)} |",
        f"| map resolution | {meta.get('feature_upsample_res', '?')} |",
        f"| training steps | {meta.get('global_step', '?')} |",
        f"| code version | `{meta.get('code_version', 'unknown')}` |",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        better = "higher is better" if metrics.get("higher_is_better") else "lower is better"
        lines += [
            "| dataset | metric | value | regression images |",
            "|---|---|---|---|",
            f"| {metrics.get('dataset')} | {metrics.get('metric')} ({better}) | {metrics.get('value'):.4f} | "
            f"{metrics.get('num_regression_images')} |",
        ]
    else:
        lines.append("Not tested: run `python run.py test --ckpt_path <run>/checkpoints/last.ckpt`, then export again.")
    if pictures:
        lines += ["", "## Pictures", ""] + [f"![{caption}]({path})" for path, caption in pictures]
    lines += [
        "",
        "## Use",
        "",
        "With this project's `run.py` and the config this detector was trained with:",
        "",
        "```bash",
        "python run.py predict --config config.yaml --model.pretrained_context <this folder or its hub id> \\",
        "                      --data.init_args.path <folder of images>",
        "```",
        "",
        "`predict` writes `keypoints.json` (pixel coordinates in each original image) and overlays.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def push(folder: str, repo_id: str, private: bool = False, commit_message: str = "Upload StableKeypoints detector",
         token: str | None = None) -> str:
    """Uploads a detector folder to the Hugging Face Hub (creating the model repository); returns the commit URL.

    Args:
        folder: a folder written by ``export``.
        repo_id: ``owner/name`` of the model repository.
        private: create the repository private.
        token: a Hub token (default: the login of ``hf auth login`` or HF_TOKEN).
    """
    path = Path(folder)
    for required in (EMBEDDING_FILE, CARD_FILE):
        if not (path / required).is_file():
            raise MissingFileError(
                f"{path / required} does not exist: push a folder written by "
                "`python -m lightning_modules.detector export <run>`."
            )
    if not is_hub_id(repo_id):
        raise ConfigError(f"repo_id={repo_id!r}: use owner/name, e.g. my-user/cub-keypoints.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=commit_message)
    except OfflineModeIsEnabled as error:
        raise HubError(f"Cannot push {path} to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload.") from error
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"The Hub refused to write {repo_id} (HTTP {status}): log in with `hf auth login` (a write token) "
                "or pass --token, and check that you may write to that owner."
            ) from error
        raise
    return str(info.commit_url)


def main(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    print(CLI([export, push], args=args))  # the command's answer: the folder written or the commit's URL


if __name__ == "__main__":
    main()
