"""The head-mean attention maps, fast: blocked, recomputed in backward, queries upsampled after projection.

The same numbers as the plain math of ``lightning_modules.capture.head_mean_maps`` (up to float rounding,
tested), from far fewer FLOPs and far less memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from lightning_modules.capture import key_heads, query_heads, split_heads, square_side, upsample_tokens


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


class FastLayerMaps:
    """``capture.head_mean_maps`` computed by the engine: a ``capture.LayerMaps`` with the same numbers.

    Args:
        memory_efficient: blocked head mean with recomputation in backward (``HeadMeanAttention``).
        upsample_queries: project the layer's features to queries, then upsample the queries:
            ``to_q`` is affine per pixel and bicubic weights sum to 1, so this equals projecting the
            upsampled features (StableKeypoints' order) at (R / side)^2 fewer FLOPs; the upsampling
            itself happens inside the attention blocks (for a layer with a query norm, before the norm,
            at full resolution).
    """

    def __init__(self, memory_efficient: bool = True, upsample_queries: bool = True) -> None:
        self.memory_efficient = memory_efficient
        self.upsample_queries = upsample_queries
        self._weights: dict[tuple[int, int, torch.device], Tensor] = {}

    def bicubic_weights(self, side: int, resolution: int, device: torch.device) -> Tensor:
        """(R, side) fp32 upsampling weights, cached."""
        key = (side, resolution, device)
        if key not in self._weights:
            self._weights[key] = bicubic_weights(side, resolution).float().to(device)
        return self._weights[key]

    def __call__(self, attn: Attention, hidden_states: Tensor, context: Tensor, resolution: int) -> Tensor:
        weights = None
        if not self.upsample_queries:
            q = query_heads(attn, upsample_tokens(hidden_states, resolution))
        elif attn.norm_q is None:
            q = split_heads(attn.to_q(hidden_states), attn.heads)
            weights = self.bicubic_weights(square_side(hidden_states), resolution, q.device)
        else:
            # A query norm (SD 3.5's per-head RMSNorm) is not affine: the projection is upsampled, then normed,
            # which equals norming the projection of the upsampled features.
            q = attn.norm_q(split_heads(upsample_tokens(attn.to_q(hidden_states), resolution), attn.heads))
        # Maps, targets and losses stay fp32 whatever dtype the frozen denoiser runs in.
        return head_mean_attention(q.float(), key_heads(attn, context).float(), attn.scale, self.memory_efficient, weights)
