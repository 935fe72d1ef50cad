"""Writes a tiny CLIP model in Hugging Face format (model and tokenizer), a stand-in for a real CLIP
teacher: a 2-layer vision transformer (32 px, patch 8, width 32) and a 2-layer text transformer with a
byte-level BPE tokenizer trained on the given texts. Random weights, seeded, unless `vision_from` gives
a timm ViT whose weights the vision tower takes (the same function: a teacher identical to a student)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import CLIPConfig, CLIPModel, RobertaTokenizer

# </s> is not token 2: CLIP's text pooling reads the first end-of-text token unless its id is 2.
SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>", "<mask>", "</s>"]
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "hidden_act": "gelu", "layer_norm_eps": 1e-6}  # fmt: skip
# CLIP ViT-B/16's shape (openai/clip-vit-base-patch16's config.json): `write(..., **VIT_B16)`.
VIT_B16 = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16},
    "text_shape": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                   "max_position_embeddings": 77},
    "projection_dim": 512,
}  # fmt: skip


def write(
    root: Path, texts: list[str], seed: int = 0, vision_from: torch.nn.Module | None = None,
    vision: dict | None = None, text_shape: dict | None = None, projection_dim: int = 16,
) -> Path:
    """The model folder `root`. `vision`, `text_shape` (CLIPVisionConfig / CLIPTextConfig entries) and
    `projection_dim` give another shape (default: the tiny one; `VIT_B16` is CLIP ViT-B/16's)."""
    root = Path(root)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    (root / "bpe").mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(root / "bpe"))
    merges = [tuple(line.split()) for line in (root / "bpe" / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": len(tokenizer), "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    text |= text_shape or {}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision or VISION, projection_dim=projection_dim))
    if vision_from is not None:
        model.vision_model.load_state_dict(clip_vision_state(vision_from))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def clip_vision_state(vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm ViT (class token, pre-norm, no patch bias, exact GELU) as the state of transformers'
    `CLIPVisionModel`: the same weights under CLIP's names, q/k/v split from timm's fused qkv."""
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    if "patch_embed.proj.bias" in state:
        raise ValueError("CLIP's patch embedding has no bias: build the ViT with pre_norm=True (timm then has none)")
    clip = {
        "embeddings.class_embedding": state["cls_token"].flatten(),
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "embeddings.position_embedding.weight": state["pos_embed"][0],
        "pre_layrnorm.weight": state["norm_pre.weight"], "pre_layrnorm.bias": state["norm_pre.bias"],
        "post_layernorm.weight": state["norm.weight"], "post_layernorm.bias": state["norm.bias"],
    }  # fmt: skip
    for i in range(len(vit.blocks)):
        timm, hf = f"blocks.{i}.", f"encoder.layers.{i}."
        for name, part in zip("qkv", state[timm + "attn.qkv.weight"].chunk(3)):
            clip[hf + f"self_attn.{name}_proj.weight"] = part
        for name, part in zip("qkv", state[timm + "attn.qkv.bias"].chunk(3)):
            clip[hf + f"self_attn.{name}_proj.bias"] = part
        for ours, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):  # fmt: skip
            for kind in ("weight", "bias"):
                clip[hf + f"{theirs}.{kind}"] = state[timm + f"{ours}.{kind}"]
    return clip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write the model into")
    print(write(parser.parse_args().root, ["a photo of the seven.", "art of the zero."]))


def train_on_digits(root: Path, steps: int = 300, batch_size: int = 100, seed: int = 0, lr: float = 2e-3) -> Path:
    """A tiny CLIP trained contrastively on scikit-learn's digits (1,437 training images at 32 px) with the
    captions CLIP's templates make of their class names: a teacher that knows something, offline, in
    seconds. Images are normalised as CLIP's (what the saved model expects). Returns its folder."""
    from frozenlm.data import DigitsDataModule
    from frozenlm.models.clip_teacher import HuggingFaceCLIPTeacher
    from frozenlm.tasks.uta import CLIP_TEMPLATES

    names = DigitsDataModule.classes
    captions = [template.format(name) for name in names for template in CLIP_TEMPLATES]
    folder = write(root, captions, seed=seed)
    teacher = HuggingFaceCLIPTeacher(str(folder))
    data = DigitsDataModule(batch_size=batch_size, num_workers=0, img_size=32, mean=teacher.mean, std=teacher.std)
    data.setup("fit")
    model = teacher.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    encoded = teacher.tokenizer(captions, padding=True, return_tensors="pt")
    images = torch.stack([data.train_set[i]["image"] for i in range(len(data.train_set))])
    labels = torch.tensor(data.train_set.split.labels)
    for _ in range(steps):
        # One image per class and a random caption of it: the batch's pairs are all distinct classes.
        picks = torch.stack([torch.nonzero(labels == c).squeeze(1)[torch.randint((labels == c).sum(), (batch_size // 10,), generator=generator)]
                             for c in range(10)], dim=1)  # fmt: skip
        for row in picks:
            which = row.new_tensor([c * len(CLIP_TEMPLATES) for c in range(10)]) + torch.randint(len(CLIP_TEMPLATES), (10,), generator=generator)
            out = model(input_ids=encoded["input_ids"][which], attention_mask=encoded["attention_mask"][which],
                        pixel_values=images[row], return_loss=True)  # fmt: skip
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    model.eval().save_pretrained(folder)
    return folder
