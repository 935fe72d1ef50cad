"""VideoMAE video transformers (Tong et al., NeurIPS 2022) from transformers, set up for fine-tuning.

The encoder is transformers' `VideoMAEModel`: cube embedding of 2x16x16 tubelets (16 frames at 224 px
give 8 x 14 x 14 = 1568 tokens), fixed sinusoidal positions, no CLS token. Fine-tuning pools the tokens
by their mean and normalises the pooled vector (`fc_norm`), so the encoder is always built with
`use_mean_pooling=True` (no final per-token norm); MAE-pretraining checkpoints ship
`use_mean_pooling: false` and their final norm is dropped, as in VideoMAE's own fine-tuning.
transformers' layers have no stochastic depth, which VideoMAE fine-tunes with (drop path 0.1): each
layer is replaced by `VideoMAEDropPathLayer`, whose forward is transformers' written out with
timm's `DropPath` on the two residual branches; it keeps the layer's own submodules (and their names),
so the weights and checkpoints stay as they are.

`VideoMAEClassifier` is the fine-tuned model: encoder tokens -> [frozen LM block] -> mean pooling
-> `fc_norm` -> head, built from a `VideoMAEClassifierConfig`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn
from transformers import VideoMAEConfig, VideoMAEModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.videomae.modeling_videomae import VideoMAELayer

from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.models.config import FromHParams

log = logging.getLogger(__name__)

# The encoder widths of VideoMAE's ViT-S and ViT-B (tubelet 2, patch 16 for both).
VIDEOMAE_SIZES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
# Config fields that fix the shapes of the weights: a pretrained checkpoint must agree on them.
ARCHITECTURE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "patch_size", "tubelet_size", "num_channels", "qkv_bias",
)  # fmt: skip


def create_videomae(
    size: str = "small",
    *,
    num_frames: int = 16,
    image_size: int = 224,
    pretrained: str | None = None,
    revision: str | None = None,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> VideoMAEModel:
    """A VideoMAE encoder for fine-tuning, with random or pretrained weights.

    Args:
        size: `small` (ViT-S, width 384) or `base` (ViT-B, width 768).
        num_frames: frames per clip (the positions are sinusoidal, so any multiple of the tubelet works
            with pretrained weights).
        image_size: clip side in pixels.
        pretrained: a local Hugging Face VideoMAE folder (`save_pretrained` output) or a hub id, e.g.
            `MCG-NJU/videomae-base-ssv2` (MAE-pretrained on SSv2) or
            `MCG-NJU/videomae-small-finetuned-kinetics`. Encoder weights of `VideoMAEModel`,
            `VideoMAEForPreTraining` and `VideoMAEForVideoClassification` checkpoints all load;
            the decoder, final norm and heads are reported and dropped. A checkpoint lacking encoder
            tensors is an error, never a silently random encoder. Checkpoints of VideoMAE's own
            repository (`.pth`) must first be converted with transformers' VideoMAE conversion script.
        revision: hub revision of `pretrained`.
        drop_path_rate: stochastic depth of the last layer, rising linearly from 0 at the first
            (VideoMAE fine-tuning: 0.1).
        **overrides: other `VideoMAEConfig` fields (e.g. tiny widths for tests, dropout rates).
    """
    if size not in VIDEOMAE_SIZES:
        raise ValueError(f"Unknown VideoMAE size {size!r}; choose one of {sorted(VIDEOMAE_SIZES)}.")
    fields = {**VIDEOMAE_SIZES[size], "patch_size": 16, "tubelet_size": 2, **overrides}
    fields.update(num_frames=num_frames, image_size=image_size, use_mean_pooling=True)
    if pretrained is None:
        config = VideoMAEConfig(**fields)
        config._attn_implementation = "sdpa"  # memory-efficient attention over 1568 tokens
        model = VideoMAEModel(config)
    else:
        model = _load_pretrained(pretrained, revision, fields)
    if drop_path_rate > 0:
        add_stochastic_depth(model, drop_path_rate)
    return model


def add_stochastic_depth(model: VideoMAEModel, rate: float) -> None:
    """timm's `DropPath` on the attention and MLP branches of every layer, before their residual sums,
    with rates `linspace(0, rate, depth)` as VideoMAE: each layer becomes a `VideoMAEDropPathLayer`
    holding the same submodules, so the weights (and no random numbers) are touched."""
    layers = model.encoder.layer
    for index, layer_rate in enumerate(torch.linspace(0, rate, len(layers)).tolist()):
        layers[index] = VideoMAEDropPathLayer(layers[index], layer_rate)


class VideoMAEDropPathLayer(VideoMAELayer):
    """transformers' `VideoMAELayer` with stochastic depth: its forward, written out from the layer's own
    submodules, is transformers' with `drop_path` on the attention branch and on the MLP branch (after
    `output`'s dropout), each before its residual sum, as VideoMAE's `Block`. It takes over an existing
    layer's submodules (same names, so the same state-dict keys) instead of creating new ones."""

    def __init__(self, layer: VideoMAELayer, drop_path: float) -> None:
        GradientCheckpointingLayer.__init__(self)  # not VideoMAELayer's: its submodules come from `layer`
        self.chunk_size_feed_forward, self.seq_len_dim = layer.chunk_size_feed_forward, layer.seq_len_dim
        self.attention, self.intermediate, self.output = layer.attention, layer.intermediate, layer.output
        self.layernorm_before, self.layernorm_after = layer.layernorm_before, layer.layernorm_after
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        attention = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = self.drop_path(attention) + hidden_states  # first residual
        mlp = self.intermediate(self.layernorm_after(hidden_states))
        mlp = self.output.dropout(self.output.dense(mlp))  # `output` without its residual sum
        return self.drop_path(mlp) + hidden_states  # second residual


def _load_pretrained(source: str, revision: str | None, fields: dict[str, Any]) -> VideoMAEModel:
    config = VideoMAEConfig.from_pretrained(source, revision=revision)
    disagree = {
        k: (getattr(config, k), fields[k])
        for k in ARCHITECTURE_FIELDS
        if k in fields and getattr(config, k) != fields[k]
    }
    if disagree:
        lines = ", ".join(f"{k}: checkpoint {have}, configured {want}" for k, (have, want) in disagree.items())
        raise ValueError(
            f"The pretrained VideoMAE {source!r} does not match the configured backbone ({lines}); "
            "pick the backbone size of the checkpoint (small/base) or another checkpoint."
        )
    config.update(fields)
    model, info = VideoMAEModel.from_pretrained(
        source, config=config, revision=revision, dtype=torch.float32, attn_implementation="sdpa",
        output_loading_info=True,
    )  # fmt: skip
    missing, mismatched = info.get("missing_keys", []), info.get("mismatched_keys", [])
    if missing or mismatched:
        raise KeyError(
            f"The pretrained VideoMAE {source!r} lacks {len(missing)} encoder tensor(s) (e.g. {sorted(missing)[:3]}) "
            f"and has {len(mismatched)} of another shape (e.g. {list(mismatched)[:3]}): is it a VideoMAE checkpoint "
            "in Hugging Face format?"
        )
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        parts = sorted({key.removeprefix("videomae.").split(".", 1)[0] for key in unexpected})
        log.info(
            "Pretrained VideoMAE %s: dropped %d tensor(s) the fine-tuned encoder does not use (%s): %s",
            source, len(unexpected), ", ".join(parts), unexpected[:8],
        )  # fmt: skip
    return model


@dataclass
class VideoMAEClassifierConfig(FromHParams):
    """A `VideoMAEClassifier`; field names are [`VideoClassifier`][frozenlm.tasks.VideoClassifier]'s flags.

    Attributes:
        backbone: `small` (ViT-S) or `base` (ViT-B); a pretrained checkpoint must match it.
        num_classes: classes of the head.
        num_frames, img_size: clip length and side (see [`create_videomae`][frozenlm.models.videomae.create_videomae]).
        pretrained, pretrained_revision: MAE-pretrained weights (a Hugging Face folder or hub id) and revision.
        backbone_config: further `VideoMAEConfig` fields (e.g. tiny widths, dropout rates).
        head_init_scale: the head's truncated-normal (std 0.02) weights are scaled by this (VideoMAE: 0.001).
        drop_path_rate: stochastic depth of the last encoder layer, linear from 0 (VideoMAE: 0.1).
        llm: the frozen LM block after the encoder ([`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
    """

    backbone: str = "small"
    num_classes: int = 174
    num_frames: int = 16
    img_size: int = 224
    pretrained: str | None = None
    pretrained_revision: str | None = None
    backbone_config: dict[str, Any] | None = None
    head_init_scale: float = 0.001
    drop_path_rate: float = 0.1
    llm: LLMConfig | None = None


class VideoMAEClassifier(nn.Module):
    """VideoMAE fine-tuning: encoder tokens -> [frozen LM block] -> mean pooling -> `fc_norm` -> head.

    `forward_features(video [B, 3, T, H, W])` gives `(tokens [B, N, D], branch)`: the encoder's tokens
    (through the LM block when it is inline, LM4VE) and GCR's branch (the block's output on the same tokens,
    in training only; else None). `forward_head` / `forward_aux_head` are the head and GCR's auxiliary
    head on them; `forward(video)` gives the logits.
    """

    def __init__(self, config: VideoMAEClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.llm_config = LLMConfig(**config.llm) if isinstance(config.llm, dict) else config.llm
        self.backbone = create_videomae(
            config.backbone, num_frames=config.num_frames, image_size=config.img_size, pretrained=config.pretrained,
            revision=config.pretrained_revision, drop_path_rate=config.drop_path_rate, **(config.backbone_config or {}),
        )  # fmt: skip
        dim = self.backbone.config.hidden_size
        self.llm_block = create_block(self.llm_config, dim)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)  # VideoMAE's norms use eps 1e-6
        self.head = nn.Linear(dim, config.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(config.head_init_scale)
        llm = self.llm_config
        if llm is not None and llm.mode == "auxiliary" and llm.aux_head == "separate":  # GCR's own norm + classifier
            self.aux_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, config.num_classes))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer-decay groups: the cube embedding is group 0, encoder layer `i` group `i + 1`; the
        rest (fc_norm, head, LM adapters, auxiliary head) the last, whose lr is not decayed."""
        return {"stem": r"^backbone\.embeddings", "blocks": [(r"^backbone\.encoder\.layer\.(\d+)", None)]}

    def forward_features(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.backbone(pixel_values=video.transpose(1, 2)).last_hidden_state  # HF takes [B, T, 3, H, W]
        return apply_block(self.llm_block, tokens)  # after the encoder, before pooling

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)  # VideoMAE has no CLS token

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.pool(tokens)))

    def forward_aux_head(self, branch: torch.Tensor) -> torch.Tensor:
        """GCR's auxiliary logits: the branch pooled, through its own head, or the model's (`aux_head: shared`)."""
        if self.llm_config.aux_head == "shared":
            return self.forward_head(branch)
        return self.aux_head(self.pool(branch))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(video)[0])
