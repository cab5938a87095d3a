"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding (lmms-lab/RefCOCO, RefCOCOplus, RefCOCOg: question_id,
image, answer [referring expressions], bbox [x, y, w, h] in pixels, file_name; or rows that already give "box"
[x1, y1, x2, y2], "width" and "height").

Prompt: the expression in Qwen2-VL's grounding tokens, "<|object_ref_start|>{expression}<|object_ref_end|>" (the
format of Qwen2-VL's grounding data; the model answers "<|box_start|>(x1,y1),(x2,y2)<|box_end|>" on a [0, 1000)
grid); a row holds several expressions of one object, the first is asked (lmms-eval asks each as its own sample —
write one row per expression for that). A sample without an expression (JSONL that asks in its question) is asked
its question as it is. Score: 1 when the parsed box has IoU >= 0.5 with the reference (evaluation.metrics)."""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

from evaluation import metrics
from evaluation.data import user_turn
from evaluation.tasks.common import PromptTask

TEMPLATE = "<|object_ref_start|>{expression}<|object_ref_end|>"


def image_size(media) -> tuple[int, int]:
    from PIL import Image

    from qwen2vl_jax.processing.loading import load_image

    if isinstance(media, (bytes, bytearray)):
        with Image.open(io.BytesIO(media)) as image:
            return image.size
    return load_image(media).size


@dataclasses.dataclass(frozen=True)
class RefCOCOTask(PromptTask):
    template: str = TEMPLATE

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        row = dict(row)
        expressions = row.get("answer") if row.get("answer") is not None else row.get("expression")
        expressions = [expressions] if isinstance(expressions, str) else [str(e) for e in expressions or []]
        row["expression"] = expressions[0] if expressions else None
        row["answers"] = row.get("answers") or expressions
        if row.get("question") is None:
            row["question"] = row["expression"]
        sample = super().sample_from_row(row, index, root)
        sample["expression"] = row.get("expression")
        if row.get("box") is None and row.get("bbox") is not None:
            x, y, w, h = (float(v) for v in row["bbox"])
            sample["box"] = [x, y, x + w, y + h]
        else:
            sample["box"] = [float(v) for v in row["box"]]
        if row.get("width") and row.get("height"):
            sample["width"], sample["height"] = float(row["width"]), float(row["height"])
        elif sample["images"]:
            sample["width"], sample["height"] = map(float, image_size(sample["images"][0]))
        return sample

    def text(self, sample: Mapping[str, Any]) -> str:
        if sample.get("expression"):
            return self.template.format(expression=sample["expression"])
        return str(sample["question"])

    def messages(self, sample: Mapping[str, Any]) -> list[dict]:
        return [user_turn(self.text(sample), len(sample.get("images") or ()), 0)]

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        return float(metrics.refcoco_accuracy(prediction, sample["box"], sample["width"], sample["height"],
                                              lenient=lenient))


_FIELDS = {"id": ("question_id", "id"), "question": ("question",), "category": ("file_name",)}
REFCOCO = RefCOCOTask(name="refcoco", metric="acc@iou0.5", max_new_tokens=32, fields=_FIELDS)
REFCOCO_PLUS = dataclasses.replace(REFCOCO, name="refcoco+")
REFCOCOG = dataclasses.replace(REFCOCO, name="refcocog")
TASKS = (REFCOCO, REFCOCO_PLUS, REFCOCOG)
