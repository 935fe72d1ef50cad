"""Vision-language metrics: the official VQA accuracy here, and image-text retrieval recall (Recall@K,
`RetrievalRecall`, shared with UTA's zero-shot retrieval; importable from here too).

VQA accuracy follows the VQA challenge's evaluation script (GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`): a question scores the mean over the ten
leave-one-out subsets of nine human answers of `min(#matches / 3, 1)`. What is normalised before
matching changed in the script's history, so both rules are here, by name (`VQA_RULES`):

- `"2016"` (the script until its 2021 commit a013f00, `evaluate` lines 86-98): the prediction is
  stripped and normalised (punctuation, number words to digits, articles dropped, contractions
  restored); the human answers are never stripped, and normalised for punctuation only, and only when
  they are not all identical. A human "two" never matches a predicted "2".
- `"2021"` (the script since a013f00, `evaluate` lines 87-105): prediction and human answers are
  stripped; only when the human answers are not all identical are both normalised fully (punctuation,
  then digits, articles and contractions). When they agree, the prediction is compared as predicted.

Which rule the challenge's evaluation server (EvalAI) applies is not public: we could not establish it.
Accuracies are reported per answer type (yes/no, number, other) and overall, as fractions (the
challenge prints percentages).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from frozenlm.data.vqa_answers import ANSWER_TYPES, normalize_punctuation, normalize_words
from frozenlm.metrics import RetrievalRecall, retrieval_recalls, split_recalls

__all__ = ["VQAAccuracy", "VQA_RULES", "RetrievalRecall", "retrieval_recalls", "split_recalls", "vqa_accuracy"]

VQA_RULES = ("2016", "2021")


def _clean(text: str) -> str:
    """The script's first step on an answer: newlines and tabs to spaces, then stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(predicted: str, answers: list[str], rule: str = "2016") -> float:
    """One question's official accuracy under `rule` (see the module docstring): the mean over the
    leave-one-out subsets of the human `answers` of `min(matches / 3, 1)`."""
    if rule == "2016":
        predicted = normalize_words(normalize_punctuation(_clean(predicted)))
        if len(set(answers)) > 1:
            answers = [normalize_punctuation(a) for a in answers]
    elif rule == "2021":
        predicted, answers = _clean(predicted), [_clean(a) for a in answers]
        if len(set(answers)) > 1:
            answers = [normalize_words(normalize_punctuation(a)) for a in answers]
            predicted = normalize_words(normalize_punctuation(predicted))
    else:
        raise ValueError(f"The VQA accuracy rule must be one of {VQA_RULES}, got {rule!r}.")
    matches = sum(a == predicted for a in answers)
    # Leaving out answer i removes one match exactly when answer i matches.
    return sum(min(1.0, (matches - (a == predicted)) / 3) for a in answers) / len(answers)


class VQAAccuracy(Metric):
    """The official VQA accuracy, overall and per answer type; exact under DDP (sums of per-question scores).

    `update(predicted, answers, answer_types)`: predicted answer strings, each question's human answers
    (ten in VQAv2) and its answer type. `compute()`: `{"overall", "yes/no", "number", "other"}`.
    `rule`: the evaluation script's `"2016"` or `"2021"` normalisation (see the module docstring).
    """

    full_state_update = False

    def __init__(self, rule: str = "2016", **kwargs) -> None:
        super().__init__(**kwargs)
        if rule not in VQA_RULES:
            raise ValueError(f"The VQA accuracy rule must be one of {VQA_RULES}, got {rule!r}.")
        self.rule = rule
        self.add_state("scores", default=torch.zeros(len(ANSWER_TYPES) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(len(ANSWER_TYPES) + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: list[str], answers: list[list[str]], answer_types: list[str]) -> None:
        for prediction, human, kind in zip(predicted, answers, answer_types):
            score = vqa_accuracy(prediction, human, self.rule)
            for index in (0, 1 + ANSWER_TYPES.index(kind)) if kind in ANSWER_TYPES else (0,):
                self.scores[index] += score
                self.counts[index] += 1

    def compute(self) -> dict[str, Tensor]:
        accuracy = (self.scores / self.counts.clamp_min(1)).float()
        return dict(zip(("overall", *ANSWER_TYPES), accuracy))
