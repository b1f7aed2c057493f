"""The engine: everything that makes a step faster or smaller without changing a number, in one place.

Every family takes an ``Engine`` (YAML: ``model.backbone.init_args.engine.<option>``) and hands its
frozen models to ``Engine.apply``, which applies every option and returns what the capture and the
calls need (``AppliedEngine``). A family file says only what the family is; the method's files
(``capture.py``, ``stable_keypoints.py``) show the plain math and never read an engine option.

What each option does, and where:
- ``dtype``: the frozen UNet/VAE run in bf16 (the context, maps and losses stay fp32); the only
  option that changes numbers (by precision), and it is off by default.
- ``stop_early`` (capture): the UNet forward ends after the last captured layer, and the weights of
  the modules after it are freed once the first call has shown which they are (``unreached.py``).
- ``memory_efficient_maps`` / ``upsample_queries``: the head-mean maps blocked and recomputed in
  backward, from scores computed at the layer's resolution and upsampled (``attention.py``).
- frozen modules keep less for backward (``frozen.py``; always on, bit-equal, except under compile);
  on CPU the narrow GEGLUs keep their projection rather than replay it.
- the VAE encoder's resnet blocks write in place, and on CPU sum their second convolution straight
  into the residual (``encoder.py``; always on, bit-equal: images are encoded without gradient).
- ``channels_last``: UNet and VAE weights and inputs in channels-last memory format, converted weight
  by weight with the memory-mapped original's pages dropped at once (``host_memory.to_channels_last``):
  one copy of every weight, not two.
- ``gradient_checkpointing``: diffusers' block checkpointing (compute for memory).
- ``compile_unet``: ``torch.compile`` of the denoiser's blocks (a UNet's or SD 3's transformer blocks).
- ``allow_tf32``: on CUDA, fp32 matrix products and convolutions on TF32 tensor cores.
- host memory is handed back to the OS after each CPU step (``host_memory.py``), and DDP leaves the
  frozen tensors alone (``frozen_tensor_names``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.app.errors import ConfigError
from lightning_modules.capture import LayerMaps
from lightning_modules.engine.attention import FastLayerMaps
from lightning_modules.engine.encoder import encode_in_place
from lightning_modules.engine.frozen import keep_less_for_backward
from lightning_modules.engine.host_memory import release_freed_host_memory, to_channels_last
from lightning_modules.engine.unreached import UnreachedWeights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

__all__ = ["AppliedEngine", "Engine", "frozen_tensor_names", "release_freed_host_memory"]


@dataclass(frozen=True)
class Engine:
    """Options of the frozen models' calls and of the map capture, shared by every family.

    Args:
        dtype: ``float32`` (default) or ``bfloat16`` for the frozen UNet/VAE; the context, maps and
            losses stay fp32 either way. float16 is refused: it does not converge.
        stop_early: end the UNet forward after the last captured layer (same maps, less work), and
            free the weights of the modules after it once the first call has shown which they are.
        memory_efficient_maps: average heads inside the capture and recompute per head in backward.
        upsample_queries: upsample the layer's queries rather than its features before ``to_q``, and
            with ``memory_efficient_maps`` their scores rather than the queries (bicubic upsampling
            commutes with both products): equal numbers up to float rounding, far fewer FLOPs.
            ``False`` is StableKeypoints' order.
        gradient_checkpointing: trade compute for memory in the UNet's backward pass (same numbers).
        channels_last: run the UNet and the VAE in channels-last memory format: faster convolutions
            (oneDNN on CPU, cuDNN on GPU), equal numbers up to float rounding; each weight is held
            once (the loaded original's pages are dropped as its copy is made).
        compile_unet: ``torch.compile`` the UNet's blocks.
        allow_tf32: on CUDA, let fp32 matrix products and convolutions use TF32 tensor cores (about
            1e-3 relative error per product, far below the method's noise); no effect on the CPU.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    stop_early: bool = True
    memory_efficient_maps: bool = True
    upsample_queries: bool = True
    gradient_checkpointing: bool = False
    channels_last: bool = True
    compile_unet: bool = False
    allow_tf32: bool = True

    def __post_init__(self) -> None:
        if self.dtype == "float16":
            raise ConfigError(
                "engine.dtype=float16 is refused: the context's gradients vanish in half precision and "
                "training does not converge (both follow-up projects report it). Use float32, or bfloat16 "
                "for the frozen UNet/VAE (context, maps and losses stay fp32)."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype={self.dtype!r}: use one of {sorted(DTYPES)}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def apply(self, denoiser: nn.Module, vae: nn.Module) -> AppliedEngine:
        """Applies the options to the frozen ``denoiser`` (a UNet or a transformer) and ``vae`` (in place) -> what the capture and calls need.

        Call it before the capture is installed and before the first call.
        """
        if self.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            to_channels_last(denoiser)
            to_channels_last(vae)
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if self.compile_unet:
            # Blocks, not the whole denoiser: the early stop raises out of the forward, which a
            # whole-model graph would not allow. Compiled blocks keep what their own partitioner
            # chooses for backward, and would see freed parameters change shape: neither
            # frozen.py's modules nor the release of unreached weights apply.
            for block in compiled_blocks(denoiser):
                block.compile(dynamic=False)
        else:
            keep_less_for_backward(denoiser)  # the same gradients, bit for bit, from less memory
        encode_in_place(vae)  # the same latents, bit for bit, from fewer passes over memory
        plain = not (self.memory_efficient_maps or self.upsample_queries)
        return AppliedEngine(
            channels_last=self.channels_last,
            stop_early=self.stop_early,
            layer_maps=None if plain else FastLayerMaps(self.memory_efficient_maps, self.upsample_queries),
            unreached=UnreachedWeights(denoiser) if self.stop_early and not self.compile_unet else None,
        )


def compiled_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The blocks ``compile_unet`` compiles one by one: a UNet's down, mid and up blocks; a transformer's
    ``transformer_blocks`` (SD 3)."""
    if hasattr(denoiser, "transformer_blocks"):
        return list(denoiser.transformer_blocks)
    mid = [denoiser.mid_block] if denoiser.mid_block is not None else []
    return [*denoiser.down_blocks, *denoiser.up_blocks, *mid]


@dataclass
class AppliedEngine:
    """What an applied ``Engine`` asks of the capture and of every call.

    Attributes:
        channels_last: inputs are made channels-last like the weights.
        stop_early: the capture ends the forward after its last layer.
        layer_maps: the capture's maps function (``None``: the plain math of ``capture.head_mean_maps``).
        unreached: records the first call's modules; ``after_call`` frees the rest.
        released: elements of the weights freed after the first call.
    """

    channels_last: bool = False
    stop_early: bool = True
    layer_maps: LayerMaps | None = None
    unreached: UnreachedWeights | None = None
    released: int = field(default=0)

    def prepare(self, x: Tensor) -> Tensor:
        """An image or latent batch in the memory format the weights are in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def after_call(self, device: torch.device) -> None:
        """After a call of the capture: the first one has shown which modules a call runs, free the others;
        on CPU, hand the forward's freed heap memory back before the backward runs.

        What the forward freed (its transients, the VAE's activations) stays resident in glibc's heap
        until trimmed, and the backward starts with everything the forward kept: trimming here lowers
        the step's peak (SD 1.5 at 512 px: 5.35 to 5.21 GiB; docs/performance.md).
        """
        if self.unreached is not None:
            self.released = self.unreached.release()
            self.unreached = None
        if device.type == "cpu":
            release_freed_host_memory()


def frozen_tensor_names(module: nn.Module) -> list[str]:
    """Names of every buffer and every parameter that does not train: what DDP need not synchronize.

    DDP broadcasts from rank 0, when it wraps the module, every parameter and buffer it is not told
    to ignore (about 10 GB for SDXL's frozen weights), and the buffers again at every forward. Every
    rank loads the same frozen weights itself, so only what trains need be synchronized.
    """
    names = [name for name, parameter in module.named_parameters() if not parameter.requires_grad]
    return names + [name for name, _ in module.named_buffers()]
