"""Metrics shared by several tasks: image-text retrieval's Recall@K (METER's retrieval, UTA's zero-shot
retrieval), as a function of an all-pairs score matrix and as a torchmetrics `Metric` that gathers the
score rows of every process (`RetrievalRecall`)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def retrieval_recalls(scores: Tensor, text_images: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Tensor]:
    """Recall@k of image-text retrieval from the all-pairs `scores [images, texts]`.

    `text_images [texts]` is each text's image. Image-to-text (`tr_r<k>`): an image counts when any of
    its texts is among its `k` best-scored texts; text-to-image (`ir_r<k>`): a text counts when its image
    is among its `k` best-scored images (`topk` ranks, as METER).
    """
    images = torch.arange(len(scores), device=scores.device)
    recalls = {}
    for k in ks:
        top_texts = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [images, k]
        recalls[f"tr_r{k}"] = (text_images[top_texts] == images[:, None]).any(dim=1).float().mean()
        top_images = scores.topk(min(k, scores.shape[0]), dim=0).indices  # [k, texts]
        recalls[f"ir_r{k}"] = (top_images == text_images[None, :]).any(dim=0).float().mean()
    return recalls


def split_recalls(
    index: Tensor, scores: Tensor, owners: Tensor, stage: str, warn: bool = True, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, Tensor]:
    """`retrieval_recalls` of an evaluation split from its score rows as the processes gathered them.

    `index [R]` is each row's image in the split (-1 for rows that only evened out the processes' shares),
    `scores [R, texts]`, `owners [texts]` each text's image. When only some images were scored
    (`limit_val_batches`, the sanity check) the recalls are those of the scored images and their texts,
    said in a warning unless `warn` is False.
    """
    keep = index >= 0
    index, scores = index[keep], scores[keep].float()
    images = int(owners.max()) + 1
    if len(index) < images:
        if warn:
            warnings.warn(f"{stage} recall over the {len(index)} scored images of {images} (and their captions) only",
                          stacklevel=2)  # fmt: skip
        texts = torch.isin(owners, index)
        order = index.argsort()
        owners = torch.searchsorted(index[order], owners[texts])
        index, scores = torch.arange(len(index), device=index.device), scores[order][:, texts]
    matrix = torch.empty_like(scores)
    matrix[index] = scores
    return retrieval_recalls(matrix, owners, ks)


class RetrievalRecall(Metric):
    """Recall@K of image-text retrieval over an evaluation split from all-pairs score rows, exact on any number
    of processes: each process adds the rows of the images it scored, the rows of every process are gathered
    (states concatenated, `dist_reduce_fx="cat"`) and the recalls computed once over the split.

    - `start(owners, stage, warn)` when an evaluation starts: `owners [texts]` is each text's image in the
      split; resets the state.
    - `update(index, scores)`: `index [B]` the scored images' positions in the split, `scores [B, texts]`
      their score rows; rows that only even out the processes' shares are left out by the caller
      ([`scored`][frozenlm.tasks.BaseTask.scored]), so every image counts once.
    - `compute()`: `{"tr_r<k>", "ir_r<k>"}` for each `k` of `ks` (see `retrieval_recalls`); over
      the scored images and their texts when only some were scored (`limit_val_batches`, the sanity check),
      said in a warning naming `stage` unless `warn` is False (`split_recalls`).
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.owners: Tensor | None = None
        self.stage, self.warn = "evaluation", True

    def start(self, owners: Tensor, stage: str = "evaluation", warn: bool = True) -> None:
        """Begin an evaluation of the split whose texts belong to the images `owners`."""
        self.reset()
        self.owners, self.stage, self.warn = owners, stage, warn
        # A process that scores no image still takes part in the gather, with rows of the right shape.
        self.index.append(torch.empty(0, dtype=torch.long, device=self.device))
        self.scores.append(torch.empty(0, len(owners), device=self.device))

    def update(self, index: Tensor, scores: Tensor) -> None:
        """Add the score rows `scores [B, texts]` of the split's images `index [B]`."""
        self.index.append(index.to(self.device, torch.long))
        self.scores.append(scores.detach().float())

    def compute(self) -> dict[str, Tensor]:
        """The recalls of the scored images (every process's), as `split_recalls` gives them."""
        if self.owners is None:
            raise RuntimeError("RetrievalRecall.start(owners) gives the split's texts before the first update.")
        index, scores = dim_zero_cat(self.index), dim_zero_cat(self.scores)
        return split_recalls(index, scores, self.owners.to(index.device), self.stage, self.warn, self.ks)
