"""frozenlm.callbacks: the trainable-only EMA, through the CLI and against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from frozenlm.callbacks import EMA
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 2).requires_grad_(False)


def test_ema_averages_trainable_weights_only_and_swaps_for_evaluation():
    module = Holder()
    ema = EMA(decay=0.75)
    ema.on_fit_start(None, module)
    assert set(ema.average) == {"trained.weight", "trained.bias"}
    start = module.trained.weight.detach().clone()
    with torch.no_grad():
        module.trained.weight.add_(1.0)
    ema.on_train_batch_end(None, module, None, None, 0)
    expected = 0.75 * start + 0.25 * (start + 1.0)
    torch.testing.assert_close(ema.average["trained.weight"], expected)

    live = module.trained.weight.detach().clone()
    ema.on_validation_epoch_start(None, module)
    torch.testing.assert_close(module.trained.weight.detach(), expected)
    ema.on_validation_epoch_end(None, module)
    torch.testing.assert_close(module.trained.weight.detach(), live)


def test_ema_state_of_a_checkpoint_from_before_the_task_held_its_model_resumes():
    """Such a checkpoint's average names ``trained.weight`` what the task now names ``model.trained.weight``."""
    task = nn.Module()
    task.model = Holder()
    ema = EMA(decay=0.5)
    ema.load_state_dict({"decay": 0.5, "average": {"trained.weight": torch.ones(2, 3), "trained.bias": torch.ones(2)}})
    ema.on_fit_start(None, task)
    assert set(ema.average) == {"model.trained.weight", "model.trained.bias"}
    assert torch.equal(ema.average["model.trained.weight"], torch.ones(2, 3))
    ema.load_state_dict({"decay": 0.5, "average": {"other.weight": torch.ones(2, 3)}})
    with pytest.raises(ValueError, match="does not match"):
        ema.on_fit_start(None, task)


def test_ema_state_is_checkpointed_without_frozen_weights(tmp_path, tiny_llama_checkpoint):
    run_cli(
        "fit", "image_llama", tmp_path, "--model.llm.checkpoint", str(tiny_llama_checkpoint),
        "--trainer.callbacks+=frozenlm.callbacks.EMA", "--trainer.callbacks.decay", "0.9",
    )  # fmt: skip
    checkpoint = load_checkpoint(last_checkpoint(tmp_path))
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("EMA")]
    assert state["average"] and not [k for k in state["average"] if k.startswith("model.llm_block.layers.")]
    assert "model.llm_block.adapter_in.weight" in state["average"]
    assert not [k for k in checkpoint["state_dict"] if k.startswith("model.llm_block.layers.")]
