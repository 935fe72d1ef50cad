"""Activation maps of an ImageClassifier or a PointCloudClassifier at each stage of its frozen LM
block (LM4VE's information filtering).

[`stage_maps`][frozenlm.analysis.model_maps.stage_maps] runs the model on images (or point clouds) and returns, per stage, the magnitude and
frequency maps of `activation_maps` on the patch grid (one value per point group
for clouds; prefix tokens dropped), min-max normalised per input; [`stage_tokens`][frozenlm.analysis.model_maps.stage_tokens] gives the tokens
themselves. Stages, in order (those of
the block only when the model has one):

* `vit`: the tokens after ViT (or Point-BERT) block `llm_position`, where the block takes them;
* `adapter_in`: after `Linear(D -> d_llm)`;
* `attention`: the residual stream after the (last) LM layer's attention sub-layer;
* `ffn`: after its feed-forward sub-layer, i.e. the LM layer's output;
* `adapter_out`: the block's output, after `Linear(d_llm -> D)`;
* `cls_attention` (kind `attention`): the CLS-to-patch (-group) attention of the last block.

Where the residual stream after attention is read depends on the family
(`attention_output`).

timm's fused attention never forms the attention weights, so they are recomputed from the last
block's `qkv` projection (captured by a hook) exactly as timm's `Attention` defines them:
`softmax(q_norm(q) k_norm(k)^T * scale)`.

In GCR (`llm.mode: auxiliary`) models the block is not part of inference; it is run here on the
tokens the trunk gives at `llm_position`, as in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from frozenlm.analysis.activation_maps import (
    cls_attention_map,
    frequency_map,
    magnitude_map,
    minmax_normalize,
    pseudo_mask_iou,
    to_patch_grid,
)
from frozenlm.llm import FrozenLMBlock
from frozenlm.tasks import ImageClassifier, PointCloudClassifier

STAGES = ("vit", "adapter_in", "attention", "ffn", "adapter_out")
MAP_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"magnitude": magnitude_map, "frequency": frequency_map}


def stage_maps(model: ImageClassifier | PointCloudClassifier, inputs: Tensor) -> dict[str, dict[str, Tensor]]:
    """`maps[stage][kind]`: `[B, h, w]` maps in `[0, 1]` for `images [B, 3, H, W]`, or `[B, G]`
    (one value per point group, in the order of the groups' centres) for `points [B, N, 3]`.

    Kinds are `magnitude` and `frequency` for token stages and `attention` for
    `cls_attention` (see the module docstring). The model runs in eval mode; its mode is restored.
    """
    tokens, attention = stage_tokens(model, inputs)
    backbone = _network(model).backbone
    prefix = backbone.num_prefix_tokens
    patch_embed = getattr(backbone, "patch_embed", None)
    # From the input, not the configured size: CAPE models take any resolution.
    grid = tuple(patch_embed.dynamic_feat_size(tuple(inputs.shape[-2:]))) if patch_embed is not None else None
    maps = {
        stage: {kind: _on_grid(fn(value[:, prefix:]), grid) for kind, fn in MAP_FUNCTIONS.items()}
        for stage, value in tokens.items()
    }
    maps["cls_attention"] = {"attention": _on_grid(cls_attention_map(attention, prefix), grid)}
    return maps


@torch.no_grad()
def stage_tokens(model: ImageClassifier | PointCloudClassifier, inputs: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The tokens `[B, N, C]` (prefix tokens included) at each stage, in order, and the last
    block's attention weights `[B, heads, N, N]`, for a batch of inputs in eval mode."""
    network = _network(model)
    backbone, block = network.backbone, network.llm_block
    position = getattr(network, "llm_position", model.hparams.llm_position)  # the model's, normalised
    tokens: dict[str, Tensor] = {}

    def keep(stage: str, kind: str = "output") -> Callable:
        def hook(module, args, output=None):
            value = args[0] if kind == "input" else output
            tokens[stage] = value[0] if isinstance(value, tuple) else value  # some layers return tuples

        return hook

    qkv_module = backbone.blocks[-1].attn.qkv
    handles = [
        # The trunk block's output, before the LM block takes it (prepend: before any hook of a model that
        # still inserts its block with one).
        backbone.blocks[position].register_forward_hook(keep("vit"), prepend=True),
        qkv_module.register_forward_hook(keep("qkv")),
    ]
    if block is not None and block.layers is not None:
        layer = block.layers[-1]
        name, kind = _attention_output(block)
        module = layer.get_submodule(name)
        attention_hook = module.register_forward_pre_hook(keep("attention", kind)) if kind == "input" else None
        handles += [
            block.adapter_in.register_forward_hook(keep("adapter_in")),
            attention_hook or module.register_forward_hook(keep("attention")),
            layer.register_forward_hook(keep("ffn")),
            block.adapter_out.register_forward_hook(keep("adapter_out")),
        ]
    training = model.training
    model.eval()
    try:
        model(inputs)
        if block is not None and "adapter_out" not in tokens:  # GCR: the branch is training-only
            block(tokens["vit"])
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()

    attention = _attention_weights(backbone.blocks[-1].attn, tokens.pop("qkv"))
    return {stage: tokens[stage] for stage in STAGES if stage in tokens}, attention


def _network(model: nn.Module) -> nn.Module:
    """The module holding `backbone` and `llm_block`: the task's `model` (or, until every task holds
    one, the task itself)."""
    network = getattr(model, "model", None)
    return network if isinstance(network, nn.Module) else model


def pseudo_mask_scores(maps: dict[str, dict[str, Tensor]], masks: Tensor) -> dict[str, dict[str, float]]:
    """Mean over images of the best pseudo-mask IoU of each map against `masks [B, H, W]`."""
    return {
        stage: {
            kind: sum(pseudo_mask_iou(m, mask)[0] for m, mask in zip(values, masks)) / len(masks)
            for kind, values in kinds.items()
        }
        for stage, kinds in maps.items()
    }


def _attention_output(block: FrozenLMBlock) -> tuple[str, str]:
    config = block.lm_config
    if config.model_type == "opt" and not config.do_layer_norm_before:
        return "self_attn_layer_norm", "output"  # post-norm OPT normalises the stream after the add
    return block.family.attention_output


def _attention_weights(attn: nn.Module, qkv: Tensor) -> Tensor:
    """timm `Attention`'s weights `[B, heads, N, N]` from its `qkv` projection's output."""
    batch, length, _ = qkv.shape
    q, k, _ = qkv.reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)


def _on_grid(values: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """Min-max normalised maps, on the patch grid for images (`grid`) and per token for point groups."""
    return minmax_normalize(values if grid is None else to_patch_grid(values, grid))
