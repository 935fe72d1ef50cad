"""VectorNet (Gao et al., CVPR 2020): a scene as polylines of vectors, a subgraph per polyline, a global graph.

Input: groups of polylines, each `(vectors [B, N_g, V_g, C], vector_mask [B, N_g, V_g])` padded to its
own longest polyline (the datamodules' agents, the focal one first, then map polylines), of vectors
`[x_start, y_start, x_end, y_end, attributes...]` in the focal agent's frame, and `polyline_mask
[B, N]` over all of them in order (True = real).

* Polyline subgraph: 3 layers of (shared Linear, LayerNorm, ReLU), each followed by a max-pool over the
  polyline's vectors concatenated to every vector; the polyline's feature is the max-pool of the last
  layer, L2-normalised. Padded vectors never win a max-pool.
* Identifier: as the paper, the minimum of each polyline's start coordinates (x and y apart), embedded and
  added, so that a node whose features are masked (node completion) can still be located.
* Global interaction graph: the paper's `softmax(P_Q P_K^T) P_V` (`global_graph="paper"`: one head,
  linear Q, K, V, no scaling and no output projection), or PyTorch's `nn.MultiheadAttention` with one
  head (`"multihead"`: scaled by `1/sqrt(d)`, with an output projection; frozenlm's earlier form);
  padded polylines masked as keys.

The output tokens `[B, N, 2 * hidden]` are what a frozen LM block sees (with the padding mask) before
the trajectory decoder reads the focal agent's token: [`VectorNetForecaster`][frozenlm.models.vectornet.VectorNetForecaster], built from a
[`VectorNetForecasterConfig`][frozenlm.models.vectornet.VectorNetForecasterConfig].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frozenlm.data.motion import VECTOR_DIM
from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.models import polyline_kernel
from frozenlm.models.config import FromHParams


PolylineGroup = tuple[Tensor, Tensor]  # (vectors [B, N, V, C], vector_mask [B, N, V])
FEATURE_EPS = 1e-12  # the polyline features' normalisation (F.normalize's default), in both of the subgraph's paths


class PolylineSubgraph(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [2 * hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()) for d in dims)

    def forward(self, vectors: Tensor, vector_mask: Tensor) -> Tensor:
        """`[B, N, V, C]` vectors -> `[B, N, 2 * hidden]` polyline features (zeros for empty polylines)."""
        return self.forward_groups([(vectors, vector_mask)])

    def forward_groups(self, groups: list[PolylineGroup]) -> Tensor:
        """Groups of polylines, each `(vectors [B, N_g, V_g, C], vector_mask [B, N_g, V_g])` -> `[B, sum
        N_g, 2 * hidden]`, the groups' features in order: one pass of every group's vectors together.

        The vectors of all groups are the rows of one `[rows, C]` tensor, so each layer is one matmul, one
        LayerNorm and one ReLU over all of them; each max-pool works on its group's rows viewed as `[B, N_g,
        V_g, hidden]` (`PolylineMaxPool`). On a CPU, each layer (matmul, per-polyline row added,
        LayerNorm, ReLU, max-pool) is one fused C++ pass forward and one backward
        ([`polyline_kernel`][frozenlm.models.polyline_kernel]; PyTorch's operations where it cannot be
        built). Padded vector slots hold a copy of their polyline's first real vector (`padded_rows`), which changes no max-pool, so no layer masks. A layer's input
        `[nodes, max(nodes)]` is never built: its Linear splits into the nodes' half, a matmul over the
        rows, and the max's half, a matmul once per polyline added to each of its rows (the same function,
        a third fewer FLOPs). The last layer's output, `[nodes, max(nodes)]`, max-pools to `[max(nodes),
        max(nodes)]`, taken as that."""
        shapes = tuple(tuple(mask.shape) for _, mask in groups)
        if polyline_kernel.takes_groups(groups):  # on a CPU: the rows in one C++ pass, each layer in one
            return self._fused_layers(*polyline_kernel.polyline_rows(groups))
        x = padded_rows(groups)
        ranges = polyline_ranges(shapes, x.device)
        real = torch.cat([mask.any(dim=2) for _, mask in groups], dim=1)
        if polyline_kernel.usable(x):  # vectors that need a gradient: each layer one C++ pass
            return self._fused_layers(x, ranges, real)
        owner = torch.repeat_interleave(ranges[2], ranges[1])  # each row's polyline
        pooled = None
        for linear, norm, _ in self.layers:
            if pooled is None:
                h = linear(x)
            else:  # linear(cat([nodes, max])) = nodes W_nodes^T + (max W_max^T + b), the second once per polyline
                width = pooled.shape[-1]
                per_polyline = F.linear(pooled.reshape(-1, width), linear.weight[:, width:], linear.bias)
                h = torch.addmm(per_polyline.index_select(0, owner), nodes, linear.weight[:, :width].t())
            nodes = torch.relu_(norm(h))
            pooled = PolylineMaxPool.apply(nodes, shapes)
        return self._features(pooled, real)

    def _fused_layers(self, x: Tensor, ranges: tuple[Tensor, Tensor, Tensor], real: Tensor) -> Tensor:
        """`forward_groups` through [`polyline_kernel`][frozenlm.models.polyline_kernel]: the same function, each
        layer's whole Linear (the nodes' half over the rows, the max's half and the bias once per polyline) in it."""
        inputs, pooled = x, None
        for index, (linear, norm, _) in enumerate(self.layers):
            keep_nodes = index < len(self.layers) - 1
            inputs, pooled = polyline_kernel.PolylineLayer.apply(inputs, linear.weight, linear.bias, pooled, norm.weight, norm.bias, ranges, norm.eps, keep_nodes)  # fmt: skip
        features = polyline_kernel.PolylineFeatures.apply(pooled, real.reshape(-1), FEATURE_EPS)
        return features.view(*real.shape, 2 * pooled.shape[-1])

    @staticmethod
    def _features(pooled: Tensor, real: Tensor) -> Tensor:
        """The last layer's max-pool `[B, N, hidden]` -> the polyline features (0 for the polylines not `real`)."""
        pooled = torch.where(real[..., None], pooled, 0.0)
        return F.normalize(torch.cat([pooled, pooled], dim=-1), dim=-1, eps=FEATURE_EPS)


def polyline_ranges(shapes: tuple[tuple[int, int, int], ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For the rows of groups of `shapes` `(B, N_g, V_g)` in order, each polyline's `(starts, lengths, dest)`:
    its rows are `starts[p] : starts[p] + lengths[p]`, its index in the `[B * sum N_g]` flattening of the pooled
    features is `dest[p]` (group g's polylines after the earlier groups')."""
    total = sum(n for _, n, _ in shapes)
    starts, lengths, dest, row, first = [], [], [], 0, 0
    for b, n, v in shapes:
        index = torch.arange(b * n, device=device)
        starts.append(row + index * v)
        lengths.append(torch.full_like(index, v))
        dest.append(index.div(n, rounding_mode="floor") * total + first + index.remainder(n) if n else index)
        row, first = row + b * n * v, first + n
    return torch.cat(starts), torch.cat(lengths), torch.cat(dest)


def padded_rows(groups: list[PolylineGroup]) -> Tensor:
    """The groups' vectors as the rows `[sum B N_g V_g, C]` of the subgraph, in order, each padded slot holding a
    copy of its polyline's first real vector (zeros for every slot of an empty polyline): one `index_select`
    over the vectors and a zero row."""
    flat, index, rows = [], [], 0
    for vectors, mask in groups:
        b, n, v, c = vectors.shape
        first = mask.to(torch.uint8).argmax(dim=2, keepdim=True)  # the first real slot (0 if none)
        slot = torch.where(mask, torch.arange(v, device=mask.device), first)
        source = slot + (torch.arange(b * n, device=mask.device) * v + rows).view(b, n, 1)
        index.append(source.masked_fill(~mask.any(dim=2, keepdim=True), -1).reshape(-1))  # -1: the zero row
        flat.append(vectors.reshape(-1, c))
        rows += b * n * v
    flat.append(groups[0][0].new_zeros(1, groups[0][0].shape[-1]))
    index = torch.cat(index)
    return torch.cat(flat).index_select(0, torch.where(index < 0, rows, index))


class PolylineMaxPool(torch.autograd.Function):
    """The subgraph's max-pool: `nodes [rows, D]`, the rows of groups of `shapes` `(B, N_g, V_g)` in
    order -> `[B, sum N_g, D]`, the max over each polyline's `V_g` rows.

    Its backward fills one gradient tensor, the max's gradient added at one maximal row per polyline and
    channel (the index `max_pool1d` returns), as `torch.max`'s backward does per group. Splitting it
    evenly among equal maxima instead (`amax`'s) gives the parameters the same gradient here: maxima tie
    only between copies of a vector (`padded_rows`), whose activations are the same, or at 0, where the
    ReLU before passes no gradient."""

    @staticmethod
    def forward(ctx, nodes: Tensor, shapes: tuple[tuple[int, int, int], ...]) -> Tensor:
        width, start, pooled, indices = nodes.shape[-1], 0, [], []
        for b, n, v in shapes:  # max_pool1d over a polyline's rows: 6x faster on a CPU than max(dim) with indices
            rows = nodes[start : start + b * n * v].view(b * n, v, width).transpose(1, 2)
            values, index = F.max_pool1d(rows, kernel_size=v, return_indices=True)
            pooled.append(values.reshape(b, n, width))
            indices.append(index.reshape(b, n, 1, width))
            start += b * n * v
        ctx.save_for_backward(*indices)
        ctx.shapes, ctx.width, ctx.rows = shapes, width, len(nodes)
        return torch.cat(pooled, dim=1)

    @staticmethod
    def backward(ctx, grad_pooled: Tensor):
        grad = grad_pooled.new_zeros(ctx.rows, ctx.width)
        start, first = 0, 0
        for (b, n, v), index in zip(ctx.shapes, ctx.saved_tensors):
            rows = grad[start : start + b * n * v].view(b, n, v, ctx.width)
            rows.scatter_add_(2, index, grad_pooled[:, first : first + n, None])
            start, first = start + b * n * v, first + n
        return grad, None


def masked_max(nodes: Tensor, vector_mask: Tensor) -> Tensor:
    """`[B, N, V, D] -> [B, N, D]`: the max over each polyline's real vectors; 0 for an empty (padded)
    polyline, never -inf (whose gradient would be NaN)."""
    pooled = nodes.masked_fill(~vector_mask[..., None], float("-inf")).amax(dim=2)
    return torch.where(vector_mask.any(dim=2, keepdim=True), pooled, torch.zeros_like(pooled))


GLOBAL_GRAPHS = ("paper", "multihead")


class PaperGlobalGraph(nn.Module):
    """VectorNet's global graph as the paper writes it (eq. 3): `softmax(P_Q P_K^T) P_V`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, nodes: Tensor, polyline_mask: Tensor) -> Tensor:
        # P_Q, P_K and P_V as one matmul (the three Linears' weights stacked), the attention on a CPU a scene at
        # a time in C++ (`polyline_kernel.PolylineAttention`), elsewhere two batched matmuls around a masked
        # softmax: at VectorNet's tens of tokens faster on a CPU than three matmuls and PyTorch's fused
        # attention kernel (whose forward and backward took 6 % of the training step)
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(nodes, weight, bias)
        if polyline_kernel.usable(qkv) and polyline_mask.dtype == torch.bool:  # on a CPU: a scene at a time in C++
            return polyline_kernel.PolylineAttention.apply(qkv, polyline_mask)
        query, key, value = qkv.chunk(3, dim=-1)
        scores = (query @ key.transpose(1, 2)).masked_fill(~polyline_mask[:, None, :], float("-inf"))
        # a scene without a real polyline attends to nothing (0, as scaled_dot_product_attention gives), its
        # softmax's NaN kept out of the output and, through masked_fill's backward, out of the gradients
        weights = scores.softmax(dim=-1).masked_fill(~polyline_mask.any(dim=-1)[:, None, None], 0.0)
        return weights @ value


class MultiheadGlobalGraph(nn.MultiheadAttention):
    """One-head `nn.MultiheadAttention` over the polylines (scaled, with an output projection)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, num_heads=1, batch_first=True)

    def forward(self, nodes: Tensor, polyline_mask: Tensor) -> Tensor:
        return super().forward(nodes, nodes, nodes, key_padding_mask=~polyline_mask, need_weights=False)[0]


class VectorNet(nn.Module):
    """Subgraphs + global graph; `forward(groups, polyline_mask)` gives the polyline tokens `[B, N, 2 * hidden]`.

    Args:
        in_dim: width of a vector (4 coordinates + attributes).
        hidden: width of the subgraph layers (VectorNet: 64); tokens are `2 * hidden` wide.
        subgraph_layers: number of subgraph layers (VectorNet: 3).
        global_graph: `paper` or `multihead` (see the module docstring).
    """

    def __init__(self, in_dim: int, hidden: int = 64, subgraph_layers: int = 3, global_graph: str = "paper") -> None:
        super().__init__()
        if global_graph not in GLOBAL_GRAPHS:
            raise ValueError(f"global_graph must be one of {GLOBAL_GRAPHS}, got {global_graph!r}.")
        self.dim = 2 * hidden
        self.subgraph = PolylineSubgraph(in_dim, hidden, subgraph_layers)
        self.identifier = nn.Linear(2, self.dim)
        self.global_graph = (PaperGlobalGraph if global_graph == "paper" else MultiheadGlobalGraph)(self.dim)

    def polyline_features(self, groups: list[PolylineGroup]) -> Tensor:
        """`[B, N, 2 * hidden]`: each group's polylines through the subgraph, concatenated in order."""
        return self.subgraph.forward_groups(groups)

    @staticmethod
    def identifiers(groups: list[PolylineGroup]) -> Tensor:
        """`[B, N, 2]`: the minimum start coordinates of each polyline's real vectors (0 for padding)."""
        if polyline_kernel.takes_groups(groups):  # one C++ pass, where these operations take about twenty
            return polyline_kernel.polyline_identifiers(groups)
        starts = [masked_max(-vectors[..., :2], mask).neg() for vectors, mask in groups]
        return torch.cat(starts, dim=1)

    def interact(self, features: Tensor, identifiers: Tensor, polyline_mask: Tensor) -> Tensor:
        """The global graph over polyline `features` plus their embedded `identifiers`."""
        # the identifiers' Linear as addmm of its weight transposed into a row-major copy: its gradient is then
        # identifiers^T [2, B N] x grad [B N, dim], where F.linear's backward takes grad^T [dim, B N] x
        # identifiers [B N, 2], a shape MKL runs about 6x slower
        embedded = torch.addmm(self.identifier.bias, identifiers.reshape(-1, 2), self.identifier.weight.t().contiguous())
        tokens = self.global_graph(features + embedded.view_as(features), polyline_mask)
        return tokens.masked_fill(~polyline_mask[..., None], 0.0)

    def forward(self, groups: list[PolylineGroup], polyline_mask: Tensor) -> Tensor:
        return self.interact(self.polyline_features(groups), self.identifiers(groups), polyline_mask)


class TrajectoryDecoder(nn.Module):
    """An MLP from a token to `modes` trajectories of `horizon` steps (as per-step offsets, summed)
    and `modes` scores: `([B, K, T, 2], [B, K] logits)`."""

    def __init__(self, dim: int, horizon: int, modes: int = 6, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.horizon, self.modes = horizon, modes
        self.trajectories = nn.Sequential(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, modes * horizon * 2)
        )
        self.scores = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, modes))

    def forward(self, token: Tensor) -> tuple[Tensor, Tensor]:
        offsets = self.trajectories(token).view(len(token), self.modes, self.horizon, 2)
        return offsets.cumsum(dim=2), self.scores(token)


@dataclass
class VectorNetForecasterConfig(FromHParams):
    """A [`VectorNetForecaster`][frozenlm.models.vectornet.VectorNetForecaster]; field names are [`MotionForecaster`][frozenlm.tasks.MotionForecaster]'s flags.

    Attributes:
        vector_dim: width of an input vector (the datamodules': `frozenlm.data.motion.VECTOR_DIM`).
        horizon: future steps to predict.
        hidden: VectorNet's hidden size (64); tokens are twice as wide.
        global_graph: `paper` or `multihead` (see [`VectorNet`][frozenlm.models.vectornet.VectorNet]).
        modes: trajectories per scene (K).
        node_completion: weight of VectorNet's node-completion loss; above 0 the model has its `node_decoder`.
        llm: the frozen LM block over all polyline tokens ([`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
    """

    vector_dim: int = VECTOR_DIM
    horizon: int = 60
    hidden: int = 64
    global_graph: str = "paper"
    modes: int = 6
    node_completion: float = 0.0
    llm: LLMConfig | None = None


class VectorNetForecaster(nn.Module):
    """VectorNet -> [frozen LM block over all polyline tokens, padded ones masked] -> K-mode decoder.

    Inputs are a scene batch's `agent_vectors`, `agent_mask`, `map_vectors`, `map_mask` and
    `polyline_mask` (see `collate_scenes`). `forward_features(batch)` gives
    `(tokens [B, N, 2 * hidden], branch)`: the polyline tokens after the global graph (through the LM block
    when it is inline) and GCR's branch (the block's output on the same tokens, in training only; else None).
    `forward_head` / `forward_aux_head` decode the focal agent's token (index 0) of either into
    `(trajectories [B, K, T, 2] in the agent frame, mode logits [B, K])`; `forward(batch)` is that on
    the tokens. With `llm.aux_head: separate` GCR's branch has a decoder of its own (`aux_decoder`); with
    `shared` it reuses `decoder`.
    """

    def __init__(self, config: VectorNetForecasterConfig) -> None:
        super().__init__()
        self.config = config
        self.llm_config = LLMConfig(**config.llm) if isinstance(config.llm, dict) else config.llm
        self.backbone = VectorNet(config.vector_dim, config.hidden, global_graph=config.global_graph)
        dim = self.backbone.dim
        self.llm_block = create_block(self.llm_config, dim)
        self.decoder = TrajectoryDecoder(dim, config.horizon, config.modes)
        llm = self.llm_config
        if llm is not None and llm.mode == "auxiliary" and llm.aux_head == "separate":
            self.aux_decoder = TrajectoryDecoder(dim, config.horizon, config.modes)
        if config.node_completion > 0:  # regresses a masked polyline's feature from its token
            self.node_decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    @staticmethod
    def polyline_groups(batch: Mapping[str, Tensor]) -> list[PolylineGroup]:
        """The batch's agents and map polylines, each padded to its own length, in token order."""
        return [(batch["agent_vectors"], batch["agent_mask"]), (batch["map_vectors"], batch["map_mask"])]

    def polyline_features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """`[B, N, 2 * hidden]`: every polyline through the subgraph (before the global graph)."""
        return self.backbone.polyline_features(self.polyline_groups(batch))

    def forward_features(
        self, batch: Mapping[str, Tensor], features: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`(tokens, branch)`; `features`: the polyline features to use (e.g. with one masked, for node
        completion) instead of the batch's own."""
        groups, polyline_mask = self.polyline_groups(batch), batch["polyline_mask"]
        if features is None:
            features = self.backbone.polyline_features(groups)
        tokens = self.backbone.interact(features, self.backbone.identifiers(groups), polyline_mask)
        return apply_block(self.llm_block, tokens, ~polyline_mask)  # after the global graph, padding masked

    def forward_head(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(tokens[:, 0])  # the focal agent's token

    def forward_aux_head(self, branch: Tensor) -> tuple[Tensor, Tensor]:
        decoder = self.decoder if self.llm_config.aux_head == "shared" else self.aux_decoder
        return decoder(branch[:, 0])

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`(trajectories [B, K, T, 2] in the agent frame, mode logits [B, K])`."""
        return self.forward_head(self.forward_features(batch)[0])
