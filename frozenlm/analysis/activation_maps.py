"""Per-token activation maps for the "information filtering" analysis of LM4VE.

Pang et al., "Frozen Transformers in Language Models Are Effective Visual Encoder Layers" (ICLR 2024)
show that after the frozen LLM block the tokens of the object stand out. Two per-token maps are used
on the patch tokens `[B, N, C]` (the caller strips CLS and other prefix tokens):

* magnitude: `||t_k - mean_j t_j||_2` over channels;
* frequency: `||phi_k - mean_j phi_j||_2` with `phi_k = angle(FFT_channels(t_k))`.

The maps are min-max normalised per image, laid on the patch grid, and scored against ground-truth
masks by pseudo-mask IoU at the best threshold in {0.1, ..., 0.9}.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import binary_jaccard_index

DEFAULT_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def _check_tokens(tokens: Tensor) -> Tensor:
    if tokens.ndim != 3:
        raise ValueError(f"Expected patch tokens [B, N, C]; got {tuple(tokens.shape)}.")
    # Half-precision tokens lose the small differences the maps measure.
    return tokens.float()


def magnitude_map(tokens: Tensor) -> Tensor:
    """Magnitude map `[B, N]`: `||t_k - mean_j t_j||_2` over channels (LM4VE, Pang et al., ICLR 2024).

    Examples:
        >>> import torch
        >>> magnitude_map(torch.randn(2, 196, 384)).shape  # one value per token
        torch.Size([2, 196])
    """
    tokens = _check_tokens(tokens)
    return (tokens - tokens.mean(dim=1, keepdim=True)).norm(dim=-1)


def frequency_map(tokens: Tensor) -> Tensor:
    """Frequency map `[B, N]`: `||phi_k - mean_j phi_j||_2`, `phi_k = angle(FFT over channels of t_k)`.

    LM4VE (Pang et al., ICLR 2024); the phase angles lie in `(-pi, pi]`.

    Examples:
        >>> import torch
        >>> frequency_map(torch.randn(2, 196, 384)).shape
        torch.Size([2, 196])
    """
    phase = torch.fft.fft(_check_tokens(tokens), dim=-1).angle()
    return (phase - phase.mean(dim=1, keepdim=True)).norm(dim=-1)


def minmax_normalize(maps: Tensor) -> Tensor:
    """Min-max normalise each map (dim 0 indexes images) to `[0, 1]`: `(a - min) / (max - min)`.

    A constant map becomes all zeros.

    Examples:
        >>> import torch
        >>> minmax_normalize(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[0.0000, 0.5000, 1.0000]])
    """
    flat = maps.float().flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalized = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return normalized.reshape(maps.shape)


def to_patch_grid(maps: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
    """Reshape per-token maps `[B, N]` to `[B, h, w]` in row-major patch order.

    `grid=None` assumes a square grid and needs `N` to be a perfect square.

    Examples:
        >>> import torch
        >>> to_patch_grid(torch.rand(2, 196)).shape  # a square grid unless told
        torch.Size([2, 14, 14])
    """
    if maps.ndim != 2:
        raise ValueError(f"Expected per-token maps [B, N]; got {tuple(maps.shape)}.")
    num_tokens = maps.shape[1]
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"{num_tokens} tokens do not form a square grid; pass grid=(h, w) "
                "(and strip CLS/prefix tokens first)."
            )
        grid = (side, side)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {grid} holds {grid[0] * grid[1]} tokens, the maps have {num_tokens}.")
    return maps.reshape(maps.shape[0], *grid)


def _resize(activation: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(activation.shape) == tuple(size):
        return activation.float()
    return F.interpolate(activation.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def pseudo_mask_iou(
    activation: Tensor,
    mask: Tensor,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
) -> tuple[float, float]:
    """Best IoU between the pseudo mask `activation > t` and `mask` over `t` in `thresholds`.

    LM4VE's pseudo-mask evaluation (Pang et al., ICLR 2024). `activation [h, w]` must lie in
    `[0, 1]` (see `minmax_normalize`); it is upsampled bilinearly to the size of `mask [H, W]`
    when the shapes differ. An empty mask matched by an empty pseudo mask scores 1.

    Returns:
        `(best_iou, best_threshold)`; ties go to the lowest threshold.
    """
    if activation.ndim != 2 or mask.ndim != 2:
        raise ValueError(f"Expected 2-D activation and mask; got {tuple(activation.shape)}, {tuple(mask.shape)}.")
    activation = _resize(activation, tuple(mask.shape))
    # torchmetrics would silently apply a sigmoid to values outside [0, 1].
    if activation.min() < 0 or activation.max() > 1:
        raise ValueError("activation must lie in [0, 1]; normalise it with minmax_normalize first.")
    target = mask.bool().long()
    scores = [
        binary_jaccard_index(activation, target, threshold=float(t), zero_division=1.0).item() for t in thresholds
    ]
    best = int(np.argmax(scores))
    return scores[best], float(thresholds[best])


def cls_attention_map(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Attention from CLS (token 0) to the patch tokens, averaged over heads: `[B, N - num_prefix_tokens]`.

    `attn` is `[B, heads, N, N]` with rows as queries (softmax over the last dim), as in ViT
    (Dosovitskiy et al., ICLR 2021) attention maps; prefix tokens (CLS, distillation, registers) are
    dropped from the keys.
    """
    if attn.ndim != 4:
        raise ValueError(f"Expected attention [B, heads, N, N]; got {tuple(attn.shape)}.")
    return attn[:, :, 0, num_prefix_tokens:].float().mean(dim=1)


def _image_to_hwc(image: Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"Expected an image [3, H, W] or [H, W, 3]; got {array.shape}.")
    if array.dtype == np.uint8:
        return array
    # Normalised float images fall outside [0, 1]; stretch them for display.
    array = array.astype(np.float32)
    low, high = array.min(), array.max()
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def overlay(
    image: Tensor | np.ndarray,
    activation: Tensor,
    ax: Axes | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Axes:
    """Draw `activation [h, w]` (values in `[0, 1]`), bilinearly upsampled, over `image`.

    `image` is `[3, H, W]` or `[H, W, 3]`; uint8 is shown as is, float images are min-max
    stretched for display. Without `ax` a new `matplotlib.figure.Figure` is created (no pyplot,
    so it works under any backend, Agg included); the figure is `ax.figure`.
    """
    picture = _image_to_hwc(image)
    heat = _resize(torch.as_tensor(activation).detach().cpu(), picture.shape[:2]).numpy()
    if ax is None:
        ax = Figure().add_subplot()
    ax.imshow(picture)
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    return ax
