"""Distillation from a frozen teacher: DeiT's soft loss, the teacher in eval mode, run once per batch
without gradients, and never stored in the student's checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from frozenlm.tasks.distillation import DistillConfig, distillation_loss
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli


def _log_softmax(row, temperature=1.0):
    scaled = [v / temperature for v in row]
    log_total = math.log(sum(math.exp(v) for v in scaled))
    return [v - log_total for v in scaled]


# Two samples, three classes, written out so the sums below are DeiT's by hand.
STUDENT = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
TEACHER = [[3.0, 1.0, 0.0], [0.0, 2.0, -2.0]]


def test_soft_distillation_is_deits_kl_summed_over_the_number_of_logits():
    """facebookresearch/deit losses.py lines 54-62 (commit 7e160fe): F.kl_div(log_softmax(s / T),
    log_softmax(t / T), reduction='sum', log_target=True) * (T * T) / s.numel(); TLEG's losses.py lines
    51-56 (AlphaXia/TLEG 6e30a5c) is the same."""
    temperature = 2.0
    total = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER):
        log_s, log_t = _log_softmax(s_row, temperature), _log_softmax(t_row, temperature)
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t))
    deit = total * temperature**2 / 6  # 2 samples x 3 classes
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert distillation_loss(student, teacher, temperature) == pytest.approx(deit, rel=1e-6)  # the default
    assert distillation_loss(student, teacher, temperature, "soft", "deit") == pytest.approx(deit, rel=1e-6)
    # 'batchmean' (frozenlm's earlier loss, kept as an option) divides by the batch only: C = 3 times DeiT's.
    assert distillation_loss(student, teacher, temperature, "soft", "batchmean") == pytest.approx(3 * deit, rel=1e-6)
    assert distillation_loss(teacher, teacher, 1.0).abs() < 1e-6


def test_hard_distillation_is_cross_entropy_to_the_teachers_top_class():
    """deit losses.py line 67: F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1)); the temperature
    plays no part."""
    top = [row.index(max(row)) for row in TEACHER]  # classes 0 and 1
    expected = -sum(_log_softmax(row)[c] for row, c in zip(STUDENT, top)) / 2
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    for temperature in (1.0, 3.0):
        assert distillation_loss(student, teacher, temperature, "hard") == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="distill.kind"):
        DistillConfig(teacher="resnet18", kind="medium")
    with pytest.raises(ValueError, match="distill.reduction"):
        DistillConfig(teacher="resnet18", reduction="mean")


def test_invalid_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(teacher="resnet18", alpha=1.5)


def test_a_student_distils_from_a_frozenlm_teacher_checkpoint(tmp_path):
    run_cli("fit", "image_baseline", tmp_path / "teacher")
    teacher = last_checkpoint(tmp_path / "teacher")
    student = run_cli("fit", "image_baseline", tmp_path / "student", "--model.distill", f"{{teacher: {teacher}, alpha: 0.25}}",
                      "--model.mixup", "0", "--model.cutmix", "0", "--trainer.callbacks+=tests.test_distillation.CountTeacherCalls")  # fmt: skip
    model = student.model
    assert model.teacher is not None and not model.teacher.training
    assert (model.distill_config.kind, model.distill_config.reduction) == ("soft", "deit")  # DeiT's, by default
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
