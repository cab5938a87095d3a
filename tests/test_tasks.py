"""Benchmark tasks (evaluation/tasks): for every task a tiny parquet set in its Hugging Face columns (images as
{"bytes", "path"} structs, video clips by relative path) opened through `open_eval_source("parquet:DIR", task=...)`:
the exact prompt lmms-eval builds for Qwen2-VL, the extracted answers, gold answers scoring 1 and wrong ones 0; and
`qwen2vl-eval --tasks` over two tasks in one process on a tiny random checkpoint: one model load, no compile for the
second task (same shapes), TASK.jsonl each and summary.md / summary.json."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.data import open_eval_source
from evaluation.tasks import TASKS, get_task

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def png(width=40, height=30, seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def image_cell(seed=0, width=40, height=30) -> dict:
    return {"bytes": png(width, height, seed), "path": f"{seed}.png"}


def clip(path, frames=8):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            rgb = np.full((48, 64, 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def open_rows(tmp_path, name, rows):
    """rows → DIR/test.parquet → the task's samples through the data source."""
    folder = tmp_path / name.replace("+", "plus")
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "test.parquet")
    source = open_eval_source(f"parquet:{folder}", task=get_task(name))
    samples = [source[i] for i in range(len(source))]
    assert not [s for s in samples if "error" in s], samples
    return samples


def prompt(task, sample) -> str:
    turn = task.messages(sample)
    assert len(turn) == 1 and turn[0]["role"] == "user"
    *media, text = turn[0]["content"]
    assert [m["type"] for m in media] == ["image"] * len(sample["images"]) + ["video"] * len(sample["videos"])
    return text["text"]


def scores(task, predictions, sample, lenient=False):
    return [task.score(p, sample, lenient=lenient) for p in predictions]


# ---------------------------------------------------------------- short answers


@pytest.mark.parametrize("name", ["docvqa", "infovqa"])
def test_docvqa_infovqa_anls(tmp_path, name):
    rows = [{"questionId": 7, "question": "What is the date?", "answers": ["March 3, 1998", "3/3/1998"],
             "image": image_cell(), "docId": 1}]
    task, (sample,) = get_task(name), open_rows(tmp_path, name, rows)
    assert (sample["id"], sample["answers"], len(sample["images"])) == ("7", ["March 3, 1998", "3/3/1998"], 1)
    assert isinstance(sample["images"][0], bytes)
    assert prompt(task, sample) == "What is the date?" + SHORT
    assert (task.metric, task.max_new_tokens) == ("anls", 32)
    assert scores(task, ["March 3, 1998", "march 3 1998", "nothing alike"], sample) == [1.0, pytest.approx(12 / 13),
                                                                                          0.0]


def test_chartqa_relaxed_accuracy(tmp_path):
    rows = [{"type": "human_test", "question": "What is the peak value?", "answer": "45", "image": image_cell()}]
    task, (sample,) = get_task("chartqa"), open_rows(tmp_path, "chartqa", rows)
    assert sample["answers"] == ["45"] and sample["category"] == "human_test"
    assert prompt(task, sample) == "What is the peak value?" + SHORT
    assert scores(task, ["45", "46.5", "48"], sample) == [1.0, 1.0, 0.0]  # 5 % tolerance


@pytest.mark.parametrize("name", ["textvqa", "vqav2", "vqa"])
def test_textvqa_vqav2_vqa_accuracy(tmp_path, name):
    answers = ["red"] * 3 + ["dark red"] * 7
    if name == "textvqa":
        rows = [{"question_id": 3, "question": "What color?", "answers": answers, "image": image_cell()}]
    else:  # lmms-lab/VQAv2: answers as {answer, answer_confidence, answer_id} structs
        rows = [{"question_id": 3, "question": "What color?", "answer_type": "other", "multiple_choice_answer": "red",
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                             for i, a in enumerate(answers)], "image": image_cell()}]
    task, (sample,) = get_task(name), open_rows(tmp_path, name, rows)
    assert sample["answers"] == answers and sample["id"] == "3"
    assert prompt(task, sample) == "What color?" + SHORT
    assert scores(task, ["dark red", "Red.", "blue"], sample) == [1.0, pytest.approx(0.9), 0.0]


def test_exact_is_the_demo_question_as_asked(tmp_path):
    rows = [{"id": "d0", "question": "How many squares?", "answer": "3", "image": image_cell()}]
    task, (sample,) = get_task("exact"), open_rows(tmp_path, "exact", rows)
    assert prompt(task, sample) == "How many squares?"
    assert scores(task, ["3", "4"], sample) == [1.0, 0.0]


# ---------------------------------------------------------------- OCRBench


def test_ocrbench(tmp_path):
    rows = [{"dataset": "IIIT5K", "question": " what is written in the image? ", "question_type": "Regular Text "
             "Recognition", "answer": ["CENTRE"], "image": image_cell()},
            {"dataset": "HME100k", "question": "Please write out the expression of the formula in the image using "
             "LaTeX format.", "question_type": "Handwritten Mathematical Expression Recognition",
             "answer": ["x ^ { 2 }"], "image": image_cell(1)}]
    task = get_task("ocrbench")
    text, hme = open_rows(tmp_path, "ocrbench", rows)
    assert prompt(task, text) == "what is written in the image?" and text["answers"] == ["CENTRE"]
    assert scores(task, ["The word is centre.", "center"], text) == [1.0, 0.0]
    assert scores(task, ["x^{2}", "X^{2}"], hme) == [1.0, 0.0]  # spaces dropped, case kept


# ---------------------------------------------------------------- image multiple choice


def test_mmmu_multiple_choice_and_open(tmp_path):
    rows = [{"id": "validation_Art_1", "question": "<image 1> Which style is shown?",
             "options": "['Baroque', 'Cubism', 'Gothic']", "answer": "B", "question_type": "multiple-choice",
             "image_1": image_cell(0), "image_2": None, "subfield": "Art"},
            {"id": "validation_Math_2", "question": "Compare <image 2> with <image 1>. How many sides?",
             "options": "[]", "answer": "14", "question_type": "open", "image_1": image_cell(1),
             "image_2": image_cell(2), "subfield": "Math"}]
    task = get_task("mmmu")
    mc, open_ = open_rows(tmp_path, "mmmu", rows)
    assert mc["options"] == ["Baroque", "Cubism", "Gothic"] and len(mc["images"]) == 1
    assert prompt(task, mc) == ("<image 1> Which style is shown?\nA. Baroque\nB. Cubism\nC. Gothic\n\n" + LETTER)
    assert scores(task, ["B", "(B) Cubism", "The answer is B.", "A", "Cubism"], mc) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert task.score("Cubism", mc, lenient=True) == 1.0  # the option's text only in lenient scoring
    assert open_["images"] == [png(seed=1), png(seed=2)]  # image_1, image_2: lmms-eval's sorted order
    assert prompt(task, open_) == ("Compare <image 2> with <image 1>. How many sides?\n\n"
                                   "Answer the question using a single word or phrase.")
    assert scores(task, ["14", "It has 14 sides.", "12"], open_) == [1.0, 1.0, 0.0]


def test_mmbench(tmp_path):
    rows = [{"index": 11, "question": "What is in the box?", "hint": "Look closely.", "A": "a cat", "B": "a dog",
             "C": "a bird", "D": None, "answer": "C", "category": "attribute", "image": image_cell()},
            {"index": 12, "question": "Which one?", "hint": "nan", "A": "x", "B": "y", "C": "nan", "D": "nan",
             "answer": "A", "category": "c", "image": image_cell(1)}]
    task = get_task("mmbench")
    hinted, plain = open_rows(tmp_path, "mmbench", rows)
    assert hinted["options"] == ["a cat", "a dog", "a bird"] and hinted["id"] == "11"
    assert prompt(task, hinted) == ("Look closely. What is in the box? There are several options:\nA. a cat\n"
                                    "B. a dog\nC. a bird\n\n" + LETTER)
    assert prompt(task, plain) == "Which one? There are several options:\nA. x\nB. y\n\n" + LETTER
    assert scores(task, ["C", "C. a bird", "A"], hinted) == [1.0, 1.0, 0.0]


def test_realworldqa(tmp_path):
    question = ("Which object is closer?\nA. The car\nB. The tree\nC. The sign\nPlease answer directly with only the "
                "letter of the correct option and nothing else.")
    rows = [{"image": image_cell(), "question": question, "answer": "B"},
            {"image": image_cell(1), "question": "How many cars? Please answer directly with a single word or "
             "number.", "answer": "3"}]
    task = get_task("realworldqa")
    choice, count = open_rows(tmp_path, "realworldqa", rows)
    assert prompt(task, choice) == question  # the benchmark's questions carry their options and instruction
    assert scores(task, ["B", "b.", "The answer is B", "A"], choice) == [1.0, 1.0, 0.0, 0.0]
    assert task.score("The answer is B", choice, lenient=True) == 1.0
    assert scores(task, ["3", "three"], count) == [1.0, 0.0]


def test_mathvista(tmp_path):
    mc_query = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
                "end.\nQuestion: Which shape is largest?\nChoices:\n(A) circle\n(B) square")
    rows = [{"pid": "1", "question": "Which shape is largest?", "decoded_image": image_cell(), "image": "images/1.jpg",
             "choices": ["circle", "square"], "unit": None, "precision": None, "answer": "square",
             "question_type": "multi_choice", "answer_type": "text", "query": mc_query},
            {"pid": "2", "question": "How long is the bar?", "decoded_image": image_cell(1), "image": "images/2.jpg",
             "choices": None, "unit": "cm", "precision": 1.0, "answer": "2.5", "question_type": "free_form",
             "answer_type": "float", "query": None},
            {"pid": "3", "question": "How many dots?", "decoded_image": image_cell(2), "image": "images/3.jpg",
             "choices": None, "unit": None, "precision": None, "answer": "7", "question_type": "free_form",
             "answer_type": "integer", "query": None}]
    task = get_task("mathvista")
    mc, real, integer = open_rows(tmp_path, "mathvista", rows)
    assert prompt(task, mc) == mc_query and mc["options"] == ["circle", "square"] and mc["answers"] == ["square"]
    assert prompt(task, real) == ("Hint: Please answer the question requiring a floating-point number with one decimal "
                                  "place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: How "
                                  "long is the bar? (Unit: cm)")
    assert prompt(task, integer) == ("Hint: Please answer the question requiring an integer answer and provide the "
                                     "final value, e.g., 1, 2, 3, at the end.\nQuestion: How many dots?")
    assert scores(task, ["square", "(B) square", "circle"], mc) == [1.0, 1.0, 0.0]
    assert scores(task, ["2.5", "The bar is 2.50 cm long, so 2.5", "3"], real) == [1.0, 1.0, 0.0]
    assert scores(task, ["7", "There are 7 dots.", "8"], integer) == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------- grounding


@pytest.mark.parametrize("name", ["refcoco", "refcoco+", "refcocog"])
def test_refcoco(tmp_path, name):
    rows = [{"question_id": 5, "question": "Please carefully observe the area circled in the image and come up with a "
             "caption for the area.", "answer": ["the left dog", "dog on the left"], "bbox": [8.0, 6.0, 16.0, 12.0],
             "image": image_cell(width=80, height=60), "file_name": "COCO_1.jpg"}]
    task, (sample,) = get_task(name), open_rows(tmp_path, name, rows)
    assert sample["box"] == [8.0, 6.0, 24.0, 18.0] and (sample["width"], sample["height"]) == (80.0, 60.0)
    assert prompt(task, sample) == "<|object_ref_start|>the left dog<|object_ref_end|>"
    assert (task.metric, task.max_new_tokens) == ("acc@iou0.5", 32)
    gold = "<|box_start|>(100,100),(300,300)<|box_end|>"  # [0, 1000) of 80×60: (8, 6), (24, 18)
    assert scores(task, [gold, "<|object_ref_start|>the left dog<|object_ref_end|>" + gold,
                         "<|box_start|>(600,600),(900,900)<|box_end|>", "no box"], sample) == [1.0, 1.0, 0.0, 0.0]


def test_refcoco_jsonl_asks_its_question():
    """Today's JSONL grounding data (the question asks for the box, the box and size given)."""
    task = get_task("refcoco")
    sample = task.sample_from_row({"id": "r", "question": "Where is the cat?", "box": [0, 0, 10, 10], "width": 20,
                                   "height": 20, "image": b"x"}, 0)
    assert sample["expression"] is None and prompt(task, sample) == "Where is the cat?"
    assert sample["box"] == [0.0, 0.0, 10.0, 10.0] and (sample["width"], sample["height"]) == (20.0, 20.0)


# ---------------------------------------------------------------- video


def test_mvbench(tmp_path):
    folder = tmp_path / "mvbench"
    folder.mkdir()
    clip(folder / "clip0.mp4")
    rows = [{"video": "clip0.mp4", "question": "What happens after the man sits?",
             "candidates": ["He stands up.", "He opens a book.", "He leaves."], "answer": "He opens a book."}]
    task, (sample,) = get_task("mvbench"), open_rows(tmp_path, "mvbench", rows)
    assert sample["videos"] == [str(folder / "clip0.mp4")] and sample["answers"] == ["B"]
    assert prompt(task, sample) == ("Question:What happens after the man sits?\nOption:\n(A) He stands up.\n"
                                    "(B) He opens a book.\n(C) He leaves.\nOnly give the best option.\n")
    assert scores(task, ["B", "(B) He opens a book.", "B. He opens a book.", "A"], sample) == [1.0, 1.0, 1.0, 0.0]


def test_videomme(tmp_path):
    folder = tmp_path / "videomme"
    folder.mkdir()
    clip(folder / "abc123.mp4")
    rows = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
             "url": "https://www.youtube.com/watch?v=abc123", "videoID": "abc123", "question_id": "001-1",
             "task_type": "Counting Problem", "question": "How many people appear?",
             "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "C"}]
    task, (sample,) = get_task("videomme"), open_rows(tmp_path, "videomme", rows)
    assert sample["videos"] == [str(folder / "abc123.mp4")] and sample["id"] == "001-1"
    assert prompt(task, sample) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many people appear?\nA. One.\n"
        "B. Two.\nC. Three.\nD. Four.\nThe best answer is:")
    assert scores(task, ["C", "C. Three.", "The best answer is C", "B"], sample) == [1.0, 1.0, 1.0, 0.0]


def test_video_samples_prepare_through_the_processor(tmp_path, checkpoint):
    """A video task's sample becomes a generate request (the clip decoded by the processor)."""
    from qwen2vl_jax.processing import Processor

    from evaluation.runner import prepare

    folder = tmp_path / "mvbench"
    folder.mkdir()
    clip(folder / "clip0.mp4")
    rows = [{"video": "clip0.mp4", "question": "What?", "candidates": ["x", "y"], "answer": "y"}]
    (sample,) = open_rows(tmp_path, "mvbench", rows)
    request, text, error = prepare(Processor.from_pretrained(str(checkpoint)), sample, "mvbench")
    assert error is None and "pixel_values_videos" in request, error
    assert text == "Question:What?\nOption:\n(A) x\n(B) y\nOnly give the best option."


# ---------------------------------------------------------------- every task


GOLD = {"docvqa": "March 3, 1998", "infovqa": "March 3, 1998", "chartqa": "45", "textvqa": "red", "vqav2": "red",
        "vqa": "red", "exact": "3", "ocrbench": "CENTRE", "realworldqa": "B", "mmmu": "B", "mmbench": "B",
        "mathvista": "square", "refcoco": "<|box_start|>(100,100),(300,300)<|box_end|>", "mvbench": "B",
        "videomme": "B"}


def _gold_sample(name):
    task = get_task(name)
    base = {"id": "s", "question": "Q?", "image": b"x"}
    rows = {"docvqa": {"answers": ["March 3, 1998"]}, "infovqa": {"answers": ["March 3, 1998"]},
            "chartqa": {"answer": "45"}, "textvqa": {"answers": ["red"] * 10}, "vqav2": {"answers": ["red"] * 10},
            "vqa": {"answers": ["red"] * 10}, "exact": {"answer": "3"}, "ocrbench": {"answer": ["CENTRE"]},
            "realworldqa": {"answer": "B"},
            "mmmu": {"options": "['x', 'y']", "answer": "B", "question_type": "multiple-choice"},
            "mmbench": {"A": "x", "B": "y", "answer": "B"},
            "mathvista": {"choices": ["circle", "square"], "answer": "square", "question_type": "multi_choice",
                          "answer_type": "text"},
            "refcoco": {"answer": ["dog"], "bbox": [8, 6, 16, 12], "width": 80, "height": 60},
            "mvbench": {"candidates": ["x", "y"], "answer": "y", "video": "v.mp4"},
            "videomme": {"options": ["A. x", "B. y"], "answer": "B", "videoID": "v"}}
    kind = name if name in rows else "refcoco"
    return task, task.sample_from_row({**base, **rows[kind]}, 0)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_gold_answer_scores_one_on_every_task(name):
    task, sample = _gold_sample(name)
    gold = GOLD.get(name, GOLD["refcoco"])
    assert task.score(gold, sample) == 1.0 and task.score(gold, sample, lenient=True) == 1.0
    assert task.score("zzz", sample) == 0.0
    assert task.messages(sample)[0]["content"][-1]["text"]


def test_get_task_names_the_tasks():
    assert {"vqa", "docvqa", "chartqa", "refcoco", "exact"} <= set(TASKS)  # today's names still work
    with pytest.raises(ValueError, match="docvqa.*mmbench"):
        get_task("nope")


def test_samples_with_their_own_turns_get_the_post_prompt():
    from evaluation.tasks import complete_turns

    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert complete_turns(get_task("docvqa"), turns)[0]["content"][-1] == {"type": "text", "text": SHORT}
    assert complete_turns(get_task("exact"), turns) == turns


# ---------------------------------------------------------------- several tasks in one process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from reference import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tasks") / "ckpt")


def test_runner_parses_task_data_pairs():
    from evaluation.runner import parse_jobs

    jobs = parse_jobs("docvqa,chartqa", ["docvqa=parquet:/d/doc,chartqa=jsonl:/d/c.jsonl?root=/x"], "out")
    assert jobs == [("docvqa", "parquet:/d/doc", "out/docvqa.jsonl"),
                    ("chartqa", "jsonl:/d/c.jsonl?root=/x", "out/chartqa.jsonl")]
    assert parse_jobs("docvqa,chartqa", ["docvqa=a.jsonl", "chartqa=b.jsonl"], "o")[1] == ("chartqa", "b.jsonl",
                                                                                           "o/chartqa.jsonl")
    assert parse_jobs("docvqa", ["parquet:/d/a,b"], "o") == [("docvqa", "parquet:/d/a,b", "o/docvqa.jsonl")]
    with pytest.raises(ValueError, match="chartqa"):
        parse_jobs("docvqa,chartqa", ["docvqa=a.jsonl"], "o")


def test_two_tasks_one_process_one_model_load_no_recompile(checkpoint, tmp_path, monkeypatch, capsys):
    import jax

    from evaluation import runner
    from qwen2vl_jax import decoding

    decoding.programs.cache_clear()  # earlier tests in this process may hold these programs, compiled
    jax.clear_caches()
    loads = []
    real_open_model = runner.open_model
    monkeypatch.setattr(runner, "open_model", lambda *a, **k: loads.append(a) or real_open_model(*a, **k))
    for name in ("docvqa", "textvqa"):  # the same images and questions: the same prompt tokens and shapes
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"questionId": i, "question_id": i, "question": "What is the title?", "answers": ["title"],
                 "image": image_cell(i % 2)} for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), folder / "test.parquet")
    out = tmp_path / "results"
    runner.main(["--checkpoint", str(checkpoint), "--tasks", "docvqa,textvqa",
                 "--data", f"docvqa=parquet:{tmp_path / 'docvqa'}", "--data", f"textvqa=parquet:{tmp_path / 'textvqa'}",
                 "--out", str(out), "--batch-size", "4", "--max-new-tokens", "4", "--compile-cache", ""])
    assert len(loads) == 1
    summaries = json.load(open(out / "summary.json"))
    assert [s["task"] for s in summaries] == ["docvqa", "textvqa"]
    assert [s["metric"] for s in summaries] == ["anls", "vqa_accuracy"]
    first, second = (s["compiles"] for s in summaries)
    assert first.get("prefill", 0) >= 1 and first.get("decode", 0) >= 1, first
    assert sum(second.values()) == 0, second  # the programs the first task compiled are reused
    for s in summaries:
        assert (s["samples"], s["scored"], s["errors"], s["scoring"]) == (3, 3, 0, "official")
        lines = [json.loads(line) for line in open(out / f"{s['task']}.jsonl")]
        assert [line["index"] for line in lines] == [0, 1, 2]
        assert all(line["prompt"] == "What is the title?" + SHORT for line in lines)
        assert s["value"] == pytest.approx(np.mean([line["score"] for line in lines]))
    table = (out / "summary.md").read_text()
    assert table.splitlines()[0] == "| task | metric | value | samples | scored | errors | samples/s | compiles |"
    assert "| docvqa | anls |" in table and "| textvqa | vqa_accuracy |" in table
    assert "prefill 0, decode 0, other 0" in table.splitlines()[3]
    assert table in capsys.readouterr().out
    # the settings behind each number: in each summary, beside each predictions file and under the table
    docvqa, textvqa = (s["settings"] for s in summaries)
    assert docvqa == json.load(open(out / "docvqa.jsonl.settings.json"))
    assert docvqa["checkpoint"]["path"] == str(checkpoint) and len(docvqa["checkpoint"]["fingerprint"]) == 16
    assert docvqa["checkpoint"]["fingerprint"] == textvqa["checkpoint"]["fingerprint"]
    assert docvqa["generation"]["max_new_tokens"] == 4 and docvqa["generation"]["temperature"] == 0.0
    assert docvqa["dtype"] == {"requested": None, "params": "float32"} and docvqa["ladders"]["length"][:2] == [256, 512]
    assert docvqa["processor"]["image"]["max_pixels"] > 0 and docvqa["processor"]["video"]["fps"] == 2.0
    assert docvqa["task"]["definition"] != textvqa["task"]["definition"]
    assert "a013f00" in textvqa["scoring"]["script"] and "ANLS" in docvqa["scoring"]["script"]
    assert docvqa["project"]["version"] == "0.1.0" and "commit" in docvqa["project"]
    assert summaries[0]["media_used"]["image_pixels_min"] > 0 and summaries[0]["media_used"]["video_frames_min"] is None
    assert "Settings (all tasks):" in table and "- generation.max_new_tokens: 4" in table
    assert "textvqa:" in table and "- scoring.script:" in table.split("textvqa:")[1]
    # a rerun under other settings is refused, naming the field; under the same ones it resumes (nothing left)
    rerun = ["--checkpoint", str(checkpoint), "--task", "docvqa", "--data", f"parquet:{tmp_path / 'docvqa'}",
             "--out", str(out / "docvqa.jsonl"), "--batch-size", "4", "--compile-cache", ""]
    with pytest.raises(SystemExit, match=r"generation\.max_new_tokens: 4 then, 5 now"):
        runner.main(rerun + ["--max-new-tokens", "5"])
    with pytest.raises(SystemExit, match=r"scoring\.rule: 'official' then, 'lenient' now"):
        runner.main(rerun + ["--max-new-tokens", "4", "--scoring", "lenient"])
    runner.main(rerun + ["--max-new-tokens", "4"])
    assert json.load(open(out / "docvqa.summary.json"))["value"] == summaries[0]["value"]
