"""MathVista testmini (AI4Math/MathVista: pid, question, decoded_image, image (its path), choices, unit, precision,
answer, question_type multi_choice | free_form, answer_type integer | float | text | list, query).

Prompt: the dataset's `query` — MathVista's own build_query with its format hint, the prompt lmms-eval's mathvista
task sends with shot_type "format-prompt" — e.g. "Hint: Please answer the question and provide the correct option
letter, e.g., A, B, C, D, at the end.\\nQuestion: ...\\nChoices:\\n(A) ...\\n(B) ..."; rows without it get the same
text built here. Score: evaluation.metrics.mathvista_accuracy — MathVista's normalize-then-compare, a rule-based extraction in
place of its GPT extractor."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from evaluation.tasks.base import media_values
from evaluation import metrics
from evaluation.tasks.common import LETTERS, PromptTask

HINTS = {
    "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
               "at the end.",
    1: "Please answer the question requiring a floating-point number with one decimal place and provide the final "
       "value, e.g., 1.2, 1.3, 1.4, at the end.",
    2: "Please answer the question requiring a floating-point number with two decimal places and provide the final "
       "value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
            "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


@dataclasses.dataclass(frozen=True)
class MathVistaTask(PromptTask):
    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        sample = super().sample_from_row(row, index, root)
        sample["options"] = [str(c) for c in (sample.get("options") or [])]
        if not sample["images"] and isinstance(row.get("image"), str):  # only the path column
            sample["images"] = media_values(row["image"], root)
        return sample

    def text(self, sample: Mapping[str, Any]) -> str:
        if sample.get("query"):
            return str(sample["query"])
        multi = sample.get("question_type") == "multi_choice"
        kind = sample.get("answer_type")
        hint = HINTS["multi_choice"] if multi else HINTS.get(int(sample.get("precision") or 1) if kind == "float"
                                                             else kind, "")
        question = str(sample["question"])
        if sample.get("unit"):
            question += f" (Unit: {sample['unit']})"
        text = f"Hint: {hint}\nQuestion: {question}" if hint else f"Question: {question}"
        if multi and sample["options"]:
            text += "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(sample["options"]))
        return text

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        return metrics.mathvista_accuracy(
            prediction, str(sample["answers"][0]), question_type=sample.get("question_type") or "free_form",
            answer_type=sample.get("answer_type") or "text", choices=sample.get("options") or None,
            precision=None if sample.get("precision") is None else int(sample["precision"]), lenient=lenient)


MATHVISTA = MathVistaTask(
    name="mathvista", metric="accuracy", max_new_tokens=512, image_columns=("decoded_image",),
    fields={"id": ("pid", "id"), "question": ("question",), "answers": ("answer", "answers"), "options": ("choices",),
            "question_type": ("question_type",), "answer_type": ("answer_type",), "precision": ("precision",),
            "unit": ("unit",), "query": ("query",)})
TASKS = (MATHVISTA,)
