"""Tiny open_clip models of both kinds of vision tower, registered with open_clip (and the trunk with timm) so that
``open_clip.create_model(name)`` builds them offline: ``Tiny-Test-ViT``, open_clip's own VisionTransformer, and
``Tiny-Test-EVA``, a ``TimmModel`` whose trunk is timm's EVA02-CLIP-B (``eva02_base_patch16_clip_224``: rotary
positions, SwiGLU, sub-LN, CLS pooling, its head as the projection, as open_clip's ``EVA02-B-16`` builds it)
shrunk to 2 blocks of width 32. Both: 32 px, patch 8 (a 4 x 4 grid), a 2-layer text tower of width 32."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_EVA_TRUNK = "tiny_test_eva02_clip"
CONFIGS = {
    "Tiny-Test-ViT": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                      "text_cfg": TEXT},
    # EVA02-B-16's vision_cfg with the tiny trunk (open_clip's own config file otherwise).
    "Tiny-Test-EVA": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "timm_model_name": TINY_EVA_TRUNK, "timm_model_pretrained": False,
                                                      "timm_pool": "token", "timm_proj": None},
                      "text_cfg": TEXT, "custom_text": True},
}  # fmt: skip


def register(root: Path) -> list[str]:
    """Register the tiny models (their config files are written under ``root``); their names."""
    import open_clip
    import timm
    from timm.models import register_model

    if TINY_EVA_TRUNK not in timm.list_models(TINY_EVA_TRUNK):

        @register_model
        def tiny_test_eva02_clip(pretrained: bool = False, **kwargs):
            shape = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "ref_feat_shape": (4, 4)}
            return timm.models.eva.eva02_base_patch16_clip_224(pretrained, **{**shape, **kwargs})

    for name, config in CONFIGS.items():
        path = Path(root) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return list(CONFIGS)


def weights(name: str, root: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A seeded random model of ``name`` (eval mode) and its state dict saved as ``root/<name>.pt``."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name).eval()
    path = Path(root) / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return model, path
