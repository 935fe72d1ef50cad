"""Flickr30k image-text retrieval as METER fine-tunes it (meter/modules/objectives.py `compute_irtr` and
`compute_itm`), on [`METER`][frozenlm.models.meter.METER] with its rank and ITM heads and the frozen LM block
after fusion."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from frozenlm.data.base import DatasetFileError
from frozenlm.errors import ConfigurationError
from frozenlm.models.meter import METER, METERConfig
from frozenlm.predictions import JSONRows, PredictionFile
from frozenlm.tasks.vision_language import VisionLanguageTask, with_task_defaults
from frozenlm.metrics import RetrievalRecall


class RetrievalPredictionsJSON(JSONRows):
    """Per test image, its best-scored captions: `[{"image", "captions": [...], "scores": [...]}, ...]`."""


class ImageTextRetrieval(VisionLanguageTask):
    """Image-text retrieval as METER fine-tunes it on Flickr30k: a rank head (METER's `rank_output`,
    Linear(2h, 1)) scores a fused image-caption pair; the ranking loss is the cross-entropy of picking each
    image's caption among it and 15 captions of other images (METER's `irtr` loss). METER's Flickr30k
    recipe adds its image-text matching loss at weight 0.5 (`itm_weight`, meter/config.py line 188): half
    of a batch's captions, chosen at random, are paired with another image (the datamodule's
    `false_image`), and a 2-way ITM head tells matched from mismatched pairs. As in METER's retrieval
    fine-tuning (meter/modules/meter_module.py lines 151-157), the ITM head is frozen and the rank head starts
    as a copy of its "match" row; without vision-language pretraining (LM4VE's setting) the ITM head is a
    frozen random projection, through which the ITM loss still trains the rest.

    Evaluation scores every image of the split against every caption through the fusion layers (METER's
    all-pairs evaluation: exact, and the costly part: 1,000 x 5,000 pairs on Flickr30k's test split; the
    captions are encoded once per epoch, pairs are fused `eval_pairs` at a time). Under DDP each process
    scores its share of the images; `RetrievalRecall` gathers the score rows,
    so recalls cover the whole split once. Metrics: `<stage>_ir_r{1,5,10}` (text to image),
    `<stage>_tr_r{1,5,10}` (image to text) and `<stage>_r_mean` (their mean). `predict` writes each test
    image's `top_k` captions (JSON).

    Args:
        img_size: image side (METER's Flickr30k recipe: 384).
        head_lr_mult, fusion_lr_mult: METER's Flickr30k: 5 and 5. METER's rank head is not among its
            `lr_mult_head` modules (its frozen ITM head is), so it keeps `lr`.
        itm_weight: weight of the image-text matching loss (METER: 0.5; 0 for the ranking loss alone).
        eval_pairs: image-caption pairs fused per forward in evaluation.
        top_k: captions per image in the predictions file.
        **kwargs: see [`VisionLanguageTask`][frozenlm.tasks.VisionLanguageTask].

    Examples:
        From the command line: `frozenlm fit --config configs/flickr30k_meter_llama.yaml --data.root data/flickr30k`.
    """

    head_modules = ("itm_head",)
    monitor = "val_r_mean"

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
        self._captions: tuple[list[str], Tensor, Tensor] | None = None  # the evaluated split's, encoded

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> METER:
        """METER with the frozen ITM head and the rank head, from the task's hyper-parameters."""
        return METER(METERConfig.from_hparams(with_task_defaults(ImageTextRetrieval, hparams), head="rank"))

    def configure_metrics(self) -> None:
        self.recall = RetrievalRecall()

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
        model, images, candidates = self.model, len(batch["texts"]), len(batch["texts"][0])
        input_ids, attention_mask = model.tokenize([t for texts in batch["texts"] for t in texts])
        text = model.encode_text(input_ids, attention_mask)
        image = model.encode_image(batch["image"]).repeat_interleave(candidates, dim=0)
        features, branch = model.pair_features(image, text, attention_mask == 0)
        positives = torch.zeros(images, dtype=torch.long, device=self.device)  # the caption is first
        loss = F.cross_entropy(model.forward_head(features).view(images, candidates), positives)
        if self.hparams.itm_weight:
            itm_loss = self.itm_loss(batch, text[::candidates], attention_mask[::candidates] == 0, image[::candidates])
            self.log("train_loss_itm", itm_loss, batch_size=images)
            loss = loss + self.hparams.itm_weight * itm_loss
        aux_loss = None if branch is None else F.cross_entropy(model.forward_aux_head(branch).view(images, candidates), positives)
        weight = model.llm_config.aux_weight if aux_loss is not None else 0.0
        loss = self.with_auxiliary_loss(loss, aux_loss, weight, images)
        self.log("train_loss", loss, prog_bar=True, batch_size=images)
        return self.finite_loss(loss, batch, batch_idx)

    def itm_loss(self, batch: dict[str, Any], text: Tensor, text_padding: Tensor, image: Tensor) -> Tensor:
        """METER's `compute_itm` (meter/modules/objectives.py lines 44-68): each image's own caption
        (`text`, encoded) paired with its image (`image`, encoded) or, for a random half of the batch,
        with the sample's `false_image`; cross-entropy of the 2-way ITM head against matched / not."""
        count = len(text)
        matched = torch.cat([torch.ones(count // 2), torch.zeros(count - count // 2)]).to(self.device)
        matched = matched[torch.randperm(count, device=self.device)]
        false = self.model.encode_image(batch["false_image"])
        pair_image = torch.where(matched.bool()[:, None, None], image, false)
        features, _ = self.model.pair_features(pair_image, text, text_padding)
        return F.cross_entropy(self.model.itm_head(features), matched.long())

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The model's pair scores of the first `samples` images, each paired with one caption: its own in a
        training batch, else one of the split's first captions (an evaluation batch holds images only)."""
        texts = [t[0] for t in batch["texts"][:samples]] if "texts" in batch else self.trainer.datamodule.captions("val")[0]
        images = batch["image"][:samples]
        return self.model, (images, *self.model.tokenize(texts[: len(images)]))

    # -- evaluation: all pairs ---------------------------------------------------------------
    def _start_evaluation(self, stage: str) -> None:
        texts, owners = self.trainer.datamodule.captions(stage)
        input_ids, attention_mask = self.model.tokenize(texts)
        pairs = self.hparams.eval_pairs
        encoded = torch.cat([self.model.encode_text(i, m) for i, m in zip(input_ids.split(pairs), attention_mask.split(pairs))])
        self._captions = (texts, encoded, attention_mask == 0)
        self.recall.start(owners.to(self.device), stage, warn=not self.trainer.sanity_checking)

    def score_images(self, images: Tensor, text: Tensor, text_padding: Tensor) -> Tensor:
        """Rank-head scores `[B, texts]` of `images` against every encoded caption `text [texts, L, D]`."""
        image = self.model.encode_image(images)
        chunk = max(1, self.hparams.eval_pairs // len(image))
        rows = []
        for start in range(0, len(text), chunk):
            pair_text = text[start : start + chunk].repeat(len(image), 1, 1)
            pair_padding = text_padding[start : start + chunk].repeat(len(image), 1)
            count = len(pair_text) // len(image)
            pair_image = image.repeat_interleave(count, dim=0)
            features, _ = self.model.pair_features(pair_image, pair_text, pair_padding)
            rows.append(self.model.forward_head(features).view(len(image), count))
        return torch.cat(rows, dim=1)

    def batch_scores(self, batch: dict[str, Any]) -> Tensor:
        """[`score_images`][frozenlm.tasks.retrieval.ImageTextRetrieval.score_images] of an evaluation batch against the split's captions; every image must have been read."""
        if batch["unreadable"]:
            raise DatasetFileError(
                f"Unreadable evaluation image(s) {batch['unreadable'][:3]}: recall over a split missing an image is not "
                "the split's. Restore the files from the download."
            )
        return self.score_images(batch["image"], *self._captions[1:])

    def _evaluation_step(self, batch: dict[str, Any]) -> None:
        self.recall.update(*self.scored(batch, batch["index"].to(self.device), self.batch_scores(batch)))

    def _finish_evaluation(self, stage: str) -> None:
        recalls = self.recall.compute()
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
        """Each test image's best captions, the file `predict` writes (`.json`)."""
        return RetrievalPredictionsJSON(path)
