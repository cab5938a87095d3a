"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding (lmms-lab/RefCOCO, RefCOCOplus, RefCOCOg: question_id,
image, answer [referring expressions], bbox [x, y, w, h] in pixels, file_name; or rows that already give "box"
[x1, y1, x2, y2], "width" and "height" — always the ORIGINAL image's pixels and size).

Asked and read in the checkpoint family's own convention (`task.for_model(model_type)`, which the runner calls;
qwen2vl_jax.processing.grounding holds both conventions and their sources):
  qwen2_vl (default): "<|object_ref_start|>{expression}<|object_ref_end|>" (the format of Qwen2-VL's grounding data);
    the model answers "<|box_start|>(x1,y1),(x2,y2)<|box_end|>" on a [0, 1000) grid, read by Qwen-VL's
    evaluate_grounding.py rule (evaluation.metrics.refcoco_accuracy).
  qwen2_5_vl: "Locate {expression}, output its bbox coordinates using JSON format." (the Qwen2.5-VL cookbook
    spatial_understanding.ipynb); the model answers ```json [{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``` in
    pixels of the image AS THE PROCESSOR RESIZED IT, mapped back with the sample's "resized_sizes"[0] ([height,
    width], set by evaluation.runner.prepare); max_new_tokens rises to 64 (the digits of four pixel coordinates).
A row holds several expressions of one object, the first is asked (lmms-eval asks each as its own sample — write one
row per expression for that). A sample without an expression (JSONL that asks in its question) is asked its question
as it is. Score: 1 when the read box has IoU >= 0.5 with the reference (evaluation.metrics.grounding)."""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

from evaluation import metrics
from evaluation.data import user_turn
from evaluation.metrics.grounding import grounding_accuracy
from evaluation.tasks.common import PromptTask
from qwen2vl_jax.processing.grounding import QWEN2_VL_PROMPT, check_model_type, grounding_prompt

TEMPLATE = QWEN2_VL_PROMPT
JSON_MAX_NEW_TOKENS = 64  # a Qwen2.5-VL answer: fence, key, four pixel coordinates digit by digit, the label


def image_size(media) -> tuple[int, int]:
    from PIL import Image

    from qwen2vl_jax.processing.loading import load_image

    if isinstance(media, (bytes, bytearray)):
        with Image.open(io.BytesIO(media)) as image:
            return image.size
    return load_image(media).size


@dataclasses.dataclass(frozen=True)
class RefCOCOTask(PromptTask):
    """family: the model_type whose grounding convention the task asks and reads in (set by `for_model`);
    template: the qwen2_vl prompt."""

    template: str = TEMPLATE
    family: str = "qwen2_vl"

    def for_model(self, model_type: str) -> "RefCOCOTask":
        """This task in `model_type`'s convention ("qwen2_vl" | "qwen2_5_vl"); ValueError for any other."""
        check_model_type(model_type)
        if model_type == "qwen2_5_vl":
            return dataclasses.replace(self, family=model_type,
                                       max_new_tokens=max(self.max_new_tokens, JSON_MAX_NEW_TOKENS))
        return dataclasses.replace(self, family=model_type)

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
            if self.family == "qwen2_vl":
                return self.template.format(expression=sample["expression"])
            return grounding_prompt(sample["expression"], self.family)
        return str(sample["question"])

    def messages(self, sample: Mapping[str, Any]) -> list[dict]:
        return [user_turn(self.text(sample), len(sample.get("images") or ()), 0)]

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        """1.0 when the answer's box has IoU >= 0.5 with sample["box"]. qwen2_5_vl needs sample["resized_sizes"]
        (ValueError without it: its boxes are in resized pixels)."""
        if self.family == "qwen2_vl":
            return float(metrics.refcoco_accuracy(prediction, sample["box"], sample["width"], sample["height"],
                                                  lenient=lenient))
        resized = sample.get("resized_sizes")
        if not resized:
            raise ValueError(f"{self.name} for {self.family} needs the image's size as the processor resized it, "
                           "sample['resized_sizes'] = [[height, width], ...] (evaluation.runner.prepare sets it): "
                           "the model answers in those pixels")
        return grounding_accuracy(prediction, sample["box"], self.family, (sample["height"], sample["width"]),
                                  resized[0], lenient=lenient)


_FIELDS = {"id": ("question_id", "id"), "question": ("question",), "category": ("file_name",)}
REFCOCO = RefCOCOTask(name="refcoco", metric="acc@iou0.5", max_new_tokens=32, fields=_FIELDS)
REFCOCO_PLUS = dataclasses.replace(REFCOCO, name="refcoco+")
REFCOCOG = dataclasses.replace(REFCOCO, name="refcocog")
TASKS = (REFCOCO, REFCOCO_PLUS, REFCOCOG)
