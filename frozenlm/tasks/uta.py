"""Unmasked Token Alignment (UTA; Liu et al., TMLR 2024): a ViT student that sees only the unmasked patches
of an image learns to produce, at those positions (and at CLS), the final tokens of a frozen CLIP vision
tower that sees the whole image. The aligned student then works with the teacher's text tower for
zero-shot classification and retrieval, and starts fine-tuning (``ImageClassifier --model.init_from``).

Only UTA's inference code is public. What follows the paper: the student gets only the kept tokens (no
mask token), reversed block-wise masking at ratio 0.4 (base) / 0.5 (large), targets the teacher's final
tokens at the same positions, CLS included; zero-shot as CLIP (prompt templates, the mean of normalised
text embeddings per class, logits scaled by the teacher's logit scale). Our choices where the paper is
silent or unverified: the cosine loss on the teacher's final-norm tokens (before its projection); a linear
projection only when the widths differ; masks drawn per image in the training process.

How the student's CLS reaches the joint image-text space, two ways (``zeroshot_head``). UTA's released
inference code (jihaonew/UTA ``eva_vit_model/eva_vit.py``: ``self.head = nn.Linear(embed_dim, 1024)``,
``forward_features`` returns ``self.norm(x)[:, 0]``) gives the student a linear head of its own on its
final-norm CLS, and scores zero-shot logits as ``100 x`` cosine (``imagenet_zeroshot_eval.py``): ``own``
here, trained beside the token alignment by aligning (same ``loss``) the head's output to the teacher's
image embedding, which is our reading, since how UTA trained its head is not in the code. ``teacher``
(ours): the CLS through ``projection`` and then the teacher's own projection, nothing more to train.
Zero-shot ImageNet takes CLIP's 80 ImageNet prompts and class names from open_clip
(``zeroshot_templates: openai_imagenet``, ``zeroshot_class_names: imagenet``; UTA's code holds the same
lists); other datasets default to CLIP's seven-prompt ensemble.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.models import create_vit
from frozenlm.models.clip_teacher import load_teacher
from frozenlm.models.masking import block_mask, kept_indices, reversed_block_mask
from frozenlm.models.patch_embed import CAPEConfig, Stem
from frozenlm.models.vit import PosEmbed, trunk_options
from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.vl_metrics import split_recalls

# The seven prompts CLIP's authors found best as an ensemble for ImageNet (their prompt-engineering notebook).
CLIP_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)  # fmt: skip
TEMPLATE_SETS = ("clip7", "openai_imagenet")
Masking = Literal["reversed_block", "block", "random"]


def zeroshot_templates(templates: list[str] | str | None) -> list:
    """The prompt makers ``name -> prompt`` of a ``zeroshot_templates`` setting: a list of ``{}`` templates,
    ``clip7`` / None (:data:`CLIP_TEMPLATES`) or ``openai_imagenet`` (open_clip's 80 ImageNet prompts)."""
    if templates == "openai_imagenet":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    chosen = CLIP_TEMPLATES if templates in (None, "clip7") else templates
    return [template.format for template in chosen]
AlignmentLoss = Literal["cosine", "smooth_l1", "mse"]


class UnmaskedTokenAlignment(FrozenLMMixin, BaseTask):
    """UTA pretraining of a timm ViT student against a frozen CLIP teacher, with zero-shot evaluation.

    Training: per image, ``mask_ratio`` of the patches are masked (``masking``); the student runs on CLS +
    the kept patches only; its output tokens (after its final norm and ``projection``) are aligned to the
    teacher's final tokens at the same positions (``loss``). The teacher is frozen, in eval mode, runs
    under ``no_grad`` once per batch, and is kept out of checkpoints and the optimizer.

    Evaluation (``validate``/``test``): the alignment loss (``<stage>_loss``; fixed masks per batch), and
    zero-shot metrics when the datamodule has class names (``classes``, or ``zeroshot_class_names``):
    ``<stage>_zeroshot_acc1/5`` for the student and ``<stage>_teacher_zeroshot_acc1/5`` for the teacher; on
    a captions datamodule (Flickr30k) zero-shot retrieval recall, ``<stage>_zeroshot_ir_r1`` ... and the
    teacher's. Evaluation images are taken whole (no mask).

    Args:
        teacher: a Hugging Face CLIP folder or hub id (e.g. ``openai/clip-vit-base-patch16``), or
            ``open_clip:<architecture>/<pretrained>`` (UTA's teacher appears to be EVA-02-CLIP).
        teacher_revision: hub revision of a Hugging Face teacher.
        teacher_dtype: the teacher's weights and inputs (``bfloat16`` on GPUs halves its cost).
        backbone: the student, a timm ViT name; its patch grid must be the teacher's at the teacher's patch
            size (the teacher's input is resized to match).
        img_size, patch_size, drop_path_rate, backbone_kwargs, stem, stem_channels, stem_strides, stem_removed_blocks, pos_embed, cape: as
            :class:`frozenlm.tasks.ImageClassifier`.
        llm, llm_position: a frozen LM block in the student, as :class:`frozenlm.tasks.ImageClassifier`.
        mask_ratio: fraction of the patches masked (UTA: 0.4 base, 0.5 large).
        masking: ``reversed_block`` (UTA: the kept patches form blocks), ``block`` (BEiT) or ``random``.
        loss: ``cosine`` (1 - cosine similarity per token), ``smooth_l1`` or ``mse``, averaged over tokens.
        projection: the head from the student's tokens to the teacher's width: ``auto`` (linear when the
            widths differ, none when equal), ``linear``, ``mlp`` (Linear-GELU-Linear) or ``none``.
        zeroshot: evaluate zero-shot when the data names classes or captions (off for pretraining data
            whose classes are not the evaluation's, e.g. ImageNet-21K's 21,841 synsets).
        zeroshot_templates: prompt templates with one ``{}`` for the class name, or a named set:
            ``clip7`` (default: CLIP's seven-prompt ImageNet ensemble) or ``openai_imagenet`` (CLIP's 80
            ImageNet prompts, from open_clip's ``OPENAI_IMAGENET_TEMPLATES``).
        zeroshot_class_names: a file of class names (JSON list or one per line) in the datamodule's class
            order, for datasets whose classes are ids (ImageNet's wnids), or ``imagenet`` (open_clip's
            ``IMAGENET_CLASSNAMES``, in wnid order); default the datamodule's ``classes``.
        zeroshot_head: how the student's CLS reaches the joint space: ``teacher`` (through ``projection``
            and the teacher's projection) or ``own`` (UTA's: a linear head of the student's, trained to
            the teacher's image embedding; see the module docstring).
        zeroshot_teacher: score the teacher's zero-shot metrics beside the student's.
        num_classes: classes of the zero-shot evaluation (linked from the datamodule by the CLI); the class
            names must be that many.
        lr, lr_reference_batch, weight_decay, warmup_epochs, min_lr, **kwargs: see :class:`BaseTask`
            (UTA: AdamW 1.5e-3 at batch 4096, wd 0.05, 1 warmup epoch, cosine to 1e-5).
    """

    monitor = "val_zeroshot_acc1"
    monitor_mode = "max"

    def __init__(
        self,
        teacher: str,
        teacher_revision: str | None = None,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        backbone: str = "vit_base_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        drop_path_rate: float = 0.1,
        backbone_kwargs: dict[str, Any] | None = None,
        stem: Stem = "patch",
        stem_channels: list[int] | None = None,
        stem_strides: list[int] | None = None,
        stem_removed_blocks: int = 1,
        pos_embed: PosEmbed = "learn",
        cape: CAPEConfig | None = None,
        llm: LLMConfig | None = None,
        llm_position: int = -1,
        mask_ratio: float = 0.4,
        masking: Masking = "reversed_block",
        loss: AlignmentLoss = "cosine",
        projection: Literal["auto", "linear", "mlp", "none"] = "auto",
        zeroshot: bool = True,
        zeroshot_templates: list[str] | str | None = None,
        zeroshot_class_names: str | None = None,
        zeroshot_head: Literal["teacher", "own"] = "teacher",
        zeroshot_teacher: bool = True,
        num_classes: int | None = None,
        lr: float = 1.5e-3,
        lr_reference_batch: int = 4096,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if isinstance(zeroshot_templates, str) and zeroshot_templates not in TEMPLATE_SETS:
            raise ValueError(f"zeroshot_templates must be a list of prompts or one of {sorted(TEMPLATE_SETS)}, got {zeroshot_templates!r}.")
        for template in [] if isinstance(zeroshot_templates, str) else zeroshot_templates or ():
            if template.count("{}") != 1:
                raise ValueError(f"Each zero-shot template needs exactly one {{}} for the class name: {template!r}.")
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            min_lr=min_lr, **kwargs,
        )  # fmt: skip
        self._classifier: Tensor | None = None
        self._retrieval: dict[str, Any] | None = None

    # -- models ------------------------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        teacher = load_teacher(hp.teacher, hp.teacher_revision).to(getattr(torch, hp.teacher_dtype))
        object.__setattr__(self, "teacher", teacher)  # out of the module tree: no checkpoint, no optimizer
        self.backbone = create_vit(
            hp.backbone, 0, img_size=hp.img_size, patch_size=hp.patch_size, drop_path_rate=hp.drop_path_rate,
            **trunk_options(hp), **(hp.backbone_kwargs or {}),
        )  # fmt: skip
        self.grid = self.backbone.patch_embed.grid_size
        if self.grid[0] != self.grid[1]:
            raise ValueError(f"The student's patch grid {self.grid} is not square; the teacher's is.")
        patches = self.grid[0] * self.grid[1]
        if round(hp.mask_ratio * patches) >= patches:  # the student would see CLS alone: nothing to align
            raise ValueError(
                f"--model.mask_ratio {hp.mask_ratio} masks all {patches} patches of the student's {self.grid[0]} x "
                f"{self.grid[1]} grid; keep at least one: a ratio below {(patches - 0.5) / patches:.4g}."
            )
        width = self.backbone.embed_dim
        if hp.projection == "none" or (hp.projection == "auto" and width == teacher.width):
            if width != teacher.width:
                raise ValueError(f"projection 'none' needs the student's width {width} to be the teacher's {teacher.width}.")
            self.projection = nn.Identity()
        elif hp.projection == "mlp":
            self.projection = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, teacher.width))
        else:
            self.projection = nn.Linear(width, teacher.width)
        self.llm_block = self.build_llm_after(hp.llm, self.backbone.blocks, hp.llm_position, width)
        if hp.get("zeroshot_head", "teacher") == "own":  # UTA's: the student's own head into the joint space
            with torch.no_grad():
                joint = teacher.project(torch.zeros(1, teacher.width, dtype=next(teacher.parameters()).dtype)).shape[-1]
            self.joint_head = nn.Linear(width, joint)
            nn.init.trunc_normal_(self.joint_head.weight, std=0.02)
            nn.init.zeros_(self.joint_head.bias)

    def configure_metrics(self) -> None:
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    # -- the student on its kept tokens --------------------------------------------------------
    def student_tokens(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """The student's final tokens ``[B, 1 + K, D]`` (after its final norm): CLS and the patches at ``keep
        [B, K]`` (all patches when None). Masked patches never enter the transformer."""
        vit = self.backbone
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        if keep is not None:
            prefix = vit.num_prefix_tokens
            patches = tokens[:, prefix:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :prefix], patches], dim=1)
        return vit.norm(vit.blocks(tokens))

    def draw_mask(self, rng: np.random.Generator) -> np.ndarray:
        """An ``[h, w]`` mask (True = masked) of ``round(mask_ratio * h * w)`` patches."""
        hp = self.hparams
        grid, patches = tuple(self.grid), self.grid[0] * self.grid[1]
        count = round(hp.mask_ratio * patches)
        if hp.masking == "random":
            return np.isin(np.arange(patches), rng.permutation(patches)[:count]).reshape(grid)
        return (reversed_block_mask if hp.masking == "reversed_block" else block_mask)(grid, count, rng)

    def evaluation_masks(self, ids: list[str]) -> Tensor:
        """One fixed mask per image, drawn from its id: the same on any number of processes and batch sizes."""
        return torch.from_numpy(np.stack([self.draw_mask(np.random.default_rng(zlib.crc32(str(i).encode()))) for i in ids]))

    # -- the teacher ---------------------------------------------------------------------------
    def teacher_inputs(self, images: Tensor) -> Tensor:
        """The batch as the teacher takes it: the datamodule's normalisation undone, the teacher's applied, and
        resized so that the teacher's patch grid is the student's."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        mean, std = (getattr(datamodule, k, None) for k in ("mean", "std"))
        teacher = self.teacher
        if mean is not None and std is not None and (tuple(mean), tuple(std)) != (tuple(teacher.mean), tuple(teacher.std)):
            shape = (1, 3, 1, 1)
            pixels = images * images.new_tensor(std).view(shape) + images.new_tensor(mean).view(shape)
            images = (pixels - images.new_tensor(teacher.mean).view(shape)) / images.new_tensor(teacher.std).view(shape)
        side = self.grid[0] * teacher.patch_size
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False)
        return images.to(next(teacher.parameters()).dtype)

    @torch.no_grad()
    def teacher_tokens(self, images: Tensor) -> Tensor:
        """The teacher's final tokens ``[B, 1 + N, width]`` of the whole images (float32)."""
        self.teacher.to(images.device)
        return self.teacher.tokens(self.teacher_inputs(images)).float()

    # -- alignment ---------------------------------------------------------------------------
    def alignment_loss(self, predicted: Tensor, target: Tensor) -> Tensor:
        """Per-image loss ``[B]``, averaged over its tokens."""
        kind = self.hparams.loss
        if kind == "cosine":
            return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean(dim=1)
        if kind == "smooth_l1":
            return F.smooth_l1_loss(predicted, target, reduction="none").mean(dim=(1, 2))
        return F.mse_loss(predicted, target, reduction="none").mean(dim=(1, 2))

    @staticmethod
    def at_kept(target: Tensor, keep: Tensor) -> Tensor:
        """The teacher's CLS and its tokens at the student's kept patches: ``[B, 1 + K, width]``."""
        patches = target[:, 1:].gather(1, keep[..., None].expand(-1, -1, target.shape[-1]))
        return torch.cat([target[:, :1], patches], dim=1)

    def step_losses(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-image alignment losses of a batch under ``masks [B, h, w]``, and those of GCR's auxiliary branch
        (training with a block in ``auxiliary`` mode; else None)."""
        keep = kept_indices(masks).to(images.device)
        teacher_tokens = self.teacher_tokens(images)
        target = self.at_kept(teacher_tokens, keep)
        student = self.student_tokens(images, keep)
        losses = self.alignment_loss(self.projection(student), target)
        if hasattr(self, "joint_head"):  # UTA's own head, aligned to the teacher's image embedding
            embedding = self.teacher_embeddings(teacher_tokens[:, 0])
            losses = losses + self.alignment_loss(self.joint_head(student[:, :1]).float(), embedding[:, None])
        auxiliary = self.auxiliary_tokens()
        if auxiliary is None:
            return losses, None
        return losses, self.alignment_loss(self.projection(self.backbone.norm(auxiliary)), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        rng = np.random.default_rng(int(torch.randint(2**62, ())))  # the step's masks, from the seeded stream
        masks = torch.from_numpy(np.stack([self.draw_mask(rng) for _ in range(len(batch["image"]))]))
        losses, aux_losses = self.step_losses(batch["image"], masks)
        loss = losses.mean()
        if aux_losses is not None:  # GCR: loss_main + aux_weight * loss_aux
            self.log_dict({"train_loss_main": loss, "train_loss_aux": aux_losses.mean()}, batch_size=len(losses))
            loss = loss + self.llm_config.aux_weight * aux_losses.mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(losses))
        return self.finite_loss(loss, batch, batch_idx)

    # -- zero-shot -----------------------------------------------------------------------------
    def image_embeddings(self, images: Tensor) -> Tensor:
        """The student's normalised embeddings ``[B, E]`` in the teacher's joint space: its CLS token (whole
        image) through its own ``joint_head`` (``zeroshot_head: own``) or through ``projection`` and the
        teacher's own projection."""
        cls = self.student_tokens(images)[:, 0]
        if hasattr(self, "joint_head"):
            return F.normalize(self.joint_head(cls).float(), dim=-1)
        return F.normalize(self.teacher_embeddings(self.projection(cls)), dim=-1)

    def teacher_embeddings(self, cls_tokens: Tensor) -> Tensor:
        """CLS tokens at the teacher's width through the teacher's projection: ``[B, E]`` in float32."""
        self.teacher.to(cls_tokens.device)
        return self.teacher.project(cls_tokens.to(next(self.teacher.parameters()).dtype)).float()

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The student's zero-shot embedding of whole images (:meth:`image_embeddings`), its inference; the
        teacher's tower, a training-time target, does not run."""
        return self.image_embeddings, (batch["image"][:samples],)

    @torch.no_grad()
    def teacher_image_embeddings(self, images: Tensor) -> Tensor:
        """The teacher's normalised embeddings ``[B, E]`` of the whole images, for its own zero-shot metrics."""
        return F.normalize(self.teacher_embeddings(self.teacher_tokens(images)[:, 0]), dim=-1)

    @torch.no_grad()
    def zeroshot_classifier(self, class_names: list[str]) -> Tensor:
        """``[C, E]``: per class, the normalised mean of the normalised text embeddings of its prompts (CLIP's)."""
        templates = zeroshot_templates(self.hparams.zeroshot_templates)
        self.teacher.to(self.device)
        rows = []
        for name in class_names:
            embeddings = F.normalize(self.teacher.encode_texts([t(name) for t in templates]).float(), dim=-1)
            rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
        return torch.stack(rows)

    def class_names(self) -> list[str] | None:
        """The zero-shot class names: ``zeroshot_class_names``' file, else the datamodule's ``classes``."""
        path = self.hparams.zeroshot_class_names
        if path == "imagenet":
            from open_clip import IMAGENET_CLASSNAMES

            names = list(IMAGENET_CLASSNAMES)
            if self.hparams.num_classes not in (None, len(names)):
                raise ValueError(f"--model.zeroshot_class_names imagenet names {len(names)} classes; the data has {self.hparams.num_classes}.")
            return names
        if path is None:
            classes = getattr(self.trainer.datamodule, "classes", None)
            if classes is not None and self.hparams.num_classes not in (None, len(classes)):
                raise ValueError(f"The data names {len(classes)} classes, but model.num_classes is {self.hparams.num_classes}.")
            return None if classes is None else [str(c) for c in classes]
        text = Path(path).read_text()
        names = json.loads(text) if path.endswith(".json") else [line.strip() for line in text.splitlines() if line.strip()]
        expected = self.hparams.num_classes or len(names)
        if len(names) != expected:
            raise ValueError(f"--model.zeroshot_class_names {path} names {len(names)} classes; the data has {expected}.")
        return names

    def _start_evaluation(self, stage: str) -> None:
        self._classifier, self._retrieval = None, None
        if not self.hparams.zeroshot:
            return
        datamodule = self.trainer.datamodule
        names = self.class_names()
        if names is not None:
            self._classifier = self.zeroshot_classifier(names)
            self._accuracy = {who: {k: MulticlassAccuracy(len(names), top_k=min(k, len(names)), average="micro").to(self.device) for k in (1, 5)}
                              for who in self._who()}  # fmt: skip
        elif hasattr(datamodule, "captions"):
            texts, owners = datamodule.captions(stage)
            with torch.no_grad():
                self.teacher.to(self.device)
                embeddings = torch.cat([self.teacher.encode_texts(texts[i : i + 256]).float() for i in range(0, len(texts), 256)])
            self._retrieval = {"texts": F.normalize(embeddings, dim=-1), "owners": owners.to(self.device),
                               "rows": {who: [] for who in self._who()}, "index": []}  # fmt: skip

    def _who(self) -> tuple[str, ...]:
        return ("student", "teacher") if self.hparams.zeroshot_teacher else ("student",)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if not self._log_unreadable(batch, stage):
            return
        images = batch["image"]
        if "index" not in batch:  # an image dataset: the alignment loss on fixed masks
            losses, _ = self.step_losses(images, self.evaluation_masks(batch["id"]))
            (losses,) = self.scored(batch, losses)
            if len(losses):
                getattr(self, f"{stage}_loss").update(losses)
                self.log(f"{stage}_loss", getattr(self, f"{stage}_loss"), batch_size=len(losses))
        embeddings = {"student": self.image_embeddings(images)}
        if self.hparams.zeroshot_teacher and (self._classifier is not None or self._retrieval is not None):
            embeddings["teacher"] = self.teacher_image_embeddings(images)
        if self._classifier is not None and "label" in batch:
            for who in self._who():
                logits = self.teacher.logit_scale().float() * embeddings[who] @ self._classifier.T
                scored_logits, labels = self.scored(batch, logits, batch["label"])
                if not len(labels):  # the batch only evened out the processes' shares
                    continue
                for metric in self._accuracy[who].values():
                    metric.update(scored_logits, labels)
        elif self._retrieval is not None:
            index = batch["index"].clone()
            if "padding" in batch:
                index[batch["padding"].bool()] = -1
            self._retrieval["index"].append(index.to(self.device))
            for who in self._who():
                self._retrieval["rows"][who].append(embeddings[who] @ self._retrieval["texts"].T)

    def _finish_evaluation(self, stage: str) -> None:
        prefix = {"student": f"{stage}_zeroshot", "teacher": f"{stage}_teacher_zeroshot"}
        if self._classifier is not None:
            for who in self._who():
                for k, metric in self._accuracy[who].items():
                    self.log(f"{prefix[who]}_acc{k}", metric.compute(), prog_bar=stage == "val" and k == 1 and who == "student")
        elif self._retrieval is not None and self._retrieval["index"]:
            index = torch.cat(self._retrieval["index"])
            if self.trainer.world_size > 1:
                index = self.all_gather(index).flatten(0, 1)
            for who in self._who():
                scores = torch.cat(self._retrieval["rows"][who])
                if self.trainer.world_size > 1:
                    scores = self.all_gather(scores).flatten(0, 1)
                recalls = split_recalls(index, scores, self._retrieval["owners"], stage, warn=not self.trainer.sanity_checking)
                self.log_dict({f"{prefix[who]}_{name}": value for name, value in recalls.items()})
        self._classifier, self._retrieval = None, None

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")
