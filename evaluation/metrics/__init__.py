"""Answer-scoring metrics: VQA v2, DocVQA, ChartQA, RefCOCO, OCRBench, multiple choice, MathVista.

Every scorer returns a float in [0, 1] and scores by the reference rules by
default; ``lenient=True`` selects this project's earlier, more forgiving rules.
Each function's docstring states its rule and every deviation from the
reference:

  * :func:`vqa_accuracy` -- the official VQA ``vqaEval.py`` (a013f00; the 2016 rule by name);
  * :func:`anls` -- the DocVQA leaderboard script (as lmms-eval's ``anls``);
  * :func:`relaxed_accuracy` -- pix2struct's ``relaxed_correctness`` (ChartQA);
  * :func:`parse_box` / :func:`refcoco_accuracy` -- Qwen-VL's
    ``evaluate_grounding.py`` (IoU >= 0.5);
  * :func:`ocrbench_match` -- the OCRBench script (lmms-eval ``ocrbench``);
  * :func:`parse_multiple_choice` -- lmms-eval's MMMU ``parse_multi_choice_response``;
  * :func:`extract_number_answer` / :func:`mathvista_accuracy` -- MathVista's
    normalization with a rule-based extraction in place of its GPT extractor.

``METRICS`` maps a task name to a scorer ``(prediction, sample, *, lenient=False)
-> float`` so an evaluation loop can stay generic.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from evaluation.metrics._common import require_answers as _require_answers
from evaluation.metrics.choice import (
    extract_number_answer,
    mathvista_accuracy,
    multiple_choice_accuracy,
    parse_multiple_choice,
)
from evaluation.metrics.grounding import Box, box_iou, parse_box, refcoco_accuracy
from evaluation.metrics.text import anls, exact_match, ocrbench_match, relaxed_accuracy
from evaluation.metrics.vqa import VQA_RULES, normalize_vqa_answer, vqa_accuracy

__all__ = [
    "METRICS", "VQA_RULES", "Box", "Scorer", "anls", "box_iou", "exact_match", "extract_number_answer",
    "mathvista_accuracy", "multiple_choice_accuracy", "normalize_vqa_answer", "ocrbench_match",
    "parse_box", "parse_multiple_choice", "refcoco_accuracy", "relaxed_accuracy", "vqa_accuracy",
]


class Scorer(Protocol):
    def __call__(self, prediction: str, sample: Mapping, *, lenient: bool = False) -> float: ...


def _field(sample: Mapping, key: str):
    """Fetch ``sample[key]`` with an error that names the missing field."""
    try:
        return sample[key]
    except KeyError:
        raise KeyError(f"sample is missing required field {key!r}") from None


def _score_vqa(prediction: str, sample: Mapping, *, lenient: bool = False) -> float:
    return vqa_accuracy(prediction, _field(sample, "answers"), lenient=lenient)


def _score_docvqa(prediction: str, sample: Mapping, *, lenient: bool = False) -> float:
    return anls(prediction, _field(sample, "answers"), lenient=lenient)


def _score_chartqa(prediction: str, sample: Mapping, *, lenient: bool = False) -> float:
    """Best relaxed accuracy over the sample's reference answers (pix2struct takes the max too)."""
    answers = _require_answers(_field(sample, "answers"))
    return max(relaxed_accuracy(prediction, a, lenient=lenient) for a in answers)


def _score_refcoco(prediction: str, sample: Mapping, *, lenient: bool = False) -> float:
    """RefCOCO accuracy from the sample's pixel box and image size."""
    return refcoco_accuracy(prediction, _field(sample, "box"), _field(sample, "width"),
                            _field(sample, "height"), lenient=lenient)


def _score_exact(prediction: str, sample: Mapping, *, lenient: bool = False) -> float:
    return exact_match(prediction, _field(sample, "answers"), lenient=lenient)


METRICS: dict[str, Scorer] = {
    "vqa": _score_vqa,
    "docvqa": _score_docvqa,
    "chartqa": _score_chartqa,
    "refcoco": _score_refcoco,
    "exact": _score_exact,
}
