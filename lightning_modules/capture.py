"""Capture of cross-attention maps at chosen denoiser layers, recomputed at a higher resolution.

At each captured layer the hidden states that enter the layer (what its ``to_q`` sees) are
bicubically upsampled to R x R, projected by the layer's own ``to_q``, and attended against the
layer's own keys of the context tokens: ``softmax(q k^T * scale)`` over the tokens, averaged over
heads (``head_mean_maps``: the method, in plain torch). A UNet's captured layers are its
cross-attention layers (``attn2``, keys ``to_k`` of the context); a multimodal diffusion
transformer's (SD 3's MMDiT) are its joint-attention layers, whose context tokens have their own
projections (keys ``add_k_proj`` of the context stream; ``query_heads`` and ``key_heads``). The
engine may supply a faster function with the same numbers (``lightning_modules.engine.attention``:
blocked, recomputed in backward, queries upsampled after the projection); the capture calls
whichever it is given. The layer's output is left exactly as the unmodified denoiser computes it
(StableKeypoints' behaviour), unless ``replace_output`` reproduces StableXLKeypoints. Nothing after
the last captured layer can change the maps, so the forward pass may stop there (``stop_early``).

Uses diffusers' attention-processor API: each captured ``Attention`` module gets a
``CaptureProcessor`` wrapping its original processor; every other layer keeps its fused default
(wrapped so that it accepts the per-call argument). The state of one denoiser call (resolution,
the maps recorded so far, which layers ran) is an ``AttentionCall`` passed with the call as
``cross_attention_kwargs={"call": ...}`` (a transformer's ``joint_attention_kwargs``), the way
zero123plus' own reference UNet passes its mode and stored states, so a gradient-checkpointing
recompute is pure. The early stop raises out of the last captured layer; under checkpointing,
torch's recompute ends once the last saved tensor is rebuilt (its default early stop), which is
before that raise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from lightning_modules.app.errors import ConfigError


class _StopForward(Exception):
    """Raised by the last captured layer to end the denoiser's forward early."""


@dataclass(eq=False)
class AttentionCall:
    """The state of one denoiser call, passed to every processor as ``cross_attention_kwargs={"call": ...}``
    (a transformer's ``joint_attention_kwargs``).

    Nothing about a call lives in a processor or in the capture: a recompute of part of the call
    (gradient checkpointing replays blocks in backward) sees exactly what the first forward saw and
    takes the same branches. What a recompute writes is ignored: each layer records its maps once.

    Args:
        resolution: R, the side of the maps.
        record: compute and record maps at the captured layers (``False``: run through them, e.g. a
            reference-attention write pass).
        family: per-call state of a family's own processors (zero123plus keeps its reference pass here).
    """

    resolution: int
    record: bool = True
    family: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Captured layers in the order the first forward recorded them, and the running sum of their maps.
    recorded: list[str] = field(default_factory=list)
    total: Tensor | None = field(default=None, repr=False)
    #: Captured layers this call reached, and the one that completed the set (learned by the first forward).
    visited: set[str] = field(default_factory=set)
    last: str | None = None


class PerCallProcessor:
    """Wraps a layer's processor so that it accepts (and ignores) the per-call ``call`` argument.

    diffusers drops ``cross_attention_kwargs`` a processor does not name, with a warning per call.
    """

    def __init__(self, original: Callable) -> None:
        self.original = original

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, call: AttentionCall | None = None) -> Tensor:
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def accepts_call(processor: Callable) -> bool:
    """Whether a processor takes the per-call ``call`` argument."""
    return "call" in inspect.signature(processor.__call__).parameters


class CaptureProcessor:
    """Attention processor that records upsampled cross-attention maps, then runs the original."""

    def __init__(self, capture: "AttentionCapture", name: str, original: Callable) -> None:
        self.capture = capture
        self.name = name
        self.original = original

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, call: AttentionCall | None = None) -> Tensor:
        if call is None:  # a plain denoiser call, outside AttentionCapture.maps
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        capture = self.capture
        # Which layer completes the set is decided once, by the first forward: a recompute, which
        # finds every layer visited, then takes the same branches.
        if call.last is None and len(call.visited | {self.name}) == len(capture.layers):
            call.last = self.name
        stop_here = capture.stop_early and self.name == call.last
        output = None
        if call.record:
            maps, output = self._maps(attn, hidden_states, encoder_hidden_states, call.resolution)
            if self.name not in call.recorded:  # a recompute records nothing a second time
                # A running sum, added in place: one (B, R*R, T) tensor alive instead of one per layer.
                # (The first layer's maps become the sum; nothing else holds them, and no backward reads them.)
                call.recorded.append(self.name)
                call.total = maps if call.total is None else call.total.add_(maps)
        if output is None and not stop_here:  # where the forward stops, nothing reads the layer's own output
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        call.visited.add(self.name)
        if stop_here:
            raise _StopForward
        return output

    def _maps(self, attn: Attention, hidden_states: Tensor, context: Tensor, resolution: int) -> tuple[Tensor, Tensor | None]:
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if self.capture.replace_output:
            probs = head_probabilities(attn, hidden_states, context, resolution)  # (B, H, R*R, T)
            return probs.mean(dim=1), self._replaced_output(attn, probs, context, square_side(hidden_states), resolution)
        return self.capture.layer_maps(attn, hidden_states, context, resolution), None

    def _replaced_output(self, attn: Attention, probs: Tensor, context: Tensor, side: int, resolution: int) -> Tensor:
        """StableXLKeypoints' layer output: attention at R x R, bicubically downsampled back to the layer's size."""
        if attn.residual_connection:
            raise ValueError(f"replace_output does not support residual attention at {self.name}.")
        v = split_heads(attn.to_v(context), attn.heads).float()
        out = (probs @ v).transpose(1, 2).flatten(2)  # (B, R*R, C)
        return replaced_attention_output(attn, out, side, resolution)


def square_side(tokens: Tensor) -> int:
    """tokens: (B, side*side, C) of a square feature map -> side."""
    side = round(tokens.shape[1] ** 0.5)
    if side * side != tokens.shape[1]:
        raise ValueError(f"A captured layer sees a non-square {tokens.shape[1]}-pixel feature map; use square images.")
    return side


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def upsample_tokens(tokens: Tensor, resolution: int) -> Tensor:
    """(B, side*side, C) -> (B, R*R, C), bicubic over the token grid (align_corners=False)."""
    batch, _, channels = tokens.shape
    side = square_side(tokens)
    grid = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    upsampled = F.interpolate(grid, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return upsampled.flatten(2).transpose(1, 2)


def query_heads(attn: Attention, features: Tensor) -> Tensor:
    """features (B, N, C) -> queries (B, H, N, d): the layer's ``to_q``, split into heads, then its
    per-head query norm where it has one (SD 3.5's RMSNorm; the UNets have none), as its processor does."""
    q = split_heads(attn.to_q(features), attn.heads)
    return q if attn.norm_q is None else attn.norm_q(q)


def key_heads(attn: Attention, context: Tensor) -> Tensor:
    """context (B, T, D) as the layer receives it -> the context tokens' keys (B, H, T, d).

    A cross-attention layer (UNet ``attn2``) projects the context with ``to_k``. A joint-attention
    layer (SD 3's MMDiT: one attention over the image tokens and the context tokens together, each
    stream with its own projections) projects the context stream with ``add_k_proj`` and normalizes
    it with ``norm_added_k``; its ``to_k`` is the image stream's.
    """
    if attn.added_kv_proj_dim is not None:
        k = split_heads(attn.add_k_proj(context), attn.heads)
        return k if attn.norm_added_k is None else attn.norm_added_k(k)
    k = split_heads(attn.to_k(context), attn.heads)
    return k if attn.norm_k is None else attn.norm_k(k)


def head_probabilities(attn: Attention, hidden_states: Tensor, context: Tensor, resolution: int) -> Tensor:
    """(B, H, R*R, T): softmax(q k^T * scale) over the context tokens, per head, at R x R.

    The layer's features (B, side*side, C) are bicubically upsampled to R x R, then projected to
    queries (``query_heads``); the keys are the (normed) context's (B, T, D) (``key_heads``). fp32
    whatever dtype the frozen denoiser runs in: maps, targets and losses stay fp32.

    For a joint-attention layer the softmax runs over the context tokens alone, not over the image
    and context tokens the layer attends to together. That is the joint attention's context slice,
    renormalized: with scores s over image keys I and context keys C, exp(s_t) / sum_C exp(s) =
    [exp(s_t) / sum_{I+C} exp(s)] / [sum_C exp(s) / sum_{I+C} exp(s)], the joint denominator cancels.
    """
    q = query_heads(attn, upsample_tokens(hidden_states, resolution)).float()
    k = key_heads(attn, context).float()
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)


def head_mean_maps(attn: Attention, hidden_states: Tensor, context: Tensor, resolution: int) -> Tensor:
    """(B, R*R, T): the layer's map of every context token, the per-head probabilities averaged over heads."""
    return head_probabilities(attn, hidden_states, context, resolution).mean(dim=1)


#: A layer's maps: (attn, its features (B, N, C), the normed context (B, T, D), R) -> (B, R*R, T).
LayerMaps = Callable[[Attention, Tensor, Tensor, int], Tensor]


def replaced_attention_output(attn: Attention, out: Tensor, side: int, resolution: int) -> Tensor:
    """out: (B, R*R, C) attention output at R x R -> (B, side*side, C_out) the layer's replaced output.

    Downsampled bicubically (align_corners=False), as StableXLKeypoints' processor does, then the
    layer's own output projection.
    """
    batch = out.shape[0]
    grid = out.transpose(1, 2).reshape(batch, -1, resolution, resolution)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    out = grid.flatten(2).transpose(1, 2).to(attn.to_out[0].weight.dtype)
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def cross_attention_layers(model: nn.Module) -> list[str]:
    """Names of every layer that attends to context tokens, in module order: a UNet's cross-attention
    layers (``attn2``) and a multimodal transformer's joint-attention layers (those with projections of
    their own for the context stream, ``add_k_proj``; SD 3's ``transformer_blocks.<i>.attn``).

    SD 3.5 medium's first blocks also hold an ``attn2``: MMDiT-X's second, image-only self-attention
    (no context projection), which is not among them.
    """
    return [name for name, module in model.named_modules() if isinstance(module, Attention) and (
        (name.endswith("attn2") and module.is_cross_attention) or module.added_kv_proj_dim is not None)]


def check_layer_names(model: nn.Module, layers: Sequence[str]) -> None:
    """Raises ConfigError unless ``layers`` are distinct cross- or joint-attention layers of ``model``.

    Works on a model built on the meta device (no weights), so that a wrong name is reported
    before any weight loads.
    """
    valid = cross_attention_layers(model)
    if not layers:
        raise ConfigError(f"No captured layers given. The cross- or joint-attention layers of this model: {valid}")
    unknown = [name for name in layers if name not in valid]
    if unknown:
        modules = dict(model.named_modules())
        self_attention = [name for name in unknown if name.endswith("attn1")]
        image_only = [name for name in unknown if name.endswith("attn2") and isinstance(modules.get(name), Attention)]
        hint = ""
        if self_attention:
            hint += (f" {self_attention} are self-attention layers (attn1): their maps are over pixels, not "
                     "context tokens; capture the attn2 of the same block instead.")
        if image_only:
            hint += (f" {image_only} are image-only self-attention layers (attn2 of MMDiT-X's dual attention, in SD 3.5 "
                     "medium's first blocks): their keys are image tokens, not context tokens; capture "
                     f"{[name[:-1] for name in image_only]} (the same blocks' joint attention) instead.")
        raise ConfigError(f"{unknown} are not cross- or joint-attention layers of this model.{hint} Valid names: {valid}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"Captured layers must be distinct, got {list(layers)}.")


class AttentionCapture:
    """Installs capture processors on named cross- or joint-attention layers of a denoiser and returns their maps.

    Holds only configuration; the state of a denoiser call travels with the call (``AttentionCall``).

    Args:
        unet: the (frozen) denoiser: a UNet2DConditionModel, or SD 3's SD3Transformer2DModel.
        layers: full module names of the captured layers (``cross_attention_layers``),
            e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` or ``transformer_blocks.12.attn``.
        stop_early: end the denoiser's forward once every captured layer ran (same maps, less work).
        replace_output: replace the captured layers' outputs as StableXLKeypoints did (changes
            the network; off by default).
        layer_maps: computes one layer's maps; default ``head_mean_maps`` (the plain math). The
            engine passes its faster equivalent (``Engine.layer_maps``).
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[str],
        stop_early: bool = True,
        replace_output: bool = False,
        layer_maps: LayerMaps | None = None,
    ) -> None:
        check_layer_names(unet, layers)
        self.layers = list(layers)
        self.stop_early = stop_early
        self.replace_output = replace_output
        self.layer_maps = layer_maps or head_mean_maps
        self._originals: dict[str, Callable] = {}
        self._modules: dict[str, Attention] = {}
        for name, module in unet.named_modules():
            if not isinstance(module, Attention):
                continue
            original = module.processor
            if name in self.layers:
                processor = CaptureProcessor(self, name, original)
            elif not accepts_call(original):
                processor = PerCallProcessor(original)
            else:
                continue
            self._originals[name], self._modules[name] = original, module
            module.set_processor(processor)

    def remove(self) -> None:
        """Restores the original processors."""
        for name, module in self._modules.items():
            module.set_processor(self._originals[name])

    def run(self, forward: Callable[[dict], object], call: AttentionCall) -> None:
        """Calls ``forward(call_kwargs)`` (one denoiser call, which hands ``call_kwargs`` to every processor) for
        ``call``, stopping after the last captured layer."""
        try:
            forward({"call": call})
        except _StopForward:
            pass
        missing = [name for name in self.layers if name not in call.visited]
        if missing:
            raise RuntimeError(f"The denoiser call never reached captured layers {missing}.")

    def maps(self, forward: Callable[[AttentionCall], object], resolution: int) -> Tensor:
        """Runs ``forward(call)`` and returns maps (B, T, R, R): probabilities over tokens, layer-averaged.

        ``forward`` makes the denoiser call(s) for ``call``, passing it on with ``run``.
        """
        call = AttentionCall(resolution)
        forward(call)
        if sorted(call.recorded) != sorted(self.layers):
            raise RuntimeError(f"Captured {call.recorded}, expected each of {self.layers} once.")
        mean = call.total.div_(len(self.layers))  # (B, R*R, T), in place: one (B, R*R, T) tensor alive, not two
        call.total = None  # a checkpointed graph keeps the call alive until backward: not the sum
        batch, _, tokens = mean.shape
        return mean.transpose(1, 2).reshape(batch, tokens, resolution, resolution)
