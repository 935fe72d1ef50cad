"""Vision-language tasks on METER with a frozen LM block after fusion (LM4VE's VQAv2 and Flickr30k runs).

LM4VE reports that the frozen LLaMA block also helps METER (initialised from CLIP and RoBERTa, no
vision-language pretraining): after the co-attention layers the visual tokens pass through Linear ->
frozen LM layer -> Linear before pooling. The model, the block's placement included, is
[`METER`][frozenlm.models.meter.METER]; the tasks are METER's fine-tuning recipes around it:
[`VisualQuestionAnswering`][frozenlm.tasks.vqa.VisualQuestionAnswering] (`frozenlm/tasks/vqa.py`) and
[`ImageTextRetrieval`][frozenlm.tasks.retrieval.ImageTextRetrieval] (`frozenlm/tasks/retrieval.py`). What they share is
here: the flags, METER's optimiser groups and the checkpoint format check.

Optimisation follows METER's fine-tuning: AdamW (betas 0.9, 0.98), weight decay 0.01 (none on biases
and norms), base lr 5e-6 for the towers, multiplied for the heads (`head_lr_mult`), the cross-modal
layers (`fusion_lr_mult`) and the LM block's adapters (`llm_lr_mult`: 10, as LM4VE gives its
adapters 10x the image encoder's lr).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from frozenlm.errors import FrozenLMError
from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.models.meter import METER
from frozenlm.tasks.base import BaseTask

# Parameter-name prefixes (inside the model) of METER's cross-modal part: its "cross_modal_*" modules, the ones
# METER's `set_schedule` (meter/modules/meter_utils.py, line 188) gives `lr_mult_cross_modal`. The modality
# (token-type) embeddings are not among them and keep the towers' lr, as in METER.
FUSION_PREFIXES = ("meter.text_layers", "meter.image_layers", "meter.text_pooler", "meter.image_pooler",
                   "meter.text_transform", "meter.image_transform")  # fmt: skip

# Checkpoints of this task family record the architecture they were written with; older ones (a VQA head
# twice METER's width, a CLIP tower running all its blocks) cannot be loaded into today's model. Checkpoints
# written before the model was a module of its own (keys `meter.*`, not `model.meter.*`) are the same
# architecture: their keys are migrated on load (`frozenlm.tasks.base.migrate_model_keys`).
ARCHITECTURE_VERSION = 2
ARCHITECTURE_CHANGES = {2: "METER's VQA head (Linear(2h, 2h)), METER's CLIP tower (layers - 1 blocks), retrieval's rank and ITM heads"}


class IncompatibleCheckpointError(FrozenLMError, ValueError):
    """A vision-language checkpoint written by an older frozenlm whose model differs from today's."""


def with_task_defaults(task: type, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """`hparams` over the defaults of `task`'s constructor and its bases' (what the task would save), so that
    `build_model` of a few flags gives the model the task itself would build (VQA's 50 tokens, retrieval's 384 px)."""
    defaults: dict[str, Any] = {}
    for cls in reversed(task.__mro__):
        if "__init__" in vars(cls):
            parameters = inspect.signature(vars(cls)["__init__"]).parameters.values()
            defaults |= {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return defaults | dict(hparams)


class VisionLanguageTask(FrozenLMMixin, BaseTask):
    """What VQA and retrieval share: the [`METER`][frozenlm.models.meter.METER] model they train (`self.model`),
    METER's optimizer groups and the checkpoint format check.

    Args:
        vision_checkpoint: CLIP checkpoint of the image tower: a local Hugging Face folder or a hub id
            (METER: `openai/clip-vit-base-patch32`).
        text_checkpoint: text tower and tokenizer (METER: `FacebookAI/roberta-base`).
        checkpoint_revision: hub revision of both.
        fusion_layers, fusion_hidden, fusion_heads: the co-attention layers (METER: 6, 768, 12).
        img_size: image side (must match the datamodule's).
        max_text_len: tokens per text, longer ones truncated (METER: 40 for retrieval, 50 for VQA).
        llm: the frozen LM block (see [`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
        llm_tokens: `visual` (the image stream's tokens through the block) or `all` (text and image
            tokens in one sequence, text padding masked).
        head_lr_mult, fusion_lr_mult, llm_lr_mult: lr multipliers of the heads, the cross-modal layers and
            the block's trainable parameters (adapters, LoRA) over the towers' `lr`. Which modules count
            as heads is the subclass's `head_modules` (METER's `lr_mult_head` names); the modality
            embeddings and everything else keep `lr`.
        lr, weight_decay, betas, warmup_epochs, min_lr, lr_reference_batch, **kwargs: see
            [`BaseTask`][frozenlm.tasks.BaseTask] (METER: lr 5e-6 for a batch of 512, linear warmup over 10% of
            training then linear decay; here the decay is the base class's cosine).

    Examples:
        Subclassed by [`VisualQuestionAnswering`][frozenlm.tasks.VisualQuestionAnswering] and
        [`ImageTextRetrieval`][frozenlm.tasks.ImageTextRetrieval]; see their configs (`configs/vqav2_meter*.yaml`,
        `configs/flickr30k_meter*.yaml`).
    """

    sample_id_key = "id"
    monitor_mode = "max"
    # The model's heads that get `head_lr_mult` (METER's `head_names`, meter_utils.py line 187).
    head_modules: tuple[str, ...] = ()

    def __init__(
        self,
        vision_checkpoint: str,
        text_checkpoint: str,
        checkpoint_revision: str | None = None,
        fusion_layers: int = 6,
        fusion_hidden: int = 768,
        fusion_heads: int = 12,
        img_size: int = 576,
        max_text_len: int = 40,
        llm: LLMConfig | None = None,
        llm_tokens: str = "visual",
        head_lr_mult: float = 50.0,
        fusion_lr_mult: float = 5.0,
        llm_lr_mult: float = 10.0,
        lr: float = 5e-6,
        lr_reference_batch: int = 0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] | None = (0.9, 0.98),
        warmup_epochs: float = 1.0,
        min_lr: float = 0.0,
        warmup_lr: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, betas=betas,
            warmup_epochs=warmup_epochs, min_lr=min_lr, warmup_lr=warmup_lr, **kwargs,
        )  # fmt: skip

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> METER:
        """The [`METER`][frozenlm.models.meter.METER] the hyper-parameters describe (each task's heads)."""
        raise NotImplementedError

    def configure_models(self) -> None:
        self.model = self.build_model(self.hparams)

    def forward(self, images: Tensor, texts: list[str]) -> Tensor:
        """The model's inference output for `images [B, 3, S, S]` paired with `texts` (B strings)."""
        return self.model(images, *self.model.tokenize(texts))

    # -- optimizer ---------------------------------------------------------------------------
    def optimizer_parameters(self, lr: float, weight_decay: float) -> list[dict]:
        """METER's groups: towers at `lr`, cross-modal layers, heads and the block's trainable parameters at
        their multiples; no weight decay on biases, norms and 1-d parameters."""
        hp = self.hparams
        groups: dict[tuple[str, bool], list[Tensor]] = {}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            part = ("llm" if name.startswith("llm_block.") else "fusion" if name.startswith(FUSION_PREFIXES)
                    else "head" if name.split(".")[0] in self.head_modules else "towers")  # fmt: skip
            groups.setdefault((part, parameter.ndim > 1), []).append(parameter)
        multiplier = {"towers": 1.0, "fusion": hp.fusion_lr_mult, "head": hp.head_lr_mult, "llm": hp.llm_lr_mult}
        return [
            {"params": params, "lr": lr * multiplier[part], "weight_decay": weight_decay if decay else 0.0}
            for (part, decay), params in groups.items()
        ]

    # -- checkpoints: the architecture they hold -----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["frozenlm_vision_language_version"] = ARCHITECTURE_VERSION

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        version = checkpoint.get("frozenlm_vision_language_version", 1)
        if version != ARCHITECTURE_VERSION:
            changes = "; ".join(text for v, text in ARCHITECTURE_CHANGES.items() if version < v <= ARCHITECTURE_VERSION)
            raise IncompatibleCheckpointError(
                f"This vision-language checkpoint was written by an older frozenlm (format {version}, today's "
                f"{ARCHITECTURE_VERSION}) whose model differs: {changes or 'unknown changes'}. It cannot be loaded "
                "without leaving parts random: retrain, or evaluate it with the frozenlm version that wrote it."
            )
        super().on_load_checkpoint(checkpoint)  # then keys of the older layout move under `model.`


# The tasks and their helpers live in tasks/vqa.py and tasks/retrieval.py; this module's old names still import.
_MOVED = {
    "VisualQuestionAnswering": "frozenlm.tasks.vqa", "VQAResultsJSON": "frozenlm.tasks.vqa",
    "AnswerVocabularyError": "frozenlm.tasks.vqa", "answer_settings": "frozenlm.tasks.vqa",
    "ImageTextRetrieval": "frozenlm.tasks.retrieval", "RetrievalPredictionsJSON": "frozenlm.tasks.retrieval",
    "vqa_head": "frozenlm.models.meter", "init_bert_weights": "frozenlm.models.meter",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
