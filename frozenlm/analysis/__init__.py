"""Analyses of LM4VE and GCR: gradient coherence, linear CKA, per-token activation maps, adversarial accuracy;
pictures of learngene models."""

from frozenlm.analysis.activation_maps import (
    cls_attention_map,
    frequency_map,
    magnitude_map,
    minmax_normalize,
    overlay,
    pseudo_mask_iou,
    to_patch_grid,
)
from frozenlm.analysis.callbacks import GradientCoherenceCallback
from frozenlm.analysis.cka import linear_cka
from frozenlm.analysis.learngenes import gene_norms, plot_accuracy_vs_depth, plot_coefficients
from frozenlm.analysis.coherence import m_coherence, mean_pairwise_cosine, per_sample_gradients
from frozenlm.analysis.model_maps import pseudo_mask_scores, stage_maps, stage_tokens
from frozenlm.analysis.rank_layers import rank_layers
from frozenlm.analysis.robustness import AdversarialAccuracy

__all__ = [
    "AdversarialAccuracy",
    "GradientCoherenceCallback",
    "cls_attention_map",
    "frequency_map",
    "gene_norms",
    "linear_cka",
    "m_coherence",
    "magnitude_map",
    "mean_pairwise_cosine",
    "minmax_normalize",
    "overlay",
    "per_sample_gradients",
    "plot_accuracy_vs_depth",
    "plot_coefficients",
    "pseudo_mask_iou",
    "pseudo_mask_scores",
    "rank_layers",
    "stage_maps",
    "stage_tokens",
    "to_patch_grid",
]
