"""VideoMAE video transformers (Tong et al., NeurIPS 2022) from transformers, set up for fine-tuning.

The encoder is transformers' ``VideoMAEModel``: cube embedding of 2x16x16 tubelets (16 frames at 224 px
give 8 x 14 x 14 = 1568 tokens), fixed sinusoidal positions, no CLS token. Fine-tuning pools the tokens
by their mean and normalises the pooled vector (``fc_norm``), so the encoder is always built with
``use_mean_pooling=True`` (no final per-token norm); MAE-pretraining checkpoints ship
``use_mean_pooling: false`` and their final norm is dropped, as in VideoMAE's own fine-tuning.
transformers' layers have no stochastic depth, which VideoMAE fine-tunes with (drop path 0.1): it is
added to each layer's two residual branches by forward hooks (:func:`add_stochastic_depth`), so the
transformers model and its checkpoints stay as they are.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn
from transformers import VideoMAEConfig, VideoMAEModel

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
        size: ``small`` (ViT-S, width 384) or ``base`` (ViT-B, width 768).
        num_frames: frames per clip (the positions are sinusoidal, so any multiple of the tubelet works
            with pretrained weights).
        image_size: clip side in pixels.
        pretrained: a local Hugging Face VideoMAE folder (``save_pretrained`` output) or a hub id, e.g.
            ``MCG-NJU/videomae-base-ssv2`` (MAE-pretrained on SSv2) or
            ``MCG-NJU/videomae-small-finetuned-kinetics``. Encoder weights of ``VideoMAEModel``,
            ``VideoMAEForPreTraining`` and ``VideoMAEForVideoClassification`` checkpoints all load;
            the decoder, final norm and heads are reported and dropped. A checkpoint lacking encoder
            tensors is an error, never a silently random encoder. Checkpoints of VideoMAE's own
            repository (``.pth``) must first be converted with transformers' VideoMAE conversion script.
        revision: hub revision of ``pretrained``.
        drop_path_rate: stochastic depth of the last layer, rising linearly from 0 at the first
            (VideoMAE fine-tuning: 0.1).
        **overrides: other ``VideoMAEConfig`` fields (e.g. tiny widths for tests, dropout rates).
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
    """timm's ``DropPath`` on the attention and MLP branches of every layer, before their residual sums,
    with rates ``linspace(0, rate, depth)`` as VideoMAE. Each layer's module is ``layer.drop_path``."""
    layers = model.encoder.layer
    for layer, layer_rate in zip(layers, torch.linspace(0, rate, len(layers)).tolist()):
        layer.drop_path = DropPath(layer_rate)
        # The attention module returns its branch; the MLP branch ends in `output.dropout`, and
        # `output` adds the residual after it.
        layer.attention.register_forward_hook(partial(_drop_branch, layer.drop_path))
        layer.output.dropout.register_forward_hook(partial(_drop_branch, layer.drop_path))


def _drop_branch(drop_path: nn.Module, module: nn.Module, args: tuple, branch: torch.Tensor) -> torch.Tensor:
    return drop_path(branch)


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
