"""What the task modules share: option lists, post-prompts, the multiple-choice parse and the prompt-task base."""
from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from evaluation import metrics
from evaluation.data import user_turn
from evaluation.tasks.base import Task

LETTERS = string.ascii_uppercase
# lmms-eval's post-prompts (the wording Qwen2-VL's numbers were reported with)
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # docvqa/infovqa/chartqa/textvqa/vqav2 yaml
OPTION_LETTER = "Answer with the option's letter from the given choices directly."  # mmmu/utils.py, mmbench yaml


def append_text(messages: Sequence[Mapping], suffix: str) -> list[dict]:
    """`messages` with `suffix` appended to the last turn's text (as one more text item for list content)."""
    messages = [dict(m) for m in messages]
    if suffix and messages:
        content = messages[-1]["content"]
        messages[-1]["content"] = (content + suffix if isinstance(content, str)
                                   else list(content) + [{"type": "text", "text": suffix}])
    return messages


def option_lines(options: Sequence[str], template: str = "{letter}. {option}") -> str:
    return "\n".join(template.format(letter=LETTERS[i], option=o) for i, o in enumerate(options))


def present(value: Any) -> bool:
    """False for None, NaN, "" and the string "nan" (how pandas-written parquet files mark a missing cell)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip() not in ("", "nan")


def choose(prediction: str, options: Sequence[str], *, lenient: bool = False) -> str | None:
    """The option letter `prediction` picks among `options` (lettered A, B, ...), or None
    (evaluation.metrics.parse_multiple_choice: lmms-eval's MMMU rule; lenient adds bare letters and option texts)."""
    return metrics.parse_multiple_choice(prediction, [str(o) for o in options], lenient=lenient)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def numbers_in(text: str) -> list[str]:
    """The numbers in `text`, in order, thousands separators dropped."""
    return [m.replace(",", "") for m in _NUMBER.findall(text)]


@dataclasses.dataclass(frozen=True)
class PromptTask(Task):
    """A task whose user turn is its sample's question (after its images/videos) plus `post_prompt`."""

    post_prompt: str = ""

    def text(self, sample: Mapping[str, Any]) -> str:
        return str(sample["question"]) + self.post_prompt

    def messages(self, sample: Mapping[str, Any]) -> list[dict]:
        return [user_turn(self.text(sample), len(sample.get("images") or ()), len(sample.get("videos") or ()))]

    def complete_turns(self, messages: Sequence[Mapping]) -> list[dict]:
        return append_text(messages, self.post_prompt)
