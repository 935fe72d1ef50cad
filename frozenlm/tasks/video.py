"""Video classification with VideoMAE and a frozen LM block (LM4VE's SSv2 experiment)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from frozenlm.llm import LLMConfig
from frozenlm.models import create_videomae
from frozenlm.tasks.classification import ClassificationTask


class VideoClassifier(ClassificationTask):
    """VideoMAE fine-tuning: encoder tokens -> [frozen LM block] -> mean pooling -> fc_norm -> head.

    With an ``llm`` block in the default ``inline`` mode this is LM4VE on video: all 1568 tokens of a
    16-frame 224 px clip go through Linear -> frozen LM block -> Linear after the last encoder layer,
    before pooling. With ``llm.mode: auxiliary`` it is GCR: the same tokens also go through the block
    to an auxiliary head (pooled the same way) during training only; inference is the plain VideoMAE.
    ``llm: null`` is the VideoMAE baseline. Which LM layer: ``llm.layers`` (the paper says the last,
    ``[-1]``; its public code used ``[15]``).

    Inputs: ``video [B, 3, T, H, W]``; evaluation batches may carry views, ``[B, V, 3, T, H, W]``
    (clips x crops), whose softmax outputs are averaged.

    Recipe defaults (VideoMAE on SSv2, ViT-S): lr 1e-3 per 256 clips, layer decay 0.7 (ViT-B: 5e-4,
    0.75), warmup 5 epochs, wd 0.05, mixup 0.8, cutmix 1.0, label smoothing 0.1.

    Args:
        backbone: ``small`` (ViT-S) or ``base`` (ViT-B); a pretrained checkpoint must match it.
        num_classes: number of classes (linked from the datamodule by the CLI).
        num_frames: frames per clip (tubelet 2: ``num_frames / 2`` temporal tokens).
        img_size: clip side in pixels.
        pretrained: MAE-pretrained VideoMAE weights: a local Hugging Face folder or a hub id (see
            :func:`frozenlm.models.create_videomae`); None = random init.
        pretrained_revision: hub revision of ``pretrained``.
        backbone_config: further ``VideoMAEConfig`` fields (e.g. tiny widths, dropout rates).
        head_init_scale: the head's truncated-normal (std 0.02) weights are scaled by this (VideoMAE: 0.001).
        drop_path_rate: stochastic depth of the last encoder layer, linear from 0 (VideoMAE: 0.1).
        llm: the frozen LM block (see :class:`frozenlm.llm.LLMConfig`); None for none.
        label_smoothing, mixup, cutmix, mixup_switch_prob: as :class:`frozenlm.tasks.ImageClassifier`;
            mixup and cutmix mix whole clips (one box for all frames).
        lr, lr_reference_batch, layer_decay, min_lr, warmup_epochs, **kwargs: optimisation recipe, see
            :class:`frozenlm.tasks.BaseTask`.
    """

    input_key = "video"

    def __init__(
        self,
        backbone: str = "small",
        num_classes: int = 174,
        num_frames: int = 16,
        img_size: int = 224,
        pretrained: str | None = None,
        pretrained_revision: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        head_init_scale: float = 0.001,
        drop_path_rate: float = 0.1,
        llm: LLMConfig | None = None,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_switch_prob: float = 0.5,
        lr: float = 1e-3,
        lr_reference_batch: int = 256,
        layer_decay: float | None = 0.7,
        min_lr: float = 1e-6,
        warmup_epochs: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, layer_decay=layer_decay, min_lr=min_lr,
            warmup_epochs=warmup_epochs, **kwargs,
        )  # fmt: skip

    def configure_models(self) -> None:
        hp = self.hparams
        self.backbone = create_videomae(
            hp.backbone, num_frames=hp.num_frames, image_size=hp.img_size, pretrained=hp.pretrained,
            revision=hp.pretrained_revision, drop_path_rate=hp.drop_path_rate, **(hp.backbone_config or {}),
        )  # fmt: skip
        dim = self.backbone.config.hidden_size
        self.llm_block = self.build_llm(hp.llm, in_dim=dim)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)  # VideoMAE's norms use eps 1e-6
        self.head = nn.Linear(dim, hp.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(hp.head_init_scale)
        self.configure_auxiliary_head(dim)

    # -- layer-wise lr decay (timm's create_optimizer_v2 reads these) -------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping: the cube embedding is group 0, encoder layer ``i`` group ``i + 1``;
        everything unmatched (fc_norm, head, LM adapters, auxiliary head) falls in the last group, whose
        lr is not decayed."""
        return {"stem": r"^backbone\.embeddings", "blocks": [(r"^backbone\.encoder\.layer\.(\d+)", None)]}

    # -- forward -----------------------------------------------------------------------------
    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens ``[B, N, D]`` of ``video [B, 3, T, H, W]``, through the LM block inline."""
        tokens = self.backbone(pixel_values=video.transpose(1, 2)).last_hidden_state  # HF takes [B, T, 3, H, W]
        return self.llm_tap(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)  # VideoMAE has no CLS token

    def head_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.pool(tokens)))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.tokens(video))

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The forward on one clip per sample: the first view of a multi-view test batch."""
        video = batch[self.input_key][:samples]
        return self, (video[:, 0] if video.ndim == 6 else video,)

    def class_probabilities(self, video: torch.Tensor) -> torch.Tensor:
        """Class probabilities, averaged over the views of ``[B, V, 3, T, H, W]`` inputs."""
        if video.ndim == 5:
            return self(video).softmax(dim=-1)
        batch, views = video.shape[:2]
        return self(video.flatten(0, 1)).softmax(dim=-1).view(batch, views, -1).mean(dim=1)

    def mix(self, video: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/cutmix of whole clips: frames folded into channels, so one box cuts every frame."""
        mixed, targets = super().mix(video.flatten(1, 2), targets)
        return mixed.view(len(mixed), *video.shape[1:]), targets
