"""Synthetic visual-QA demo set (colour / shape / count / digit questions).

Every example is a pure function of ``(seed, index)``, so a dataset can be
regenerated bit-for-bit anywhere. Two writers are provided:

* :func:`write_tfds`  -> a TFDS dataset in ArrayRecord format (no TensorFlow
  needed to write or read it), read back with ``data_pipeline.sources``.
* :func:`write_jsonl` -> ``data.jsonl`` + ``images/{index}.png`` in the Qwen
  chat-message format.
"""

from __future__ import annotations

import functools
import io
import json
import math
import zlib

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

QUESTION_TYPES = ("colour", "shape", "count", "digit")

TFDS_NAME = "synthetic_vqa"
TFDS_VERSION = "1.0.0"

# Clearly distinct, saturated colours (RGB) — all readable on light backgrounds.
COLOURS = {
    "red": (215, 25, 28),
    "green": (26, 150, 65),
    "blue": (30, 70, 210),
    "yellow": (235, 185, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
}
SHAPES = ("circle", "square", "triangle")

ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, 6)),
    "digit": tuple(str(d) for d in range(10)),
}

QUESTIONS = {
    "colour": (
        "What colour is the shape?",
        "Which colour is the object in the picture?",
        "Name the colour of the shape.",
    ),
    "shape": (
        "What shape is shown?",
        "Which shape is in the picture?",
        "Name the shape in the image.",
    ),
    "count": (
        "How many shapes are there?",
        "Count the shapes in the picture.",
        "How many objects can you see?",
    ),
    "digit": (
        "What digit is shown?",
        "Which number is written in the image?",
        "Read the digit in the picture.",
    ),
}

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 56, 320, 3.0


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) with sides in [56, 320] and aspect ratio up to 1:3."""
    aspect = math.exp(rng.uniform(0.0, math.log(MAX_ASPECT)))
    short = int(rng.integers(MIN_SIDE, max(MIN_SIDE, int(MAX_SIDE / aspect)) + 1))
    long = int(min(MAX_SIDE, round(short * aspect)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, low-saturation background colour."""
    base = int(rng.integers(200, 250))
    return tuple(int(np.clip(base + t, 0, 255)) for t in rng.integers(-12, 13, size=3))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float,
                size: float, fill: tuple[int, int, int]) -> None:
    """Draws a filled ``kind`` shape of side/diameter ``size`` centred at (cx, cy)."""
    h = size / 2
    if kind == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def _draw_big_shape(img: Image.Image, rng: np.random.Generator, kind: str,
                    fill: tuple[int, int, int]) -> None:
    """One large shape (60-85% of the short side), jittered inside the image."""
    w, h = img.size
    size = min(w, h) * rng.uniform(0.6, 0.85)
    cx = rng.uniform(size / 2, w - size / 2)
    cy = rng.uniform(size / 2, h - size / 2)
    _draw_shape(ImageDraw.Draw(img), kind, cx, cy, size, fill)


def _draw_count(img: Image.Image, rng: np.random.Generator, n: int) -> None:
    """``n`` small shapes in distinct cells of a grid, so they never overlap."""
    w, h = img.size
    cols = max(1, math.ceil(math.sqrt(n * w / h)))
    rows = math.ceil(n / cols)
    while cols * rows < n:  # defensive; ceil above already guarantees this
        rows += 1
    cw, ch = w / cols, h / rows
    cells = rng.choice(cols * rows, size=n, replace=False)
    draw = ImageDraw.Draw(img)
    names = list(COLOURS)
    for cell in cells:
        r, c = divmod(int(cell), cols)
        size = min(cw, ch) * rng.uniform(0.5, 0.7)
        cx = c * cw + rng.uniform(size / 2, cw - size / 2)
        cy = r * ch + rng.uniform(size / 2, ch - size / 2)
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw_shape(draw, kind, cx, cy, size, COLOURS[names[int(rng.integers(len(names)))]])


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_digit(img: Image.Image, rng: np.random.Generator, digit: str) -> None:
    """One large digit (font size 60-80% of the short side), roughly centred."""
    w, h = img.size
    font_size = int(min(w, h) * rng.uniform(0.6, 0.8))
    font = _font(font_size)
    stroke = max(1, font_size // 20)  # thicken strokes so they survive downscaling
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font, stroke_width=stroke)
    tw, th = right - left, bottom - top
    x = rng.uniform(0, max(0.0, w - tw)) - left
    y = rng.uniform(0, max(0.0, h - th)) - top
    dark = [c for name, c in COLOURS.items() if name != "yellow"] + [(20, 20, 20)]
    fill = dark[int(rng.integers(len(dark)))]
    draw.text((x, y), digit, font=font, fill=fill, stroke_width=stroke, stroke_fill=fill)


# --------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------


def question_types(types="") -> tuple[str, ...]:
    """``types`` ("" or None = all, a comma-separated string or a sequence of names) → a tuple of question types in
    the order given; ValueError naming the unknown ones."""
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    types = tuple(types or QUESTION_TYPES)
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown:
        raise ValueError(f"unknown question type(s) {', '.join(map(repr, unknown))}: give comma-separated names "
                         f"from {', '.join(QUESTION_TYPES)}, or \"\" for all of them")
    if len(set(types)) != len(types):
        raise ValueError(f"question types {','.join(types)} name one twice: give each at most once")
    return types


def make_example(index: int, seed: int = 0, types=QUESTION_TYPES) -> dict:
    """Builds example ``index`` of the set with ``seed`` (deterministic).

    The question type cycles through ``types`` (default all of ``QUESTION_TYPES``; see :func:`question_types`)
    with the index; the answer is drawn uniformly from ``ANSWERS[type]``.

    Returns:
      {"image": PIL.Image (RGB, W,H in [56, 320]), "question": str,
       "answer": str (one lowercase word or digit), "question_type": str}.
    """
    if index < 0:
        raise ValueError(f"make_example: index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    types = question_types(types)
    qtype = types[index % len(types)]
    answer = ANSWERS[qtype][int(rng.integers(len(ANSWERS[qtype])))]
    question = QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))]
    img = Image.new("RGB", _random_size(rng), _background(rng))
    names = list(COLOURS)
    if qtype == "colour":
        _draw_big_shape(img, rng, SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[answer])
    elif qtype == "shape":
        _draw_big_shape(img, rng, answer, COLOURS[names[int(rng.integers(len(names)))]])
    elif qtype == "count":
        _draw_count(img, rng, int(answer))
    else:
        _draw_digit(img, rng, answer)
    return {"image": img, "question": question, "answer": answer, "question_type": qtype}


def demo_corpus() -> list[str]:
    """Text covering every question phrasing and every answer (tokenizer training)."""
    corpus = [q for qs in QUESTIONS.values() for q in qs]
    corpus += [a for t in QUESTION_TYPES for a in ANSWERS[t]]
    corpus += [f"{q} {a}" for t in QUESTION_TYPES for q in QUESTIONS[t] for a in ANSWERS[t]]
    return corpus


def write_demo_processor(directory: str, vocab_size: int = 400) -> str:
    """A small tokenizer trained on the demo's questions and answers (each answer one token), with the Qwen2-VL
    special tokens right after its vocabulary, plus chat template and preprocessor config → `directory`."""
    from qwen2vl_jax.processing.fixtures import build_tiny_tokenizer, write_tiny_processor

    write_tiny_processor(directory)
    corpus = demo_corpus() + ["You are a helpful assistant.", "system\n", "user\n", "assistant\n"]
    build_tiny_tokenizer(vocab_size, corpus, compact=True).save(str(epath.Path(directory) / "tokenizer.json"))
    return directory


def to_messages(example: dict, image_ref=None) -> list:
    """Qwen chat messages for ``example``; ``image_ref=None`` gives ``{"type": "image"}``."""
    image_item = {"type": "image"}
    if image_ref is not None:
        image_item["image"] = image_ref
    return [
        {"role": "user", "content": [image_item, {"type": "text", "text": example["question"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": example["answer"]}]},
    ]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _example_id(seed: int, index: int) -> str:
    return f"{TFDS_NAME}-s{seed}-{index}"


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def split_start(split: str) -> int:
    """First example index of ``split``: "train" starts at 0, any other split at
    a fixed, name-derived offset >= 1e9, so splits never share examples and a
    split's content does not depend on the other splits' sizes."""
    if split == "train":
        return 0
    return (zlib.crc32(split.encode()) % 1000 + 1) * 10**9


@functools.lru_cache(maxsize=None)
def _builder_class():
    """The TFDS builder class (created lazily so importing this module is cheap)."""
    import tensorflow_datasets as tfds

    class SyntheticVqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """ArrayRecord TFDS builder; images stored as PNG bytes (see write_tfds)."""

        name = TFDS_NAME
        VERSION = tfds.core.Version(TFDS_VERSION)
        # The default code_path lookup imports `importlib_resources` (not
        # installed); there is no checksum/metadata file next to this code.
        code_path = None

        def __init__(self, *, splits=None, seed=0, types=QUESTION_TYPES, **kwargs):
            self._splits = dict(splits or {})
            self._seed = int(seed)
            self._types = question_types(types)
            super().__init__(**kwargs)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                description=_description(self._types),
                features=tfds.features.FeaturesDict({
                    "id": text,
                    "messages": text,
                    # tfds.features.Image writes and decodes without TF, but
                    # decodes to arrays and cannot skip decoding without TF,
                    # so the PNG bytes are stored as plain bytes tensors.
                    "images": tfds.features.Sequence(
                        tfds.features.Tensor(shape=(), dtype=np.object_)),
                    "question_type": text,
                    "answer": text,
                }),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {name: self._generate_examples(split_start(name), n)
                    for name, n in self._splits.items()}

        def _generate_examples(self, start, count):
            for index in range(start, start + count):
                ex = make_example(index, self._seed, self._types)
                yield index, {
                    "id": _example_id(self._seed, index),
                    "messages": json.dumps(to_messages(ex, None)),
                    "images": [_png_bytes(ex["image"])],
                    "question_type": ex["question_type"],
                    "answer": ex["answer"],
                }

    return SyntheticVqa


def _description(types: tuple[str, ...]) -> str:
    return f"Synthetic visual QA ({'/'.join(types)}), Qwen messages."


def write_tfds(data_dir, splits: dict[str, int] | None = None, seed: int = 0, types="") -> str:
    """Writes the demo set as TFDS ``synthetic_vqa`` (ArrayRecord) under ``data_dir``.

    Args:
      data_dir: local or remote (e.g. gs://) TFDS data dir.
      splits: {split name: number of examples}; default {"train": 4000, "test": 400}.
      seed: generation seed.
      types: the question types to write, cycled by index ("" = all; see :func:`question_types`).

    Returns:
      The dataset directory ``data_dir/synthetic_vqa/1.0.0`` (a str). Read it with
      ``TfdsSource("synthetic_vqa", split, data_dir=data_dir)`` or with
      ``tfds.data_source("synthetic_vqa", split=..., data_dir=data_dir)``.

    Raises:
      FileExistsError: the dataset already exists with other splits/sizes or question types.
      ValueError: an unknown question type.
    """
    import tensorflow_datasets as tfds

    splits = dict(splits or {"train": 4000, "test": 400})
    types = question_types(types)
    builder = _builder_class()(splits=splits, seed=seed, types=types, data_dir=str(data_dir),
                               file_format="array_record")
    ds_dir = epath.Path(builder.data_dir)
    if builder.is_prepared():
        have = {k: v.num_examples for k, v in builder.info.splits.items()}
        # builder.info.description is the code's; the written one names the types the folder holds
        held = json.loads((ds_dir / "dataset_info.json").read_text()).get("description", "")
        if have != splits or held != _description(types):
            raise FileExistsError(
                f"write_tfds: {ds_dir} already holds splits {have} ({held}), not the requested "
                f"{splits} ({_description(types)}); delete that folder or pass another data_dir.")
        return str(ds_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(ds_dir)


def write_jsonl(root, count: int, seed: int = 0, start: int = 0) -> str:
    """Writes examples ``start .. start+count-1`` as ``root/data.jsonl``.

    Images go to ``root/images/{index}.png``; each line is
    ``{"id", "messages" (image item -> "images/{index}.png"), "question_type", "answer"}``.
    Returns the jsonl path (str).
    """
    root = epath.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(start, start + count):
        ex = make_example(index, seed)
        rel = f"images/{index}.png"
        (root / rel).write_bytes(_png_bytes(ex["image"]))
        lines.append(json.dumps({
            "id": _example_id(seed, index),
            "messages": to_messages(ex, rel),
            "question_type": ex["question_type"],
            "answer": ex["answer"],
        }))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
