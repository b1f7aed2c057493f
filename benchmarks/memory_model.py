"""Estimated peak GPU memory of a training step and of keypoint extraction: a formula, not a measurement.

    python -m benchmarks.memory_model                 # the README table (SD 1.5, SDXL, SD 3.5 medium and large,
                                                      # 512/1024 px, batch 1/4)
    python -m benchmarks.memory_model --budgets       # the knobs that bring SDXL at 1024 px under 24, 40, 80 GB
    python -m benchmarks.memory_model --model small --image-size 512 --batch-size 1 --device cpu
                                                      # one row, to compare with benchmarks/bench.py's measurement

Training peak = weights + saved activations + maps + backward transient (+ the CUDA context, about 0.5 GB,
which PyTorch's allocator does not count):

- weights: the denoiser's (UNet's, or SD 3's transformer's) parameters in ``dtype`` that the early stop
  keeps (those up to the last captured layer; the rest are freed after the first call) and the VAE
  encoder's (fp32 for SDXL, whose VAE always is); the decoder and the text encoders are never kept.
- saved activations: the bytes autograd keeps for backward in the denoiser forward of 2B images (each
  image and its augmented copy) up to the last captured layer. Only what depends on the context is kept
  (from the first cross- or joint attention on; in SD 3 the context stream itself from the first
  block), and attention keeps what flash / memory-efficient attention keeps (q, k, v, output and the
  log-sum-exp; never the N x N probabilities). Counted exactly by running the real architecture on
  the meta device (no memory, no arithmetic) under saved-tensor hooks, with the denoiser frozen and
  its modules as ``Backbone.attach`` leaves them
  (``engine/frozen.py``: convolutions keep no input, GEGLU only its input). With gradient
  checkpointing: the inputs of every checkpointed block plus the largest block's own activations
  (recomputed one block at a time).
- maps: three fp32 tensors of (2B, T, R^2): the sum over captured layers, one layer's maps, and the
  gradient that the loss sends back (``memory_efficient_maps`` stores no per-head maps).
- backward transient: twice the largest saved tensor (its gradient and one more in flight).

Extraction peak (``predict``/``test``, no gradient) = weights + 2 copies of the maps of the
B x ``augmentation_iterations`` warped images in one UNet call + 2 x the largest activation tensor of
that call (it and its input; ``extraction_chunk_size`` caps the images per call).

On CPU, ``benchmarks/bench.py`` measures the peak RSS of its process, which also holds the Python
runtime and libraries (``runtime_bytes``: measured at import here) and the VAE's transient activations.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import resource
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench import build_components  # noqa: E402
from lightning_modules.capture import key_heads, query_heads  # noqa: E402
from lightning_modules.engine.unreached import UnreachedWeights  # noqa: E402
from lightning_modules.engine.frozen import keep_less_for_backward  # noqa: E402

GB = 1e9
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Setting:
    """One configuration; the defaults are the project's (``conf/sd15.yaml``, ``conf/sdxl.yaml``)."""

    model: str = "sd15"  # sd15, sdxl, sd35m, sd35l, small or tiny (benchmarks/bench.py's architectures)
    image_size: int = 512
    batch_size: int = 4
    num_tokens: int = 500
    feature_upsample_res: int = 128
    dtype: str = "float32"  # of the frozen denoiser (and of the VAE except SDXL's)
    gradient_checkpointing: bool = False
    augmentation_iterations: int = 10
    extraction_chunk_size: int | None = None


class _FlashLikeAttention(torch.autograd.Function):
    """SDPA as flash / memory-efficient attention holds it for backward (on meta tensors: shapes only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count only needs the forward
        raise NotImplementedError


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashLikeAttention.apply(q, k, v)


@contextlib.contextmanager
def kept_for_backward(module: nn.Module, on_kept=lambda nbytes: None):
    """Counts what autograd keeps for backward while the block runs -> {storage: bytes}, each storage once,
    ``module``'s weights excluded; ``on_kept(bytes)`` is called for each storage when first kept."""
    weights = {p.untyped_storage()._cdata for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage()._cdata
        if key not in weights and key not in kept:
            kept[key] = tensor.untyped_storage().nbytes()
            on_kept(kept[key])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


class _Stop(Exception):
    pass


@dataclass
class UNetCount:
    """Bytes of one denoiser forward of ``images`` images, as counted on the meta device."""

    weights: int  # the denoiser's parameters
    vae_weights: int  # the VAE encoder's parameters (fp32 count; scaled by the VAE dtype later)
    saved: int  # kept for backward (no checkpointing)
    saved_checkpointed: int  # kept for backward with gradient checkpointing
    largest_saved: int
    largest_activation: int  # the largest tensor any module outputs (extraction transient)
    context_dim: int


@functools.cache
def _meta_components(model: str, dtype: str):
    """(backbone class, denoiser in ``dtype``, VAE) of ``model`` on the meta device: shapes, no memory."""
    cls, unet, vae, _ = build_components(model, torch.device("meta"))
    unet = unet.to(getattr(torch, dtype)).requires_grad_(False)  # frozen, as Backbone.attach leaves it
    keep_less_for_backward(unet)  # and keeping what Backbone.attach's modules keep
    return cls, unet, vae


def _blocks(denoiser) -> dict:
    """The blocks gradient checkpointing checkpoints, by name: a UNet's down, mid and up blocks; a transformer's blocks."""
    if hasattr(denoiser, "transformer_blocks"):
        return {f"transformer_blocks.{i}": b for i, b in enumerate(denoiser.transformer_blocks)}
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(denoiser.down_blocks)}
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(denoiser.up_blocks)})
    if denoiser.mid_block is not None:
        blocks["mid_block"] = denoiser.mid_block
    return blocks


def _call(denoiser, images: int, side: int, num_tokens: int, context_dim: int, torch_dtype: torch.dtype):
    """A meta-device call of the denoiser on ``images`` latents of ``side`` x ``side`` and a context that trains."""
    config = denoiser.config
    with torch.device("meta"):
        latents = torch.empty(images, config.in_channels, side, side, dtype=torch_dtype)
        context = torch.empty(images, num_tokens, context_dim, dtype=torch_dtype, requires_grad=True)
        if hasattr(denoiser, "transformer_blocks"):  # SD 3: pooled projections of zeros (the family's default)
            pooled = torch.empty(images, config.pooled_projection_dim, dtype=torch_dtype)
            timestep = torch.empty(images)
            return lambda: denoiser(latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep,
                                    return_dict=False)
        kwargs = {}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(images, pooled, dtype=torch_dtype),
                                           "time_ids": torch.empty(images, 6, dtype=torch_dtype)}
        timestep = torch.empty((), dtype=torch.long)
    return lambda: denoiser(latents, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)


def count_unet(model: str, image_size: int, images: int, num_tokens: int, dtype: str) -> UNetCount:
    """Runs the denoiser of ``model`` on the meta device up to its last default captured layer, counting bytes."""
    cls, unet, vae = _meta_components(model, dtype)
    unet = copy.deepcopy(unet)  # the early stop's release below frees weights of this copy only
    unreached = UnreachedWeights(unet)
    layers = list(cls(f"random-{model}").default_layers_of(unet.config))
    context_dim = int(unet.config[cls.context_width_key])
    modules = dict(unet.named_modules())
    per_block: dict[str, int] = {}
    block_inputs: dict[str, int] = {}
    largest_activation = [0]
    current = ["(stem)"]

    def attribute(nbytes: int) -> None:
        per_block[current[0]] = per_block.get(current[0], 0) + nbytes

    blocks = _blocks(unet)
    handles = []
    for name, block in blocks.items():
        def enter(module, args, kwargs, name=name):
            current[0] = name
            hidden = args[0] if args else kwargs["hidden_states"]
            block_inputs[name] = hidden.numel() * hidden.element_size()
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
    for module in unet.modules():
        def track(module, args, output):
            if isinstance(output, torch.Tensor):
                largest_activation[0] = max(largest_activation[0], output.numel() * output.element_size())
        handles.append(module.register_forward_hook(track))
    remaining = set(layers)

    def captured(module, args, kwargs, name=None):
        remaining.discard(name)
        if not remaining:
            # The last captured layer runs only what its maps need, its queries and the context's keys
            # (capture.py); the rest of it never runs, and the release frees it too.
            query_heads(module, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            key_heads(module, kwargs["encoder_hidden_states"])
            raise _Stop

    for name in layers:
        handles.append(modules[name].register_forward_pre_hook(functools.partial(captured, name=name), with_kwargs=True))

    call = _call(unet, images, image_size // 8, num_tokens, context_dim, getattr(torch, dtype))
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa
    try:
        with kept_for_backward(unet, attribute) as saved, contextlib.suppress(_Stop):
            call()
    finally:
        F.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()
    unreached.release()  # as a run's first call does: the weights after the last captured layer go
    # Checkpointed blocks keep their inputs (only those that reached the context) and recompute their
    # activations one block at a time in backward.
    blocked = {name: size for name, size in per_block.items() if name in blocks}
    checkpointed = per_block.get("(stem)", 0) + sum(block_inputs[n] for n in blocked) + max(blocked.values(), default=0)
    return UNetCount(
        weights=sum(p.numel() * p.element_size() for p in unet.parameters()),
        vae_weights=sum(p.numel() * 4 for p in [*vae.encoder.parameters(), *(vae.quant_conv or nn.Identity()).parameters()]),
        saved=sum(saved.values()),
        saved_checkpointed=checkpointed,
        largest_saved=max(saved.values(), default=0),
        largest_activation=largest_activation[0],
        context_dim=context_dim,
    )


def estimate(setting: Setting) -> dict[str, float]:
    """-> bytes of each term and the training and extraction peaks (GPU, CUDA context excluded)."""
    s = setting
    train = count_unet(s.model, s.image_size, 2 * s.batch_size, s.num_tokens, s.dtype)
    vae_bytes = 4 if s.model == "sdxl" else DTYPE_BYTES[s.dtype]
    weights = train.weights + train.vae_weights // 4 * vae_bytes
    maps_train = 3 * 2 * s.batch_size * s.num_tokens * s.feature_upsample_res**2 * 4
    saved = train.saved_checkpointed if s.gradient_checkpointing else train.saved
    training = weights + saved + maps_train + 2 * train.largest_saved
    per_call = s.batch_size * s.augmentation_iterations
    if s.extraction_chunk_size is not None:
        per_call = min(per_call, s.extraction_chunk_size)
    extract = count_unet(s.model, s.image_size, per_call, s.num_tokens, s.dtype)
    maps_extract = 2 * per_call * s.num_tokens * s.feature_upsample_res**2 * 4
    extraction = weights + maps_extract + 2 * extract.largest_activation
    return {"weights": weights, "saved_activations": saved, "maps": maps_train,
            "backward_transient": 2 * train.largest_saved, "training": training, "extraction": extraction}


def runtime_bytes() -> int:
    """Peak RSS of this process after importing the stack (what a CPU measurement holds besides the model)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: Warped images per UNet call in the budget table's extraction column.
EXTRACTION_CHUNK = 8
#: The knobs, in the order a user would reach for them, each on top of the previous ones: keeping the
#: UNet in fp32 (the default; bf16 is not recommended yet, see "Opt-in modes"), or starting with bf16.
KNOB_CHAINS = {
    "fp32": (("`gradient_checkpointing: true`", dict(gradient_checkpointing=True)),
             ("batch 1 (`accumulate_grad_batches: 4`)", dict(batch_size=1)),
             ("`feature_upsample_res: 64`", dict(feature_upsample_res=64))),
    "bf16": (("`dtype: bfloat16`", dict(dtype="bfloat16")),
             ("`gradient_checkpointing: true`", dict(gradient_checkpointing=True)),
             ("batch 1 (`accumulate_grad_batches: 4`)", dict(batch_size=1))),
}


def fits(training_bytes: float, limit_gb: float) -> bool:
    """With the CUDA context (about 0.5 GB) and allocator slack (about 10 %) on top of the estimate."""
    return training_bytes * 1.1 + 0.5 * GB <= limit_gb * GB


def budgets(limits_gb=(24, 40, 80)) -> list[tuple[int, dict[str, tuple[str, float, float]]]]:
    """-> per limit and chain, for SDXL at 1024 px: (knobs, training GB, extraction GB) of the first that fits."""
    default = Setting(model="sdxl", image_size=1024)
    rows = []
    chains = {}
    for chain, knobs in KNOB_CHAINS.items():
        steps, setting, labels = [("defaults (fp32, batch 4)", default)], default, []
        for label, change in knobs:
            setting, labels = replace(setting, **change), [*labels, label]
            steps.append((" + ".join(labels), setting))
        chains[chain] = [(label, estimate(replace(s, extraction_chunk_size=EXTRACTION_CHUNK))) for label, s in steps]
    for limit in limits_gb:
        row = {}
        for chain, results in chains.items():
            found = next(((label, r["training"] / GB, r["extraction"] / GB) for label, r in results
                          if fits(r["training"], limit)), ("none of these", float("nan"), float("nan")))
            row[chain] = found
        rows.append((limit, row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sdxl", "sd35m", "sd35l", "small", "tiny"])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--extract-batch", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cpu: add the runtime's RSS, as bench.py measures it")
    parser.add_argument("--budgets", action="store_true")
    args = parser.parse_args()
    runtime = runtime_bytes()
    if args.budgets:
        print("SDXL at 1024 px: the first knobs whose estimated training peak (+10 % and the CUDA context) fits;")
        print(f"extraction with `extraction_chunk_size: {EXTRACTION_CHUNK}`. GB are estimates (training / extraction).")
        print("| GPU memory | keeping the UNet in fp32 | GB | starting with bf16 | GB |")
        print("|---|---|---|---|---|")
        for limit, row in budgets():
            cells = [f"{label} | {training:.1f} / {extraction:.1f}" for label, training, extraction in row.values()]
            print(f"| {limit} GB | " + " | ".join(cells) + " |")
        return
    if args.model:
        setting = Setting(model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                          num_tokens=args.tokens, feature_upsample_res=args.res, augmentation_iterations=args.iterations)
        result = estimate(setting)
        extra = runtime if args.device == "cpu" else 0
        terms = ", ".join(f"{k} {v / GIB:.3f}" for k, v in result.items() if k not in ("training", "extraction"))
        print(f"{setting}\n{terms} GiB")
        print(f"training peak {(result['training'] + extra) / GIB:.3f} GiB"
              + (f" (with the runtime's {runtime / GIB:.3f} GiB RSS)" if extra else ""))
        return
    print("Estimated peak GPU memory (GB, formula; CUDA context not included), default settings: fp32, 500 tokens,")
    print("R = 128, 10 augmentations per extracted image in one UNet call")
    print("| family | image | batch | weights | saved activations | maps | training peak | extraction peak |")
    print("|---|---|---|---|---|---|---|---|")
    for model, name in (("sd15", "SD 1.5"), ("sdxl", "SDXL"), ("sd35m", "SD 3.5 medium"), ("sd35l", "SD 3.5 large")):
        for size in (512, 1024):
            for batch in (1, 4):
                r = estimate(Setting(model=model, image_size=size, batch_size=batch))
                print(f"| {name} | {size} px | {batch} | {r['weights'] / GB:.1f} | {r['saved_activations'] / GB:.1f} | "
                      f"{r['maps'] / GB:.2f} | {r['training'] / GB:.1f} | {r['extraction'] / GB:.1f} |")


if __name__ == "__main__":
    main()
