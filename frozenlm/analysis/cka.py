"""Linear centered kernel alignment (CKA) between two sets of representations.

GCR (Bai et al., AAAI 2025) ranks candidate LLM layers and insertion points by the linear CKA between
the LLM block's output and the adjacent ViT block's output.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_samples(features: Tensor) -> Tensor:
    if features.ndim == 3:
        return features.reshape(-1, features.shape[-1])
    if features.ndim != 2:
        raise ValueError(f"Expected features [n, d] or tokens [B, N, d]; got {tuple(features.shape)}.")
    return features


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019).

    With column-centred `X [n, d1]` and `Y [n, d2]`:
    `CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`, in `[0, 1]`; 1 for identical inputs and
    invariant to orthogonal transforms and isotropic scaling of either input.

    Token tensors `[B, N, d]` are flattened to `[B * N, d]`: every token is one sample, so the
    token positions of `x` and `y` must correspond. Computed in float64. When `n` is smaller than
    both widths the equal Gram-matrix form `<X X^T, Y Y^T>_F / (||X X^T||_F ||Y Y^T||_F)` is used,
    which is cheaper. A constant input (zero variance) gives NaN.

    Returns:
        A float64 scalar tensor.

    Examples:
        >>> import torch
        >>> x = torch.randn(64, 32)
        >>> round(linear_cka(x, 2 * x + 1).item(), 3)  # invariant to scale and shift
        1.0
    """
    x, y = _as_samples(x).to(torch.float64), _as_samples(y).to(torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples; got {x.shape[0]} and {y.shape[0]}.")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        return (gram_x * gram_y).sum() / (torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y))
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
