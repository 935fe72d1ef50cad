"""ImageClassifier: where the block sits, what trains, and the DeiT optimisation recipe."""

from __future__ import annotations

import lightning
import pytest
import torch

from frozenlm.data import DigitsDataModule
from frozenlm.llm import LLMConfig
from frozenlm.tasks import ImageClassifier

TINY_VIT = {"backbone": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8,
            "backbone_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}, "num_classes": 10}  # fmt: skip


def classifier(checkpoint, **kwargs) -> ImageClassifier:
    llm = kwargs.pop("llm", LLMConfig(checkpoint=str(checkpoint)))
    return ImageClassifier(**TINY_VIT, llm=llm, drop_path_rate=0.0, **kwargs).eval()


@pytest.mark.parametrize("position", [0, 1, -1])
def test_block_runs_after_vit_block_llm_position(tiny_llama_checkpoint, position):
    model = classifier(tiny_llama_checkpoint, llm_position=position)
    vit, images = model.model.backbone, torch.randn(2, 3, 16, 16)
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    with torch.no_grad():
        for index, block in enumerate(vit.blocks):
            tokens = block._forward_impl(tokens) if hasattr(block, "_forward_impl") else _plain(block, tokens)
            if index == position % len(vit.blocks):
                tokens = model.model.llm_block(tokens)
        expected = vit.forward_head(vit.norm(tokens))
        torch.testing.assert_close(model(images), expected)


def _plain(block, tokens):
    # The block without its forward hooks: the same computation timm's Block.forward does.
    hooks, block._forward_hooks = block._forward_hooks, type(block._forward_hooks)()
    try:
        return block(tokens)
    finally:
        block._forward_hooks = hooks


def test_llm_position_out_of_range_is_a_clear_error(tiny_llama_checkpoint):
    with pytest.raises(IndexError, match="llm_position 3 is out of range for a ViT with 3 blocks"):
        classifier(tiny_llama_checkpoint, llm_position=3)


def test_baseline_and_ablations_build(tiny_llama_checkpoint):
    assert classifier(tiny_llama_checkpoint, llm=None).model.llm_block is None
    mlp = classifier(tiny_llama_checkpoint, llm=LLMConfig(checkpoint=str(tiny_llama_checkpoint), replace_with_mlp=True))
    assert mlp.model.llm_block.layers is None
    random = classifier(tiny_llama_checkpoint, llm=LLMConfig(checkpoint=str(tiny_llama_checkpoint), init="random"))
    assert random.model.llm_block.fingerprint != classifier(tiny_llama_checkpoint).model.llm_block.fingerprint


def fitted_trainer(model, max_steps=8, batch_size=16) -> lightning.Trainer:
    trainer = lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=batch_size, img_size=16, num_workers=0))
    return trainer


def test_optimizer_holds_trainable_parameters_only_without_decay_on_norms_biases_tokens(tiny_llama_checkpoint):
    model = classifier(tiny_llama_checkpoint, lr=1e-3, lr_reference_batch=512, warmup_epochs=0.1)
    trainer = fitted_trainer(model, max_steps=1)
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not [names[i] for i in in_optimizer if names[i].startswith("model.llm_block.layers.")]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {names[i] for i in in_optimizer}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"model.backbone.cls_token", "model.backbone.pos_embed", "model.backbone.norm.weight", "model.backbone.head.bias"} <= no_decay
    assert "model.llm_block.adapter_in.weight" not in no_decay and "model.backbone.blocks.0.attn.qkv.weight" not in no_decay
    # lr = 1e-3 x 16 / 512 for one process and no accumulation.
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 16 / 512)


def learning_rates(model, max_steps: int) -> list[float]:
    """The first parameter group's learning rate at the start of each of ``max_steps`` steps on the digits
    (batch 16: 89 steps per epoch)."""
    seen = []

    class Record(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=16, img_size=16, num_workers=0))
    return seen


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr(tiny_llama_checkpoint):
    # Digits: 1437 training images / 16 = 89 steps per epoch; warm up for 0.05 epochs = 4 steps.
    model = classifier(tiny_llama_checkpoint, lr=1e-3, lr_reference_batch=0, warmup_epochs=0.05, min_lr=1e-5,
                       warmup_lr=1e-6)  # fmt: skip
    seen = learning_rates(model, max_steps=20)
    warmup = int(0.05 * 89)
    assert seen[0] == pytest.approx(1e-6)
    assert seen[warmup] == pytest.approx(1e-3, rel=1e-3)
    assert all(a < b for a, b in zip(seen[:warmup], seen[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(seen[warmup:], seen[warmup + 1 :]))
    assert seen[-1] < 2e-4


def test_linear_schedule_is_meters(tiny_llama_checkpoint):
    # METER's set_schedule (meter/modules/meter_utils.py, decay_power 1, end_lr 0) is transformers'
    # get_polynomial_decay_schedule_with_warmup: linear warmup from 0, then linear decay to 0 at the last step.
    from transformers import get_polynomial_decay_schedule_with_warmup

    model = classifier(tiny_llama_checkpoint, lr=1e-3, lr_reference_batch=0, warmup_epochs=0.1, min_lr=0.0,
                       warmup_lr=0.0, schedule="linear")  # fmt: skip
    seen = learning_rates(model, max_steps=30)
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = get_polynomial_decay_schedule_with_warmup(reference_optimizer, int(0.1 * 89), 30, lr_end=0.0, power=1.0)
    expected = []
    for _ in range(30):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()
    assert seen == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("scale_min_lr", [False, True])
def test_min_and_warmup_lr_scale_with_the_batch_only_when_asked(tiny_llama_checkpoint, scale_min_lr):
    model = classifier(tiny_llama_checkpoint, lr=1e-3, lr_reference_batch=256, min_lr=1e-6, warmup_lr=2e-6,
                       scale_min_lr=scale_min_lr)  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, DigitsDataModule(batch_size=16, img_size=16, num_workers=0))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    scale = 16 / 256
    assert scheduler.base_values == [pytest.approx(1e-3 * scale)] * len(scheduler.base_values)
    floor = scale if scale_min_lr else 1.0
    assert scheduler.lr_min == pytest.approx(1e-6 * floor)
    assert scheduler.warmup_lr_init == pytest.approx(2e-6 * floor)


def test_frozen_block_gets_no_gradient_and_stays_in_eval_mode_while_training(tiny_llama_checkpoint):
    model = classifier(tiny_llama_checkpoint)
    before = {k: v.clone() for k, v in model.model.llm_block.layers.state_dict().items()}
    adapter = model.model.llm_block.adapter_in.weight.detach().clone()
    fitted_trainer(model, max_steps=3)
    assert not model.model.llm_block.layers.training
    for key, value in model.model.llm_block.layers.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.model.llm_block.adapter_in.weight.detach(), adapter)
