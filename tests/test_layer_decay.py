"""``--model.layer_decay`` (timm's layer-wise lr decay) reaches the image classifier's ViT blocks."""

from __future__ import annotations

import warnings

from timm.optim import create_optimizer_v2

from frozenlm.tasks import ImageClassifier

VIT = {"backbone": "deit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "num_classes": 10,
       "backbone_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}  # fmt: skip


def _scales(task, decay: float) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns, and gives one group, when the module has no group_matcher
        optimizer = create_optimizer_v2(task, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in task.named_parameters()}
    return {names[id(p)]: group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_scales_each_vit_block_and_leaves_the_block_adapters_and_head_at_full_lr(tiny_llama_checkpoint):
    task = ImageClassifier(**VIT, llm={"checkpoint": str(tiny_llama_checkpoint)}, layer_decay=0.5)
    scales = _scales(task, 0.5)
    embed, *blocks = (scales[f"model.backbone.{n}"] for n in
                      ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight",
                       "blocks.2.attn.qkv.weight"))  # fmt: skip
    assert embed == 0.5**4 and blocks == [0.5**3, 0.5**2, 0.5**1]  # embed, then blocks 0..2, then the rest at 1
    assert scales["model.backbone.head.weight"] == 1.0 and scales["model.llm_block.adapter_in.weight"] == 1.0
    assert not any("llm_block.layers" in name for name in scales)  # the frozen layers never reach the optimizer
