"""Unmasked Token Alignment (UTA; Liu et al., TMLR 2024): a ViT student ([`UTAStudent`][frozenlm.models.uta.UTAStudent])
that sees only the unmasked patches of an image learns to produce, at those positions and at CLS, the final tokens
of a frozen CLIP vision tower that sees the whole image; it then works with the teacher's text tower zero-shot
(`zeroshot`) and starts fine-tuning (`ImageClassifier --model.init_from`).

Only UTA's inference code is public. From the paper: only the kept tokens enter the student (no mask token),
reversed block-wise masks at ratio 0.4 (base) / 0.5 (large), targets at the same positions, CLS included, CLIP's
zero-shot. Ours where it is silent: the cosine loss on the teacher's final-norm tokens (before its projection), a
projection only when the widths differ, masks drawn per image in the training process, and how the `own`
zero-shot head (UTA's released student's) is trained: aligned to the teacher's image embedding (docs/uta.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from frozenlm.errors import ConfigurationError
from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.models.clip_teacher import load_teacher
from frozenlm.models.masking import draw_mask, kept_indices
from frozenlm.models.patch_embed import CAPEConfig, Stem
from frozenlm.models.uta import UTAStudent, UTAStudentConfig
from frozenlm.models.vit import PosEmbed, ViTConfig
from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.zeroshot import CLIP_TEMPLATES, TEMPLATE_SETS, ZeroShotScores, check_templates, class_names
from frozenlm.tasks.zeroshot import zeroshot_templates

__all__ = ["CLIP_TEMPLATES", "TEMPLATE_SETS", "UnmaskedTokenAlignment", "zeroshot_templates"]
Masking = Literal["reversed_block", "block", "random"]
AlignmentLoss = Literal["cosine", "smooth_l1", "mse"]


class UnmaskedTokenAlignment(FrozenLMMixin, BaseTask):
    """UTA pretraining of a ViT student (`self.model`) against a frozen CLIP teacher, with zero-shot evaluation.

    Training: per image, `mask_ratio` of the patches are masked (`masking`); the student's tokens of CLS and the
    kept patches, through `projection`, are aligned to the teacher's final tokens there (`loss`). The teacher
    is frozen, runs under `no_grad` once per batch, and stays out of the module tree (checkpoints, optimizer).
    Evaluation (whole images): the loss on fixed masks (`<stage>_loss`), and `<stage>_zeroshot_acc1/5` on class
    names or `<stage>_zeroshot_ir_r1`... on captions (Flickr30k); `<stage>_teacher_zeroshot_...` the teacher's.

    Args:
        teacher: a Hugging Face CLIP folder or hub id, or `open_clip:<architecture>/<pretrained>`.
        teacher_revision: hub revision of a Hugging Face teacher.
        teacher_dtype: the teacher's weights and inputs (`bfloat16` on GPUs halves its cost).
        backbone: the student, a timm ViT name; its patch grid is the teacher's at the teacher's patch size (the
            teacher's input is resized to match).
        img_size, patch_size, drop_path_rate, backbone_kwargs, stem, stem_channels, stem_strides, stem_removed_blocks, pos_embed, cape: as
            [`ImageClassifier`][frozenlm.tasks.ImageClassifier] (the student's [`ViTConfig`][frozenlm.models.ViTConfig]).
        llm, llm_position: a frozen LM block after the student's block `llm_position`, as
            [`ImageClassifier`][frozenlm.tasks.ImageClassifier]'s (GCR's branch follows `llm.aux_head`).
        projection: the head to the teacher's width: `auto` (linear when the widths differ), `linear`, `mlp`
            or `none` ([`UTAStudentConfig`][frozenlm.models.uta.UTAStudentConfig]).
        zeroshot_head: how the student's CLS reaches the joint space: `teacher` (through `projection` and the
            teacher's projection) or `own` (UTA's: a linear head of the student's, trained to the teacher's image embedding).
        mask_ratio: fraction of the patches masked (UTA: 0.4 base, 0.5 large).
        masking: `reversed_block` (UTA: the kept patches form blocks), `block` (BEiT) or `random`.
        loss: `cosine` (1 - cosine similarity per token), `smooth_l1` or `mse`, averaged over tokens.
        zeroshot: evaluate zero-shot when the data names classes or captions (off for pretraining data).
        zeroshot_templates: prompts with one `{}`, `clip7` or `openai_imagenet` (`zeroshot`).
        zeroshot_class_names: a file of class names, or `imagenet`; default the datamodule's `classes`.
        zeroshot_teacher: score the teacher's zero-shot metrics beside the student's.
        num_classes: classes of the zero-shot evaluation (linked from the datamodule by the CLI).
        lr, lr_reference_batch, weight_decay, warmup_epochs, min_lr, **kwargs: see [`BaseTask`][frozenlm.tasks.uta.BaseTask]
            (UTA: AdamW 1.5e-3 at batch 4096, wd 0.05, 1 warmup epoch, cosine to 1e-5).

    Examples:
        From the command line (pretraining against a frozen CLIP teacher, then zero-shot):
        `frozenlm fit --config configs/imagenet21k_uta_base.yaml --data.root data/imagenet21k`.
        The offline miniature: `frozenlm fit --config configs/demo_uta.yaml`.
    """

    # Zero-shot top-1; a run without zero-shot evaluation (`zeroshot: false`) keeps the best alignment loss instead.
    monitor, monitor_mode = "val_zeroshot_acc1", "max"

    def __init__(
        self,
        teacher: str, teacher_revision: str | None = None, teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        # the student (models.uta.UTAStudentConfig: its ViT, LM block and heads)
        backbone: str = "vit_base_patch16_224", img_size: int | None = None, patch_size: int | None = None,
        drop_path_rate: float = 0.1, backbone_kwargs: dict[str, Any] | None = None, stem: Stem = "patch",
        stem_channels: list[int] | None = None, stem_strides: list[int] | None = None, stem_removed_blocks: int = 1,
        pos_embed: PosEmbed = "learn", cape: CAPEConfig | None = None, llm: LLMConfig | None = None, llm_position: int = -1,
        projection: Literal["auto", "linear", "mlp", "none"] = "auto", zeroshot_head: Literal["teacher", "own"] = "teacher",
        # the alignment
        mask_ratio: float = 0.4, masking: Masking = "reversed_block", loss: AlignmentLoss = "cosine",
        # the zero-shot evaluation
        zeroshot: bool = True, zeroshot_templates: list[str] | str | None = None, zeroshot_class_names: str | None = None,
        zeroshot_teacher: bool = True, num_classes: int | None = None,
        # the optimisation (BaseTask)
        lr: float = 1.5e-3, lr_reference_batch: int = 4096, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
        min_lr: float = 1e-5, **kwargs: Any,
    ) -> None:  # fmt: skip
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        check_templates(zeroshot_templates)
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            min_lr=min_lr, **kwargs,
        )  # fmt: skip
        self._zeroshot: ZeroShotScores | None = None
        if not zeroshot:  # no zero-shot accuracy is logged: the best checkpoint is the lowest alignment loss
            self.monitor, self.monitor_mode = "val_loss", "min"

    @staticmethod
    def build_model(hparams: Mapping[str, Any], teacher_width: int | None = None, joint_dim: int | None = None,
                    **context: Any) -> UTAStudent:  # fmt: skip
        """The student from the hyper-parameters; the teacher's token width and joint dimension from `context` or
        else from its architecture alone (built on the meta device: no weights read)."""
        hp = dict(hparams)
        if teacher_width is None or (joint_dim is None and hp.get("zeroshot_head") == "own"):
            teacher = load_teacher(hp["teacher"], hp.get("teacher_revision"), weights=False)
            teacher_width, joint_dim = teacher.width, teacher.joint_dim
        return UTAStudent(UTAStudentConfig(
            vit=ViTConfig.from_hparams(hp, num_classes=0), teacher_width=teacher_width,
            joint_dim=joint_dim, llm=hp.get("llm"), llm_position=hp.get("llm_position", -1),
            projection=hp.get("projection", "auto"), zeroshot_head=hp.get("zeroshot_head", "teacher"),
        ))  # fmt: skip

    def configure_models(self) -> None:
        hp = self.hparams
        teacher = load_teacher(hp.teacher, hp.teacher_revision).to(getattr(torch, hp.teacher_dtype))
        object.__setattr__(self, "teacher", teacher)  # out of the module tree: no checkpoint, no optimizer
        self.model = self.build_model(hp, teacher_width=teacher.width, joint_dim=teacher.joint_dim)
        patches = self.model.grid[0] * self.model.grid[1]
        if round(hp.mask_ratio * patches) >= patches:  # the student would see CLS alone: nothing to align
            raise ValueError(
                f"--model.mask_ratio {hp.mask_ratio} masks all {patches} patches of the student's {self.model.grid[0]} x "
                f"{self.model.grid[1]} grid; keep at least one: a ratio below {(patches - 0.5) / patches:.4g}."
            )

    def configure_metrics(self) -> None:
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # keys moved under model. first
        state = checkpoint["state_dict"]
        if hasattr(self.model, "aux_head") and not any(k.startswith("model.aux_head.") for k in state):
            raise ConfigurationError(
                "This UTA checkpoint's GCR branch has no head of its own: it was trained before UTA followed llm.aux_head "
                "(its branch went through the student's norm and projection). Load it with --model.llm.aux_head shared."
            )

    # -- masks ---------------------------------------------------------------------------------
    def draw_mask(self, rng: np.random.Generator) -> np.ndarray:
        """An `[h, w]` mask (True = masked) of `round(mask_ratio * h * w)` patches."""
        return draw_mask(self.hparams.masking, self.model.grid, self.hparams.mask_ratio, rng)

    def evaluation_masks(self, ids: list[str]) -> Tensor:
        """One fixed mask per image, drawn from its id: the same on any number of processes and batch sizes."""
        return torch.from_numpy(np.stack([self.draw_mask(np.random.default_rng(zlib.crc32(str(i).encode()))) for i in ids]))

    # -- the teacher ---------------------------------------------------------------------------
    def teacher_tokens(self, images: Tensor) -> Tensor:
        """The teacher's final tokens `[B, 1 + N, width]` (float32) of the whole images, taken as the data gives them."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return self.teacher.image_tokens(images, self.model.grid[0], getattr(datamodule, "mean", None), getattr(datamodule, "std", None))

    @torch.no_grad()
    def teacher_image_embeddings(self, images: Tensor) -> Tensor:
        """The teacher's normalised embeddings `[B, E]` of the whole images, for its own zero-shot metrics."""
        return F.normalize(self.teacher.embed(self.teacher_tokens(images)[:, 0]), dim=-1)

    # -- alignment -----------------------------------------------------------------------------
    def alignment_loss(self, predicted: Tensor, target: Tensor) -> Tensor:
        """Per-image loss `[B]`, averaged over its tokens."""
        kind = self.hparams.loss
        if kind == "cosine":
            return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean(dim=1)
        reduce = F.smooth_l1_loss if kind == "smooth_l1" else F.mse_loss
        return reduce(predicted, target, reduction="none").mean(dim=(1, 2))

    @staticmethod
    def at_kept(target: Tensor, keep: Tensor) -> Tensor:
        """The teacher's CLS and its tokens at the student's kept patches: `[B, 1 + K, width]`."""
        patches = target[:, 1:].gather(1, keep[..., None].expand(-1, -1, target.shape[-1]))
        return torch.cat([target[:, :1], patches], dim=1)

    def step_losses(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-image alignment losses of a batch under `masks [B, h, w]`, and those of GCR's branch (training
        with a block in `auxiliary` mode; else None)."""
        keep = kept_indices(masks).to(images.device)
        teacher_tokens = self.teacher_tokens(images)
        target = self.at_kept(teacher_tokens, keep)
        student, branch = self.model(images, keep)
        losses = self.alignment_loss(self.model.projection(student), target)
        if hasattr(self.model, "joint_head"):  # UTA's own head, aligned to the teacher's image embedding
            embedding = self.teacher.embed(teacher_tokens[:, 0])
            losses = losses + self.alignment_loss(self.model.joint_head(student[:, :1]).float(), embedding[:, None])
        return losses, None if branch is None else self.alignment_loss(self.model.project_branch(branch), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        rng = np.random.default_rng(int(torch.randint(2**62, ())))  # the step's masks, from the seeded stream
        masks = torch.from_numpy(np.stack([self.draw_mask(rng) for _ in range(len(batch["image"]))]))
        losses, aux_losses = self.step_losses(batch["image"], masks)
        weight = self.model.llm_config.aux_weight if aux_losses is not None else 0.0
        loss = self.with_auxiliary_loss(losses.mean(), None if aux_losses is None else aux_losses.mean(), weight, len(losses))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(losses))
        return self.finite_loss(loss, batch, batch_idx)

    # -- zero-shot -----------------------------------------------------------------------------
    def image_embeddings(self, images: Tensor) -> Tensor:
        """The student's normalised embeddings `[B, E]` of whole images in the teacher's joint space: its CLS
        through its own `joint_head` (`zeroshot_head: own`) or through `projection` and the teacher's."""
        cls = self.model(images)[0][:, 0]
        if hasattr(self.model, "joint_head"):
            return F.normalize(self.model.joint_head(cls).float(), dim=-1)
        return F.normalize(self.teacher.embed(self.model.projection(cls)), dim=-1)

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The student's zero-shot embedding of whole images, its inference (the teacher does not run)."""
        return self.image_embeddings, (batch["image"][:samples],)

    def _start_evaluation(self, stage: str) -> None:
        hp, datamodule = self.hparams, self.trainer.datamodule
        self._zeroshot = None
        if hp.zeroshot:  # on the data's class names (or zeroshot_class_names), else on its captions, if any
            classes = getattr(datamodule, "classes", None) if hp.zeroshot_class_names is None else None
            names = class_names(hp.zeroshot_class_names, hp.num_classes, classes)
            who = ("student", "teacher") if hp.zeroshot_teacher else ("student",)
            self._zeroshot = ZeroShotScores.start(self.teacher.to(self.device), names, datamodule, stage, who, self.scored,
                                                  hp.zeroshot_templates, warn=not self.trainer.sanity_checking)  # fmt: skip

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if not self._log_unreadable(batch, stage):
            return
        images = batch["image"]
        if "index" not in batch:  # an image dataset: the alignment loss on fixed masks
            (losses,) = self.scored(batch, self.step_losses(images, self.evaluation_masks(batch["id"]))[0])
            if len(losses):
                getattr(self, f"{stage}_loss").update(losses)
                self.log(f"{stage}_loss", getattr(self, f"{stage}_loss"), batch_size=len(losses))
        if self._zeroshot is not None:
            embeddings = {"student": self.image_embeddings(images)}
            if "teacher" in self._zeroshot.who:
                embeddings["teacher"] = self.teacher_image_embeddings(images)
            self._zeroshot.update(batch, embeddings)

    def _finish_evaluation(self, stage: str) -> None:
        if self._zeroshot is not None:
            for name, value in self._zeroshot.compute(stage).items():
                self.log(name, value, prog_bar=name == "val_zeroshot_acc1")
        self._zeroshot = None

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
