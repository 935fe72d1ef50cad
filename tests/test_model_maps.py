"""Activation maps at each stage of an ImageClassifier's frozen block, and the last ViT block's CLS attention."""

from __future__ import annotations

import pytest
import torch

from frozenlm.analysis import magnitude_map, pseudo_mask_scores, stage_maps, stage_tokens
from frozenlm.data import DigitsDataModule
from frozenlm.tasks import ImageClassifier

STAGES = ["vit", "adapter_in", "attention", "ffn", "adapter_out", "cls_attention"]


@pytest.fixture(scope="module")
def digits():
    """Eight Digits images at 32 px and their ink masks."""
    data = DigitsDataModule(img_size=32, num_workers=0)
    data.setup("validate")
    images = torch.stack([data.val_set[i]["image"] for i in range(8)])
    return images, images.mean(dim=1) > images.mean()


def classifier(source: str, mode: str = "inline", llm_position: int = -1) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        backbone="vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
        backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
        llm={"checkpoint": source, "mode": mode}, llm_position=llm_position,
    )  # fmt: skip


def after_attention_to_layer_output(layer: torch.nn.Module, family: str, hidden: torch.Tensor) -> torch.Tensor:
    """The FFN sub-layer alone, written out per family, on the residual stream after attention."""
    if family == "bert":
        return layer.feed_forward_chunk(hidden)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@pytest.mark.parametrize(("family", "mode"), [("llama", "inline"), ("bert", "auxiliary")])
def test_stage_tokens_are_read_where_each_stage_ends(family, mode, tiny_llama_checkpoint, minilm_checkpoint, digits):
    model = classifier(str(tiny_llama_checkpoint) if family == "llama" else minilm_checkpoint, mode, llm_position=0)
    images, _ = digits
    tokens, attention = stage_tokens(model, images)
    assert list(tokens) == STAGES[:-1]
    assert model.training  # its mode is restored
    model.eval()  # no drop-path in the expected values
    backbone, block, layer = model.model.backbone, model.model.llm_block, model.model.llm_block.layers[-1]
    with torch.no_grad():
        # `.forward` skips the model's hook, which would put the block's output in place of the ViT's.
        expected_vit = backbone.blocks[0].forward(backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(images))))
        torch.testing.assert_close(tokens["vit"], expected_vit)
        torch.testing.assert_close(tokens["adapter_in"], block.adapter_in(expected_vit))
        torch.testing.assert_close(tokens["ffn"], block.run_layers(tokens["adapter_in"]))
        torch.testing.assert_close(tokens["ffn"], after_attention_to_layer_output(layer, family, tokens["attention"]))
        torch.testing.assert_close(tokens["adapter_out"], block(expected_vit))
    # The recomputed attention equals the weights timm's unfused path forms.
    attn = backbone.blocks[-1].attn
    seen = []
    attn.fused_attn = False
    attn.attn_drop.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    torch.testing.assert_close(attention, seen[0])


def test_maps_on_the_patch_grid_and_pseudo_mask_scores(tiny_llama_checkpoint, digits):
    model = classifier(str(tiny_llama_checkpoint)).eval()
    images, masks = digits
    maps = stage_maps(model, images)
    assert list(maps) == STAGES
    assert set(maps["vit"]) == {"magnitude", "frequency"} and set(maps["cls_attention"]) == {"attention"}
    for kinds in maps.values():
        for value in kinds.values():
            assert value.shape == (8, 4, 4) and value.min() >= 0 and value.max() <= 1
    tokens, _ = stage_tokens(model, images)
    raw = magnitude_map(tokens["ffn"][:, 1:])  # CLS dropped
    low, high = raw.amin(1, keepdim=True), raw.amax(1, keepdim=True)
    torch.testing.assert_close(maps["ffn"]["magnitude"].flatten(1), (raw - low) / (high - low))

    scores = pseudo_mask_scores(maps, masks)
    assert set(scores) == set(STAGES)
    assert all(0 <= s <= 1 for kinds in scores.values() for s in kinds.values())


def test_baseline_has_the_vit_stage_and_the_cls_attention_only(digits):
    torch.manual_seed(0)
    model = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                            backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, llm=None)  # fmt: skip
    assert list(stage_maps(model, digits[0])) == ["vit", "cls_attention"]
