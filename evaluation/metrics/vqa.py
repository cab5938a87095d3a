"""VQA v2 accuracy and answer normalization, after the official ``vqaEval.py``.

Official rule, GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
at a013f00 (2021-03-11, "Fixed processing answers bug", the current version):
``VQAEval.evaluate`` turns newlines/tabs into spaces and strips the prediction and
every reference answer; then, only when the reference answers are not all the same
string, it puts the prediction AND every reference through ``processPunctuation``
and ``processDigitArticle`` (when they are all the same, neither side is
normalized). For each of the n reference answers the accuracy is
``min(1, #other answers equal to the prediction / 3)``; the question's score is the
mean of those n values.

``VQA_RULES`` names the rules :func:`vqa_accuracy` offers: "official" (the above),
"official-2016" (the script before a013f00: the prediction always normalized, the
references through ``processPunctuation`` only and only when not all the same) and
"lenient" (this project's earlier rule: both sides always fully normalized).
"""

from __future__ import annotations

import re
from typing import Sequence

from evaluation.metrics._common import require_answers

# --------------------------------------------------------------------------
# Tables as in the official vqaEval.py
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



# ``periodStrip.sub("", text, re.UNICODE)`` in the official code passes
# re.UNICODE (32) as the *count*: at most 32 periods are removed.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(text: str, period_count: int = 0) -> str:
    """Apply the official punctuation rule (``processPunctuation``).

    Each mark in ``_PUNCTUATION`` is deleted when any occurrence of it touches
    a space (``"p "`` or ``" p"``) or when the text holds a digit-comma-digit
    group such as ``1,000``; otherwise every occurrence becomes a space
    (``"hello,world"`` -> ``"hello world"``). The tests look at the input
    text, not the partly processed one, as the official code does. Then
    periods not followed by a digit are removed (at most ``period_count`` of
    them; 0 means all).
    """
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        delete = has_digit_comma or (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=period_count)


def _process_digits_articles(text: str) -> str:
    """Lowercase, map number words to digits, drop articles, fix contractions."""
    words = (_NUMBER_WORDS.get(w, w) for w in text.lower().split())
    kept = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in kept)


def normalize_vqa_answer(text: str, *, lenient: bool = False) -> str:
    """Normalize an answer the way the official VQA v2 evaluation normalizes a prediction.

    Newlines/tabs become spaces, the text is stripped, punctuation is handled
    by the official rules, then words are lowercased, number words ("two") become
    digits ("2"), articles are dropped and contractions restored ("dont" ->
    "don't"). By default at most 32 periods are removed, as the official call
    ``periodStrip.sub("", text, re.UNICODE)`` does (``re.UNICODE`` lands in the
    ``count`` argument); ``lenient=True`` removes them all.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    count = 0 if lenient else _OFFICIAL_PERIOD_COUNT
    return _process_digits_articles(_process_punctuation(text, count))


VQA_RULES = ("official", "official-2016", "lenient")


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], *, lenient: bool = False, rule: str | None = None) -> float:
    """VQA accuracy of one prediction against its n reference answers, by `rule` (one of ``VQA_RULES``; default
    "official", or "lenient" when ``lenient=True``).

    "official" (``vqaEval.py`` at a013f00): newlines/tabs → spaces and strip on both sides; when the references are
    not all the same string, both sides go through :func:`normalize_vqa_answer` (punctuation, at most 32 periods
    removed, lowercase, number words → digits, articles dropped, contractions), else neither does. Score = mean over
    the n references of ``min(1, matches among the other n-1 references / 3)``, so with 10 annotators k matches
    give 0.3k capped at 1. E.g. "yes" against ["yes", "Yes", "YES", "yes.", ...] scores 1.0, and against ten
    "Yes" 0.0 (unanimous: compared as written).

    "official-2016" (before a013f00): the prediction always normalized; the references not stripped, and put
    through ``processPunctuation`` only (no lowercasing, number words or articles) and only when not all identical.

    "lenient" (this project's earlier rule): both sides always fully normalized (all periods removed).

    Deviation, every rule: with a single reference answer the official formula scores every prediction 0 (no "other"
    answers); here n == 1 scores 1.0 when prediction and answer are equal after :func:`normalize_vqa_answer` on
    both, else 0.0.
    """
    rule = rule or ("lenient" if lenient else "official")
    if rule not in VQA_RULES:
        raise ValueError(f"VQA rule {rule!r}: choose one of {', '.join(VQA_RULES)}")
    answers = require_answers(answers)
    if len(answers) == 1:
        full = rule == "lenient"
        return float(normalize_vqa_answer(answers[0], lenient=full) == normalize_vqa_answer(prediction, lenient=full))
    if rule == "official":
        refs = [_whitespace(a) for a in answers]
        pred = _whitespace(prediction)
        if len(set(refs)) > 1:  # the script tests the stripped answers
            refs = [normalize_vqa_answer(a) for a in refs]
            pred = normalize_vqa_answer(pred)
    elif rule == "official-2016":
        pred = normalize_vqa_answer(prediction)
        differ = len(set(answers)) > 1
        refs = [_process_punctuation(a, _OFFICIAL_PERIOD_COUNT) for a in answers] if differ else list(answers)
    else:
        pred = normalize_vqa_answer(prediction, lenient=True)
        refs = [normalize_vqa_answer(a, lenient=True) for a in answers]
    matches = sum(ref == pred for ref in refs)
    total = 0.0
    for ref in refs:
        total += min(1.0, (matches - (ref == pred)) / 3.0)
    return total / len(refs)
