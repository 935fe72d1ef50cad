"""VQAv2 as METER fine-tunes it (meter/modules/objectives.py `compute_vqa`), on
[`METER`][frozenlm.models.meter.METER] with its VQA head and the frozen LM block after fusion."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from frozenlm.errors import FrozenLMError
from frozenlm.models.meter import METER, METERConfig
from frozenlm.predictions import JSONRows, PredictionFile
from frozenlm.tasks.vision_language import VisionLanguageTask, with_task_defaults
from frozenlm.tasks.vl_metrics import VQAAccuracy


class VQAResultsJSON(JSONRows):
    """The VQA challenge's results file: `[{"question_id": int, "answer": str}, ...]`."""


class AnswerVocabularyError(FrozenLMError, ValueError):
    """A VQA checkpoint whose answer vocabulary is not the data's: the message gives both sizes and the
    settings each was built with (`--data.answer_splits`, `--data.min_answer_count`)."""


def answer_settings(datamodule: Any) -> dict[str, Any]:
    """The datamodule settings an answer vocabulary is built from (recorded in the checkpoint beside it)."""
    return {key: getattr(datamodule, key) for key in ("answer_splits", "min_answer_count") if hasattr(datamodule, key)}


def _settings_text(settings: dict[str, Any] | None, missing: str) -> str:
    if not settings:
        return missing
    shown = {k: f"[{', '.join(map(str, v))}]" if isinstance(v, (list, tuple)) else v for k, v in settings.items()}
    return "built with " + " ".join(f"--data.{key} {value}" for key, value in shown.items())


class VisualQuestionAnswering(VisionLanguageTask):
    """VQA as METER fine-tunes it: a classifier over the answer vocabulary on the pooled pair feature,
    trained with binary cross-entropy against soft scores, summed over answers (BCE mean x answers).

    Metrics: the official VQA accuracy overall and per answer type (`<stage>_vqa_acc`,
    `_vqa_acc_yesno`, `_vqa_acc_number`, `_vqa_acc_other`) and METER's `vqa_score` (the soft score
    of the top answer). `predict` writes the challenge's results JSON (`--predictions.output
    results.json`) for a test-dev submission.

    Args:
        num_classes: answers in the vocabulary (linked from the datamodule; METER: 3,129).
        img_size: image side (METER's VQA recipe: 576).
        max_text_len: METER's VQA: 50 tokens.
        vqa_rule: which of the official evaluation script's normalisations scores answers, `"2016"` (its
            2016-2021 releases) or `"2021"` (since its 2021 fix); see `vl_metrics`.
        head_lr_mult: METER's VQA: 50 (the classifier and, in GCR, its auxiliary copy); fusion_lr_mult: 5.
        **kwargs: see [`VisionLanguageTask`][frozenlm.tasks.VisionLanguageTask].

    Examples:
        From the command line (METER from CLIP ViT-B/32 and RoBERTa-base):
        `frozenlm fit --config configs/vqav2_meter_llama.yaml --data.root data/vqav2`.
    """

    sample_id_key = "question_id"
    head_modules = ("head", "aux_head")
    monitor = "val_vqa_acc"

    def __init__(
        self,
        vision_checkpoint: str,
        text_checkpoint: str,
        num_classes: int = 3129,
        img_size: int = 576,
        max_text_len: int = 50,
        vqa_rule: str = "2016",
        head_lr_mult: float = 50.0,
        fusion_lr_mult: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            vision_checkpoint, text_checkpoint, img_size=img_size, max_text_len=max_text_len,
            head_lr_mult=head_lr_mult, fusion_lr_mult=fusion_lr_mult, **kwargs,
        )  # fmt: skip
        self.answers: list[str] | None = None
        # (answers, settings) of the data, and (answers, settings, path) of a restored checkpoint
        self._data_vocabulary: tuple[list[str], dict[str, Any]] | None = None
        self._checkpoint_vocabulary: tuple[list[str], dict[str, Any] | None, str | None] | None = None

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> METER:
        """METER with its VQA head over `num_classes` answers, from the task's hyper-parameters."""
        return METER(METERConfig.from_hparams(with_task_defaults(VisualQuestionAnswering, hparams), head="vqa"))

    def configure_metrics(self) -> None:
        rule = self.hparams.get("vqa_rule", "2016")
        self.val_accuracy, self.test_accuracy = VQAAccuracy(rule), VQAAccuracy(rule)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_score, self.test_score = MeanMetric(), MeanMetric()

    # -- the answer vocabulary: the datamodule's, checked against a restored checkpoint's -----------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        answers = list(getattr(datamodule, "answers", None) or [])
        if not answers:
            raise ValueError(f"{type(self).__name__} needs a datamodule with an answer vocabulary (`answers`).")
        self._data_vocabulary = (answers, answer_settings(datamodule))
        self._check_answers()
        self.answers = answers

    def _check_answers(self) -> None:
        """Refuse a restored checkpoint whose answer vocabulary is not the data's (in whichever order Lightning
        restores the checkpoint and sets the module up)."""
        data, stored = self._data_vocabulary, self._checkpoint_vocabulary
        if data is None or stored is None or data[0] == stored[0]:
            return
        (data_answers, data_settings), (stored_answers, stored_settings, path) = data, stored
        same = " (as many, but other answers or in another order)" if len(stored_answers) == len(data_answers) else ""
        raise AnswerVocabularyError(
            f"The checkpoint{f' {path}' if path else ''} has an answer vocabulary of {len(stored_answers)} answers "
            f"({_settings_text(stored_settings, 'its settings are not recorded in the checkpoint')}), the data's has "
            f"{len(data_answers)} answers{same} ({_settings_text(data_settings, 'settings unknown')}): its answer head "
            "does not fit. Pass the training run's "
            "--data.answer_splits and --data.min_answer_count (and its annotation files)."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vqa_answers"] = self.answers
        data = self._data_vocabulary
        if data is not None and data[0] == self.answers:
            checkpoint["vqa_answer_settings"] = data[1]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        answers = checkpoint.get("vqa_answers")
        if answers is not None:
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            self._checkpoint_vocabulary = (list(answers), checkpoint.get("vqa_answer_settings"), path)
            self._check_answers()
            self.answers = list(answers)

    # -- steps -------------------------------------------------------------------------------
    def sample_losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """`[B]`: binary cross-entropy summed over answers (METER's mean over all entries x answers, per sample)."""
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The batch mean of [`sample_losses`][frozenlm.tasks.vqa.VisualQuestionAnswering.sample_losses]."""
        return self.sample_losses(logits, targets).mean()

    def head_logits(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Answer logits of a batch, and GCR's auxiliary head's on the block's branch in training (else None)."""
        features, branch = self.model.forward_features(batch["image"], *self.model.tokenize(batch["question"]))
        return self.model.forward_head(features), None if branch is None else self.model.forward_aux_head(branch)

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The model's answer logits of the first `samples` image-question pairs."""
        return self.model, (batch["image"][:samples], *self.model.tokenize(batch["question"][:samples]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        logits, aux_logits = self.head_logits(batch)
        aux_loss = None if aux_logits is None else self.loss(aux_logits, batch["targets"])
        weight = self.model.llm_config.aux_weight if aux_loss is not None else 0.0
        loss = self.with_auxiliary_loss(self.loss(logits, batch["targets"]), aux_loss, weight, len(logits))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        return self.finite_loss(loss, batch, batch_idx)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if not self._log_unreadable(batch, stage):
            return
        logits, _ = self.head_logits(batch)
        logits, targets, answers, types = self.scored(batch, logits, batch["targets"], batch["answers"], batch["answer_type"])
        if not len(logits):
            return
        top = logits.argmax(dim=-1)
        getattr(self, f"{stage}_loss").update(self.sample_losses(logits, targets))
        getattr(self, f"{stage}_score").update(targets.gather(1, top[:, None]).squeeze(1))
        getattr(self, f"{stage}_accuracy").update([self.answers[i] for i in top.tolist()], answers, types)
        self.log(f"{stage}_loss", getattr(self, f"{stage}_loss"), batch_size=len(logits))
        self.log(f"{stage}_vqa_score", getattr(self, f"{stage}_score"), batch_size=len(logits))

    def _log_accuracy(self, stage: str) -> None:
        accuracy = getattr(self, f"{stage}_accuracy")
        names = {"overall": "", "yes/no": "_yesno", "number": "_number", "other": "_other"}
        self.log_dict({f"{stage}_vqa_acc{names[k]}": v for k, v in accuracy.compute().items()}, prog_bar=stage == "val")
        accuracy.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.input_key not in batch:  # every sample unreadable
            return {"rows": []}
        logits, _ = self.head_logits(batch)
        question_ids, top = self.scored(batch, batch["question_id"], logits.argmax(dim=-1))
        return {"rows": [{"question_id": int(q), "answer": self.answers[a]} for q, a in zip(question_ids.tolist(), top.tolist())]}

    def prediction_file(self, path: Path) -> PredictionFile:
        """The challenge's results file `predict` writes (`.json`)."""
        return VQAResultsJSON(path)
