"""Tests for evaluation.metrics (pure Python; hand-computed expectations).

The earlier, lenient rules are tested here with ``lenient=True``; the official
(default) rules are checked against independent reference implementations in
tests/test_metrics_official.py.
"""

import pytest

from evaluation.metrics import (
    METRICS,
    anls,
    box_iou,
    exact_match,
    normalize_vqa_answer,
    parse_box,
    refcoco_accuracy,
    relaxed_accuracy,
    vqa_accuracy,
)

# ---------------------------------------------------------------- normalization


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two dogs.", "2 dogs"),
        ("The Cat", "cat"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("yes.", "yes"),
        ("3.5", "3.5"),
        (".5", ".5"),
        ("u.s.", "us"),
        ("hello,world", "hello world"),  # mark touches no space -> replaced by space
        ("hello, world", "hello world"),  # mark touches a space -> deleted
        ("1,000", "1000"),  # digit,digit anywhere -> every mark deleted
        ("black/white", "black white"),
        ("x-ray", "x ray"),
        ("it's", "it's"),  # apostrophe is not in the official list
        ("  A\tred\nball  ", "red ball"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("Im", "im"),  # official table's capitalized keys never match
        ("", ""),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


# ---------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_annotators(k, expected):
    # (k*min((k-1)/3, 1) + (10-k)*min(k/3, 1)) / 10
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_both_sides():
    answers = ["2"] * 3 + ["three"] * 7
    assert vqa_accuracy("Two.", answers, lenient=True) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers, lenient=True) == pytest.approx(1.0)
    # official (a013f00): the differing references are normalized too, so "three" becomes "3"
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0) == vqa_accuracy("three", answers)
    # 2016: references only got processPunctuation, so "three" stayed a word
    assert vqa_accuracy("3", answers, rule="official-2016") == 0.0
    assert vqa_accuracy("three", answers, rule="official-2016") == 0.0  # the prediction becomes "3"


def test_vqa_accuracy_single_and_few_answers():
    assert vqa_accuracy("cat", ["The cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    # n=2, both match: each subset of 1 has 1 match -> 1/3
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)


def test_vqa_accuracy_rejects_bad_answers():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(TypeError):
        vqa_accuracy("x", "x")


# ---------------------------------------------------------------- ANLS


def test_anls_threshold_boundary():
    assert anls("ab", ["ax"], lenient=True) == 0.0  # NL = 1/2, not < 0.5
    assert anls("abcde", ["abcxy"], lenient=True) == pytest.approx(0.6)  # NL = 2/5
    assert anls("abcde", ["abcdx"], lenient=True) == pytest.approx(0.8)  # NL = 1/5
    assert anls("ab", ["ax"], threshold=0.6, lenient=True) == pytest.approx(0.5)
    # official (leaderboard): a similarity of exactly 0.5 is kept
    assert anls("ab", ["ax"]) == 0.5
    assert anls("ab", ["abcd"]) == 0.5
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)
    assert anls("ab", ["ax"], threshold=0.4) == 0.0


def test_anls_case_whitespace_and_max():
    assert anls("  HELLO World ", ["hello world"]) == 1.0
    assert anls("hello", ["zzzzz", "hellx"]) == pytest.approx(0.8)
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0


# ---------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "pred, ans, expected",
    [
        ("4.9", "5", 1.0),
        ("4.7", "5", 0.0),
        ("4.75", "5", 1.0),  # exactly 5 % is accepted
        ("5.3", "5", 0.0),
        ("-4.9", "-5", 1.0),
        ("45%", "45", 1.0),  # "%" dropped: 45 vs 45
        ("45 %", "45%", 1.0),
        ("45%", "0.45", 0.0),  # not converted to a fraction
        ("0", "0", 1.0),
        ("0.0", "0", 1.0),
        ("0.01", "0", 0.0),
        ("1,234", "1234", 1.0),
        (" 1,234.5 ", "1234.5", 1.0),
        ("1,23", "123", 0.0),  # malformed grouping -> string compare
        ("Yes", " yes ", 1.0),
        ("Canada", "canada", 1.0),
        ("Canada", "Mexico", 0.0),
        ("five", "5", 0.0),
        ("nan", "nan", 1.0),  # not a number -> plain string match
    ],
)
def test_relaxed_accuracy(pred, ans, expected):
    assert relaxed_accuracy(pred, ans, lenient=True) == expected


def test_relaxed_accuracy_custom_tolerance():
    assert relaxed_accuracy("4.7", "5", tolerance=0.1) == 1.0
    assert relaxed_accuracy("4.7", "5", tolerance=0.1, lenient=True) == 1.0


# ---------------------------------------------------------------- exact match


def test_exact_match():
    assert exact_match(" Paris ", ["london", "PARIS"]) == 1.0
    assert exact_match("paris.", ["paris"]) == 0.0


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize(
    "text",
    [
        "<|box_start|>(100,200),(300,400)<|box_end|>",
        "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>",
        "<|box_start|>( 100 , 200 ) , ( 300 , 400 )<|box_end|>",
        "(100,200),(300,400)",
        "(300,400),(100,200)",  # corners reordered
        "(100,400),(300,200)",
        "first (100,200),(300,400) then (0,0),(10,10)",  # first box wins
    ],
)
def test_parse_box_variants(text):
    assert parse_box(text, 640, 480, lenient=True) == pytest.approx((64.0, 96.0, 192.0, 192.0))


@pytest.mark.parametrize("text", ["", "no box here", "(100,200)", "(a,b),(c,d)", "<|box_start|><|box_end|>"])
def test_parse_box_failure(text):
    assert parse_box(text, 640, 480) is None
    assert parse_box(text, 640, 480, lenient=True) is None


def test_parse_box_rejects_bad_size():
    with pytest.raises(ValueError):
        parse_box("(1,2),(3,4)", 0, 10)


def test_box_iou():
    a = (0.0, 0.0, 2.0, 2.0)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, (5, 5, 6, 6)) == 0.0
    assert box_iou(a, (2, 0, 4, 2)) == 0.0  # touching edge
    assert box_iou(a, (1, 0, 3, 2)) == pytest.approx(1 / 3)  # inter 2, union 6
    assert box_iou(a, (0, 0, 2, 1)) == pytest.approx(0.5)  # contained half
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # zero-area union
    with pytest.raises(ValueError):
        box_iou((0, 0, 1), a)


@pytest.mark.parametrize("y2, expected", [(51, 1.0), (50, 1.0), (49, 0.0)])
def test_refcoco_accuracy_threshold(y2, expected):
    # 1000x1000 image: grid coordinates equal pixels (lenient /1000); IoU = y2 / 100.
    pred = f"<|box_start|>(0,0),(100,{y2})<|box_end|>"
    assert refcoco_accuracy(pred, (0, 0, 100, 100), 1000, 1000, lenient=True) == expected
    # official: 999x999 image, the grid maps 1:1 through Qwen-VL's / 999
    assert refcoco_accuracy(pred, (0, 0, 100, 100), 999, 999) == expected


def test_refcoco_accuracy_scaled_and_unparseable():
    # grid (250,250)-(750,750) on 200x100 -> pixels (50,25)-(150,75)
    pred = "<|box_start|>(250,250),(750,750)<|box_end|>"
    assert refcoco_accuracy(pred, (50, 25, 150, 75), 200, 100) == 1.0
    assert refcoco_accuracy(pred, (50, 25, 150, 75), 200, 100, lenient=True) == 1.0
    assert refcoco_accuracy("I cannot find it.", (0, 0, 10, 10), 100, 100) == 0.0


# ---------------------------------------------------------------- registry


def test_metrics_registry():
    assert set(METRICS) == {"vqa", "docvqa", "chartqa", "refcoco", "exact"}
    assert METRICS["vqa"]("two", {"answers": ["2"] * 9 + ["2."]}) == 1.0  # answers differ: both sides normalized
    assert METRICS["vqa"]("two", {"answers": ["2"] * 10}) == 0.0  # unanimous: compared as written (official)
    assert METRICS["docvqa"]("abcxy", {"answers": ["abcde"]}) == pytest.approx(0.6)
    assert METRICS["chartqa"]("4.9", {"answers": ["5"]}) == 1.0
    assert METRICS["chartqa"]("10", {"answers": ["5", "10.2"]}) == 1.0
    assert METRICS["exact"]("A", {"answers": ["b", "a"]}) == 1.0
    sample = {"answers": [], "box": (0, 0, 100, 100), "width": 1000, "height": 1000}
    assert METRICS["refcoco"]("(0,0),(100,100)", sample) == 1.0
    assert METRICS["refcoco"]("(0,0),(100,100)", sample, lenient=True) == 1.0
    assert METRICS["docvqa"]("ab", {"answers": ["abcd"]}) == 0.5
    assert METRICS["docvqa"]("ab", {"answers": ["abcd"]}, lenient=True) == 0.0
    assert METRICS["chartqa"]("45%", {"answers": ["45"]}) == 0.0
    assert METRICS["chartqa"]("45%", {"answers": ["45"]}, lenient=True) == 1.0


def test_metrics_registry_errors():
    with pytest.raises(KeyError, match="answers"):
        METRICS["vqa"]("x", {})
    with pytest.raises(KeyError, match="box"):
        METRICS["refcoco"]("(0,0),(1,1)", {"width": 10, "height": 10})
    with pytest.raises(ValueError):
        METRICS["chartqa"]("1", {"answers": []})


def test_scores_are_in_unit_interval():
    for score in (vqa_accuracy("a b", ["b"] * 5), anls("x", ["y"]), relaxed_accuracy("1", "2")):
        assert 0.0 <= score <= 1.0
