"""String and number matching: ANLS (DocVQA), relaxed accuracy (ChartQA), exact match, OCRBench."""

from __future__ import annotations

import math
import re
from typing import Sequence

from rapidfuzz.distance import Levenshtein

from evaluation.metrics._common import require_answers


def _anls_text(text: str) -> str:
    """Lowercase, strip and collapse runs of whitespace (DocVQA convention)."""
    return " ".join(text.lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5, *,
         lenient: bool = False) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA).

    Default (the DocVQA leaderboard script, also lmms-eval's ``anls``): for
    each reference, NL = Levenshtein distance between the lowercased,
    whitespace-collapsed strings divided by ``max(len(ref.upper()),
    len(pred.upper()))`` -- the RAW lengths, before stripping or collapsing
    (0 when both are empty). The score is ``s = 1 - min(NL)`` over the
    references, set to 0 when ``s < 1 - threshold``: with the usual 0.5 a
    similarity of exactly 0.5 is kept ("ab" vs "abcd" scores 0.5).
    ``threshold`` is the paper's tau on NL; the script's own parameter is on
    the similarity (``s < 0.5 -> 0``), which is the same rule for 0.5.
    No deviation from the script.

    ``lenient=True`` (the earlier rule): NL uses the lengths of the collapsed
    strings and is zeroed when ``NL >= threshold`` (ties at 0.5 dropped).
    """
    answers = require_answers(answers)
    pred = _anls_text(prediction)
    if lenient:
        best = 0.0
        for ref in map(_anls_text, answers):
            length = max(len(pred), len(ref))
            nl = Levenshtein.distance(pred, ref) / length if length else 0.0
            if nl < threshold:
                best = max(best, 1.0 - nl)
        return best
    values = []
    for answer in answers:
        dist = Levenshtein.distance(_anls_text(answer), pred)
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(float(dist) / float(length) if length else 0.0)
    score = 1.0 - min(values)
    return score if score >= 1.0 - threshold else 0.0


# --------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# --------------------------------------------------------------------------

_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def _parse_number_lenient(text: str) -> float | None:
    """Parse ``"1,234"``, ``" 4.5 "``, ``"45%"`` (-> 45.0); None otherwise (also nan/inf)."""
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


def _pix2struct_float(text: str) -> float | None:
    """pix2struct's ``_to_float``: ``float(text)``, or ``float(text.rstrip("%")) / 100`` if it ends in "%"."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05, *,
                     lenient: bool = False) -> float:
    """ChartQA relaxed accuracy against a single reference answer.

    Default (pix2struct's ``relaxed_correctness``, as used by lmms-eval and
    Qwen-VL): each side is converted with Python ``float()``, a trailing "%"
    meaning /100 ("45%" -> 0.45, so "45%" vs "45" is wrong, "45%" vs "0.45"
    right). When the prediction converts and the answer converts to a NONZERO
    number, it is correct iff ``|pred - ans| / |ans| <= tolerance``; otherwise
    (an answer of 0, text, "1,234" -- float() refuses commas) the strings must
    be equal after ``lower()`` (no stripping; float() itself ignores
    surrounding whitespace). No deviation from the reference.

    ``lenient=True`` (the earlier rule): strings stripped; "%" dropped
    ("45%" == "45"); thousands separators accepted ("1,234"); an answer of 0
    needs a prediction equal to 0; nan/inf/underscores are not numbers.
    """
    if lenient:
        pred_num, ans_num = _parse_number_lenient(prediction), _parse_number_lenient(answer)
        if pred_num is not None and ans_num is not None:
            if ans_num == 0:
                return float(pred_num == 0)
            return float(abs(pred_num - ans_num) / abs(ans_num) <= tolerance)
        return float(prediction.strip().lower() == answer.strip().lower())
    pred_num, ans_num = _pix2struct_float(prediction), _pix2struct_float(answer)
    if pred_num is not None and ans_num:
        return float(abs(pred_num - ans_num) / abs(ans_num) <= tolerance)
    return float(prediction.lower() == answer.lower())


def exact_match(prediction: str, answers: Sequence[str], *, lenient: bool = False) -> float:
    """1.0 if the stripped, lowercased prediction equals any such answer.

    There is no reference script for this generic metric; ``lenient`` is
    accepted for a uniform signature and changes nothing.
    """
    pred = prediction.strip().lower()
    return float(any(pred == a.strip().lower() for a in require_answers(answers)))


# --------------------------------------------------------------------------
# OCRBench
# --------------------------------------------------------------------------

_HME_NAMES = frozenset({"HME100k", "Handwritten Mathematical Expression Recognition"})


def _fold_fullwidth(text: str) -> str:
    """Fullwidth ASCII (U+FF01..U+FF5E) -> ASCII, ideographic space -> space."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else " " if c == "\u3000" else c
                   for c in text)


def ocrbench_match(prediction: str, answers: str | Sequence[str], dataset: str | None = None, *,
                   lenient: bool = False) -> float:
    """OCRBench: 1.0 if some answer occurs as a substring of the prediction.

    Default (the OCRBench script, as in lmms-eval's ``ocrbench_process_results``):
    both sides ``lower().strip()`` with newlines turned into spaces, then
    ``answer in prediction``. For the HME100k handwritten-math items
    (``dataset`` "HME100k", or its question type "Handwritten Mathematical
    Expression Recognition") both sides are stripped, newlines and then all
    spaces removed, and the match is case-sensitive. ``answers`` may be one
    string or a list. No deviation from the script (an empty answer matches
    anything there too).

    ``lenient=True`` also folds fullwidth ASCII to ASCII (as recent lmms-eval
    does) and collapses runs of whitespace on both sides.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    hme = dataset in _HME_NAMES
    if lenient:
        prediction = _fold_fullwidth(prediction)
        answers = [_fold_fullwidth(a) for a in answers]

    def clean(text: str) -> str:
        if hme:
            return text.strip().replace("\n", " ").replace(" ", "") if not lenient else "".join(text.split())
        text = text.lower().strip().replace("\n", " ")
        return " ".join(text.split()) if lenient else text

    pred = clean(prediction)
    return float(any(clean(a) in pred for a in answers))
