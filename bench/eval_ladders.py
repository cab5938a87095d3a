"""Padding waste and compiles of the 17 eval tasks at the old (×4) and the new (×2) shape ladders.

    JAX_PLATFORMS=cpu python bench/eval_ladders.py [--samples 16] [--batch-size 8] [--max-new-tokens 8]
                                                   [--out bench/results/eval_ladders.json]

What it measures: every task of `evaluation.tasks.TASKS` run through `evaluation.runner.evaluate_tasks` (all 17 in
one call, one model load, as `qwen2vl-eval --tasks ...` runs them) once with the old ×4 ladders
(`Ladders(length=(256, 1024, 4096, 16384), vision_rows=(1024, 4096, 16384, 65536))`, batch and cache ladders as
today) and once with today's default ×2 `Ladders()`, each in a fresh Python subprocess, so the second setting
compiles everything anew. Per setting and task: the share of each padded axis that was padding (prompt tokens,
ViT patch rows, KV cache slots), the programs compiled (from the summary's own counter) and samples/s; over the
suite: padding weighted by elements (from the raw real/padded counts of `qwen2vl_jax.generation.STATS`, read per
task around `runner.run_task` and over the whole call), compiles (prefill, decode, other, all: a
`qwen2vl_jax.compiles.CompileCounter` around the whole call, model load included) and wall seconds.

How:
- A tiny random Qwen2-VL (`tests/reference.py` `tiny_checkpoint`: the "tiny" preset, real vocabulary size and token
  ids; weights do not matter, shapes do) with the released checkpoints' preprocessor settings (`min_pixels` 3136,
  `max_pixels` 12845056: images keep their real patch counts) and the Qwen2-VL chat template (system prompt
  included). Its tokenizer is the project's tiny byte-level BPE (Qwen2's split regex, special tokens at their real
  ids) trained here on the bench's own prompts with an 8,000-entry vocabulary, so a word is about one token (Qwen2's
  real tokenizer gives ~1.3 per English word; the 400-entry test tokenizer would give ~4).
- `--samples` rows per task in that task's Hugging Face columns (parquet; images as {"bytes", "path"} PNG cells of
  seeded blocky random pixels; videos as mpeg4 files beside the parquet, as tests/test_tasks.py writes them), sized
  like the benchmark: DocVQA / InfoVQA pages 800–1300 wide × 1000–1300 tall, ChartQA ~800×600, TextVQA / VQAv2 /
  vqa / RefCOCO* COCO-like 640×480 (a quarter portrait), MMBench / MMMU (every 4th with two images) / MathVista /
  RealWorldQA 400–1000 px a side, OCRBench crops 100–600 px, exact: the demo set's own images
  (`data_pipeline.synthetic.make_example`, 56–320 px); MVBench 320×240 clips of 4–14 s, Video-MME 640×360 clips of
  3–6 s (8 fps files, sampled at Qwen2-VL's 2 fps). Questions of each benchmark's usual length (MMMU / MMBench /
  Video-MME with 4 options). Every sample is kept at ≤ 8,192 ViT patch rows (a page is redrawn when larger), so any
  batch of 8 fits the top vision rung (65,536 rows) of both settings: that bounds the page sizes. The driver runs
  every sample through the checkpoint's Processor first and asserts this.
- `max_new_tokens` 8 for every task (decode time stays small; it also sets the cache rung: prompt rung + 8), batch 8,
  chunk 64 (one chunk of `--samples` per task, so a task runs ceil(samples / 8) batches sorted by size). No
  persistent compilation cache: `evaluate_tasks` opens none (only `qwen2vl-eval`'s main does), the subprocesses run
  without JAX_COMPILATION_CACHE_DIR and the worker checks that `jax_compilation_cache_dir` is unset and that no
  program was loaded from a cache.
Writes `--out` (JSON) and prints a markdown table, old vs new.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

SETTINGS = {
    "old": {"length": (256, 1024, 4096, 16384), "vision_rows": (1024, 4096, 16384, 65536)},
    "new": {},  # today's Ladders()
}
TASK_ORDER = ("chartqa", "docvqa", "exact", "infovqa", "mathvista", "mmbench", "mmmu", "mvbench", "ocrbench",
              "realworldqa", "refcoco", "refcoco+", "refcocog", "textvqa", "videomme", "vqa", "vqav2")
MAX_ROWS_PER_SAMPLE = 8192  # 8 samples × 8,192 = 65,536 rows, the top vision rung of both settings
AXES = ("tokens", "vision_rows", "cache")


# ---------------------------------------------------------------- media


def image_rows(width: int, height: int) -> int:
    """ViT patch rows the processor gives a width×height image (Qwen2-VL defaults: 3136..12845056 pixels)."""
    from qwen2vl_jax.processing.image import smart_resize

    h, w = smart_resize(height, width, 28, 3136, 12845056)
    return (h // 14) * (w // 14)


def picture(rng, width: int, height: int) -> bytes:
    """PNG of seeded blocky random pixels (8-px blocks: small files, real size)."""
    import numpy as np
    from PIL import Image

    small = rng.integers(0, 255, (math.ceil(height / 8), math.ceil(width / 8), 3), np.uint8)
    pixels = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def cell(rng, width: int, height: int, name: str) -> dict:
    return {"bytes": picture(rng, width, height), "path": name}


def draw_size(rng, widths: tuple[int, int], heights: tuple[int, int], portrait: float = 0.0) -> tuple[int, int]:
    """(width, height) uniform in the ranges (swapped with probability `portrait`), redrawn while the image would
    exceed MAX_ROWS_PER_SAMPLE patch rows."""
    while True:
        width, height = int(rng.integers(*widths, endpoint=True)), int(rng.integers(*heights, endpoint=True))
        if rng.random() < portrait:
            width, height = height, width
        if image_rows(width, height) <= MAX_ROWS_PER_SAMPLE:
            return width, height


def coco_size(rng) -> tuple[int, int]:
    """COCO-like: 640 on the long side, 360–480 on the short one, a quarter portrait."""
    return draw_size(rng, (640, 640), (360, 480), portrait=0.25)


def write_clip(path: str, rng, width: int, height: int, seconds: float, rate: int = 8) -> None:
    """An mpeg4 clip of `seconds` at `rate` fps: seeded blocky random frames drifting over time."""
    import av
    import numpy as np

    base = rng.integers(0, 255, (math.ceil(height / 16), math.ceil(width / 16), 3)).astype(np.int16)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(round(seconds * rate))):
            small = np.clip(base + 6 * i, 0, 255).astype(np.uint8) if i % 2 else np.clip(base - 3 * i, 0, 255)\
                .astype(np.uint8)
            rgb = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)[:height, :width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------- questions

WORDS = ("total revenue reported in the second quarter of the fiscal year", "name of the company listed at the top "
         "of the page", "date mentioned in the letter", "percentage of respondents who preferred online shopping",
         "telephone number given for the sales office", "title of the table on this page",
         "amount shown in the last row of the table", "city where the meeting was held")
DOC_Q = ("What is the {}?", "According to the document, what is the {}?", "Which value is given as the {}?")
CHART_Q = ("What is the value of the {} bar in {}?", "How many years had a value above {} percent?",
           "What is the difference between the highest and the lowest value of the {} series?",
           "Which category has the largest share in {}?")
CHART_W = ("blue", "Germany", "2015", "the green", "Asia", "25", "Retail", "2019")
VQA_Q = ("What color is the bus parked on the street?", "How many people are sitting on the bench?",
         "What is the man holding in his right hand?", "Is the dog looking at the camera?",
         "What brand is written on the sign?", "What sport is being played?", "What time does the clock show?",
         "What is written on the side of the truck?", "What number is on the player's shirt?",
         "Where is the cat sitting?")
REF_EXPR = {"refcoco": ("man on left", "white car", "girl in red shirt", "right zebra", "bowl in front",
                        "middle elephant", "guy with hat", "left most chair"),
            "refcoco+": ("man in blue jacket", "black dog lying down", "woman holding umbrella", "red bus",
                         "smaller giraffe", "pizza slice closest", "person wearing white", "brown horse"),
            "refcocog": ("a man in a black shirt holding a tennis racket", "the white cup on the wooden table next to "
                         "the laptop", "a little girl wearing a pink dress standing near the fence",
                         "the brown dog lying on the couch beside a pillow", "a red double decker bus driving down "
                         "the street", "the elephant on the right side with its trunk raised",
                         "a slice of pizza on a white plate", "the woman in the blue coat carrying a bag")}
CAPTION = "Please carefully observe the area circled in the image and come up with a caption for the area."
CHOICE_Q = ("Which of the following best describes the main object in the image?",
            "What is the most likely purpose of the structure shown in the picture?",
            "Based on the image, which statement is correct?",
            "Which emotion is the person in the image most likely feeling?",
            "What can be inferred about the weather from the scene?")
OPTIONS = (("A wooden chair", "A metal table", "A glass vase", "A leather sofa"),
           ("To store grain", "To generate electricity", "To house livestock", "To provide shelter for travellers"),
           ("The car is moving to the left", "The road is wet", "It is night time", "There are no people"),
           ("Happy", "Angry", "Surprised", "Sad"),
           ("It is sunny", "It is raining", "It is snowing", "It is foggy"))
MMMU_Q = ("<image 1> The graph shows the demand curve for a product. What is the price elasticity of demand at the "
          "midpoint?", "Which architectural style is shown in <image 1>?",
          "<image 1> A beam is loaded as shown. What is the maximum bending moment?",
          "Based on <image 1>, which of the following organelles is labelled X?",
          "Compare <image 1> and <image 2>. Which painting belongs to the later period?")
MATH_MC = ("What is the area of the shaded region?", "Which function has the largest value at x = 2?",
           "Is the number of red cubes greater than the number of blue spheres?",
           "What is the measure of angle ABC in the figure?")
MATH_FREE = ("What is the value of the largest bar?", "How many objects are left after removing all small balls?",
             "What is the perimeter of the triangle?", "What is the age gap between these two people?")
OCR_Q = ("what is written in the image?", "what is the number in the image?",
         "What is the title of this book?", "what is the name of the shop on the sign?")
RWQA_Q = ("Which direction is the car in front of us turning?", "How many lanes are there on this road?",
          "Is it safe to cross the street now?", "What is the closest object to the camera?")
VIDEO_Q = ("What is the person doing after picking up the cup?", "In which direction does the ball move?",
           "What happens to the object at the end of the video?", "How many times does the man jump?",
           "What is the main activity shown in the video?", "Which object appears first in the video?")
VIDEO_OPT = ("He puts it down.", "He drinks from it.", "He gives it away.", "He throws it.")


def pick(rng, items):
    return items[int(rng.integers(len(items)))]


def rows_for(name: str, n: int, folder: str, seed: int) -> list[dict]:
    """`n` rows of task `name` in its benchmark's columns (media under `folder` for video tasks)."""
    import numpy as np

    rng = np.random.default_rng([seed, TASK_ORDER.index(name)])
    rows = []
    for i in range(n):
        if name in ("docvqa", "infovqa"):
            w, h = draw_size(rng, (800, 1300), (1000, 1300))
            rows.append({"questionId": i, "question": pick(rng, DOC_Q).format(pick(rng, WORDS)),
                         "answers": ["March 3, 1998"], "image": cell(rng, w, h, f"{i}.png"), "docId": i})
        elif name == "chartqa":
            w, h = draw_size(rng, (700, 850), (450, 650))
            question = pick(rng, CHART_Q).format(pick(rng, CHART_W), pick(rng, CHART_W))
            rows.append({"type": "human_test", "question": question, "answer": "45",
                         "image": cell(rng, w, h, f"{i}.png")})
        elif name == "textvqa":
            w, h = coco_size(rng)
            rows.append({"question_id": i, "question": pick(rng, VQA_Q), "answers": ["red"] * 10,
                         "image": cell(rng, w, h, f"{i}.png")})
        elif name in ("vqav2", "vqa"):
            w, h = coco_size(rng)
            rows.append({"question_id": i, "question": pick(rng, VQA_Q), "answer_type": "other",
                         "multiple_choice_answer": "red",
                         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1}
                                     for k in range(10)], "image": cell(rng, w, h, f"{i}.png")})
        elif name == "exact":
            from data_pipeline.synthetic import make_example

            example = make_example(i, seed)
            buffer = io.BytesIO()
            example["image"].save(buffer, "PNG")
            rows.append({"id": f"d{i}", "question": example["question"], "answer": example["answer"],
                         "image": {"bytes": buffer.getvalue(), "path": f"{i}.png"}})
        elif name == "ocrbench":
            w, h = draw_size(rng, (100, 600), (100, 600))
            rows.append({"dataset": "IIIT5K", "question": pick(rng, OCR_Q), "question_type": "Regular Text "
                         "Recognition", "answer": ["CENTRE"], "image": cell(rng, w, h, f"{i}.png")})
        elif name == "mmmu":
            k = int(rng.integers(len(MMMU_Q) - 1))
            two = i % 4 == 3
            question = MMMU_Q[-1] if two else MMMU_Q[k]
            sizes = [draw_size(rng, (400, 1000), (400, 1000)) for _ in range(2 if two else 1)]
            while sum(image_rows(*s) for s in sizes) > MAX_ROWS_PER_SAMPLE:
                sizes = [draw_size(rng, (400, 1000), (400, 1000)) for _ in sizes]
            images = [cell(rng, w, h, f"{i}_{j}.png") for j, (w, h) in enumerate(sizes)]
            rows.append({"id": f"validation_{i}", "question": question, "options": str(list(pick(rng, OPTIONS))),
                         "answer": "B", "question_type": "multiple-choice", "image_1": images[0],
                         "image_2": images[1] if two else None, "subfield": "Art"})
        elif name == "mmbench":
            w, h = draw_size(rng, (400, 1000), (400, 1000))
            a, b, c, d = pick(rng, OPTIONS)
            rows.append({"index": i, "question": pick(rng, CHOICE_Q),
                         "hint": "The picture was taken in a city park in the afternoon." if i % 3 == 0 else "nan",
                         "A": a, "B": b, "C": c, "D": d, "answer": "C", "category": "attribute",
                         "image": cell(rng, w, h, f"{i}.png")})
        elif name == "realworldqa":
            w, h = draw_size(rng, (400, 1000), (400, 1000))
            if i % 2:
                question = (pick(rng, RWQA_Q) + "\nA. Left\nB. Right\nC. Straight ahead\nPlease answer directly with "
                            "only the letter of the correct option and nothing else.")
                answer = "B"
            else:
                question = pick(rng, RWQA_Q) + " Please answer directly with a single word or number."
                answer = "3"
            rows.append({"image": cell(rng, w, h, f"{i}.png"), "question": question, "answer": answer})
        elif name == "mathvista":
            w, h = draw_size(rng, (400, 1000), (400, 1000))
            image = cell(rng, w, h, f"{i}.png")
            if i % 2:
                question = pick(rng, MATH_MC)
                choices = ["12", "18", "24", "36"]
                query = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                         f"at the end.\nQuestion: {question}\nChoices:\n" +
                         "\n".join(f"({letter}) {c}" for letter, c in zip("ABCD", choices)))
                rows.append({"pid": str(i), "question": question, "decoded_image": image, "image": f"images/{i}.jpg",
                             "choices": choices, "unit": None, "precision": None, "answer": "18",
                             "question_type": "multi_choice", "answer_type": "text", "query": query})
            else:
                rows.append({"pid": str(i), "question": pick(rng, MATH_FREE), "decoded_image": image,
                             "image": f"images/{i}.jpg", "choices": None, "unit": None, "precision": None,
                             "answer": "7", "question_type": "free_form", "answer_type": "integer", "query": None})
        elif name.startswith("refcoco"):
            w, h = coco_size(rng)
            x, y = float(rng.integers(0, w // 2)), float(rng.integers(0, h // 2))
            rows.append({"question_id": i, "question": CAPTION, "answer": [pick(rng, REF_EXPR[name])],
                         "bbox": [x, y, float(w // 3), float(h // 3)], "image": cell(rng, w, h, f"{i}.png"),
                         "file_name": f"COCO_{i}.jpg"})
        elif name == "mvbench":
            write_clip(os.path.join(folder, f"clip{i}.mp4"), rng, 320, 240, float(rng.integers(4, 14, endpoint=True)))
            rows.append({"video": f"clip{i}.mp4", "question": pick(rng, VIDEO_Q), "candidates": list(VIDEO_OPT),
                         "answer": VIDEO_OPT[1]})
        elif name == "videomme":
            write_clip(os.path.join(folder, f"v{i}.mp4"), rng, 640, 360, float(rng.integers(3, 6, endpoint=True)))
            rows.append({"video_id": f"{i:03d}", "duration": "short", "domain": "Knowledge",
                         "sub_category": "Humanity & History", "url": "", "videoID": f"v{i}",
                         "question_id": f"{i:03d}-1", "task_type": "Action Recognition", "question": pick(rng, VIDEO_Q),
                         "options": [f"{letter}. {o}" for letter, o in zip("ABCD", VIDEO_OPT)], "answer": "B"})
        else:
            raise ValueError(f"no rows for task {name}")
    return rows


def write_data(root: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Every task's `n` rows → root/<task>/test.parquet (+ clips); → [(task, "parquet:DIR")]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    specs = []
    for name in TASK_ORDER:
        folder = os.path.join(root, name.replace("+", "plus"))
        os.makedirs(folder, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows_for(name, n, folder, seed)), os.path.join(folder, "test.parquet"))
        specs.append((name, f"parquet:{folder}"))
    return specs


# ---------------------------------------------------------------- checkpoint


def build_checkpoint(folder: str, specs: list[tuple[str, str]]) -> dict:
    """Tiny random Qwen2-VL + Qwen2-VL's default preprocessor settings + a tokenizer trained on the suite's prompts
    (see the module docstring); → per task, the prompts, prompt tokens and ViT rows of its samples, checked."""
    from reference import tiny_checkpoint

    from data_pipeline.sources import question_text
    from evaluation.data import open_eval_source
    from evaluation.runner import prepare
    from evaluation.tasks import get_task
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.processing.chat import QWEN2VL_CHAT_TEMPLATE
    from qwen2vl_jax.processing.fixtures import build_tiny_tokenizer, write_tiny_processor

    tiny_checkpoint(folder)
    write_tiny_processor(folder, min_pixels=3136, max_pixels=12845056)  # the released checkpoints' values
    with open(os.path.join(folder, "chat_template.json")) as f:
        assert json.load(f)["chat_template"] == QWEN2VL_CHAT_TEMPLATE
    samples, corpus = {}, ["You are a helpful assistant.", "system\n", "user\n", "assistant\n"]
    for name, spec in specs:
        source = open_eval_source(spec, task=get_task(name))
        samples[name] = [source[i] for i in range(len(source))]
        for sample in samples[name]:
            assert "error" not in sample, (name, sample["error"])
            corpus.append(question_text(get_task(name).messages(sample)))
    build_tiny_tokenizer(8000, corpus).save(os.path.join(folder, "tokenizer.json"))

    processor = Processor.from_pretrained(folder)
    stats = {}
    for name, _ in specs:
        sizes = []
        for sample in samples[name]:
            request, _, error = prepare(processor, dict(sample), name)
            assert error is None, (name, error)
            rows = sum(len(request[k]) for k in ("pixel_values", "pixel_values_videos") if k in request)
            sizes.append((rows, int(request["input_ids"].shape[1]), len(question_text(
                get_task(name).messages(sample)).split())))
        assert max(r for r, _, _ in sizes) <= MAX_ROWS_PER_SAMPLE, (name, sizes)
        rows, tokens, words = zip(*sizes)
        stats[name] = {"vision_rows_mean": round(sum(rows) / len(rows)), "vision_rows_max": max(rows),
                       "prompt_tokens_mean": round(sum(tokens) / len(tokens)), "prompt_tokens_max": max(tokens),
                       "prompt_words_mean": round(sum(words) / len(words), 1)}
    return stats


# ---------------------------------------------------------------- worker (one setting, fresh process)


def worker(args) -> None:
    import jax

    from evaluation import runner
    from qwen2vl_jax.buckets import Ladders
    from qwen2vl_jax.compiles import CompileCounter
    from qwen2vl_jax.generation import STATS

    assert not jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_dir
    ladders = Ladders(**SETTINGS[args.worker])
    with open(args.jobs) as f:
        jobs = [tuple(job) for job in json.load(f)]
    raw = {}
    run_task = runner.run_task

    def counted(model, processor, task, data, out, **options):
        before = dict(STATS.real), dict(STATS.padded)
        summary = run_task(model, processor, task, data, out, **options)
        raw[task.name] = {"real": {a: STATS.real[a] - before[0][a] for a in AXES},
                          "padded": {a: STATS.padded[a] - before[1][a] for a in AXES}}
        return summary

    runner.run_task = counted
    start = time.perf_counter()
    with CompileCounter() as compiles:
        summaries = runner.evaluate_tasks(args.checkpoint, jobs, batch_size=args.batch_size,
                                          max_new_tokens=args.max_new_tokens, ladders=ladders)
    wall = time.perf_counter() - start
    keep = ("task", "samples", "scored", "errors", "samples_per_s", "compiles", "padding", "media_used")
    result = {"ladders": {k: list(v) for k, v in dataclasses.asdict(ladders).items()}, "wall_s": round(wall, 1),
              "compiles": dict(compiles.names), "compiles_loaded_from_cache": compiles.loaded(),
              "tasks": {s["task"]: {**{k: s.get(k) for k in keep}, "raw": raw[s["task"]]} for s in summaries}}
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


# ---------------------------------------------------------------- driver


def waste(real: dict, padded: dict) -> dict:
    return {a: round(1 - real[a] / padded[a], 4) if padded[a] else None for a in AXES}


def split_compiles(names: dict) -> dict:
    prefill, decode = names.get("prefill", 0), names.get("decode", 0)
    total = sum(names.values())
    return {"prefill": prefill, "decode": decode, "other": total - prefill - decode, "all": total}


def git_info() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"head": git("rev-parse", "HEAD"),
            "uncommitted_in_code": git("status", "--porcelain", "--", "qwen2vl_jax", "evaluation").splitlines()}


def table(results: dict) -> str:
    lines = ["| ladders | token padding | vision-row padding | cache padding | prefill compiles | decode compiles "
             "| total compiles | wall s |", "|---|---|---|---|---|---|---|---|"]
    for setting, r in results.items():
        p, c = r["suite"]["padding"], r["suite"]["compiles"]
        lines.append(f"| {setting} {r['label']} | {p['tokens']:.1%} | {p['vision_rows']:.1%} | {p['cache']:.1%} | "
                     f"{c['prefill']} | {c['decode']} | {c['all']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def task_table(results: dict) -> str:
    old, new = results["old"]["tasks"], results["new"]["tasks"]
    lines = ["| task | tokens old → new | vision rows old → new | cache old → new | prefill+decode compiles "
             "old → new |", "|---|---|---|---|---|"]
    pct = lambda v: "–" if v is None else f"{v:.0%}"
    for name in TASK_ORDER:
        o, n = old[name], new[name]
        cells = [f"{pct(o['padding'][a])} → {pct(n['padding'][a])}" for a in AXES]
        count = lambda t: t["compiles"].get("prefill", 0) + t["compiles"].get("decode", 0)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {count(o)} → {count(n)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="rows per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "eval_ladders.json"))
    parser.add_argument("--worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="eval-ladders-")
    specs = write_data(os.path.join(tmp, "data"), args.samples, args.seed)
    checkpoint = os.path.join(tmp, "ckpt")
    media = build_checkpoint(checkpoint, specs)
    print(f"data and checkpoint ready in {time.perf_counter() - start:.0f} s ({tmp})", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))}
    results = {}
    for setting in ("old", "new"):
        jobs = os.path.join(tmp, f"{setting}.jobs.json")
        with open(jobs, "w") as f:
            json.dump([(name, spec, os.path.join(tmp, setting, f"{name}.jsonl")) for name, spec in specs], f)
        os.makedirs(os.path.join(tmp, setting))
        result = os.path.join(tmp, f"{setting}.json")
        began = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", setting, "--checkpoint", checkpoint,
                        "--jobs", jobs, "--result", result, "--batch-size", str(args.batch_size),
                        "--max-new-tokens", str(args.max_new_tokens)], env=env, cwd=ROOT, check=True)
        with open(result) as f:
            r = json.load(f)
        r["process_wall_s"] = round(time.perf_counter() - began, 1)
        assert r["compiles_loaded_from_cache"] == 0, "a persistent compilation cache was used"
        real = {a: sum(t["raw"]["real"][a] for t in r["tasks"].values()) for a in AXES}
        padded = {a: sum(t["raw"]["padded"][a] for t in r["tasks"].values()) for a in AXES}
        r["suite"] = {"padding": waste(real, padded), "real": real, "padded": padded,
                      "compiles": split_compiles(r["compiles"]),
                      "compiles_in_task_summaries": split_compiles(
                          sum((collections.Counter(t["compiles"]) for t in r["tasks"].values()), collections.Counter())),
                      "errors": sum(t["errors"] for t in r["tasks"].values())}
        r["label"] = "×4" if setting == "old" else "×2"
        results[setting] = r
        print(f"{setting}: {r['wall_s']:.0f} s, compiles {r['suite']['compiles']}, padding {r['suite']['padding']}",
              flush=True)

    import jax

    out = {"command": "JAX_PLATFORMS=cpu python bench/eval_ladders.py " + " ".join(sys.argv[1:]),
           "options": {"samples": args.samples, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                       "seed": args.seed, "chunk": 64},
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
                       "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
           "code": git_info(), "media": media, "settings": results,
           "padding_note": "suite padding = 1 − Σ real / Σ padded elements over every generate call of the suite "
                           "(raw counts of qwen2vl_jax.generation.STATS per task)",
           "total_wall_s": round(time.perf_counter() - start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(table(results))
    print()
    print(task_table(results))


if __name__ == "__main__":
    main()
