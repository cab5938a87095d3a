"""Answer-scoring metrics for VQA v2, DocVQA, ChartQA and RefCOCO grounding.

Every scorer returns a float in [0, 1]. ``METRICS`` maps a task name to a
scorer ``(prediction, sample) -> float`` so an evaluation loop can stay generic.

Sources of the definitions:
  * VQA v2 accuracy and answer normalization: the official ``vqaEval.py``
    (punctuation list, period/comma rules, number words, articles, contractions).
  * ANLS: Biten et al. 2019 (Scene-Text VQA / DocVQA), threshold 0.5.
  * Relaxed accuracy: ChartQA (Masry et al. 2022), 5 % relative tolerance.
  * Boxes: Qwen2-VL grounding format, coordinates in [0, 1000) of the image.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

from rapidfuzz.distance import Levenshtein

Box = tuple[float, float, float, float]

# --------------------------------------------------------------------------
# VQA v2 answer normalization (tables as in the official vqaEval.py)
# --------------------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
                "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a (typo'd)
# lookahead that always succeeds, so in effect a period is dropped unless a
# digit follows it ("3.5" and ".5" keep theirs, "yes." and "u.s." lose them).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7",
                 "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Official contractions table, verbatim. Its quirks are kept for score parity:
# the capitalized keys ("Im", "Ive", ...) can never match lowercased words, and
# "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _process_punctuation(text: str) -> str:
    """Apply the official punctuation rule.

    Each mark in ``_PUNCTUATION`` is deleted when any occurrence of it touches
    a space (``"p "`` or ``" p"``) or when the text holds a digit-comma-digit
    group such as ``1,000``; otherwise every occurrence becomes a space
    (``"hello,world"`` -> ``"hello world"``). The tests look at the input
    text, not the partly processed one, as the official code does.
    """
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        delete = has_digit_comma or (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digits_articles(text: str) -> str:
    """Lowercase, map number words to digits, drop articles, fix contractions."""
    words = (_NUMBER_WORDS.get(w, w) for w in text.lower().split())
    kept = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in kept)


def normalize_vqa_answer(text: str) -> str:
    """Normalize an answer the way the official VQA v2 evaluation does.

    Newlines/tabs become spaces, the text is stripped, punctuation is handled
    by the official rules, then words are lowercased, number words ("two") become
    digits ("2"), articles are dropped and contractions restored ("dont" ->
    "don't").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def _require_answers(answers: Sequence[str]) -> list[str]:
    """Return ``answers`` as a list, rejecting a bare string or an empty list."""
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single str")
    answers = list(answers)
    if not answers:
        raise ValueError("answers must contain at least one reference answer")
    return answers


# --------------------------------------------------------------------------
# VQA accuracy, ANLS, relaxed accuracy, exact match
# --------------------------------------------------------------------------

def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: mean over leave-one-out subsets of min(matches/3, 1).

    With the usual 10 human answers each of the 10 subsets holds 9 answers. Any
    n >= 1 works; with n == 1 the single answer is its own "subset", so the
    score is 1.0 on a match and 0.0 otherwise. Both sides are normalized by
    :func:`normalize_vqa_answer` (the official script skips this when all
    reference answers are identical, which only matters for unnormalized data).
    """
    refs = [normalize_vqa_answer(a) for a in _require_answers(answers)]
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(refs[0] == pred)
    matches = sum(ref == pred for ref in refs)
    total = 0.0
    for ref in refs:
        others = matches - (ref == pred)
        total += min(others / 3.0, 1.0)
    return total / len(refs)


def _anls_text(text: str) -> str:
    """Lowercase, strip and collapse runs of whitespace (DocVQA convention)."""
    return " ".join(text.lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA).

    For each reference, NL = edit distance / max(len(pred), len(ref)) on
    lowercased, whitespace-normalized strings; the score is ``1 - NL`` when
    ``NL < threshold`` and 0 otherwise, maximized over references. Two empty
    strings score 1.
    """
    pred = _anls_text(prediction)
    best = 0.0
    for ref in map(_anls_text, _require_answers(answers)):
        length = max(len(pred), len(ref))
        nl = Levenshtein.distance(pred, ref) / length if length else 0.0
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def _parse_number(text: str) -> float | None:
    """Parse a ChartQA number: ``"1,234"``, ``" 4.5 "``, ``"45%"`` (-> 45.0).

    Commas are accepted only as thousands separators. Returns None for
    anything else, including nan/inf.
    """
    text = text.strip()
    if text.endswith("%"):
        text = text[:-1].rstrip()
    if "," in text:
        if not _GROUPED_NUMBER.fullmatch(text):
            return None
        text = text.replace(",", "")
    if "_" in text:  # float() would accept "1_000"
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy against a single reference answer.

    If both strings parse as numbers, the prediction is correct when
    ``|pred - ans| / |ans| <= tolerance`` (exact equality when ``ans == 0``).
    Otherwise it is a case-insensitive exact match of the stripped strings.

    Percent convention: a trailing "%" is dropped, so "45%" parses as 45.0 and
    matches "45" but not "0.45". (pix2struct's reference code divides by 100
    instead, and also falls back to string matching when the answer is 0.)
    """
    pred_num, ans_num = _parse_number(prediction), _parse_number(answer)
    if pred_num is not None and ans_num is not None:
        if ans_num == 0:
            return float(pred_num == 0)
        return float(abs(pred_num - ans_num) / abs(ans_num) <= tolerance)
    return float(prediction.strip().lower() == answer.strip().lower())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the stripped, lowercased prediction equals any such answer."""
    pred = prediction.strip().lower()
    return float(any(pred == a.strip().lower() for a in _require_answers(answers)))


# --------------------------------------------------------------------------
# Grounding (RefCOCO)
# --------------------------------------------------------------------------

_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_BOX_PATTERN = re.compile(rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)")


def parse_box(text: str, width: float, height: float) -> Box | None:
    """Parse the first Qwen2-VL box in ``text`` and return it in pixels.

    Accepts ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with or without the box
    tokens and with arbitrary spaces. Coordinates are on Qwen2-VL's 0-1000 grid
    and map to ``x * width / 1000``, ``y * height / 1000`` (continuous, no +1
    pixel). Corners are reordered so x1 <= x2 and y1 <= y2. Returns None when
    no box is found.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    match = _BOX_PATTERN.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    sx, sy = width / 1000.0, height / 1000.0
    return (min(x1, x2) * sx, min(y1, y2) * sy, max(x1, x2) * sx, max(y1, y2) * sy)


def _area(box: Sequence[float]) -> float:
    """Area of an (x1, y1, x2, y2) box; 0 for degenerate or inverted boxes."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two continuous (x1, y1, x2, y2) boxes."""
    if len(a) != 4 or len(b) != 4:
        raise ValueError("boxes must have 4 coordinates (x1, y1, x2, y2)")
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def refcoco_accuracy(prediction_text: str, gt_box: Sequence[float],
                     width: float, height: float) -> float:
    """1.0 if the parsed predicted box has IoU >= 0.5 with ``gt_box`` (pixels)."""
    box = parse_box(prediction_text, width, height)
    if box is None:
        return 0.0
    return float(box_iou(box, gt_box) >= 0.5)


# --------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------

Scorer = Callable[[str, Mapping], float]


def _field(sample: Mapping, key: str):
    """Fetch ``sample[key]`` with an error that names the missing field."""
    try:
        return sample[key]
    except KeyError:
        raise KeyError(f"sample is missing required field {key!r}") from None


def _score_chartqa(prediction: str, sample: Mapping) -> float:
    """Best relaxed accuracy over the sample's reference answers."""
    answers = _require_answers(_field(sample, "answers"))
    return max(relaxed_accuracy(prediction, a) for a in answers)


def _score_refcoco(prediction: str, sample: Mapping) -> float:
    """RefCOCO accuracy from the sample's pixel box and image size."""
    return refcoco_accuracy(prediction, _field(sample, "box"),
                            _field(sample, "width"), _field(sample, "height"))


METRICS: dict[str, Scorer] = {
    "vqa": lambda pred, sample: vqa_accuracy(pred, _field(sample, "answers")),
    "docvqa": lambda pred, sample: anls(pred, _field(sample, "answers")),
    "chartqa": _score_chartqa,
    "refcoco": _score_refcoco,
    "exact": lambda pred, sample: exact_match(pred, _field(sample, "answers")),
}
