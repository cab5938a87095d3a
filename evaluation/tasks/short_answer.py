"""Short-answer VQA: DocVQA, InfoVQA (ANLS), ChartQA (relaxed accuracy), TextVQA, VQAv2 (VQA accuracy), and the
demo set's exact match. Prompt (lmms-eval's docvqa / infovqa / chartqa / textvqa / vqav2 task configs as Qwen2-VL was
evaluated): the question, then "\\nAnswer the question using a single word or phrase."."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from evaluation import metrics
from evaluation.tasks.common import SHORT_ANSWER, PromptTask


@dataclasses.dataclass(frozen=True)
class ShortAnswerTask(PromptTask):
    scorer: str = "vqa"  # "anls" | "relaxed" | "vqa" | "exact"

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        row = dict(row)
        for column in self.fields.get("answers", ()):  # VQAv2's answers: [{"answer", "answer_confidence", ...}]
            value = row.get(column)
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
                row[column] = [a.get("answer", "") for a in value]
        return super().sample_from_row(row, index, root)

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        answers = sample["answers"]
        if self.scorer == "anls":
            return metrics.anls(prediction, answers, lenient=lenient)
        if self.scorer == "relaxed":  # ChartQA: the best over the references
            if not answers:
                raise ValueError("answers must contain at least one reference answer")
            return max(metrics.relaxed_accuracy(prediction, a, lenient=lenient) for a in answers)
        if self.scorer == "vqa":
            return metrics.vqa_accuracy(prediction, answers, lenient=lenient)
        return metrics.exact_match(prediction, answers, lenient=lenient)


_QUESTION = ("question",)

DOCVQA = ShortAnswerTask(  # lmms-lab/DocVQA, config DocVQA (validation): questionId, question, answers, image
    name="docvqa", metric="anls", max_new_tokens=32, post_prompt=SHORT_ANSWER, scorer="anls",
    fields={"id": ("questionId", "question_id", "id"), "question": _QUESTION, "answers": ("answers", "answer")})
INFOVQA = ShortAnswerTask(  # lmms-lab/DocVQA, config InfographicVQA: questionId, question, answers, image
    name="infovqa", metric="anls", max_new_tokens=32, post_prompt=SHORT_ANSWER, scorer="anls",
    fields={"id": ("questionId", "question_id", "id"), "question": _QUESTION, "answers": ("answers", "answer")})
CHARTQA = ShortAnswerTask(  # lmms-lab/ChartQA (test): type, question, answer, image
    name="chartqa", metric="relaxed_accuracy", max_new_tokens=16, post_prompt=SHORT_ANSWER, scorer="relaxed",
    fields={"id": ("id", "question_id"), "question": _QUESTION, "answers": ("answer", "answers"),
            "category": ("type",)})
TEXTVQA = ShortAnswerTask(  # lmms-lab/textvqa (validation): question_id, question, answers (10), image
    name="textvqa", metric="vqa_accuracy", max_new_tokens=16, post_prompt=SHORT_ANSWER, scorer="vqa",
    fields={"id": ("question_id", "id"), "question": _QUESTION, "answers": ("answers", "answer")})
_VQAV2_FIELDS = {"id": ("question_id", "id"), "question": _QUESTION, "answers": ("answers", "answer"),
                 "category": ("answer_type",)}
VQAV2 = ShortAnswerTask(  # lmms-lab/VQAv2 (validation): question_id, question, answers [{answer, ...}], image
    name="vqav2", metric="vqa_accuracy", max_new_tokens=16, post_prompt=SHORT_ANSWER, scorer="vqa",
    fields=_VQAV2_FIELDS)
VQA = dataclasses.replace(VQAV2, name="vqa")  # the runner's first task name
EXACT = ShortAnswerTask(  # the demo set (tfds:synthetic_vqa): the question as asked, exact match
    name="exact", metric="exact_match", max_new_tokens=16, post_prompt="", scorer="exact",
    fields={"id": ("id",), "question": _QUESTION, "answers": ("answers", "answer")})

TASKS = (DOCVQA, INFOVQA, CHARTQA, TEXTVQA, VQAV2, VQA, EXACT)
