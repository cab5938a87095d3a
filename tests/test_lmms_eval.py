"""lmms-eval model `qwen2vl_jax` (evaluation/lmms): request → generation logic with stand-in lmms-eval Instances
(always runs), and one lmms-eval task end to end on a local parquet file through the `lmms-eval` CLI (needs
lmms-eval: `pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3`)."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from PIL import Image

from evaluation.lmms.requests import Generator, build_messages, classify_visual, cut_at_stop, parse_gen_kwargs
from reference import tiny_checkpoint

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
TASK = "qwen2vl_jax_tiny"


class StandIn:
    """What the adapter reads of lmms-eval's Instance: `args` = (context, gen_kwargs, doc_to_visual, doc_id, task,
    split)."""

    def __init__(self, *args):
        self.args = args


def picture(seed: int, size=(56, 84)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8))


def write_mp4(path, frames=4, size=(56, 56)):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(frames):
            pixels = np.full((*size, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory.mktemp("lmms_ckpt")))


@pytest.fixture(scope="module")
def served(ckpt):
    from evaluation.serving import open_model
    from qwen2vl_jax.processing import Processor

    return Processor.from_pretrained(ckpt), open_model(ckpt, "data=-1")


def test_gen_kwargs_and_stops():
    options, until = parse_gen_kwargs({"until": "\n", "max_new_tokens": 7, "temperature": 0})
    assert (options.max_new_tokens, options.temperature, until) == (7, 0.0, ["\n"])
    assert parse_gen_kwargs(None, 33)[0].max_new_tokens == 33 and parse_gen_kwargs(None)[0].temperature == 0.0
    assert parse_gen_kwargs({"temperature": 0.7, "do_sample": False})[0].temperature == 0.0  # HF: greedy
    sampled, _ = parse_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "top_k": 0, "until": ["A", "", "B"]})
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, None)
    assert parse_gen_kwargs({"until": ["A", "", "B"]})[1] == ["A", "B"]
    with pytest.raises(ValueError, match="until"):
        parse_gen_kwargs({"until": 5})
    assert cut_at_stop("one two. three\nfour", ["\n", "."]) == "one two"  # the earliest stop, whichever it is
    assert cut_at_stop("abc", ["x"]) == "abc" and cut_at_stop("abc", []) == "abc"


def test_visuals_to_messages(tmp_path):
    img = picture(0)
    assert [classify_visual(v) for v in (img, "a.JPG", "clip.mp4", "anim.gif", {"video": "x.mp4"},
                                         np.zeros((4, 8, 8, 3), np.uint8))] == \
        ["image", "image", "video", "video", "video", "video"]
    with pytest.raises(ValueError, match="audio"):
        classify_visual({"array": np.zeros(10), "sampling_rate": 16000})
    messages, images, videos = build_messages("<image>\nWhat is it?", [img, "v.mp4", {"image": img}], "Be brief.")
    assert messages == [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"},
                                                     {"type": "text", "text": "What is it?"}]}]
    assert images == [img, img] and videos == ["v.mp4"]


def test_generate_until_standins(served, tmp_path):
    """Order kept across option groups and batches, gen_kwargs honoured (max_new_tokens, until), images / video
    paths / no visual, a request that cannot run answered "" — each answer as generating it alone gives."""
    from qwen2vl_jax.generation import generate_many

    processor, model = served
    video = write_mp4(tmp_path / "clip.mp4")
    docs = [{"v": [picture(1)]}, {"v": []}, {"v": [video]}, {"v": [picture(2, (84, 56)), picture(3)]},
            {"v": [str(tmp_path / "missing.png")]}, {"v": picture(4)}]
    task_dict = {"t": {"test": docs}}
    to_visual = lambda doc: doc["v"]  # noqa: E731
    greedy = {"max_new_tokens": 6, "temperature": 0, "until": []}
    short = {"max_new_tokens": 3, "until": ["\n\n"]}
    plan = [(0, greedy), (1, short), (2, greedy), (3, greedy), (4, greedy), (5, short), (0, short), (1, greedy)]
    requests = [StandIn(f"Question {k}: describe.", dict(kw), to_visual, doc, "t", "test")
                for k, (doc, kw) in enumerate(plan)]
    gen = Generator(processor, model, batch_size=2)
    answers = gen.generate_until(requests, task_dict)

    def alone(k):
        context, kw, _, doc, _, _ = requests[k].args
        options, until = parse_gen_kwargs(kw)
        messages, images, videos = build_messages(context, docs[doc]["v"] if isinstance(docs[doc]["v"], list)
                                                  else [docs[doc]["v"]])
        batch = processor([messages], images=images or None, videos=videos or None)
        with model.context():
            tokens, = generate_many(model.config, model.params, [batch], max_new_tokens=options.max_new_tokens,
                                    eos_token_ids=processor.tokenizer.eos_token_ids, **options.kwargs())
        return cut_at_stop(processor.decode(tokens), until).strip()

    assert len(answers) == len(requests)
    assert answers[4] == "" and [i for i, _ in gen.errors] == [4] and "missing.png" in gen.errors[0][1]
    for k in (0, 1, 2, 3, 5, 6, 7):
        assert answers[k] == alone(k), k
    assert any(answers[k] for k in (0, 2, 3, 7))  # the tiny checkpoint answers readable tokens
    assert gen.last_stats["requests"] == 8 and gen.last_stats["failed"] == 1

    # a stop string: the answer is cut at its first occurrence
    full = answers[0]
    assert len(full) >= 3, full
    stop = full[1:3]
    cut, = gen.generate_until([StandIn("Question 0: describe.", {**greedy, "until": [stop]}, to_visual, 0, "t",
                                       "test")], task_dict)
    assert cut == full[:full.index(stop)].strip()


@pytest.mark.skipif(not HAVE_LMMS, reason="lmms-eval is not installed (pip install -e '.[lmms]' && "
                                          "pip install --no-deps lmms-eval==0.7.3)")
def test_lmms_model_class(ckpt):
    from lmms_eval.models import get_model

    from evaluation.lmms.model import Qwen2VLJax

    cls = get_model("qwen2vl_jax")  # through the lmms_eval.models entry point of setup.py
    assert cls is Qwen2VLJax
    lm = cls.create_from_arg_string(f"checkpoint={ckpt},mesh=data=-1,batch_size=3,compile_cache=",
                                    {"batch_size": "1", "device": None})  # model_args' batch_size wins
    assert lm.batch_size == 3 and lm.model.mesh.shape["data"] == len(lm.model.mesh.devices.flat)
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([])
    with pytest.raises(TypeError, match="unknown model_args"):
        cls.create_from_arg_string(f"checkpoint={ckpt},bogus=1")


TASK_YAML = """task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  temperature: 0
  until:
    - "\\n\\n"
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
  - metric: answered
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = '''import io

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(io.BytesIO(doc["image"])).convert("RGB")] if doc["image"] else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0].strip()
    return {"exact": float(prediction == doc["answer"]), "answered": float(bool(prediction))}
'''


@pytest.mark.skipif(not HAVE_LMMS, reason="lmms-eval is not installed (pip install -e '.[lmms]' && "
                                          "pip install --no-deps lmms-eval==0.7.3)")
def test_lmms_eval_task_end_to_end(ckpt, tmp_path):
    """`lmms-eval --model qwen2vl_jax ... --include_path TASKS` on a local parquet task: the results file has the
    task's metrics and one logged sample per document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(seed, size):
        buffer = io.BytesIO()
        picture(seed, size).save(buffer, format="PNG")
        return buffer.getvalue()

    n = 6
    table = pa.table({"question": [f"What is in picture {i}?" for i in range(n)],
                      "image": [png(i, (56, 56 + 28 * (i % 3))) if i != 4 else None for i in range(n)],
                      "answer": ["cat"] * n})
    pq.write_table(table, tmp_path / "tiny.parquet")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, parquet=tmp_path / "tiny.parquet"))
    (tasks / "utils.py").write_text(TASK_UTILS)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "lmms_eval", "--model", "qwen2vl_jax",
               "--model_args", f"checkpoint={ckpt},mesh=data=-1,batch_size=4,compile_cache=",
               "--tasks", TASK, "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    found = sorted(out.rglob("*results*.json"))
    assert found, f"no results file under {out}: {sorted(p.name for p in out.rglob('*'))}\n{run.stderr[-4000:]}"
    results = json.loads(found[-1].read_text())["results"][TASK]
    assert 0.0 <= results["exact,none"] <= 1.0 and results["answered,none"] > 0, results
    samples = [json.loads(line) for p in out.rglob(f"*samples_{TASK}*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(n))
    print(f"\nlmms-eval CLI: {n} samples in {seconds:.1f} s wall (process start, model load, compiles included); "
          f"results {results}")
