"""SQA3D's ScanQA baseline (Ma et al., ICLR 2023; SilongYong/SQA3D ``ScanQA/``) with a frozen LM block after
fusion (LM4VE, Pang et al., ICLR 2024).

    points -> PointNet++ (4 SA + 2 FP) -> 1,024 seeds -> votes -> proposals (vote aggregation + box head)
    situation, question (GloVe) -> one shared LSTM
    MCAN: 2 self-attention layers on the situation, 2 on the question; the proposals' features guided by the
          situation (2 layers), then by the question (2 layers); non-object proposals masked
    -> [frozen LM block on the object tokens, non-objects masked] -> AttFlat pooling of situation, question, objects
    -> answer head on cat(s, q, o); auxiliary situation head (position + quaternion) on cat(s, o)

Layer order, sizes, biases, norms, dropout and init follow the reference (read for facts, not copied): the
PointNet++ MLPs are 1x1 convs without bias + BN + ReLU with Kaiming-normal weights (``pytorch_utils``), grouped
xyz divided by the radius; the voting module's convs have biases and default init; the proposal head's first two
convs have no bias; vote features are divided by their L2 norm; MCAN is post-norm with its own LayerNorm
(``a * (x - mean) / (std + 1e-6) + b``, ``std`` unbiased), attention masks fill -1e9 (so a sample whose
proposals are all non-objects attends uniformly, as the reference; float16's lowest value in float16), dropout
on the attention map; the situation
and question share one LSTM and one projection (``lang_feat_linear``). Point ops are
:mod:`frozenlm.models.point_ops` (the CUDA kernels' semantics, in PyTorch).

Four modules the reference defines are not built, since its forward never reads them (no gradient, no effect):
``s_feat_linear``, ``q_feat_linear``, ``object_cls``, ``attflat_lstm_q`` (tests/test_scanqa_model.py counts them).
The reference cannot run without its object mask (``use_object_mask=False`` fails on ``None.dim()``), so the mask
is always on. The language padding mask comes from the lengths (the reference's ``sum |h| == 0`` on the packed
LSTM's zero padding marks the same positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from frozenlm.errors import ConfigurationError
from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.models.config import FromHParams
from frozenlm.models.point_ops import (
    farthest_point_sample, gather_points, interpolation_weights, query_and_group, three_interpolate, three_nn,
)  # fmt: skip


@dataclass
class ScanQAConfig(FromHParams):
    """A :class:`ScanQA`; field names are the SQA3D task's flags. Defaults are the reference's (``scripts/train.py``
    with ``--use_color --use_aux_situation``).

    Attributes:
        num_answers: answer classes (the training answer vocabulary's size; the datamodule's ``num_answers``).
        num_points: points per scene (informational: the model takes any count of at least ``sa_points[0]``).
        input_feature_dim: point features beyond xyz (colour 3 + height 1).
        num_proposals: object proposals (vote clusters).
        num_heading_bin, num_size_cluster, num_class: VoteNet's box parameterisation (ScanNet: 1, 18, 18).
        mean_size: ``num_size_cluster`` rows ``[l, w, h]``, the size clusters' means (the datamodule's ``mean_size``).
        sa_points, sa_radii, sa_nsamples: the four set-abstraction layers' centres, ball radii, samples per ball.
        seed_feat_dim: seed (and vote) feature width.
        proposal_size: vote aggregation's MLP width (the proposals' feature width).
        vote_radius, vote_nsample: vote aggregation's ball.
        embedding_size: word vector width (GloVe 300).
        hidden_size: LSTM and fusion width.
        lstm_dropout: dropout on the word vectors before the LSTM (the reference's ``lang_pdrop``).
        mcan_layers, heads, ffn, fusion_dropout: the MCAN layers (each of the four stacks has ``mcan_layers``).
        flat_mlp_size, flat_out_size: AttFlat's scoring MLP width and its output width.
        answer_dropout: the answer head's dropout.
        aux_dropout: the situation head's dropout.
        use_situation_aux: build and run the auxiliary situation head (position + quaternion, 7 values).
        llm: the frozen LM block (:class:`frozenlm.llm.LLMConfig`) on the fused object tokens; None for none.
    """

    num_answers: int | None = None
    num_points: int = 40000
    input_feature_dim: int = 4
    num_proposals: int = 256
    num_heading_bin: int = 1
    num_size_cluster: int = 18
    num_class: int = 18
    mean_size: list[list[float]] | None = None
    sa_points: list[int] = field(default_factory=lambda: [2048, 1024, 512, 256])
    sa_radii: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.8, 1.2])
    sa_nsamples: list[int] = field(default_factory=lambda: [64, 32, 16, 16])
    seed_feat_dim: int = 256
    proposal_size: int = 128
    vote_radius: float = 0.3
    vote_nsample: int = 16
    embedding_size: int = 300
    hidden_size: int = 256
    lstm_dropout: float = 0.3
    mcan_layers: int = 2
    heads: int = 8
    ffn: int = 1024
    fusion_dropout: float = 0.1
    flat_mlp_size: int = 256
    flat_out_size: int = 512
    answer_dropout: float = 0.3
    aux_dropout: float = 0.1
    use_situation_aux: bool = True
    llm: LLMConfig | None = None


# ------------------------------------------------------------------------------------------------------------------
# Detection: PointNet++, voting, proposals (VoteNet as ScanQA sizes it)
# ------------------------------------------------------------------------------------------------------------------
class SharedMLP(nn.Sequential):
    """1x1 convs without bias, each + BN + ReLU, Kaiming-normal weights (pointnet2 ``SharedMLP(bn=True)``); Conv2d on
    grouped ``[B, C, M, K]`` features, Conv1d on ``[B, C, N]``."""

    def __init__(self, sizes: list[int], dims: int = 2) -> None:
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layer = conv(a, b, 1, bias=False)
            nn.init.kaiming_normal_(layer.weight)
            layers += [layer, norm(b), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class SetAbstraction(nn.Module):
    """PointNet++ set abstraction (``PointnetSAModuleVotes``, max pooling, xyz normalised by the radius): FPS
    centres, ball query, ``[(xyz - centre) / r, features]`` through the MLP, max over each ball."""

    def __init__(self, npoint: int, radius: float, nsample: int, mlp: list[int]) -> None:
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, radius, nsample
        self.mlp = SharedMLP([mlp[0] + 3, *mlp[1:]])  # + the grouped xyz

    def forward(self, xyz: Tensor, features: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``xyz [B, N, 3]``, ``features [B, C, N]`` -> ``(centres [B, M, 3], features [B, C', M], indices [B, M])``."""
        if xyz.shape[1] < self.npoint:
            raise ConfigurationError(
                f"ScanQA's set abstraction takes {self.npoint} centres from clouds of {xyz.shape[1]} points: give "
                "more points (--data.num_points) or fewer centres (--model.sa_points)."
            )
        indices = farthest_point_sample(xyz, self.npoint).to(xyz.device)
        centres = gather_points(xyz, indices)
        grouped, _ = query_and_group(xyz, centres, features, self.radius, self.nsample, normalize_xyz=True)
        features = self.mlp(grouped)  # [B, C', M, nsample]
        return centres, F.max_pool2d(features, kernel_size=[1, features.shape[3]]).squeeze(-1), indices


class FeaturePropagation(nn.Module):
    """PointNet++ feature propagation: the known points' features interpolated at the unknown ones (three nearest,
    inverse-distance weights), concatenated before the unknown points' own, through the MLP."""

    def __init__(self, mlp: list[int]) -> None:
        super().__init__()
        self.mlp = SharedMLP(mlp, dims=1)

    def forward(self, unknown: Tensor, known: Tensor, unknown_features: Tensor, known_features: Tensor) -> Tensor:
        distances, indices = three_nn(unknown, known)
        interpolated = three_interpolate(known_features, indices, interpolation_weights(distances))
        return self.mlp(torch.cat([interpolated, unknown_features], dim=1))


class PointNet2Backbone(nn.Module):
    """ScanQA's detection backbone (``backbone_module.Pointnet2Backbone``, width 1, depth 2): four set abstractions
    ([c,64,64,128], [128,128,128,256], [256,128,128,256] x 2) and two feature propagations ([512,256,256] x 2)
    back to the second level's points, the seeds."""

    def __init__(self, config: ScanQAConfig) -> None:
        super().__init__()
        c = config.input_feature_dim
        widths = [[c, 64, 64, 128], [128, 128, 128, 256], [256, 128, 128, 256], [256, 128, 128, 256]]
        self.sa = nn.ModuleList(
            SetAbstraction(n, r, k, mlp)
            for n, r, k, mlp in zip(config.sa_points, config.sa_radii, config.sa_nsamples, widths, strict=True)
        )
        self.fp1 = FeaturePropagation([256 + 256, 256, 256])
        self.fp2 = FeaturePropagation([256 + 256, 256, config.seed_feat_dim])

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``points [B, N, 3 + c]`` -> ``(seed_xyz [B, S, 3], seed_features [B, seed_feat_dim, S], seed_inds
        [B, S])``."""
        xyz = points[..., :3].contiguous()
        features = points[..., 3:].transpose(1, 2).contiguous() if points.shape[-1] > 3 else None
        levels = []
        for layer in self.sa:
            xyz, features, indices = layer(xyz, features)
            levels.append((xyz, features, indices))
        (_, _, sa1_inds), (sa2_xyz, sa2_features, _), (sa3_xyz, sa3_features, _), (sa4_xyz, sa4_features, _) = levels
        features = self.fp1(sa3_xyz, sa4_xyz, sa3_features, sa4_features)
        features = self.fp2(sa2_xyz, sa3_xyz, sa2_features, features)
        # As the reference: the seeds' input indices are SA1's first ones (FPS of an FPS-ordered set keeps its order).
        return sa2_xyz, features, sa1_inds[:, : sa2_xyz.shape[1]]


class VotingModule(nn.Module):
    """VoteNet's voting (one vote per seed): Conv1d + BN + ReLU twice, then Conv1d to an xyz offset and a residual
    feature (all with biases, default init)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(dim, dim, 1), nn.Conv1d(dim, dim, 1)
        self.conv3 = nn.Conv1d(dim, 3 + dim, 1)
        self.bn1, self.bn2 = nn.BatchNorm1d(dim), nn.BatchNorm1d(dim)

    def forward(self, seed_xyz: Tensor, seed_features: Tensor) -> tuple[Tensor, Tensor]:
        """-> ``(vote_xyz [B, S, 3], vote_features [B, dim, S])``."""
        net = F.relu(self.bn1(self.conv1(seed_features)))
        net = F.relu(self.bn2(self.conv2(net)))
        net = self.conv3(net)
        return seed_xyz + net[:, :3].transpose(1, 2), seed_features + net[:, 3:]


class ProposalModule(nn.Module):
    """VoteNet's proposals: vote aggregation (SA on the votes, FPS of the vote positions) and the box head (two
    Conv1d without bias + BN + ReLU, then Conv1d with bias to 2 + 3 + 2H + 4S + C channels), decoded as VoteNet.
    ``mean_size`` is a buffer (stored with the weights)."""

    def __init__(self, config: ScanQAConfig, mean_size: Tensor) -> None:
        super().__init__()
        self.num_heading_bin, self.num_size_cluster = config.num_heading_bin, config.num_size_cluster
        width = config.proposal_size
        self.vote_aggregation = SetAbstraction(
            config.num_proposals, config.vote_radius, config.vote_nsample, [config.seed_feat_dim, width, width, width]
        )
        channels = 2 + 3 + 2 * config.num_heading_bin + 4 * config.num_size_cluster + config.num_class
        self.proposal = nn.Sequential(
            nn.Conv1d(width, width, 1, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 1, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, channels, 1),
        )  # fmt: skip
        self.register_buffer("mean_size", mean_size)

    def forward(self, vote_xyz: Tensor, vote_features: Tensor) -> dict[str, Tensor]:
        xyz, features, _ = self.vote_aggregation(vote_xyz, vote_features)
        net = self.proposal(features).transpose(1, 2)  # [B, P, channels]
        batch, proposals, _ = net.shape
        h, s = self.num_heading_bin, self.num_size_cluster
        heading_normalized = net[..., 5 + h : 5 + 2 * h]
        size_normalized = net[..., 5 + 2 * h + s : 5 + 2 * h + 4 * s].reshape(batch, proposals, s, 3)
        return {
            "aggregated_vote_xyz": xyz,
            "aggregated_vote_features": features.transpose(1, 2),  # [B, P, proposal_size]
            "objectness_scores": net[..., 0:2],
            "center": xyz + net[..., 2:5],
            "heading_scores": net[..., 5 : 5 + h],
            "heading_residuals_normalized": heading_normalized,
            "heading_residuals": heading_normalized * (math.pi / h),
            "size_scores": net[..., 5 + 2 * h : 5 + 2 * h + s],
            "size_residuals_normalized": size_normalized,
            "size_residuals": size_normalized * self.mean_size[None, None],
            "sem_cls_scores": net[..., 5 + 2 * h + 4 * s :],
        }


# ------------------------------------------------------------------------------------------------------------------
# Language and fusion (MCAN as SQA3D's ``mcan_sqa_module``)
# ------------------------------------------------------------------------------------------------------------------
class LanguageEncoder(nn.Module):
    """Dropout on the word vectors, then a 1-layer LSTM over the packed sequence (situation and question share it)."""

    def __init__(self, embedding_size: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.word_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers=1, batch_first=True)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [B, L, E]`` (zero-padded), ``lengths [B]`` -> ``(outputs [B, max(lengths), H]`` zero past each
        length, ``padding [B, max(lengths)]`` True past each length)."""
        packed = pack_padded_sequence(self.word_dropout(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        padding = torch.arange(outputs.shape[1], device=outputs.device) >= lengths.to(outputs.device)[:, None]
        return outputs, padding


class MCANLayerNorm(nn.Module):
    """MCAN's LayerNorm: ``a * (x - mean) / (std + eps) + b`` with the unbiased std (not ``nn.LayerNorm``)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.bias


def fill_value(scores: Tensor) -> float:
    """MCAN's -1e9 for masked scores (float16's lowest where -1e9 would be -inf, so that a row with every key
    masked stays uniform, as in float32)."""
    return max(-1e9, torch.finfo(scores.dtype).min)


class MultiHeadAttention(nn.Module):
    """MCAN's multi-head attention: separate v / k / q / merge linears, scores / sqrt(d_head), masked keys filled
    with -1e9, softmax, dropout on the attention map."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.linear_v, self.linear_k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.linear_q, self.linear_merge = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def split(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, v: Tensor, k: Tensor, q: Tensor, padding: Tensor) -> Tensor:
        """``padding [B, L_k]``: True at keys not attended."""
        v, k, q = self.split(self.linear_v(v)), self.split(self.linear_k(k)), self.split(self.linear_q(q))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(padding[:, None, None, :], fill_value(scores))
        attended = self.dropout(scores.softmax(dim=-1)) @ v
        return self.linear_merge(attended.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[3]))


class FeedForward(nn.Sequential):
    """MCAN's FFN: Linear, GELU, Dropout, Linear."""

    def __init__(self, hidden: int, ffn: int, dropout: float) -> None:
        super().__init__(nn.Linear(hidden, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, hidden))


class SelfAttentionLayer(nn.Module):
    """MCAN's SA (post-norm): ``x = norm1(x + drop(att(x, x))); x = norm2(x + drop(ffn(x)))``."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(hidden, heads, dropout)
        self.ffn = FeedForward(hidden, ffn, dropout)
        self.dropout1, self.norm1 = nn.Dropout(dropout), MCANLayerNorm(hidden)
        self.dropout2, self.norm2 = nn.Dropout(dropout), MCANLayerNorm(hidden)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.attention(x, x, x, padding)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class GuidedAttentionLayer(nn.Module):
    """MCAN's SGA (post-norm): self-attention on ``x``, then attention from ``x`` to the guide ``y``, then the FFN."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attention = MultiHeadAttention(hidden, heads, dropout)
        self.guided_attention = MultiHeadAttention(hidden, heads, dropout)
        self.ffn = FeedForward(hidden, ffn, dropout)
        self.dropout1, self.norm1 = nn.Dropout(dropout), MCANLayerNorm(hidden)
        self.dropout2, self.norm2 = nn.Dropout(dropout), MCANLayerNorm(hidden)
        self.dropout3, self.norm3 = nn.Dropout(dropout), MCANLayerNorm(hidden)

    def forward(self, x: Tensor, y: Tensor, x_padding: Tensor, y_padding: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attention(x, x, x, x_padding)))
        x = self.norm2(x + self.dropout2(self.guided_attention(y, y, x, y_padding)))
        return self.norm3(x + self.dropout3(self.ffn(x)))


class AttFlat(nn.Module):
    """MCAN's attention pooling (one glimpse): scores ``Linear-GELU-Dropout-Linear(->1)``, masked (-1e9) softmax over
    the tokens, the weighted sum, then ``linear_merge`` to ``out_size``."""

    def __init__(self, hidden: int, mlp_size: int, out_size: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_size, 1))
        self.linear_merge = nn.Linear(hidden, out_size)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        """``x [B, L, hidden]``, ``padding [B, L]`` (True = left out) -> ``[B, out_size]``."""
        scores = self.mlp(x)
        weights = scores.masked_fill(padding[..., None], fill_value(scores)).softmax(dim=1)
        return self.linear_merge((weights * x).sum(dim=1))


def answer_mlp(in_size: int, hidden: int, out_size: int, dropout: float) -> nn.Sequential:
    """The reference's heads: Linear, GELU, Dropout, Linear."""
    return nn.Sequential(nn.Linear(in_size, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_size))


# ------------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------------
class ScanQA(nn.Module):
    """ScanQA (SQA3D's baseline) with the frozen LM block on the fused object tokens.

    ``forward(batch) -> (outputs, branch)``: ``batch`` holds ``point_clouds [B, N, 3 + c]``, ``situation_tokens
    [B, Ls, E]`` / ``situation_lengths [B]``, ``question_tokens`` / ``question_lengths``; ``outputs`` the detection
    outputs VoteNet's losses read (``seed_xyz``, ``seed_inds``, ``vote_xyz``, ``aggregated_vote_xyz``,
    ``objectness_scores``, ``center``, ``heading_*``, ``size_*``, ``sem_cls_scores``), ``answer_scores [B, answers]``,
    ``situation_prediction [B, 7]`` (with ``use_situation_aux``), and what GCR's auxiliary head reads:
    ``object_mask [B, P]`` (True = not an object, masked), the pooled ``situation_features`` /
    ``question_features`` / ``object_features``. ``branch`` is the block's output on the fused object tokens (GCR,
    training only), else None; :meth:`forward_aux_head` turns it into auxiliary answer logits.

    Submodules: ``language`` (shared LSTM), ``backbone``, ``voting``, ``proposal``, ``language_projection`` (shared
    by situation and question), ``object_projection``, ``situation_encoder`` / ``question_encoder`` (SA stacks),
    ``situation_guided`` / ``question_guided`` (SGA stacks), ``llm_block``, ``situation_pool`` /
    ``question_pool`` / ``object_pool`` (AttFlat), ``answer_head``, ``situation_head``; for GCR with
    ``llm.aux_head: separate``, ``aux_pool`` and ``aux_head`` (the object pooling and answer head's shapes).
    """

    def __init__(self, config: ScanQAConfig) -> None:
        super().__init__()
        self.config = config
        self.llm_config = LLMConfig(**config.llm) if isinstance(config.llm, Mapping) else config.llm
        if not config.num_answers or config.num_answers < 1:
            raise ConfigurationError(
                f"ScanQA needs num_answers (the answer vocabulary's size), got {config.num_answers!r}: link it from "
                "the SQA3D datamodule or set --model.num_answers."
            )
        mean_size = torch.tensor(config.mean_size if config.mean_size is not None else [], dtype=torch.float32)
        if mean_size.shape != (config.num_size_cluster, 3):
            raise ConfigurationError(
                f"ScanQA's mean_size must be {config.num_size_cluster} rows [l, w, h] (num_size_cluster), got shape "
                f"{tuple(mean_size.shape)}: link it from the SQA3D datamodule (its mean_size) or set --model.mean_size."
            )
        sa = (config.sa_points, config.sa_radii, config.sa_nsamples)
        if any(len(values) != 4 for values in sa):
            raise ConfigurationError(
                "ScanQA's backbone has four set-abstraction layers: sa_points, sa_radii and sa_nsamples need 4 values "
                f"each, got {[list(values) for values in sa]}."
            )
        hidden, heads, ffn, dropout = config.hidden_size, config.heads, config.ffn, config.fusion_dropout
        # Language
        self.language = LanguageEncoder(config.embedding_size, hidden, config.lstm_dropout)
        # Detection
        self.backbone = PointNet2Backbone(config)
        self.voting = VotingModule(config.seed_feat_dim)
        self.proposal = ProposalModule(config, mean_size)
        # Fusion
        self.language_projection = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())
        self.object_projection = nn.Sequential(nn.Linear(config.proposal_size, hidden), nn.GELU())
        layers = range(config.mcan_layers)
        self.situation_encoder = nn.ModuleList(SelfAttentionLayer(hidden, heads, ffn, dropout) for _ in layers)
        self.question_encoder = nn.ModuleList(SelfAttentionLayer(hidden, heads, ffn, dropout) for _ in layers)
        self.situation_guided = nn.ModuleList(GuidedAttentionLayer(hidden, heads, ffn, dropout) for _ in layers)
        self.question_guided = nn.ModuleList(GuidedAttentionLayer(hidden, heads, ffn, dropout) for _ in layers)
        self.llm_block = create_block(self.llm_config, hidden)
        # Pooling and heads
        flat = config.flat_out_size
        self.situation_pool = AttFlat(hidden, config.flat_mlp_size, flat, 0.1)
        self.question_pool = AttFlat(hidden, config.flat_mlp_size, flat, 0.1)
        self.object_pool = AttFlat(hidden, config.flat_mlp_size, flat, 0.1)
        self.answer_head = answer_mlp(3 * flat, hidden, config.num_answers, config.answer_dropout)
        self.situation_head = answer_mlp(2 * flat, hidden, 7, config.aux_dropout) if config.use_situation_aux else None
        llm = self.llm_config
        if llm is not None and llm.mode == "auxiliary" and llm.aux_head == "separate":  # GCR's own pooling + head
            self.aux_pool = AttFlat(hidden, config.flat_mlp_size, flat, 0.1)
            self.aux_head = answer_mlp(3 * flat, hidden, config.num_answers, config.answer_dropout)

    def detect(self, points: Tensor) -> dict[str, Tensor]:
        """VoteNet on ``points [B, N, 3 + c]``: seeds, votes, proposals and their decoded boxes, and ``object_mask``
        (True where the objectness argmax says "not an object")."""
        seed_xyz, seed_features, seed_inds = self.backbone(points)
        vote_xyz, vote_features = self.voting(seed_xyz, seed_features)
        vote_features = vote_features / vote_features.norm(p=2, dim=1, keepdim=True)
        outputs = {"seed_xyz": seed_xyz, "seed_inds": seed_inds, "vote_xyz": vote_xyz}
        outputs |= self.proposal(vote_xyz, vote_features)
        outputs["object_mask"] = outputs["objectness_scores"].detach().argmax(dim=-1) == 0
        return outputs

    def fuse_and_pool(
        self, situation: Tensor, situation_padding: Tensor, question: Tensor, question_padding: Tensor,
        objects: Tensor, object_padding: Tensor,
    ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:  # fmt: skip
        """MCAN fusion, the frozen LM block, AttFlat pooling: ``((s, q, o) pooled [B, flat_out_size] each, branch)``
        of the LSTM's ``situation`` / ``question`` tokens and the proposals' features ``objects [B, P, proposal_size]``
        (paddings: True = left out)."""
        situation, question = self.language_projection(situation), self.language_projection(question)
        objects = self.object_projection(objects)
        for layer in self.situation_encoder:
            situation = layer(situation, situation_padding)
        for layer in self.question_encoder:
            question = layer(question, question_padding)
        for layer in self.situation_guided:
            objects = layer(objects, situation, object_padding, situation_padding)
        for layer in self.question_guided:
            objects = layer(objects, question, object_padding, question_padding)
        # The frozen LM block on the fused object tokens, non-objects masked, before pooling (LM4VE's SQA3D model).
        objects, branch = apply_block(self.llm_block, objects, object_padding)
        pooled = (
            self.situation_pool(situation, situation_padding), self.question_pool(question, question_padding),
            self.object_pool(objects, object_padding),
        )  # fmt: skip
        return pooled, branch

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        situation, situation_padding = self.language(batch["situation_tokens"], batch["situation_lengths"])
        question, question_padding = self.language(batch["question_tokens"], batch["question_lengths"])
        outputs = self.detect(batch["point_clouds"])
        (s, q, o), branch = self.fuse_and_pool(
            situation, situation_padding, question, question_padding,
            outputs["aggregated_vote_features"], outputs["object_mask"],
        )  # fmt: skip
        outputs |= {"situation_features": s, "question_features": q, "object_features": o}
        outputs["answer_scores"] = self.answer_head(torch.cat([s, q, o], dim=1))
        if self.situation_head is not None:
            outputs["situation_prediction"] = self.situation_head(torch.cat([s, o], dim=1))
        return outputs, branch

    def forward_aux_head(self, branch: Tensor, outputs: Mapping[str, Tensor]) -> Tensor:
        """GCR's auxiliary answer logits ``[B, answers]``: the branch's object tokens pooled (non-objects masked) beside
        the main path's pooled situation and question, through GCR's own pooling and answer head (``llm.aux_head:
        separate``) or the model's (``shared``)."""
        separate = self.llm_config.aux_head == "separate"
        pool, head = (self.aux_pool, self.aux_head) if separate else (self.object_pool, self.answer_head)
        objects = pool(branch, outputs["object_mask"])
        return head(torch.cat([outputs["situation_features"], outputs["question_features"], objects], dim=1))
