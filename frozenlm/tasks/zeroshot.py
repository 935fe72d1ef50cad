"""Zero-shot evaluation with a CLIP teacher's text tower (CLIP, Radford et al., 2021), as UTA scores its student:
the prompts and class names, the classifier of class embeddings, and one evaluation epoch's scores of image
encoders (top-1/5 accuracy on classes, or retrieval recall on captions).

Prompts (`zeroshot_templates`): a list of templates with one `{}` for the class name, `clip7` (the seven
CLIP's authors found best as an ensemble for ImageNet, the default) or `openai_imagenet` (CLIP's 80 ImageNet
prompts, from open_clip). Class names (`zeroshot_class_names`): a file (JSON list or one per line) in the
data's class order, `imagenet` (open_clip's, in wnid order), or the datamodule's `classes`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from frozenlm.models.clip_teacher import CLIPTeacher
from frozenlm.metrics import RetrievalRecall

# The seven prompts CLIP's authors found best as an ensemble for ImageNet (their prompt-engineering notebook).
CLIP_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)  # fmt: skip
TEMPLATE_SETS = ("clip7", "openai_imagenet")


def check_templates(templates: list[str] | str | None) -> None:
    """Refuse a `zeroshot_templates` setting that is neither a named set nor templates with one `{}` each."""
    if isinstance(templates, str) and templates not in TEMPLATE_SETS:
        raise ValueError(f"zeroshot_templates must be a list of prompts or one of {sorted(TEMPLATE_SETS)}, got {templates!r}.")
    for template in [] if isinstance(templates, str) else templates or ():
        if template.count("{}") != 1:
            raise ValueError(f"Each zero-shot template needs exactly one {{}} for the class name: {template!r}.")


def zeroshot_templates(templates: list[str] | str | None) -> list:
    """The prompt makers `name -> prompt` of a `zeroshot_templates` setting: a list of `{}` templates,
    `clip7` / None (`CLIP_TEMPLATES`) or `openai_imagenet` (open_clip's 80 ImageNet prompts)."""
    if templates == "openai_imagenet":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    chosen = CLIP_TEMPLATES if templates in (None, "clip7") else templates
    return [template.format for template in chosen]


def class_names(setting: str | None, num_classes: int | None, classes: Sequence | None) -> list[str] | None:
    """The zero-shot class names of a `zeroshot_class_names` setting: `imagenet` (open_clip's), a file, or
    (None) the data's `classes` (None when it names none); `num_classes` (when set) must be their number."""
    if setting == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
        if num_classes not in (None, len(names)):
            raise ValueError(f"--model.zeroshot_class_names imagenet names {len(names)} classes; the data has {num_classes}.")
        return names
    if setting is None:
        if classes is not None and num_classes not in (None, len(classes)):
            raise ValueError(f"The data names {len(classes)} classes, but model.num_classes is {num_classes}.")
        return None if classes is None else [str(c) for c in classes]
    text = Path(setting).read_text()
    names = json.loads(text) if setting.endswith(".json") else [line.strip() for line in text.splitlines() if line.strip()]
    expected = num_classes or len(names)
    if len(names) != expected:
        raise ValueError(f"--model.zeroshot_class_names {setting} names {len(names)} classes; the data has {expected}.")
    return names


@torch.no_grad()
def zeroshot_classifier(teacher: CLIPTeacher, names: list[str], templates: list[str] | str | None) -> Tensor:
    """`[C, E]`: per class, the normalised mean of the normalised text embeddings of its prompts (CLIP's)."""
    makers = zeroshot_templates(templates)
    rows = []
    for name in names:
        embeddings = F.normalize(teacher.encode_texts([make(name) for make in makers]).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def text_embeddings(teacher: CLIPTeacher, texts: list[str], batch: int = 256) -> Tensor:
    """`[T, E]`: the normalised text embeddings of `texts` (captions), `batch` at a time."""
    return F.normalize(torch.cat([teacher.encode_texts(texts[i : i + batch]).float() for i in range(0, len(texts), batch)]), dim=-1)


class ZeroShotScores:
    """One evaluation epoch's zero-shot scores of image encoders (`who`: `student`, `teacher`), either against
    a `classifier` of class embeddings (top-1/5 accuracy of `logit_scale` x cosine logits) or against caption
    embeddings `texts` whose images are `owners` (retrieval recall: `RetrievalRecall`).
    Rows that only even out the processes' shares of a split are left out (`scored`, [`BaseTask.scored`][frozenlm.tasks.BaseTask.scored]); the
    metrics gather every process's rows when computed."""

    def __init__(self, who: Sequence[str], scored: Callable, classifier: Tensor | None = None, logit_scale: Tensor | None = None,
                 texts: Tensor | None = None, owners: Tensor | None = None, stage: str = "evaluation",
                 warn: bool = True) -> None:  # fmt: skip
        self.who, self.scored, self.classifier, self.logit_scale = tuple(who), scored, classifier, logit_scale
        self.texts, self.owners, self.updated = texts, owners, False
        if texts is not None:
            self.recall = {w: RetrievalRecall().to(texts.device) for w in self.who}
            for metric in self.recall.values():
                metric.start(owners, stage, warn)
        if classifier is not None:
            count = len(classifier)
            self.accuracy = {w: {k: MulticlassAccuracy(count, top_k=min(k, count), average="micro").to(classifier.device) for k in (1, 5)}
                             for w in self.who}  # fmt: skip

    @classmethod
    def start(cls, teacher: CLIPTeacher, names: list[str] | None, datamodule: Any, stage: str, who: Sequence[str],
              scored: Callable, templates: list[str] | str | None = None, warn: bool = True) -> ZeroShotScores | None:  # fmt: skip
        """The scores of an evaluation epoch: on the class `names` (CLIP's classifier of `templates`), else on the
        captions of the `datamodule`'s `stage` split (its `captions(stage)`); None when there are neither."""
        if names is not None:
            classifier = zeroshot_classifier(teacher, names, templates)
            return cls(who, scored, classifier=classifier, logit_scale=teacher.logit_scale().float())
        if not hasattr(datamodule, "captions"):
            return None
        texts, owners = datamodule.captions(stage)
        embeddings = text_embeddings(teacher, texts)
        return cls(who, scored, texts=embeddings, owners=owners.to(embeddings.device), stage=stage, warn=warn)

    def update(self, batch: dict[str, Any], embeddings: dict[str, Tensor]) -> None:
        """Score a batch's normalised image embeddings `[B, E]` per encoder."""
        if self.classifier is not None:
            if "label" not in batch:
                return
            for who in self.who:
                logits = self.logit_scale * embeddings[who] @ self.classifier.T
                scored_logits, labels = self.scored(batch, logits, batch["label"])
                if not len(labels):  # the batch only evened out the processes' shares
                    continue
                for metric in self.accuracy[who].values():
                    metric.update(scored_logits, labels)
            return
        index, *rows = self.scored(batch, batch["index"].to(self.texts.device), *(embeddings[w] @ self.texts.T for w in self.who))
        self.updated = True
        for who, scores in zip(self.who, rows):
            self.recall[who].update(index, scores)

    def compute(self, stage: str) -> dict[str, Tensor]:
        """`{<stage>_zeroshot_acc1: ...}` (`<stage>_teacher_zeroshot_...` for the teacher), or the recalls
        `<stage>_zeroshot_ir_r1`..., over every process's images."""
        prefix = {"student": f"{stage}_zeroshot", "teacher": f"{stage}_teacher_zeroshot"}
        if self.classifier is not None:
            return {f"{prefix[w]}_acc{k}": metric.compute() for w in self.who for k, metric in self.accuracy[w].items()}
        if not self.updated:
            return {}
        return {f"{prefix[w]}_{name}": value for w in self.who for name, value in self.recall[w].compute().items()}
