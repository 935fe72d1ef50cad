"""Gradient coherence: how well the per-sample gradients of a batch agree.

GCR (Bai et al., "Frozen Language Models Are Gradient Coherence Rectifiers in Vision Transformers",
AAAI 2025) explains the benefit of a frozen LLM block by a rise in the alignment of per-sample
gradients. Two standard measures of that alignment are provided, both on a matrix `G` of shape
`[m, P]` whose row `i` is the flattened gradient `g_i` of sample `i`:

* m-coherence (Chatterjee & Zielinski, "Making Coherence Out of Nothing At All: Measuring the
  Evolution of Gradient Alignment", 2020):
  `||sum_i g_i||^2 / sum_i ||g_i||^2`, 1 for mutually orthogonal gradients, `m` for identical ones.
* mean pairwise cosine: the mean of `cos(g_i, g_j)` over ordered pairs `i != j`.

Zero-norm rule (both measures): a zero gradient has no direction, so it counts as orthogonal to every
other gradient (it adds nothing to either sum of m-coherence, and its cosines are 0). When every row
is zero the measures are undefined and return NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.func import grad, vmap


def per_sample_gradients(
    loss_fn: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    batch: Mapping[str, object],
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample gradients `G[i] = d loss_fn(params, batch[i:i+1]) / d params`, flattened.

    Uses `torch.func.vmap` over `torch.func.grad` (the per-sample-gradient recipe of torch.func).
    `loss_fn(params, sample_batch)` must return a scalar; each `sample_batch` holds one sample of
    every tensor entry with its leading batch dimension of 1 re-added, so a loss written for batches
    works unchanged. It must be vmap-compatible: no `.item()`, no data-dependent Python control
    flow, no random ops (call it with dropout off). Non-tensor entries of `batch` (e.g. a list of
    string ids) are dropped, because they cannot be split per sample.

    Args:
        loss_fn: functional loss of `(params, sample_batch)`.
        params: the tensors to differentiate, by name; their order sets the column order of `G`.
        batch: a batch dict whose tensor entries share the leading batch size `m`.
        chunk_size: forwarded to `vmap`: samples processed at once, to bound memory.

    Returns:
        `G` of shape `[m, P]`, `P` = total number of elements in `params`.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> params = dict(model.named_parameters())
        >>> def loss_fn(params, batch):
        ...     logits = torch.func.functional_call(model, params, (batch["x"],))
        ...     return torch.nn.functional.cross_entropy(logits, batch["y"])
        >>> grads = per_sample_gradients(loss_fn, params, {"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))})
        >>> grads.shape  # one flattened gradient per sample
        torch.Size([8, 15])
    """
    tensors = {key: value for key, value in batch.items() if isinstance(value, Tensor)}
    if not tensors:
        raise ValueError("The batch has no tensor entries to compute per-sample gradients from.")
    sizes = {key: value.shape[0] if value.ndim else None for key, value in tensors.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"Every tensor entry of the batch needs the same leading batch size; got {sizes}.")

    def sample_loss(sample_params: dict[str, Tensor], sample: dict[str, Tensor]) -> Tensor:
        return loss_fn(sample_params, {key: value.unsqueeze(0) for key, value in sample.items()})

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0), chunk_size=chunk_size)(dict(params), tensors)
    m = next(iter(sizes.values()))
    return torch.cat([per_sample[name].reshape(m, -1) for name in params], dim=1)


def _check_rows(gradients: Tensor, min_rows: int) -> Tensor:
    if gradients.ndim != 2 or gradients.shape[0] < min_rows:
        raise ValueError(f"Expected per-sample gradients of shape [m >= {min_rows}, P]; got {tuple(gradients.shape)}.")
    return gradients.to(torch.float64)


def m_coherence(gradients: Tensor) -> Tensor:
    """m-coherence `||sum_i g_i||^2 / sum_i ||g_i||^2` of `gradients` `[m, P]` (float64 scalar).

    Chatterjee & Zielinski (2020), as used by GCR (Bai et al., AAAI 2025). Ranges over
    `[0, m]`: `m` for identical gradients, 1 for orthogonal ones, below 1 when they cancel.
    Zero rows add nothing to either sum; NaN when all rows are zero.

    Examples:
        >>> import torch
        >>> round(m_coherence(torch.ones(4, 10)).item(), 3)  # identical gradients: m
        4.0
        >>> round(m_coherence(torch.eye(4)).item(), 3)  # orthogonal: 1
        1.0
    """
    g = _check_rows(gradients, 1)
    total_sq_norm = g.square().sum()
    if total_sq_norm == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=g.device)
    return g.sum(dim=0).square().sum() / total_sq_norm


def mean_pairwise_cosine(gradients: Tensor) -> Tensor:
    """Mean of `cos(g_i, g_j)` over the `m (m - 1)` ordered pairs `i != j` (float64 scalar).

    With unit rows `u_i = g_i / ||g_i||` (zero rows kept at zero, i.e. cosine 0 with everything),
    `sum_{i != j} cos(g_i, g_j) = ||sum_i u_i||^2 - sum_i ||u_i||^2`: O(m P) time and no m x m x P
    intermediate. NaN when all rows are zero; needs `m >= 2`.

    Examples:
        >>> import torch
        >>> round(mean_pairwise_cosine(torch.eye(3)).item(), 3)
        0.0
    """
    g = _check_rows(gradients, 2)
    norms = g.norm(dim=1, keepdim=True)
    nonzero = norms.squeeze(1) > 0
    if not nonzero.any():
        return torch.tensor(float("nan"), dtype=torch.float64, device=g.device)
    units = torch.where(norms > 0, g / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    m = g.shape[0]
    off_diagonal_sum = units.sum(dim=0).square().sum() - nonzero.sum()
    return off_diagonal_sum / (m * (m - 1))
