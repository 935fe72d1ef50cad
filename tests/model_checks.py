"""Checks every family's plain model passes (issue 31): no hooks, and GCR's branch returned by ``forward_features``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def hooked_modules(module: nn.Module) -> list[str]:
    """The submodules (by name; ``""`` is ``module``) holding a forward hook or pre-hook, plus ``<global>`` when a
    global forward hook is registered."""
    names = [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    hooks = nn.modules.module
    return names + (["<global>"] if hooks._global_forward_hooks or hooks._global_forward_pre_hooks else [])


def check_branch(model: nn.Module, inputs: tuple[Any, ...], mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model.forward_features(*inputs)`` in training gives GCR's branch (tokens of the main path's shape) when
    ``mode`` is ``auxiliary`` and None inline; in eval always None; no hook before, between or after. Returns
    the training call's ``(tokens, branch)``; leaves the model in eval mode."""
    assert hooked_modules(model) == []
    tokens, branch = model.train().forward_features(*inputs)
    assert (branch is not None) == (mode == "auxiliary")
    if branch is not None:
        assert branch.shape == tokens.shape and branch.requires_grad
    with torch.no_grad():
        assert model.eval().forward_features(*inputs)[1] is None
    assert hooked_modules(model) == []
    return tokens, branch
