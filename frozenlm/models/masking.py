"""Which patches a masked-image student sees: block-wise masks (BEiT, Bao et al., ICLR 2022) and UTA's
"reversed" variant (Liu et al., TMLR 2024), where the *kept* patches form the blocks.

Masks are `[h, w]` bool grids, True = masked. Every mask masks exactly `round(ratio * h * w)` patches,
so every image of a batch keeps the same number of tokens (the student runs on them without padding).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def block_mask(grid: tuple[int, int], count: int, rng: np.random.Generator, min_block: int = 4,
               max_aspect: float = 1 / 0.3) -> np.ndarray:  # fmt: skip
    """A `[h, w]` mask of exactly `count` patches made of rectangles, as BEiT draws them: each block's
    area is uniform in `[min_block, what is left]`, its aspect ratio log-uniform in `[1 / max_aspect,
    max_aspect]`, its place uniform; only its not yet masked patches count. A block that would overshoot
    is cut to its first patches in raster order; when no block adds anything after many tries, the rest
    are the unmasked patches nearest to the mask. NumPy: a few microseconds per draw."""
    height, width = grid
    total = height * width
    if not 0 <= count <= total:
        raise ValueError(f"cannot mask {count} of {total} patches")
    mask = np.zeros((height, width), dtype=bool)
    left = count
    for _ in range(100 * total):
        if left == 0:
            break
        area = rng.uniform(min(min_block, left), left)
        aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
        h = max(1, min(height, round(math.sqrt(area * aspect))))
        w = max(1, min(width, round(math.sqrt(area / aspect))))
        top, start = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
        block = np.zeros_like(mask)
        block[top : top + h, start : start + w] = True
        new = np.flatnonzero(block & ~mask)[:left]
        mask.flat[new] = True
        left -= len(new)
    if left:  # grow the mask by its nearest unmasked patches
        rows, cols = np.divmod(np.arange(total), width)
        masked = np.flatnonzero(mask)
        distance = ((rows[:, None] - rows[masked]) ** 2 + (cols[:, None] - cols[masked]) ** 2).min(axis=1).astype(float)
        distance[mask.flat[:]] = np.inf
        mask.flat[np.argsort(distance, kind="stable")[:left]] = True
    return mask


def reversed_block_mask(grid: tuple[int, int], count: int, rng: np.random.Generator, **kwargs) -> np.ndarray:
    """UTA's reversed block-wise mask: `count` masked patches whose complement (the kept ones) is a block mask."""
    return ~block_mask(grid, grid[0] * grid[1] - count, rng, **kwargs)


def draw_mask(masking: str, grid: tuple[int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A `[h, w]` mask (True = masked) of `round(ratio * h * w)` patches: `reversed_block` (UTA),
    `block` (BEiT) or `random`."""
    patches = grid[0] * grid[1]
    count = round(ratio * patches)
    if masking == "random":
        return np.isin(np.arange(patches), rng.permutation(patches)[:count]).reshape(grid)
    return (reversed_block_mask if masking == "reversed_block" else block_mask)(grid, count, rng)


def kept_indices(masks: Tensor | np.ndarray) -> Tensor:
    """`[B, K]` indices (raster order, ascending) of the unmasked patches of `masks [B, h, w]`; every mask
    must keep the same number."""
    flat = ~torch.as_tensor(masks).flatten(1)
    counts = flat.sum(dim=1)
    if len(set(counts.tolist())) > 1:
        raise ValueError(f"masks keep different numbers of patches: {counts.tolist()}")
    return flat.nonzero()[:, 1].view(len(flat), -1)
