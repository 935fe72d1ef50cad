"""Situated question answering in 3D scenes (SQA3D) with the ScanQA baseline, as SQA3D trains it
(`ScanQA/scripts/train.py`, `lib/solver.py`), and LM4VE's frozen LM block after the fusion.

The training section of the paper, in code: the detector (VoteNet on PointNet++) trains from scratch beside the
question answering, on the sum of its losses, the answer loss and the auxiliary situation loss, x10
(`frozenlm.tasks.scanqa_losses`); Adam, lr 5e-4, weight decay 1e-5 on every parameter, constant; batch-norm
momentum 0.5 halved every 20 epochs (floor 0.001); gradients clipped by value at 1.0 (the config's
`trainer.gradient_clip_val` / `gradient_clip_algorithm: value`); validation every 1,000 iterations
(`trainer.val_check_interval`), keeping the best checkpoint by validation EM@1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from frozenlm.data.scannet import MEAN_SIZE
from frozenlm.data.sqa3d import QUESTION_TYPES
from frozenlm.errors import ConfigurationError
from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.models.scanqa import ScanQA, ScanQAConfig
from frozenlm.predictions import JSONRows, PredictionFile
from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.scanqa_losses import LossWeights, answer_loss, scanqa_losses


def bn_momentum_at(epoch: int, initial: float = 0.5, rate: float = 0.5, step: int = 20, minimum: float = 0.001) -> float:
    """The reference's batch-norm momentum after `epoch` scheduler steps: `max(initial x rate^floor(epoch / step),
    minimum)`."""
    return max(initial * rate ** (epoch // step), minimum)


class ExactMatch(Metric):
    """EM@1 (the top answer is the ground-truth class) overall and per question type, as counts summed over the
    processes, so exact on any number of them. `compute()`: `{"": overall, "_what": ..., "_others": ...}`, a
    type without questions left out."""

    full_state_update = False

    def __init__(self, types: tuple[str, ...] = QUESTION_TYPES) -> None:
        super().__init__()
        self.types = types
        self.add_state("correct", torch.zeros(len(types), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(types), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, target: Tensor, question_type: Tensor) -> None:
        """`predicted`, `target` (answer classes; -100, an unanswerable question, is never matched) and
        `question_type` (indices into `types`), one per sample."""
        self.correct += torch.bincount(question_type[predicted == target], minlength=len(self.types))
        self.total += torch.bincount(question_type, minlength=len(self.types))

    def compute(self) -> dict[str, Tensor]:
        """Overall and per type (the types with questions)."""
        em = {"": self.correct.sum() / self.total.sum().clamp_min(1)}
        return em | {f"_{name.lower()}": c / t for name, c, t in zip(self.types, self.correct, self.total) if t > 0}


class SQA3DPredictionsJSON(JSONRows):
    """`[{"question_id", "answer", "ground_truth", "question_type"}, ...]`; `ground_truth` is null for a
    question whose answer is not in the vocabulary."""


class SQA3DTask(FrozenLMMixin, BaseTask):
    """ScanQA on SQA3D (the model: `frozenlm.models.scanqa.ScanQA`); with `llm`, the frozen block on the
    fused object tokens before pooling (LM4VE), `llm.mode: auxiliary` for GCR (an auxiliary answer loss on the
    block's branch, `llm.aux_weight` times it).

    Metrics: `<stage>_em1` and `<stage>_em1_<type>` for What, Is, How, Can, Which, Others; the answer loss
    (`<stage>_answer_loss`) and the situation errors (`<stage>_position_mse`, `<stage>_rotation_mse`), each a
    mean over samples, so every logged number is the same on any number of processes. `predict` writes
    `SQA3DPredictionsJSON` (`--predictions.output predictions.json`).

    Args:
        num_answers, mean_size: linked from the datamodule by the CLI (its answer vocabulary's size, the size
            clusters' mean sizes).
        num_points ... use_situation_aux, llm: the model, see `frozenlm.models.scanqa.ScanQAConfig`.
        bn_momentum, bn_decay_rate, bn_decay_step, bn_momentum_min: the batch-norm momentum schedule.
        lr, lr_reference_batch, weight_decay, optimizer, schedule, warmup_epochs, **kwargs: see
            `frozenlm.tasks.BaseTask` (the reference's Adam, lr 5e-4 not scaled by the batch, coupled weight
            decay on every parameter, constant learning rate).
    """

    sample_id_key = "question_id"
    input_key = "point_clouds"
    monitor = "val_em1"
    monitor_mode = "max"

    def __init__(
        self,
        num_answers: int | None = None,
        mean_size: list[list[float]] | None = None,
        num_points: int = 40000,
        input_feature_dim: int = 4,
        num_proposals: int = 256,
        num_heading_bin: int = 1,
        num_size_cluster: int = 18,
        num_class: int = 18,
        sa_points: list[int] | None = None,
        sa_radii: list[float] | None = None,
        sa_nsamples: list[int] | None = None,
        seed_feat_dim: int = 256,
        proposal_size: int = 128,
        vote_radius: float = 0.3,
        vote_nsample: int = 16,
        embedding_size: int = 300,
        hidden_size: int = 256,
        lstm_dropout: float = 0.3,
        mcan_layers: int = 2,
        heads: int = 8,
        ffn: int = 1024,
        fusion_dropout: float = 0.1,
        flat_mlp_size: int = 256,
        flat_out_size: int = 512,
        answer_dropout: float = 0.3,
        aux_dropout: float = 0.1,
        use_situation_aux: bool = True,
        llm: LLMConfig | None = None,
        bn_momentum: float = 0.5,
        bn_decay_rate: float = 0.5,
        bn_decay_step: int = 20,
        bn_momentum_min: float = 0.001,
        lr: float = 5e-4,
        lr_reference_batch: int = 0,
        weight_decay: float = 1e-5,
        optimizer: str = "adam",
        schedule: str = "constant",
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, optimizer=optimizer,
                         schedule=schedule, warmup_epochs=warmup_epochs, **kwargs)  # fmt: skip
        self.answers: list[str] | None = None

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> ScanQA:
        """The plain ScanQA of these hyper-parameters (no trainer needed); `None` for `mean_size` is ScanNet's,
        for `sa_*` the reference's set abstractions."""
        values = {k: v for k, v in hparams.items() if v is not None or k not in ("mean_size", "sa_points", "sa_radii", "sa_nsamples")}
        return ScanQA(ScanQAConfig.from_hparams({"mean_size": MEAN_SIZE.tolist()} | values))

    def configure_models(self) -> None:
        self.model = self.build_model(self.hparams)

    def configure_losses(self) -> None:
        self.weights = LossWeights()
        self.register_buffer("mean_size", torch.tensor(self.model.config.mean_size), persistent=False)

    def configure_metrics(self) -> None:
        for stage in ("val", "test"):
            setattr(self, f"{stage}_em", ExactMatch())
            for name in ("answer_loss", "position_mse", "rotation_mse"):
                setattr(self, f"{stage}_{name}", MeanMetric())

    def setup(self, stage: str) -> None:
        answers = list(getattr(self.trainer.datamodule, "answer_vocabulary", None) or [])
        if len(answers) != self.hparams.num_answers:
            raise ConfigurationError(
                f"The data's answer vocabulary has {len(answers)} answers, the model's answer head "
                f"{self.hparams.num_answers} (model.num_answers, or the checkpoint's): evaluate a checkpoint on the "
                "data of its training run (the vocabulary is the training split's answers)."
            )
        self.answers = answers

    def forward(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """The model's outputs (VoteNet's, `answer_scores`, `situation_prediction`) and the GCR branch."""
        return self.model(batch)

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The model's forward on the first `samples` questions and their scenes."""
        return self.model, ({k: v[:samples] for k, v in batch.items() if torch.is_tensor(v)},)

    # -- optimisation: Adam on every parameter, batch-norm momentum per epoch --------------------------------
    def optimizer_parameters(self, lr: float, weight_decay: float) -> list[dict]:
        """One group: weight decay on every trainable parameter, norms and biases included, as the reference."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        # Here rather than in a callback: the schedule is part of the recipe whatever callbacks a config lists, and
        # a resumed run sets it again from the epoch (momentum is not in the state dict). The reference steps its
        # scheduler after each epoch from a counter that starts at -1, so epoch e (0-based) trains with the momentum
        # of max(e - 1, 0) steps: the first halving comes in epoch 21.
        hp = self.hparams
        steps = max(self.current_epoch - 1, 0)
        momentum = bn_momentum_at(steps, hp.bn_momentum, hp.bn_decay_rate, hp.bn_decay_step, hp.bn_momentum_min)
        for module in self.model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                module.momentum = momentum

    # -- steps ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        outputs, branch = self.model(batch)
        losses = scanqa_losses(outputs, batch, self.mean_size, self.weights)
        size = len(batch["answer_targets"])
        ratio = losses.pop("object_ratio")
        self.log_dict({f"train_loss_{k}": v.detach() for k, v in losses.items() if k != "loss"} | {"train_object_ratio": ratio},
                      batch_size=size)  # fmt: skip
        aux_loss = None
        if branch is not None:  # GCR: the answer loss of the block's branch, weighted as the model's own answer loss
            aux_logits = self.model.forward_aux_head(branch, outputs)
            aux_loss = self.weights.scale * self.weights.answer * answer_loss(aux_logits, batch["answer_targets"])
        weight = self.model.llm_config.aux_weight if aux_loss is not None else 0.0
        loss = self.with_auxiliary_loss(losses["loss"], aux_loss, weight, size)
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        return self.finite_loss(loss, batch, batch_idx)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if not self._log_unreadable(batch, stage):
            return
        outputs, _ = self.model(batch)
        logits, situation = outputs["answer_scores"], outputs.get("situation_prediction")
        logits, targets, classes, types, target_situation = self.scored(
            batch, logits, batch["answer_targets"], batch["answer_class"], batch["question_type"], batch["situation_target"]
        )  # each question once
        if not len(logits):
            return
        getattr(self, f"{stage}_em").update(logits.argmax(dim=-1), classes, types)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
        getattr(self, f"{stage}_answer_loss").update(losses)
        self.log(f"{stage}_answer_loss", getattr(self, f"{stage}_answer_loss"), batch_size=len(logits))
        if situation is not None:
            (situation,) = self.scored(batch, situation)
            for name, part in (("position", slice(0, 3)), ("rotation", slice(3, 7))):
                metric = getattr(self, f"{stage}_{name}_mse")
                metric.update((situation[:, part] - target_situation[:, part]).square().mean(dim=1))
                self.log(f"{stage}_{name}_mse", metric, batch_size=len(logits))

    def _log_exact_match(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_em")
        self.log_dict({f"{stage}_em1{name}": value for name, value in metric.compute().items()}, prog_bar=stage == "val")
        metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_exact_match("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_exact_match("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.input_key not in batch:  # every sample unreadable
            return {"rows": []}
        outputs, _ = self.model(batch)
        ids, top, classes, types = self.scored(
            batch, batch["question_id"], outputs["answer_scores"].argmax(dim=-1), batch["answer_class"], batch["question_type"]
        )
        rows = [{"question_id": int(q), "answer": self.answers[a], "ground_truth": self.answers[c] if c >= 0 else None,
                 "question_type": QUESTION_TYPES[t]}
                for q, a, c, t in zip(ids.tolist(), top.tolist(), classes.tolist(), types.tolist())]  # fmt: skip
        return {"rows": rows}

    def prediction_file(self, path: Path) -> PredictionFile:
        """The predictions `predict` writes (`.json`)."""
        return SQA3DPredictionsJSON(path)
