"""Motion forecasting with VectorNet and a frozen LM block over agent and lane tokens (LM4VE's Argoverse).

LM4VE reports that a frozen LLaMA block between VectorNet's global graph and its decoder improves
minADE / minFDE / miss rate on Argoverse; its code for this was never released, so this module is our
reading of the paper: the block sees every polyline token (agents and lanes) with the padding mask of
the scene, and the decoder reads the focal agent's token.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection

from frozenlm.data.motion import VECTOR_DIM
from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.models.vectornet import VectorNetForecaster, VectorNetForecasterConfig
from frozenlm.predictions import PredictionFile
from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.motion_metrics import BrierMinFDE, MinADE, MinFDE, MissRate


def to_world(trajectories: Tensor, origin: Tensor, heading: Tensor) -> Tensor:
    """Agent-frame `[B, ..., 2]` points to world coordinates: rotate by `heading [B]`, then add
    `origin [B, 2]` (the inverse of the datamodules' agent-centric transform)."""
    cos, sin = heading.cos(), heading.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [B, 2, 2]
    shape = (len(origin),) + (1,) * (trajectories.ndim - 2) + (2, 2)
    world = (rotation.view(shape) @ trajectories[..., None]).squeeze(-1)
    return world + origin.view((len(origin),) + (1,) * (trajectories.ndim - 2) + (2,))


class MotionForecaster(FrozenLMMixin, BaseTask):
    """VectorNet -> [frozen LM block over all polyline tokens, padded ones masked] -> K-mode decoder (the
    model: [`VectorNetForecaster`][frozenlm.models.vectornet.VectorNetForecaster]).

    Loss: winner-takes-all regression (smooth L1) on the mode with the smallest summed L2 error to the
    ground truth, plus cross-entropy of the mode scores towards that mode (as K = 6 VectorNet variants,
    e.g. HiVT); optionally VectorNet's node completion (a random polyline's feature masked and
    regressed from the global graph, Huber loss). `llm: null` is plain VectorNet; `llm.mode:
    auxiliary` is GCR: the block as a training-only branch, decoded by a decoder of its own
    (`llm.aux_head: separate`) or by the model's (`shared`).

    Batches (see `collate_scenes`): `agent_vectors`, `agent_mask`,
    `map_vectors`, `map_mask`, `polyline_mask`, `target [B, T, 2]` (agent frame), `origin`,
    `heading`, `scenario_id`, `track_id`. Metrics at K = 6 and 1: minADE, minFDE, miss rate, brier-minFDE.

    Args:
        vector_dim: width of an input vector (the datamodules': 12).
        horizon: future steps to predict (Argoverse 1: 30, 2: 60; checked against the datamodule).
        hidden: VectorNet's hidden size (64); tokens are twice as wide.
        global_graph: `paper` (VectorNet's softmax(Q K^T) V, one head, unscaled, no output projection)
            or `multihead` (`nn.MultiheadAttention`, one head); see [`vectornet`][frozenlm.models.vectornet].
        modes: trajectories per scene (K).
        node_completion: weight of the node-completion loss; 0 = off.
        llm: the frozen LM block (see [`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
        miss_threshold: metres beyond which a final position is a miss.
        **kwargs: optimisation recipe, see [`BaseTask`][frozenlm.tasks.BaseTask] (defaults: AdamW 5e-4, wd
            1e-4, cosine per step, as VectorNet re-implementations train).

    Examples:
        >>> from frozenlm.tasks import MotionForecaster
        >>> task = MotionForecaster(horizon=30, modes=6)

        From the command line: `frozenlm fit --config configs/argoverse1_vectornet_llama.yaml --data.root data/argoverse1`.
    """

    sample_id_key = "scenario_id"
    monitor = "val_minFDE_6"
    monitor_mode = "min"

    def __init__(
        self,
        vector_dim: int = VECTOR_DIM,
        horizon: int = 60,
        hidden: int = 64,
        global_graph: str = "paper",
        modes: int = 6,
        node_completion: float = 0.0,
        llm: LLMConfig | None = None,
        miss_threshold: float = 2.0,
        lr: float = 5e-4,
        lr_reference_batch: int = 0,
        weight_decay: float = 1e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, min_lr=min_lr,
            warmup_epochs=warmup_epochs, **kwargs,
        )  # fmt: skip

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> VectorNetForecaster:
        """The plain VectorNet forecaster of these hyper-parameters (no trainer needed); hyper-parameters
        from before `global_graph` existed mean the `multihead` form."""
        graph = hparams.get("global_graph", "multihead")
        return VectorNetForecaster(VectorNetForecasterConfig.from_hparams(hparams, global_graph=graph))

    def configure_models(self) -> None:
        self.model = self.build_model(self.hparams)

    def configure_metrics(self) -> None:
        threshold = self.hparams.miss_threshold
        metrics = MetricCollection({
            "minADE_6": MinADE(6), "minFDE_6": MinFDE(6), "MR_6": MissRate(6, threshold),
            "brier_minFDE_6": BrierMinFDE(6), "minADE_1": MinADE(1), "minFDE_1": MinFDE(1),
            "MR_1": MissRate(1, threshold),
        })  # fmt: skip
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()  # exact over unequal shares (see ClassificationTask)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        horizon = getattr(datamodule, "horizon", self.hparams.horizon)
        if horizon != self.hparams.horizon:
            raise ValueError(
                f"model.horizon {self.hparams.horizon} does not match the data: {type(datamodule).__name__} predicts "
                f"{horizon} steps; set --model.horizon {horizon}."
            )
        vector_dim = getattr(datamodule, "vector_dim", self.hparams.vector_dim)
        if vector_dim != self.hparams.vector_dim:
            raise ValueError(
                f"model.vector_dim {self.hparams.vector_dim} does not match the data's {vector_dim}-wide vectors "
                f"({type(datamodule).__name__}); a checkpoint of an older frozenlm needs its own version."
            )

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`(trajectories [B, K, T, 2] in the agent frame, mode logits [B, K])`."""
        return self.model(batch)

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The forward on the first `samples` scenes (padded as in `batch`): a batch of their polylines."""
        keys = ("agent_vectors", "agent_mask", "map_vectors", "map_mask", "polyline_mask")
        return self.model, ({key: batch[key][:samples] for key in keys},)

    # -- training -----------------------------------------------------------------------------
    def forecast_loss(self, trajectories: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        """Winner-takes-all smooth-L1 on the best mode (smallest summed L2 error) + cross-entropy to it."""
        best = (trajectories - target[:, None]).norm(dim=-1).sum(dim=-1).argmin(dim=1)
        chosen = trajectories[torch.arange(len(best), device=best.device), best]
        return F.smooth_l1_loss(chosen, target) + F.cross_entropy(logits, best)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        model, target, batch_size = self.model, batch["target"], len(batch["target"])
        features, masked = model.polyline_features(batch), None
        if self.hparams.node_completion > 0:
            features, masked = self._mask_one_polyline(features, batch["polyline_mask"])
        tokens, branch = model.forward_features(batch, features)
        loss = self.forecast_loss(*model.forward_head(tokens), target)
        self.log("train_loss_forecast", loss.detach(), batch_size=batch_size)
        if branch is not None:  # GCR: loss_forecast + aux_weight * loss_aux
            aux_loss = self.forecast_loss(*model.forward_aux_head(branch), target)
            loss = self.with_auxiliary_loss(loss, aux_loss, model.llm_config.aux_weight, batch_size)
        if masked is not None:
            index, original = masked
            rows = torch.arange(len(index), device=index.device)
            completion = F.huber_loss(model.node_decoder(tokens[rows, index]), original)
            loss = loss + self.hparams.node_completion * completion
            self.log("train_loss_node_completion", completion.detach(), batch_size=batch_size)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        return self.finite_loss(loss, batch, batch_idx)

    def _mask_one_polyline(self, features: Tensor, polyline_mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Zero the feature of one random real polyline per scene other than the focal agent's (index 0);
        a scene with no other polyline keeps index 0 unmasked (its completion target is then itself)."""
        candidates = polyline_mask.clone()
        candidates[:, 0] = False
        index = torch.rand(candidates.shape, device=features.device).masked_fill(~candidates, -1.0).argmax(dim=1)
        rows = torch.arange(len(index), device=index.device)
        original = features[rows, index].detach()
        features = features.clone()
        features[rows[candidates.any(dim=1)], index[candidates.any(dim=1)]] = 0.0
        return features, (index, original)

    # -- evaluation ---------------------------------------------------------------------------
    def predict_modes(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`(trajectories [B, K, T, 2] in world coordinates, probabilities [B, K])`."""
        trajectories, logits = self(batch)
        return to_world(trajectories, batch["origin"], batch["heading"]), logits.softmax(dim=-1)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, stage: str) -> None:
        trajectories, logits, target = self.scored(batch, *self(batch), batch["target"])  # each scene once
        if not len(target):
            return
        loss = getattr(self, f"{stage}_loss")
        loss.update(self.forecast_loss(trajectories, logits, target), weight=len(target))
        self.log(f"{stage}_loss", loss, batch_size=len(target))
        metrics.update(trajectories, logits.softmax(dim=-1), target)  # displacements are frame-invariant
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=len(target))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        scenarios, tracks, trajectories, probabilities = self.scored(
            batch, batch["scenario_id"], batch["track_id"], *self.predict_modes(batch)
        )
        return {"scenario_id": scenarios, "track_id": tracks, "trajectories": trajectories, "probabilities": probabilities}

    def prediction_file(self, path: Path) -> PredictionFile:
        """Where `predict` writes the K trajectories and probabilities of every scene (the datamodule's
        format: CSV, or for Argoverse 2 `.parquet`, the challenge's submission file)."""
        return self.trainer.datamodule.prediction_file(path)
