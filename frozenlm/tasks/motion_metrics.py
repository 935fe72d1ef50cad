"""Motion-forecasting metrics as torchmetrics metrics (sums and counts, so they reduce across DDP processes).

For each scene the best of the top `k` modes (by the model's scores) is the one whose endpoint is
closest to the ground truth's (Argoverse 1 and 2 both select by final displacement):

* `minFDE`: that mode's final displacement error (m);
* `minADE`: that mode's average displacement error over the horizon (m);
* `MR`: the fraction of scenes whose minFDE exceeds `miss_threshold` (2 m);
* `brier-minFDE` (Argoverse 2): minFDE + (1 - p)^2 with `p` that mode's probability.

They agree with the `av2` package's per-mode functions (`compute_ade`, `compute_fde`,
`compute_is_missed_prediction`, `compute_brier_fde`) followed by the minimum (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def best_of_k(trajectories: Tensor, probabilities: Tensor, target: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(ade, fde, probability)` `[B]` of the endpoint-best of the `k` most probable modes of
    `trajectories [B, K, T, 2]` with `probabilities [B, K]`, against `target [B, T, 2]`."""
    top = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    chosen = trajectories.gather(1, top.indices[..., None, None].expand(-1, -1, *trajectories.shape[2:]))
    errors = (chosen - target[:, None]).norm(dim=-1)  # [B, k, T]
    fde, best = errors[..., -1].min(dim=1)
    rows = torch.arange(len(best), device=best.device)
    return errors.mean(dim=-1)[rows, best], fde, top.values[rows, best]


class _BestOfK(Metric):
    full_state_update = False
    higher_is_better = False

    def __init__(self, k: int = 6, miss_threshold: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k, self.miss_threshold = k, miss_threshold
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, trajectories: Tensor, probabilities: Tensor, target: Tensor) -> None:
        ade, fde, probability = best_of_k(trajectories.float(), probabilities.float(), target.float(), self.k)
        self.total += self.value(ade, fde, probability).double().sum()
        self.count += len(target)

    def value(self, ade: Tensor, fde: Tensor, probability: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class MinADE(_BestOfK):
    """Average displacement error of the endpoint-best of the top `k` modes."""

    def value(self, ade: Tensor, fde: Tensor, probability: Tensor) -> Tensor:
        return ade


class MinFDE(_BestOfK):
    """Final displacement error of the endpoint-best of the top `k` modes."""

    def value(self, ade: Tensor, fde: Tensor, probability: Tensor) -> Tensor:
        return fde


class MissRate(_BestOfK):
    """Fraction of scenes whose top-`k` minFDE exceeds `miss_threshold` metres."""

    def value(self, ade: Tensor, fde: Tensor, probability: Tensor) -> Tensor:
        return (fde > self.miss_threshold).double()


class BrierMinFDE(_BestOfK):
    """Argoverse 2's brier-minFDE: minFDE + (1 - p)^2 of the endpoint-best mode's probability `p`."""

    def value(self, ade: Tensor, fde: Tensor, probability: Tensor) -> Tensor:
        return fde + (1 - probability) ** 2
