"""Video multiple choice: MVBench and Video-MME. Prompts as lmms-eval builds them:

- MVBench (OpenGVLab/MVBench json: video, question, candidates, answer = the right candidate's text; lmms-eval
  mvbench/utils.py mvbench_doc_to_text with its sub-task yaml's post_prompt): "Question:{question}\\nOption:\\n(A) c1\\n
  (B) c2\\nOnly give the best option.\\n". Score: lmms-eval's mcq_acc — the letter from "B. text", else the
  punctuation-stripped answer's standalone letter A-E, against the right candidate's letter.
- Video-MME (lmms-lab/Video-MME: videoID, question_id, question, options ["A. ...", ...], answer letter, duration,
  domain, task_type; the clip is {videoID}.mp4 under the data root unless a "video" column names it; lmms-eval
  videomme/utils.py videomme_doc_to_text, default post_prompt): "Select the best answer to the following
  multiple-choice question based on the video and the subtitles. Respond with only the letter (A, B, C, or D) of the
  correct option.\\n{question}\\n{options, one a line}\\nThe best answer is:". Score: Video-MME's
  extract_characters_regex — answer prefixes dropped, more than 10 words without a letter A-D is no answer, else
  the first A-D.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from evaluation.tasks.base import media_values
from evaluation.tasks.common import LETTERS, PromptTask, choose


@dataclasses.dataclass(frozen=True)
class MVBenchTask(PromptTask):
    post_prompt: str = "Only give the best option.\n"

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        sample = super().sample_from_row(row, index, root)
        sample["options"] = [str(c) for c in sample.get("options") or []]
        answer = sample["answers"][0]
        if answer in sample["options"]:  # the answer is the right candidate's text
            sample["answers"] = [LETTERS[sample["options"].index(answer)]]
        return sample

    def text(self, sample: Mapping[str, Any]) -> str:
        options = "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(sample["options"]))
        return f"Question:{sample['question']}\nOption:\n{options}{self.post_prompt}"

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        answer = sample["answers"][0].strip()
        if lenient:
            return float(choose(prediction, sample["options"], lenient=True) == answer)
        return float(mvbench_letter(prediction) == answer)


_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def mvbench_letter(text: str) -> str:
    """lmms-eval MVBench's `process`: "B. text" → "B"; else punctuation handled as in VQA, then the first
    standalone letter A-E (uppercased), or the processed text."""
    match = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.I)
    if match:
        return match.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or re.search(r"(\d)(,)(\d)", text)) else " ")
    out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out).strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", out, re.I)
    return letter.group(1).upper() if letter else out


VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
                        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
             "The correct option is", "Best answer:", "Best option:")


def videomme_letter(text: str) -> str:
    """Video-MME's extract_characters_regex."""
    text = text.strip()
    for prefix in _PREFIXES:
        text = text.replace(prefix, "")
    if len(text.split()) > 10 and not re.search("[ABCD]", text):
        return ""
    match = re.search(r"[ABCD]", text)
    return match[0] if match else ""


@dataclasses.dataclass(frozen=True)
class VideoMMETask(PromptTask):
    instruction: str = VIDEOMME_INSTRUCTION
    post_prompt: str = "The best answer is:"

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        sample = super().sample_from_row(row, index, root)
        sample["options"] = [str(o) for o in sample.get("options") or []]  # already "A. text"
        if not sample["videos"] and row.get("videoID"):
            sample["videos"] = media_values(f"{row['videoID']}.mp4", root)
        return sample

    def text(self, sample: Mapping[str, Any]) -> str:
        return f"{self.instruction}\n{sample['question']}\n" + "\n".join(sample["options"]) + f"\n{self.post_prompt}"

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        answer = sample["answers"][0].strip()
        if lenient:
            texts = [re.sub(r"^[A-Z]\.\s*", "", o) for o in sample["options"]]
            return float(choose(prediction, texts, lenient=True) == answer or videomme_letter(prediction) == answer)
        return float(videomme_letter(prediction) == answer)


MVBENCH = MVBenchTask(
    name="mvbench", metric="accuracy", max_new_tokens=16, image_columns=(), video_columns=("video",),
    fields={"id": ("id", "question_id"), "question": ("question",), "answers": ("answer", "answers"),
            "options": ("candidates", "options"), "category": ("task_type", "sub_task")})
VIDEOMME = VideoMMETask(
    name="videomme", metric="accuracy", max_new_tokens=16, image_columns=(), video_columns=("video",),
    fields={"id": ("question_id", "id"), "question": ("question",), "answers": ("answer", "answers"),
            "options": ("options",), "category": ("task_type",), "duration": ("duration",),
            "domain": ("domain",)})
TASKS = (MVBENCH, VIDEOMME)
