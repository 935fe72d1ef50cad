"""Distillation from a frozen teacher: DeiT's soft loss, the teacher in eval mode, run once per batch
without gradients, and never stored in the student's checkpoints."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from frozenlm.tasks.distillation import DistillConfig, distillation_loss
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli


def test_distillation_loss_is_the_tempered_kl():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    p, q = (teacher / 2).softmax(-1), (student / 2).softmax(-1)
    expected = 4 * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), expected)
    assert distillation_loss(teacher, teacher, 1.0).abs() < 1e-6
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(teacher="resnet18", alpha=1.5)


def test_a_student_distils_from_a_frozenlm_teacher_checkpoint(tmp_path):
    run_cli("fit", "image_baseline", tmp_path / "teacher")
    teacher = last_checkpoint(tmp_path / "teacher")
    student = run_cli("fit", "image_baseline", tmp_path / "student", "--model.distill", f"{{teacher: {teacher}, alpha: 0.25}}",
                      "--model.mixup", "0", "--model.cutmix", "0", "--trainer.callbacks+=tests.test_distillation.CountTeacherCalls")  # fmt: skip
    model = student.model
    assert model.teacher is not None and not model.teacher.training
    assert not any(p.requires_grad or p.grad is not None for p in model.teacher.parameters())
    metrics = student.trainer.callback_metrics
    expected = 0.75 * metrics["train_loss_ce"] + 0.25 * metrics["train_loss_kd"]
    torch.testing.assert_close(metrics["train_loss"], expected)
    state = load_checkpoint(last_checkpoint(tmp_path / "student"))["state_dict"]
    assert not [k for k in state if k.startswith("teacher")] and set(state) == set(model.state_dict())

    counter = next(c for c in student.trainer.callbacks if type(c).__name__ == "CountTeacherCalls")
    assert counter.calls == student.trainer.global_step == 3  # once per training batch, never in validation


class CountTeacherCalls(Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.calls = 0
        pl_module.teacher.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))
