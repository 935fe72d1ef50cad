"""Vision-language tasks on METER with a frozen LM block after fusion (LM4VE's VQAv2 and Flickr30k runs).

LM4VE reports that the frozen LLaMA block also helps METER (initialised from CLIP and RoBERTa, no
vision-language pretraining): after the co-attention layers the visual tokens pass through Linear ->
frozen LM layer -> Linear before pooling. The authors never released this code, so this is our reading:
``llm_tokens: visual`` (default) passes the image stream's tokens; ``all`` passes the text tokens too,
in one sequence, with the text padding masked. ``llm: null`` is the METER baseline; the MLP and random
block controls and GCR's auxiliary mode come with :class:`frozenlm.llm.LLMConfig`.

Optimisation follows METER's fine-tuning: AdamW (betas 0.9, 0.98), weight decay 0.01 (none on biases
and norms), base lr 5e-6 for the towers, multiplied for the heads (``head_lr_mult``), the cross-modal
layers (``fusion_lr_mult``) and the LM block's adapters (``llm_lr_mult``: 10, as LM4VE gives its
adapters 10x the image encoder's lr).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoTokenizer

from frozenlm.data.base import DatasetFileError
from frozenlm.errors import ConfigurationError, FrozenLMError
from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.llm.checkpoint import local_folder
from frozenlm.models.meter import METER, init_bert_weights
from frozenlm.predictions import JSONRows, PredictionFile
from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.vl_metrics import VQAAccuracy, split_recalls

# Parameter-name prefixes of METER's cross-modal part: its "cross_modal_*" modules, the ones METER's
# `set_schedule` (meter/modules/meter_utils.py, line 188) gives `lr_mult_cross_modal`. The modality
# (token-type) embeddings are not among them and keep the towers' lr, as in METER.
FUSION_PREFIXES = ("meter.text_layers", "meter.image_layers", "meter.text_pooler", "meter.image_pooler",
                   "meter.text_transform", "meter.image_transform")  # fmt: skip

# Checkpoints of this task family record the architecture they were written with; older ones (a VQA head
# twice METER's width, a CLIP tower running all its blocks) cannot be loaded into today's model.
ARCHITECTURE_VERSION = 2
ARCHITECTURE_CHANGES = {2: "METER's VQA head (Linear(2h, 2h)), METER's CLIP tower (layers - 1 blocks), retrieval's rank and ITM heads"}


class IncompatibleCheckpointError(FrozenLMError, ValueError):
    """A vision-language checkpoint written by an older frozenlm whose model differs from today's."""


class VisionLanguageTask(FrozenLMMixin, BaseTask):
    """What VQA and retrieval share: METER, the frozen block after fusion, tokenization, the optimizer groups.

    Subclasses build their heads in :meth:`configure_heads` (named ``head``/``aux_head``).

    Args:
        vision_checkpoint: CLIP checkpoint of the image tower: a local Hugging Face folder or a hub id
            (METER: ``openai/clip-vit-base-patch32``).
        text_checkpoint: text tower and tokenizer (METER: ``FacebookAI/roberta-base``).
        checkpoint_revision: hub revision of both.
        fusion_layers, fusion_hidden, fusion_heads: the co-attention layers (METER: 6, 768, 12).
        img_size: image side (must match the datamodule's).
        max_text_len: tokens per text, longer ones truncated (METER: 40 for retrieval, 50 for VQA).
        llm: the frozen LM block (see :class:`frozenlm.llm.LLMConfig`); None for none.
        llm_tokens: ``visual`` (the image stream's tokens through the block) or ``all`` (text and image
            tokens in one sequence, text padding masked).
        head_lr_mult, fusion_lr_mult, llm_lr_mult: lr multipliers of the heads, the cross-modal layers and
            the block's trainable parameters (adapters, LoRA) over the towers' ``lr``. Which modules count
            as heads is the subclass's ``head_modules`` (METER's ``lr_mult_head`` names); the modality
            embeddings and everything else keep ``lr``.
        lr, weight_decay, betas, warmup_epochs, min_lr, lr_reference_batch, **kwargs: see
            :class:`frozenlm.tasks.BaseTask` (METER: lr 5e-6 for a batch of 512, linear warmup over 10% of
            training then linear decay; here the decay is the base class's cosine).
    """

    sample_id_key = "id"
    # Top-level modules that get ``head_lr_mult`` (METER's `head_names`, meter_utils.py line 187).
    head_modules: tuple[str, ...] = ()

    def __init__(
        self,
        vision_checkpoint: str,
        text_checkpoint: str,
        checkpoint_revision: str | None = None,
        fusion_layers: int = 6,
        fusion_hidden: int = 768,
        fusion_heads: int = 12,
        img_size: int = 576,
        max_text_len: int = 40,
        llm: LLMConfig | None = None,
        llm_tokens: str = "visual",
        head_lr_mult: float = 50.0,
        fusion_lr_mult: float = 5.0,
        llm_lr_mult: float = 10.0,
        lr: float = 5e-6,
        lr_reference_batch: int = 0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] | None = (0.9, 0.98),
        warmup_epochs: float = 1.0,
        min_lr: float = 0.0,
        warmup_lr: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if llm_tokens not in ("visual", "all"):
            raise ValueError(f"llm_tokens must be 'visual' or 'all', got {llm_tokens!r}.")
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, betas=betas,
            warmup_epochs=warmup_epochs, min_lr=min_lr, warmup_lr=warmup_lr, **kwargs,
        )  # fmt: skip

    def configure_models(self) -> None:
        hp = self.hparams
        self.meter = METER(
            hp.vision_checkpoint, hp.text_checkpoint, hp.fusion_layers, hp.fusion_hidden, hp.fusion_heads,
            image_size=hp.img_size, revision=hp.checkpoint_revision,
        )  # fmt: skip
        folder = local_folder(hp.text_checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder or hp.text_checkpoint), revision=hp.checkpoint_revision)
        self.llm_block = self.build_llm(hp.llm, in_dim=hp.fusion_hidden)
        self.configure_heads(2 * hp.fusion_hidden)

    def configure_heads(self, dim: int) -> None:
        """Build the task's heads on the ``dim``-wide pooled pair features."""
        raise NotImplementedError

    # -- forward -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``input_ids`` and ``attention_mask`` ``[len(texts), L]``, padded to the longest, on the model's device."""
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.hparams.max_text_len,
                                 return_tensors="pt")  # fmt: skip
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def through_block(self, text: Tensor, text_padding: Tensor, image: Tensor, tokens: Tensor | None = None):
        """The fused streams with the block applied (inline) or tapped (GCR); ``tokens`` replaces what went
        through the block (the auxiliary branch's output)."""
        if self.llm_block is None:
            return text, image
        if self.hparams.llm_tokens == "visual":
            return text, self.llm_tap(image) if tokens is None else tokens
        if tokens is None:
            padding = torch.cat([text_padding, text_padding.new_zeros(image.shape[:2])], dim=1)
            tokens = self.llm_tap(torch.cat([text, image], dim=1), padding)
        return tokens[:, : text.shape[1]], tokens[:, text.shape[1] :]

    def pair_features(self, image: Tensor, text: Tensor, text_padding: Tensor) -> tuple[Tensor, Tensor | None]:
        """Pooled features ``[B, 2 * fusion_hidden]`` of encoded image/text pairs, and in GCR training the
        auxiliary branch's features (else None)."""
        text, image = self.meter.fuse(text, text_padding, image)
        fused_text, fused_image = self.through_block(text, text_padding, image)
        features = self.meter.pool(fused_text, fused_image)
        auxiliary = self.auxiliary_tokens()
        if auxiliary is None:
            return features, None
        return features, self.meter.pool(*self.through_block(text, text_padding, image, auxiliary))

    def forward(self, images: Tensor, texts: list[str]) -> Tensor:
        """Pooled features of ``images [B, 3, S, S]`` paired with ``texts`` (B strings)."""
        input_ids, attention_mask = self.tokenize(texts)
        text = self.meter.encode_text(input_ids, attention_mask)
        return self.pair_features(self.meter.encode_image(images), text, attention_mask == 0)[0]

    # -- optimizer ---------------------------------------------------------------------------
    def optimizer_parameters(self, lr: float, weight_decay: float) -> list[dict]:
        """METER's groups: towers at ``lr``, cross-modal layers, heads and the block's trainable parameters at
        their multiples; no weight decay on biases, norms and 1-d parameters."""
        hp = self.hparams
        groups: dict[tuple[str, bool], list[Tensor]] = {}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            part = ("llm" if name.startswith("llm_block.") else "fusion" if name.startswith(FUSION_PREFIXES)
                    else "head" if name.split(".")[0] in self.head_modules else "towers")  # fmt: skip
            groups.setdefault((part, parameter.ndim > 1), []).append(parameter)
        multiplier = {"towers": 1.0, "fusion": hp.fusion_lr_mult, "head": hp.head_lr_mult, "llm": hp.llm_lr_mult}
        return [
            {"params": params, "lr": lr * multiplier[part], "weight_decay": weight_decay if decay else 0.0}
            for (part, decay), params in groups.items()
        ]

    # -- checkpoints: the architecture they hold -----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["frozenlm_vision_language_version"] = ARCHITECTURE_VERSION

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        version = checkpoint.get("frozenlm_vision_language_version", 1)
        if version != ARCHITECTURE_VERSION:
            changes = "; ".join(text for v, text in ARCHITECTURE_CHANGES.items() if version < v <= ARCHITECTURE_VERSION)
            raise IncompatibleCheckpointError(
                f"This vision-language checkpoint was written by an older frozenlm (format {version}, today's "
                f"{ARCHITECTURE_VERSION}) whose model differs: {changes or 'unknown changes'}. It cannot be loaded "
                "without leaving parts random: retrain, or evaluate it with the frozenlm version that wrote it."
            )
        super().on_load_checkpoint(checkpoint)


# -- VQA ---------------------------------------------------------------------------------------
def vqa_head(dim: int, num_answers: int) -> nn.Sequential:
    """METER's VQA classifier on the ``dim = 2h`` pooled pair feature: Linear(2h, 2h) -> LayerNorm -> GELU ->
    Linear(2h, answers), BERT-initialised (``vqa_classifier``, meter/modules/meter_module.py lines 105-110)."""
    head = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, num_answers))
    head.apply(init_bert_weights)
    return head


class VQAResultsJSON(JSONRows):
    """The VQA challenge's results file: ``[{"question_id": int, "answer": str}, ...]``."""


class AnswerVocabularyError(FrozenLMError, ValueError):
    """A VQA checkpoint whose answer vocabulary is not the data's: the message gives both sizes and the
    settings each was built with (``--data.answer_splits``, ``--data.min_answer_count``)."""


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

    Metrics: the official VQA accuracy overall and per answer type (``<stage>_vqa_acc``,
    ``_vqa_acc_yesno``, ``_vqa_acc_number``, ``_vqa_acc_other``) and METER's ``vqa_score`` (the soft score
    of the top answer). ``predict`` writes the challenge's results JSON (``--predictions.output
    results.json``) for a test-dev submission.

    Args:
        num_classes: answers in the vocabulary (linked from the datamodule; METER: 3,129).
        img_size: image side (METER's VQA recipe: 576).
        max_text_len: METER's VQA: 50 tokens.
        vqa_rule: which of the official evaluation script's normalisations scores answers, ``"2016"`` (its
            2016-2021 releases) or ``"2021"`` (since its 2021 fix); see :mod:`frozenlm.tasks.vl_metrics`.
        head_lr_mult: METER's VQA: 50 (the classifier and, in GCR, its auxiliary copy); fusion_lr_mult: 5.
        **kwargs: see :class:`VisionLanguageTask`.
    """

    sample_id_key = "question_id"
    head_modules = ("head", "aux_head")
    monitor = "val_vqa_acc"
    monitor_mode = "max"

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

    def configure_heads(self, dim: int) -> None:
        self.head = vqa_head(dim, self.hparams.num_classes)
        if self.llm_auxiliary and self.llm_config.aux_head == "separate":
            self.aux_head = vqa_head(dim, self.hparams.num_classes)

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
        """``[B]``: binary cross-entropy summed over answers (METER's mean over all entries x answers, per sample)."""
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The batch mean of :meth:`sample_losses`."""
        return self.sample_losses(logits, targets).mean()

    def head_logits(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Answer logits of a batch, and the auxiliary branch's in GCR training (else None)."""
        input_ids, attention_mask = self.tokenize(batch["question"])
        text = self.meter.encode_text(input_ids, attention_mask)
        features, auxiliary = self.pair_features(self.meter.encode_image(batch["image"]), text, attention_mask == 0)
        if auxiliary is None:
            return self.head(features), None
        return self.head(features), getattr(self, "aux_head", self.head)(auxiliary)

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The answer logits of the first ``samples`` image-question pairs."""
        return self.head_logits, ({"image": batch["image"][:samples], "question": batch["question"][:samples]},)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        logits, aux_logits = self.head_logits(batch)
        loss = self.loss(logits, batch["targets"])
        if aux_logits is not None:  # GCR: loss_main + aux_weight * loss_aux
            aux_loss = self.loss(aux_logits, batch["targets"])
            self.log_dict({"train_loss_main": loss, "train_loss_aux": aux_loss}, batch_size=len(logits))
            loss = loss + self.llm_config.aux_weight * aux_loss
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
        accuracy = getattr(self, f"{stage}_accuracy")
        accuracy.update([self.answers[i] for i in top.tolist()], answers, types)
        self.log(f"{stage}_loss", getattr(self, f"{stage}_loss"), batch_size=len(logits))
        self.log(f"{stage}_vqa_score", getattr(self, f"{stage}_score"), batch_size=len(logits))

    def _log_accuracy(self, stage: str) -> None:
        accuracy = getattr(self, f"{stage}_accuracy")
        values = accuracy.compute()
        names = {"overall": "", "yes/no": "_yesno", "number": "_number", "other": "_other"}
        self.log_dict({f"{stage}_vqa_acc{names[k]}": v for k, v in values.items()}, prog_bar=stage == "val")
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
        """The challenge's results file ``predict`` writes (``.json``)."""
        return VQAResultsJSON(path)


# -- retrieval ---------------------------------------------------------------------------------
class RetrievalPredictionsJSON(JSONRows):
    """Per test image, its best-scored captions: ``[{"image", "captions": [...], "scores": [...]}, ...]``."""


class ImageTextRetrieval(VisionLanguageTask):
    """Image-text retrieval as METER fine-tunes it on Flickr30k: a rank head (METER's ``rank_output``,
    Linear(2h, 1)) scores a fused image-caption pair; the ranking loss is the cross-entropy of picking each
    image's caption among it and 15 captions of other images (METER's ``irtr`` loss). METER's Flickr30k
    recipe adds its image-text matching loss at weight 0.5 (``itm_weight``, meter/config.py line 188): half
    of a batch's captions, chosen at random, are paired with another image (the datamodule's
    ``false_image``), and a 2-way ITM head tells matched from mismatched pairs. As in METER's retrieval
    fine-tuning (meter/modules/meter_module.py lines 151-157), the ITM head is frozen and the rank head starts
    as a copy of its "match" row; without vision-language pretraining (LM4VE's setting) the ITM head is a
    frozen random projection, through which the ITM loss still trains the rest.

    Evaluation scores every image of the split against every caption through the fusion layers (METER's
    all-pairs evaluation: exact, and the costly part: 1,000 x 5,000 pairs on Flickr30k's test split; the
    captions are encoded once per epoch, pairs are fused ``eval_pairs`` at a time). Under DDP each process
    scores its share of the images and the score rows are gathered, so recalls cover the whole split once.
    Metrics: ``<stage>_ir_r{1,5,10}`` (text to image), ``<stage>_tr_r{1,5,10}`` (image to text) and
    ``<stage>_r_mean`` (their mean). ``predict`` writes each test image's ``top_k`` captions (JSON).

    Args:
        img_size: image side (METER's Flickr30k recipe: 384).
        head_lr_mult, fusion_lr_mult: METER's Flickr30k: 5 and 5. METER's rank head is not among its
            ``lr_mult_head`` modules (its frozen ITM head is), so it keeps ``lr``.
        itm_weight: weight of the image-text matching loss (METER: 0.5; 0 for the ranking loss alone).
        eval_pairs: image-caption pairs fused per forward in evaluation.
        top_k: captions per image in the predictions file.
        **kwargs: see :class:`VisionLanguageTask`.
    """

    def __init__(
        self,
        vision_checkpoint: str,
        text_checkpoint: str,
        img_size: int = 384,
        head_lr_mult: float = 5.0,
        fusion_lr_mult: float = 5.0,
        eval_pairs: int = 512,
        top_k: int = 10,
        itm_weight: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            vision_checkpoint, text_checkpoint, img_size=img_size, head_lr_mult=head_lr_mult,
            fusion_lr_mult=fusion_lr_mult, **kwargs,
        )  # fmt: skip
        self._captions: tuple[list[str], Tensor, Tensor, Tensor] | None = None
        self._rows: list[tuple[Tensor, Tensor]] = []

    head_modules = ("itm_head",)
    monitor = "val_r_mean"
    monitor_mode = "max"

    def configure_heads(self, dim: int) -> None:
        self.itm_head = nn.Linear(dim, 2).requires_grad_(False)  # frozen, as METER's itm_score here
        init_bert_weights(self.itm_head)
        self.rank_head = self.rank_head_from_itm(dim)
        if self.llm_auxiliary and self.llm_config.aux_head == "separate":
            self.aux_rank_head = self.rank_head_from_itm(dim)

    def rank_head_from_itm(self, dim: int) -> nn.Linear:
        """A rank head starting as the ITM head's "match" row (METER's ``rank_output``)."""
        head = nn.Linear(dim, 1)
        with torch.no_grad():
            head.weight.copy_(self.itm_head.weight[1:])
            head.bias.copy_(self.itm_head.bias[1:])
        return head

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.itm_weight and not getattr(self.trainer.datamodule, "false_image", False):
            raise ConfigurationError(
                f"--model.itm_weight {self.hparams.itm_weight} needs another image per training sample: "
                "set --data.false_image true, or --model.itm_weight 0 for the ranking loss alone."
            )

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        images, candidates = len(batch["texts"]), len(batch["texts"][0])
        input_ids, attention_mask = self.tokenize([t for texts in batch["texts"] for t in texts])
        text = self.meter.encode_text(input_ids, attention_mask)
        image = self.meter.encode_image(batch["image"]).repeat_interleave(candidates, dim=0)
        features, auxiliary = self.pair_features(image, text, attention_mask == 0)
        positives = torch.zeros(images, dtype=torch.long, device=self.device)  # the caption is first
        loss = F.cross_entropy(self.rank_head(features).view(images, candidates), positives)
        if self.hparams.itm_weight:
            itm_loss = self.itm_loss(batch, text[::candidates], attention_mask[::candidates] == 0, image[::candidates])
            self.log("train_loss_itm", itm_loss, batch_size=images)
            loss = loss + self.hparams.itm_weight * itm_loss
        if auxiliary is not None:
            aux_loss = F.cross_entropy(getattr(self, "aux_rank_head", self.rank_head)(auxiliary).view(images, candidates), positives)
            self.log_dict({"train_loss_main": loss, "train_loss_aux": aux_loss}, batch_size=images)
            loss = loss + self.llm_config.aux_weight * aux_loss
        self.log("train_loss", loss, prog_bar=True, batch_size=images)
        return self.finite_loss(loss, batch, batch_idx)

    def itm_loss(self, batch: dict[str, Any], text: Tensor, text_padding: Tensor, image: Tensor) -> Tensor:
        """METER's ``compute_itm`` (meter/modules/objectives.py lines 44-68): each image's own caption
        (``text``, encoded) paired with its image (``image``, encoded) or, for a random half of the batch,
        with the sample's ``false_image``; cross-entropy of the 2-way ITM head against matched / not."""
        count = len(text)
        matched = torch.cat([torch.ones(count // 2), torch.zeros(count - count // 2)]).to(self.device)
        matched = matched[torch.randperm(count, device=self.device)]
        false = self.meter.encode_image(batch["false_image"])
        pair_image = torch.where(matched.bool()[:, None, None], image, false)
        features, _ = self.pair_features(pair_image, text, text_padding)
        return F.cross_entropy(self.itm_head(features), matched.long())

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The fused features of the first ``samples`` images, each paired with one caption: its own in a
        training batch, else one of the split's first captions (an evaluation batch holds images only). The
        rank head's one dot product per pair is left out."""
        texts = [t[0] for t in batch["texts"][:samples]] if "texts" in batch else self.trainer.datamodule.captions("val")[0]
        images = batch["image"][:samples]
        return self, (images, texts[: len(images)])

    # -- evaluation: all pairs ---------------------------------------------------------------
    def _start_evaluation(self, stage: str) -> None:
        texts, owners = self.trainer.datamodule.captions(stage)
        input_ids, attention_mask = self.tokenize(texts)
        encoded = torch.cat([self.meter.encode_text(ids, mask) for ids, mask in
                             zip(input_ids.split(self.hparams.eval_pairs), attention_mask.split(self.hparams.eval_pairs))])  # fmt: skip
        self._captions = (texts, owners.to(self.device), encoded, attention_mask == 0)
        self._rows = []

    def score_images(self, images: Tensor) -> Tensor:
        """Rank-head scores ``[B, texts]`` of ``images`` against every caption of the evaluated split."""
        _, _, text, text_padding = self._captions
        image = self.meter.encode_image(images)
        chunk = max(1, self.hparams.eval_pairs // len(image))
        rows = []
        for start in range(0, len(text), chunk):
            pair_text = text[start : start + chunk].repeat(len(image), 1, 1)
            pair_padding = text_padding[start : start + chunk].repeat(len(image), 1)
            count = len(pair_text) // len(image)
            pair_image = image.repeat_interleave(count, dim=0)
            rows.append(self.rank_head(self.pair_features(pair_image, pair_text, pair_padding)[0]).view(len(image), count))
        return torch.cat(rows, dim=1)

    def batch_scores(self, batch: dict[str, Any]) -> Tensor:
        """:meth:`score_images` of an evaluation batch, whose every image must have been read."""
        if batch["unreadable"]:
            raise DatasetFileError(
                f"Unreadable evaluation image(s) {batch['unreadable'][:3]}: recall over a split missing an image is not "
                "the split's. Restore the files from the download."
            )
        return self.score_images(batch["image"])

    def _evaluation_step(self, batch: dict[str, Any]) -> None:
        scores = self.batch_scores(batch)
        index = batch["index"].clone()
        if "padding" in batch:  # repeats that even out the processes' shares: gathered, then dropped
            index[batch["padding"].bool()] = -1
        self._rows.append((index.to(self.device), scores))

    def _finish_evaluation(self, stage: str) -> None:
        """Recalls of the split from every process's score rows, logged."""
        texts, owners, _, _ = self._captions
        index = torch.cat([i for i, _ in self._rows])
        scores = torch.cat([s for _, s in self._rows])
        self._rows = []
        if self.trainer.world_size > 1:
            index, scores = self.all_gather(index).flatten(0, 1), self.all_gather(scores).flatten(0, 1)
        recalls = split_recalls(index, scores, owners, stage, warn=not self.trainer.sanity_checking)
        recalls["r_mean"] = torch.stack(list(recalls.values())).mean()
        self.log_dict({f"{stage}_{k}": v for k, v in recalls.items()}, prog_bar=stage == "val")

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def on_predict_epoch_start(self) -> None:
        self._start_evaluation("predict")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        texts = self._captions[0]
        scores = self.batch_scores(batch)
        top = scores.topk(min(self.hparams.top_k, scores.shape[1]), dim=1)
        ids, indices, values = self.scored(batch, batch["id"], top.indices, top.values)
        return {"rows": [
            {"image": i, "captions": [texts[t] for t in row], "scores": [round(v, 5) for v in vals]}
            for i, row, vals in zip(ids, indices.tolist(), values.float().tolist())
        ]}  # fmt: skip

    def prediction_file(self, path: Path) -> PredictionFile:
        """Each test image's best captions, the file ``predict`` writes (``.json``)."""
        return RetrievalPredictionsJSON(path)
