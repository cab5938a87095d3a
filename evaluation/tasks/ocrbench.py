"""OCRBench (echo840/OCRBench: dataset, question, question_type, answer [str, ...], image). Prompt: the question as
it is, stripped (lmms-eval ocrbench utils: doc_to_text). Score: OCRBench's rule (evaluation.metrics.ocrbench_match), 1 when
a reference is contained in the prediction — lowercased, newlines as spaces; for "Handwritten Mathematical Expression
Recognition" (HME100k) every space and newline removed and case kept."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from evaluation import metrics
from evaluation.tasks.common import PromptTask

HME = "Handwritten Mathematical Expression Recognition"


@dataclasses.dataclass(frozen=True)
class OCRBenchTask(PromptTask):
    def text(self, sample: Mapping[str, Any]) -> str:
        return str(sample["question"]).strip()

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        answers = sample["answers"]
        if not answers:
            raise ValueError("answers must contain at least one reference answer")
        dataset = HME if sample.get("category") == HME else sample.get("source")
        return float(metrics.ocrbench_match(prediction, answers, dataset, lenient=lenient))


OCRBENCH = OCRBenchTask(name="ocrbench", metric="ocrbench_accuracy", max_new_tokens=128,
                        fields={"id": ("id", "question_id"), "question": ("question",), "answers": ("answer", "answers"),
                                "category": ("question_type",), "source": ("dataset",)})
TASKS = (OCRBENCH,)
