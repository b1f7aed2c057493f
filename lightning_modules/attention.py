"""Capture of cross-attention maps at chosen UNet layers, recomputed at a higher resolution.

At each captured ``attn2`` layer the hidden states that enter the layer (what its ``to_q`` sees)
are bicubically upsampled to R x R, projected by the layer's own ``to_q``, and attended against
the layer's own ``to_k`` of the context: ``softmax(q k^T * scale)`` over the tokens, averaged over
heads. The layer's output is left exactly as the unmodified UNet computes it (StableKeypoints'
behaviour), unless ``replace_output`` reproduces StableXLKeypoints. Nothing after the last captured
layer can change the maps, so the forward pass stops there.

Uses diffusers' attention-processor API: each captured ``Attention`` module gets a
``CaptureProcessor`` wrapping its original processor; every other layer keeps its fused default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by the last captured layer to end the UNet forward early."""


#: Bytes of one block of per-head scores in ``HeadMeanAttention``: small enough to stay in cache.
_BLOCK_BYTES = 4 << 20


def bicubic_weights(side: int, resolution: int) -> Tensor:
    """(R, side) float64: the 1-D weights of ``F.interpolate(mode="bicubic", align_corners=False)``.

    PyTorch's bicubic upsampling is separable, so upsampling a side x side grid to R x R is
    ``W @ grid @ W.T`` with this W.
    """
    eye = torch.eye(side, dtype=torch.float64).view(side, 1, 1, side)
    return F.interpolate(eye, size=(1, resolution), mode="bicubic", align_corners=False).view(side, resolution).T


class _Queries:
    """The queries of HeadMeanAttention, block by block: given at full resolution, or as a
    low-resolution grid that each block upsamples (so the (B, H, R*R, d) queries never exist)."""

    def __init__(self, q: Tensor, weights: Tensor | None) -> None:
        self.q, self.weights = q, weights
        if weights is None:
            self.length, self.row = q.shape[2], 1
        else:
            batch, heads, cells, dim = q.shape
            side = weights.shape[1]
            self.grid = q.transpose(-1, -2).reshape(batch, heads, dim, side, side)
            self.length, self.row = weights.shape[0] ** 2, weights.shape[0]

    def blocks(self, rows: int):
        """Yields (start, stop) token ranges of about ``rows`` tokens, whole image rows when upsampling."""
        step = max(self.row, rows // self.row * self.row)
        for start in range(0, self.length, step):
            yield start, min(start + step, self.length)

    def block(self, start: int, stop: int) -> Tensor:
        """-> (B, H, stop - start, d) queries of tokens start..stop."""
        if self.weights is None:
            return self.q[:, :, start:stop]
        w = self.weights
        upsampled = (w[start // self.row : stop // self.row] @ self.grid) @ w.T  # (B, H, d, rows, R)
        return upsampled.flatten(-2).transpose(-1, -2)

    def accumulate_grad(self, grad_q: Tensor, start: int, stop: int, block_grad: Tensor) -> None:
        """Adds a block's query gradient (B, H, stop - start, d) into ``grad_q`` (shaped like q)."""
        if self.weights is None:
            grad_q[:, :, start:stop] = block_grad
            return
        w = self.weights
        g = block_grad.transpose(-1, -2).unflatten(-1, (-1, self.row)) @ w  # (B, H, d, rows, side)
        grid_grad = w[start // self.row : stop // self.row].T @ g  # (B, H, d, side, side)
        grad_q += grid_grad.flatten(-2).transpose(-1, -2)


class HeadMeanAttention(torch.autograd.Function):
    """softmax(q k^T * scale) over tokens, averaged over heads, computed block by block.

    Plain autograd keeps H per-head probability tensors of (B, N, T) for backward and streams each
    of them through memory several times. This function works on blocks of query rows small
    enough to stay in cache, keeps only q and k for backward (q at low resolution when the
    upsampling is folded in), and recomputes the probabilities there. Its backward also uses that
    the loss reads only a few tokens' maps: with P = softmax(S), upstream gradient G on P and
    c = sum_t G P, dS = P * G - c * P, where P * G is non-zero only in G's non-zero columns, so
    dq = (P * G) k - c (P k) and dk = (P * G)^T q - P^T (c q) need the full P only inside two
    matrix products.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: float, weights: Tensor | None) -> Tensor:
        # q: (B, H, N or side*side, d), k: (B, H, T, d), weights: None or (R, side) -> (B, N, T)
        queries = _Queries(q, weights)
        k_t = k.transpose(-1, -2)
        out = q.new_empty(q.shape[0], queries.length, k.shape[2])
        for start, stop in queries.blocks(_block_rows(q, k)):
            block = torch.softmax(queries.block(start, stop) @ k_t * scale, dim=-1)  # (B, H, n, T)
            torch.mean(block, dim=1, out=out[:, start:stop])
        ctx.save_for_backward(q, k, weights)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        q, k, weights = ctx.saved_tensors
        scale, heads, tokens = ctx.scale, q.shape[1], k.shape[2]
        queries = _Queries(q, weights)
        grad = grad / heads
        k_t = k.transpose(-1, -2)
        used = (grad != 0).any(dim=1).any(dim=0).nonzero().flatten()  # columns the loss reads
        sparse = len(used) <= tokens // 4
        k_used = k[:, :, used]
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        for start, stop in queries.blocks(_block_rows(q, k)):
            q_block = queries.block(start, stop)
            p = torch.softmax(q_block @ k_t * scale, dim=-1)  # (B, H, n, T)
            g = grad[:, None, start:stop]  # (B, 1, n, T)
            if sparse:
                pg = p[..., used] * g[..., used]  # (B, H, n, U)
                c = pg.sum(dim=-1, keepdim=True)  # (B, H, n, 1)
                dq_block = pg @ k_used - c * (p @ k)
                dk -= p.transpose(-1, -2) @ (c * q_block)
                dk[:, :, used] += pg.transpose(-1, -2) @ q_block
            else:
                ds = p * (g - (g * p).sum(dim=-1, keepdim=True))
                dq_block = ds @ k
                dk += ds.transpose(-1, -2) @ q_block
            queries.accumulate_grad(dq, start, stop, dq_block)
        return dq.mul_(scale), dk.mul_(scale), None, None


def _block_rows(q: Tensor, k: Tensor) -> int:
    """Query rows per block so that a (B, H, rows, T) block of fp32 scores is about _BLOCK_BYTES."""
    per_row = q.shape[0] * q.shape[1] * k.shape[2] * 4
    return max(8, _BLOCK_BYTES // per_row)


def head_mean_attention(
    q: Tensor, k: Tensor, scale: float, memory_efficient: bool = True, weights: Tensor | None = None
) -> Tensor:
    """q: (B, H, N, d), k: (B, H, T, d) -> (B, N, T) attention probabilities averaged over heads.

    With ``weights`` (R, side) from ``bicubic_weights``, q holds the queries of a side x side grid
    (N = side * side) and is bicubically upsampled to R x R first: the result is (B, R*R, T).
    """
    if memory_efficient:
        return HeadMeanAttention.apply(q, k, scale, weights)
    return torch.softmax(upsampled_queries(q, weights) @ k.transpose(-1, -2) * scale, dim=-1).mean(dim=1)


def upsampled_queries(q: Tensor, weights: Tensor | None) -> Tensor:
    """q: (B, H, side*side, d) -> (B, H, R*R, d) upsampled by ``weights`` (R, side); q itself when None."""
    queries = _Queries(q, weights)
    return queries.block(0, queries.length)


class CaptureProcessor:
    """Attention processor that records upsampled cross-attention maps, then runs the original."""

    def __init__(self, capture: "AttentionCapture", name: str, original: Callable) -> None:
        self.capture = capture
        self.name = name
        self.original = original

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kwargs) -> Tensor:
        capture = self.capture
        if not capture.recording:
            output = self.original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            capture._visited(self.name)
            return output
        maps, replaced = self._maps(attn, hidden_states, encoder_hidden_states)
        capture._record(self.name, maps)
        if replaced is not None:
            output = replaced
        elif capture._is_last(self.name) and capture.stop_early:
            output = None  # nothing downstream is needed: skip the layer's own attention
        else:
            output = self.original(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        capture._visited(self.name)
        return output

    def _maps(self, attn: Attention, hidden_states: Tensor, context: Tensor) -> tuple[Tensor, Tensor | None]:
        capture = self.capture
        batch, length, channels = hidden_states.shape
        side = round(length**0.5)
        if side * side != length:
            raise ValueError(f"Layer {self.name} sees a non-square {length}-pixel feature map; use square images.")
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        res = capture.resolution
        weights = None
        if capture.upsample_queries:
            # to_q is affine per pixel and bicubic weights sum to 1, so upsampling the projected
            # queries equals projecting the upsampled features (StableKeypoints' order) at
            # (R / side)^2 fewer FLOPs; the upsampling itself happens inside the attention blocks.
            q = attn.to_q(hidden_states)
            weights = capture.bicubic_weights(side, q.device)
        else:
            q = attn.to_q(_upsample_tokens(hidden_states, side, res))
        k = attn.to_k(context)
        heads = attn.heads
        q = q.view(batch, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(batch, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        # Maps, targets and losses stay fp32 whatever dtype the frozen UNet runs in (SPEC section 8).
        q, k = q.float(), k.float()
        replaced = None
        if capture.replace_output:
            probs = torch.softmax(upsampled_queries(q, weights) @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (B, H, R*R, T)
            maps = probs.mean(dim=1)
            replaced = self._replaced_output(attn, probs, context, side)
        else:
            maps = head_mean_attention(q, k, attn.scale, capture.memory_efficient, weights)
        return maps, replaced

    def _replaced_output(self, attn: Attention, probs: Tensor, context: Tensor, side: int) -> Tensor:
        """StableXLKeypoints' layer output: attention at R x R, downsampled back to the layer's size."""
        batch, heads = probs.shape[:2]
        v = attn.to_v(context)
        v = v.view(batch, -1, heads, v.shape[-1] // heads).transpose(1, 2).float()
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, v.shape[-1] * heads)  # (B, R*R, C)
        res = self.capture.resolution
        out = out.transpose(1, 2).reshape(batch, -1, res, res)
        out = F.interpolate(out, size=(side, side), mode="bilinear", align_corners=False)
        out = out.flatten(2).transpose(1, 2).to(attn.to_out[0].weight.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            raise ValueError(f"replace_output does not support residual attention at {self.name}.")
        return out / attn.rescale_output_factor


def _upsample_tokens(tokens: Tensor, side: int, resolution: int) -> Tensor:
    """(B, side*side, C) -> (B, R*R, C), bicubic over the token grid (align_corners=False)."""
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    upsampled = F.interpolate(grid, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return upsampled.flatten(2).transpose(1, 2)


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of every cross-attention (``attn2``) layer of a UNet, in module order."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and name.endswith("attn2")]


class AttentionCapture:
    """Installs capture processors on named ``attn2`` layers of a UNet and returns their maps.

    Args:
        unet: the (frozen) UNet2DConditionModel.
        layers: full module names of the captured cross-attention layers,
            e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``.
        stop_early: end the UNet forward once every captured layer ran (same maps, less work).
        memory_efficient: head-average inside the capture with per-head recomputation in backward.
        replace_output: replace the captured layers' outputs as StableXLKeypoints did (changes
            the network; off by default).
        upsample_queries: project the layer's features to queries, then upsample the queries
            (the same numbers as StableKeypoints' upsample-then-project, far fewer FLOPs).
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[str],
        stop_early: bool = True,
        memory_efficient: bool = True,
        replace_output: bool = False,
        upsample_queries: bool = True,
    ) -> None:
        valid = cross_attention_layers(unet)
        unknown = [name for name in layers if name not in valid]
        if unknown or not layers:
            raise ValueError(
                f"Unknown or empty cross-attention layer names {unknown or list(layers)}. "
                f"Valid names for this UNet: {valid}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"Captured layers must be distinct, got {list(layers)}.")
        self.layers = list(layers)
        self.stop_early = stop_early
        self.memory_efficient = memory_efficient
        self.replace_output = replace_output
        self.upsample_queries = upsample_queries
        self._weights: dict[tuple[int, int, torch.device], Tensor] = {}
        self.recording = True
        self.resolution = 0
        self._sum: Tensor | None = None
        self._recorded: list[str] = []
        self._seen: set[str] = set()
        modules = dict(unet.named_modules())
        self._originals = {name: modules[name].processor for name in self.layers}
        for name in self.layers:
            modules[name].set_processor(CaptureProcessor(self, name, self._originals[name]))
        self._modules = {name: modules[name] for name in self.layers}

    def remove(self) -> None:
        """Restores the original processors."""
        for name, module in self._modules.items():
            module.set_processor(self._originals[name])

    def bicubic_weights(self, side: int, device: torch.device) -> Tensor:
        """(R, side) fp32 upsampling weights at the current resolution, cached."""
        key = (side, self.resolution, device)
        if key not in self._weights:
            self._weights[key] = bicubic_weights(side, self.resolution).float().to(device)
        return self._weights[key]

    def _record(self, name: str, maps: Tensor) -> None:
        # A running sum: one (B, R*R, T) tensor alive instead of one per layer.
        self._recorded.append(name)
        self._sum = maps if self._sum is None else self._sum + maps

    def _is_last(self, name: str) -> bool:
        return len(self._seen | {name}) == len(self.layers)

    def _visited(self, name: str) -> None:
        self._seen.add(name)
        if self.stop_early and len(self._seen) == len(self.layers):
            raise _StopForward

    @contextmanager
    def paused(self):
        """Runs the UNet without recording (e.g. a reference-attention write pass); early stop stays."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def run_unet(self, forward: Callable[[], object]) -> None:
        """Calls ``forward`` (one UNet call), stopping after the last captured layer if enabled."""
        self._seen = set()
        try:
            forward()
        except _StopForward:
            pass
        missing = [name for name in self.layers if name not in self._seen]
        self._seen = set()
        if missing:
            raise RuntimeError(f"The UNet call never reached captured layers {missing}.")

    def maps(self, forward: Callable[[], object], resolution: int) -> Tensor:
        """Runs one UNet call and returns maps (B, T, R, R): probabilities over tokens, layer-averaged."""
        self.resolution = resolution
        self._sum, self._recorded = None, []
        try:
            self.run_unet(forward)
            if sorted(self._recorded) != sorted(self.layers):
                raise RuntimeError(f"Captured {self._recorded}, expected each of {self.layers} once.")
            mean = self._sum / len(self.layers)  # (B, R*R, T)
        finally:
            self._sum, self._recorded = None, []
        batch, _, tokens = mean.shape
        return mean.transpose(1, 2).reshape(batch, tokens, resolution, resolution)
