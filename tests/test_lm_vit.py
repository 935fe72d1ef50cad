"""The image family's explicit model (frozenlm.models.lm_vit.LMViT): built without Lightning, no hooks, the GCR
branch returned by forward_features, the same numbers (and random draws) as timm's ViT with the block inserted."""

from __future__ import annotations

import lightning
import pytest
import torch

from frozenlm.models.lm_vit import LMViT, LMViTConfig
from frozenlm.models.vit import ViTConfig
from frozenlm.tasks import ImageClassifier

TINY_VIT = {"backbone": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "num_classes": 10,
            "backbone_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}  # fmt: skip


def llm(checkpoint, **options) -> dict:
    return {"checkpoint": str(checkpoint), "layers": [-1], **options}


def variants(checkpoint) -> dict[str, dict]:
    return {
        "lm4ve": {"llm": llm(checkpoint), "llm_position": 1},
        "gcr": {"llm": llm(checkpoint, mode="auxiliary"), "llm_position": 0},
        "gcr-shared": {"llm": llm(checkpoint, mode="auxiliary", aux_head="shared")},
        "learngene": {"llm": llm(checkpoint), "learngene": {"genes": 2}},
        "learngene-gcr": {"llm": llm(checkpoint, mode="auxiliary"), "learngene": {"genes": 3, "init": "tleg"}},
    }


def test_no_hooks_and_no_tensors_left_on_modules(tiny_llama_checkpoint):
    """Before, the block entered the trunk through a forward hook on a ViT block, GCR's input was kept on the
    task, and learngene blocks had their weights set by a forward pre-hook (and kept them)."""
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    for name, options in variants(tiny_llama_checkpoint).items():
        task = ImageClassifier(**TINY_VIT, **options, mixup=0.0, cutmix=0.0)
        with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: logging is skipped
            task.train().training_step({"image": images, "label": labels}, 0).backward()
        with torch.no_grad():
            task.eval()(images)
        for module_name, module in task.named_modules():
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                assert not getattr(module, kind), (name, module_name, kind)
        assert getattr(task, "_tapped", None) is None, name
        if "learngene" in name:  # the blocks hold no weights between calls, only the genes do
            for block in task.model.backbone.blocks:
                assert block.attn.qkv.weight is None and block.norm1.weight is None, name


def test_build_model_needs_no_lightning_and_is_the_tasks_model(tiny_llama_checkpoint):
    hparams = {**TINY_VIT, "llm": llm(tiny_llama_checkpoint, mode="auxiliary"), "llm_position": -2,
               "learngene": {"genes": 2, "basis": "legendre"}, "drop_path_rate": 0.0}  # fmt: skip
    torch.manual_seed(0)
    model = ImageClassifier.build_model(hparams)
    assert type(model) is LMViT and not isinstance(model, lightning.LightningModule)
    assert model.llm_position == 1 and model.llm_config.mode == "auxiliary" and model.aux_head is not None
    assert model.config.vit.backbone_kwargs == TINY_VIT["backbone_kwargs"] and model.config.learngene.basis == "legendre"
    torch.manual_seed(0)
    task = ImageClassifier(**hparams)
    assert task.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, task.model.state_dict()[key]) for key, value in model.state_dict().items())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), task.eval()(images))
    with pytest.raises(IndexError, match="llm_position 3 is out of range for a ViT with 3 blocks"):
        ImageClassifier.build_model({**TINY_VIT, "llm_position": 3})


def test_forward_features_returns_the_branch_in_gcr_training_only(tiny_llama_checkpoint):
    vit = ViTConfig(**TINY_VIT, drop_path_rate=0.0)
    images = torch.randn(2, 3, 16, 16)
    gcr = LMViT(LMViTConfig(vit=vit, llm=llm(tiny_llama_checkpoint, mode="auxiliary"), llm_position=0))
    gcr.train()
    tokens, branch = gcr.forward_features(images)
    assert branch is not None and branch.shape == tokens.shape == (2, 5, 32)
    backbone = gcr.backbone
    after_block_0 = backbone.blocks[0](backbone._pos_embed(backbone.patch_embed(images)))
    torch.testing.assert_close(branch, gcr.llm_block(after_block_0), rtol=0, atol=0)
    assert gcr.forward_aux_head(branch).shape == (2, 10)
    gcr.eval()
    assert gcr.forward_features(images)[1] is None
    for options in ({"llm": llm(tiny_llama_checkpoint)}, {"llm": None}):  # LM4VE and the plain ViT: no branch
        assert LMViT(LMViTConfig(vit=vit, **options)).train().forward_features(images)[1] is None


@pytest.mark.parametrize("mode", ["inline", "auxiliary"])
def test_training_forward_draws_what_timms_vit_with_the_block_after_a_block_draws(tiny_llama_checkpoint, mode):
    """Drop path on: the explicit loop makes the same random draws, in the same order, as timm's own forward
    with the block inserted after block 1 (as a hook did before)."""
    torch.manual_seed(0)
    model = LMViT(LMViTConfig(vit=ViTConfig(**TINY_VIT, drop_path_rate=0.5), llm=llm(tiny_llama_checkpoint, mode=mode),
                              llm_position=1)).train()  # fmt: skip
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)
    tokens, branch = model.forward_features(images)
    logits = model.forward_head(tokens)
    expected_branch = []

    def insert(module, args, output):
        if mode == "inline":
            return model.llm_block(output)
        expected_branch.append(model.llm_block(output))

    handle = model.backbone.blocks[1].register_forward_hook(insert)
    try:
        torch.manual_seed(1)
        expected = model.backbone(images)
    finally:
        handle.remove()
    assert torch.equal(logits, expected)
    if mode == "auxiliary":
        assert torch.equal(branch, expected_branch[0])


def test_init_from_reads_old_and_new_checkpoint_layouts(tmp_path, tiny_llama_checkpoint):
    """A checkpoint of the task with ``self.model`` (``model.backbone.*``) and one written before
    (``backbone.*``) start the same model; a UTA checkpoint, in either layout, gives its student's trunk."""
    options = {**TINY_VIT, "llm": llm(tiny_llama_checkpoint, mode="auxiliary")}
    torch.manual_seed(0)
    source = ImageClassifier(**options)
    new = {k: v for k, v in source.state_dict().items() if ".layers." not in k}  # as a checkpoint stores it
    old = {k.removeprefix("model."): v for k, v in new.items()}
    assert all(k.startswith("model.") for k in new) and "backbone.head.weight" in old
    for layout, state in (("new", new), ("old", old)):
        torch.save({"state_dict": state, "hyper_parameters": {}}, tmp_path / f"{layout}.ckpt")
        torch.manual_seed(1)
        started = ImageClassifier(**options, init_from=str(tmp_path / f"{layout}.ckpt")).model.state_dict()
        assert all(torch.equal(started[k], v) for k, v in source.model.state_dict().items()), layout
        uta = {k: v for k, v in state.items() if "head" not in k} | {k.replace("aux_head", "projection"): v
                                                                    for k, v in state.items() if "aux_head" in k}
        torch.save({"state_dict": uta, "hyper_parameters": {"teacher": "clip"}}, tmp_path / f"uta-{layout}.ckpt")
        torch.manual_seed(1)
        student = ImageClassifier(**options, init_from=str(tmp_path / f"uta-{layout}.ckpt")).model.state_dict()
        torch.manual_seed(1)
        fresh = ImageClassifier(**options).model.state_dict()
        for key, value in student.items():
            trained = key.startswith(("backbone.", "llm_block.")) and "head" not in key
            assert torch.equal(value, (source.model.state_dict() if trained else fresh)[key]), (layout, key)
