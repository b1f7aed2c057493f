"""Capture of cross-attention maps at chosen UNet layers, recomputed at a higher resolution.

At each captured ``attn2`` layer the hidden states that enter the layer (what its ``to_q`` sees)
are bicubically upsampled to R x R, projected by the layer's own ``to_q``, and attended against
the layer's own ``to_k`` of the context: ``softmax(q k^T * scale)`` over the tokens, averaged over
heads. The layer's output is left exactly as the unmodified UNet computes it (StableKeypoints'
behaviour), unless ``replace_output`` reproduces StableXLKeypoints. Nothing after the last captured
layer can change the maps, so the forward pass stops there.

Uses diffusers' attention-processor API: each captured ``Attention`` module gets a
``CaptureProcessor`` wrapping its original processor; every other layer keeps its fused default
(wrapped so that it accepts the per-call argument). The state of one UNet call (resolution, the
maps recorded so far, which layers ran) is an ``AttentionCall`` passed with the call as
``cross_attention_kwargs={"call": ...}``, the way zero123plus' own reference UNet passes its mode
and stored states, so a gradient-checkpointing recompute is pure. The early stop raises out of the
last captured layer; under checkpointing, torch's recompute ends once the last saved tensor is
rebuilt (its default early stop), which is before that raise.
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
    """Raised by the last captured layer to end the UNet forward early."""


#: Bytes of one block of per-head scores in ``HeadMeanAttention``. Large enough that the
#: per-block matmuls (whose inner size in backward is the block's rows) run efficiently, small
#: enough to stay a transient. ``python -m benchmarks.head_mean`` times each size for SD 1.5's
#: layers; on 2 CPU cores 8-32 MiB were within the machine's noise of each other, 4 and 64 slower.
_BLOCK_BYTES = 16 << 20


def bicubic_weights(side: int, resolution: int) -> Tensor:
    """(R, side) float64: the 1-D weights of ``F.interpolate(mode="bicubic", align_corners=False)``.

    PyTorch's bicubic upsampling is separable, so upsampling a side x side grid to R x R is
    ``W @ grid @ W.T`` with this W.
    """
    eye = torch.eye(side, dtype=torch.float64).view(side, 1, 1, side)
    return F.interpolate(eye, size=(1, resolution), mode="bicubic", align_corners=False).view(side, resolution).T


class _Queries:
    """The queries of HeadMeanAttention, block by block, as (B*H, n, d) matrices: given at full
    resolution, or as a low-resolution grid that each block upsamples (so the (B, H, R*R, d)
    queries never exist).

    The upsampling is separable (``W @ grid @ W.T``): along x once per call, for the whole grid
    (R / side times the grid's size), then along y per block, as one batched product whose result
    is already in the row-major layout the score products want.
    """

    def __init__(self, q: Tensor, weights: Tensor | None) -> None:
        batch, heads, cells, dim = q.shape
        self.q, self.weights, self.dim = q, weights, dim
        self.matrices = batch * heads
        if weights is None:
            self.length, self.row = cells, 1
        else:
            resolution, side = weights.shape
            self.length, self.row = resolution**2, resolution
            grid = q.reshape(self.matrices * side, side, dim)  # one image row (x, d) per matrix
            # (B*H, side_y, R_x * d): the grid upsampled along x.
            self.along_x = torch.bmm(weights.expand(len(grid), -1, -1), grid).view(self.matrices, side, -1)

    def blocks(self, rows: int):
        """Yields (start, stop) token ranges of about ``rows`` tokens, whole image rows when upsampling."""
        step = max(self.row, rows // self.row * self.row)
        for start in range(0, self.length, step):
            yield start, min(start + step, self.length)

    def block(self, start: int, stop: int) -> Tensor:
        """-> (B*H, stop - start, d) queries of tokens start..stop."""
        if self.weights is None:
            return self.q[:, :, start:stop].reshape(self.matrices, stop - start, self.dim)
        w = self.weights[start // self.row : stop // self.row]  # (rows, side)
        return torch.bmm(w.expand(self.matrices, -1, -1), self.along_x).view(self.matrices, stop - start, self.dim)

    def grad_accumulator(self) -> Tensor:
        """A zero gradient to ``accumulate`` blocks into; ``grad`` turns it into q's gradient."""
        if self.weights is None:
            return torch.zeros_like(self.q)
        return torch.zeros_like(self.along_x)

    def accumulate(self, acc: Tensor, start: int, stop: int, block_grad: Tensor) -> None:
        """Adds a block's query gradient (B*H, stop - start, d) into ``acc``."""
        if self.weights is None:
            acc[:, :, start:stop] = block_grad.view(*acc.shape[:2], stop - start, self.dim)
            return
        w = self.weights[start // self.row : stop // self.row]  # (rows, side)
        rows = block_grad.view(self.matrices, -1, self.along_x.shape[-1])  # (B*H, rows, R_x * d)
        torch.baddbmm(acc, w.T.expand(self.matrices, -1, -1), rows, out=acc)

    def grad(self, acc: Tensor) -> Tensor:
        """-> q's gradient (B, H, N, d) from the accumulated blocks."""
        if self.weights is None:
            return acc
        along_x = acc.view(-1, self.row, self.dim)  # (B*H*side_y, R_x, d)
        grid = torch.bmm(self.weights.T.expand(len(along_x), -1, -1), along_x)  # (B*H*side_y, side_x, d)
        return grid.view(self.q.shape)


class HeadMeanAttention(torch.autograd.Function):
    """softmax(q k^T * scale) over tokens, averaged over heads, computed block by block.

    Plain autograd keeps H per-head probability tensors of (B, N, T) for backward and streams each
    of them through memory several times. This function works on blocks of query rows small
    enough to stay in cache, in one reused buffer (scaled scores, then probabilities in place),
    keeps only q and k for backward (q at low resolution when the upsampling is folded in), and
    recomputes the probabilities there. Its backward also uses that the loss reads only a few
    tokens' maps: with P = softmax(S), upstream gradient G on P and c = sum_t G P,
    dS = P * G - c * P, where P * G is non-zero only in G's non-zero columns, so
    dq = (P * G) k - c (P k) and dk = (P * G)^T q - P^T (c q) need the full P only inside two
    matrix products.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: float, weights: Tensor | None) -> Tensor:
        # q: (B, H, N or side*side, d), k: (B, H, T, d), weights: None or (R, side) -> (B, N, T)
        batch, heads, tokens = q.shape[0], q.shape[1], k.shape[2]
        queries = _Queries(q, weights)
        k_t = k.reshape(batch * heads, tokens, -1).transpose(1, 2)  # (B*H, d, T)
        out = q.new_empty(batch, queries.length, tokens)
        probs = _Probabilities(k_t, scale)
        for start, stop in queries.blocks(_block_rows(q, k)):
            p = probs(queries.block(start, stop)).view(batch, heads, stop - start, tokens)
            torch.mean(p, dim=1, out=out[:, start:stop])
        ctx.save_for_backward(q, k, weights)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        q, k, weights = ctx.saved_tensors
        scale = ctx.scale
        batch, heads, tokens, dim = q.shape[0], q.shape[1], k.shape[2], q.shape[3]
        queries = _Queries(q, weights)
        rows = _block_rows(q, k)
        k = k.reshape(batch * heads, tokens, dim)  # (B*H, T, d)
        k_t = k.transpose(1, 2)
        used = (grad != 0).any(dim=1).any(dim=0).nonzero().flatten()  # columns the loss reads
        sparse = len(used) <= tokens // 4
        k_used = k[:, used]
        dq = queries.grad_accumulator()
        dk = torch.zeros_like(k)
        probs = _Probabilities(k_t, scale)
        for start, stop in queries.blocks(rows):
            n = stop - start
            q_block = queries.block(start, stop)  # (B*H, n, d)
            p = probs(q_block)  # (B*H, n, T)
            if sparse:
                g = grad[:, start:stop, used] / heads  # (B, n, U)
                pg = (p.view(batch, heads, n, tokens)[..., used] * g[:, None]).view(batch * heads, n, -1)
                c = pg.sum(dim=-1, keepdim=True)  # (B*H, n, 1)
                dq_block = torch.bmm(pg, k_used) - c * torch.bmm(p, k)
                torch.baddbmm(dk, p.transpose(1, 2), c * q_block, alpha=-1, out=dk)
                dk[:, used] += torch.bmm(pg.transpose(1, 2), q_block)
            else:
                g = (grad[:, None, start:stop] / heads).expand(batch, heads, n, tokens).reshape(batch * heads, n, tokens)
                ds = p.mul_(g - (g * p).sum(dim=-1, keepdim=True))
                dq_block = torch.bmm(ds, k)
                torch.baddbmm(dk, ds.transpose(1, 2), q_block, out=dk)
            queries.accumulate(dq, start, stop, dq_block)
        return queries.grad(dq).mul_(scale), dk.view(batch, heads, tokens, dim).mul_(scale), None, None


class _Probabilities:
    """softmax(q k^T * scale) of a (B*H, rows, d) block of queries, in one (B*H, rows, T) buffer reused by every block.

    The scale is applied inside the matrix product and the softmax writes in place: one pass over
    the block's scores fewer, and no allocation per block (on CPU each large allocation is a fresh
    mapping whose pages fault in again).
    """

    def __init__(self, k_t: Tensor, scale: float) -> None:
        self.k_t, self.scale = k_t, scale
        self.buffer: Tensor | None = None

    def __call__(self, q: Tensor) -> Tensor:
        shape = (q.shape[0], q.shape[1], self.k_t.shape[2])
        if self.buffer is None:
            self.buffer = q.new_empty(shape)  # the first block is the largest
        scores = self.buffer.view(-1)[: shape[0] * shape[1] * shape[2]].view(shape)
        torch.baddbmm(scores, q, self.k_t, beta=0, alpha=self.scale, out=scores)
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


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
    return queries.block(0, queries.length).view(*q.shape[:2], queries.length, q.shape[3])


@dataclass(eq=False)
class AttentionCall:
    """The state of one UNet call, passed to every processor as ``cross_attention_kwargs={"call": ...}``.

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
        if call is None:  # a plain UNet call, outside AttentionCapture.maps
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

    def _maps(self, attn: Attention, hidden_states: Tensor, context: Tensor, res: int) -> tuple[Tensor, Tensor | None]:
        capture = self.capture
        batch, length, channels = hidden_states.shape
        side = round(length**0.5)
        if side * side != length:
            raise ValueError(f"Layer {self.name} sees a non-square {length}-pixel feature map; use square images.")
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        weights = None
        if capture.upsample_queries:
            # to_q is affine per pixel and bicubic weights sum to 1, so upsampling the projected
            # queries equals projecting the upsampled features (StableKeypoints' order) at
            # (R / side)^2 fewer FLOPs; the upsampling itself happens inside the attention blocks.
            q = attn.to_q(hidden_states)
            weights = capture.bicubic_weights(side, res, q.device)
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
            replaced = self._replaced_output(attn, probs, context, side, res)
        else:
            maps = head_mean_attention(q, k, attn.scale, capture.memory_efficient, weights)
        return maps, replaced

    def _replaced_output(self, attn: Attention, probs: Tensor, context: Tensor, side: int, res: int) -> Tensor:
        """StableXLKeypoints' layer output: attention at R x R, bicubically downsampled back to the layer's size."""
        if attn.residual_connection:
            raise ValueError(f"replace_output does not support residual attention at {self.name}.")
        batch, heads = probs.shape[:2]
        v = attn.to_v(context)
        v = v.view(batch, -1, heads, v.shape[-1] // heads).transpose(1, 2).float()
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, v.shape[-1] * heads)  # (B, R*R, C)
        return replaced_attention_output(attn, out, side, res)


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


def _upsample_tokens(tokens: Tensor, side: int, resolution: int) -> Tensor:
    """(B, side*side, C) -> (B, R*R, C), bicubic over the token grid (align_corners=False)."""
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    upsampled = F.interpolate(grid, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return upsampled.flatten(2).transpose(1, 2)


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of every cross-attention (``attn2``) layer of a UNet, in module order."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and name.endswith("attn2")]


def check_layer_names(unet: nn.Module, layers: Sequence[str]) -> None:
    """Raises ConfigError unless ``layers`` are distinct cross-attention layers of ``unet``.

    Works on a UNet built on the meta device (no weights), so that a wrong name is reported
    before any weight loads.
    """
    valid = cross_attention_layers(unet)
    if not layers:
        raise ConfigError(f"No captured layers given. Valid cross-attention layers of this UNet: {valid}")
    unknown = [name for name in layers if name not in valid]
    if unknown:
        self_attention = [name for name in unknown if name.endswith("attn1")]
        hint = ""
        if self_attention:
            hint = (f" {self_attention} are self-attention layers (attn1): their maps are over pixels, not "
                    "context tokens; capture the attn2 of the same block instead.")
        raise ConfigError(f"Unknown cross-attention layer names {unknown}.{hint} Valid names for this UNet: {valid}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"Captured layers must be distinct, got {list(layers)}.")


class UnreachedWeights:
    """Finds, during one UNet call, the modules the call never runs, then frees their weights.

    Under the early stop everything after the last captured layer (for SD 1.5's default layers the
    rest of ``up_blocks.2``, ``up_blocks.3`` and the output convolution: 70 M parameters, 0.26 GiB
    in fp32) never runs, yet its weights stay in memory. Which modules a call reaches is recorded
    by forward pre-hooks on the first call (a family's extra passes, e.g. zero123plus' reference
    pass, included), so nothing is guessed from module order. Each freed parameter keeps its dtype
    and device with zero elements: a call that did reach it would fail on the shapes, never run on
    stale values; moving the module between devices still works.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.reached: set[str] = set()
        self._hooks = [module.register_forward_pre_hook(self._reach(name)) for name, module in unet.named_modules()]

    def _reach(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.reached.add(name)
        return hook

    def release(self) -> int:
        """Removes the hooks and frees every parameter and buffer of an unreached module -> how many elements."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        # A container (ModuleList) is iterated, never called: it lives if anything inside it ran.
        alive = {""}
        for name in self.reached:
            parts = name.split(".")
            alive.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        freed = 0
        for name, module in self.unet.named_modules():
            if name in alive or name.rpartition(".")[0] not in alive:
                continue  # it ran, or it is inside an unreached module freed already
            for tensor in [*module.parameters(), *module.buffers()]:
                freed += tensor.numel()
                tensor.data = tensor.data.new_empty(0)
        return freed


class AttentionCapture:
    """Installs capture processors on named ``attn2`` layers of a UNet and returns their maps.

    Holds only configuration; the state of a UNet call travels with the call (``AttentionCall``).

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
        release_unreached: with ``stop_early``, free the weights of the modules the first call never
            ran (``UnreachedWeights``); without ``stop_early`` every module runs and nothing is freed.
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[str],
        stop_early: bool = True,
        memory_efficient: bool = True,
        replace_output: bool = False,
        upsample_queries: bool = True,
        release_unreached: bool = True,
    ) -> None:
        check_layer_names(unet, layers)
        self.layers = list(layers)
        self.stop_early = stop_early
        self.memory_efficient = memory_efficient
        self.replace_output = replace_output
        self.upsample_queries = upsample_queries
        self._unreached = UnreachedWeights(unet) if stop_early and release_unreached else None
        #: Elements of the weights freed after the first call (``UnreachedWeights``).
        self.released = 0
        self._weights: dict[tuple[int, int, torch.device], Tensor] = {}
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

    def bicubic_weights(self, side: int, resolution: int, device: torch.device) -> Tensor:
        """(R, side) fp32 upsampling weights, cached."""
        key = (side, resolution, device)
        if key not in self._weights:
            self._weights[key] = bicubic_weights(side, resolution).float().to(device)
        return self._weights[key]

    def run(self, forward: Callable[[dict], object], call: AttentionCall) -> None:
        """Calls ``forward(cross_attention_kwargs)`` (one UNet call) for ``call``, stopping after the last captured layer."""
        try:
            forward({"call": call})
        except _StopForward:
            pass
        missing = [name for name in self.layers if name not in call.visited]
        if missing:
            raise RuntimeError(f"The UNet call never reached captured layers {missing}.")

    def maps(self, forward: Callable[[AttentionCall], object], resolution: int) -> Tensor:
        """Runs ``forward(call)`` and returns maps (B, T, R, R): probabilities over tokens, layer-averaged.

        ``forward`` makes the UNet call(s) for ``call``, passing it on with ``run``.
        """
        call = AttentionCall(resolution)
        forward(call)
        if sorted(call.recorded) != sorted(self.layers):
            raise RuntimeError(f"Captured {call.recorded}, expected each of {self.layers} once.")
        if self._unreached is not None:  # the first call has shown which modules a call runs
            self.released = self._unreached.release()
            self._unreached = None
        mean = call.total / len(self.layers)  # (B, R*R, T)
        call.total = None  # a checkpointed graph keeps the call alive until backward: not the sum
        batch, _, tokens = mean.shape
        return mean.transpose(1, 2).reshape(batch, tokens, resolution, resolution)
