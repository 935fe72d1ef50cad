"""Point-BERT's point-cloud transformer as fine-tuned for classification (Yu et al., CVPR 2022).

A cloud is cut into `num_groups` groups: farthest-point-sampled centres and each centre's
`group_size` nearest points, re-centred (`point_ops`). A mini-PointNet embeds
each group (Conv1d 3->128, BN, ReLU, Conv1d 128->256, max-pool; the pooled feature concatenated to
every point's; Conv1d 512->512, BN, ReLU, Conv1d 512->`encoder_dims`, max-pool), a Linear maps it to
the width, a CLS token (zeros) and its position (random normal) lead the sequence, and an MLP of the
centres gives the position embedding, added before every block: `x = block(x + pos)`. The blocks
are timm's (pre-norm, `qkv_bias` False and `nn.LayerNorm`'s eps 1e-5 as Point-BERT's), then a final
LayerNorm. Parameter names
follow Point-BERT's, so its checkpoints load by name (`load_pretrained`).

[`PointBERTClassifier`][frozenlm.models.pointbert.PointBERTClassifier] is the fine-tuned classifier (LM4VE's ScanObjectNN / ModelNet40 model): the
frozen LM block after block `llm_position`, the head on concat(CLS, max over groups), built from a
[`PointBERTClassifierConfig`][frozenlm.models.pointbert.PointBERTClassifierConfig].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.models.config import FromHParams
from frozenlm.models.point_ops import group_points


class PointGroupEncoder(nn.Module):
    """Point-BERT's mini-PointNet: `[B, G, K, 3]` re-centred groups -> `[B, G, out_dim]`.

    The parameters are Point-BERT's (`Conv1d` of kernel 1 and `BatchNorm1d`, so its checkpoints load by
    name), but the forward runs point-major: each kernel-1 convolution as one matmul over all `B * G * K`
    points (`[points, channels]` rows, what `nn.Linear` computes), batch norm on those rows (the same
    statistics as over `[B * G, C, K]`), the max-pools over each group's `K` rows. The same function
    and FLOPs as the channel-major convolutions, without their slower CPU kernels and layout copies.
    """

    def __init__(self, out_dim: int = 256) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1)
        )

    @staticmethod
    def pointwise(layers: nn.Sequential, rows: Tensor) -> Tensor:
        """`layers` (kernel-1 convolutions, batch norms, activations) on `rows [points, channels]`."""
        for layer in layers:
            if isinstance(layer, nn.Conv1d):
                rows = F.linear(rows, layer.weight[..., 0], layer.bias)
            else:  # BatchNorm1d takes [N, C] rows as it takes [N, C, L]; ReLU is elementwise
                rows = layer(rows)
        return rows

    def forward(self, groups: Tensor) -> Tensor:
        batch, num_groups, size, _ = groups.shape
        local = self.pointwise(self.first_conv, groups.reshape(-1, 3)).view(batch * num_groups, size, -1)  # [BG, K, 256]
        pooled = local.max(dim=1, keepdim=True).values
        features = torch.cat([pooled.expand(-1, size, -1), local], dim=-1).view(-1, 2 * local.shape[-1])
        features = self.pointwise(self.second_conv, features).view(batch * num_groups, size, -1)
        return features.max(dim=1).values.reshape(batch, num_groups, -1)


class PointBERT(nn.Module):
    """Point-BERT's transformer over point groups; `forward_features(points [B, N, 3])` gives the
    normalised tokens `[B, 1 + G, D]` (CLS first): `embed` (groups, their tokens and positions), then
    `x = block(x + pos)` for each of `blocks`, then `norm`.

    Args:
        num_groups: FPS centres per cloud (Point-BERT: 64 for 1,024 points, 256 for 4,096, 512 for 8,192).
        group_size: points per group.
        embed_dim: transformer width.
        depth: number of blocks.
        num_heads: attention heads.
        encoder_dims: width of the group encoder's output, mapped to `embed_dim` by `reduce_dim`
            (Point-BERT: 256; Point-MAE: `embed_dim`, where `reduce_dim` is the identity).
        drop_path_rate: stochastic depth of the last block, linear from 0.
    """

    num_prefix_tokens = 1  # the CLS token

    def __init__(
        self,
        num_groups: int = 64,
        group_size: int = 32,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        encoder_dims: int = 256,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_groups, self.group_size, self.embed_dim = num_groups, group_size, embed_dim
        self.encoder = PointGroupEncoder(encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, embed_dim) if encoder_dims != embed_dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(  # Point-BERT's blocks use nn.LayerNorm (eps 1e-5), not timm's default 1e-6
            Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop_path=rate, norm_layer=nn.LayerNorm)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)

    def no_weight_decay(self) -> set[str]:
        """The parameters kept out of weight decay: the CLS token and its position."""
        return {"cls_token", "cls_pos"}

    def group(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """`(neighbourhoods [B, G, K, 3], centres [B, G, 3])` of `points [B, N, 3]`."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"Point clouds must be [batch, points, 3] (x, y, z), got {tuple(points.shape)}.")
        if points.shape[1] < max(self.group_size, self.num_groups):
            raise ValueError(
                f"Clouds of {points.shape[1]} points are too small for {self.num_groups} groups of "
                f"{self.group_size} points: give more points (--data.num_points) or smaller groups."
            )
        return group_points(points, self.num_groups, self.group_size)

    def embed(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """`(tokens, positions)`, both `[B, 1 + G, D]` (CLS first), of `points [B, N, 3]`."""
        groups, centres = self.group(points)
        tokens = self.reduce_dim(self.encoder(groups))
        batch = len(tokens)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], dim=1)
        return x, pos

    def forward_features(self, points: Tensor) -> Tensor:
        """The tokens (CLS, then one per group) of `points [B, N, 3]` after the blocks and the final norm; the
        frozen block is placed by [`PointBERTClassifier`][frozenlm.models.pointbert.PointBERTClassifier]."""
        x, pos = self.embed(points)
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x)


@dataclass
class PointBERTClassifierConfig(FromHParams):
    """A [`PointBERTClassifier`][frozenlm.models.pointbert.PointBERTClassifier]; field names are [`PointCloudClassifier`][frozenlm.tasks.PointCloudClassifier]'s flags.

    Attributes:
        num_classes: classes of the head.
        num_groups, group_size, embed_dim, depth, num_heads, encoder_dims, drop_path_rate: the backbone,
            see [`PointBERT`][frozenlm.models.pointbert.PointBERT].
        head_dropout: dropout of the head's hidden layer (Point-BERT: 0.5).
        pretrained_file: Point-BERT's `Point-BERT.pth` or Point-MAE's `pretrain.pth` to start from.
        llm: the frozen LM block ([`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
        llm_position: index of the block after which the LM block runs (-1: after the last).
    """

    num_classes: int = 40
    num_groups: int = 64
    group_size: int = 32
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    encoder_dims: int = 256
    drop_path_rate: float = 0.1
    head_dropout: float = 0.5
    pretrained_file: str | None = None
    llm: LLMConfig | None = None
    llm_position: int = -1


class PointBERTClassifier(nn.Module):
    """Point-BERT whose tokens (CLS + point groups) pass through a frozen LM block after block
    `llm_position`, before the next block adds the positions again (or the final LayerNorm) (LM4VE); the
    head reads concat(CLS, max over groups).

    `forward_features(points [B, N, 3])` gives `(tokens [B, 1 + G, D], branch)`: the normalised tokens
    and GCR's branch (the block's output on the tokens after block `llm_position`, in training only; else
    None). `forward_head` / `forward_aux_head` are the head and GCR's auxiliary head; `forward(points)`
    gives the logits.
    """

    def __init__(self, config: PointBERTClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.llm_config = LLMConfig(**config.llm) if isinstance(config.llm, dict) else config.llm
        self.backbone = PointBERT(
            num_groups=config.num_groups, group_size=config.group_size, embed_dim=config.embed_dim, depth=config.depth,
            num_heads=config.num_heads, encoder_dims=config.encoder_dims, drop_path_rate=config.drop_path_rate,
        )  # fmt: skip
        if config.pretrained_file:
            load_pretrained(self.backbone, config.pretrained_file)
        depth, dim = len(self.backbone.blocks), config.embed_dim
        if not -depth <= config.llm_position < depth:
            raise IndexError(f"llm_position {config.llm_position} is out of range for a Point-BERT with {depth} blocks.")
        self.llm_position = config.llm_position % depth
        self.llm_block = create_block(self.llm_config, dim)
        self.head = nn.Sequential(
            nn.Linear(2 * dim, 256), nn.ReLU(inplace=True), nn.Dropout(config.head_dropout),
            nn.Linear(256, config.num_classes),
        )  # fmt: skip
        llm = self.llm_config
        if llm is not None and llm.mode == "auxiliary" and llm.aux_head == "separate":  # GCR's own norm + classifier
            self.aux_head = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, config.num_classes))

    def forward_features(self, points: Tensor) -> tuple[Tensor, Tensor | None]:
        x, pos = self.backbone.embed(points)
        branch = None
        for index, block in enumerate(self.backbone.blocks):
            x = block(x + pos)
            if index == self.llm_position:  # the frozen LM block, before the next block adds the positions
                x, branch = apply_block(self.llm_block, x)
        return self.backbone.norm(x), branch

    def pool(self, tokens: Tensor) -> Tensor:
        return torch.cat([tokens[:, 0], tokens[:, 1:].max(dim=1).values], dim=-1)

    def forward_head(self, tokens: Tensor) -> Tensor:
        return self.head(self.pool(tokens))

    def forward_aux_head(self, branch: Tensor) -> Tensor:
        """GCR's auxiliary logits: the branch pooled, through its own head, or through the final norm and the
        model's head (`aux_head: shared`)."""
        if self.llm_config.aux_head == "shared":
            return self.forward_head(self.backbone.norm(branch))
        return self.aux_head(self.pool(branch))

    def forward(self, points: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(points)[0])


# The prefix of the fine-tuned transformer's tensors in each pretraining checkpoint's `base_model`.
PRETRAINED_PREFIXES = {"transformer_q.": "Point-BERT (Point-BERT.pth)", "MAE_encoder.": "Point-MAE (pretrain.pth)"}


def load_pretrained(model: PointBERT, path: str | Path) -> dict[str, list[str]]:
    """Load the official Point-BERT (`Point-BERT.pth`) or Point-MAE (`pretrain.pth`) pretraining
    checkpoint into `model`, as their fine-tuning does: `ckpt["base_model"]`, `module.` stripped,
    the transformer's tensors (Point-BERT's contrastive `cls_head` dropped) by name. Read with
    `weights_only=True`. Logs and returns the loaded / missing / unexpected keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No pretrained point-cloud checkpoint at {path}: download Point-BERT.pth from the Point-BERT "
            "repository (github.com/lulutang0608/Point-BERT) or pretrain.pth from Point-MAE's."
        )
    stored = torch.load(path, map_location="cpu", weights_only=True)
    base = stored.get("base_model") if isinstance(stored, dict) else None
    if not isinstance(base, dict):
        raise ValueError(f"{path} has no `base_model` state dict: it is not a Point-BERT or Point-MAE checkpoint.")
    base = {k.removeprefix("module."): v for k, v in base.items()}
    prefix = next((p for p in PRETRAINED_PREFIXES if any(k.startswith(p) for k in base)), None)
    if prefix is None:
        raise ValueError(
            f"{path} holds neither Point-BERT's `transformer_q.*` nor Point-MAE's `MAE_encoder.*` tensors "
            f"(first keys: {list(base)[:3]}): it is not a supported pretraining checkpoint."
        )
    state = {
        k.removeprefix(prefix).replace("blocks.blocks.", "blocks."): v
        for k, v in base.items()
        if k.startswith(prefix) and not k.startswith(f"{prefix}cls_head")
    }
    own = model.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}  # noqa: E501
    if mismatched:
        raise ValueError(
            f"{path} ({PRETRAINED_PREFIXES[prefix]}) does not fit the configured backbone: "
            + ", ".join(f"{k} {have} vs {want}" for k, (have, want) in list(mismatched.items())[:3])
            + ". Point-MAE's encoder outputs the width directly: set encoder_dims to embed_dim (384)."
        )
    result = model.load_state_dict(state, strict=False)
    summary = {
        "loaded": sorted(set(state) - set(result.unexpected_keys)),
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(result.unexpected_keys),
    }
    rank_zero_info(
        f"Pretrained {PRETRAINED_PREFIXES[prefix]} from {path}: {len(summary['loaded'])} tensors loaded, "
        f"{len(summary['missing'])} missing (trained from scratch: {summary['missing'][:6]}), "
        f"{len(summary['unexpected'])} unexpected ({summary['unexpected'][:6]})."
    )
    return summary
