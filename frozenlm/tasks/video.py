"""Video classification with VideoMAE and a frozen LM block (LM4VE's SSv2 experiment)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from frozenlm.llm import LLMConfig
from frozenlm.models.videomae import VideoMAEClassifier, VideoMAEClassifierConfig
from frozenlm.tasks.classification import ClassificationTask


class VideoClassifier(ClassificationTask):
    """VideoMAE fine-tuning (the model: `VideoMAEClassifier`, encoder tokens
    -> [frozen LM block] -> mean pooling -> fc_norm -> head) with VideoMAE's recipe.

    With an `llm` block in the default `inline` mode this is LM4VE on video: all 1568 tokens of a
    16-frame 224 px clip go through Linear -> frozen LM block -> Linear after the last encoder layer,
    before pooling. With `llm.mode: auxiliary` it is GCR: the same tokens also go through the block
    to an auxiliary head (pooled the same way) during training only; inference is the plain VideoMAE.
    `llm: null` is the VideoMAE baseline. Which LM layer: `llm.layers` (the paper says the last,
    `[-1]`; its public code used `[15]`).

    Inputs: `video [B, 3, T, H, W]`; evaluation batches may carry views, `[B, V, 3, T, H, W]`
    (clips x crops), whose softmax outputs are averaged.

    Recipe defaults (VideoMAE on SSv2, ViT-S): lr 1e-3 per 256 clips, layer decay 0.7 (ViT-B: 5e-4,
    0.75), warmup 5 epochs, wd 0.05, mixup 0.8, cutmix 1.0, label smoothing 0.1.

    Args:
        backbone: `small` (ViT-S) or `base` (ViT-B); a pretrained checkpoint must match it.
        num_classes: number of classes (linked from the datamodule by the CLI).
        num_frames: frames per clip (tubelet 2: `num_frames / 2` temporal tokens).
        img_size: clip side in pixels.
        pretrained: MAE-pretrained VideoMAE weights: a local Hugging Face folder or a hub id (see
            [`create_videomae`][frozenlm.models.create_videomae]); None = random init.
        pretrained_revision: hub revision of `pretrained`.
        backbone_config: further `VideoMAEConfig` fields (e.g. tiny widths, dropout rates).
        head_init_scale: the head's truncated-normal (std 0.02) weights are scaled by this (VideoMAE: 0.001).
        drop_path_rate: stochastic depth of the last encoder layer, linear from 0 (VideoMAE: 0.1).
        llm: the frozen LM block (see [`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
        label_smoothing, mixup, cutmix, mixup_switch_prob: as [`ImageClassifier`][frozenlm.tasks.ImageClassifier];
            mixup and cutmix mix whole clips (one box for all frames).
        lr, lr_reference_batch, layer_decay, min_lr, warmup_epochs, **kwargs: optimisation recipe, see
            [`BaseTask`][frozenlm.tasks.BaseTask].

    Examples:
        >>> from frozenlm.tasks import VideoClassifier
        >>> task = VideoClassifier(backbone="small", num_classes=174, pretrained=None)  # doctest: +SKIP

        From the command line: `frozenlm fit --config configs/ssv2_videomae_small_llama.yaml --data.root data/ssv2`.
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

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> VideoMAEClassifier:
        """The plain VideoMAE classifier of these hyper-parameters (no trainer needed)."""
        return VideoMAEClassifier(VideoMAEClassifierConfig.from_hparams(hparams))

    def configure_models(self) -> None:
        self.model = self.build_model(self.hparams)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer-decay groups (read by `create_optimizer_v2`): the model's, under `model.`."""
        return {k: _prefixed(v) for k, v in self.model.group_matcher(coarse).items()}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.model(video)

    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """The forward on one clip per sample: the first view of a multi-view test batch."""
        video = batch[self.input_key][:samples]
        return self.model, (video[:, 0] if video.ndim == 6 else video,)

    def class_probabilities(self, video: torch.Tensor) -> torch.Tensor:
        """Class probabilities, averaged over the views of `[B, V, 3, T, H, W]` inputs."""
        if video.ndim == 5:
            return self(video).softmax(dim=-1)
        batch, views = video.shape[:2]
        return self(video.flatten(0, 1)).softmax(dim=-1).view(batch, views, -1).mean(dim=1)

    def mix(self, video: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/cutmix of whole clips: frames folded into channels, so one box cuts every frame."""
        mixed, targets = super().mix(video.flatten(1, 2), targets)
        return mixed.view(len(mixed), *video.shape[1:]), targets


def _prefixed(pattern: Any) -> Any:
    """A timm group-matcher pattern (a regex, or a list of `(regex, ...)`) anchored under `model.`."""
    if isinstance(pattern, str):
        return pattern.replace("^", r"^model\.", 1)
    return [(_prefixed(regex), *rest) for regex, *rest in pattern]
