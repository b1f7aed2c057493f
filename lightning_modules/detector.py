"""A trained context as an artifact: the context file, and the detector folder that ships it.

The context file (``embedding.safetensors``) holds the context (T, D) and its keypoint tokens (K,),
with the context's ``ContextSignature`` and provenance as metadata; ``save_context`` writes it and
``load_pretrained`` reads it back (or StableKeypoints' ``embedding.pt`` and ``indices.pt``) for
``model.pretrained_context``, refusing a context trained differently.

A trained detector is one small folder: exported from a run, loaded by path or hub id, pushed to the Hub.

The folder (KBs to a few MB; the frozen diffusion model stays on the Hub under its own id)::

    embedding.safetensors    the context (T, D) and its keypoint tokens (K,); metadata: model, family,
                             layers, feature_upsample_res, checkpoint, config, code_version
    config.yaml              the config of the command that trained this state (after a resume its
                             config.resume-<n>.yaml), its relative paths made absolute
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_modules.app import files
from lightning_modules.app.errors import (
    CheckpointMismatchError,
    ConfigError,
    DamagedFileError,
    HubError,
    MissingFileError,
    run_for_user,
)
from lightning_modules.app.hub import is_hub_id
from lightning_modules.app.run_folder import (
    CONFIG_FILE,
    EMBEDDING_FILE,
    METRICS_FILE,
    REGRESSOR_FILE,
    portable_config,
    state_config,
)
from lightning_modules.app.settings import require_finite_context
from lightning_modules.backbones.signature import ContextSignature, check_fits
from lightning_modules.detector_card import model_card

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
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
    except (OSError, SafetensorError):  # unreadable: it is written again
        return False
    return meta.get("global_step") == str(global_step) and meta.get("checkpoint") == str(Path(checkpoint).resolve())


#: The metadata a context file must carry to be checked like a checkpoint (``ContextSignature.metadata``).
REQUIRED_METADATA = ("family", "layers", "feature_upsample_res")


def _read_tensor_file(path: Path, option: str):
    """``torch.load`` or ``safetensors`` of a file the user named, a damaged one reported as such."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path)), embedding_metadata(path)
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as error:  # torch.load and safetensors raise many types for a damaged file
        raise DamagedFileError(
            f"{option}={str(path)!r} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}): the file "
            "is truncated, damaged or not a tensor file. Export or copy it again."
        ) from error


def load_context(path: str, tokens_path: str | None = None) -> tuple[Tensor, Tensor | None]:
    """A trained context (T, D) and its keypoint tokens (K,) or None, from either file format, with the
    checks that need no model (readable, shapes, dtypes, finite; tokens whole numbers, each once).

    This project's ``embedding.safetensors`` holds both; StableKeypoints saved the context as
    ``embedding.pt`` ((T, D) or (1, T, D)) and the tokens separately as ``indices.pt`` ((K,) or (1, K)).

    Raises:
        MissingFileError: a file does not exist.
        DamagedFileError: a file cannot be read, or does not hold what it should.
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"model.pretrained_context={path!r} does not exist.")
    name = f"model.pretrained_context={path!r}"
    loaded, _ = _read_tensor_file(file, "model.pretrained_context")
    tokens = None
    if file.suffix == ".safetensors":
        if "context" not in loaded:
            raise DamagedFileError(f"{name} holds no 'context' tensor (keys: {sorted(loaded)}): give a context file "
                                   "written by this project (a run's embedding.safetensors or a detector folder).")
        context, tokens = loaded["context"], loaded.get("keypoint_tokens")
    else:
        context = loaded
        if not isinstance(context, Tensor):
            raise DamagedFileError(f"{name} does not hold a tensor: expected StableKeypoints' embedding.pt.")
    if context.dim() == 3 and context.shape[0] == 1:
        context = context[0]
    if context.dim() != 2 or not context.is_floating_point() or not context.numel():
        raise DamagedFileError(f"{name}: a context is a non-empty float (T, D) or (1, T, D) tensor, got "
                               f"{context.dtype} {tuple(context.shape)}.")
    if not torch.isfinite(context).all():
        raise DamagedFileError(f"{name} holds non-finite values (NaN or inf): use the context of an earlier checkpoint.")
    if tokens_path is not None:
        if not Path(tokens_path).is_file():
            raise MissingFileError(f"model.pretrained_keypoint_tokens={tokens_path!r} does not exist.")
        tokens, _ = _read_tensor_file(Path(tokens_path), "model.pretrained_keypoint_tokens")
        name = f"model.pretrained_keypoint_tokens={tokens_path!r}"
        if isinstance(tokens, (list, tuple)) and all(isinstance(t, int) for t in tokens):
            tokens = torch.tensor(tokens, dtype=torch.long)
        if not isinstance(tokens, Tensor):
            raise DamagedFileError(f"{name} does not hold a tensor of token indices: expected StableKeypoints' indices.pt.")
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
    if tokens is not None:
        if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise DamagedFileError(f"{name}: keypoint tokens are a (K,) tensor of integer indices, got {tokens.dtype} "
                                   f"{tuple(tokens.shape)}: floats would be truncated to other tokens.")
        tokens = tokens.long()
        if len(set(tokens.tolist())) != len(tokens):
            raise DamagedFileError(f"{name}: the keypoint tokens {tokens.tolist()} repeat a token, so keypoints would "
                                   "coincide: each token must appear once.")
    return context.float(), tokens


def load_pretrained(source: str, tokens_path: str | None, expected: ContextSignature, top_k: int | None = None,
                    need_tokens: bool = False) -> tuple[Tensor, Tensor | None]:
    """The context (T, D) and keypoint tokens (K,) or None of ``model.pretrained_context``, checked as fully
    as a checkpoint: readable, shapes, the signature of its metadata against the configured model's
    (``expected``; its width when known), tokens whole, distinct, in range and ``top_k`` of them.

    Args:
        source: a context file, a detector folder or its hub id.
        tokens_path: StableKeypoints' ``indices.pt`` (with its ``embedding.pt``, which has no metadata).
        top_k: the configured ``model.top_k``: the number of keypoint tokens expected.
        need_tokens: the tokens must be there (``test``/``predict``: ranking them again would use the
            config's training images, which need not be those the context was trained on).
    """
    path = detector_embedding(source)  # a file, a detector folder or a hub id
    name = f"model.pretrained_context={source!r}"
    if path.suffix != ".safetensors" and tokens_path is None and need_tokens:
        raise ConfigError(f"{name} holds StableKeypoints' context without its keypoint tokens: give them with "
                          "model.pretrained_keypoint_tokens indices.pt.")
    context, tokens = load_context(str(path), tokens_path)
    if path.suffix == ".safetensors":
        meta = embedding_metadata(path)
        absent = [key for key in REQUIRED_METADATA if key not in meta]
        if absent:
            raise DamagedFileError(
                f"{name}: {path} has no {', '.join(absent)} metadata, so what it was trained with cannot be checked. "
                "Give a context file exported by this project (a run's embedding.safetensors, a detector folder); "
                "StableKeypoints' own files load with model.pretrained_context embedding.pt and "
                "model.pretrained_keypoint_tokens indices.pt."
            )
        try:
            found = ContextSignature.from_metadata(meta)
        except ValueError as error:
            raise DamagedFileError(f"{name}: {path} has damaged metadata ({error}).") from error
        check_fits(found, expected, name)
    if expected.width is not None and context.shape[-1] != expected.width:
        raise CheckpointMismatchError(f"{name} is {context.shape[-1]} wide but the backbone expects {expected.width}.")
    if expected.num_tokens is not None and context.shape[0] != expected.num_tokens:
        raise CheckpointMismatchError(f"{name} holds {context.shape[0]} tokens but model.num_tokens={expected.num_tokens}: "
                                      f"set model.num_tokens {context.shape[0]}.")
    if tokens is None or not tokens.numel():
        if need_tokens:
            raise ConfigError(
                f"{name} holds no keypoint tokens (exported before its fit ranked them): ranking them now would use "
                "this config's training images, which need not be those it was trained on. Export the context of a "
                "finished fit (python -m lightning_modules.detector export <run>), or finish the fit (fit --ckpt_path "
                "<run>/checkpoints/last.ckpt)."
            )
        return context, None
    if top_k is not None and len(tokens) != top_k:
        holder = name if tokens_path is None else f"model.pretrained_keypoint_tokens={tokens_path!r}"
        raise CheckpointMismatchError(f"{holder} holds {len(tokens)} keypoint tokens but model.top_k={top_k}: set "
                                      f"model.top_k {len(tokens)} (or use the config it was trained with).")
    if not (0 <= int(tokens.min()) and int(tokens.max()) < context.shape[0]):
        raise DamagedFileError(f"The imported keypoint tokens {tokens.tolist()} must lie in [0, {context.shape[0]}): "
                               "they index the context's tokens.")
    return context, tokens


def _scored_this_state(metrics_file: Path, embedding: Path, checkpoint: str | None) -> bool:
    """A test result belongs to the exported state when it scored the embedding's checkpoint after the
    embedding was written (a later resume rewrites both ``last.ckpt`` and the embedding)."""
    if checkpoint in (None, "None"):
        return False
    scored = json.loads(metrics_file.read_text()).get("checkpoint")
    return (scored is not None and Path(scored).resolve() == Path(checkpoint).resolve()
            and metrics_file.stat().st_mtime >= embedding.stat().st_mtime)


#: What a detector folder holds, as ``push`` uploads it (``export`` writes these and nothing else).
DETECTOR_FILES = [EMBEDDING_FILE, CONFIG_FILE, METRICS_FILE, REGRESSOR_FILE, CARD_FILE,
                  f"{PICTURES_DIR}/attention_*.png", f"{PICTURES_DIR}/test_example_*.png"]


def export(run: str, output: str | None = None, max_pictures: int = 2) -> str:
    """Gathers a fit run's detector into one folder (default ``<run>/detector``); returns its path.

    The folder appears whole or not at all (``files.atomic_folder``). Its ``config.yaml`` is the config
    of the command that trained the exported state (``state_config``), with absolute paths
    (``portable_config``).

    Args:
        run: a run folder written by ``run.py fit`` (holding ``embedding.safetensors`` and its config).
        output: the detector's folder; it must be new or empty.
        max_pictures: attention pictures and test examples copied, each.
    """
    run_dir = Path(run)
    embedding = run_dir / EMBEDDING_FILE
    if not embedding.is_file():
        raise MissingFileError(
            f"{embedding} does not exist: export takes the folder of a fit run that ran to its end (it writes "
            "embedding.safetensors; a run killed before that is finished by the same fit command with --ckpt_path "
            "<run>/checkpoints/last.ckpt)."
        )
    try:
        meta = embedding_metadata(embedding)
    except Exception as error:
        raise DamagedFileError(f"{embedding} cannot be read ({error}): finish the run again with fit --ckpt_path "
                               "<run>/checkpoints/last.ckpt.") from error
    config = state_config(run_dir, meta)
    out = Path(output) if output else run_dir / DETECTOR_DIR
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a folder: give a new or empty folder.")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already holds files: remove it or give another --output.")
    tests = sorted(run_dir.glob(f"test*/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    test_dir = next((p.parent for p in tests if _scored_this_state(p, embedding, meta.get("checkpoint"))), None)
    metrics = json.loads((test_dir / METRICS_FILE).read_text()) if test_dir is not None else None
    pictures = []
    steps = sorted((run_dir / "visualizations").glob("step_*"))
    if steps:
        for i, picture in enumerate(sorted(steps[-1].glob("*.png"))[:max_pictures]):
            pictures.append((f"attention_{i}.png", picture, f"attention maps at {steps[-1].name.replace('_', ' ')}"))
    if test_dir is not None:
        for i, picture in enumerate(sorted((test_dir / "test_examples").glob("*.png"))[:max_pictures]):
            pictures.append((f"test_example_{i}.png", picture, "test example: blue = ground truth, orange = prediction"))
    with files.atomic_folder(out) as tmp:
        (tmp / PICTURES_DIR).mkdir()
        shutil.copy2(embedding, tmp / EMBEDDING_FILE)
        (tmp / CONFIG_FILE).write_text(portable_config(config))
        if test_dir is not None:
            shutil.copy2(test_dir / METRICS_FILE, tmp / METRICS_FILE)
            if (test_dir / REGRESSOR_FILE).is_file():
                shutil.copy2(test_dir / REGRESSOR_FILE, tmp / REGRESSOR_FILE)
        for name, picture, _ in pictures:
            shutil.copy2(picture, tmp / PICTURES_DIR / name)
        model_card(meta, metrics, [(f"{PICTURES_DIR}/{name}", caption) for name, _, caption in pictures],
                   run_dir.name).save(tmp / CARD_FILE)
    return str(out)


def push(folder: str, repo_id: str, private: bool = False, commit_message: str = "Upload StableKeypoints detector",
         token: str | None = None) -> str:
    """Uploads a detector folder to the Hugging Face Hub (creating the model repository); returns the commit URL.

    Exactly the detector's files are uploaded (``DETECTOR_FILES``): anything else a user put in the
    folder, or a command wrote there, stays local.

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
        info = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=commit_message,
                                 allow_patterns=DETECTOR_FILES)
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
    """``export`` and ``push`` for a person at a terminal: a mistake is one ``error:`` line and exit status 2."""
    from jsonargparse import CLI

    # The command's answer: the folder written or the commit's URL.
    run_for_user(lambda: print(CLI([export, push], args=args)))


if __name__ == "__main__":
    main()
