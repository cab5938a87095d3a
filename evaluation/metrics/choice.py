"""Multiple-choice letters (MMMU / MMBench style) and free-form numeric answers (MathVista)."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from rapidfuzz.distance import Levenshtein


def _choices(options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Letter -> option text: a Mapping as given (its order), a sequence lettered A, B, C, ..."""
    if isinstance(options, str):
        raise TypeError("options must be a sequence or mapping of option texts, not a single str")
    if isinstance(options, Mapping):
        return {str(k): str(v) for k, v in options.items()}
    return {chr(ord("A") + i): str(text) for i, text in enumerate(options)}


def _parse_mmmu(response: str, index2ans: Mapping[str, str]) -> str | None:
    """lmms-eval's MMMU ``parse_multi_choice_response``, with None where it picks at random."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    all_choices = list(index2ans)
    index_ans, with_bracket = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    if candidates:
        with_bracket = True
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        index_ans = False
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        pattern = "({})" if with_bracket else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))]  # np.argmax: the first of the largest


_BARE_LETTER = re.compile(r"[\s\"'(\[*]*([A-Za-z])[\s\"')\].:,;!*]*")


def parse_multiple_choice(prediction: str, options: Sequence[str] | Mapping[str, str], *,
                          lenient: bool = False) -> str | None:
    """The option letter a free-form answer picks, or None.

    ``options``: the option texts (lettered A, B, C, ... in order) or a mapping
    letter -> text.

    Default: lmms-eval's MMMU ``parse_multi_choice_response`` (from the MMMU
    repo's eval_utils). The response has ``, . ! ? ; : '`` stripped from both
    ends (in that order) and is padded with a space on each side; then the
    first of these steps that finds any letter decides the candidates
    (letters are case-sensitive):
      1. "(A)" anywhere;
      2. "A " anywhere (no space needed before it: "The answer is C." and
         "A cat" both count; so does a word ending in a capital, "DNA ");
      3. "A." anywhere ("B. cat");
      4. only if the padded response has more than 5 whitespace tokens: an
         option's text occurring in the response, case-insensitively.
    One candidate is the answer. Several: the one whose "(X)" (step 1),
    " X " (steps 2-3) or option text (step 4) occurs LAST (``rfind``); where
    that finds nothing for all of them (e.g. "A." and "B." only) the first
    candidate in option order wins, as ``np.argmax`` over -1s does.
    Deviation: where no step finds anything lmms-eval returns
    ``random.choice`` of the letters (seeded); this returns None (scored
    wrong). A short answer that is just an option's text ("cat") therefore
    gives None here.

    ``lenient=True``: when the official rule gives None, also accept a lone
    letter in any case with brackets/quotes/punctuation around it ("b",
    "(c)."), then an option text equal to the stripped response
    (case-insensitive), then the only option text contained in it.
    """
    index2ans = _choices(options)
    found = _parse_mmmu(prediction, index2ans)
    if found is not None or not lenient:
        return found
    bare = _BARE_LETTER.fullmatch(prediction)
    if bare:
        by_upper = {c.upper(): c for c in index2ans}
        if bare.group(1).upper() in by_upper:
            return by_upper[bare.group(1).upper()]
    text = " ".join(prediction.lower().split()).strip(" .,!?;:'\"")
    equal = [c for c, t in index2ans.items() if " ".join(t.lower().split()) == text]
    if len(equal) == 1:
        return equal[0]
    contained = [c for c, t in index2ans.items() if t.strip() and " ".join(t.lower().split()) in text]
    return contained[0] if len(contained) == 1 else None


def multiple_choice_accuracy(prediction: str, options: Sequence[str] | Mapping[str, str],
                             answer_letter: str, *, lenient: bool = False) -> float:
    """1.0 if :func:`parse_multiple_choice` gives ``answer_letter`` (stripped), else 0.0 (also for None)."""
    return float(parse_multiple_choice(prediction, options, lenient=lenient) == answer_letter.strip())


# --------------------------------------------------------------------------
# MathVista / free-form numbers
# --------------------------------------------------------------------------

_QUICK = re.compile(r'The answer is "(.*)"\.')
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_number_answer(prediction: str, answer_type: str = "float",
                          precision: int | None = None) -> str | None:
    """A number from a free-form answer, normalized as MathVista normalizes extractions.

    The official MathVista asks GPT to extract the answer; this uses a
    rule-based extraction instead (deviation), taking the first that applies:
      1. the whole stripped response parses as a number (MathVista's own
         first step: ``int(response)`` / ``float(response)``);
      2. MathVista's quick extraction ``The answer is "X".`` when X parses;
      3. the LAST number in the text (``-12``, ``3.5``, ``.5``, ``1,234``
         with thousands separators dropped).
    Then MathVista's ``normalize_extracted_answer``: ``answer_type``
    "integer" -> ``str(int(float(x)))``; "float" -> ``str(round(float(x),
    precision))`` (``precision`` None keeps ``str(float(x))``); anything else
    -> the number's text. None when no number is found.
    """
    text = prediction.strip()
    candidate = None
    for attempt in (text, *(m.group(1) for m in [_QUICK.search(prediction)] if m)):
        try:
            float(attempt.strip())
        except ValueError:
            continue
        candidate = attempt.strip()
        break
    if candidate is None:
        numbers = _NUMBER.findall(prediction)
        if not numbers:
            return None
        candidate = numbers[-1].replace(",", "")
    try:
        value = float(candidate)
        if answer_type == "integer":
            return str(int(value))
        if answer_type == "float":
            return str(value if precision is None else round(value, int(precision)))
    except (ValueError, OverflowError):
        return None
    return candidate


def mathvista_accuracy(prediction: str, answer: str, *, question_type: str = "free_form",
                       answer_type: str = "text", choices: Sequence[str] | None = None,
                       precision: int | None = None, lenient: bool = False) -> float:
    """MathVista accuracy of one response (``safe_equal`` of the normalized extraction and the answer).

    The raw response stands in for the GPT extraction (deviation, see
    :func:`extract_number_answer`), then MathVista's
    ``normalize_extracted_answer``:
      * multi_choice: the response itself if it equals a choice; else the
        letter of a "(X)" in it, or the stripped response when it is a bare
        letter, selects that choice; else the choice nearest by Levenshtein
        distance to the stripped response (first on ties). ``lenient=True``
        instead picks the letter with :func:`parse_multiple_choice` (lenient)
        and falls back to the nearest choice.
      * integer / float: :func:`extract_number_answer`.
      * anything else: the stripped response.
    Correct iff ``str(extraction).strip() == str(answer).strip()``.
    """
    if question_type == "multi_choice":
        choices = [str(c) for c in (choices or [])]
        if not choices:
            raise ValueError("multi_choice needs choices")
        if prediction in choices:
            extraction = prediction
        else:
            text = prediction.strip()
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            if lenient:
                letter = parse_multiple_choice(prediction, choices, lenient=True)
            else:
                bracket = re.findall(r"\(([a-zA-Z])\)", text)
                letter = bracket[0].upper() if bracket else text
            if letter in letters:
                extraction = choices[letters.index(letter)]
            else:
                distances = [Levenshtein.distance(text, c) for c in choices]
                extraction = choices[distances.index(min(distances))]
    elif answer_type in ("integer", "float"):
        extraction = extract_number_answer(prediction, answer_type, precision)
        if extraction is None:
            return 0.0
    else:
        extraction = prediction.strip()
    return float(str(extraction).strip() == str(answer).strip())
