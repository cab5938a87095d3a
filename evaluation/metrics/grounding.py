"""RefCOCO grounding: box parsing (Qwen-VL's rule; Qwen2.5-VL's JSON in resized pixels), IoU, accuracy at IoU >= 0.5."""

from __future__ import annotations

from typing import Sequence

from qwen2vl_jax.processing.grounding import Box, read_box, read_qwen2_vl_box


def parse_box(text: str, width: float, height: float, *, lenient: bool = False) -> Box | None:
    """Parse the first Qwen2-VL box ``(x1,y1),(x2,y2)`` in ``text`` and return it in pixels.

    Default: Qwen-VL's ``evaluate_grounding.py`` rule (grid / 999 × size); ``lenient=True``: the earlier rule
    (spaces allowed, / 1000, corners reordered). The rule itself lives in the model package so training and
    evaluation share it: see :func:`qwen2vl_jax.processing.grounding.read_qwen2_vl_box`.
    """
    return read_qwen2_vl_box(text, width, height, lenient=lenient)


def _area(box: Sequence[float]) -> float:
    """Area of an (x1, y1, x2, y2) box; 0 for degenerate or inverted boxes."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two continuous (x1, y1, x2, y2) boxes (0 when the union is empty)."""
    if len(a) != 4 or len(b) != 4:
        raise ValueError("boxes must have 4 coordinates (x1, y1, x2, y2)")
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def refcoco_accuracy(prediction_text: str, gt_box: Sequence[float], width: float, height: float, *,
                     lenient: bool = False) -> float:
    """1.0 if the parsed predicted box (:func:`parse_box`) has IoU >= 0.5 with ``gt_box`` (pixels).

    Default as Qwen-VL's ``evaluate_grounding.py``; deviation: IoU in float64
    where the script uses float32 tensors, which can only matter within ~1e-7
    of the 0.5 threshold.
    """
    box = parse_box(prediction_text, width, height, lenient=lenient)
    if box is None:
        return 0.0
    return float(box_iou(box, gt_box) >= 0.5)


def grounding_accuracy(prediction_text: str, gt_box: Sequence[float], model_type: str, image_hw: Sequence[float],
                       resized_hw: Sequence[int] | None = None, *, lenient: bool = False) -> float:
    """1.0 if the box a `model_type` checkpoint answered has IoU >= 0.5 with ``gt_box`` (original pixels).

    ``image_hw``: the original image's (height, width); ``resized_hw``: its (height, width) as the processor
    resized it (Qwen2.5-VL answers in those pixels; unused for Qwen2-VL, whose score is exactly
    :func:`refcoco_accuracy`). See :func:`qwen2vl_jax.processing.grounding.read_box`.
    """
    if model_type == "qwen2_vl":
        return refcoco_accuracy(prediction_text, gt_box, image_hw[1], image_hw[0], lenient=lenient)
    box = read_box(prediction_text, model_type, image_hw, resized_hw, lenient=lenient)
    if box is None:
        return 0.0
    return float(box_iou(box, gt_box) >= 0.5)
