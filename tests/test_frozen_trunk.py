"""``--model.freeze_trunk``: a pretrained ViT kept frozen while the LM block's adapters and the head train
(LM4VE issue #11). The optimizer holds exactly what trains, a fit leaves the trunk bit-identical, and
checkpoints treat the frozen trunk as the frozen LM block: kept, unless a named file holds it (then its
SHA-256 is recorded and checked on load)."""

from __future__ import annotations

import lightning
import pytest
import torch
from safetensors.torch import load_file, save_file

from frozenlm.data import DigitsDataModule
from frozenlm.files import sha256_file
from frozenlm.llm import LLMConfig
from frozenlm.llm.lora import LoRAConfig
from frozenlm.llm.mixin import TRUNK_KEY, FrozenTrunkError
from frozenlm.models.vit import create_vit
from frozenlm.tasks import ImageClassifier

VIT = {"backbone": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "num_classes": 10,
       "backbone_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}  # fmt: skip
RECIPE = {"drop_path_rate": 0.0, "lr": 1e-2, "lr_reference_batch": 0, "warmup_epochs": 0.0, "mixup": 0.0, "cutmix": 0.0}


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A 'pretrained' tiny ViT's weights in a file, as timm reads ``--model.pretrained_file``."""
    torch.manual_seed(7)
    vit = create_vit(VIT["backbone"], 10, img_size=16, patch_size=8, drop_path_rate=0.0, **VIT["backbone_kwargs"])
    path = tmp_path_factory.mktemp("pretrained") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return path


def task(checkpoint, pretrained_file=None, **options) -> ImageClassifier:
    torch.manual_seed(0)
    llm = options.pop("llm", LLMConfig(checkpoint=str(checkpoint)))
    file = {"pretrained_file": str(pretrained_file)} if pretrained_file else {}
    return ImageClassifier(**VIT, **RECIPE, llm=llm, freeze_trunk=True, **file, **options)


def fit(model, root, steps=2) -> lightning.Trainer:
    trainer = lightning.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=8, img_size=16, num_workers=0))
    return trainer


def optimizer_names(trainer, model) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for group in trainer.optimizers[0].param_groups for p in group["params"]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_llama_checkpoint, pretrained_file):
    """A frozen trunk from a file, its last block and pos_embed trainable, LoRA on the block, after 2 steps."""
    model = task(tiny_llama_checkpoint, pretrained_file, trainable_trunk_blocks=1, trainable_patterns=["pos_embed"],
                 llm=LLMConfig(checkpoint=str(tiny_llama_checkpoint), lora=LoRAConfig(r=2)), layer_decay=0.75)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("fit")
    trainer = fit(model, root)
    path = root / "trained.ckpt"
    trainer.save_checkpoint(path)
    return model, trainer, before, path


def test_the_optimizer_holds_exactly_what_trains(fitted):
    model, trainer, _, _ = fitted
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    head = {n for n, _ in model.named_parameters() if n.startswith(("model.backbone.head.", "model.backbone.blocks.2.",
                                                                     "model.backbone.norm."))}  # fmt: skip
    expected = {"model.llm_block.adapter_in.weight", "model.llm_block.adapter_out.weight", "model.backbone.pos_embed"}
    assert lora and head and optimizer_names(trainer, model) == expected | lora | head
    # No state for anything else either (AdamW's moments exist for the trained parameters only).
    state = trainer.optimizers[0].state
    assert {id(p) for p in state} == {id(p) for n, p in model.named_parameters() if n in expected | lora | head}


def test_a_fit_leaves_the_frozen_trunk_bit_identical(fitted, pretrained_file):
    model, _, before, _ = fitted
    after = model.state_dict()
    frozen = [n for n in model.model.backbone.frozen_trunk.names]
    assert "blocks.0.attn.qkv.weight" in frozen and "patch_embed.proj.weight" in frozen and "pos_embed" not in frozen
    assert all(torch.equal(after[f"model.backbone.{n}"], before[f"model.backbone.{n}"]) for n in frozen)
    file = load_file(pretrained_file)
    assert torch.equal(after["model.backbone.blocks.0.attn.qkv.weight"], file["blocks.0.attn.qkv.weight"])
    assert not torch.equal(after["model.backbone.head.weight"], before["model.backbone.head.weight"])
    assert not torch.equal(after["model.backbone.blocks.2.mlp.fc1.weight"], before["model.backbone.blocks.2.mlp.fc1.weight"])


def test_checkpoint_names_the_pretrained_file_instead_of_its_weights(fitted, pretrained_file):
    model, _, _, path = fitted
    stored = torch.load(path, map_location="cpu", weights_only=True)
    frozen = {f"model.backbone.{n}" for n in model.model.backbone.frozen_trunk.names}
    assert frozen and not frozen & set(stored["state_dict"])
    assert "model.backbone.blocks.2.mlp.fc1.weight" in stored["state_dict"]  # the trained block stays
    meta = stored[TRUNK_KEY]["model.backbone"]
    assert meta["pretrained_file"] == str(pretrained_file) and meta["sha256"] == sha256_file(pretrained_file)
    restored = ImageClassifier.load_from_checkpoint(path).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model.eval()(images), atol=0, rtol=0)


def test_a_changed_pretrained_file_is_refused_on_load(fitted, pretrained_file, tmp_path):
    _, _, _, path = fitted
    original = pretrained_file.read_bytes()
    weights = load_file(pretrained_file)
    weights["blocks.0.attn.qkv.weight"][0, 0] += 1e-3
    try:
        save_file(weights, pretrained_file)
        with pytest.raises(FrozenTrunkError) as error:
            ImageClassifier.load_from_checkpoint(path)
    finally:
        pretrained_file.write_bytes(original)
    message = str(error.value)
    assert "\n" not in message and str(pretrained_file) in message and "changed or replaced" in message


def test_without_a_file_the_checkpoint_keeps_the_frozen_trunk(tmp_path, tiny_llama_checkpoint):
    model = task(tiny_llama_checkpoint)
    trainer = fit(model, tmp_path, steps=1)
    path = tmp_path / "kept.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert "model.backbone.blocks.0.attn.qkv.weight" in stored["state_dict"] and not stored[TRUNK_KEY]
    assert optimizer_names(trainer, model) == {"model.llm_block.adapter_in.weight", "model.llm_block.adapter_out.weight",
                                               "model.backbone.head.weight", "model.backbone.head.bias"}  # fmt: skip
    restored = ImageClassifier.load_from_checkpoint(path).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model.eval()(images), atol=0, rtol=0)


def test_settings_that_cannot_apply_are_refused(tiny_llama_checkpoint):
    with pytest.raises(ValueError, match=r"trainable_patterns \['blocks\.9\.\*'\] match no parameter"):
        task(tiny_llama_checkpoint, trainable_patterns=["blocks.9.*"])
    with pytest.raises(ValueError, match=r"trainable_trunk_blocks 4 must be in \[0, 3\]"):
        task(tiny_llama_checkpoint, trainable_trunk_blocks=4)
    with pytest.raises(ValueError, match="set --model.freeze_trunk true"):
        ImageClassifier(**VIT, trainable_trunk_blocks=1)


def test_export_refuses_a_checkpoint_that_leaves_its_frozen_trunk_out(fitted, pretrained_file, tmp_path):
    from frozenlm.export import ExportError, export

    _, _, _, path = fitted
    with pytest.raises(ExportError) as error:
        export(str(path), str(tmp_path / "trunk.safetensors"))
    message = str(error.value)
    assert "\n" not in message and "leaves its frozen trunk's weights out" in message and str(pretrained_file) in message
    assert not (tmp_path / "trunk.safetensors").exists()


def test_init_from_over_a_file_frozen_trunk_keeps_its_weights_in_checkpoints(tmp_path, tiny_llama_checkpoint, pretrained_file):
    # --model.init_from replaces the pretrained file's weights: checkpoints must keep them, not name the file.
    start = task(tiny_llama_checkpoint, pretrained_file)
    weights = {f"model.{k}": v.clone() + (0.5 if ".blocks.0." in f".{k}" else 0.0) for k, v in start.model.state_dict().items()}
    save_file(weights, tmp_path / "start.safetensors")
    model = task(tiny_llama_checkpoint, pretrained_file, init_from=str(tmp_path / "start.safetensors"))
    assert model.model.backbone.frozen_trunk.pretrained_file is None
    trainer = fit(model, tmp_path, steps=1)
    path = tmp_path / "init.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert not stored[TRUNK_KEY]
    assert torch.equal(stored["state_dict"]["model.backbone.blocks.0.attn.qkv.weight"],
                       weights["model.backbone.blocks.0.attn.qkv.weight"])  # fmt: skip
    restored = ImageClassifier.load_from_checkpoint(path).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model.eval()(images), atol=0, rtol=0)
