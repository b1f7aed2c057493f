"""The head-mean attention maps, fast: blocked, recomputed in backward, scores upsampled instead of features.

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


class _Scores:
    """The scaled scores ``q k^T * scale`` of HeadMeanAttention, block by block of query rows, and the way a
    block's score gradient goes back to q and k.

    The queries are at the maps' resolution (N = R * R, or the layer's own tokens): a block's scores
    are one batched product.
    """

    def __init__(self, q: Tensor, k: Tensor, scale: float) -> None:
        batch, heads, self.length, dim = q.shape
        self.q, self.scale, self.matrices = q, scale, batch * heads
        self.k = k.reshape(self.matrices, k.shape[2], dim)  # (B*H, T, d)
        self.row, self.band = 1, None

    def queries(self, start: int, stop: int) -> Tensor:
        """-> (B*H, stop - start, d): the queries start..stop (a copy of those rows only when q is a strided view)."""
        return self.q[:, :, start:stop].reshape(self.matrices, stop - start, -1)

    def blocks(self, rows: int):
        """Yields (start, stop) query ranges of about ``rows`` queries, whole image rows when upsampling."""
        step = max(self.row, rows // self.row * self.row)
        for start in range(0, self.length, step):
            yield start, min(start + step, self.length)

    def block(self, start: int, stop: int, out: Tensor) -> Tensor:
        """Writes the (B*H, stop - start, T) scores of queries start..stop into ``out`` and returns it."""
        return torch.baddbmm(out, self.queries(start, stop), self.k.transpose(1, 2), beta=0, alpha=self.scale, out=out)

    def start_backward(self) -> None:
        self.dq = self.q.new_empty(self.matrices, self.length, self.k.shape[2])
        self.dk = torch.zeros_like(self.k)

    def add_grad(self, start: int, stop: int, ds: Tensor) -> None:
        """Adds the contribution of a block's score gradient ``ds`` (B*H, n, T), unscaled, to q's and k's."""
        self.dq[:, start:stop] = torch.bmm(ds, self.k)
        torch.baddbmm(self.dk, ds.transpose(1, 2), self.queries(start, stop), out=self.dk)

    def grads(self) -> tuple[Tensor, Tensor]:
        """-> (dq (B*H, N, d), dk (B*H, T, d))."""
        return self.dq.mul_(self.scale), self.dk.mul_(self.scale)


class _UpsampledScores(_Scores):
    """The scores of bicubically upsampled queries, from the layer's own side x side grid of queries.

    Bicubic upsampling is linear over pixels and the score product is linear in each pixel's
    query, so the scores of the upsampled queries are the upsampled scores of the grid's queries:
    ``(W_y W_x Q) k^T = W_y W_x (Q k^T)``. The grid's scores are one small product; each block
    upsamples them along y (its rows) then along x, 2 * side multiply-adds per score instead of d
    (SD 1.5: 32 instead of 160), and no upsampled query is ever stored. In backward, the blocks'
    score gradients are taken back to the grid the same way (transposed), where dq and dk are two
    small products.
    """

    def __init__(self, q: Tensor, k: Tensor, scale: float, weights: Tensor,
                 band: tuple[list[int], list[int]] | None) -> None:
        super().__init__(q, k, scale)
        self.weights = weights  # (R, side)
        resolution, side = weights.shape
        tokens = self.k.shape[1]
        self.grid_queries = self.queries(0, side * side)  # (B*H, side * side, d)
        self.length, self.row, self.side = resolution**2, resolution, side
        self.band = _band(weights) if band is None else band  # computed once per call, kept for backward
        grid = torch.bmm(self.grid_queries, self.k.transpose(1, 2)).mul_(scale)  # (B*H, side * side, T)
        self.grid = grid.view(self.matrices, side, side * tokens)  # one grid row (x, T) per y

    def _rows(self, start: int, stop: int) -> tuple[Tensor, slice]:
        """-> (the y weights of the rows of queries start..stop (rows, g), the g grid rows they read)."""
        (first_read, last_read), first, last = self.band, start // self.row, stop // self.row
        read = slice(min(first_read[first:last]), max(last_read[first:last]) + 1)
        return self.weights[first:last, read], read

    def block(self, start: int, stop: int, out: Tensor) -> Tensor:
        rows, tokens = (stop - start) // self.row, self.k.shape[1]
        w, read = self._rows(start, stop)
        along_y = torch.bmm(w.expand(self.matrices, -1, -1), self.grid[:, read])  # (B*H, rows, side_x * T)
        along_y = along_y.view(self.matrices * rows, self.side, tokens)
        scores = out.view(self.matrices * rows, self.row, tokens)
        torch.bmm(self.weights.expand(len(along_y), -1, -1), along_y, out=scores)
        return out

    def start_backward(self) -> None:
        self.dgrid = torch.zeros_like(self.grid)

    def add_grad(self, start: int, stop: int, ds: Tensor) -> None:
        rows, tokens = (stop - start) // self.row, self.k.shape[1]
        w, read = self._rows(start, stop)
        rows_grad = ds.reshape(self.matrices * rows, self.row, tokens)
        along_y = torch.bmm(self.weights.T.expand(len(rows_grad), -1, -1), rows_grad)  # (B*H*rows, side_x, T)
        along_y = along_y.view(self.matrices, rows, self.side * tokens)
        dgrid = self.dgrid[:, read]
        dgrid.baddbmm_(w.T.expand(self.matrices, -1, -1), along_y)

    def grads(self) -> tuple[Tensor, Tensor]:
        dgrid = self.dgrid.view(self.matrices, self.side**2, -1).mul_(self.scale)  # (B*H, side * side, T)
        return torch.bmm(dgrid, self.k), torch.bmm(dgrid.transpose(1, 2), self.grid_queries)


def _band(weights: Tensor) -> tuple[list[int], list[int]]:
    """(R, side) upsampling weights -> (first, last): per upsampled row, its first and last non-zero grid row.

    Each bicubic row reads at most 4 grid rows: a block reads only the band its rows span.
    """
    side = weights.shape[1]
    columns = torch.arange(side, device=weights.device).expand_as(weights)
    first = torch.where(weights != 0, columns, side).amin(dim=1).tolist()
    last = torch.where(weights != 0, columns, -1).amax(dim=1).tolist()
    return first, last


def _scores(q: Tensor, k: Tensor, scale: float, weights: Tensor | None, band=None) -> _Scores:
    """The scores of q and k; ``band``: the ``_band`` of ``weights`` when a call already has it."""
    return _Scores(q, k, scale) if weights is None else _UpsampledScores(q, k, scale, weights, band)


class HeadMeanAttention(torch.autograd.Function):
    """softmax(q k^T * scale) over tokens, averaged over heads, computed block by block.

    Plain autograd keeps H per-head probability tensors of (B, N, T) for backward and streams each
    of them through memory several times. This function works on blocks of query rows small
    enough to stay in cache, in one reused buffer (scores, then probabilities in place), keeps only
    q and k for backward (q at low resolution when the upsampling is folded in) and recomputes the
    probabilities there. Its backward also uses that the loss reads only a few tokens' maps: with
    P = softmax(S), upstream gradient G on P and c = sum_t G P, dS = P * (G - c), where P * G is
    non-zero only in G's non-zero columns.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: float, weights: Tensor | None) -> Tensor:
        # q: (B, H, N or side*side, d), k: (B, H, T, d), weights: None or (R, side) -> (B, N, T)
        batch, heads, tokens = q.shape[0], q.shape[1], k.shape[2]
        scores = _scores(q, k, scale, weights)
        out = q.new_empty(batch, scores.length, tokens)
        probs = _Probabilities()
        for start, stop in scores.blocks(_block_rows(q, k)):
            p = probs(scores, start, stop).view(batch, heads, stop - start, tokens)
            torch.mean(p, dim=1, out=out[:, start:stop])
        ctx.save_for_backward(q, k, weights)
        ctx.scale, ctx.band = scale, scores.band
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        q, k, weights = ctx.saved_tensors
        batch, heads, tokens = q.shape[0], q.shape[1], k.shape[2]
        scores = _scores(q, k, ctx.scale, weights, ctx.band)
        used = grad.any(dim=1).any(dim=0).nonzero().flatten()  # columns the loss reads (no boolean copy of grad)
        sparse = len(used) <= tokens // 4
        scores.start_backward()
        probs = _Probabilities()
        for start, stop in scores.blocks(_block_rows(q, k)):
            n = stop - start
            p = probs(scores, start, stop)  # (B*H, n, T)
            if sparse:
                g = grad[:, start:stop, used] / heads  # (B, n, U)
                pg = (p.view(batch, heads, n, tokens)[..., used] * g[:, None]).view(batch * heads, n, -1)
                ds = p.mul_(-pg.sum(dim=-1, keepdim=True))  # -c P
                ds.index_add_(-1, used, pg)  # + P G in the used columns (unique: the same sums as ds[..., used] += pg)
            else:
                g = (grad[:, None, start:stop] / heads).expand(batch, heads, n, tokens).reshape(batch * heads, n, tokens)
                ds = p.mul_(g - (g * p).sum(dim=-1, keepdim=True))
            scores.add_grad(start, stop, ds)
        dq, dk = scores.grads()
        return dq.view(q.shape), dk.view(k.shape), None, None


class _Probabilities:
    """softmax of a block's scores, in one (B*H, rows, T) buffer reused by every block.

    The softmax writes in place, and no block allocates (on CPU each large allocation is a fresh
    mapping whose pages fault in again).
    """

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def __call__(self, scores: _Scores, start: int, stop: int) -> Tensor:
        shape = (scores.k.shape[0], stop - start, scores.k.shape[1])
        if self.buffer is None:
            self.buffer = scores.k.new_empty(shape)  # the first block is the largest
        block = scores.block(start, stop, self.buffer.view(-1)[: shape[0] * shape[1] * shape[2]].view(shape))
        return torch.ops.aten._softmax.out(block, -1, False, out=block)


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
    if weights is None:
        return q
    side = weights.shape[1]
    grid = q.reshape(*q.shape[:2], side, side, q.shape[3])
    return torch.einsum("Yy,Xx,bhyxd->bhYXd", weights, weights, grid).flatten(2, 3)


class FastLayerMaps:
    """``capture.head_mean_maps`` computed by the engine: a ``capture.LayerMaps`` with the same numbers.

    Args:
        memory_efficient: blocked head mean with recomputation in backward (``HeadMeanAttention``).
        upsample_queries: project the layer's features to queries, then upsample: ``to_q`` is affine
            per pixel and bicubic weights sum to 1, so this equals projecting the upsampled features
            (StableKeypoints' order) at (R / side)^2 fewer FLOPs. With ``memory_efficient``, the
            scores are upsampled instead of the queries (``_UpsampledScores``), so no upsampled query
            exists; for a layer with a query norm, which is not linear, the projection is upsampled
            before the norm, at full resolution.
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
