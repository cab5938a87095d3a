"""RefCOCO grounding: Qwen-VL box parsing, IoU, accuracy at IoU >= 0.5."""

from __future__ import annotations

import math
import re
from typing import Sequence

Box = tuple[float, float, float, float]

# Qwen-VL eval_mm/evaluate_grounding.py: the first "(...),(...)" in the answer.
_QWEN_VL_BOX = re.compile(r"\((.*?)\),\((.*?)\)")
# Lenient: non-negative plain decimals, spaces allowed anywhere.
_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_LENIENT_BOX = re.compile(rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)")


def _two_floats(text: str) -> tuple[float, float] | None:
    """``x, y = [float(t) for t in text.split(",")]`` as the Qwen-VL script does; None where it raises."""
    parts = text.split(",")
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def parse_box(text: str, width: float, height: float, *, lenient: bool = False) -> Box | None:
    """Parse the first Qwen2-VL box ``(x1,y1),(x2,y2)`` in ``text`` and return it in pixels.

    Default (Qwen-VL's ``evaluate_grounding.py`` rule): the first match of
    ``\\((.*?)\\),\\((.*?)\\)`` (no spaces around the middle comma); each group
    must split on "," into exactly two strings that Python ``float()`` accepts
    (so negative, ``100.``, ``1e2``, `` 12 `` are fine). Grid coordinates,
    nominally in [0, 1000), map to pixels as ``x / 999 * width`` and
    ``y / 999 * height`` as in that script. Corners are kept as given: an
    inverted box has no intersection, hence IoU 0, as with torchvision's
    ``box_iou`` there. Returns None where the script falls back to the box
    (0, 0, 0, 0); deviation: None also for nan/inf coordinates (the script's
    IoU is then nan or 0, never >= 0.5, so scores agree).

    ``lenient=True`` (the earlier rule): non-negative decimals only, spaces
    allowed around every number and comma, ``<|box_start|>`` tokens ignored,
    scaled by ``/ 1000``, corners reordered so x1 <= x2 and y1 <= y2.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if lenient:
        match = _LENIENT_BOX.search(text)
        if match is None:
            return None
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        sx, sy = width / 1000.0, height / 1000.0
        return (min(x1, x2) * sx, min(y1, y2) * sy, max(x1, x2) * sx, max(y1, y2) * sy)
    match = _QWEN_VL_BOX.search(text)
    if match is None:
        return None
    first, second = _two_floats(match.group(1)), _two_floats(match.group(2))
    if first is None or second is None:
        return None
    coords = (*first, *second)
    if not all(math.isfinite(c) for c in coords):
        return None
    x1, y1, x2, y2 = coords
    return (x1 / 999.0 * width, y1 / 999.0 * height, x2 / 999.0 * width, y2 / 999.0 * height)


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
