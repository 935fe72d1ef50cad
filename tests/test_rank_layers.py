"""`frozenlm rank-layers`: LM layers ranked by linear CKA, loaded one at a time."""

from __future__ import annotations

import pytest
import torch

from frozenlm.analysis import rank_layers
from frozenlm.cli import run
from frozenlm.llm import FrozenLMBlock
from tests.cli_helpers import last_checkpoint, run_cli


@pytest.fixture
def loaded_blocks(monkeypatch) -> list[FrozenLMBlock]:
    """Every block ``FrozenLMBlock.from_pretrained`` builds; each call must ask for a single layer."""
    blocks = []
    original = FrozenLMBlock.from_pretrained

    def spy(source, layers, *args, **kwargs):
        assert len(layers) == 1, f"from_pretrained asked for layers {layers}, not one layer"
        blocks.append(original(source, layers, *args, **kwargs))
        return blocks[-1]

    monkeypatch.setattr(FrozenLMBlock, "from_pretrained", spy)
    return blocks


def test_ranks_every_layer_of_the_tiny_llama_one_at_a_time(tiny_llama_checkpoint, loaded_blocks, capsys):
    rows = rank_layers(
        str(tiny_llama_checkpoint), img_size=16, patch_size=8,
        backbone_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2}, position=0, num_images=8,
    )  # fmt: skip
    assert [row["rank"] for row in rows] == list(range(1, 7))
    assert sorted(row["layer"] for row in rows) == list(range(6))
    scores = [row["cka"] for row in rows]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert len(set(scores)) > 1  # the layers do differ
    assert [block.layer_indices for block in loaded_blocks] == [[i] for i in range(6)]
    # Every candidate sees the same input map, so the ranking compares layers only.
    for block in loaded_blocks[1:]:
        assert torch.equal(block.adapter_in.weight, loaded_blocks[0].adapter_in.weight)
    assert "linear CKA" in capsys.readouterr().out


def test_cli_on_a_trained_checkpoint_with_the_real_minilm(tmp_path, minilm_checkpoint, loaded_blocks, capsys):
    run_cli("fit", "image_baseline", tmp_path)
    run([
        "rank-layers", "--lm_checkpoint", minilm_checkpoint, "--checkpoint", str(last_checkpoint(tmp_path)),
        "--layers", "[0, -1]", "--num_images", "6", "--position", "0",
    ])  # fmt: skip
    assert [block.layer_indices for block in loaded_blocks] == [[0], [5]]
    assert all(block.d_llm == 384 and block.in_dim == 32 for block in loaded_blocks)
    out = capsys.readouterr().out
    assert "linear CKA" in out and "ViT block 1" in out
