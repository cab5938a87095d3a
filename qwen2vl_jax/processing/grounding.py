"""Grounding in each checkpoint family's own convention: the prompt, a box as answer text, answer text back to a box.

Boxes outside this module are always (x1, y1, x2, y2) floats in ORIGINAL image pixels (the image as stored, after
EXIF orientation), x rightwards, y downwards. Image sizes are (height, width), as `smart_resize` returns them and as
`evaluation.runner.prepare` writes `sample["resized_sizes"]`.

    model_type   asked                                          answers
    qwen2_vl     <|object_ref_start|>the cat<|object_ref_end|>  <|object_ref_start|>the cat<|object_ref_end|>
                                                                <|box_start|>(x1,y1),(x2,y2)<|box_end|>
                                                                ints on a [0, 1000) grid of the image
    qwen2_5_vl   Locate the cat, output its bbox coordinates    ```json\\n[\\n\\t{"bbox_2d": [x1, y1, x2, y2],
                 using JSON format.                             "label": "the cat"}\\n]\\n```
                                                                ints in pixels of the image AS THE PROCESSOR
                                                                RESIZED IT (smart_resize)

Sources. Qwen2-VL: the grounding tokens of its tokenizer and Qwen-VL's eval_mm/evaluate_grounding.py (the reading
rule, `read_qwen2_vl_box`). Qwen2.5-VL: the cookbook QwenLM/Qwen2.5-VL cookbooks/spatial_understanding.ipynb,
"2. Detect a specific object using descriptions" (prompt "Locate the top right brown cake, output its bbox
coordinates using JSON format.", the answer's fenced JSON list, and its plotting code that maps `bbox_2d` from the
resized input_width/input_height back to the image).

The resized size must be the one the processor used: `smart_resize(h, w, 28, min_pixels, max_pixels)` with the
processor's `image_options.min_pixels / max_pixels` (a checkpoint's preprocessor_config.json, or the training
config's data.min_pixels / max_pixels), or, exactly, image_grid_thw's (h, w) × patch_size.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwen2vl_jax.config import MODEL_TYPES
from qwen2vl_jax.processing.image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize

Box = tuple[float, float, float, float]
Size = tuple[int, int]  # (height, width) in pixels

QWEN2_VL_PROMPT = "<|object_ref_start|>{expression}<|object_ref_end|>"
QWEN2_5_VL_PROMPT = "Locate {expression}, output its bbox coordinates using JSON format."
GRID = 1000  # Qwen2-VL's box grid: ints 0 … 999


def check_model_type(model_type: str) -> str:
    """`model_type` itself when it is a grounding family this module knows; ValueError naming the supported ones."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"no grounding convention for model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    return model_type


def grounding_prompt(expression: str, model_type: str) -> str:
    """The user text that asks a `model_type` checkpoint for the box of `expression` (e.g. "the left dog")."""
    template = QWEN2_5_VL_PROMPT if check_model_type(model_type) == "qwen2_5_vl" else QWEN2_VL_PROMPT
    return template.format(expression=expression)


def resized_size(image_hw: Sequence[int], resized_hw: Sequence[int] | None = None, *,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> Size:
    """(height, width) of the image as the processor resized it: `resized_hw` when given, else smart_resize of
    `image_hw` within [min_pixels, max_pixels] — pass the processor's `image_options.min_pixels / max_pixels`
    (the defaults are transformers' class defaults, NOT those of released checkpoints)."""
    if resized_hw is not None:
        height, width = (int(v) for v in resized_hw)
        if height <= 0 or width <= 0:
            raise ValueError(f"resized size must be positive (height, width), got {tuple(resized_hw)}")
        return height, width
    height, width = image_hw
    return smart_resize(int(round(height)), int(round(width)), 28, min_pixels, max_pixels)


def box_text(box: Sequence[float], model_type: str, image_hw: Sequence[float], resized_hw: Sequence[int] | None = None,
             label: str | None = None, *, min_pixels: int = DEFAULT_MIN_PIXELS,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The answer text a `model_type` checkpoint is trained to produce for `box` (x1, y1, x2, y2 in pixels of the
    original image of size `image_hw` = (height, width)), named `label` when given.

    qwen2_vl: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, each coordinate
    round(x / width * 1000) (nearest, halves up) clamped to [0, 999]; the label part only with a label.
    qwen2_5_vl: ```` ```json\\n[\\n\\t{"bbox_2d": [x1, y1, x2, y2], "label": "..."}\\n]\\n``` ```` (as the cookbook's
    answers), each coordinate round(x · resized_width / width) (nearest, halves up) clamped to [0, resized side];
    `resized_hw` = (height, width) as the processor resized the image (see `resized_size` when not given)."""
    x1, y1, x2, y2 = _finite_box(box, "box")
    height, width = _positive_size(image_hw, "image size")
    if check_model_type(model_type) == "qwen2_vl":
        grid = [_nearest(v / side * GRID, 0, GRID - 1) for v, side in ((x1, width), (y1, height), (x2, width),
                                                                          (y2, height))]
        ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label is not None else ""
        return f"{ref}<|box_start|>({grid[0]},{grid[1]}),({grid[2]},{grid[3]})<|box_end|>"
    rh, rw = resized_size(image_hw, resized_hw, min_pixels=min_pixels, max_pixels=max_pixels)
    pixels = [_nearest(v * rside / side, 0, rside) for v, rside, side in ((x1, rw, width), (y1, rh, height),
                                                                          (x2, rw, width), (y2, rh, height))]
    item: dict[str, Any] = {"bbox_2d": pixels}
    if label is not None:
        item["label"] = str(label)
    return "```json\n[\n\t" + json.dumps(item, ensure_ascii=False) + "\n]\n```"


def read_box(text: str, model_type: str, image_hw: Sequence[float], resized_hw: Sequence[int] | None = None, *,
             lenient: bool = False, min_pixels: int = DEFAULT_MIN_PIXELS,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Box | None:
    """The box a `model_type` checkpoint answered in `text`, in pixels of the original image of size `image_hw` =
    (height, width); None when the text holds none.

    qwen2_vl: `read_qwen2_vl_box` (Qwen-VL's official rule; `lenient` selects the earlier lenient one).
    qwen2_5_vl (`lenient` has no effect): `read_json_box` → pixels of the resized image (`resized_hw`, see
    `resized_size`), scaled by width / resized_width and height / resized_height."""
    height, width = _positive_size(image_hw, "image size")
    if check_model_type(model_type) == "qwen2_vl":
        return read_qwen2_vl_box(text, width, height, lenient=lenient)
    rh, rw = resized_size(image_hw, resized_hw, min_pixels=min_pixels, max_pixels=max_pixels)
    box = read_json_box(text)
    if box is None:
        return None
    sx, sy = width / rw, height / rh
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


# ------------------------------------------------------------------------------------------ Qwen2.5-VL JSON answers

_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def read_json_box(text: str) -> Box | None:
    """The first box of a Qwen2.5-VL answer, as written (resized pixels); None when there is none.

    Tried in order, the first that yields a box wins: the contents of a ```json (or bare ```) fence, then the
    whole text, parsed as JSON; then each "[" / "{" in the text, where a JSON value starts (so JSON inside prose,
    and a box whose answer was cut after it by max_new_tokens). A value yields a box when it is an object with
    "bbox_2d", a list whose first object with "bbox_2d" has one (first object wins), or a bare list of four
    numbers; "bbox_2d" must be four finite numbers, else None."""
    if not isinstance(text, str):
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        try:
            found = _box_of(json.loads(candidate))
        except (ValueError, RecursionError):
            continue
        if found is not _NOTHING:
            return found
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        found = _box_of(value)
        if found is not _NOTHING:
            return found
    return None


_NOTHING = object()  # "this JSON value holds no box" (as opposed to None: "it holds a box that is garbage")


def _box_of(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _four_numbers(value["bbox_2d"]) if "bbox_2d" in value else _NOTHING
    if isinstance(value, list):
        if len(value) == 4 and all(_is_number(v) for v in value):
            return _four_numbers(value)
        for item in value:
            if isinstance(item, Mapping) and "bbox_2d" in item:
                return _four_numbers(item["bbox_2d"])
    return _NOTHING


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _four_numbers(value: Any) -> Box | None:
    if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
        return None
    box = tuple(float(v) for v in value)
    return box if all(math.isfinite(v) for v in box) else None  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ Qwen2-VL grid answers

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


def read_qwen2_vl_box(text: str, width: float, height: float, *, lenient: bool = False) -> Box | None:
    """Parse the first Qwen2-VL box ``(x1,y1),(x2,y2)`` in ``text`` and return it in pixels of a
    ``width`` × ``height`` image.

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


# ------------------------------------------------------------------------------------------ training records


def render_box_items(messages: Sequence[Mapping], model_type: str, image_hw: Sequence[float] | None,
                     resized_hw: Sequence[int] | None) -> list:
    """`messages` with each content item `{"type": "box", "box": [x1, y1, x2, y2], "label"?: str}` (original
    pixels of the record's first image, of size `image_hw` = (height, width), resized by the processor to
    `resized_hw`) replaced by `{"type": "text", "text": box_text(...)}` for `model_type`: grounding data written
    once trains either family. Messages without box items come back as they are (same objects); ValueError for a
    box item when there is no image."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list) or not any(_is_box_item(item) for item in content):
            out.append(message)
            continue
        if image_hw is None:
            raise ValueError(f"message {i} has a {{'type': 'box'}} item but the record has no image: a box is given "
                             "in pixels of the record's first image")
        items = [{"type": "text", "text": box_text(item.get("box"), model_type, image_hw, resized_hw,
                                                   item.get("label"))} if _is_box_item(item) else item
                 for item in content]
        out.append({**message, "content": items})
    return out


def _is_box_item(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("type") == "box"


# ------------------------------------------------------------------------------------------ helpers


def _finite_box(box: Any, what: str) -> Box:
    message = f"{what} must be 4 numbers (x1, y1, x2, y2) in original image pixels, got {box!r}"
    if isinstance(box, (str, bytes, Mapping)):
        raise ValueError(message)
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise ValueError(message) from e
    if len(values) != 4:
        raise ValueError(message)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} has a non-finite coordinate: {box!r}")
    return values  # type: ignore[return-value]


def _positive_size(size: Sequence[float], what: str) -> tuple[float, float]:
    height, width = (float(v) for v in size)
    if not (height > 0 and width > 0):
        raise ValueError(f"{what} must be positive (height, width), got {tuple(size)}")
    return height, width


def _nearest(value: float, low: int, high: int) -> int:
    """round(value), halves up, clamped to [low, high]."""
    return min(max(math.floor(value + 0.5), low), high)
