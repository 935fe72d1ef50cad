"""ScanQA's training losses on SQA3D, as SQA3D's `ScanQA/lib/loss_helper.py` (VoteNet's detection losses,
ScanRefer's reading of them) defines them: vote, objectness, box and semantic-class losses of the detector, which
trains from scratch, the answer loss and the auxiliary situation loss, and their weighted sum.

Every function takes the model's outputs (`frozenlm.models.scanqa.ScanQA`'s dict, VoteNet's keys) and
the batch's targets (`frozenlm.data.sqa3d`), batched; nothing loops over samples, seeds or proposals.
Two of the reference's rules are kept as they are: the ground-truth boxes are matched with their padding
(`center_label` rows past an object count are zeros; the nearest-centre searches of the objectness and
centre losses see them as boxes at the origin, as the reference's do), and every masked mean divides by
`mask.sum() + 1e-6`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NEAR_THRESHOLD = 0.3  # metres: an aggregated vote this close to a ground-truth centre is an object proposal
FAR_THRESHOLD = 0.6  # metres: one farther than this from every centre is a non-object; in between, not scored
OBJECTNESS_CLASS_WEIGHTS = (0.2, 0.8)  # cross-entropy weights of (non-object, object)
GT_VOTE_FACTOR = 3  # ground-truth votes per point (a point inside up to 3 boxes)


@dataclass(frozen=True)
class LossWeights:
    """The reference's weights (`scripts/train.py` defaults; `get_loss` multiplies the sum by `scale`)."""

    vote: float = 1.0
    objectness: float = 0.5
    box: float = 1.0
    sem_cls: float = 0.1
    answer: float = 0.1
    aux: float = 0.1
    position: float = 1.0  # inside the situation loss (--Hpos)
    rotation: float = 1.0  # (--Hrot)
    scale: float = 10.0


def nn_distance(a: Tensor, b: Tensor, l1: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(dist1 [B, N], idx1 [B, N], dist2 [B, M], idx2 [B, M])`: for each point of `a [B, N, 3]` its nearest
    point of `b [B, M, 3]` and the distance to it, and the other way round; squared Euclidean distances, or
    L1 with `l1` (VoteNet's `nn_distance`)."""
    diff = a[:, :, None] - b[:, None]
    dist = diff.abs().sum(-1) if l1 else diff.square().sum(-1)
    dist1, idx1 = dist.min(dim=2)
    dist2, idx2 = dist.min(dim=1)
    return dist1, idx1, dist2, idx2


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """`sum(values * mask) / (sum(mask) + 1e-6)`, the reference's mean over the marked entries."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum() + 1e-6)


def vote_loss(seed_xyz: Tensor, seed_inds: Tensor, vote_xyz: Tensor, vote_label: Tensor, vote_label_mask: Tensor) -> Tensor:
    """L1 distance of each seed's vote to the nearest of its point's 3 ground-truth votes (`vote_label [B, N, 9]`:
    offsets from the point), averaged over the seeds whose point lies in an object (`vote_label_mask [B, N]`)."""
    seed_inds = seed_inds.long()
    mask = vote_label_mask.gather(1, seed_inds)
    offsets = vote_label.gather(1, seed_inds[..., None].expand(-1, -1, 3 * GT_VOTE_FACTOR))
    targets = offsets.view(*seed_inds.shape, GT_VOTE_FACTOR, 3) + seed_xyz[:, :, None]  # [B, S, 3, 3]
    distance = (vote_xyz[:, :, None] - targets).abs().sum(-1).min(dim=-1).values  # [B, S]
    return masked_mean(distance, mask)


def objectness_loss(
    aggregated_vote_xyz: Tensor, center_label: Tensor, objectness_scores: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(loss, label [B, P], mask [B, P], assignment [B, P])`: a proposal whose aggregated vote lies within
    `NEAR_THRESHOLD` of a ground-truth centre is an object (label 1, assigned to that box), one beyond
    `FAR_THRESHOLD` a non-object; the loss is the cross-entropy weighted `OBJECTNESS_CLASS_WEIGHTS`,
    averaged over the proposals outside the band in between."""
    dist1, assignment, _, _ = nn_distance(aggregated_vote_xyz, center_label[..., :3])
    distance = torch.sqrt(dist1 + 1e-6)
    label = (distance < NEAR_THRESHOLD).long()
    mask = ((distance < NEAR_THRESHOLD) | (distance > FAR_THRESHOLD)).float()
    weight = objectness_scores.new_tensor(OBJECTNESS_CLASS_WEIGHTS)
    loss = F.cross_entropy(objectness_scores.transpose(1, 2), label, weight=weight, reduction="none")
    return masked_mean(loss, mask), label, mask, assignment


def box_losses(
    outputs: dict[str, Tensor], batch: dict[str, Tensor], label: Tensor, assignment: Tensor, mean_size: Tensor
) -> dict[str, Tensor]:
    """VoteNet's box losses and the semantic-class loss, over the object proposals (`label`) each against the
    ground-truth box it is assigned to: `center` (squared distance of each object proposal's centre to the
    nearest ground-truth centre, plus of each real box's centre to the nearest proposal centre), `heading_cls`
    and `size_cls` (cross-entropy), `heading_reg` (Huber of the normalised residual of the true bin),
    `size_reg` (Huber of the true cluster's residual over its mean size `mean_size [S, 3]`, mean over x, y, z),
    `sem_cls` (cross-entropy)."""
    heading_bins = outputs["heading_scores"].shape[-1]
    dist1, _, dist2, _ = nn_distance(outputs["center"], batch["center_label"][..., :3])
    center = masked_mean(dist1, label) + masked_mean(dist2, batch["box_label_mask"])

    def assigned(key: str) -> Tensor:  # the assigned box's target for every proposal
        target = batch[key]
        index = assignment if target.ndim == 2 else assignment[..., None].expand(-1, -1, target.shape[-1])
        return target.gather(1, index)

    heading_class = assigned("heading_class_label")
    heading_cls = masked_mean(F.cross_entropy(outputs["heading_scores"].transpose(1, 2), heading_class, reduction="none"),
                              label)  # fmt: skip
    heading_residual = assigned("heading_residual_label") / (math.pi / heading_bins)
    predicted_heading = outputs["heading_residuals_normalized"].gather(2, heading_class[..., None]).squeeze(-1)
    heading_reg = masked_mean(F.huber_loss(predicted_heading, heading_residual, reduction="none", delta=1.0), label)

    size_class = assigned("size_class_label")
    size_cls = masked_mean(F.cross_entropy(outputs["size_scores"].transpose(1, 2), size_class, reduction="none"), label)
    index = size_class[..., None, None].expand(-1, -1, 1, 3)
    predicted_size = outputs["size_residuals_normalized"].gather(2, index).squeeze(2)  # [B, P, 3]
    size_residual = assigned("size_residual_label") / mean_size.to(predicted_size)[size_class]
    size_reg = masked_mean(F.huber_loss(predicted_size, size_residual, reduction="none", delta=1.0).mean(-1), label)

    sem_class = assigned("sem_cls_label")
    sem_cls = masked_mean(F.cross_entropy(outputs["sem_cls_scores"].transpose(1, 2), sem_class, reduction="none"), label)
    return {"center": center, "heading_cls": heading_cls, "heading_reg": heading_reg, "size_cls": size_cls,
            "size_reg": size_reg, "sem_cls": sem_cls}  # fmt: skip


def answer_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits against the soft answer scores, summed over answers, mean over samples."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)


def situation_loss(prediction: Tensor, target: Tensor, weights: LossWeights = LossWeights()) -> tuple[Tensor, Tensor, Tensor]:
    """`(loss, position, rotation)`: mean squared errors of the position (x, y, z) and of the quaternion."""
    position = F.mse_loss(prediction[:, :3], target[:, :3])
    rotation = F.mse_loss(prediction[:, 3:], target[:, 3:])
    return weights.position * position + weights.rotation * rotation, position, rotation


def scanqa_losses(
    outputs: dict[str, Tensor], batch: dict[str, Tensor], mean_size: Tensor, weights: LossWeights = LossWeights()
) -> dict[str, Tensor]:
    """Every loss of a batch and their total (`"loss"`): `scale x (vote x w + objectness x w + box x w + sem_cls x w
    + answer x w + aux x w)`, with `box = center + 0.1 heading_cls + heading_reg + 0.1 size_cls + size_reg`
    (the reference's `get_loss`). `aux` (the situation loss) is there when the outputs hold a
    `situation_prediction`."""
    vote = vote_loss(outputs["seed_xyz"], outputs["seed_inds"], outputs["vote_xyz"], batch["vote_label"], batch["vote_label_mask"])
    objectness, label, _, assignment = objectness_loss(
        outputs["aggregated_vote_xyz"], batch["center_label"], outputs["objectness_scores"]
    )
    losses = {"vote": vote, "objectness": objectness}
    parts = box_losses(outputs, batch, label, assignment, mean_size)
    losses["box"] = parts["center"] + 0.1 * parts["heading_cls"] + parts["heading_reg"] + 0.1 * parts["size_cls"] + parts["size_reg"]
    losses.update({name: parts[name] for name in ("center", "heading_cls", "heading_reg", "size_cls", "size_reg", "sem_cls")})
    losses["answer"] = answer_loss(outputs["answer_scores"], batch["answer_targets"])
    total = (weights.vote * losses["vote"] + weights.objectness * losses["objectness"] + weights.box * losses["box"]
             + weights.sem_cls * losses["sem_cls"] + weights.answer * losses["answer"])  # fmt: skip
    if outputs.get("situation_prediction") is not None:
        prediction, target = outputs["situation_prediction"], batch["situation_target"]
        losses["aux"], losses["position"], losses["rotation"] = situation_loss(prediction, target, weights)
        total = total + weights.aux * losses["aux"]
    losses["loss"] = weights.scale * total
    losses["object_ratio"] = label.float().mean().detach()  # the reference's pos_ratio
    return losses
