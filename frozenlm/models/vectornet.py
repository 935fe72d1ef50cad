"""VectorNet (Gao et al., CVPR 2020): a scene as polylines of vectors, a subgraph per polyline, a global graph.

Input: ``polylines [B, N, V, C]``, N polylines (agents' histories first, the focal agent at index 0,
then lane centrelines) of up to V vectors ``[x_start, y_start, x_end, y_end, attributes...]`` in the
focal agent's frame, with ``vector_mask [B, N, V]`` and ``polyline_mask [B, N]`` (True = real).

* Polyline subgraph: 3 layers of (shared Linear, LayerNorm, ReLU), each followed by a max-pool over the
  polyline's vectors concatenated to every vector; the polyline's feature is the max-pool of the last
  layer, L2-normalised. Padded vectors never win a max-pool.
* Identifier: each polyline's first start point, embedded and added, so that a node whose features are
  masked (node completion) can still be located (VectorNet concatenates such an identifier).
* Global interaction graph: one self-attention layer over the polylines, padded ones masked as keys.

The output tokens ``[B, N, 2 * hidden]`` are what a frozen LM block sees (with the padding mask) before
the trajectory decoder reads the focal agent's token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PolylineSubgraph(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [2 * hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.ReLU()) for d in dims)

    def forward(self, vectors: Tensor, vector_mask: Tensor) -> Tensor:
        """``[B, N, V, C]`` vectors -> ``[B, N, 2 * hidden]`` polyline features (zeros for empty polylines)."""
        x = vectors
        for layer in self.layers:
            nodes = layer(x)
            x = torch.cat([nodes, self._max_pool(nodes, vector_mask)[:, :, None].expand_as(nodes)], dim=-1)
        return F.normalize(self._max_pool(x, vector_mask), dim=-1)

    @staticmethod
    def _max_pool(nodes: Tensor, vector_mask: Tensor) -> Tensor:
        """Max over a polyline's real vectors; 0 for an empty (padded) polyline, never -inf (whose
        gradient would be NaN)."""
        pooled = nodes.masked_fill(~vector_mask[..., None], float("-inf")).amax(dim=2)
        return torch.where(vector_mask.any(dim=2, keepdim=True), pooled, torch.zeros_like(pooled))


class VectorNet(nn.Module):
    """Subgraphs + global graph; ``forward`` gives the polyline tokens ``[B, N, 2 * hidden]``.

    Args:
        in_dim: width of a vector (4 coordinates + attributes).
        hidden: width of the subgraph layers (VectorNet: 64); tokens are ``2 * hidden`` wide.
        subgraph_layers: number of subgraph layers (VectorNet: 3).
    """

    def __init__(self, in_dim: int, hidden: int = 64, subgraph_layers: int = 3) -> None:
        super().__init__()
        self.dim = 2 * hidden
        self.subgraph = PolylineSubgraph(in_dim, hidden, subgraph_layers)
        self.identifier = nn.Linear(2, self.dim)
        self.global_graph = nn.MultiheadAttention(self.dim, num_heads=1, batch_first=True)

    def polyline_features(self, polylines: Tensor, vector_mask: Tensor) -> Tensor:
        return self.subgraph(polylines, vector_mask)

    def interact(self, features: Tensor, polylines: Tensor, polyline_mask: Tensor) -> Tensor:
        """The global graph over polyline ``features`` plus their identifiers (first start points)."""
        nodes = features + self.identifier(polylines[:, :, 0, :2])
        tokens, _ = self.global_graph(nodes, nodes, nodes, key_padding_mask=~polyline_mask, need_weights=False)
        return tokens.masked_fill(~polyline_mask[..., None], 0.0)

    def forward(self, polylines: Tensor, vector_mask: Tensor, polyline_mask: Tensor) -> Tensor:
        return self.interact(self.polyline_features(polylines, vector_mask), polylines, polyline_mask)


class TrajectoryDecoder(nn.Module):
    """An MLP from a token to ``modes`` trajectories of ``horizon`` steps (as per-step offsets, summed)
    and ``modes`` scores: ``([B, K, T, 2], [B, K] logits)``."""

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
