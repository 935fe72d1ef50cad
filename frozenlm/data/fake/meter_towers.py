"""Writes METER's two towers, tiny, in Hugging Face format: a CLIP vision transformer (32 px, patch 8,
width 32) and a RoBERTa encoder (width 32) with a byte-level BPE tokenizer trained on the given texts.
Random weights, seeded: the tests exercise loading and the model, not what pretrained towers know."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel, RobertaTokenizer

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8, "projection_dim": 32}  # fmt: skip
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 64}  # fmt: skip
# METER's towers at their real shapes (openai/clip-vit-base-patch32, FacebookAI/roberta-base config.json):
# `write(..., **BASE)` (random weights; the vocabulary is the BPE trained on the texts, not RoBERTa's 50,265).
BASE = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 32, "projection_dim": 512},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "max_position_embeddings": 514},
}  # fmt: skip


def write(root: Path, texts: list[str], seed: int = 0, vision: dict | None = None, text: dict | None = None) -> tuple[Path, Path]:
    """`(vision folder, text folder)` under `root`; `vision`, `text`: other tower shapes (default tiny)."""
    root = Path(root)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(**(vision or TINY_VISION)))
    vision.save_pretrained(root / "clip")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    (root / "bpe").mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(root / "bpe"))  # vocab.json and merges.txt (after a "#version" line)
    merges = [tuple(line.split()) for line in (root / "bpe" / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)
    tokenizer.save_pretrained(root / "roberta")
    text = RobertaModel(RobertaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **(text or TINY_TEXT),
    ), add_pooling_layer=False)  # fmt: skip
    text.save_pretrained(root / "roberta")
    return root / "clip", root / "roberta"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write the towers into")
    print(write(parser.parse_args().root, ["a red square", "what color is the circle?"]))
