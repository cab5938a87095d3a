"""Image multiple choice: MMMU, MMBench, RealWorldQA. Prompts as lmms-eval builds them:

- MMMU (lmms-eval mmmu/utils.py construct_prompt): multiple-choice "{question}\\n{A. opt\\nB. opt}\\n\\nAnswer with the
  option's letter from the given choices directly."; open "{question}\\n\\nAnswer the question using a single word or
  phrase."; the images are those the text names ("<image 1>" → column image_1), before the text.
- MMBench (lmms-eval mmbench: mmbench_doc_to_text + create_options_prompt, en post_prompt): "{hint} {question} There
  are several options:\\nA. opt\\nB. opt\\n\\nAnswer with the option's letter from the given choices directly." (no
  hint: "{question} There are...").
- RealWorldQA (lmms-eval realworldqa.yaml, post_prompt ""): the question as it is — the benchmark's questions list
  their options and say how to answer.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from evaluation import metrics
from evaluation.tasks.base import media_values
from evaluation.tasks.common import LETTERS, OPTION_LETTER, PromptTask, choose, numbers_in, option_lines, present


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):  # MMMU stores its options as the repr of a list
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return list(value)


@dataclasses.dataclass(frozen=True)
class MMMUTask(PromptTask):
    open_prompt: str = "Answer the question using a single word or phrase."

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        sample = super().sample_from_row(row, index, root)
        sample["options"] = [str(o) for o in _as_list(sample.get("options"))]
        named = sorted(set(re.findall(r"<image (\d+)>", sample["question"] + " " + " ".join(sample["options"]))))
        columns = [f"image_{n}" for n in named if row.get(f"image_{n}") is not None]
        if columns:  # the images the question names, in lmms-eval's order; else every image column's
            sample["images"] = [m for c in columns for m in media_values(row[c], root)]
        return sample

    def multiple_choice(self, sample: Mapping[str, Any]) -> bool:
        return sample.get("question_type", "multiple-choice") == "multiple-choice" and bool(sample.get("options"))

    def text(self, sample: Mapping[str, Any]) -> str:
        if self.multiple_choice(sample):
            return f"{sample['question']}\n{option_lines(sample['options'])}\n\n{OPTION_LETTER}"
        return f"{sample['question']}\n\n{self.open_prompt}"

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        answers = sample["answers"]
        if self.multiple_choice(sample):
            return metrics.multiple_choice_accuracy(prediction, sample["options"], answers[0], lenient=lenient)
        return open_match(prediction, [g for a in answers for g in _as_list(a)])


def _number(text: str) -> float | None:
    try:
        return round(float(text.replace(",", "")), 2)
    except ValueError:
        return None


def open_match(prediction: str, golds: Sequence) -> float:
    """MMMU's open-question rule, in short: a numeric reference matches a number in the prediction (to 2 decimals),
    a text reference is contained in the lowercased prediction."""
    said = prediction.strip().lower().rstrip(".")
    numbers = {n for n in map(_number, numbers_in(prediction)) if n is not None}
    for gold in golds:
        gold = str(gold).strip()
        value = _number(gold)
        if value is not None and value in numbers:
            return 1.0
        if value is None and gold.lower() and gold.lower() in said:
            return 1.0
    return 0.0


@dataclasses.dataclass(frozen=True)
class MMBenchTask(PromptTask):
    post_prompt: str = "\n" + OPTION_LETTER

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        sample = super().sample_from_row(row, index, root)
        sample["options"] = [str(row[c]) for c in "ABCDE" if c in row and present(row[c])]
        sample["hint"] = str(row["hint"]) if present(row.get("hint")) else None
        return sample

    def text(self, sample: Mapping[str, Any]) -> str:
        options = "There are several options:\n" + option_lines(sample["options"])
        head = f"{sample['hint']} {sample['question']}" if sample.get("hint") else str(sample["question"])
        return f"{head} {options}\n{self.post_prompt}"

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        return metrics.multiple_choice_accuracy(prediction, sample["options"], sample["answers"][0], lenient=lenient)


_PUNCT = str.maketrans("", "", string.punctuation)


@dataclasses.dataclass(frozen=True)
class RealWorldQATask(PromptTask):
    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        """lmms-eval's exact_match ignoring case and punctuation; lenient: the option letter found anywhere."""
        norm = lambda s: s.translate(_PUNCT).strip().lower()  # noqa: E731
        answer = sample["answers"][0]
        if norm(prediction) == norm(answer):
            return 1.0
        if lenient and len(answer.strip()) == 1 and answer.strip() in LETTERS:
            options = re.findall(r"^([A-Z])\.\s*(.*)$", str(sample.get("question", "")), re.M)
            return float(choose(prediction, [o for _, o in options], lenient=True) == answer.strip())
        return 0.0


MMMU = MMMUTask(  # lmms-lab/MMMU (validation): id, question, options, answer, question_type, image_1..image_7
    name="mmmu", metric="accuracy", max_new_tokens=32,
    fields={"id": ("id",), "question": ("question",), "answers": ("answer", "answers"), "options": ("options",),
            "question_type": ("question_type",), "category": ("subfield", "topic_difficulty")},
    image_columns=tuple(f"image_{i}" for i in range(1, 8)))
MMBENCH = MMBenchTask(  # lmms-lab/MMBench, config en (dev): index, question, hint, A..E, answer, category, image
    name="mmbench", metric="accuracy", max_new_tokens=16,
    fields={"id": ("index", "id"), "question": ("question",), "answers": ("answer", "answers"),
            "category": ("category",)})
REALWORLDQA = RealWorldQATask(  # lmms-lab/RealWorldQA (test): image, question, answer
    name="realworldqa", metric="exact_match", max_new_tokens=16,
    fields={"id": ("id",), "question": ("question",), "answers": ("answer", "answers")})
TASKS = (MMMU, MMBENCH, REALWORLDQA)
