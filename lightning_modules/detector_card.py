"""A detector folder's model card (``README.md``): YAML front matter, what it is, its metrics, its pictures, its use."""

from __future__ import annotations

from pathlib import Path

from lightning_modules.app.hub import is_hub_id


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
        ("`predict` writes `keypoints.json` (pixel coordinates in each original image) and overlays into a new run "
         "folder under the config's `trainer.default_root_dir`. The config's paths are absolute (the model, the data, "
         "that folder): the command runs from any folder and writes nothing into this one."),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
