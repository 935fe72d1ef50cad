"""The newer families (Gemma 3, Qwen3, Phi-3) and multimodal checkpoints (LLaVA-style, Qwen2-VL-style):
the block's layer is transformers' own layer with the checkpoint's weights, and runs as that layer does
under the block's conventions (bidirectional, no rotary, padding mask only), to 1e-6.

The reference runs the transformers model's own layer (SDPA attention, as the block) with an additive float
mask built here (the block passes a boolean one) and the model's own rotary embedding at position 0 for
every token (the identity rotation, which is what "no rotary" means). With eager attention instead the
outputs differ by about 1e-6 (float32 kernels), which is why the reference keeps SDPA.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers

from frozenlm.llm.block import FrozenLMBlock
from frozenlm.llm.checkpoint import LMCheckpoint

NEW_FAMILIES = ["gemma3_text", "qwen3", "phi3"]
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
            vocab_size=128)  # fmt: skip


def reference(layer: torch.nn.Module, rotary: torch.nn.Module, hidden: torch.Tensor, padding: torch.Tensor,
              layer_type: str | None = None) -> torch.Tensor:  # fmt: skip
    """transformers' layer on ``hidden`` with every key visible but the padded ones (an additive float mask),
    every token at position 0 (the model's own rotary embedding there)."""
    batch, length, _ = hidden.shape
    mask = torch.zeros(batch, 1, length, length)
    mask.masked_fill_(padding[:, None, None, :], torch.finfo(torch.float32).min)
    positions = torch.zeros(batch, length, dtype=torch.long)
    args = (layer_type,) if "layer_type" in inspect.signature(rotary.forward).parameters else ()
    cos, sin = rotary(hidden, positions, *args)
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))
    out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


def assert_block_is_the_layers(block: FrozenLMBlock, layers: list[torch.nn.Module], rotary: torch.nn.Module,
                               layer_types: list[str | None]) -> None:  # fmt: skip
    """Same tensors (bit for bit), same outputs (1e-6) with and without padding."""
    assert len(block.layers) == len(layers)
    for ours, theirs in zip(block.layers, layers):
        assert type(ours) is type(theirs)
        expected = theirs.state_dict()
        assert sorted(ours.state_dict()) == sorted(expected)
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, block.d_llm, generator=generator)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    for mask in (None, padding):
        expected = hidden
        for layer, layer_type in zip(layers, layer_types):
            expected = reference(layer, rotary, expected, torch.zeros_like(padding) if mask is None else mask, layer_type)
        with torch.no_grad():
            ours = block.run_layers(hidden, mask)
        valid = ~padding if mask is not None else torch.ones_like(padding)
        torch.testing.assert_close(ours[valid], expected[valid].detach(), atol=1e-6, rtol=1e-6)


# -- newer text families --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_block_is_transformers_layer(lm_checkpoint, tiny_lm, family):
    folder = lm_checkpoint(family, "sharded")
    model = tiny_lm(family)  # the same seeded model the checkpoint holds
    block = FrozenLMBlock.from_pretrained(str(folder), [0, -1], in_dim=16)
    config = model.config
    types = [getattr(config, "layer_types", [None] * config.num_hidden_layers)[i] for i in block.layer_indices]
    layers = [model.model.layers[i] for i in block.layer_indices]
    assert_block_is_the_layers(block, layers, model.model.rotary_emb, types)


def test_gemma3_sliding_window_layers_see_every_token(lm_checkpoint):
    """Gemma 3's window (2 positions here) is not applied: a sliding-window layer is global attention over
    the visual tokens, as the other layers are."""
    block = FrozenLMBlock.from_pretrained(str(lm_checkpoint("gemma3_text", "sharded")), [0], in_dim=16)
    assert block.lm_config.layer_types[0] == "sliding_attention" and block.lm_config.sliding_window == 2
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(1))
    changed = hidden.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        assert (block.run_layers(hidden)[:, 0] - block.run_layers(changed)[:, 0]).abs().max() > 1e-4


def test_random_gemma3_norms_are_unit(tiny_lm):
    """The random-init ablation gives Gemma's (1 + w) RMSNorms w = 0, i.e. unit scale like the others'."""
    block = FrozenLMBlock.from_config(tiny_lm("gemma3_text").config, [0], in_dim=16)
    norms = {n: p for n, p in block.layers.named_parameters() if "norm" in n}
    assert norms and all(torch.equal(p, torch.zeros_like(p)) for p in norms.values())


# -- multimodal checkpoints -------------------------------------------------------------------------------
def tiny_llava() -> torch.nn.Module:
    """LLaVA: a LLaMA text model and a CLIP vision tower with as many `layers` (3) as the language model."""
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                    num_hidden_layers=3, image_size=28, patch_size=14),
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def tiny_qwen2_vl(name: str = "Qwen2VL") -> torch.nn.Module:
    vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
    if name == "Qwen2_5_VL":
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1])
    # M-RoPE's (temporal, height, width) sections split head_dim / 2 = 8 rotary frequencies.
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=0, eos_token_id=1)  # fmt: skip
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()


def save(model: torch.nn.Module, folder: Path, layout: str) -> Path:
    """``save_pretrained``: transformers 5 writes the hub layout of these models (LLaVA's
    ``language_model.model.layers.N`` beside ``vision_tower.encoder.layers.N``; Qwen2-VL's ``model.layers.N``
    beside ``visual.blocks.N``). ``state_dict``: the model's own module names (``model.language_model.layers.N``),
    as a state dict saved directly holds them. Both sharded (an index and 100 KB shards)."""
    if layout == "save_pretrained":
        model.save_pretrained(folder, max_shard_size="100KB")
    else:
        from huggingface_hub import save_torch_state_dict

        model.config.save_pretrained(folder)
        save_torch_state_dict(model.state_dict(), folder, max_shard_size="100KB")
    return folder


STACKS = {
    "save_pretrained": {"llava": "language_model.model.layers", "qwen2_vl": "model.layers", "qwen2_5_vl": "model.layers"},
    "state_dict": dict.fromkeys(["llava", "qwen2_vl", "qwen2_5_vl"], "model.language_model.layers"),
}


@pytest.mark.parametrize("layout", ["save_pretrained", "state_dict"])
@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_multimodal_checkpoint_gives_its_language_models_layer(tmp_path, kind, layout):
    model = tiny_llava() if kind == "llava" else tiny_qwen2_vl("Qwen2VL" if kind == "qwen2_vl" else "Qwen2_5_VL")
    checkpoint = LMCheckpoint(str(save(model, tmp_path / kind, layout)))
    assert len(set(checkpoint.weight_map.values())) > 1  # sharded, read through the index
    assert checkpoint.config.model_type == kind and checkpoint.text_config is checkpoint.config.get_text_config()
    # LLaVA's vision tower has a `layers` stack of the same depth: the language model's is the one chosen.
    assert checkpoint.layer_prefix("layers", 3) == STACKS[layout][kind]

    block = FrozenLMBlock.from_pretrained(checkpoint.source, [0, -1], in_dim=16)
    text = model.model.language_model
    assert block.lm_config.model_type == text.config.model_type and block.layer_indices == [0, 2]
    assert_block_is_the_layers(block, [text.layers[0], text.layers[2]], text.rotary_emb, [None, None])
    out = block(torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool))
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()


def test_multimodal_checkpoint_reads_only_the_layer(tmp_path, monkeypatch):
    """Only the chosen layer's tensors are read from a multimodal checkpoint (no vision tower, no embeddings)."""
    model = tiny_llava()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    read: list[str] = []
    original = LMCheckpoint.load_tensors

    def spy(self, keys):
        keys = list(keys)
        read.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(LMCheckpoint, "load_tensors", spy)
    FrozenLMBlock.from_pretrained(str(tmp_path), [-1], in_dim=16)
    assert read and all(key.startswith("language_model.model.layers.2.") for key in read)
    assert len(read) == len(model.model.language_model.layers[2].state_dict())


def test_multimodal_random_init_uses_the_language_models_shape(tmp_path):
    tiny_llava().save_pretrained(tmp_path)
    block = FrozenLMBlock.from_pretrained(str(tmp_path), [-1], in_dim=16, init="random")
    assert block.lm_config.model_type == "llama" and block.d_llm == 64 and block.layer_indices == [2]


def test_multimodal_unsupported_language_model_is_named(tmp_path):
    """A multimodal config whose language model is not a supported family names that model_type."""
    model = tiny_llava()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='gpt_neox'.*multimodal"):
        FrozenLMBlock.from_pretrained(str(tmp_path), [-1], in_dim=16)


def test_the_docs_memory_table_is_computed_from_the_shapes():
    """docs/frozen_block.md's per-layer memory: transformers' layer of each shape in SHAPES, counted."""
    from frozenlm.llm.families import SHAPES

    page = (Path(__file__).resolve().parents[1] / "docs" / "frozen_block.md").read_text()
    section = page[page.index("## Choosing the block") :]
    rows = [line for line in section.splitlines() if line.startswith("| ") and " MiB |" in line]
    documented = {int(line.split("|")[-4].strip().replace(",", "")): line for line in rows}
    for name, shape in SHAPES.items():
        count = shape.layer_parameters()
        assert count in documented, f"{name}: {count:,} parameters per layer is not in the table"
        cells = [cell.strip() for cell in documented[count].split("|")]
        assert cells[-3:-1] == [f"{count * 4 / 2**20:.1f} MiB", f"{count * 2 / 2**20:.1f} MiB"], name
        assert cells[2:9] == [shape.family, str(shape.hidden), str(shape.intermediate), str(shape.heads),
                              str(shape.kv_heads), str(shape.head_dim or shape.hidden // shape.heads), str(shape.layers)]  # fmt: skip
    assert len(rows) == len(SHAPES)
