"""frozenlm.measure's timing of a step against its FLOP ideal."""

from __future__ import annotations

import torch

from frozenlm import measure


def test_step_and_ideal_are_timed_in_turns_after_a_warm_up_each(monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "_ideal_matmul", lambda flops, device: (lambda: calls.append("matmul"), 2.0))
    ticks = iter(range(100))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: float(next(ticks)))
    step_s, ideal_s = measure.step_and_ideal_seconds(lambda: calls.append("step"), 10**9, torch.device("cpu"), 3)
    assert calls == ["step", "matmul"] * 4  # a warm-up of each, then step, matmul, step, ...
    assert (step_s, ideal_s) == (1.0, 2.0)  # each call one tick; the matmul scaled to the step's FLOPs
